"""The paper's simple baselines (minidpo/methods/baselines.py): Preferred-FT and Unlikelihood against their naive
formulas (value and gradient, both batch layouts, both log-prob paths), log(1 - p) computed stably, alpha = 0 against
Preferred-FT, and a short resumable run of each."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minidpo.config import ConfigError
from minidpo.dataset.batching import PairData, collate_pairs, collate_unique, prompt_groups
from minidpo.dataset.pairs import Pair
from minidpo.methods.baselines import (
    UL_FLOOR,
    UnlikelihoodConfig,
    log1mexp,
    per_row,
    preferred_ft_loss,
    preferred_ft_step,
    train_baseline,
    unlikelihood_loss,
    unlikelihood_step,
    unlikelihood_term,
)
from minidpo.methods.logprobs import naive_token_logps
from minidpo.methods.offline_train import BatchConfig
from minidpo.methods.scoring import completion_logps, token_logps
from minidpo.model.gpt import GPT, GPTConfig
from minidpo.model.lora import LoRAConfig, apply_lora, lora_state_dict
from minidpo.training.runtime import Runtime
from minidpo.training.trainer import LoopConfig, TrainRun

SETTINGS = settings(max_examples=40, deadline=None)
f64 = torch.float64
V = 64  # a small vocabulary; end-of-text (and the pad id) is V - 1


def tiny_policy(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=32, vocab_size=V, n_layer=2, n_head=2, n_embd=32))
    apply_lora(model, rank=2, alpha=4.0, targets=("attn.c_attn", "mlp.c_fc"))
    with torch.no_grad():
        for layer_name, p in model.named_parameters():
            if layer_name.endswith("lora_B"):
                p.normal_(0, 0.2)
    return model


def some_pairs() -> list[Pair]:
    """Two prompts, each with every pairing of three completions (so rows repeat across pairs, as in the data)."""
    out = []
    for prompt, comps in (([1, 2, 3], [[4, 5, 6, V - 1], [7, 8], [9, 10, 11, 12, 13]]),
                          ([14, 15], [[16, 17, 18], [19, V - 1], [20, 21, 22, 23]])):
        for i in range(3):
            for j in range(3):
                if i < j:
                    out.append(Pair("p", "c", "r", prompt, comps[i], comps[j], 1.0, 0.0))
    return out


def naive_token_list(model: GPT, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log p of each completion token given everything before it, one sequence at a time, float64."""
    seq = torch.tensor([prompt + completion])
    logp = model(seq).double().log_softmax(-1)[0, :-1].gather(-1, seq[0, 1:, None]).squeeze(-1)  # (n-1,)
    return logp[len(prompt) - 1:]


def naive_preferred_ft(model, pairs):
    nll = [-t for p in pairs for t in naive_token_list(model, p.prompt_ids, p.chosen_ids)]
    return torch.stack(nll).mean()


def naive_unlikelihood(model, pairs, alpha):
    losses = []
    for p in pairs:
        chosen = naive_token_list(model, p.prompt_ids, p.chosen_ids).sum()
        rejected = naive_token_list(model, p.prompt_ids, p.rejected_ids)
        ul = torch.log(torch.clamp(1 - rejected.exp(), min=UL_FLOOR)).sum()
        losses.append(-(chosen + alpha * ul))
    return torch.stack(losses).mean()


def grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).double()


@SETTINGS
@given(st.floats(-60.0, -1e-6))
def test_log1mexp_equals_the_naive_formula_in_float64(x):
    got = float(log1mexp(torch.tensor([x], dtype=f64)))
    assert got == pytest.approx(math.log(1 - math.exp(x)), rel=1e-6)


@SETTINGS
@given(st.floats(-20.0, -1e-30))
def test_log1mexp_in_float32_is_accurate_where_the_naive_formula_is_not(x):
    got = float(log1mexp(torch.tensor([x], dtype=torch.float32)))
    exact = math.log(-math.expm1(x))  # the float64 reference, accurate for every x < 0
    assert got == pytest.approx(exact, rel=1e-5, abs=1e-6)


