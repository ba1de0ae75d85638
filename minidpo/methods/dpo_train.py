"""
One DPO training run: a fresh LoRA adapter on the reference weights, batches of preference pairs, the DPO loss with
the reference passed in explicitly, and evaluation on held-out prompts.

Reference: Rafailov et al. 2023, "Direct Preference Optimization" (arXiv:2305.18290), eq. 7; the step follows
TRL's DPOTrainer (same loss and metric names), the loop llm.c's train_gpt2.py (see minidpo.training.trainer).

Two ways to batch (--batching):
- "pairs": a micro-batch is `pairs` preference pairs drawn from an endless shuffled stream; each pair's prompt and
  both completions are forwarded (what TRL does).
- "unique" (default): a micro-batch is `prompts` whole prompts with all their pairs. With K completions per prompt
  and "all" pairing a prompt has up to K(K-1)/2 pairs but only K distinct sequences, so each distinct (prompt,
  completion) is forwarded once for the policy and once for the reference, and every pair's loss is formed from
  those sequence log-probs. The loss and gradient equal the pairwise computation over the same pairs
  (tests/test_dpo.py); only the work differs.

The reference is the policy with its adapter disabled (`minidpo.model.lora.lora_disabled`), which is exactly the starting
policy because the adapter starts at B = 0 (checked with `adapters_are_zero` before the first step), or cached
sequence log-probs of the same weights computed before training (--precompute-ref).
"""

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from minidpo.dataset.batching import PairData, collate_pairs, collate_unique, group_indices, pair_indices
from minidpo.config import require
from minidpo.training.distributed import barrier, is_main
from minidpo.training.frontier import append_point, read_points
from minidpo.methods.logprobs import LOGPROBS
from minidpo.methods.dpo import (DPOConfig, concatenated_forward, dpo_step_loss, dpo_unique_loss, reference_forward,
                         sequence_forward)
from minidpo.model.lora import LoRAConfig, adapters_are_zero, apply_lora
from minidpo.progress import Log, quiet
from minidpo.training.checkpoint import Checkpointer
from minidpo.training.trainer import LoopConfig, train_loop, trainable_parameters
from minidpo.model.tokenizer import EOT_ID

BATCHING = ("unique", "pairs")


@dataclass(frozen=True)
class BatchConfig:
    mode: str = "unique"    # unique | pairs
    pairs: int = 8          # pairs per micro-batch per process (mode "pairs")
    prompts: int = 2        # whole prompts per micro-batch per process (mode "unique")
    grad_accum: int = 1
    max_length: int = 64
    pad_id: int = EOT_ID
    logprobs: str = "fused"  # fused | naive (the plain log_softmax + gather path, for reading and checking)
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.mode in BATCHING, "batching", f"must be one of {', '.join(BATCHING)}, got {self.mode!r}")
        require(self.logprobs in LOGPROBS, "logprobs", f"must be one of {', '.join(LOGPROBS)}, got {self.logprobs!r}")
        require(self.pairs >= 1, "batch_size", f"must be >= 1, got {self.pairs}")
        require(self.prompts >= 1, "batch_prompts", f"must be >= 1, got {self.prompts}")
        require(self.grad_accum >= 1, "grad_accum", f"must be >= 1, got {self.grad_accum}")

    def draws_per_step(self, world: int) -> int:
        """Items (pairs or prompt groups) one optimizer step takes over all processes."""
        return (self.prompts if self.mode == "unique" else self.pairs) * self.grad_accum * world


def make_batch_fn(data: PairData, cfg: BatchConfig, rank: int, world: int,
                  device: torch.device) -> Callable[[int, int], tuple]:
    """get_batch(step, micro) -> (group or pair indices, tensors on the device, real tokens, pairs) for this rank.

    A pure function of its arguments (the seed is in cfg), so a resumed run's data position is just its step.
    """
    def get_batch(step: int, micro: int):
        slot = (step * cfg.grad_accum + micro) * world + rank
        if cfg.mode == "unique":
            idx = group_indices(len(data.groups), slot * cfg.prompts, cfg.prompts, cfg.seed)
            pairs = [data.train[i] for g in idx for i in data.groups[g]]
            batch = collate_unique(pairs, cfg.max_length, pad_id=cfg.pad_id)
            n_tokens = int(batch["attention_mask"].sum())
        else:
            idx = pair_indices(len(data.train), slot * cfg.pairs, cfg.pairs, cfg.seed)
            pairs = [data.train[i] for i in idx]
            batch = collate_pairs(pairs, cfg.max_length, pad_id=cfg.pad_id)
            n_tokens = int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())
        # counted on the CPU before the copy, so logging tokens/s costs no device sync
        return idx, {k: v.to(device, non_blocking=True) for k, v in batch.items()}, n_tokens, len(pairs)
    return get_batch


