"""The shared training loop: schedule, exact resume from a checkpoint, and stopping on a non-finite loss."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from minidpo.trainer import Checkpointer, LoopConfig, NonFiniteLoss, lr_lambda, train_loop


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 50), st.integers(1, 500), st.floats(0.0, 1.0))
def test_schedule_warms_up_linearly_then_decays_to_min_ratio(warmup, extra, min_ratio):
    total = warmup + extra
    values = [lr_lambda(s, warmup, total, min_ratio) for s in range(total + 1)]
    for s in range(warmup):
        assert values[s] == pytest.approx((s + 1) / warmup)
    assert values[warmup] == pytest.approx(1.0)
    assert values[total] == pytest.approx(min_ratio)
    after = values[warmup:]
    assert all(a >= b - 1e-12 for a, b in zip(after, after[1:]))  # never increases after warmup


def make_problem(seed: int = 0):
    """A tiny regression whose batches are a pure function of (step, micro) like the real loops'."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 1)
    params = dict(model.named_parameters())

    def get_batch(step, micro):
        g = torch.Generator().manual_seed(1000 * step + micro)
        x = torch.randn(8, 4, generator=g)
        return x, x.sum(-1, keepdim=True)

    def step_fn(batch):
        x, y = batch
        loss = ((model(x) - y) ** 2).mean()
        return loss, {"mse": loss.detach()}, x.size(0)
    return model, params, get_batch, step_fn


def test_resumed_loop_ends_bit_identical_to_an_uninterrupted_one(tmp_path):
    cfg = LoopConfig(steps=12, lr=0.05, warmup_steps=3, grad_accum=2, log_every=100, checkpoint_every=4)
    model, params, get_batch, step_fn = make_problem()
    train_loop(cfg, params, get_batch, step_fn, Checkpointer(tmp_path / "a", params))
    straight = {k: v.detach().clone() for k, v in params.items()}

    # a second run dies right after step 9 (its last checkpoint is step 8), then resumes from disk
    model, params, get_batch, step_fn = make_problem()
    partial = LoopConfig(**cfg.__dict__)
    crashed = []

    def crash_after_8(step):
        if step == 9:
            crashed.append(step)
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train_loop(partial, params, get_batch, step_fn, Checkpointer(tmp_path / "b", params), on_step_end=crash_after_8)
    assert crashed == [9]
    model, params, get_batch, step_fn = make_problem(seed=123)  # different init: everything must come from disk
    train_loop(cfg, params, get_batch, step_fn, Checkpointer(tmp_path / "b", params), resume=True)
    for k in straight:
        assert torch.equal(params[k].detach(), straight[k]), k


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    model, params, get_batch, step_fn = make_problem()
    cfg = LoopConfig(steps=10, lr=0.01, log_every=100, checkpoint_every=2)

    def exploding(batch):
        loss, m, n = step_fn(batch)
        return (loss * math.inf if exploding.calls >= 5 else loss), m, n
    exploding.calls = 0

    def count(_):
        exploding.calls += 1
    ckpt = Checkpointer(tmp_path, params)
    with pytest.raises(NonFiniteLoss, match=r"loss is (inf|nan) at step 5.*last good checkpoint"):
        train_loop(cfg, params, get_batch, exploding, ckpt, on_step_end=count)
    saved = torch.load(tmp_path / "state.pt", weights_only=True)
    assert saved["step"] == 4
    weights_at_failure = {k: v.detach().clone() for k, v in params.items()}
    # the weights were not touched by the bad step: a fresh model resumed from step 4 and run one good step
    # would differ, but the state on disk must be the step-4 state, finite
    from minidpo.safetensors import load_file
    on_disk = load_file(tmp_path / saved["trainable"])
    assert all(torch.isfinite(v).all() for v in on_disk.values())
    assert all(torch.isfinite(v).all() for v in weights_at_failure.values())
