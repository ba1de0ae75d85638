"""train.py's cached stages: classifier cache, prompt-count errors, precomputed reference log-probs."""

from pathlib import Path

import pytest
import torch

from minidpo.dataset.batching import PairData, collate_unique
from minidpo.dataset.imdb import IMDB_SAMPLE_PATH, load_imdb
from minidpo.dataset.pairs import Pair
from minidpo.dataset.prompts import PromptConfig
from minidpo.experiment.context import Reviews
from minidpo.experiment.stages import (
    ReferenceCacheConfig,
    check_model_fits,
    fit_classifier,
    make_prompt_sets,
    precompute_reference,
)
from minidpo.methods.dpo import sequence_forward
from minidpo.model.gpt import GPT, GPTConfig
from minidpo.model.lora import apply_lora, lora_disabled
from minidpo.model.tokenizer import Tokenizer
from minidpo.training.runtime import Runtime

NO_AUTOCAST = torch.autocast("cpu", enabled=False)


@pytest.mark.slow  # trains the classifier on the IMDB sample
def test_classifier_is_trained_once_then_loaded_from_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MINIDPO_CACHE", str(tmp_path))
    reviews = Reviews(Path(IMDB_SAMPLE_PATH), load_imdb(IMDB_SAMPLE_PATH, "train")[::3],  # a third: quick
                      load_imdb(IMDB_SAMPLE_PATH, "test")[::10])
    said = []
    first = fit_classifier(reviews, said.append)
    second = fit_classifier(reviews, said.append)
    assert "training" in said[0] and "reusing" in said[-1]
    assert len(list((tmp_path / "reward").glob("*.safetensors"))) == 1
    texts = [r.text for r in reviews.test]
    assert torch.equal(first.score(texts), second.score(texts))


@pytest.mark.slow  # trains the classifier on the IMDB sample
def test_a_corrupt_classifier_cache_is_retrained_not_trusted(monkeypatch, tmp_path):
    monkeypatch.setenv("MINIDPO_CACHE", str(tmp_path))
    reviews = Reviews(Path(IMDB_SAMPLE_PATH), load_imdb(IMDB_SAMPLE_PATH, "train")[::6],
                      load_imdb(IMDB_SAMPLE_PATH, "test")[::20])
    fit_classifier(reviews)
    (cached,) = (tmp_path / "reward").glob("*.safetensors")
    cached.write_bytes(cached.read_bytes()[:100])
    said = []
    fit_classifier(reviews, said.append)
    assert "unreadable" in said[0] and "training" in said[1]


def test_asking_for_more_prompts_than_reviews_is_one_clear_error():
    reviews = load_imdb(IMDB_SAMPLE_PATH, "test")[:20]
    with pytest.raises(ValueError, match="--num-prompts"):
        make_prompt_sets(Reviews(Path("x"), reviews, reviews), Tokenizer(), PromptConfig(train=50, heldout=1, eval=1),
                         reviews)


def test_a_model_with_a_smaller_vocabulary_or_context_is_refused_before_any_work():
    small = GPT(GPTConfig(block_size=32, vocab_size=1000, n_layer=1, n_head=1, n_embd=8))
    with pytest.raises(ValueError, match="vocabulary has 1000 tokens"):
        check_model_fits(small, 24, 32, 50257)
    short = GPT(GPTConfig(block_size=16, vocab_size=50257, n_layer=1, n_head=1, n_embd=8))
    with pytest.raises(ValueError, match="context of 16 tokens"):
        check_model_fits(short, 24, 32, 50257)


def test_precomputed_reference_equals_the_disabled_adapter_forward_and_is_reused(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=50257, n_layer=2, n_head=2, n_embd=16)).eval()
    pairs = []
    for q in range(3):  # three prompts, each with 3 completions and all their pairs
        prompt = [1, 2, 3][:1 + q]
        comps = [[4 + q, 5], [6, 7, 8 + q], [9, 10 + q]]
        for i in range(3):
            for j in range(i + 1, 3):
                pairs.append(Pair("p", "c", "r", prompt, comps[i], comps[j], 1.0, 0.0))
    groups = [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    data = PairData(pairs, [], groups, "fp1")
    cfg = ReferenceCacheConfig(groups_needed=6, max_length=16, pad_id=50256, logprobs="naive", seed=0)
    said = []
    ref = precompute_reference(model, data, cfg, tmp_path, Runtime(autocast=NO_AUTOCAST, log=said.append))
    assert set(ref) == {0, 1, 2}
    again = precompute_reference(model, data, cfg, tmp_path, Runtime(autocast=NO_AUTOCAST, log=said.append))
    assert "reusing" in said[-1] and torch.equal(again[0], ref[0])
    precompute_reference(model, PairData(pairs, [], groups, "fp2"), cfg, tmp_path,
                         Runtime(autocast=NO_AUTOCAST, log=said.append))
    assert "precomputing" in said[-1]  # other pairs: rebuilt
    apply_lora(model, rank=2, alpha=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # the policy moves; the reference must not
    for g, idx in enumerate(groups):
        batch = collate_unique([pairs[i] for i in idx], 16, pad_id=50256)
        with torch.no_grad(), lora_disabled(model):
            live = sequence_forward(model, batch, "naive")
        torch.testing.assert_close(ref[g][0], live["logps"], atol=1e-5, rtol=1e-5)
