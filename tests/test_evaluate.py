"""Evaluation: exact and sampled KL between the samplers actually used (end-of-text masked alike in both), reward
and implicit-reward accuracy, the pad id taken from the tokenizer; and the deterministic batch order of training."""

import dataclasses
import math

import pytest
import torch
import torch.nn as nn
from conftest import with_sampling
from hypothesis import given, settings
from hypothesis import strategies as st

from minidpo.config import ConfigError
from minidpo.dataset.batching import stream_indices
from minidpo.dataset.pairs import Pair
from minidpo.dataset.prompts import Prompt
from minidpo.methods.evaluate import (
    EvalConfig,
    evaluate,
    implicit_reward_accuracy,
    kl_terms,
    per_token_kl,
    sample_plain,
    sample_reference,
    sequence_kl,
)
from minidpo.model.completions import sampler_logits
from minidpo.model.generate import SamplingConfig
from minidpo.model.gpt import GPT, GPTConfig
from minidpo.model.lora import LoRALinear, apply_lora, lora_disabled

CPU = torch.device("cpu")


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(2, 30), st.integers(0, 10_000), st.floats(0.1, 30.0))
def test_per_token_kl_is_nonnegative_zero_on_equal_inputs_and_matches_the_naive_sum(T, V, seed, scale):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(2, T, V, generator=g, dtype=torch.float64) * scale
    q = torch.randn(2, T, V, generator=g, dtype=torch.float64) * scale
    kl = per_token_kl(p, q)
    naive = torch.zeros(2, T, dtype=torch.float64)
    for b in range(2):
        for t in range(T):
            P, Q = p[b, t].softmax(-1), q[b, t].softmax(-1)
            naive[b, t] = sum(P[v] * (P[v].log() - Q[v].log()) for v in range(V))
    torch.testing.assert_close(kl.double(), naive, atol=1e-4, rtol=1e-4)
    assert (kl >= -1e-5).all()
    assert per_token_kl(p, p).abs().max() < 1e-6
    assert per_token_kl(p, p + 3.0).abs().max() < 1e-5  # shifting logits leaves the distribution unchanged


@settings(max_examples=30, deadline=None)
@given(st.integers(3, 12), st.integers(0, 10_000), st.integers(0, 4))
def test_eot_masked_in_both_distributions_makes_an_eot_only_difference_vanish(V, seed, min_new_tokens):
    """Policy and reference differ only in the end-of-text logit: where the sampler forbids end-of-text the two
    distributions it draws from are identical (KL 0, log-ratio 0 for every token); after that they differ."""
    g = torch.Generator().manual_seed(seed)
    eot, T = V - 1, 5
    reference = torch.randn(2, T, V, generator=g, dtype=torch.float64)
    policy = reference.clone()
    policy[..., eot] += 2.0 + torch.rand(2, T, generator=g, dtype=torch.float64)
    steps = torch.arange(T).expand(2, T)
    logp = sampler_logits(policy, steps, eot, min_new_tokens).log_softmax(-1)
    logq = sampler_logits(reference, steps, eot, min_new_tokens).log_softmax(-1)
    kl = kl_terms(logp, logq)
    masked = steps < min_new_tokens
    assert not kl.isnan().any()
    assert (kl[masked].abs() < 1e-12).all()
    assert ((logp - logq)[masked][:, :eot].abs() < 1e-12).all()
    assert (logp[..., eot][masked] == -math.inf).all()
    assert (kl[~masked] > 1e-3).all()


class EotOnlyModel(nn.Module):
    """Logits = a table row per token + a LoRA head whose adapter moves only the end-of-text logit."""

    def __init__(self, V: int, eot: int):
        super().__init__()
        torch.manual_seed(0)
        self.table = nn.Embedding(V, V)
        self.head = LoRALinear(nn.Linear(1, V, bias=False), rank=1, alpha=1.0)
        with torch.no_grad():
            self.head.lora_A.fill_(1.0)
            self.head.lora_B.zero_()
            self.head.lora_B[eot] = 3.0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(ids) + self.head(torch.ones(*ids.shape, 1))  # (B, T, V)


