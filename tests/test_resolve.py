"""What --model auto, --data auto and --device auto pick when the user leaves the choice to minidpo."""

import socket

import pytest
import torch

from minidpo.resolve import BUNDLED_MODEL, imdb_source, load_model, pick_device


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("MINIDPO_CACHE", str(tmp_path))
    monkeypatch.setenv("MINIDPO_GPT2_URL", f"http://127.0.0.1:{closed_port()}/gpt-2/models")
    return tmp_path


def test_model_auto_falls_back_to_the_bundled_model_with_a_banner_when_offline(offline, capsys):
    model, desc = load_model("auto", torch.device("cpu"))
    err = capsys.readouterr().err
    assert desc == "data/tiny-imdb-gpt2"
    assert "--model auto" in err and "bundled" in err and "could not be downloaded" in err
    assert model.config.n_layer >= 1 and not model.training
    assert torch.isfinite(model(torch.tensor([[464, 3807]]))).all()


def test_bundled_model_is_small_fp16_safetensors_with_config():
    weights = BUNDLED_MODEL / "model.safetensors"
    assert (BUNDLED_MODEL / "config.json").is_file()
    assert weights.stat().st_size <= 25 * 2**20
    from minidpo.safetensors import read_header
    header, _ = read_header(weights)
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F16"}


def test_data_auto_uses_the_shipped_sample_without_the_full_set(offline, capsys):
    path = imdb_source("auto")
    assert path.name == "imdb_sample.tar.gz" and path.is_file()
    assert "shipped sample" in capsys.readouterr().err


def test_data_path_that_does_not_exist_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data .*no such file"):
        imdb_source(str(tmp_path / "nope.tar.gz"))


def test_device_auto_is_cpu_without_accelerators():
    expected = "cuda" if torch.cuda.is_available() else (
        "mps" if torch.backends.mps.is_available() else "cpu")
    assert pick_device("auto").type == expected
    assert pick_device("cpu").type == "cpu"
