"""Tests for minidpo/methods/dpo.py: the DPO-family losses' invariants, their one validation rule set, metrics, the
stacked chosen/rejected forward (naive and fused), and unique batching (one forward per distinct sequence) equal to
pairs."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from minidpo.config import ConfigError
from minidpo.methods.dpo import (
    LOSS_TYPES,
    DPOConfig,
    concatenated_forward,
    dpo_loss,
    dpo_step_loss,
    pair_logps,
    preference_metrics,
    reference_forward,
    sequence_forward,
)
from minidpo.methods.dpo_train import dpo_step
from minidpo.methods.logprobs import LOGPROBS
from minidpo.methods.offline_train import BatchConfig
from minidpo.model.gpt import GPT, GPTConfig
from minidpo.model.lora import apply_lora, lora_disabled, lora_layers

SETTINGS = settings(max_examples=40, deadline=None)
f64 = torch.float64
betas = st.floats(0.01, 2.0)
Ds = st.floats(-50.0, 50.0)
logps = st.floats(-500.0, 0.0)


def loss_at(D: float, beta: float, loss_type: str = "sigmoid", e: float = 0.0, dtype=f64) -> torch.Tensor:
    """Loss for one pair whose D is exactly D: policy chosen = D, everything else 0."""
    z = torch.zeros(1, dtype=dtype)
    return dpo_loss(torch.tensor([D], dtype=dtype), z, z, z, beta, loss_type, e)[0][0]


def loss_grads(pc, pr, rc, rr, beta, loss_type="sigmoid", e=0.0):
    pc, pr = (torch.tensor([v], dtype=f64, requires_grad=True) for v in (pc, pr))
    losses, _, _ = dpo_loss(pc, pr, torch.tensor([rc], dtype=f64), torch.tensor([rr], dtype=f64), beta, loss_type, e)
    return torch.autograd.grad(losses.sum(), (pc, pr))


@SETTINGS
@given(betas)
def test_sigmoid_loss_is_log_2_at_zero_margin(beta):
    assert loss_at(0.0, beta).item() == pytest.approx(math.log(2), abs=1e-12)


@SETTINGS
@given(betas, Ds, st.floats(1e-3, 10.0))
def test_sigmoid_loss_is_strictly_decreasing_in_D(beta, D, gap):
    assert loss_at(D, beta) > loss_at(D + gap, beta)


@SETTINGS
@given(betas, st.floats(-1e3, 1e3))
def test_sigmoid_loss_difference_between_D_and_minus_D_is_minus_beta_D(beta, D):
    diff = loss_at(D, beta) - loss_at(-D, beta)
    assert diff.item() == pytest.approx(-beta * D, abs=1e-9 * (1 + abs(beta * D)))


@SETTINGS
@given(betas, Ds, st.floats(0.0, 0.5))
def test_conservative_dpo_loss_at_D_minus_loss_at_minus_D_is_minus_one_minus_2e_beta_D(beta, D, e):
    diff = loss_at(D, beta, e=e) - loss_at(-D, beta, e=e)
    assert diff.item() == pytest.approx(-(1 - 2 * e) * beta * D, abs=1e-9 * (1 + abs(beta * D)))


@SETTINGS
@given(st.sampled_from(LOSS_TYPES), betas, logps, logps, logps, logps, st.floats(-100, 100), st.booleans())
def test_adding_a_constant_to_policy_and_reference_of_one_response_changes_nothing(
        loss_type, beta, pc, pr, rc, rr, c, shift_chosen):
    t = lambda v: torch.tensor([v], dtype=f64)  # noqa: E731
    base = dpo_loss(t(pc), t(pr), t(rc), t(rr), beta, loss_type)[0]
    if shift_chosen:
        shifted = dpo_loss(t(pc + c), t(pr), t(rc + c), t(rr), beta, loss_type)[0]
    else:
        shifted = dpo_loss(t(pc), t(pr + c), t(rc), t(rr + c), beta, loss_type)[0]
    torch.testing.assert_close(shifted, base, atol=1e-9, rtol=1e-9)


@SETTINGS
@given(betas, logps, logps, logps, logps)
def test_sigmoid_gradient_wrt_policy_chosen_is_minus_beta_sigmoid_minus_beta_D(beta, pc, pr, rc, rr):
    g_pc, g_pr = loss_grads(pc, pr, rc, rr, beta)
    D = (pc - rc) - (pr - rr)
    expected = -beta * torch.sigmoid(torch.tensor(-beta * D, dtype=f64))
    torch.testing.assert_close(g_pc[0], expected, atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(g_pr[0], -expected, atol=1e-12, rtol=1e-9)


@SETTINGS
@given(st.sampled_from([("sigmoid", 0.0), ("robust", 0.0), ("robust", 0.3), ("robust", 0.49), ("hinge", 0.0)]),
       betas, logps, logps, logps, logps)
def test_loss_never_rewards_lowering_chosen_or_raising_rejected(kind, beta, pc, pr, rc, rr):
    loss_type, e = kind
    g_pc, g_pr = loss_grads(pc, pr, rc, rr, beta, loss_type, e)
    assert g_pc.item() <= 0 and g_pr.item() >= 0


@SETTINGS
@given(betas, st.floats(0.01, 0.49))
def test_conservative_dpo_stops_pushing_at_beta_D_equal_log_of_one_minus_e_over_e(beta, e):
    """With e > 0 the sigmoid loss is no longer monotone: it has its minimum at a finite margin."""
    target = math.log((1 - e) / e) / beta
    pc = torch.tensor([target], dtype=f64, requires_grad=True)
    z = torch.zeros(1, dtype=f64)
    (g,) = torch.autograd.grad(dpo_loss(pc, z, z, z, beta, "sigmoid", e)[0].sum(), pc)
    assert g.item() == pytest.approx(0.0, abs=1e-12)
    assert loss_at(target + 1, beta, e=e) > loss_at(target, beta, e=e) < loss_at(target - 1, beta, e=e)


@pytest.mark.parametrize("dtype", [torch.float32, f64])
@pytest.mark.parametrize("loss_type,e", [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.2), ("ipo", 0.0),
                                         ("hinge", 0.0)])
def test_values_and_gradients_are_finite_for_margins_up_to_1e6(loss_type, e, dtype):
    D = torch.tensor([-1e6, -1e3, -1.0, 0.0, 1.0, 1e3, 1e6], dtype=dtype)
    pc = D.clone().requires_grad_()
    pr = torch.zeros_like(D, requires_grad=True)
    z = torch.zeros_like(D)
    losses, cr, rr = dpo_loss(pc, pr, z, z, 0.1, loss_type, e)
    g_pc, g_pr = torch.autograd.grad(losses.sum(), (pc, pr))
    for t in (losses, cr, rr, g_pc, g_pr):
        assert torch.isfinite(t).all()


@SETTINGS
@given(betas, st.floats(-20, 20))
def test_ipo_loss_is_smallest_at_D_equal_one_over_two_beta(beta, D):
    best = 1 / (2 * beta)
    assert loss_at(best, beta, "ipo").item() == pytest.approx(0.0, abs=1e-12)
    assert loss_at(D, beta, "ipo") >= loss_at(best, beta, "ipo")


@SETTINGS
@given(betas, st.floats(0.0, 1e4))
def test_hinge_loss_is_zero_once_beta_D_reaches_one(beta, extra):
    D = (1 + extra) / beta
    assert loss_at(D, beta, "hinge").item() == pytest.approx(0.0, abs=1e-12)
    assert loss_at(0.5 / beta, beta, "hinge").item() == pytest.approx(0.5)


@SETTINGS
@given(betas, Ds)
def test_robust_with_zero_smoothing_equals_sigmoid(beta, D):
    assert loss_at(D, beta, "robust").item() == loss_at(D, beta, "sigmoid").item()


@SETTINGS
@given(st.sampled_from(LOSS_TYPES), betas, st.lists(st.tuples(logps, logps, logps, logps), min_size=1, max_size=6))
def test_batch_losses_equal_rows_computed_one_by_one(loss_type, beta, rows):
    cols = [torch.tensor(c, dtype=f64) for c in zip(*rows)]
    batch = dpo_loss(*cols, beta, loss_type)
    for i in range(len(rows)):
        single = dpo_loss(*(c[i:i + 1] for c in cols), beta, loss_type)
        for b, s in zip(batch, single):
            torch.testing.assert_close(b[i:i + 1], s, atol=0, rtol=1e-15)


def test_rewards_are_detached_beta_times_policy_minus_reference():
    pc, pr = torch.tensor([-3.0, -5.0], requires_grad=True), torch.tensor([-4.0, -1.0], requires_grad=True)
    rc, rr = torch.tensor([-3.5, -4.0]), torch.tensor([-4.5, -2.0])
    _, cr, rj = dpo_loss(pc, pr, rc, rr, beta=0.2)
    assert not cr.requires_grad and not rj.requires_grad
    torch.testing.assert_close(cr, 0.2 * (pc - rc).detach())
    torch.testing.assert_close(rj, 0.2 * (pr - rr).detach())


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_reference_free_equals_a_zero_reference(loss_type):
    pc, pr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -1.0])
    z = torch.zeros(2)
    for a, b in zip(dpo_loss(pc, pr, None, None, 0.3, loss_type), dpo_loss(pc, pr, z, z, 0.3, loss_type)):
        torch.testing.assert_close(a, b)


def test_sigmoid_with_smoothing_is_the_conservative_dpo_formula():
    D, beta, e = torch.tensor([-2.0, 0.5, 7.0]), 0.3, 0.15
    z = torch.zeros(3)
    expected = -(1 - e) * F.logsigmoid(beta * D) - e * F.logsigmoid(-beta * D)
    torch.testing.assert_close(dpo_loss(D, z, z, z, beta, "sigmoid", e)[0], expected)
    robust = (-(1 - e) * F.logsigmoid(beta * D) + e * F.logsigmoid(-beta * D)) / (1 - 2 * e)
    torch.testing.assert_close(dpo_loss(D, z, z, z, beta, "robust", e)[0], robust)


@pytest.mark.parametrize("kwargs,match", [
    (dict(beta=0.0), "beta"), (dict(beta=-1.0), "beta"), (dict(beta=float("nan")), "beta"),
    (dict(beta=float("inf")), "beta"), (dict(loss_type="kto"), "sigmoid"),
    (dict(label_smoothing=-0.1), "label_smoothing"), (dict(label_smoothing=1.5), "label_smoothing"),
    (dict(label_smoothing=0.6), r"\[0, 0.5\]"), (dict(label_smoothing=float("nan")), "label_smoothing"),
    (dict(loss_type="robust", label_smoothing=0.5), r"\[0, 0.5\)"),
    (dict(loss_type="ipo", label_smoothing=0.1), "only used by"),
])
def test_bad_arguments_raise_value_error_saying_what_is_allowed(kwargs, match):
    with pytest.raises(ValueError, match=match):  # checked once, where the config is built, not in dpo_loss
        DPOConfig(**kwargs)


def test_preference_metrics_have_trl_names_and_are_detached_zero_dim_means():
    cr, rr = torch.tensor([0.5, -0.2, 0.1]), torch.tensor([0.1, 0.3, 0.1])
    pc, pr = torch.tensor([-10.0, -20.0, -30.0], requires_grad=True), torch.tensor([-11.0, -12.0, -13.0])
    m = preference_metrics(cr, rr, pc, pr)
    assert set(m) == {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                      "logps/chosen", "logps/rejected"}
    assert all(v.dim() == 0 and not v.requires_grad for v in m.values())
    assert m["rewards/accuracies"].item() == pytest.approx(1 / 3)  # ties do not count as correct
    assert m["rewards/margins"].item() == pytest.approx((0.4 - 0.5 + 0.0) / 3)
    assert m["logps/chosen"].item() == pytest.approx(-20.0)
    assert m["rewards/rejected"].item() == pytest.approx(0.5 / 3)


def test_ipo_logs_rewards_from_summed_logps_like_trl():
    pol = {"chosen_logps": torch.tensor([-10.0, -20.0]), "rejected_logps": torch.tensor([-12.0, -18.0]),
           "chosen_logps_mean": torch.tensor([-1.0, -2.0]), "rejected_logps_mean": torch.tensor([-3.0, -1.5])}
    ref = {"chosen_logps": torch.tensor([-11.0, -19.0]), "rejected_logps": torch.tensor([-12.0, -17.0]),
           "chosen_logps_mean": torch.tensor([-1.1, -1.9]), "rejected_logps_mean": torch.tensor([-3.0, -1.4])}
    _, m = dpo_step_loss(pol, ref, DPOConfig(beta=0.5, loss_type="ipo"))
    assert m["rewards/chosen"].item() == pytest.approx(0.5 * (1.0 - 1.0) / 2)
    assert m["rewards/rejected"].item() == pytest.approx(0.5 * (0.0 - 1.0) / 2)
    assert m["rewards/margins"].item() == pytest.approx(0.25)
    assert m["logps/rejected"].item() == pytest.approx(-15.0)
    assert m["logratio/ref_minus_policy"].item() == pytest.approx(((-1 + 1) + (0 + 1)) / 4)


@SETTINGS
@given(st.sampled_from(LOSS_TYPES), st.floats(-1.0, 2.0), st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.7, 1.0, -0.1]))
def test_dpo_config_accepts_exactly_the_settings_the_losses_are_defined_for(loss_type, beta, e):
    try:
        DPOConfig(beta=beta, loss_type=loss_type, label_smoothing=e)
        accepted = True
    except ValueError:
        accepted = False
    expected = beta > 0 and (e == 0 or (loss_type == "sigmoid" and 0 <= e <= 0.5)
                             or (loss_type == "robust" and 0 <= e < 0.5))
    assert accepted == expected


@pytest.mark.parametrize("kwargs,field", [(dict(beta=0.0), "beta"), (dict(beta=float("inf")), "beta"),
                                          (dict(loss_type="kto"), "loss_type"),
                                          (dict(loss_type="hinge", label_smoothing=0.1), "label_smoothing")])
def test_dpo_config_names_the_bad_field(kwargs, field):
    with pytest.raises(ConfigError) as err:
        DPOConfig(**kwargs)
    assert err.value.field == field


# ---------------------------------------------------------------- concatenated_forward on a tiny GPT

V = 61


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=32, vocab_size=V, n_layer=2, n_head=2, n_embd=32)).eval()


def right_padded(lengths: list[tuple[int, int]], T: int, seed: int) -> tuple[torch.Tensor, ...]:
    """ids, attention_mask, response_mask (B, T) for rows of (prompt_len, response_len), padded with junk ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (len(lengths), T), generator=g)  # pads get random ids: they must not matter
    attn = torch.zeros(len(lengths), T, dtype=torch.long)
    resp = torch.zeros_like(attn)
    for b, (p, r) in enumerate(lengths):
        attn[b, :p + r] = 1
        resp[b, p:p + r] = 1
    return ids, attn, resp


