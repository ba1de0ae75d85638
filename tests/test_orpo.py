"""ORPO (minidpo/methods/orpo.py): its loss against the paper's formula written naively and against TRL's arithmetic on
the same inputs, its invariants (chosen/rejected swapped, lambda = 0, gradient signs, gradcheck), the step against a
naive per-sequence loss in both batch layouts, and a short resumable run.

The TRL reference re-implements, in plain torch, `ORPOTrainer.odds_ratio_loss` and the loss line of
`get_batch_loss_metrics` from huggingface/trl trl/experimental/orpo/orpo_trainer.py (TRL 1.10.0.dev0, commit
f2cd57710ae3; the same arithmetic as trl/trainer/orpo_trainer.py of earlier releases, which wrote
`torch.log1p(-torch.exp(x))` where this one calls its `log1mexp`):

    log_odds = (chosen_logps - rejected_logps) - (log1mexp(chosen_logps) - log1mexp(rejected_logps))
    losses = beta * F.logsigmoid(log_odds)
    loss = policy_nll_loss - losses.mean()

with chosen_logps, rejected_logps the length-averaged completion log-probs (`get_batch_logps(...,
average_log_prob=True)`). TRL is not a dependency: only its arithmetic is copied here. TRL's `policy_nll_loss` also
counts the prompt's tokens (its concatenated_forward), the paper's L_SFT and minidpo's only the completion's, so the
NLL term is checked against the paper and the odds-ratio term and the sum against TRL.
"""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from test_baselines import some_pairs, tiny_policy, toy_data  # the same stand-ins as the baselines' tests

from minidpo.config import ConfigError
from minidpo.dataset.batching import collate_pairs, collate_unique
from minidpo.dataset.pairs import Pair
from minidpo.experiment.compare import method_runs
from minidpo.methods.baselines import preferred_ft_step
from minidpo.methods.offline_train import BatchConfig
from minidpo.methods.orpo import ORPOConfig, orpo_loss, orpo_step, train_orpo
from minidpo.model.gpt import GPT, GPTConfig
from minidpo.model.lora import LoRAConfig, apply_lora, lora_state_dict
from minidpo.training.runtime import Runtime
from minidpo.training.trainer import LoopConfig, TrainRun

SETTINGS = settings(max_examples=40, deadline=None)
f64 = torch.float64
V = 64  # a small vocabulary; end-of-text (and the pad id) is V - 1

# a pair: per-token log-probs of the chosen and of the rejected completion, each strictly below 0 (p < 1)
token_logps = st.lists(st.floats(-8.0, -1e-3), min_size=1, max_size=6)
pairs_of_tokens = st.lists(st.tuples(token_logps, token_logps), min_size=1, max_size=6)
lambdas = st.floats(0.0, 2.0)


def as_inputs(pairs: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen sums, chosen lengths, rejected sums, rejected lengths), each (P,) float64."""
    cols = [[sum(w) for w, _ in pairs], [len(w) for w, _ in pairs], [sum(r) for _, r in pairs],
            [len(r) for _, r in pairs]]
    return tuple(torch.tensor(c, dtype=f64) for c in cols)


def paper_loss(pairs: list, lam: float) -> float:
    """Hong et al. 2024, eqs. 2-7, in plain Python: p = exp(mean token log-prob), odds = p / (1 - p),
    L = NLL per chosen token + lam * mean(-log sigmoid(log(odds_w / odds_l)))."""
    nll = -sum(sum(w) for w, _ in pairs) / sum(len(w) for w, _ in pairs)
    terms = []
    for w, r in pairs:
        p_w, p_l = math.exp(sum(w) / len(w)), math.exp(sum(r) / len(r))
        odds_w, odds_l = p_w / (1 - p_w), p_l / (1 - p_l)
        sigmoid = 1 / (1 + math.exp(-math.log(odds_w / odds_l)))
        terms.append(-math.log(sigmoid))
    return nll + lam * sum(terms) / len(terms)


def trl_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, policy_nll_loss: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's ORPOTrainer arithmetic on length-averaged log-probs (see the module docstring): (loss, log_odds)."""
    def log1mexp(x):
        t = -0.6931471805599453
        return torch.where(x < t, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))

    log_odds = (chosen_logps - rejected_logps) - (log1mexp(chosen_logps) - log1mexp(rejected_logps))
    losses = beta * F.logsigmoid(log_odds)
    return policy_nll_loss - losses.mean(), log_odds


@SETTINGS
@given(pairs_of_tokens, lambdas)
def test_loss_equals_the_papers_formula_written_naively(pairs, lam):
    loss, nll, _ = orpo_loss(*as_inputs(pairs), lam)
    assert float(loss) == pytest.approx(paper_loss(pairs, lam), rel=1e-9, abs=1e-12)
    assert float(nll) == pytest.approx(paper_loss(pairs, 0.0), rel=1e-12)