def test_sequence_kl_is_zero_where_eot_is_forbidden_when_the_models_differ_only_in_eot():
    V, eot = 7, 6
    model = EotOnlyModel(V, eot)
    prompts = [Prompt([1, 2], "a"), Prompt([3], "b"), Prompt([4, 5, 1], "c")]
    completions = [[1, 2, 3], [4, 5, 0], [2, 2, 1]]
    with lora_disabled(model):
        assert not torch.equal(model(torch.tensor([[1]])), EotOnlyModel(V, eot)(torch.tensor([[1]])))
    forbidden = sequence_kl(model, prompts, completions, CPU, eot, min_new_tokens=3)
    assert forbidden.exact.abs().max() < 1e-6 and forbidden.sampled.abs().max() < 1e-6
    allowed = sequence_kl(model, prompts, completions, CPU, eot, min_new_tokens=0)
    assert (allowed.exact > 1e-3).all()
    partly = sequence_kl(model, prompts, completions, CPU, eot, min_new_tokens=2)  # only the third step counts
    assert (partly.exact > 1e-3).all() and (partly.exact < allowed.exact).all()


def tiny_lora_model(zero: bool, vocab: int = 50, wte_scale: float = 1.0, b_std: float = 0.5) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=vocab, n_layer=2, n_head=2, n_embd=16)).eval()
    with torch.no_grad():
        model.transformer.wte.weight.mul_(wte_scale)  # sharper next-token distributions than GPT-2's init gives
    apply_lora(model, rank=2, alpha=4, targets=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    if not zero:
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * b_std)
    return model


def test_sequence_kl_is_zero_for_a_fresh_adapter_and_positive_once_it_moves():
    prompts = [Prompt([1, 2, 3], "x"), Prompt([4], "y")]
    completions = [[5, 6, 7, 8], [9, 10]]
    fresh = sequence_kl(tiny_lora_model(zero=True), prompts, completions, CPU, eot_id=49)
    moved = sequence_kl(tiny_lora_model(zero=False), prompts, completions, CPU, eot_id=49)
    assert fresh.exact.shape == fresh.sampled.shape == moved.exact.shape == (2,)
    assert fresh.exact.abs().max() < 1e-6 and fresh.sampled.abs().max() < 1e-6
    assert (moved.exact > 1e-4).all()


def test_sequence_kl_counts_only_the_generated_positions():
    model = tiny_lora_model(zero=False)
    p = Prompt([1, 2, 3], "x")
    full = sequence_kl(model, [p], [[5, 6, 7]], CPU, eot_id=49).exact
    shorter = sequence_kl(model, [p], [[5, 6]], CPU, eot_id=49).exact
    # with pad rows in the same batch the result must not change (pads are never scored)
    batched = sequence_kl(model, [p, Prompt([1], "y")], [[5, 6, 7], [8, 9, 10, 11, 12, 13]], CPU, eot_id=49).exact
    assert full.item() > shorter.item() > 0
    torch.testing.assert_close(batched[0], full[0], atol=1e-5, rtol=1e-5)


def naive_sequence_kl(model: GPT, prompt: list[int], completion: list[int], eot: int, min_new: int):
    """One prefix at a time, float64: mask eot before step min_new in both distributions, sum the exact KL and
    the sampled token's log-ratio."""
    exact = sampled = 0.0
    for t, token in enumerate(completion):
        ids = torch.tensor([prompt + completion[:t]])
        with torch.no_grad():
            p = model(ids)[0, -1].double()
            with lora_disabled(model):
                q = model(ids)[0, -1].double()
        if t < min_new:
            p[eot] = q[eot] = -math.inf
        logp, logq = p.log_softmax(-1), q.log_softmax(-1)
        exact += sum(float(logp[v].exp() * (logp[v] - logq[v])) for v in range(len(p)) if logp[v] > -math.inf)
        sampled += float(logp[token] - logq[token])
    return exact, sampled


def test_sequence_kl_matches_a_naive_prefix_by_prefix_computation_with_eot_masked():
    model = tiny_lora_model(zero=False, vocab=12, wte_scale=5.0, b_std=1.0)
    eot, min_new = 11, 2
    prompts = [Prompt([1, 2, 3], "a"), Prompt([4], "b"), Prompt([5, 6], "c")]
    completions = [[7, 8, 9, 11], [3, 3], [10, 1, 2, 0, 4]]
    kl = sequence_kl(model, prompts, completions, CPU, eot, min_new, batch_size=2)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        exact, sampled = naive_sequence_kl(model, p.ids, c, eot, min_new)
        assert kl.exact[i].item() == pytest.approx(exact, rel=1e-4, abs=1e-5)
        assert kl.sampled[i].item() == pytest.approx(sampled, rel=1e-4, abs=1e-5)


