"""train.py's cached stages: classifier cache, prompt-count errors, precomputed reference log-probs."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from minidpo.dpo import concatenated_forward
from minidpo.imdb import IMDB_SAMPLE_PATH, load_imdb
from minidpo.lora import apply_lora, lora_disabled
from minidpo.model import GPT, GPTConfig
from minidpo.pairs import Pair
from minidpo.pipeline import build_pair_sets, fit_classifier, precompute_reference
from minidpo.tokenizer import Tokenizer


def quiet(_msg: str) -> None:
    pass


def test_classifier_is_trained_once_then_loaded_from_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MINIDPO_CACHE", str(tmp_path))
    train = load_imdb(IMDB_SAMPLE_PATH, "train")[::3]  # a third of the sample keeps this quick
    test = load_imdb(IMDB_SAMPLE_PATH, "test")[::10]
    said = []
    first = fit_classifier(Path(IMDB_SAMPLE_PATH), train, test, said.append)
    second = fit_classifier(Path(IMDB_SAMPLE_PATH), train, test, said.append)
    assert "training" in said[0] and "reusing" in said[-1]
    assert len(list((tmp_path / "reward").glob("*.safetensors"))) == 1
    texts = [r.text for r in test]
    assert torch.equal(first.score(texts), second.score(texts))


def test_asking_for_more_prompts_than_reviews_is_one_clear_error(tmp_path):
    reviews = load_imdb(IMDB_SAMPLE_PATH, "test")[:20]
    cfg = SimpleNamespace(pairs_mode="labels", completions_per_prompt=2, pairing="all", min_new_tokens=2,
                          max_new_tokens=4, gen_temperature=1.0, gen_top_k=None, gen_batch_size=8, seed=0,
                          num_prompts=50, prompt_min_tokens=2, prompt_max_tokens=8, heldout_prompts=1,
                          eval_prompts=1, max_length=32)
    with pytest.raises(SystemExit, match="--num-prompts"):
        build_pair_sets(cfg, None, Tokenizer(), None, reviews, reviews, tmp_path, torch.device("cpu"), None, 0, quiet)


def test_precomputed_reference_equals_the_disabled_adapter_forward_and_is_reused(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=50257, n_layer=2, n_head=2, n_embd=16)).eval()  # pads are 50256
    pairs = [Pair("p", "c", "r", [1, 2, 3][:1 + i % 3], [4, 5, 6][:1 + i % 2], [7, 8, 9, 10][:2 + i % 3], 1.0, 0.0)
             for i in range(7)]
    cfg = SimpleNamespace(batch_size=3, max_length=16)
    said = []
    ref = precompute_reference(model, pairs, cfg, tmp_path, torch.device("cpu"), None, "fp1", said.append)
    apply_lora(model, rank=2, alpha=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # the policy moves; the reference must not
    from minidpo.pairs import collate_pairs
    batch = collate_pairs(pairs, 16)
    with torch.no_grad(), lora_disabled(model):
        live = concatenated_forward(model, batch)
    for key in ("chosen_logps", "rejected_logps", "chosen_logps_mean", "rejected_logps_mean"):
        torch.testing.assert_close(ref[key], live[key], atol=1e-5, rtol=1e-5)
    again = precompute_reference(model, pairs, cfg, tmp_path, torch.device("cpu"), None, "fp1", said.append)
    assert "reusing" in said[-1] and torch.equal(again["chosen_logps"], ref["chosen_logps"])
    precompute_reference(model, pairs, cfg, tmp_path, torch.device("cpu"), None, "fp2", said.append)
    assert "precomputing" in said[-1]  # a different fingerprint rebuilds