def make_batch(seed=0):
    c = right_padded([(3, 5), (6, 2), (2, 9)], T=11, seed=seed)
    r = right_padded([(3, 2), (6, 7), (2, 4)], T=14, seed=seed + 1)  # a different T from chosen
    return {"chosen_ids": c[0], "chosen_attention_mask": c[1], "chosen_response_mask": c[2],
            "rejected_ids": r[0], "rejected_attention_mask": r[1], "rejected_response_mask": r[2]}


def naive_sequence_logps(model, ids, attn, resp):
    """Each row alone, unpadded, full log_softmax, summed over its response tokens by a Python loop."""
    sums, means = [], []
    for b in range(ids.size(0)):
        n = int(attn[b].sum())
        logp = model(ids[b:b + 1, :n]).log_softmax(-1)[0]  # (n, V)
        terms = [logp[t - 1, ids[b, t]] for t in range(1, n) if resp[b, t]]
        sums.append(torch.stack(terms).sum())
        means.append(sums[-1] / len(terms))
    return torch.stack(sums), torch.stack(means)



@pytest.mark.parametrize("logprobs", LOGPROBS)
def test_concatenated_forward_equals_chosen_and_rejected_run_separately(model, logprobs):
    batch = make_batch()
    out = concatenated_forward(model, batch, logprobs)
    for side in ("chosen", "rejected"):
        ids, attn, resp = (batch[f"{side}_{k}"] for k in ("ids", "attention_mask", "response_mask"))
        s, m = naive_sequence_logps(model, ids, attn, resp)
        torch.testing.assert_close(out[f"{side}_logps"], s, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(out[f"{side}_logps_mean"], m, atol=1e-5, rtol=1e-5)
        assert out[f"{side}_num_tokens"].tolist() == resp.sum(-1).tolist()


@pytest.mark.parametrize("logprobs", LOGPROBS)
def test_concatenated_forward_gradients_equal_the_naive_ones(model, logprobs):
    batch = make_batch(seed=5)
    out = concatenated_forward(model, batch, logprobs)
    params = [p for p in model.parameters()]
    g_fused = torch.autograd.grad((out["chosen_logps"] - 2 * out["rejected_logps"]).sum(), params)
    c = naive_sequence_logps(model, *(batch[f"chosen_{k}"] for k in ("ids", "attention_mask", "response_mask")))
    r = naive_sequence_logps(model, *(batch[f"rejected_{k}"] for k in ("ids", "attention_mask", "response_mask")))
    g_naive = torch.autograd.grad((c[0] - 2 * r[0]).sum(), params)
    for a, b in zip(g_fused, g_naive):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("logprobs", LOGPROBS)
def test_concatenated_forward_ignores_pad_and_prompt_token_scores(model, logprobs):
    batch = make_batch(seed=1)
    out = concatenated_forward(model, batch, logprobs)
    junk = dict(batch)
    pads = batch["chosen_attention_mask"] == 0
    junk["chosen_ids"] = batch["chosen_ids"].masked_fill(pads, 7)  # other pad ids: same result
    torch.testing.assert_close(concatenated_forward(model, junk, logprobs)["chosen_logps"], out["chosen_logps"])
    no_resp = dict(batch, chosen_response_mask=torch.zeros_like(batch["chosen_response_mask"]))
    assert concatenated_forward(model, no_resp, logprobs)["chosen_logps"].abs().max() == 0


def test_concatenated_forward_rejects_missing_keys_and_unknown_logprobs(model):
    batch = make_batch()
    with pytest.raises(KeyError, match="rejected_response_mask"):
        concatenated_forward(model, {k: v for k, v in batch.items() if k != "rejected_response_mask"})
    with pytest.raises(ValueError, match="naive"):
        concatenated_forward(model, batch, "fast")


def test_dpo_step_loss_uses_length_averaged_logps_for_ipo_and_sums_otherwise(model):
    batch = make_batch(seed=2)
    pol = concatenated_forward(model, batch)
    ref = {k: v.detach() - 0.5 for k, v in pol.items()}
    for loss_type, suffix in (("ipo", "_mean"), ("sigmoid", "")):
        loss, metrics = dpo_step_loss(pol, ref, DPOConfig(beta=0.1, loss_type=loss_type))
        expected = dpo_loss(pol["chosen_logps" + suffix], pol["rejected_logps" + suffix],
                            ref["chosen_logps" + suffix], ref["rejected_logps" + suffix], 0.1, loss_type)[0].mean()
        torch.testing.assert_close(loss, expected)
        # logged as TRL logs them: sums, also for IPO
        torch.testing.assert_close(metrics["logps/chosen"], pol["chosen_logps"].mean().detach())


# ---------------------------------------------------------------- unique batching: one forward per sequence

def lora_model(seed=0):
    torch.manual_seed(seed)
    m = GPT(GPTConfig(block_size=32, vocab_size=V, n_layer=2, n_head=2, n_embd=32))
    apply_lora(m, rank=4, alpha=8.0)
    assert lora_layers(m)
    with torch.no_grad():  # a trained-looking adapter (B != 0), so the policy differs from the reference
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    return m


def unique_batch(seed=0):
    """Two prompts with 4 and 3 completions, every pair within a prompt (6 + 3 pairs), right-padded by hand."""
    g = torch.Generator().manual_seed(seed)
    groups = [(3, [4, 2, 6, 1]), (5, [3, 7, 2])]  # (prompt length, completion lengths incl. a final eot)
    rows, chosen, rejected = [], [], []
    for p, lens in groups:
        prompt = torch.randint(0, V, (p,), generator=g)
        first = len(rows)
        rows += [(prompt, torch.randint(0, V, (n,), generator=g)) for n in lens]
        for i in range(len(lens)):
            for j in range(i + 1, len(lens)):  # which one is chosen does not matter here; vary it
                a, b = (i, j) if (i + j) % 2 else (j, i)
                chosen.append(first + a)
                rejected.append(first + b)
    T = max(len(p) + len(c) for p, c in rows)
    ids = torch.randint(0, V, (len(rows), T), generator=g)  # junk after the end: it must not matter
    attn = torch.zeros(len(rows), T, dtype=torch.long)
    resp = torch.zeros_like(attn)
    for n, (p, c) in enumerate(rows):
        ids[n, :len(p) + len(c)] = torch.cat([p, c])
        attn[n, :len(p) + len(c)] = 1
        resp[n, len(p):len(p) + len(c)] = 1
    return {"ids": ids, "attention_mask": attn, "response_mask": resp,
            "chosen_index": torch.tensor(chosen), "rejected_index": torch.tensor(rejected)}


def as_pairs(u):
    """The same pairs in concatenated_forward's layout: every pair's two sequences forwarded separately."""
    return {f"{side}_{k}": u[k][u[f"{side}_index"]] for side in ("chosen", "rejected")
            for k in ("ids", "attention_mask", "response_mask")}


@pytest.mark.parametrize("logprobs", LOGPROBS)
@pytest.mark.parametrize("loss_type,e", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)])
def test_unique_batching_loss_and_gradient_equal_the_pairwise_computation(logprobs, loss_type, e):
    model, u = lora_model(), unique_batch()
    cfg = DPOConfig(beta=0.3, loss_type=loss_type, label_smoothing=e)
    params = [p for p in model.parameters() if p.requires_grad]

    # the training step itself under both batchings: each distinct sequence once, or each pair's two
    uloss, umetrics, _, _ = dpo_step(model, ([0], u, 0, 7), cfg, BatchConfig(mode="unique", logprobs=logprobs))
    ugrad = torch.autograd.grad(uloss, params)
    pairs = as_pairs(u)
    ploss, pmetrics, _, _ = dpo_step(model, ([0], pairs, 0, 7), cfg, BatchConfig(mode="pairs", logprobs=logprobs))
    pgrad = torch.autograd.grad(ploss, params)

    torch.testing.assert_close(uloss, ploss, atol=1e-5, rtol=1e-5)
    for a, b in zip(ugrad, pgrad):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert set(umetrics) == set(pmetrics)
    for k in umetrics:
        torch.testing.assert_close(umetrics[k], pmetrics[k], atol=1e-5, rtol=1e-5)
    assert any(g.abs().max() > 1e-4 for g in ugrad)  # a real gradient, not two zeros


