"""
One DPO training run: a fresh LoRA adapter on the reference weights, batches of preference pairs, the DPO loss with
the reference passed in explicitly.

Reference: Rafailov et al. 2023, "Direct Preference Optimization" (arXiv:2305.18290), eq. 7; the step follows
TRL's DPOTrainer (same loss and metric names), the loop llm.c's train_gpt2.py (see minidpo.training.trainer).

Two ways to batch (--batching):
- "pairs": a micro-batch is `pairs` preference pairs; each pair's prompt and both completions are forwarded (TRL).
- "unique" (default): a micro-batch is `prompts` whole prompts with all their pairs. With K completions per prompt
  a prompt has up to K(K-1)/2 pairs but only K distinct sequences, so each distinct (prompt, completion) is
  forwarded once for the policy and once for the reference, and every pair's loss is formed from those sequence
  log-probs. Loss and gradient equal the pairwise computation (tests/test_dpo.py); only the work differs.

The reference is the policy with its adapter disabled (`minidpo.model.lora.lora_disabled`), exactly the starting
policy because the adapter starts at B = 0, or sequence log-probs of the same weights cached before training
(--precompute-ref).
"""

from dataclasses import asdict
from functools import partial

import torch
from torch import Tensor

from minidpo.dataset.batching import PairData
from minidpo.methods.dpo import DPOConfig, concatenated_forward, dpo_step_loss, pair_logps, reference_forward
from minidpo.methods.offline_train import BatchConfig, make_batch_fn
from minidpo.methods.scoring import completion_logps
from minidpo.training.runtime import Runtime
from minidpo.training.trainer import TrainRun, train_loop, trainable_adapter


def cached_reference(cache: dict[int, Tensor], groups: list[int]) -> dict[str, Tensor]:
    """Reference sequence log-probs of a unique batch from the precomputed per-group cache."""
    both = torch.cat([cache[g] for g in groups], dim=1)  # (2, N)
    return {"logps": both[0], "logps_mean": both[1]}


def dpo_step(model: torch.nn.Module, batch: tuple, dpo: DPOConfig, batch_config: BatchConfig,
             reference_cache: dict[int, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor], int, int]:
    """One DPO micro-batch: policy log-probs (with grad), reference log-probs (passed in explicitly), the loss
    (`minidpo.methods.dpo.dpo_loss` through dpo_step_loss). A unique batch forwards each distinct sequence once (N
    rows) and gathers every pair's two from them; naive equivalent: `concatenated_forward` over each pair's rows.
    """
    model.train()  # LoRA dropout on in every training step; evaluation and sampling run in eval mode
    idx, tensors, n_tokens, n_pairs = batch
    logprobs = batch_config.logprobs
    if batch_config.mode == "pairs":
        policy = concatenated_forward(model, tensors, logprobs)
        reference = reference_forward(model, tensors, logprobs, unique=False)
    else:
        keep = tensors["response_mask"] * tensors["attention_mask"]                      # (N, T)
        logps = completion_logps(model, tensors["ids"], keep, logprobs)                  # (N,) summed
        num_tokens = (keep[:, 1:] != 0).sum(-1)  # (N,); a token at position 0 cannot be scored
        policy = pair_logps({"logps": logps, "logps_mean": logps / num_tokens.clamp(min=1),  # IPO's length mean
                             "num_tokens": num_tokens}, tensors)                         # (P,) each
        reference = pair_logps(cached_reference(reference_cache, idx) if reference_cache is not None
                               else reference_forward(model, tensors, logprobs, unique=True), tensors)
    loss, metrics = dpo_step_loss(policy, reference, dpo)
    return loss, metrics, n_tokens, n_pairs


def train_dpo(model: torch.nn.Module, data: PairData, dpo: DPOConfig, batch_config: BatchConfig, run: TrainRun,
              runtime: Runtime, reference_cache: dict[int, Tensor] | None = None, compile: bool = False) -> dict:
    """Train the model's fresh LoRA adapter (B = 0: the caller applies it) with DPO on `data`'s batches; returns
    the training summary. The caller evaluates afterwards (experiment/compare.py's one epilogue for every method)."""
    params = trainable_adapter(model, "train_dpo")
    if compile:  # the transformer body only: compiling the whole step on a CPU took minutes, this about 45 s
        model.hidden_states = torch.compile(model.hidden_states)
    step = partial(dpo_step, model, dpo=dpo, batch_config=batch_config, reference_cache=reference_cache)
    return train_loop(run, params, make_batch_fn(data, batch_config, runtime), step,
                      {"dpo": asdict(dpo), "batch": asdict(batch_config)}, autocast=runtime.autocast, log=runtime.log,
                      label=f"dpo beta={dpo.beta:g}")
