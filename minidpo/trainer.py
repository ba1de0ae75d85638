"""
One training loop for both stages (SFT and DPO): AdamW, linear warmup then cosine decay, gradient accumulation,
gradient clipping, data-parallel gradient averaging, a log line every few steps, atomic checkpoints and exact resume.

References: llm.c's train_gpt2.py (every step logs loss, ms and tokens/s), nanoGPT's train.py (warmup + cosine,
accumulation), PyTorch's DistributedDataParallel for the gradient all-reduce semantics.

Exact resume. Batches are a pure function of (step, micro_step, rank): the caller's `get_batch` derives them from the
seed, so the data position is just the step number. A checkpoint holds the trainable tensors, the optimizer and
scheduler state, every RNG state and the step; resuming restores all of it, so a run killed at any moment and resumed
from its last checkpoint ends bit-identical to an uninterrupted run (on the same device and thread count).

Data parallelism. Only the trainable (LoRA) parameters get gradients, a few hundred kilobytes, so after backward their
gradients are flattened into one buffer and averaged with a single all_reduce: the same arithmetic as
DistributedDataParallel, without wrapping the model (which would hide `hidden_states` and `lora_disabled` behind
`.module`) and without DDP's bucketing machinery, which pays only for large gradients.
"""

import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from minidpo.safetensors import load_file, save_file


@dataclass
class LoopConfig:
    steps: int
    lr: float
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_accum: int = 1
    grad_clip: float = 1.0
    log_every: int = 10
    checkpoint_every: int = 0  # 0: only at the end
    label: str = "train"


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak lr: linear warmup over `warmup` steps, then cosine from 1 down to `min_ratio`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def average_gradients(params: list[Tensor]) -> None:
    """All-reduce the mean gradient over ranks in one flat buffer (what DDP computes)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def rng_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    # numpy's key array as a tensor: weights_only loading accepts tensors and plain Python values, not ndarrays
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Checkpoints in `directory`: `trainable.safetensors` plus `state.pt` (optimizer, scheduler, RNG, step).

    Each file is written to a temporary name and renamed, the state file last: a kill at any point leaves either the
    previous complete checkpoint or the new one. `state.pt` is only ever our own file, and is still read with
    weights_only=True.
    """

    def __init__(self, directory: str | Path, named_params: dict[str, Tensor]):
        self.dir = Path(directory)
        self.params = named_params

    def exists(self) -> bool:
        return (self.dir / "state.pt").is_file()

    def save(self, step: int, optimizer, scheduler, extra: dict | None = None) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tensors = {k: p.detach() for k, p in self.params.items()}
        save_file(tensors, self.dir / f"trainable-{step}.safetensors")
        state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "rng": rng_state(), "trainable": f"trainable-{step}.safetensors", "extra": extra or {}}
        tmp = self.dir / "state.pt.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.dir / "state.pt")
        for old in self.dir.glob("trainable-*.safetensors"):  # keep only the file the state points at
            if old.name != state["trainable"]:
                old.unlink(missing_ok=True)

    def load(self, optimizer, scheduler) -> tuple[int, dict]:
        state = torch.load(self.dir / "state.pt", weights_only=True)
        tensors = load_file(self.dir / state["trainable"])
        missing = set(self.params) - set(tensors)
        if missing:
            raise ValueError(f"checkpoint {self.dir} lacks trainable tensors {sorted(missing)[:5]}")
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(tensors[k])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        return state["step"], state["extra"]


class NonFiniteLoss(RuntimeError):
    pass


def train_loop(
    cfg: LoopConfig,
    params: dict[str, Tensor],
    get_batch: Callable[[int, int], object],
    step_fn: Callable[[object], tuple[Tensor, dict[str, Tensor], int]],
    checkpointer: Checkpointer | None = None,
    log_path: Path | None = None,
    on_step_end: Callable[[int], None] | None = None,
    resume: bool = False,
) -> dict[str, float]:
    """Run cfg.steps optimizer steps; returns the last logged metrics plus throughput.

    get_batch(step, micro) -> a micro-batch; step_fn(batch) -> (loss, metrics, tokens). The loss is divided by
    grad_accum here, so step_fn returns the plain mean loss of its micro-batch.
    """
    trainable = [p for p in params.values() if p.requires_grad]
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio))
    start = 0
    if resume and checkpointer is not None and checkpointer.exists():
        start, _ = checkpointer.load(optimizer, scheduler)
        if is_main():
            print(f"[{cfg.label}] resumed from {checkpointer.dir} at step {start}/{cfg.steps}", flush=True)
    world = dist.get_world_size() if dist.is_initialized() else 1
    last: dict[str, float] = {}
    tokens_since, t_log = 0, time.perf_counter()
    t_start, steps_timed = t_log, 0
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        metric_sums: dict[str, Tensor] = {}
        loss_sum: Tensor | float = 0.0  # stays on the device: no host sync per micro-step
        tokens = 0
        for micro in range(cfg.grad_accum):
            loss, metrics, n_tok = step_fn(get_batch(step, micro))
            (loss / cfg.grad_accum).backward()
            loss_sum = loss_sum + loss.detach().float() / cfg.grad_accum
            for k, v in metrics.items():
                metric_sums[k] = metric_sums.get(k, 0) + v.detach().float() / cfg.grad_accum
            tokens += n_tok
        # The one host sync per step: a NaN must stop the run before the optimizer spreads it into the weights.
        loss_value = loss_sum.item()
        if not math.isfinite(loss_value):
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss(f"[{cfg.label}] loss is {loss_value} at step {step}; stopping. The last good "
                                f"checkpoint is kept in {checkpointer.dir if checkpointer else '(none)'}")
        average_gradients(trainable)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip) if cfg.grad_clip > 0 else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_since += tokens * world
        steps_timed += 1
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            now = time.perf_counter()
            ms = 1000 * (now - t0)
            elapsed = now - t_log
            last = {"step": done, "loss": loss_value, "lr": scheduler.get_last_lr()[0],
                    **{k: v.item() for k, v in metric_sums.items()},
                    "grad_norm": float(grad_norm) if grad_norm is not None else 0.0,
                    "tokens_per_s": tokens_since / max(elapsed, 1e-9), "ms_per_step": ms}
            eta = (now - t_start) / steps_timed * (cfg.steps - done)
            if is_main():
                print(format_log_line(cfg.label, done, cfg.steps, last, eta), flush=True)
                if log_path is not None:
                    with open(log_path, "a") as f:
                        f.write(json.dumps({"stage": cfg.label, **last}) + "\n")
            tokens_since, t_log = 0, now
        if checkpointer is not None and is_main() and (
                (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == cfg.steps):
            checkpointer.save(done, optimizer, scheduler)
        if on_step_end is not None:
            on_step_end(done)
    if dist.is_initialized():
        dist.barrier()
    return last


SHOWN = [("rewards/accuracies", "acc", "{:.2f}"), ("rewards/margins", "margin", "{:+.3f}"), ("kl", "kl", "{:.3f}")]


def format_log_line(label: str, step: int, total: int, m: dict[str, float], eta_s: float) -> str:
    parts = [f"[{label}] step {step:>5}/{total}", f"loss {m['loss']:.4f}"]
    parts += [f"{short} {fmt.format(m[k])}" for k, short, fmt in SHOWN if k in m]
    parts += [f"{m['tokens_per_s']:,.0f} tok/s", f"{m['ms_per_step']:.0f} ms", f"eta {format_seconds(eta_s)}"]
    return " | ".join(parts)


def format_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