def cached_reference(cache: dict[int, Tensor], groups: list[int]) -> dict[str, Tensor]:
    """Reference sequence log-probs of a unique batch from the precomputed per-group cache."""
    both = torch.cat([cache[g] for g in groups], dim=1)  # (2, N)
    return {"logps": both[0], "logps_mean": both[1]}


def dpo_step(model: torch.nn.Module, batch: tuple, dpo: DPOConfig, bcfg: BatchConfig,
             reference_cache: dict[int, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor], int, int]:
    """One DPO micro-batch: policy forward (with grad), reference log-probs (passed in explicitly), the loss.

    This is the training step: a reader can follow it from here to `minidpo.methods.logprobs.sequence_logps` (naive) or the
    fused kernels, and back through backward.
    """
    idx, tensors, n_tokens, n_pairs = batch
    if bcfg.mode == "unique":
        policy = sequence_forward(model, tensors, bcfg.logprobs)
        reference = (cached_reference(reference_cache, idx) if reference_cache is not None
                     else reference_forward(model, tensors, bcfg.logprobs, unique=True))
        loss, metrics = dpo_unique_loss(policy, reference, tensors, dpo)
    else:
        policy = concatenated_forward(model, tensors, bcfg.logprobs)
        reference = reference_forward(model, tensors, bcfg.logprobs, unique=False)
        loss, metrics = dpo_step_loss(policy, reference, dpo)
    return loss, metrics, n_tokens, n_pairs


@dataclass
class RunResult:
    """What one training run (any method, one setting) produced; the frontier points include step 0."""
    method: str
    setting: str
    reference: dict
    policy: dict
    train: dict
    examples: list
    frontier: list[dict]


def run_dpo(model: torch.nn.Module, data: PairData, dpo: DPOConfig, lora: LoRAConfig, bcfg: BatchConfig,
            loop: LoopConfig, run_dir: Path, evaluate_fn: Callable[[int, bool], dict], eval_every: int,
            rank: int, world: int, autocast: torch.autocast, reference_cache: dict[int, Tensor] | None = None,
            compile: bool = False, log: Log = quiet, settings: dict | None = None) -> RunResult:
    """Fresh adapter, train, evaluate. `evaluate_fn(step, with_reference)` measures reward and KL on held-out
    prompts (the same function for every method), so points on the frontier compare like for like. `settings`:
    what the checkpoint records and a resume must match (default: this function's own configs)."""
    torch.manual_seed(bcfg.seed)
    apply_lora(model, lora)
    if not adapters_are_zero(model):  # the reference would not be the starting policy
        raise RuntimeError("a new LoRA adapter must start at B = 0, so that the reference is the starting policy")
    params = trainable_parameters(model)
    device = next(model.parameters()).device
    get_batch = make_batch_fn(data, bcfg, rank, world, device)
    if compile:  # the transformer body only: compiling the whole step on a CPU took minutes, this about 45 s
        model.hidden_states = torch.compile(model.hidden_states)
    setting = f"beta={dpo.beta:g}"

    def step_fn(batch):
        model.train()  # LoRA dropout on in every training step; evaluation and sampling run in eval mode
        with autocast:
            return dpo_step(model, batch, dpo, bcfg, reference_cache)

    def point(step_no: int, r: dict) -> None:  # appended to run_dir/points.jsonl, which survives a resume
        append_point(run_dir, {"method": "dpo", "setting": setting, "step": step_no, "reward": r["policy"]["reward"],
                               "kl": r["policy"]["kl_exact"], "kl_sampled": r["policy"]["kl_sampled"]})

    def on_step_end(step_no: int) -> None:
        if eval_every and step_no % eval_every == 0 and step_no != loop.steps and is_main():
            point(step_no, evaluate_fn(step_no, False))

    t0 = time.perf_counter()
    if settings is None:
        settings = {"dpo": asdict(dpo), "lora": asdict(lora), "batch": asdict(bcfg), "steps": loop.steps,
                    "lr": loop.lr}
    ckpt = Checkpointer(run_dir / "checkpoint", params, settings)
    summary = train_loop(replace(loop, label=f"dpo {setting}"), params, get_batch, step_fn, ckpt,
                         run_dir / "log.jsonl", on_step_end, resume=True, log=log)
    train_s = time.perf_counter() - t0
    result = RunResult("dpo", setting, {}, {}, {}, [], [])
    if is_main():
        r = evaluate_fn(loop.steps, True)
        append_point(run_dir, {"method": "dpo", "setting": setting, "step": 0, "reward": r["reference"]["reward"],
                               "kl": 0.0, "kl_sampled": 0.0})
        point(loop.steps, r)
        result = RunResult("dpo", setting, r["reference"], r["policy"],
                           {**summary, "reward_accuracy": r.get("reward_accuracy"), "seconds": train_s},
                           r["examples"], read_points(run_dir))
    barrier()
    return result
