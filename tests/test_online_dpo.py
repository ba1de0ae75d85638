"""Online DPO: pairs only within a prompt with the higher score chosen, the loss and gradient equal DPO's loss over
those pairs computed one by one, ties give no update, and a tiny run trains end to end and resumes exactly."""

import json
import math

import pytest
import torch
from conftest import VowelScorer, with_sampling
from hypothesis import given, settings
from hypothesis import strategies as st

from minidpo.config import ConfigError
from minidpo.dataset.prompts import Prompt
from minidpo.methods.dpo import DPOConfig, dpo_loss
from minidpo.methods.online_dpo import OnlineDPOConfig, online_dpo_loss, rollout_pairs, train_online_dpo
from minidpo.methods.rollout import Rollout, policy_logps
from minidpo.methods.scoring import completion_logps
from minidpo.model.generate import SamplingConfig
from minidpo.model.gpt import GPT, GPTConfig
from minidpo.model.lora import apply_lora, lora_state_dict
from minidpo.model.tokenizer import Tokenizer
from minidpo.training.runtime import Runtime
from minidpo.training.trainer import LoopConfig, TrainRun, train_loop

SETTINGS = settings(max_examples=25, deadline=None)
# few distinct values, so that ties (which must never form a pair) are common
scores_2d = st.integers(1, 4).flatmap(lambda P: st.integers(2, 6).flatmap(lambda K: st.lists(
    st.integers(0, 3), min_size=P * K, max_size=P * K).map(
    lambda v: torch.tensor(v, dtype=torch.float32).view(P, K))))


