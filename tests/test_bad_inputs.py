"""Bad input of every kind ends in ONE exception whose message names the file (or flag) and what was expected, and
nothing half-written is left behind: no final file, no stray temporary file."""

import json
import shutil
import struct
import threading
import zipfile
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from test_download import Handler  # the Range-aware test server
from test_imdb import tiny_imdb, write_tarball
from test_tf_bundle import write_bundle

from minidpo.dataset.imdb import IMDB_SAMPLE_PATH, ImdbError, load_imdb
from minidpo.formats.download import DownloadError
from minidpo.formats.safetensors import load_file, save_file
from minidpo.model.gpt2_files import OPENAI_FILES
from minidpo.model.weights import CheckpointError, load_gpt2

# =====================================================================================================================
# files: weights, tarballs, downloads

FIXTURES = Path(__file__).parent / "fixtures"
OPENAI, ST, BIN = FIXTURES / "gpt2-tiny-openai", FIXTURES / "gpt2-tiny-safetensors", FIXTURES / "gpt2-tiny-bin"
DATA = "model.ckpt.data-00000-of-00001"


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def strays(directory: Path) -> list[str]:
    """Temporary or partial files anywhere under `directory`."""
    return sorted(str(p) for p in directory.rglob("*") if p.name.endswith((".tmp", ".part")))


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "empty":
        data = bytearray()
    elif how == "half":
        data = data[:len(data) // 2]
    elif how.startswith("flip@"):
        at = int(how[5:]) % len(data)
        data[at] ^= 0x10
    elif how == "non_utf8":
        data = data.replace(b'"n_embd"', b'"n_\xe9mbd"')
    path.write_bytes(bytes(data))


def bin_data_offset(path: Path) -> int:
    """A byte inside the first tensor record of a torch zip file (past its local header)."""
    info = next(i for i in zipfile.ZipFile(path).infolist() if i.filename.endswith("/data/0"))
    return info.header_offset + 30 + len(info.filename) + len(info.extra) + 100


# --------------------------------------------------------------------------- weights: truncated and corrupted files

@pytest.mark.parametrize("layout, name, how", [
    (OPENAI, "model.ckpt.index", "empty"), (OPENAI, "model.ckpt.index", "half"),
    (OPENAI, "model.ckpt.index", "flip@10"),
    (OPENAI, DATA, "empty"), (OPENAI, DATA, "half"), (OPENAI, DATA, "flip@5000"), (OPENAI, DATA, "flip@-3"),
    (OPENAI, "hparams.json", "half"), (OPENAI, "hparams.json", "non_utf8"), (OPENAI, "hparams.json", "empty"),
    (ST, "model.safetensors", "empty"), (ST, "model.safetensors", "half"), (ST, "model.safetensors", "flip@3"),
    (ST, "model.safetensors", "flip@40"), (ST, "config.json", "non_utf8"), (ST, "config.json", "half"),
    (BIN, "pytorch_model.bin", "empty"), (BIN, "pytorch_model.bin", "half"), (BIN, "pytorch_model.bin", "data"),
    (BIN, "pytorch_model.bin", "flip@100"),
], ids=lambda v: v.name.removeprefix("gpt2-tiny-") if isinstance(v, Path) else v)
def test_damaged_weight_file_is_one_checkpoint_error_naming_it(tmp_path, layout, name, how):
    d = copy_dir(layout, tmp_path / "m")
    damage(d / name, f"flip@{bin_data_offset(d / name)}" if how == "data" else how)
    with pytest.raises(CheckpointError) as e:
        load_gpt2(d)
    assert str(d / name) in str(e.value)
    assert strays(tmp_path) == []


def test_pickle_payload_in_a_bin_file_is_never_executed(tmp_path):
    class Payload:
        def __init__(self, marker: Path):
            self.marker = marker

        def __reduce__(self):
            return Path.touch, (self.marker,)  # what unpickling would run: create the marker file

    proof, marker = tmp_path / "proof", tmp_path / "executed"
    torch.save({"wte.weight": Payload(proof)}, tmp_path / "proof.bin")
    torch.load(tmp_path / "proof.bin", weights_only=False)  # the payload works where pickle is trusted...
    assert proof.exists()
    d = copy_dir(BIN, tmp_path / "m")
    torch.save({"wte.weight": Payload(marker)}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as e:
        load_gpt2(d)  # ...and is refused here
    assert not marker.exists()
    assert str(d / "pytorch_model.bin") in str(e.value) and "weights_only" in str(e.value)


# --------------------------------------------------------------------------- weights: wrong shapes and values

def edit_openai(d: Path, edit) -> None:
    from minidpo.formats.tf_bundle import load_bundle
    tensors = {k: v.clone() for k, v in load_bundle(d / "model.ckpt").items()}
    edit(tensors, "model/wpe", "model/h1/mlp/c_fc/b")
    write_bundle(d / "model.ckpt", tensors)  # a valid bundle, crc32c and all: only the content is wrong


def edit_hf(d: Path, edit) -> None:
    if (d / "model.safetensors").exists():
        tensors = {k: v.clone() for k, v in load_file(d / "model.safetensors").items()}
        edit(tensors, "transformer.wpe.weight", "transformer.h.1.mlp.c_fc.bias")
        save_file(tensors, d / "model.safetensors")
    else:
        tensors = torch.load(d / "pytorch_model.bin", weights_only=True)
        edit(tensors, "wpe.weight", "h.1.mlp.c_fc.bias")
        torch.save(tensors, d / "pytorch_model.bin")


LAYOUTS = [(OPENAI, edit_openai, "model.ckpt.index", "model/wpe", "model/h1/mlp/c_fc/b"),
           (ST, edit_hf, "model.safetensors", "wpe.weight", "h.1.mlp.c_fc.bias"),
           (BIN, edit_hf, "pytorch_model.bin", "wpe.weight", "h.1.mlp.c_fc.bias")]


@pytest.mark.parametrize("layout, edit, file, wpe, _", LAYOUTS, ids=["openai", "safetensors", "bin"])
def test_wrong_shape_names_the_key_both_shapes_and_the_file(tmp_path, layout, edit, file, wpe, _):
    d = copy_dir(layout, tmp_path / "m")
    edit(d, lambda t, pos, bias: t.update({pos: t[pos][:32].clone()}))  # 32 positions where the config says 64
    with pytest.raises(CheckpointError) as e:
        load_gpt2(d)
    for word in [f"'{wpe}'", "[32, 32]", "[64, 32]", str(d / file)]:
        assert word in str(e.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("layout, edit, file, _, bias", LAYOUTS, ids=["openai", "safetensors", "bin"])
def test_non_finite_weight_is_rejected_naming_the_tensor(tmp_path, layout, edit, file, _, bias, value):
    d = copy_dir(layout, tmp_path / "m")
    edit(d, lambda t, pos, b: t[b].__setitem__(3, value))
    with pytest.raises(CheckpointError, match="NaN or infinite") as e:
        load_gpt2(d)  # such a model computes only NaN logits: greedy text of "!!!!"
    assert f"'{bias}'" in str(e.value) and str(d / file) in str(e.value)


def test_weight_beyond_float16_range_is_rejected_when_cast_to_float16(tmp_path):
    d = copy_dir(ST, tmp_path / "m")
    edit_hf(d, lambda t, pos, b: t[b].__setitem__(3, 1e6))  # finite in float32, inf in float16
    assert load_gpt2(d).transformer.h[1].mlp.c_fc.bias[3] == 1e6
    with pytest.raises(CheckpointError, match="h.1.mlp.c_fc.bias.*float16"):
        load_gpt2(d, dtype=torch.float16)


@pytest.mark.parametrize("layout, file, key", [(OPENAI, "hparams.json", "n_head"), (ST, "config.json", "n_head"),
                                              (OPENAI, "hparams.json", "n_ctx"), (ST, "config.json", "n_layer")])
def test_zero_size_in_config_names_file_and_key(tmp_path, layout, file, key):
    d = copy_dir(layout, tmp_path / "m")
    (d / file).write_text(json.dumps(dict(json.loads((d / file).read_text()), **{key: 0})))
    with pytest.raises(CheckpointError, match=f"'{key}' must be a positive integer, got 0") as e:
        load_gpt2(d)  # n_head=0 used to be a ZeroDivisionError
    assert str(d / file) in str(e.value)


def test_n_embd_not_divisible_by_n_head_names_file_and_key(tmp_path):
    d = copy_dir(ST, tmp_path / "m")
    (d / "config.json").write_text(json.dumps(dict(json.loads((d / "config.json").read_text()), n_head=3)))
    with pytest.raises(CheckpointError, match="'n_embd'.*divisible by n_head") as e:
        load_gpt2(d)
    assert str(d / "config.json") in str(e.value)


# --------------------------------------------------------------------------- safetensors headers

def write_raw_safetensors(path: Path, header: dict | bytes, data: bytes) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def fixture_header() -> tuple[dict, bytes]:
    raw = (ST / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def entry(name: str, **change) -> callable:
    return lambda h: h[name].update(change)


WTE, LN = "transformer.wte.weight", "transformer.h.1.ln_1.weight"


@pytest.mark.parametrize("edit, words", [
    (entry(LN, data_offsets=["0", "128"]), ["'data_offsets'", "two non-negative integers"]),
    (entry(LN, shape=[-32]), ["'shape'", "non-negative"]),
    (entry(LN, shape="32"), ["'shape'"]),
    (entry(LN, dtype=["F32"]), ["'dtype'"]),
    (entry(LN, data_offsets=[0, 128, 256]), ["'data_offsets'"]),
    (entry(LN, data_offsets=[True, 129]), ["'data_offsets'"]),
    (lambda h: h.update({"__metadata__": {"format": 1}}), ["'__metadata__'"]),
    (lambda h: h.update({LN: 7}), [f"{LN!r}", "dtype, shape and data_offsets"]),
], ids=["offsets_strings", "negative_shape", "shape_string", "dtype_list", "three_offsets", "bool_offset",
        "metadata_int", "entry_int"])
def test_malformed_safetensors_header_field_names_file_and_key(tmp_path, edit, words):
    header, data = fixture_header()
    edit(header)
    d = copy_dir(ST, tmp_path / "m")
    write_raw_safetensors(d / "model.safetensors", header, data)
    with pytest.raises(CheckpointError) as e:
        load_gpt2(d)
    for word in words + [str(d / "model.safetensors")]:
        assert word in str(e.value)


def test_overlapping_safetensors_offsets_are_rejected(tmp_path):
    """h.1.ln_1 pointed at h.0.ln_1's bytes would load silently with a layer's weights taken from another."""
    header, data = fixture_header()
    header[LN]["data_offsets"] = header["transformer.h.0.ln_1.weight"]["data_offsets"]
    d = copy_dir(ST, tmp_path / "m")
    write_raw_safetensors(d / "model.safetensors", header, data)
    with pytest.raises(CheckpointError, match="overlaps|hole") as e:
        load_gpt2(d)
    assert str(d / "model.safetensors") in str(e.value)


@pytest.mark.parametrize("make, words", [
    (lambda h, data: (json.dumps(h).replace(WTE, "transformer.wt\udce9").encode("utf-8", "surrogateescape"), data),
     ["UTF-8"]),
    (lambda h, data: (b'{"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, '
                      b'"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}', b""), ["duplicate key 'a'"]),
    (lambda h, data: (json.dumps(h).encode(), data + b"\0" * 8), ["bytes after the last tensor"]),
], ids=["non_utf8_name", "duplicate_name", "trailing_bytes"])
def test_malformed_safetensors_header_bytes_are_rejected(tmp_path, make, words):
    d = copy_dir(ST, tmp_path / "m")
    write_raw_safetensors(d / "model.safetensors", *make(*fixture_header()))
    with pytest.raises(CheckpointError) as e:
        load_gpt2(d)
    for word in words + [str(d / "model.safetensors")]:
        assert word in str(e.value)


# --------------------------------------------------------------------------- IMDB tarballs

@pytest.mark.parametrize("how", ["empty", "flip@300000", "flip@-5", "half", "not_gzip"])
def test_damaged_imdb_tarball_is_one_imdb_error_naming_it(tmp_path, how):
    bad = tmp_path / "imdb.tar.gz"
    if how == "not_gzip":
        bad.write_bytes(b"<!DOCTYPE html><html>Not Found</html>")
    else:
        shutil.copy(IMDB_SAMPLE_PATH, bad)
        damage(bad, how)
    with pytest.raises(ImdbError) as e:
        load_imdb(bad, "train")
    assert str(bad) in str(e.value)


def test_non_utf8_review_is_rejected_naming_the_member(tmp_path):
    files = tiny_imdb()
    files["aclImdb/train/neg/5_3.txt"] = b"Caf\xe9 scene was awful"  # Latin-1, not UTF-8
    with pytest.raises(ImdbError, match="aclImdb/train/neg/5_3.txt.*not valid UTF-8"):
        load_imdb(write_tarball(tmp_path / "t.tar.gz", files), "train")


# --------------------------------------------------------------------------- downloads

@pytest.fixture
def release(tmp_path, monkeypatch):
    """A local server playing OpenAI's storage for the tiny release; the cache in tmp_path/cache."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.files = {f"/m/124M/{f}": (OPENAI / f).read_bytes() if (OPENAI / f).exists() else f.encode()
                 for f in OPENAI_FILES}
    srv.requests, srv.ignore_range, srv.cut_budget, srv.cut_after = [], False, 0, 0
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    monkeypatch.setenv("MINIDPO_CACHE", str(tmp_path / "cache"))
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/m"
    monkeypatch.setenv("MINIDPO_GPT2_URL", srv.url)
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.mark.parametrize("trouble", ["html", "cut_without_length"])
def test_download_that_returns_html_or_stops_halfway_installs_nothing(release, tmp_path, trouble):
    if trouble == "html":  # e.g. a proxy's or a host's error page, served with status 200
        release.files["/m/124M/checkpoint"] = b"<html><body>Bandwidth exceeded</body></html>"
        release.content_type = "text/html"
    else:  # no Content-Length: the end of the body is the connection closing, so a cut looks like the end
        release.send_length, release.cut_budget, release.cut_after = False, 1, 40
    with pytest.raises(DownloadError) as e:
        load_gpt2("gpt2")
    cache = tmp_path / "cache" / "gpt2" / "124M"
    assert f"{release.url}/124M/checkpoint" in str(e.value) and str(cache / "checkpoint") in str(e.value)
    assert not (cache / "checkpoint").exists() and strays(tmp_path / "cache") == []


# programs: locked, unwritable and busy folders (train.py end to end, refused before any work)

def _train_refuses(args: list[str], env: dict) -> str:
    import subprocess
    import sys
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "train.py", "--preset", "tiny", "--steps", "2", *args], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-2000:]
    return lines[0]


@pytest.mark.slow  # a subprocess
def test_a_second_run_into_a_folder_in_use_is_refused_naming_the_folder(tmp_path):
    import os

    from minidpo.training.runs import OutDirLock
    env = {**os.environ, "MINIDPO_CACHE": str(tmp_path / "cache")}
    with OutDirLock(tmp_path / "busy"):
        msg = _train_refuses(["--out-dir", str(tmp_path / "busy")], env)
    assert str(tmp_path / "busy") in msg and str(os.getpid()) in msg
    assert not (tmp_path / "busy" / "config.json").exists()


@pytest.mark.slow  # a subprocess
def test_an_unwritable_cache_dir_is_found_before_the_classifier_trains(tmp_path):
    import os
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    env = {**os.environ, "MINIDPO_CACHE": str(blocker / "cache")}
    msg = _train_refuses(["--out-dir", str(tmp_path / "o")], env)
    assert "cache" in msg and "not writable" in msg
    assert not (tmp_path / "o" / "config.json").exists()
