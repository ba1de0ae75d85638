"""
One training loop for every stage (SFT, DPO, RLOO, ...): AdamW, linear warmup then cosine decay, gradient
accumulation, gradient clipping, data-parallel gradient averaging, a log line every few steps, checkpoints and exact
resume.

References: llm.c's train_gpt2.py (every step logs loss, ms and tokens/s), nanoGPT's train.py (warmup + cosine,
accumulation), PyTorch's DistributedDataParallel for the gradient all-reduce (`minidpo.training.distributed`).

Exact resume. Batches are a pure function of (step, micro_step, rank), so the data position is just the step number.
A checkpoint (`minidpo.training.checkpoint`) holds the trainable tensors, the optimizer and scheduler state, every RNG
state, the step and the caller's own state (e.g. an adaptive KL coefficient), so a run killed at any moment and
resumed from its last checkpoint ends bit-identical to an uninterrupted run (on the same device and thread count).

Step times exclude the caller's `on_step_end` (evaluations) and checkpoint writes; the summary's throughput covers
the whole run (totals are carried in the checkpoint across resumes), the log line's its logging window.
"""

import json
import math
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable, Protocol

import torch
from torch import Tensor

from minidpo.config import require
from minidpo.model.lora import adapters_are_zero, lora_layers
from minidpo.progress import Log, quiet
from minidpo.training.checkpoint import Checkpointer
from minidpo.training.distributed import average_gradients, barrier, is_main, rank_and_world

# (metric key, short label, format) for the log line; DPO's by default
DPO_SHOW = (("rewards/accuracies", "acc", "{:.2f}"), ("rewards/margins", "margin", "{:+.3f}"),
            ("logratio/ref_minus_policy", "ref-pi", "{:+.3f}"))


