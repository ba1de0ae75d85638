"""The shared training loop: schedule, exact resume from a checkpoint, and stopping on a non-finite loss."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minidpo.training.trainer import LoopConfig, NonFiniteLoss, TrainRun, lr_lambda, train_loop


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
    train_loop(TrainRun(cfg, tmp_path / "a"), params, get_batch, step_fn)
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
        train_loop(TrainRun(partial, tmp_path / "b", on_step_end=crash_after_8), params, get_batch, step_fn)
    assert crashed == [9]
    model, params, get_batch, step_fn = make_problem(seed=123)  # different init: everything must come from disk
    train_loop(TrainRun(cfg, tmp_path / "b"), params, get_batch, step_fn)
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
    with pytest.raises(NonFiniteLoss, match=r"loss is (inf|nan) at step 6/10.*last good checkpoint \(step 4\)"):
        train_loop(TrainRun(cfg, tmp_path, on_step_end=count), params, get_batch, exploding)
    saved = torch.load(tmp_path / "checkpoint" / "state.pt", weights_only=True)
    assert saved["step"] == 4
    weights_at_failure = {k: v.detach().clone() for k, v in params.items()}
    # the weights were not touched by the bad step: a fresh model resumed from step 4 and run one good step
    # would differ, but the state on disk must be the step-4 state, finite
    from minidpo.formats.safetensors import load_file
    on_disk = load_file(tmp_path / "checkpoint" / saved["trainable"])
    assert all(torch.isfinite(v).all() for v in on_disk.values())
    assert all(torch.isfinite(v).all() for v in weights_at_failure.values())


def test_non_finite_loss_before_any_checkpoint_promises_none(tmp_path):
    model, params, get_batch, step_fn = make_problem()

    def nan_at_3(batch):
        loss, m, n = step_fn(batch)
        nan_at_3.calls += 1
        return (loss * math.nan if nan_at_3.calls == 3 else loss), m, n
    nan_at_3.calls = 0
    cfg = LoopConfig(steps=10, lr=0.01, log_every=100, checkpoint_every=0)
    with pytest.raises(NonFiniteLoss, match=r"at step 3/10; .*no checkpoint was written yet"):
        train_loop(TrainRun(cfg, tmp_path), params, get_batch, nan_at_3, log=lambda m: None)


@pytest.mark.parametrize("field,value", [
    ("steps", 0), ("lr", 0.0), ("lr", math.inf), ("lr", math.nan), ("warmup_steps", -1), ("grad_accum", 0),
    ("grad_clip", math.nan), ("grad_clip", -1.0), ("grad_clip", math.inf), ("log_every", 0),
    ("checkpoint_every", -1), ("weight_decay", -0.1), ("weight_decay", math.nan), ("min_lr_ratio", 1.5),
    ("min_lr_ratio", -0.1),
])
def test_loop_config_rejects_each_bad_value_naming_its_field(field, value):
    from minidpo.config import ConfigError
    with pytest.raises(ConfigError) as e:
        LoopConfig(**{"steps": 10, "lr": 0.01, field: value})
    assert e.value.field == field


class FakeClock:
    """Stands in for `time` inside minidpo.training.trainer: each step_fn call advances it by the step's set
    duration."""

    def __init__(self):
        self.t = 0.0

    def perf_counter(self) -> float:
        return self.t


def timed_problem(clock: FakeClock, seconds_of_step):
    """make_problem whose steps 'take' seconds_of_step(step) and report 8 tokens and 2 pairs per micro-batch."""
    model, params, _, step_fn = make_problem()

    def get_batch(step, micro):
        g = torch.Generator().manual_seed(1000 * step + micro)
        x = torch.randn(8, 4, generator=g)
        return step, x, x.sum(-1, keepdim=True)

    def timed_step(batch):
        step, x, y = batch
        clock.t += seconds_of_step(step)
        loss, metrics, n = step_fn((x, y))
        return loss, metrics, n, 2
    return params, get_batch, timed_step


def test_summary_throughput_covers_the_whole_run_also_across_a_resume(tmp_path, monkeypatch):
    import minidpo.training.trainer as trainer
    clock = FakeClock()
    monkeypatch.setattr(trainer, "time", clock)
    slow_then_fast = lambda step: 1.0 if step < 4 else 0.1  # noqa: E731
    cfg = LoopConfig(steps=8, lr=0.01, log_every=4, checkpoint_every=4)
    params, get_batch, step_fn = timed_problem(clock, slow_then_fast)
    lines = []
    straight = train_loop(TrainRun(cfg, tmp_path / "a"), params, get_batch, step_fn, log=lines.append)
    window = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()][-1]
    assert window["tokens_per_s"] == pytest.approx(32 / 0.4) and window["pairs_per_s"] == pytest.approx(8 / 0.4)
    assert straight["tokens_per_s"] == pytest.approx(64 / 4.4) and straight["pairs_per_s"] == pytest.approx(16 / 4.4)
    assert straight["ms_per_step"] == pytest.approx(550) and straight["steps"] == 8
    assert straight["steps_this_session"] == 8 and straight["final_loss"] == window["loss"]
    assert "pairs/s" in lines[-1] and "tok/s" in lines[-1]

    params, get_batch, step_fn = timed_problem(clock, slow_then_fast)
    with pytest.raises(KeyboardInterrupt):
        train_loop(TrainRun(cfg, tmp_path / "b", on_step_end=lambda s: (_ for _ in ()).throw(KeyboardInterrupt)
                            if s == 6 else None), params, get_batch, step_fn, log=lines.append)
    params, get_batch, step_fn = timed_problem(clock, slow_then_fast)
    resumed = train_loop(TrainRun(cfg, tmp_path / "b"), params, get_batch, step_fn, log=lines.append)
    assert resumed["steps_this_session"] == 4 and resumed["steps"] == 8
    for key in ("tokens_per_s", "pairs_per_s", "ms_per_step", "final_loss"):
        assert resumed[key] == pytest.approx(straight[key]), key


def test_eta_follows_recent_step_times_and_skips_the_warm_up_step():
    from minidpo.training.trainer import StepClock
    clock = StepClock()
    clock.update(30.0)  # first step: compilation, allocator warm-up
    assert clock.eta(10) == pytest.approx(300.0)  # nothing better known yet
    for _ in range(5):
        clock.update(1.0)
    assert clock.eta(10) == pytest.approx(10.0)  # the warm-up step no longer counts
    for _ in range(60):
        clock.update(2.0)  # the machine got busier: the estimate follows
    assert clock.eta(10) == pytest.approx(20.0, rel=0.01)


def test_log_lines_go_to_the_given_log_with_the_configured_metrics_and_nothing_is_printed(tmp_path, capsys):
    model, params, get_batch, step_fn = make_problem()

    def rloo_like(batch):
        loss, m, n = step_fn(batch)
        return loss, {"reward": torch.tensor(0.5), "kl/sampled": torch.tensor(math.nan)}, n, 4
    cfg = LoopConfig(steps=4, lr=0.01, log_every=2, label="rloo", show=(("reward", "reward", "{:.3f}"),),
                     item_name="sequences")
    lines = []
    summary = train_loop(TrainRun(cfg, tmp_path), params, get_batch, rloo_like, log=lines.append)
    assert len(lines) == 2 and lines[-1].startswith("[rloo] step     4/4 | loss ")
    assert "| reward 0.500 |" in lines[-1] and "sequences/s" in lines[-1] and " ms | eta " in lines[-1]
    assert summary["sequences_per_s"] > 0 and "pairs_per_s" not in summary
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4] and records[-1]["kl/sampled"] is None  # strict JSON: NaN -> null
    train_loop(TrainRun(LoopConfig(**{**cfg.__dict__, "steps": 6}), tmp_path), params, get_batch, rloo_like,
               log=lines.append)
    assert lines[2] == f"[rloo] resumed from {tmp_path / 'checkpoint'} at step 4/6"
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 3  # appended to
    assert capsys.readouterr().out == ""


def test_caller_state_is_saved_with_the_checkpoint_and_restored_on_resume(tmp_path):
    """An adaptive coefficient that changes every step must continue from its checkpointed value, not restart."""
    def run(directory, crash_at=None):
        model, params, get_batch, step_fn = make_problem()
        coef = {"value": 1.0}

        def scaled(batch):
            loss, m, n = step_fn(batch)
            coef["value"] *= 0.9  # the step updates the caller's state
            return loss * coef["value"], m, n

        def crash(step):
            if step == crash_at:
                raise KeyboardInterrupt
        cfg = LoopConfig(steps=8, lr=0.05, log_every=100, checkpoint_every=3)
        state = SimpleNamespace(state=lambda: dict(coef), load=coef.update)  # a LoopState
        train_loop(TrainRun(cfg, directory, on_step_end=crash), params, get_batch, scaled, state=state,
                   log=lambda m: None)
        return params, coef["value"]
    straight, coef = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", crash_at=5)  # last checkpoint: step 3
    resumed, coef_resumed = run(tmp_path / "b")
    assert coef_resumed == coef == pytest.approx(0.9 ** 8)
    assert all(torch.equal(resumed[k].detach(), straight[k].detach()) for k in straight)


def test_each_logged_lr_is_the_rate_that_step_used(tmp_path):
    """log.jsonl's `lr` at step n is the learning rate step n ran at (the schedule at index n - 1), not the next
    step's: with peak 5e-4 and 10 warmup steps, step 1 ran at 5e-5."""
    model, params, get_batch, step_fn = make_problem()
    cfg = LoopConfig(steps=12, lr=5e-4, warmup_steps=10, log_every=1)
    train_loop(TrainRun(cfg, tmp_path), params, get_batch, step_fn)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 1 and records[0]["lr"] == pytest.approx(5e-5)
    assert [r["lr"] for r in records] == pytest.approx([5e-4 * lr_lambda(r["step"] - 1, 10, 12, cfg.min_lr_ratio)
                                                        for r in records])