def test_unlikelihood_term_stays_finite_with_a_finite_gradient_as_p_goes_to_1():
    x = torch.tensor([0.0, -1e-30, -1e-9, -1e-6, -0.5, -0.6931, -0.6932, -5.0, -80.0], requires_grad=True)
    y = unlikelihood_term(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    y = y.detach()
    assert bool(torch.isfinite(y).all()) and bool(torch.isfinite(g).all())
    assert float(y[0]) == pytest.approx(math.log(UL_FLOOR), rel=1e-4)  # p = 1: the floor, not -inf
    assert float(g[0]) == 0.0 and float(g[4]) < 0  # beyond the floor no push; elsewhere lowering p raises log(1-p)
    naive = torch.log(1 - x.detach().exp())
    assert not bool(torch.isfinite(naive[:3]).all())  # what the floor and log1mexp avoid
    torch.testing.assert_close(y[4:], torch.log(1 - x[4:].detach().double().exp()).float(), rtol=1e-6, atol=1e-6)


def test_unlikelihood_term_passes_gradcheck_in_float64():
    x = torch.tensor([-1e-3, -0.1, -0.69, -0.7, -3.0, -30.0], dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(unlikelihood_term, (x,))
    logits = torch.randn(5, 7, dtype=f64, requires_grad=True)
    targets = torch.tensor([0, 3, 6, 2, 2])
    row = torch.tensor([0, 0, 1, 1, 1])
    assert torch.autograd.gradcheck(
        lambda z: per_row(unlikelihood_term(naive_token_logps(z, targets)), row, 2), (logits,))


@SETTINGS
@given(st.lists(st.tuples(st.floats(-50, 0), st.floats(-20, 0), st.integers(1, 20)), min_size=1, max_size=8),
       st.floats(0.0, 2.0))
def test_losses_equal_their_formulas_and_alpha_0_is_preferred_ft_normalized_per_pair(rows, alpha):
    c, ul, n = (torch.tensor(v, dtype=f64) for v in zip(*rows))
    torch.testing.assert_close(unlikelihood_loss(c, ul, alpha), -(c + alpha * ul))
    torch.testing.assert_close(preferred_ft_loss(c, n), -c.sum() / n.sum())
    # alpha = 0: the same log-likelihood, summed per pair instead of averaged per token
    torch.testing.assert_close(unlikelihood_loss(c, ul, 0.0).sum(), preferred_ft_loss(c, n) * n.sum())


@pytest.mark.parametrize("logprobs", ["naive", "fused"])
def test_token_logps_sum_to_dpos_sequence_scores(logprobs):
    model = tiny_policy()
    b = collate_unique(some_pairs(), 16, pad_id=V - 1)
    keep = b["response_mask"] * b["attention_mask"]
    logp, row = token_logps(model, b["ids"], keep, logprobs)
    assert logp.shape == row.shape == (int((keep[:, 1:] != 0).sum()),)
    torch.testing.assert_close(per_row(logp, row, b["ids"].size(0)), completion_logps(model, b["ids"], keep, logprobs),
                               rtol=1e-5, atol=1e-5)


def step_inputs(mode: str, logprobs: str):
    """(model, pairs, make_batch_fn-style batch in `mode`'s layout, BatchConfig)."""
    pairs = some_pairs()
    collate = collate_unique if mode == "unique" else collate_pairs
    batch = (None, collate(pairs, 16, pad_id=V - 1), 0, len(pairs))
    return tiny_policy(), pairs, batch, BatchConfig(mode=mode, logprobs=logprobs, pad_id=V - 1)


@pytest.mark.parametrize("mode", ["unique", "pairs"])
@pytest.mark.parametrize("logprobs", ["naive", "fused"])
def test_preferred_ft_step_equals_the_naive_loss_and_gradient(mode, logprobs):
    model, pairs, batch, batch_config = step_inputs(mode, logprobs)
    loss, metrics, _, _ = preferred_ft_step(model, batch, batch_config)
    naive = naive_preferred_ft(model, pairs)
    torch.testing.assert_close(loss.double(), naive, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads(model, loss), grads(model, naive), rtol=1e-4, atol=1e-6)
    assert float(metrics["nll/token"]) == pytest.approx(float(naive.detach()), rel=1e-5)


@pytest.mark.parametrize("mode", ["unique", "pairs"])
@pytest.mark.parametrize("logprobs", ["naive", "fused"])
def test_unlikelihood_step_equals_the_naive_loss_and_gradient(mode, logprobs):
    model, pairs, batch, batch_config = step_inputs(mode, logprobs)
    loss, metrics, _, _ = unlikelihood_step(model, batch, UnlikelihoodConfig(alpha=0.7), batch_config)
    naive = naive_unlikelihood(model, pairs, 0.7)
    torch.testing.assert_close(loss.double(), naive, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads(model, loss), grads(model, naive), rtol=1e-4, atol=1e-5)
    assert float(metrics["unlikelihood/rejected"]) < 0


def test_unlikelihood_at_alpha_0_times_pairs_is_preferred_ft_times_chosen_tokens():
    model, pairs = tiny_policy(), some_pairs()
    batch = (None, collate_unique(pairs, 16, pad_id=V - 1), 0, len(pairs))
    batch_config = BatchConfig(pad_id=V - 1)
    ul, _, _, _ = unlikelihood_step(model, batch, UnlikelihoodConfig(alpha=0.0), batch_config)
    ft, _, _, _ = preferred_ft_step(model, batch, batch_config)
    tokens = sum(len(p.chosen_ids) for p in pairs)
    torch.testing.assert_close(ul * len(pairs), ft * tokens, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("field,kwargs", [("unlikelihood_alpha", {"alpha": -0.1}),
                                          ("unlikelihood_alpha", {"alpha": math.inf}),
                                          ("unlikelihood_floor", {"floor": 0.0})])
def test_config_rejects_bad_values_naming_the_flag(field, kwargs):
    with pytest.raises(ConfigError, match=field):
        UnlikelihoodConfig(**kwargs)


def toy_data() -> PairData:
    train = [Pair("p", "c", "r", [1 + i % 5, 2], [10, 11, 12, V - 1], [20, 21, 22], 1.0, 0.0) for i in range(10)]
    return PairData(train, [], prompt_groups(train), "toy")


def run(method, tmp, steps, crash_at=None):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=V, n_layer=1, n_head=2, n_embd=16))
    batch_config = BatchConfig(mode="unique", prompts=2, max_length=16, pad_id=V - 1)
    loop = LoopConfig(steps=steps, lr=3e-2, log_every=1, checkpoint_every=1)

    def crash(step):
        if step == crash_at:
            raise KeyboardInterrupt
    apply_lora(model, LoRAConfig(rank=2, alpha=4.0))  # the caller's fresh adapter, seeded as above
    summary = train_baseline(model, toy_data(), method, batch_config, TrainRun(loop, tmp, crash if crash_at else None),
                             Runtime(), UnlikelihoodConfig(alpha=0.5))
    return model, summary


@pytest.mark.parametrize("method,key,direction", [("preferred-ft", "logps/chosen", 1),
                                                  ("unlikelihood", "loss", -1)])
def test_a_short_run_moves_its_target_log_prob_and_resumes_bit_identically(tmp_path, method, key, direction):
    model, _ = run(method, tmp_path / "a", 6)
    lines = [json.loads(s) for s in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 7))
    assert direction * (lines[-1][key] - lines[0][key]) > 0, (lines[0][key], lines[-1][key])
    with pytest.raises(KeyboardInterrupt):
        run(method, tmp_path / "b", 6, crash_at=3)
    resumed, _ = run(method, tmp_path / "b", 6)
    straight = lora_state_dict(model)
    for k, v in lora_state_dict(resumed).items():
        assert torch.equal(v, straight[k]), k


def test_train_baseline_refuses_another_method(tmp_path):
    with pytest.raises(ConfigError, match="method"):
        train_baseline(GPT(GPTConfig(block_size=32, vocab_size=V, n_layer=1, n_head=2, n_embd=16)), toy_data(),
                       "dpo", BatchConfig(), TrainRun(LoopConfig(steps=1, lr=1e-3), tmp_path), Runtime())
