"""
One DPO training run: a fresh LoRA adapter on the reference weights, batches of preference pairs, the DPO loss with
the reference passed in explicitly. Evaluation on held-out prompts follows in experiment/compare.py, the same for
every method.

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

from dataclasses import asdict, replace

import torch
from torch import Tensor

from minidpo.dataset.batching import PairData
from minidpo.methods.dpo import (DPOConfig, concatenated_forward, dpo_step_loss, dpo_unique_loss, reference_forward,
                                 sequence_forward)
from minidpo.methods.offline_train import BatchConfig, make_batch_fn
from minidpo.training.runtime import Runtime
from minidpo.training.trainer import Training, TrainRun, fit, trainable_adapter


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


def train_dpo(model: torch.nn.Module, data: PairData, dpo: DPOConfig, bcfg: BatchConfig, run: TrainRun, rt: Runtime,
              reference_cache: dict[int, Tensor] | None = None, compile: bool = False) -> dict:
    """Train the model's fresh LoRA adapter (B = 0: the caller applies it) with DPO on `data`'s batches; returns
    the training summary. The caller evaluates afterwards (experiment/compare.py's one epilogue for every method)."""
    params = trainable_adapter(model, "train_dpo")
    if compile:  # the transformer body only: compiling the whole step on a CPU took minutes, this about 45 s
        model.hidden_states = torch.compile(model.hidden_states)

    def step_fn(batch):
        model.train()  # LoRA dropout on in every training step; evaluation and sampling run in eval mode
        with rt.autocast:
            return dpo_step(model, batch, dpo, bcfg, reference_cache)

    loop = replace(run.loop, label=f"dpo beta={dpo.beta:g}")
    settings = {"dpo": asdict(dpo), "batch": asdict(bcfg), "steps": loop.steps, "lr": loop.lr}
    return fit(Training(loop, params, make_batch_fn(data, bcfg, rt), step_fn), run, rt, settings)