@SETTINGS
@given(scores_2d, st.sampled_from(["all", "best_vs_worst"]))
def test_pairs_stay_within_a_prompt_prefer_the_higher_score_and_never_pair_a_tie(scores, pairing):
    P, K = scores.shape
    chosen, rejected = rollout_pairs(scores, pairing)
    flat = scores.reshape(-1)
    assert chosen.shape == rejected.shape and chosen.dtype == torch.long
    assert torch.equal(chosen // K, rejected // K)  # the same prompt
    assert bool((flat[chosen] > flat[rejected]).all())
    for p in range(P):
        s = scores[p].tolist()
        mine = int((chosen // K == p).sum())
        distinct = sum(s[i] != s[j] for i in range(K) for j in range(i + 1, K))
        assert mine == (distinct if pairing == "all" else min(1, distinct))


def tiny_model(vocab: int = 64, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab, n_layer=1, n_head=2, n_embd=16, block_size=16)).double()
    apply_lora(model, rank=2, alpha=4.0, targets=("attn.c_attn",))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)  # a nonzero adapter: policy != reference, and gradients reach A and B
    return model


def hand_rollout(scores: list[float], k: int, eot: int) -> Rollout:
    """P = len(scores) // k prompts of different lengths, each with k completions of different lengths."""
    g = torch.Generator().manual_seed(1)
    rows, plens, masks = [], [], []
    for b in range(len(scores)):
        p = torch.randint(0, eot, (1 + (b // k) % 3,), generator=g).tolist()
        c = torch.randint(0, eot, (2 + b % 3,), generator=g).tolist()
        rows.append(p + c)
        plens.append(len(p))
        masks.append([False] * len(p) + [True] * len(c))
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), eot)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, (r, m) in enumerate(zip(rows, masks)):
        ids[b, :len(r)] = torch.tensor(r)
        mask[b, :len(m)] = torch.tensor(m)
    return Rollout(ids, mask, torch.tensor(scores), torch.zeros(len(rows)), torch.tensor(plens), 0, 0)


@pytest.mark.parametrize("loss_type, label_smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0),
                                                        ("hinge", 0.0)])
def test_loss_and_gradient_equal_dpo_loss_over_every_pair_one_by_one(loss_type, label_smoothing):
    eot, k = 63, 3
    model = tiny_model()
    cfg = OnlineDPOConfig(sampling=SamplingConfig(min_new_tokens=1, max_new_tokens=4, eot_id=eot, temperature=0.8), k=k)
    dpo = DPOConfig(beta=0.3, loss_type=loss_type, label_smoothing=label_smoothing)
    rollout = hand_rollout([0.9, 0.1, 0.5, 0.2, 0.2, 0.7], k, eot)
    with torch.no_grad():
        rollout.reference_logps = policy_logps(model, rollout, cfg) - 1.5 * torch.arange(6, dtype=torch.float64)
    params = [p for p in model.parameters() if p.requires_grad]
    loss, metrics, log_ratio = online_dpo_loss(model, rollout, dpo, cfg)
    grads = torch.autograd.grad(loss, params)

    def logp(b: int) -> torch.Tensor:  # one row at a time, nothing shared
        return completion_logps(model, rollout.ids[b:b + 1], rollout.response_mask[b:b + 1], cfg.logprobs,
                                cfg.sampling, rollout.prompt_lens[b:b + 1])[0]
    s = rollout.scores.tolist()
    pairs = [(p * k + i, p * k + j) for p in range(2) for i in range(k) for j in range(k)
             if s[p * k + i] > s[p * k + j]]
    assert len(pairs) == 5  # the tie (0.2, 0.2) of the second prompt forms no pair
    n = rollout.response_mask.sum(-1).double()
    per = (lambda b: n[b]) if loss_type == "ipo" else (lambda b: 1.0)  # IPO compares length-averaged log-probs
    ref = rollout.reference_logps
    losses = []
    for c, r in pairs:
        one, _, _ = dpo_loss((logp(c) / per(c)).view(1), (logp(r) / per(r)).view(1), (ref[c] / per(c)).view(1),
                             (ref[r] / per(r)).view(1), dpo.beta, loss_type, label_smoothing)
        losses.append(one[0])
    naive = torch.stack(losses).mean()
    naive_grads = torch.autograd.grad(naive, params)
    torch.testing.assert_close(loss, naive)
    for a, b in zip(grads, naive_grads):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(log_ratio, 1.5 * torch.arange(6, dtype=torch.float64), atol=1e-5, rtol=0)  # fp32
    assert metrics["reward"] == pytest.approx(sum(s) / 6) and metrics["kl/sampled"] == pytest.approx(3.75)


def test_a_rollout_whose_completions_all_score_alike_gives_no_update():
    eot, k = 63, 2
    model = tiny_model()
    cfg = OnlineDPOConfig(sampling=SamplingConfig(min_new_tokens=1, max_new_tokens=4, eot_id=eot), k=k)
    loss, metrics, _ = online_dpo_loss(model, hand_rollout([0.5] * 4, k, eot), DPOConfig(), cfg)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert all(float(p.grad.abs().sum()) == 0.0 for p in model.parameters() if p.requires_grad)
    # the same metric keys as a rollout with pairs: micro-batches and processes average them key by key
    _, usual, _ = online_dpo_loss(model, hand_rollout([0.5, 0.1, 0.2, 0.9], k, eot), DPOConfig(), cfg)
    assert metrics.keys() == usual.keys()
    # no pair, so no accuracy: NaN, which the trainer leaves out of its averages (not a 0 that drags them down)
    assert math.isnan(float(metrics["rewards/accuracies"])) and math.isnan(float(metrics["rewards/margins"]))
    assert float(metrics["reward"]) == 0.5  # the rollout's own metrics stay


def test_logged_pair_metrics_average_over_micro_batches_with_real_pairs_only(tmp_path):
    """grad_accum 2: a micro-batch with pairs (accuracy 1) and one without (NaN): the step logs 1, not 0.5."""
    w = torch.nn.Parameter(torch.zeros(2))
    nan = float("nan")

    def step_fn(batch):
        loss = (w ** 2).sum() + 1.0
        acc = torch.tensor(1.0 if batch == 0 else nan)
        return loss * (1.0 if batch == 0 else 0.0), {"rewards/accuracies": acc, "reward": torch.tensor(0.5)}, 1
    cfg = LoopConfig(steps=1, lr=0.1, grad_accum=2, warmup_steps=0, log_every=1)
    out = train_loop(TrainRun(cfg), {"w": w}, lambda step, micro: micro, step_fn, log=lambda m: None)
    assert out["rewards/accuracies"] == 1.0 and out["reward"] == 0.5


@pytest.mark.parametrize("field, bad", [("k", 1), ("prompts_per_step", 0), ("pairing", "random"),
                                        ("temperature", 0.0), ("temperature", math.nan), ("max_new_tokens", 2)])
def test_config_rejects_bad_values_naming_the_field(field, bad):
    with pytest.raises(ConfigError) as e:
        with_sampling(OnlineDPOConfig, **{"min_new_tokens": 3, field: bad})
    assert e.value.field == field


def run(tmp, steps, crash_at=None):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, n_layer=1, n_head=2, n_embd=16, block_size=32))
    apply_lora(model, rank=2, alpha=4.0, targets=("attn.c_attn",))
    tok = Tokenizer()
    prompts = [Prompt(tok.encode(t), t) for t in ["This movie was", "I", "The acting in this film", "What a"]]
    cfg = OnlineDPOConfig(sampling=SamplingConfig(min_new_tokens=2, max_new_tokens=5), k=3, prompts_per_step=2, seed=1)
    loop = LoopConfig(steps=steps, lr=1e-2, grad_accum=2, log_every=1, checkpoint_every=1, label="online-dpo")

    def crash(step):
        if step == crash_at:
            raise KeyboardInterrupt
    train_online_dpo(model, tok, VowelScorer(), prompts, DPOConfig(beta=0.1), cfg,
                     TrainRun(loop, tmp, crash if crash_at else None), Runtime())
    return model