class TinyTokenizer:
    """The part of the GPT-2 tokenizer evaluation uses, over a 12-token vocabulary whose end-of-text is 11."""
    eot_id = 11

    def pad(self, seqs: list[list[int]], padding_side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
        T = max(map(len, seqs))
        ids, mask = torch.full((len(seqs), T), self.eot_id), torch.zeros(len(seqs), T, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, T - len(s):], mask[i, T - len(s):] = torch.tensor(s), 1
        return ids, mask

    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))


class CountingScorer:
    def score(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([t.split().count("3") / (1 + len(t.split())) for t in texts])


def tiny_prompts(n: int, seed: int = 5) -> list[Prompt]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 5, (n,), generator=g).tolist()  # different lengths: rows get padded
    return [Prompt(torch.randint(0, 11, (k,), generator=g).tolist(), f"p{i}") for i, k in enumerate(lengths)]


def test_exact_and_sampled_kl_agree_within_their_standard_error():
    """Both estimate the KL between the two samplers; their per-prompt difference has mean 0."""
    model = tiny_lora_model(zero=False, vocab=12, wte_scale=5.0, b_std=1.0)
    prompts, cfg = tiny_prompts(400), EvalConfig(SamplingConfig(max_new_tokens=6, min_new_tokens=3, eot_id=11),
                                                 batch_size=200, seed=0)
    completions = sample_plain(model, TinyTokenizer(), prompts, cfg)
    assert any(c[-1] == 11 for c in completions) and any(len(c) == 6 and c[-1] != 11 for c in completions)
    kl = sequence_kl(model, prompts, completions, CPU, 11, cfg.sampling.min_new_tokens, batch_size=200)
    diff = kl.sampled - kl.exact
    se = diff.std() / len(diff) ** 0.5
    assert kl.exact.mean() > 0.5  # a KL well away from 0, so agreement means something
    assert abs(diff.mean()) < 4 * se, (kl.exact.mean(), kl.sampled.mean(), se)
    assert kl.exact.std() < kl.sampled.std()  # the usual case (not a theorem): the exact sum varies less


def test_evaluate_with_a_small_vocabulary_reports_both_kls_and_their_errors():
    model = tiny_lora_model(zero=False, vocab=12, wte_scale=5.0, b_std=1.0)
    prompts, cfg = tiny_prompts(40), EvalConfig(SamplingConfig(max_new_tokens=6, min_new_tokens=2, eot_id=11),
                                                batch_size=16, seed=0, max_length=16)
    pairs = [Pair("p", "a", "b", [1, 2], [3, 4, 11], [5], 1.0, 0.0), Pair("q", "c", "d", [6], [7], [8, 9], 1.0, 0.0)]
    r = evaluate(model, TinyTokenizer(), CountingScorer(), prompts, cfg, pairs, 0.1)
    assert set(r["policy"]) == {"reward", "reward_se", "kl_exact", "kl_exact_se", "kl_sampled", "kl_sampled_se"}
    assert set(r["reference"]) == {"reward", "reward_se"} and len(r["examples"]) == 3
    assert r["policy"]["kl_exact"] > 0 and r["policy"]["kl_exact_se"] > 0 and r["policy"]["kl_sampled_se"] > 0
    assert r["reward_accuracy"] in (0.0, 0.5, 1.0)
    assert "kl" not in r and "kl" not in r["policy"]  # never the bare name: say which estimate
    assert all(isinstance(v, float) and math.isfinite(v) for v in r["policy"].values())
    assert not model.training


@pytest.mark.parametrize("pairs,beta", [(None, 0.1), ([], 0.1), ("pairs", None)])
def test_evaluate_without_pairs_or_beta_skips_the_implicit_reward(pairs, beta):
    """The RL baseline has no implicit reward; it is evaluated by the same function."""
    model = tiny_lora_model(zero=False, vocab=12, wte_scale=5.0)
    pairs = [Pair("p", "a", "b", [1], [3], [5], 1.0, 0.0)] if pairs == "pairs" else pairs
    cfg = EvalConfig(SamplingConfig(min_new_tokens=1, max_new_tokens=4, eot_id=11), seed=0, max_length=16)
    r = evaluate(model, TinyTokenizer(), CountingScorer(), tiny_prompts(4), cfg, pairs, beta, reference=False)
    assert r["reward_accuracy"] is None and "reference" not in r