def test_sequence_forward_naive_and_fused_agree_and_count_response_tokens():
    model, u = lora_model(1), unique_batch(1)
    naive, fused = sequence_forward(model, u, "naive"), sequence_forward(model, u, "fused")
    for k in ("logps", "logps_mean"):
        torch.testing.assert_close(fused[k], naive[k], atol=1e-4, rtol=1e-5)
    assert naive["num_tokens"].tolist() == [4, 2, 6, 1, 3, 7, 2]


def test_reference_forward_is_the_adapter_disabled_model_without_grad():
    model, u = lora_model(2), unique_batch(2)
    ref = reference_forward(model, u, "fused")
    with lora_disabled(model):
        base = sequence_forward(model, u, "fused")
    torch.testing.assert_close(ref["logps"], base["logps"].detach())
    assert not ref["logps"].requires_grad
    assert (ref["logps"] - sequence_forward(model, u, "fused")["logps"]).abs().max() > 1e-3  # adapter matters
    plain = GPT(GPTConfig(block_size=32, vocab_size=V, n_layer=1, n_head=2, n_embd=32))  # no LoRA: itself
    torch.testing.assert_close(reference_forward(plain, as_pairs(u))["chosen_logps"],
                               concatenated_forward(plain, as_pairs(u))["chosen_logps"].detach())