@SETTINGS
@given(pairs_of_tokens, lambdas)
def test_loss_and_log_odds_equal_trls_arithmetic_on_the_same_inputs(pairs, lam):
    c, nc, r, nr = as_inputs(pairs)
    loss, nll, log_odds = orpo_loss(c, nc, r, nr, lam)
    expected, expected_odds = trl_loss(c / nc, r / nr, nll, lam)
    torch.testing.assert_close(log_odds, expected_odds, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)


def test_trl_reference_at_its_default_beta_on_fixed_numbers():
    """One hand-checkable case at TRL's default (beta = lambda = 0.1): mean log-probs -1 and -2."""
    c, r = torch.tensor([-1.0], dtype=f64), torch.tensor([-2.0], dtype=f64)
    loss, nll, log_odds = orpo_loss(2 * c, torch.tensor([2.0], dtype=f64), 3 * r, torch.tensor([3.0], dtype=f64),
                                    ORPOConfig().lambda_)
    odds = lambda p: p / (1 - p)  # noqa: E731
    by_hand = math.log(odds(math.exp(-1)) / odds(math.exp(-2)))  # 1.4587...
    assert float(log_odds) == pytest.approx(by_hand, rel=1e-12)
    assert float(loss) == pytest.approx(1.0 + 0.1 * math.log1p(math.exp(-by_hand)), rel=1e-12)
    assert float(nll) == 1.0
    torch.testing.assert_close(loss, trl_loss(c, r, nll, 0.1)[0])


@SETTINGS
@given(pairs_of_tokens, lambdas)
def test_swapping_chosen_and_rejected_negates_the_log_odds_ratio(pairs, lam):
    c, nc, r, nr = as_inputs(pairs)
    loss, nll, ratio = orpo_loss(c, nc, r, nr, lam)
    loss_s, nll_s, ratio_s = orpo_loss(r, nr, c, nc, lam)
    assert torch.equal(ratio_s, -ratio)
    # -log sigmoid(-x) - (-log sigmoid(x)) = x: the odds-ratio terms differ by lambda * mean(x)
    torch.testing.assert_close((loss_s - nll_s) - (loss - nll), lam * ratio.mean(), rtol=1e-9, atol=1e-9)


@SETTINGS
@given(pairs_of_tokens)
def test_lambda_0_is_the_nll_alone_and_the_odds_term_never_lowers_the_loss(pairs):
    inputs = as_inputs(pairs)
    loss, nll, _ = orpo_loss(*inputs, 0.0)
    assert torch.equal(loss, nll)
    loss_1, nll_1, _ = orpo_loss(*inputs, 1.0)
    assert torch.equal(nll_1, nll) and float(loss_1) > float(nll)


@SETTINGS
@given(pairs_of_tokens, st.floats(0.01, 2.0))
def test_raising_the_chosen_or_lowering_the_rejected_log_prob_lowers_the_loss(pairs, lam):
    c, nc, r, nr = as_inputs(pairs)
    c.requires_grad_(True)
    r.requires_grad_(True)
    loss, _, _ = orpo_loss(c, nc, r, nr, lam)
    g_c, g_r = torch.autograd.grad(loss, (c, r))
    assert bool((g_c < 0).all()) and bool((g_r > 0).all())


def test_loss_passes_gradcheck_in_float64():
    torch.manual_seed(0)
    n_w, n_l = torch.tensor([3.0, 1.0, 5.0, 2.0], dtype=f64), torch.tensor([2.0, 4.0, 1.0, 6.0], dtype=f64)
    c = (-torch.rand(4, dtype=f64) * 3 - 0.01) * n_w  # mean log-probs on both sides of log(1/2), the branch point
    r = (-torch.rand(4, dtype=f64) * 3 - 0.01) * n_l
    c.requires_grad_(True)
    r.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: orpo_loss(a, n_w, b, n_l, 0.7)[0], (c, r))
    assert torch.autograd.gradcheck(lambda a, b: orpo_loss(a, n_w, b, n_l, 0.7)[2], (c, r))


@pytest.mark.parametrize("lam", [-0.1, math.inf, math.nan])
def test_config_rejects_bad_values_naming_the_flag(lam):
    with pytest.raises(ConfigError, match="orpo_lambda"):
        ORPOConfig(lambda_=lam)


def test_train_py_flag_errors_name_the_flag_and_a_compare_sweeps_lambda():
    import train
    with pytest.raises(ConfigError, match="--orpo-lambda must be"):
        train.load_config(["--orpo-lambda", "-1"])
    with pytest.raises(ConfigError, match="--orpo-lambda-sweep must be"):
        train.load_config(["--compare", "dpo,orpo", "--orpo-lambda-sweep", "0.1,-1"])
    cfg, _ = train.load_config(["--compare", "dpo,orpo", "--orpo-lambda-sweep", "0.5,2"])
    assert [c.lambda_ for c in cfg.configs.orpo] == [0.5, 2.0]
    cfg, _ = train.load_config(["--preset", "tiny", "--compare", "dpo,orpo"])  # the default sweep
    names = [d.name for _, _, d in method_runs(cfg.configs, Path("out"))]
    assert names[-2:] == ["orpo_lambda_0.1", "orpo_lambda_1"]


