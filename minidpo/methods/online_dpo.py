"""
Online DPO: the DPO loss on pairs that the CURRENT policy samples at every step, instead of on pairs that the
reference sampled once before training. The loss, beta, pairing and reference are DPO's (minidpo/methods/dpo.py); only
where the pairs come from changes.

References: Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback" (OAIF, arXiv:2402.04792): each
step, sample responses from the current policy, let an annotator pick the preferred one, take a DPO step against the
fixed reference; TRL's OnlineDPOTrainer. The annotator here is the sentiment classifier, as in the DPO paper's IMDb
experiment (Rafailov et al. 2023, sec. 6.1).

Temperature: where minidpo differs from TRL. Both sample the training completions at temperature T. TRL 1.16's
OnlineDPOTrainer then takes the log-probs of policy and reference from the untempered logits, so its loss scores the
samples under distributions other than the one they were drawn from. minidpo tempers both (log softmax(logits / T),
as TRL's RLOOTrainer does for its KL), so every log-prob in the loss is of the sampler that produced the samples and
online DPO and RLOO share their rollouts (minidpo/methods/rollout.py). At T = 1 the two choices agree.

Why offline pairs can fall short. DPO's loss is minimized by pi* ~ ref * exp(r / beta) only where the pairs put
weight; the pairs are the reference's samples, so as the policy moves, its own samples drift away from them and the
loss keeps improving on sequences the policy no longer produces. Online pairs follow the policy, as RLOO's samples do.

One step: K completions per prompt from the current policy with their classifier scores and the reference's
log-probs (no gradient); every (higher score, lower score) pair within a prompt (`rollout_pairs`); the policy's
log-probs of the K completions and DPO's loss over the pairs (`online_dpo_loss`). The scores only order the samples.
"""

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import ContextManager

import torch
from torch import Tensor

from minidpo.config import require
from minidpo.dataset.pairs import PAIRINGS, preference_pairs
from minidpo.methods.dpo import DPOConfig, dpo_step_loss, pair_logps
from minidpo.methods.rollout import Rollout, RolloutConfig, make_rollout_fn, policy_logps
from minidpo.training.runtime import Runtime
from minidpo.training.trainer import TrainRun, train_loop, trainable_adapter

# (metric key, short label, format) for the progress line (LoopConfig.show)
ONLINE_DPO_SHOW = (("reward", "reward", "{:.3f}"), ("kl/sampled", "kl", "{:.3f}"),
                   ("rewards/accuracies", "acc", "{:.2f}"), ("rewards/margins", "margin", "{:+.3f}"))


@dataclass(frozen=True)
class OnlineDPOConfig(RolloutConfig):
    """The rollout settings (k completions of prompts_per_step prompts, lengths, temperature, ...) plus how a
    prompt's completions are paired."""
    pairing: str = "all"  # all (every distinct-score pair) | best_vs_worst (one per prompt)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.pairing in PAIRINGS, "pairing", f"must be one of {', '.join(PAIRINGS)}, got {self.pairing!r}")


def rollout_pairs(scores: Tensor, pairing: str = "all") -> tuple[Tensor, Tensor]:
    """(chosen, rejected) row indices (N,) into a rollout's P*K rows from its scores (P, K): pairs only within a
    prompt, the higher score chosen, equal scores never paired.

    Naive equivalent: [(p*K + i, p*K + j) for p in range(P) for i, j in preference_pairs(scores[p], pairing)].
    """
    K = scores.size(1)
    rows = [(p * K + i, p * K + j) for p, row in enumerate(scores.tolist())  # one host copy, not one per prompt
            for i, j in preference_pairs(row, pairing)]
    index = torch.tensor(rows, dtype=torch.long, device=scores.device).view(-1, 2)  # (N, 2)
    return index[:, 0], index[:, 1]


def online_dpo_loss(model: torch.nn.Module, rollout: Rollout, dpo: DPOConfig, cfg: OnlineDPOConfig,
                    autocast: ContextManager | None = None) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """DPO's loss over a rollout's pairs, its metrics (DPO's, plus the classifier reward and the sampled KL) and the
    (P*K,) sampled log-ratios log pi(y|x) - log ref(y|x), whose mean estimates KL(policy || reference)."""
    with autocast or nullcontext():
        policy = policy_logps(model, rollout, cfg).float()  # (B,)
    n_tokens = rollout.response_mask.sum(-1).clamp(min=1)  # (B,)
    log_ratio = policy.detach() - rollout.reference_logps  # (B,)
    chosen, rejected = rollout_pairs(rollout.scores.view(-1, cfg.k), cfg.pairing)
    extra = {"reward": rollout.scores.mean(), "kl/sampled": log_ratio.mean(),
             "completion_tokens": rollout.response_mask.sum(-1).float().mean()}
    weight = 1.0
    if chosen.numel() == 0:  # every prompt's completions scored alike: nothing to prefer, so no update. A zero-weight
        # self-pair keeps the metrics' keys: every micro-batch and process must report the same ones to be averaged
        # (as NaN, below: the pair metrics are averaged over real pairs only)
        chosen = rejected = torch.zeros(1, dtype=torch.long, device=policy.device)
        weight = 0.0
    seqs = {"logps": policy, "logps_mean": policy / n_tokens}
    reference = {"logps": rollout.reference_logps, "logps_mean": rollout.reference_logps / n_tokens}
    pairs = {"chosen_index": chosen, "rejected_index": rejected}
    loss, metrics = dpo_step_loss(pair_logps(seqs, pairs), pair_logps(reference, pairs), dpo)
    if weight == 0.0:  # no real pair: NaN, which the trainer leaves out of its averages (never a 0 accuracy)
        metrics = {k: torch.full_like(v, math.nan) for k, v in metrics.items()}
    return loss * weight, {**metrics, **extra}, log_ratio


def train_online_dpo(model: torch.nn.Module, tokenizer, scorer, prompts: list, dpo: DPOConfig, cfg: OnlineDPOConfig,
                     run: TrainRun, runtime: Runtime) -> dict:
    """Train the model's fresh LoRA adapter (B = 0: the caller applies it) with online DPO; returns the last logged
    metrics and the training seconds. The caller evaluates afterwards, as for every method."""
    get_batch = make_rollout_fn(model, tokenizer, scorer, prompts, cfg, run.loop.grad_accum, runtime)
    params = trainable_adapter(model, "train_online_dpo")

    def step_fn(rollout: Rollout) -> tuple[Tensor, dict[str, Tensor], int, int]:
        model.train()  # LoRA dropout on in every training step (the rollout sampled in eval mode)
        loss, metrics, log_ratio = online_dpo_loss(model, rollout, dpo, cfg, runtime.autocast)
        return loss, metrics, rollout.n_tokens, log_ratio.numel()

    return train_loop(run, params, get_batch, step_fn, {"dpo": asdict(dpo), "online": asdict(cfg)}, log=runtime.log,
                      label=f"online-dpo beta={dpo.beta:g}", show=ONLINE_DPO_SHOW, item_name="completions")
