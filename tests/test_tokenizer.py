"""GPT-2 tokenizer built offline from the shipped BPE files."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minidpo.model.tokenizer import DATA_DIR, EOT_ID, Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer()


def test_known_ids_and_sizes(tok):
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.eot_id == 50256
    assert tok.vocab_size == 50257
    assert tok.decode([15496, 995]) == "Hello world"


def test_eot_id_is_the_encodings_endoftext_token(tok):
    assert EOT_ID == tok.eot_id == 50256
    assert tok.encoding.encode("<|endoftext|>", allowed_special="all") == [EOT_ID]
    assert tok.decode([EOT_ID]) == "<|endoftext|>"


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_decode_inverts_encode_for_any_string(tok, s):
    assert tok.decode(tok.encode(s)) == s


def test_endoftext_in_text_is_ordinary_text(tok):
    ids = tok.encode("a<|endoftext|>b")
    assert tok.eot_id not in ids
    assert tok.decode(ids) == "a<|endoftext|>b"


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_encode_pads_and_masks(tok, side):
    texts = ["This movie was great", "Bad", ""]
    ids, mask = tok.batch_encode(texts, padding_side=side)
    assert ids.shape == mask.shape == (3, len(tok.encode(texts[0])))
    for i, t in enumerate(texts):
        real = ids[i][mask[i].bool()].tolist()
        assert real == tok.encode(t)
        assert (ids[i][~mask[i].bool()] == tok.eot_id).all()
        n = len(real)
        if n:
            expected = torch.arange(ids.size(1)) >= ids.size(1) - n if side == "left" else torch.arange(ids.size(1)) < n
            assert torch.equal(mask[i].bool(), expected)


def test_bad_padding_side_names_the_argument(tok):
    with pytest.raises(ValueError, match="padding_side"):
        tok.batch_encode(["x"], padding_side="middle")


def test_corrupt_bpe_file_is_rejected_with_its_path(tmp_path):
    shutil.copy(DATA_DIR / "encoder.json", tmp_path / "encoder.json")
    (tmp_path / "vocab.bpe").write_bytes((DATA_DIR / "vocab.bpe").read_bytes()[:-10])
    with pytest.raises(ValueError, match="vocab.bpe.*sha256"):
        Tokenizer(tmp_path)


def test_missing_bpe_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="encoder.json"):
        Tokenizer(tmp_path)


@pytest.mark.slow  # a subprocess
def test_works_without_home_cache_or_network(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HOME", "TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR")}
    # any attempt to reach the network goes to a closed local port and fails loudly
    env.update(http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9", TMPDIR=str(tmp_path))
    code = ("from minidpo.model.tokenizer import Tokenizer; t = Tokenizer(); "
            "assert t.encode('Hello world') == [15496, 995]; print('ok')")
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
    assert list(tmp_path.iterdir()) == []  # nothing cached anywhere
