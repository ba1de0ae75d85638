"""What --model auto, --data auto and --device auto pick when the user leaves the choice to minidpo."""

import socket

import pytest
import torch

from minidpo.config import ConfigError
from minidpo.experiment.resolve import (
    BUNDLED_MODEL,
    check_model_name,
    check_writable,
    choose_dtype,
    cpu_flags,
    imdb_source,
    load_model,
    model_source,
    pick_device,
)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("MINIDPO_CACHE", str(tmp_path))
    monkeypatch.setenv("MINIDPO_GPT2_URL", f"http://127.0.0.1:{closed_port()}/gpt-2/models")
    return tmp_path


def test_model_auto_falls_back_to_the_bundled_model_and_says_why_when_offline(offline, capsys):
    model, desc, notes = load_model("auto", torch.device("cpu"))
    assert capsys.readouterr().err == ""  # library code does not print; the program shows the notes
    text = "\n".join(notes)
    assert desc == "bundled"
    assert "--model auto" in text and "bundled" in text and "could not be downloaded" in text
    assert "tiny preset" in text
    assert model.config.n_layer >= 1 and not model.training
    assert torch.isfinite(model(torch.tensor([[464, 3807]]))).all()


def test_offline_fallback_note_never_cuts_a_path_or_url_at_a_hyphen(offline, monkeypatch):
    """The download error names the cache path and URL; its wrapped lines must keep every hyphenated word whole."""
    cache = offline / ("a-long-hyphenated-cache-directory-name-" * 3)
    monkeypatch.setenv("MINIDPO_CACHE", str(cache))
    _, _, notes = load_model("auto", torch.device("cpu"))
    assert any("a-long-hyphenated" in line for line in notes)
    assert all(not line.rstrip().endswith("-") for line in notes), notes


def test_bundled_model_is_small_fp16_safetensors_with_config():
    weights = BUNDLED_MODEL / "model.safetensors"
    assert (BUNDLED_MODEL / "config.json").is_file()
    assert weights.stat().st_size <= 64 * 2**20  # the bundled model's budget (issue: files <= 64 MB)
    from minidpo.formats.safetensors import read_header
    header, _ = read_header(weights)
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F16"}


def test_data_auto_uses_the_shipped_sample_without_the_full_set(offline):
    path, note = imdb_source("auto")
    assert path.name == "imdb_sample.tar.gz" and path.is_file()
    assert "shipped sample" in note


def test_data_path_that_does_not_exist_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="--data .*no such file"):
        imdb_source(str(tmp_path / "nope.tar.gz"))


def test_model_path_that_does_not_exist_is_a_clear_error_but_names_pass(tmp_path):
    with pytest.raises(ConfigError, match="--model .*no such file"):
        check_model_name(str(tmp_path / "nope"))
    for name in ("gpt2", "gpt2-xl", "124M", "bundled", "auto", "random"):
        check_model_name(name)


def test_run_records_names_as_names_and_paths_as_absolute_paths(tmp_path):
    assert model_source("gpt2") == "gpt2" and model_source("bundled") == "bundled"
    assert model_source("./some/dir") == str((tmp_path.cwd() / "some" / "dir").resolve())


@pytest.mark.parametrize("name", ["bogus", "cuda:x", "tpu"])
def test_a_device_that_does_not_exist_is_one_message(name):
    with pytest.raises(ConfigError, match="--device"):
        pick_device(name)


def test_dtype_names_map_to_autocast_dtypes():
    cpu = torch.device("cpu")
    assert choose_dtype(cpu, "fp32")[0] is None
    assert choose_dtype(cpu, "bf16")[0] is torch.bfloat16
    with pytest.raises(ConfigError, match="--dtype"):
        choose_dtype(cpu, "fp8")


@pytest.mark.parametrize("flags, expected", [
    ({"avx2", "amx_bf16", "avx512_bf16"}, torch.bfloat16),
    ({"avx2", "avx512_bf16"}, torch.bfloat16),
    ({"avx2", "amx_bf16"}, torch.bfloat16),
    ({"avx2", "avx512f"}, None),
    (set(), None),
])
def test_dtype_auto_is_bf16_only_on_a_cpu_with_bf16_hardware(flags, expected):
    dtype, why = choose_dtype(torch.device("cpu"), "auto", flags=flags)
    assert dtype is expected
    assert why.startswith("auto: ") and ("amx_bf16" in why or "avx512_bf16" in why)


def test_dtype_auto_is_bf16_on_cuda_whatever_the_cpu():
    assert choose_dtype(torch.device("cuda"), "auto", flags=set())[0] is torch.bfloat16


def test_cpu_flags_are_read_from_the_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx2 amx_bf16\n\nprocessor\t: 1\n")
    assert cpu_flags(info) == {"fpu", "avx2", "amx_bf16"}
    assert cpu_flags(tmp_path / "missing") == set()


def test_an_unwritable_directory_is_found_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="--out-dir .*not writable"):
        check_writable(blocker / "sub", "--out-dir")


def test_device_auto_is_cpu_without_accelerators():
    expected = "cuda" if torch.cuda.is_available() else (
        "mps" if torch.backends.mps.is_available() else "cpu")
    assert pick_device("auto").type == expected
    assert pick_device("cpu").type == "cpu"


@pytest.mark.parametrize("dtype, flags, warned", [
    ("bf16", {"avx2", "avx512f"}, True), ("bf16", set(), True), ("bf16", {"avx2", "avx512_bf16"}, False),
    ("bf16", {"amx_bf16"}, False), ("fp32", set(), False), ("auto", set(), False),
])
def test_dtype_bf16_on_a_cpu_without_bf16_units_prints_one_warning_line(dtype, flags, warned, monkeypatch, capsys):
    import train
    from minidpo.experiment import resolve
    monkeypatch.setattr(resolve, "cpu_flags", lambda *a: flags)
    train.make_runtime(train.TrainConfig(device="cpu", dtype=dtype), 0, 1, None)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == (1 if warned else 0), err
    assert not warned or ("--dtype bf16" in err[0] and "slower than fp32" in err[0])
