"""Policy gradients: the RLOO estimator is unbiased and beats plain REINFORCE on variance, its pieces match their
formulas, the config checks itself, and a tiny RLOO run trains end to end and resumes exactly."""

import json
import math

import pytest
import torch
from conftest import VowelScorer, with_sampling
from hypothesis import given, settings
from hypothesis import strategies as st

from minidpo.config import ConfigError
from minidpo.dataset.prompts import Prompt
from minidpo.methods import scoring
from minidpo.methods.pg import adaptive_kl_coef, kl_penalized_rewards, policy_gradient_loss, rloo_advantages
from minidpo.methods.rloo import KLController, RLOOConfig, train_rloo
from minidpo.methods.scoring import completion_logps
from minidpo.model.generate import SamplingConfig
from minidpo.model.gpt import GPT, GPTConfig
from minidpo.model.lora import apply_lora, lora_state_dict
from minidpo.model.tokenizer import Tokenizer
from minidpo.training.runtime import Runtime
from minidpo.training.trainer import LoopConfig, TrainRun

SETTINGS = settings(max_examples=15, deadline=None)
rewards_2d = st.integers(1, 4).flatmap(lambda P: st.integers(2, 6).flatmap(lambda K: st.lists(
    st.floats(-10, 10, allow_nan=False), min_size=P * K, max_size=P * K).map(
    lambda v: torch.tensor(v, dtype=torch.float64).view(P, K))))


# ------------------------------------------------------------------------------------------------ the pieces


@SETTINGS
@given(rewards_2d)
def test_rloo_advantages_are_reward_minus_mean_of_the_others_and_rows_sum_to_zero(rewards):
    adv = rloo_advantages(rewards)
    P, K = rewards.shape
    naive = torch.tensor([[rewards[p, i] - sum(rewards[p, j] for j in range(K) if j != i) / (K - 1)
                           for i in range(K)] for p in range(P)], dtype=torch.float64)
    torch.testing.assert_close(adv, naive)
    torch.testing.assert_close(adv.sum(1), torch.zeros(P, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(rloo_advantages(rewards + 3.0), adv)  # a common offset changes nothing


@pytest.mark.parametrize("shape", [(3, 1), (0,), (4,), (2, 2, 2)])
def test_rloo_advantages_reject_a_single_completion_or_a_wrong_rank(shape):
    with pytest.raises(ValueError):
        rloo_advantages(torch.zeros(shape))


@SETTINGS
@given(st.lists(st.tuples(st.floats(0, 1), st.floats(-50, 0), st.floats(-50, 0)), min_size=1, max_size=8),
       st.floats(0, 2))
def test_kl_penalized_rewards_match_their_formula(rows, kl_coef):
    s, pol, ref = (torch.tensor(c, dtype=torch.float64) for c in zip(*rows))
    out = kl_penalized_rewards(s, pol, ref, kl_coef)
    expected = [a - kl_coef * (b - c) for a, b, c in rows]
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64))
    with pytest.raises(ValueError):
        kl_penalized_rewards(s, pol[:-1], ref[:-1], kl_coef) if len(rows) > 1 else \
            kl_penalized_rewards(s, pol.view(1, 1), ref, kl_coef)


def test_policy_gradient_loss_is_minus_mean_and_sends_no_gradient_into_the_advantages():
    adv = torch.tensor([[1.0, -1.0], [0.5, -0.5]], requires_grad=True)
    logps = torch.tensor([[-2.0, -3.0], [-1.0, -4.0]], requires_grad=True)
    loss = policy_gradient_loss(adv, logps)
    assert loss.item() == pytest.approx(-(1 * -2 + -1 * -3 + 0.5 * -1 + -0.5 * -4) / 4)
    loss.backward()
    torch.testing.assert_close(logps.grad, -adv.detach() / 4)
    assert adv.grad is None


def test_adaptive_kl_coef_follows_trl_and_clips_the_error_at_20_percent():
    assert adaptive_kl_coef(0.1, 6.0, 6.0, 64, 10000) == pytest.approx(0.1)
    assert adaptive_kl_coef(0.1, 6.6, 6.0, 64, 10000) == pytest.approx(0.1 * (1 + 0.1 * 64 / 10000))
    assert adaptive_kl_coef(0.1, 100.0, 6.0, 64, 10000) == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000))
    assert adaptive_kl_coef(0.1, 0.0, 6.0, 64, 10000) == pytest.approx(0.1 * (1 - 0.2 * 64 / 10000))