@dataclass
class LoopConfig:
    steps: int
    lr: float
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_accum: int = 1
    grad_clip: float = 1.0  # 0: no clipping
    log_every: int = 10
    checkpoint_every: int = 0  # 0: only at the end
    label: str = "train"
    show: tuple[tuple[str, str, str], ...] = DPO_SHOW
    item_name: str = "pairs"  # what step_fn's optional 4th value counts: logged as f"{item_name}_per_s"

    def __post_init__(self):
        require(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        require(math.isfinite(self.lr) and self.lr > 0, "lr", f"must be a finite number > 0, got {self.lr}")
        require(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        require(math.isfinite(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1, "min_lr_ratio",
                f"must be in [0, 1], got {self.min_lr_ratio}")
        require(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight_decay",
                f"must be a finite number >= 0, got {self.weight_decay}")
        require(self.grad_accum >= 1, "grad_accum", f"must be >= 1, got {self.grad_accum}")
        require(math.isfinite(self.grad_clip) and self.grad_clip >= 0, "grad_clip",
                f"must be a finite number >= 0 (0: no clipping), got {self.grad_clip}")
        require(self.log_every >= 1, "log_every", f"must be >= 1, got {self.log_every}")
        require(self.checkpoint_every >= 0, "checkpoint_every",
                f"must be >= 0 (0: only at the end), got {self.checkpoint_every}")


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak lr: linear warmup over `warmup` steps, then cosine from 1 down to `min_ratio`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class Totals:
    """Counts over steps: whole-run totals (saved in the checkpoint) or one logging window."""
    seconds: float = 0.0
    tokens: float = 0.0
    items: float = 0.0
    steps: int = 0

    def add(self, seconds: float, tokens: float, items: float) -> None:
        self.seconds, self.tokens, self.items, self.steps = (self.seconds + seconds, self.tokens + tokens,
                                                             self.items + items, self.steps + 1)

    def rates(self, item_name: str) -> dict[str, float]:
        s = max(self.seconds, 1e-9)
        out = {"tokens_per_s": self.tokens / s, "ms_per_step": 1000 * self.seconds / max(self.steps, 1)}
        if self.items:
            out[f"{item_name}_per_s"] = self.items / s
        return out


@dataclass
class StepClock:
    """ETA from an exponential moving average of step times (the first step of a session is warm-up, skipped once
    a second one exists). Naive equivalent: elapsed / steps_done * steps_left, which a slow first step skews."""
    decay: float = 0.9
    ema: float | None = None
    first: float | None = field(default=None, repr=False)

    def update(self, seconds: float) -> None:
        if self.first is None:
            self.first = seconds
        else:
            self.ema = seconds if self.ema is None else self.decay * self.ema + (1 - self.decay) * seconds

    def eta(self, steps_left: int) -> float:
        per_step = self.ema if self.ema is not None else (self.first or 0.0)
        return per_step * steps_left


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters a method trains (those with requires_grad), by name: what train_loop and the checkpoint take."""
    return {k: p for k, p in model.named_parameters() if p.requires_grad}


def make_optimizer(cfg: LoopConfig, trainable: list[Tensor]):
    """AdamW (decay on matrices only, betas as GPT-2 fine-tuning uses) and the warmup + cosine schedule."""
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio))
    return optimizer, scheduler


class LoopState(Protocol):
    """A method's own state beyond the weights (RLOO's adaptive kl_coef), saved with each checkpoint."""

    def state(self) -> dict: ...

    def load(self, state: dict) -> None: ...


@dataclass(frozen=True)
class TrainRun:
    """One training run: the loop's settings, its folder (log.jsonl and the checkpoint; None: neither), a call after
    each step (periodic evaluation), the settings its checkpoint records (a resume must match them; None: the
    method's own, given to train_loop) and whether to resume from that checkpoint."""
    loop: LoopConfig
    run_dir: Path | None = None
    on_step_end: Callable[[int], None] | None = None
    settings: dict | None = None
    resume: bool = True
    checkpoint: str = "checkpoint"  # the checkpoint's folder in run_dir


def train_loop(run: TrainRun, params: dict[str, Tensor], get_batch: Callable[[int, int], object],
               step_fn: Callable[[object], tuple], settings: dict | None = None, state: LoopState | None = None,
               autocast: AbstractContextManager | None = None, log: Log | None = None,
               **shown) -> dict[str, float]:
    """Run the optimizer steps left until run.loop.steps; returns the last logged metrics, plus whole-run
    throughput and "seconds", this session's wall time.

    get_batch(step, micro) -> a micro-batch; step_fn(batch) -> (loss, metrics, n_tokens) or (loss, metrics,
    n_tokens, n_items), metrics being 0-dim tensors (the plain mean loss of the micro-batch: the loop divides by
    grad_accum), run inside `autocast` when given. `shown` replaces the loop's label, show or item_name (the
    method's log line). The checkpoint records run.settings, else the method's `settings` with the loop's steps
    and lr; `state` is saved with it and given back on resume. `log` gets the progress lines on rank 0 (default:
    print them).

    Each step: forward/backward over grad_accum micro-batches, one all-reduce of gradients, loss and metrics over
    ranks, clip, optimizer step. On a non-finite loss the gradients are dropped and the run stops before the
    optimizer step, so the weights stay those of the last good step.
    """
    t_session = time.perf_counter()
    cfg = replace(run.loop, **shown)
    say = (log if log is not None else partial(print, flush=True)) if is_main() else quiet
    checkpointer = log_path = None
    if run.run_dir is not None:
        run_dir = Path(run.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        recorded = run.settings if run.settings is not None or settings is None else {
            **settings, "steps": cfg.steps, "lr": cfg.lr}
        checkpointer, log_path = Checkpointer(run_dir / run.checkpoint, params, recorded), run_dir / "log.jsonl"
    autocast = autocast if autocast is not None else nullcontext()
    _, world = rank_and_world()
    trainable = [p for p in params.values() if p.requires_grad]
    optimizer, scheduler = make_optimizer(cfg, trainable)
    start, totals, last = 0, Totals(), {}
    if run.resume and checkpointer is not None and checkpointer.exists():
        start, extra = checkpointer.load(optimizer, scheduler)
        if start > cfg.steps:
            raise ValueError(f"[{cfg.label}] checkpoint {checkpointer.dir} is at step {start}, past this run's "
                             f"{cfg.steps} steps; give at least {start} steps, or delete it to start again")
        totals, last = Totals(**extra.get("totals", {})), dict(extra.get("last", {}))
        if state is not None and "loop_state" in extra:
            state.load(extra["loop_state"])
        say(f"[{cfg.label}] resumed from {checkpointer.dir} at step {start}/{cfg.steps}")
    window, clock = Totals(), StepClock()
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        lr = scheduler.get_last_lr()[0]  # the rate this step runs at: the scheduler advances after it
        metric_sums: dict[str, Tensor] = {}
        metric_counts: dict[str, Tensor] = {}  # micro-batches with a value: a NaN metric (e.g. no pairs) is left out
        loss_sum: Tensor | float = 0.0  # stays on the device: no host sync per micro-step
        tokens = items = 0
        for micro in range(cfg.grad_accum):
            batch = get_batch(step, micro)
            with autocast:
                out = step_fn(batch)
            loss, metrics, n_tokens = out[:3]
            (loss / cfg.grad_accum).backward()
            loss_sum = loss_sum + loss.detach().float() / cfg.grad_accum
            for k, v in metrics.items():
                v = v.detach().float()
                real = ~torch.isnan(v)
                metric_sums[k] = metric_sums.get(k, 0) + torch.where(real, v, 0.0)
                metric_counts[k] = metric_counts.get(k, 0) + real.float()
            tokens = tokens + n_tokens
            items = items + (out[3] if len(out) > 3 else 0)
        # one all-reduce for gradients, loss and metrics: every rank sees the same loss, so a NaN stops them all
        keys = list(metric_sums)
        loss_sum, *values = average_gradients(trainable, [loss_sum, *metric_sums.values(), *metric_counts.values()])
        # the mean over the micro-batches (and ranks) that measured each metric; NaN when none did
        metrics = {k: s / c for k, s, c in zip(keys, values[:len(keys)], values[len(keys):])}
        loss_value = loss_sum.item()  # the one host sync per step: a NaN must stop the run before the optimizer step
        if not math.isfinite(loss_value):
            optimizer.zero_grad(set_to_none=True)
            saved = checkpointer.saved_step() if checkpointer is not None else None
            kept = (f"the last good checkpoint (step {saved}) is kept in {checkpointer.dir}" if saved is not None
                    else "no checkpoint was written yet")
            raise NonFiniteLoss(f"[{cfg.label}] loss is {loss_value} at step {step + 1}/{cfg.steps}; stopping "
                                f"before the optimizer step, {kept}")
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip) if cfg.grad_clip > 0 else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        for counts in (totals, window):
            counts.add(seconds, float(tokens) * world, float(items) * world)
        clock.update(seconds)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            last = {"step": done, "loss": loss_value, "lr": lr,
                    **{k: v.item() for k, v in metrics.items()},
                    "grad_norm": float(grad_norm) if grad_norm is not None else 0.0, **window.rates(cfg.item_name)}
            say(format_log_line(cfg, done, last, clock.eta(cfg.steps - done)))
            if log_path is not None and is_main():
                append_jsonl(log_path, {"stage": cfg.label, **last})
            window = Totals()
        if run.on_step_end is not None:  # before the checkpoint: a kill between them re-runs this step, losing nothing
            run.on_step_end(done)
        if checkpointer is not None and is_main() and (
                (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == cfg.steps):
            checkpointer.save(done, optimizer, scheduler, extra={
                "loop_state": state.state() if state is not None else {}, "totals": vars(totals), "last": last})
    barrier()
    return {**last, "steps": cfg.steps, "steps_this_session": cfg.steps - start,
            "final_loss": last.get("loss", math.nan), "seconds": time.perf_counter() - t_session,
            **totals.rates(cfg.item_name)}


def trainable_adapter(model: torch.nn.Module, who: str) -> dict[str, torch.nn.Parameter]:
    """The parameters a method trains, after checking that it can start from a fresh LoRA adapter (B = 0), so that
    the reference (the adapter disabled) is the starting policy."""
    if not lora_layers(model):
        raise ValueError(f"{who}: the model has no LoRA adapter; apply_lora first (the reference is the model with "
                         "its adapter disabled)")
    if not adapters_are_zero(model):
        raise RuntimeError(f"{who}: a new LoRA adapter must start at B = 0, so that the reference is the starting "
                           "policy")
    return trainable_parameters(model)


def append_jsonl(path: Path, record: dict) -> None:
    """One strict-JSON line appended (a non-finite metric is written as null, which every JSON reader parses)."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    with open(path, "a") as f:
        f.write(json.dumps(clean, allow_nan=False) + "\n")


def format_log_line(cfg: LoopConfig, step: int, m: dict[str, float], eta_s: float) -> str:
    """`[dpo] step 25/600 | loss 0.8669 | acc 0.44 | ... | 3,333 tok/s | 80.0 pairs/s | 197 ms | eta 1m38s`."""
    parts = [f"[{cfg.label}] step {step:>5}/{cfg.steps}", f"loss {m['loss']:.4f}"]
    parts += [f"{short} {fmt.format(m[k])}" for k, short, fmt in cfg.show if k in m]
    parts.append(f"{m['tokens_per_s']:,.0f} tok/s")
    if f"{cfg.item_name}_per_s" in m:
        parts.append(f"{m[f'{cfg.item_name}_per_s']:,.1f} {cfg.item_name}/s")
    parts += [f"{m['ms_per_step']:.0f} ms", f"eta {format_seconds(eta_s)}"]
    return " | ".join(parts)


def format_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