# ----------------------------------------------------------------------------- the step and a run



def naive_token_list(model: GPT, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log p of each completion token given everything before it, one sequence at a time, float64."""
    seq = torch.tensor([prompt + completion])
    logp = model(seq).double().log_softmax(-1)[0, :-1].gather(-1, seq[0, 1:, None]).squeeze(-1)  # (n-1,)
    return logp[len(prompt) - 1:]


def naive_orpo(model: GPT, pairs: list[Pair], lam: float) -> torch.Tensor:
    """The paper's loss, each sequence forwarded on its own: log odds from the mean token log-prob."""
    chosen = [naive_token_list(model, p.prompt_ids, p.chosen_ids) for p in pairs]
    rejected = [naive_token_list(model, p.prompt_ids, p.rejected_ids) for p in pairs]
    nll = -torch.cat(chosen).mean()
    log_odds = lambda t: t.mean() - torch.log(1 - t.mean().exp())  # noqa: E731
    terms = [-F.logsigmoid(log_odds(w) - log_odds(r)) for w, r in zip(chosen, rejected)]
    return nll + lam * torch.stack(terms).mean()


def grads(model: GPT, loss: torch.Tensor) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).double()


@pytest.mark.parametrize("mode", ["unique", "pairs"])
@pytest.mark.parametrize("logprobs", ["naive", "fused"])
def test_step_equals_the_naive_loss_and_gradient(mode, logprobs):
    model, pairs = tiny_policy(), some_pairs()
    collate = collate_unique if mode == "unique" else collate_pairs
    batch = (None, collate(pairs, 16, pad_id=V - 1), 0, len(pairs))
    loss, metrics, _, n_pairs = orpo_step(model, batch, ORPOConfig(lambda_=0.5),
                                          BatchConfig(mode=mode, logprobs=logprobs, pad_id=V - 1))
    naive = naive_orpo(model, pairs, 0.5)
    assert n_pairs == len(pairs)
    torch.testing.assert_close(loss.double(), naive, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads(model, loss), grads(model, naive), rtol=1e-4, atol=1e-6)
    assert 0.0 <= float(metrics["accuracy"]) <= 1.0


def test_step_at_lambda_0_is_preferred_ft():
    model, pairs = tiny_policy(), some_pairs()
    batch = (None, collate_unique(pairs, 16, pad_id=V - 1), 0, len(pairs))
    bcfg = BatchConfig(pad_id=V - 1)
    orpo, _, _, _ = orpo_step(model, batch, ORPOConfig(lambda_=0.0), bcfg)
    ft, _, _, _ = preferred_ft_step(model, batch, bcfg)
    torch.testing.assert_close(orpo, ft, rtol=1e-6, atol=1e-6)


def run(tmp, steps: int, crash_at: int | None = None) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=V, n_layer=1, n_head=2, n_embd=16))
    bcfg = BatchConfig(mode="unique", prompts=2, max_length=16, pad_id=V - 1)
    loop = LoopConfig(steps=steps, lr=3e-2, log_every=1, checkpoint_every=1)

    def crash(step):
        if step == crash_at:
            raise KeyboardInterrupt
    apply_lora(model, LoRAConfig(rank=2, alpha=4.0))  # the caller's fresh adapter
    train_orpo(model, toy_data(), ORPOConfig(lambda_=1.0), bcfg, TrainRun(loop, tmp, crash if crash_at else None),
               Runtime())
    return model


def test_a_short_run_widens_the_odds_ratio_and_resumes_bit_identically(tmp_path):
    model = run(tmp_path / "a", 6)
    lines = [json.loads(s) for s in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 7))
    assert lines[-1]["log_odds_ratio"] > lines[0]["log_odds_ratio"]
    assert lines[-1]["loss"] < lines[0]["loss"]
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", 6, crash_at=3)
    resumed = run(tmp_path / "b", 6)
    straight = lora_state_dict(model)
    for k, v in lora_state_dict(resumed).items():
        assert torch.equal(v, straight[k]), k


def test_train_orpo_refuses_a_model_without_a_fresh_adapter(tmp_path):
    model = GPT(GPTConfig(block_size=32, vocab_size=V, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(ValueError, match="train_orpo"):
        train_orpo(model, toy_data(), ORPOConfig(), BatchConfig(), TrainRun(LoopConfig(steps=1, lr=1e-3), tmp_path),
                   Runtime())