@pytest.mark.parametrize("field, bad", [("k", 1), ("prompts_per_step", 0), ("kl_coef", -0.1),
                                        ("kl_coef", math.nan), ("kl_coef", math.inf), ("target_kl", 0.0),
                                        ("target_kl", math.nan), ("horizon", 0), ("min_new_tokens", 0),
                                        ("max_new_tokens", 3), ("logprobs", "fast"),
                                        ("temperature", 0.0), ("temperature", math.inf)])
def test_rloo_config_rejects_bad_values_naming_the_field(field, bad):
    with pytest.raises(ConfigError) as e:
        with_sampling(RLOOConfig, **{field: bad})
    assert e.value.field == field


def test_adaptive_kl_needs_a_nonzero_starting_coefficient():
    with pytest.raises(ConfigError) as e:
        RLOOConfig(kl_coef=0.0, target_kl=3.0)
    assert e.value.field == "kl_coef"


# ------------------------------------------------------------------------- the estimator on a categorical policy


def rloo_gradients(theta: torch.Tensor, reward: torch.Tensor, K: int, M: int, seed: int,
                   baseline: bool) -> torch.Tensor:
    """(M, A) independent gradient estimates of sum(softmax(theta) * reward), each from K sampled actions, computed
    with the library's advantage and loss functions (plain REINFORCE: the rewards themselves as advantages)."""
    g = torch.Generator().manual_seed(seed)
    actions = torch.multinomial(theta.softmax(-1).expand(M, -1), K, replacement=True, generator=g)  # (M, K)
    rewards = reward[actions]                                                                      # (M, K)
    advantages = rloo_advantages(rewards) if baseline else rewards
    thetas = theta.detach().expand(M, -1).clone().requires_grad_()  # one copy per estimate: per-row gradients
    logps = thetas.log_softmax(-1).gather(1, actions)                # (M, K)
    (M * policy_gradient_loss(advantages, logps)).backward()         # sum over rows of each row's mean
    return -thetas.grad


def exact_gradient(theta: torch.Tensor, reward: torch.Tensor) -> torch.Tensor:
    t = theta.detach().clone().requires_grad_()
    (t.softmax(-1) * reward).sum().backward()
    return t.grad


categorical = st.integers(2, 5).flatmap(lambda A: st.tuples(
    st.lists(st.floats(-2, 2), min_size=A, max_size=A), st.lists(st.floats(0, 1), min_size=A, max_size=A),
    st.integers(2, 6), st.integers(0, 2**31 - 1)))


@SETTINGS
@given(categorical)
def test_rloo_gradient_is_unbiased_within_a_few_standard_errors(problem):
    theta, reward, K, seed = problem
    theta, reward = torch.tensor(theta, dtype=torch.float64), torch.tensor(reward, dtype=torch.float64)
    M = 4000
    est = rloo_gradients(theta, reward, K, M, seed, baseline=True)  # (M, A)
    se = est.std(0) / math.sqrt(M)
    err = (est.mean(0) - exact_gradient(theta, reward)).abs()
    assert bool((err <= 5 * se + 1e-9).all()), (err, se)


@SETTINGS
@given(categorical, st.floats(1.0, 5.0))
def test_leave_one_out_baseline_has_lower_variance_than_plain_reinforce(problem, offset):
    # rewards with a common offset at least as large as their spread, like P(positive) in [0, 1] that are rarely 0
    theta, reward, K, seed = problem
    theta = torch.tensor(theta, dtype=torch.float64)
    reward = torch.tensor(reward, dtype=torch.float64) + offset
    M = 2000
    rloo = rloo_gradients(theta, reward, K, M, seed, baseline=True)
    plain = rloo_gradients(theta, reward, K, M, seed, baseline=False)
    exact = exact_gradient(theta, reward)
    torch.testing.assert_close(plain.mean(0), exact, atol=6 * float(plain.std(0).max()) / math.sqrt(M) + 1e-9, rtol=0)
    assert float(rloo.var(0).sum()) < float(plain.var(0).sum())


