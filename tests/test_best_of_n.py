"""Best-of-N: the KL bound's formula, best-of-1 is the plain reference sample that evaluation scores, the reward never
drops as N grows, the kept completion is the best one, and the samples come from the reference (adapter off)."""

import math

import pytest
import torch
from conftest import VowelScorer
from hypothesis import given, settings
from hypothesis import strategies as st

from minidpo.dataset.prompts import Prompt
from minidpo.methods.best_of_n import best_of_n, best_of_n_sweep, kl_bound, sample_rounds
from minidpo.methods.evaluate import EvalConfig, sample_plain
from minidpo.model.completions import response_text
from minidpo.model.generate import SamplingConfig
from minidpo.model.gpt import GPT, GPTConfig
from minidpo.model.lora import apply_lora, lora_layers
from minidpo.model.tokenizer import Tokenizer

CFG = EvalConfig(sampling=SamplingConfig(max_new_tokens=4, min_new_tokens=1), batch_size=3, seed=7)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, n_layer=1, n_head=2, n_embd=16, block_size=32)).eval()
    tok = Tokenizer()
    prompts = [Prompt(tok.encode(t), t) for t in ["This movie was", "I", "The acting", "What a", "Never again"]]
    return model, tok, prompts


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 10_000))
def test_kl_bound_is_log_n_minus_n_minus_1_over_n(n):
    assert kl_bound(n) == pytest.approx(math.log(n) - (n - 1) / n)
    assert 0 <= kl_bound(n) < kl_bound(n + 1) < math.log(n + 1)


@pytest.mark.parametrize("bad", [0, -3, 2.0, True])
def test_kl_bound_rejects_anything_but_a_positive_integer(bad):
    with pytest.raises(ValueError):
        kl_bound(bad)


def test_best_of_one_is_the_reference_sample_evaluation_scores(setup):
    model, tok, prompts = setup
    r = best_of_n(model, tok, VowelScorer(), prompts, 1, CFG)
    plain = sample_plain(model, tok, prompts, CFG)
    expected = VowelScorer().score([p.text + response_text(c, tok) for p, c in zip(prompts, plain)]).mean()
    assert r["completions"] == plain
    assert r["reward"] == pytest.approx(float(expected))
    assert r["kl_bound"] == 0.0


def test_reward_never_drops_as_n_grows_and_separate_calls_agree_with_the_sweep(setup):
    model, tok, prompts = setup
    ns = [1, 2, 3, 5, 8]
    sweep = best_of_n_sweep(model, tok, VowelScorer(), prompts, ns, CFG)
    rewards = [r["reward"] for r in sweep]
    assert all(a <= b for a, b in zip(rewards, rewards[1:])), rewards
    assert rewards[-1] > rewards[0]  # with 8 tries some prompt gets a better completion
    for _, per_prompt in zip(ns[1:], sweep[1:]):  # per prompt too, not only on average
        assert all(a <= b for a, b in zip(sweep[0]["scores"], per_prompt["scores"]))
    single = best_of_n(model, tok, VowelScorer(), prompts, 5, CFG)
    assert single["completions"] == sweep[3]["completions"] and single["reward"] == sweep[3]["reward"]
    assert [r["kl_bound"] for r in sweep] == [kl_bound(n) for n in ns]


def test_the_kept_completion_is_the_highest_scoring_of_its_prompts_samples(setup):
    model, tok, prompts = setup
    r = best_of_n(model, tok, VowelScorer(), prompts, 4, CFG)
    completions, scores = sample_rounds(model, tok, VowelScorer(), prompts, 4, CFG)  # (rounds, P)
    torch.testing.assert_close(torch.tensor(r["scores"]), scores.max(0).values)
    for i, kept in enumerate(r["completions"]):
        assert kept in [completions[j][i] for j in range(4)]
    rescored = VowelScorer().score([p.text + t for p, t in zip(prompts, r["texts"])])
    torch.testing.assert_close(rescored, torch.tensor(r["scores"]))
    assert r["reward"] == pytest.approx(sum(r["scores"]) / len(prompts))


def test_samples_come_from_the_reference_with_the_adapter_disabled(setup):
    model, tok, prompts = setup
    plain = best_of_n(model, tok, VowelScorer(), prompts, 3, CFG)
    tuned = GPT(model.config).eval()
    tuned.load_state_dict(model.state_dict())
    apply_lora(tuned, rank=2, alpha=4.0, targets=("attn.c_attn", "mlp.c_fc"))
    with torch.no_grad():
        for layer in lora_layers(tuned).values():
            layer.lora_B.normal_(0, 1.0)  # a policy far from the reference
    # the adapter changes what the policy samples ...
    assert sample_plain(tuned, tok, prompts, CFG) != sample_plain(model, tok, prompts, CFG)
    r = best_of_n(tuned, tok, VowelScorer(), prompts, 3, CFG)  # ... but not what best-of-n samples
    assert r["completions"] == plain["completions"] and r["reward"] == plain["reward"]
    assert tuned.training is False


def test_n_larger_than_the_rounds_or_an_empty_sweep_is_refused(setup):
    model, tok, prompts = setup
    with pytest.raises(ValueError):
        best_of_n(model, tok, VowelScorer(), prompts, 0, CFG)
    with pytest.raises(ValueError):
        best_of_n_sweep(model, tok, VowelScorer(), prompts, [], CFG)
