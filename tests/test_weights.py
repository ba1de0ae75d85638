"""minidpo.model.weights: every GPT-2 layout loads to Hugging Face's logits; bad files fail with a message naming the
key and the file; names resolve through the cache or a (local) download; save_hf round-trips (tests/test_export.py)."""

import json
import shutil
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from test_download import Handler, closed_port  # the Range-aware test server

from minidpo.formats.download import DownloadError, cache_dir
from minidpo.formats.safetensors import load_file, read_header, save_file
from minidpo.model.export import save_hf
from minidpo.model.generate import generate
from minidpo.model.gpt import GPT
from minidpo.model.gpt2_files import OPENAI_FILES, gpt2_cache_dir
from minidpo.model.weights import CheckpointError, load_gpt2

FIXTURES = Path(__file__).parent / "fixtures"
OPENAI = FIXTURES / "gpt2-tiny-openai"
ST = FIXTURES / "gpt2-tiny-safetensors"
BIN = FIXTURES / "gpt2-tiny-bin"
EXPECTED = load_file(FIXTURES / "gpt2-tiny-expected.safetensors")  # written by transformers' GPT2LMHeadModel
DATA = "model.ckpt.data-00000-of-00001"


def logits_of(model: GPT) -> torch.Tensor:
    with torch.no_grad():
        return model(EXPECTED["input_ids"]).float()


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def assert_matches_hf(model: GPT) -> None:
    torch.testing.assert_close(logits_of(model), EXPECTED["logits"], rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- the three layouts

@pytest.mark.parametrize("source", [OPENAI, OPENAI / "model.ckpt", OPENAI / "model.ckpt.index", OPENAI / DATA, ST,
                                    ST / "model.safetensors", BIN, BIN / "pytorch_model.bin"],
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_layout_gives_transformers_logits(source):
    model = load_gpt2(source, verify=True)
    assert_matches_hf(model)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.transformer.wte.weight.dtype == torch.float32


def test_legacy_torch_save_format_loads(tmp_path):
    state = torch.load(BIN / "pytorch_model.bin", weights_only=True)
    torch.save(state, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)  # cannot be mmapped
    shutil.copy(BIN / "config.json", tmp_path)
    assert_matches_hf(load_gpt2(tmp_path))


def test_hub_style_safetensors_without_prefix_and_with_mask_buffers_loads(tmp_path):
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(ST / "model.safetensors").items()}
    for i in range(2):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    save_file(tensors, tmp_path / "model.safetensors")
    shutil.copy(ST / "config.json", tmp_path)
    assert_matches_hf(load_gpt2(tmp_path))


def test_minidpo_linear_layout_state_dict_loads_with_config_from_metadata(tmp_path):
    model = load_gpt2(OPENAI)
    state = {k: v for k, v in model.state_dict().items()}  # includes the tied lm_head.weight
    meta = {"minidpo.config": json.dumps(vars(model.config))}
    save_file(state, tmp_path / "ckpt.safetensors", metadata=meta)
    assert_matches_hf(load_gpt2(tmp_path / "ckpt.safetensors"))


def test_fp16_file_loads_as_fp32_unless_dtype_is_given(tmp_path):
    save_hf(load_gpt2(OPENAI), tmp_path, dtype=torch.float16)
    assert read_header(tmp_path / "model.safetensors")[0]["transformer.wte.weight"]["dtype"] == "F16"
    as32, as16 = load_gpt2(tmp_path), load_gpt2(tmp_path, dtype=torch.float16)
    assert all(p.dtype == torch.float32 for p in as32.parameters())
    assert all(p.dtype == torch.float16 for p in as16.parameters())
    torch.testing.assert_close(as32.transformer.wte.weight, as16.transformer.wte.weight.float(), rtol=0, atol=0)


def test_parameters_do_not_alias_the_file(tmp_path):
    src = copy_dir(ST, tmp_path / "m")
    model = load_gpt2(src)
    before = model.transformer.h[0].mlp.c_fc.bias.clone()
    (src / "model.safetensors").write_bytes(b"\0" * 16)  # overwrite the file under the model
    torch.testing.assert_close(model.transformer.h[0].mlp.c_fc.bias, before, rtol=0, atol=0)


def test_flipped_byte_is_caught_by_crc32c_by_default(tmp_path):
    d = copy_dir(OPENAI, tmp_path / "m")
    data = bytearray((d / DATA).read_bytes())
    data[5000] ^= 0x10  # inside model/h0/attn/c_attn/w (bytes 384..12672)
    (d / DATA).write_bytes(bytes(data))
    load_gpt2(d, verify=False)  # the opt-out: the damage goes unnoticed
    with pytest.raises(CheckpointError, match="crc32c") as e:
        load_gpt2(d)
    assert "model/h0/attn/c_attn/w" in str(e.value) and str(d / DATA) in str(e.value)


def rewrite_safetensors(tmp_path: Path, edit) -> Path:
    d = copy_dir(ST, tmp_path / "m")
    tensors = dict(load_file(d / "model.safetensors"))
    edit(tensors)
    save_file({k: v.clone() for k, v in tensors.items()}, d / "model.safetensors")
    return d


@pytest.mark.parametrize("edit, words", [
    (lambda t: t.update({"transformer.wte.weight": torch.zeros(500, 32)}),
     ["'wte.weight'", "[500, 32]", "[512, 32]"]),
    (lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"), ["missing", "'h.1.mlp.c_fc.bias'", "[128]"]),
    (lambda t: t.update({"transformer.h.2.ln_1.weight": torch.ones(32)}), ["unexpected", "'h.2.ln_1.weight'"]),
    (lambda t: t.update({"lm_head.weight": torch.zeros(512, 32)}), ["'lm_head.weight'", "tied"]),
], ids=["wrong_shape", "missing_key", "unexpected_key", "untied_head"])
def test_mismatched_safetensors_error_names_key_shapes_and_file(tmp_path, edit, words):
    d = rewrite_safetensors(tmp_path, edit)
    with pytest.raises(CheckpointError) as e:
        load_gpt2(d)
    for w in words + [str(d / "model.safetensors")]:
        assert w in str(e.value)


def test_wrong_shape_in_openai_checkpoint_is_reported_in_openai_terms(tmp_path):
    d = copy_dir(OPENAI, tmp_path / "m")
    hp = json.loads((d / "hparams.json").read_text())
    (d / "hparams.json").write_text(json.dumps(dict(hp, n_ctx=32)))
    with pytest.raises(CheckpointError) as e:
        load_gpt2(d)
    assert "'model/wpe'" in str(e.value) and "[64, 32]" in str(e.value) and "[32, 32]" in str(e.value)
    assert str(d / "model.ckpt.index") in str(e.value)


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_truncated_weight_file_is_a_clear_error(tmp_path, name):
    d = copy_dir(ST if name.endswith("safetensors") else BIN, tmp_path / "m")
    (d / name).write_bytes((d / name).read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated") as e:
        load_gpt2(d)
    assert str(d / name) in str(e.value)


def test_bad_config_json_names_file_and_key(tmp_path):
    d = copy_dir(ST, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["n_head"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="'n_head'") as e:
        load_gpt2(d)
    assert str(d / "config.json") in str(e.value)


def test_bare_file_of_unknown_width_asks_for_config_json(tmp_path):
    shutil.copy(ST / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="config.json"):
        load_gpt2(tmp_path / "model.safetensors")


def test_unknown_source_lists_the_accepted_names(tmp_path):
    with pytest.raises(CheckpointError, match="gpt2-medium"):
        load_gpt2(tmp_path / "nothing-here")


def test_flipped_byte_in_pytorch_bin_is_caught_by_the_zip_crc(tmp_path):
    import zipfile
    d = copy_dir(BIN, tmp_path / "m")
    info = next(i for i in zipfile.ZipFile(d / "pytorch_model.bin").infolist() if i.filename.endswith("/data/0"))
    data = bytearray((d / "pytorch_model.bin").read_bytes())
    data[info.header_offset + 30 + len(info.filename) + len(info.extra) + 100] ^= 0x10  # inside the tensor bytes
    (d / "pytorch_model.bin").write_bytes(bytes(data))
    load_gpt2(d, verify=False)  # torch.load itself does not look at the CRCs
    with pytest.raises(CheckpointError, match="CRC32") as e:
        load_gpt2(d)
    assert str(d / "pytorch_model.bin") in str(e.value) and "data/0" in str(e.value)


def test_config_reports_the_files_vocab_size():
    assert load_gpt2(ST).config.vocab_size == 512 and load_gpt2(OPENAI).config.vocab_size == 512


# --------------------------------------------------------------------------- names: cache and download

@pytest.fixture
def release_server():
    """Serves the tiny OpenAI release as if it were 124M, under /gpt-2/models/124M/<file>."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.files = {f"/gpt-2/models/124M/{f}": (OPENAI / f).read_bytes() if (OPENAI / f).exists() else f.encode()
                 for f in OPENAI_FILES}
    srv.requests, srv.ignore_range, srv.cut_budget, srv.cut_after = [], False, 0, 0
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/gpt-2/models"
    yield srv
    srv.shutdown()
    srv.server_close()


def test_name_downloads_into_cache_resuming_a_cut_transfer(release_server, tmp_path, monkeypatch):
    monkeypatch.setenv("MINIDPO_CACHE", str(tmp_path))
    monkeypatch.setenv("MINIDPO_GPT2_URL", release_server.url)
    data_url = f"/gpt-2/models/124M/{DATA}"
    release_server.cut_budget, release_server.cut_after, release_server.cut_path = 1, 60_000, data_url
    model = load_gpt2("gpt2")
    assert_matches_hf(model)
    d = tmp_path / "gpt2" / "124M"
    assert gpt2_cache_dir("gpt2") == d and all((d / f).is_file() for f in OPENAI_FILES)
    assert (d / DATA).read_bytes() == (OPENAI / DATA).read_bytes()
    assert [r for p, r in release_server.requests if p == data_url] == [None, "bytes=60000-"]  # cut, then resumed
    n = len(release_server.requests)
    assert_matches_hf(load_gpt2("124M"))  # now served from the cache
    assert len(release_server.requests) == n


def test_corrupt_file_in_the_cache_is_fetched_again_before_loading(release_server, tmp_path, monkeypatch):
    import hashlib

    from minidpo.model import gpt2_files
    monkeypatch.setenv("MINIDPO_CACHE", str(tmp_path))
    monkeypatch.delenv("MINIDPO_GPT2_URL", raising=False)
    monkeypatch.setattr(gpt2_files, "OPENAI_URL", release_server.url)  # the test server plays OpenAI, with pins
    monkeypatch.setattr(gpt2_files, "PINS", {("124M", f.split("/")[-1]): (len(b), hashlib.sha256(b).hexdigest())
                                             for f, b in release_server.files.items()})
    d = copy_dir(OPENAI, tmp_path / "gpt2" / "124M")
    data = bytearray((d / DATA).read_bytes())
    data[5000] ^= 0x10  # same size, wrong bytes: placed by hand or damaged on disk
    (d / DATA).write_bytes(bytes(data))
    log = []
    assert_matches_hf(load_gpt2("gpt2", log=log.append))
    assert (d / DATA).read_bytes() == (OPENAI / DATA).read_bytes()
    assert [p for p, _ in release_server.requests if p.endswith(DATA)] == [f"/gpt-2/models/124M/{DATA}"]
    assert any(str(d / DATA) in line and "sha256" in line for line in log)


def test_damaged_cache_offline_says_what_was_wrong(tmp_path, monkeypatch):
    from minidpo.model import gpt2_files
    monkeypatch.setenv("MINIDPO_CACHE", str(tmp_path))
    monkeypatch.delenv("MINIDPO_GPT2_URL", raising=False)
    monkeypatch.setattr(gpt2_files, "OPENAI_URL", f"http://127.0.0.1:{closed_port()}/gpt-2/models")
    monkeypatch.setattr(gpt2_files, "PINS", {("124M", "hparams.json"): (1, None)})
    copy_dir(OPENAI, tmp_path / "gpt2" / "124M")
    with pytest.raises(DownloadError, match="damaged") as e:
        load_gpt2("gpt2")
    assert "hparams.json" in str(e.value) and "expected 1" in str(e.value) and "unreachable" in str(e.value)


def test_offline_name_error_names_url_cache_path_and_manual_steps(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIDPO_CACHE", str(tmp_path))
    monkeypatch.setenv("MINIDPO_GPT2_URL", f"http://127.0.0.1:{closed_port()}/gpt-2/models")
    with pytest.raises(DownloadError) as e:
        load_gpt2("gpt2-medium")
    msg = str(e.value)
    assert "/gpt-2/models/355M/" in msg and str(tmp_path / "gpt2" / "355M") in msg
    assert "by hand" in msg and "hparams.json" in msg and "unreachable" in msg


# --------------------------------------------------------------------------- the real GPT-2 124M, if present

REAL = cache_dir() / "gpt2" / "124M"


@pytest.mark.skipif(not (REAL / DATA).is_file(), reason=f"GPT-2 124M not in {REAL} (set MINIDPO_CACHE or run "
                    "minidpo.model.gpt2_files.download_gpt2('124M') to enable)")
def test_real_gpt2_124m_greedy_continuation():
    from minidpo.model.tokenizer import Tokenizer

    model = load_gpt2(REAL, verify=True)
    torch.testing.assert_close(model.transformer.wte.weight[0, :3],
                               torch.tensor([-0.11010301, -0.03926672, 0.03310751]), rtol=0, atol=1e-6)
    tok = Tokenizer()
    idx = torch.tensor([tok.encode("Every effort moves")])
    out = generate(model, idx, max_new_tokens=30, temperature=0)
    assert tok.decode(out[0].tolist()) == ("Every effort moves forward, but it's not enough.\n\n\"I'm not going to "
                                           "sit here and say, 'I'm not going to do this,'")


# --------------------------------------------------------------------------- bad files

def test_truncated_tf_data_file_names_file_and_tensor(tmp_path):
    d = copy_dir(OPENAI, tmp_path / "m")
    (d / DATA).write_bytes((d / DATA).read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated") as e:
        load_gpt2(d)
    assert str(d / DATA) in str(e.value) and "model/" in str(e.value)