def test_rloo_ascends_the_expected_reward_of_a_categorical_policy():
    reward = torch.tensor([0.1, 0.9, 0.4, 0.2], dtype=torch.float64)
    theta = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([theta], lr=0.5)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        actions = torch.multinomial(theta.detach().softmax(-1).expand(8, -1), 4, replacement=True, generator=g)
        loss = policy_gradient_loss(rloo_advantages(reward[actions]), theta.log_softmax(-1)[actions])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float((theta.detach().softmax(-1) * reward).sum()) > 0.8


# ------------------------------------------------------------------------------------------ a tiny run, end to end


def tiny_setup():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, n_layer=1, n_head=2, n_embd=16, block_size=32))
    apply_lora(model, rank=2, alpha=4.0, targets=("attn.c_attn",))
    tok = Tokenizer()
    texts = ["This movie was", "I", "The acting in this film", "What a", "Never again", "A story of"]
    prompts = [Prompt(tok.encode(t), t) for t in texts]
    return model, tok, prompts


def run(tmp, steps, crash_at=None, target_kl=0.01):
    model, tok, prompts = tiny_setup()
    cfg = RLOOConfig(sampling=SamplingConfig(min_new_tokens=2, max_new_tokens=5), k=3, prompts_per_step=2, kl_coef=0.1,
                     target_kl=target_kl, horizon=20, seed=1)
    loop = LoopConfig(steps=steps, lr=1e-2, grad_accum=2, log_every=1, checkpoint_every=1, label="rloo")

    def crash(step):
        if step == crash_at:
            raise KeyboardInterrupt
    out = train_rloo(model, tok, VowelScorer(), prompts, cfg, TrainRun(loop, tmp, crash if crash_at else None),
                     Runtime())
    return model, out


def test_tiny_rloo_run_logs_its_metrics_and_resumes_bit_identically(tmp_path):
    model, out = run(tmp_path / "a", 3)
    lines = [json.loads(s) for s in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    for m in lines:
        assert 0 <= m["reward"] <= 1 and math.isfinite(m["kl/sampled"]) and m["tokens_per_s"] > 0
        assert m["completions_per_s"] > 0 and 2 <= m["completion_tokens"] <= 5
    assert lines[0]["kl/sampled"] == pytest.approx(0.0, abs=1e-5)  # the adapter starts at B = 0: policy == reference
    coefs = [m["kl_coef"] for m in lines]  # adapted after every step toward the target KL
    assert coefs[0] == pytest.approx(0.1) and len(set(coefs)) == 3 and out["kl_coef"] not in coefs
    straight = lora_state_dict(model)
    assert any(bool(v.abs().sum() > 0) for k, v in straight.items() if k.endswith("lora_B"))  # it trained

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", 3, crash_at=2)  # dies after step 2; the last checkpoint is step 1
    resumed, out_b = run(tmp_path / "b", 3)
    for k, v in lora_state_dict(resumed).items():
        assert torch.equal(v, straight[k]), k
    assert out_b["kl_coef"] == out["kl_coef"]  # the adaptive coefficient came back from the checkpoint


def test_fixed_kl_coef_never_moves_and_adaptive_one_updates_once_per_optimizer_step():
    fixed = KLController(RLOOConfig(kl_coef=0.3), grad_accum=2, world=1)
    for micro in (0, 1, 0, 1):
        fixed.observe(torch.full((8,), 50.0), micro)
    assert fixed.value == 0.3
    adaptive = KLController(RLOOConfig(kl_coef=0.3, target_kl=1.0, horizon=100), grad_accum=2, world=1)
    adaptive.observe(torch.full((8,), 1.1), 0)
    assert adaptive.value == 0.3  # not after the first micro-batch
    adaptive.observe(torch.full((8,), 1.0), 1)  # step mean KL 1.05 over 16 completions
    assert adaptive.value == pytest.approx(adaptive_kl_coef(0.3, 1.05, 1.0, 16, 100))
    adaptive.load({"kl_coef": 0.7})
    assert adaptive.state() == {"kl_coef": 0.7}


@pytest.mark.parametrize("logits_budget, temperature", [(0, 1.0), (2**30, 1.0), (0, 0.7), (2**30, 1.3)])
def test_completion_logps_are_of_the_sampler_with_end_of_text_forbidden_fused_equal_to_naive(monkeypatch,
                                                                                              logits_budget,
                                                                                              temperature):
    monkeypatch.setattr(scoring, "SMALL_LOGITS_BYTES", logits_budget)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=16, block_size=16)).double()
    apply_lora(model, rank=2, alpha=4.0, targets=("attn.c_attn",))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)  # a nonzero adapter: gradients reach both A and B
    eot = 63
    prompts, completions = [[5, 6, 7], [9]], [[1, 2, eot], [3, 4, 5, 6, 7]]
    rows = [p + c for p, c in zip(prompts, completions)]
    ids = torch.full((2, 8), eot)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    for b, (p, _) in enumerate(zip(prompts, completions)):
        ids[b, :len(rows[b])] = torch.tensor(rows[b])
        mask[b, len(p):len(rows[b])] = True
    lens = torch.tensor([3, 1])
    out = {}
    for mode in ("naive", "fused"):
        cfg = RLOOConfig(sampling=SamplingConfig(min_new_tokens=2, max_new_tokens=5, eot_id=eot,
                                                 temperature=temperature), logprobs=mode)
        model.zero_grad()
        out[mode] = completion_logps(model, ids, mask, mode, cfg.sampling, lens, small_logits=True)
        out[mode].sum().backward()
        out[mode + "_grad"] = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    close = dict(check_dtype=False, rtol=1e-4, atol=1e-5)  # the naive path computes in fp32 (evaluation's)
    torch.testing.assert_close(out["fused"], out["naive"], **close)
    for a, b in zip(out["fused_grad"], out["naive_grad"]):
        torch.testing.assert_close(a, b, **close)
    with torch.no_grad():  # by hand: end-of-text removed at the first 2 generated steps, then the plain softmax
        expected = []
        for p, c in zip(prompts, completions):
            logits = model(torch.tensor([p + c]))[0]
            total = 0.0
            for step, token in enumerate(c):
                lg = logits[len(p) - 1 + step] / temperature
                if step < 2:
                    lg[eot] = -math.inf
                total += float(lg.log_softmax(-1)[token])
            expected.append(total)
    torch.testing.assert_close(out["fused"].detach(), torch.tensor(expected, dtype=torch.float64))