def unique_loss(policy: dict, reference: dict | None, batch: dict, cfg: DPOConfig):
    """dpo_step_loss over every pair of a unique batch, from per-sequence log-probs."""
    return dpo_step_loss(pair_logps(policy, batch), None if reference is None else pair_logps(reference, batch), cfg)


def test_the_unique_loss_takes_cached_reference_logps_and_reference_free():
    model, u = lora_model(3), unique_batch(3)
    pol = sequence_forward(model, u)
    live = reference_forward(model, u)
    cached = {k: live[k].clone() for k in ("logps", "logps_mean")}  # what a reference cache stores
    cfg = DPOConfig()
    torch.testing.assert_close(unique_loss(pol, cached, u, cfg)[0], unique_loss(pol, live, u, cfg)[0])
    free, metrics = unique_loss(pol, None, u, cfg)
    pc, pr = pair_logps(pol, u)["chosen_logps"], pair_logps(pol, u)["rejected_logps"]
    torch.testing.assert_close(free, dpo_loss(pc, pr, None, None, 0.1)[0].mean())
    assert "logratio/ref_minus_policy" not in metrics


def test_logratio_metric_is_ref_minus_policy_averaged_over_chosen_and_rejected():
    model, u = lora_model(4), unique_batch(4)
    pol, ref = sequence_forward(model, u), reference_forward(model, u)
    _, m = unique_loss(pol, ref, u, DPOConfig())
    expected = (ref["logps"] - pol["logps"].detach())
    expected = (expected[u["chosen_index"]].mean() + expected[u["rejected_index"]].mean()) / 2
    torch.testing.assert_close(m["logratio/ref_minus_policy"], expected)
    assert "kl" not in m