def test_tiny_online_dpo_run_logs_dpo_metrics_and_resumes_bit_identically(tmp_path):
    model = run(tmp_path / "a", 3)
    lines = [json.loads(s) for s in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    for m in lines:
        assert 0 <= m["reward"] <= 1 and 0 <= m["rewards/accuracies"] <= 1 and math.isfinite(m["kl/sampled"])
        assert m["completions_per_s"] > 0 and 2 <= m["completion_tokens"] <= 5
    assert lines[0]["kl/sampled"] == pytest.approx(0.0, abs=1e-5)  # B = 0 at the start: policy == reference
    assert lines[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # and so every pair's margin is 0
    straight = lora_state_dict(model)
    assert any(bool(v.abs().sum() > 0) for k, v in straight.items() if k.endswith("lora_B"))  # it trained

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", 3, crash_at=2)  # dies after step 2; the last checkpoint is step 1
    resumed = run(tmp_path / "b", 3)
    for k, v in lora_state_dict(resumed).items():
        assert torch.equal(v, straight[k]), k


def test_bf16_autocast_loss_and_gradient_track_fp32():
    eot, k = 63, 3
    model = tiny_model().float()
    cfg = OnlineDPOConfig(sampling=SamplingConfig(min_new_tokens=1, max_new_tokens=4, eot_id=eot, temperature=0.7), k=k)
    rollout = hand_rollout([0.9, 0.1, 0.5, 0.3, 0.2, 0.7], k, eot)
    with torch.no_grad():
        rollout.reference_logps = policy_logps(model, rollout, cfg) - torch.arange(6.0)
    params = [p for p in model.parameters() if p.requires_grad]
    out = {}
    for name, amp in (("fp32", torch.autocast("cpu", enabled=False)),
                      ("bf16", torch.autocast("cpu", dtype=torch.bfloat16))):
        loss, _, _ = online_dpo_loss(model, rollout, DPOConfig(beta=0.5), cfg, amp)
        grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
        out[name] = (loss.detach(), grad)
    assert out["bf16"][0].dtype == torch.float32  # the loss is computed in fp32 from the bf16 forward
    torch.testing.assert_close(out["bf16"][0], out["fp32"][0], rtol=2e-2, atol=2e-2)
    cosine = torch.nn.functional.cosine_similarity(out["bf16"][1], out["fp32"][1], dim=0)
    assert cosine > 0.99, float(cosine)