def test_reference_uses_the_policy_seed_and_a_cached_sample_gives_the_same_result():
    prompts, cfg = tiny_prompts(12), EvalConfig(SamplingConfig(max_new_tokens=5, min_new_tokens=1, eot_id=11),
                                                batch_size=5, seed=3)
    fresh = tiny_lora_model(zero=True, vocab=12, wte_scale=5.0)
    r = evaluate(fresh, TinyTokenizer(), CountingScorer(), prompts, cfg)
    # policy == reference and common random numbers: identical samples, identical rewards, KL exactly 0
    assert r["policy"]["reward"] == r["reference"]["reward"] and r["policy"]["kl_exact"] == 0.0
    assert r["examples"][0]["policy"] == r["examples"][0]["reference"]
    moved = tiny_lora_model(zero=False, vocab=12, wte_scale=5.0)
    cached = sample_reference(moved, TinyTokenizer(), prompts, cfg)
    again = evaluate(moved, TinyTokenizer(), CountingScorer(), prompts, cfg)
    reused = evaluate(moved, TinyTokenizer(), CountingScorer(), prompts, cfg, reference=cached)
    assert again == reused
    with pytest.raises(ValueError, match="cached reference completions"):
        evaluate(moved, TinyTokenizer(), CountingScorer(), prompts, cfg, reference=cached[:-1])


def test_eval_config_samples_plainly_and_checks_its_lengths():
    assert {f.name for f in dataclasses.fields(EvalConfig)} == {"sampling", "batch_size", "seed", "max_length"}
    for kwargs, field in [(dict(max_new_tokens=0), "max_new_tokens"), (dict(min_new_tokens=-1), "min_new_tokens"),
                          (dict(max_new_tokens=4, min_new_tokens=5), "max_new_tokens"), (dict(temperature=0.7),
                          "temperature"), (dict(top_k=50), "temperature"), (dict(batch_size=0), "batch_size")]:
        with pytest.raises(ConfigError) as e:
            with_sampling(EvalConfig, **kwargs)
        assert e.value.field == field


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_implicit_reward_accuracy_is_zero_for_a_fresh_adapter(beta):
    model = tiny_lora_model(zero=True)
    pairs = [Pair("p", "a", "b", [1, 2], [3, 4], [5, 6, 7], 1.0, 0.0) for _ in range(3)]
    # policy == reference: every margin is exactly 0, never > 0
    assert implicit_reward_accuracy(model, pairs, 16, beta, CPU, pad_id=49) == 0.0


def test_implicit_reward_accuracy_runs_in_fp32_under_a_bf16_autocast(monkeypatch):
    """It is reported beside the reward model's held-out accuracy, which runs in fp32: the same precision for
    both, whatever autocast the evaluation samples under."""
    import minidpo.methods.evaluate as ev
    model, seen, forward = tiny_lora_model(zero=False), [], ev.concatenated_forward

    def spy(m, batch):
        seen.append(torch.is_autocast_enabled("cpu"))
        return forward(m, batch)
    monkeypatch.setattr(ev, "concatenated_forward", spy)
    pairs = [Pair("p", "a", "b", [1, 2], [3, 4], [5, 6, 7], 1.0, 0.0) for _ in range(3)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_context = implicit_reward_accuracy(model, pairs, 16, 0.1, CPU, pad_id=49)
    assert seen and not any(seen)
    assert bf16_context == implicit_reward_accuracy(model, pairs, 16, 0.1, CPU, pad_id=49)


# ------------------------------------------------------------------------------------- training batch order

@settings(max_examples=50, deadline=None)
@given(st.integers(1, 40), st.integers(0, 200), st.integers(1, 90), st.integers(0, 100))
def test_batch_order_is_a_pure_function_with_every_epoch_a_permutation(n, start, count, seed):
    a = stream_indices(n, start, count, seed)
    assert a == stream_indices(n, start, count, seed)
    assert all(0 <= i < n for i in a)
    stream = stream_indices(n, 0, start + count, seed)
    assert stream[start:] == a  # slicing the endless stream anywhere gives the same items
    for e in range(len(stream) // n):
        assert sorted(stream[e * n:(e + 1) * n]) == list(range(n))


def test_data_parallel_ranks_split_exactly_the_single_process_batch():
    n, per_rank, world = 37, 3, 2
    single = stream_indices(n, 5 * per_rank * world, per_rank * world, seed=1)  # step 5, one process, batch 6
    ranks = [stream_indices(n, (5 * world + r) * per_rank, per_rank, seed=1) for r in range(world)]
    assert ranks[0] + ranks[1] == single