class LogitsModel(torch.nn.Module):
    """hidden_states = the given logits, lm_head = the identity: a model whose logits are chosen exactly."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits  # (B, T, V)
        self.lm_head = torch.nn.Linear(logits.size(-1), logits.size(-1), bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(torch.eye(logits.size(-1)))

    def hidden_states(self, ids):
        return self.logits[:, :ids.size(1)]

    def forward(self, ids):
        return self.lm_head(self.hidden_states(ids))


@pytest.mark.parametrize("logits_budget, eot", [(0, 31), (2**30, 31), (2**30, 2)])  # eot last (a view) or not
@pytest.mark.parametrize("one_minus_p_eot", [1e-4, 1e-6, 1e-7, 1e-8])
def test_fused_completion_logps_stay_exact_where_end_of_text_takes_almost_all_the_mass(monkeypatch, logits_budget,
                                                                                       eot, one_minus_p_eot):
    """At a forbidden step with 1 - p(eot) tiny, log pi~(y) = logit(y) - logsumexp over the rest; a difference
    log pi(y) - log(1 - p(eot)) in fp32 loses it (-1.558 for -1.409 at 5e-6, +inf at 1e-7)."""
    monkeypatch.setattr(scoring, "SMALL_LOGITS_BYTES", logits_budget)
    V, T = 32, 6
    g = torch.Generator().manual_seed(0)
    logits = torch.rand(1, T, V, generator=g, dtype=torch.float64)
    rest = torch.logsumexp(torch.cat([logits[..., :eot], logits[..., eot + 1:]], -1), -1)  # (1, T) without eot
    logits[..., eot] = rest - math.log(one_minus_p_eot)                   # 1 - p(eot) ~ one_minus_p_eot
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    mask = torch.tensor([[False, True, True, True, True, True]])
    lens = torch.tensor([1])
    exact = sum(float(logits[0, t, ids[0, t + 1]] - (rest[0, t] if t < 3 else torch.logsumexp(logits[0, t], -1)))
                for t in range(T - 1))
    model = LogitsModel(logits.float())
    for mode in ("naive", "fused"):
        cfg = RLOOConfig(sampling=SamplingConfig(min_new_tokens=3, max_new_tokens=5, eot_id=eot), logprobs=mode)
        got = completion_logps(model, ids, mask, mode, cfg.sampling, lens, small_logits=True)
        assert torch.isfinite(got).all()
        assert float(got) == pytest.approx(exact, rel=1e-5), mode
