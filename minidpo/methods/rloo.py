"""
RLOO training: the policy samples K completions of each prompt, the sentiment classifier scores them, and the LoRA
adapter takes a REINFORCE step with a leave-one-out baseline on the KL-penalized reward (the math, with its
derivation, is in minidpo/methods/pg.py; the rollouts in minidpo/methods/rollout.py).

References: Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
Feedback in LLMs" (arXiv:2402.14740), and TRL's RLOOTrainer (one update per batch of samples, the whole completion
one action, reward = score - kl_coef * sum_t (log pi - log ref)).

Sampling at a temperature below 1 (the tiny preset's 0.7), with every log-prob of the tempered policy (still
on-policy, as TRL does), cuts the score-function estimate's noise (bench/README.md, "Tuning RLOO and online DPO").

Exact resume: the adaptive kl_coef is updated inside each step and saved in the checkpoint (the loop's
`LoopState`), so a resumed run continues with the coefficient it had.
"""

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import ContextManager

import torch
import torch.distributed as dist
from torch import Tensor

from minidpo.config import require
from minidpo.methods.pg import RLOO_SHOW, adaptive_kl_coef, kl_penalized_rewards, policy_gradient_loss, rloo_advantages
from minidpo.methods.rollout import Rollout, RolloutConfig, make_rollout_fn, policy_logps
from minidpo.training.runtime import Runtime
from minidpo.training.trainer import TrainRun, train_loop, trainable_adapter


@dataclass(frozen=True)
class RLOOConfig(RolloutConfig):
    """The rollout settings (k, prompts_per_step, lengths, temperature, top_k, ...) plus the KL penalty's."""
    kl_coef: float = 0.1            # beta: reward - beta * (log pi - log ref) per completion
    target_kl: float | None = None  # adapt kl_coef toward this sequence KL (None: fixed kl_coef)
    horizon: int = 10000            # adaptive KL horizon, in sampled completions

    def __post_init__(self) -> None:
        super().__post_init__()
        require(math.isfinite(self.kl_coef) and self.kl_coef >= 0, "kl_coef",
                f"must be a finite number >= 0, got {self.kl_coef}")
        require(self.target_kl is None or (math.isfinite(self.target_kl) and self.target_kl > 0), "target_kl",
                f"must be none or a finite number > 0, got {self.target_kl}")
        require(self.target_kl is None or self.kl_coef > 0, "kl_coef",
                "must be > 0 when target_kl is set (an adaptive coefficient of 0 stays 0)")
        require(self.horizon >= 1, "horizon", f"must be >= 1, got {self.horizon}")

def rloo_loss(model: torch.nn.Module, rollout: Rollout, cfg: RLOOConfig, kl_coef: float,
              autocast: ContextManager | None = None) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """The RLOO surrogate loss of one rollout, its metrics (0-dim tensors) and the (P*K,) sampled log-ratios
    log pi(y|x) - log ref(y|x), whose mean estimates KL(policy || reference)."""
    with autocast or nullcontext():
        policy = policy_logps(model, rollout, cfg).float()  # (B,)
    kl = policy.detach() - rollout.reference_logps                                     # (B,) sampled log-ratio
    rewards = kl_penalized_rewards(rollout.scores, policy.detach(), rollout.reference_logps, kl_coef)
    advantages = rloo_advantages(rewards.view(-1, cfg.k))                              # (P, K)
    loss = policy_gradient_loss(advantages, policy.view(-1, cfg.k))
    metrics = {"reward": rollout.scores.mean(), "kl/sampled": kl.mean(), "rlhf_reward": rewards.mean(),
               "advantage_std": advantages.std(), "kl_coef": torch.tensor(kl_coef, device=kl.device),
               "completion_tokens": rollout.response_mask.sum(-1).float().mean()}
    return loss, metrics, kl


class KLController:
    """kl_coef, fixed or adapted toward cfg.target_kl once per optimizer step from that step's mean sampled KL
    (averaged over micro-batches and processes, so every process keeps the same coefficient)."""

    def __init__(self, cfg: RLOOConfig, grad_accum: int, world: int):
        self.cfg, self.grad_accum, self.world = cfg, grad_accum, world
        self.value = cfg.kl_coef
        self.kl_sum = 0.0

    def observe(self, kl: Tensor, micro: int) -> None:
        """kl: (B,) sampled log-ratios of one micro-batch's completions."""
        if self.cfg.target_kl is None:
            return
        self.kl_sum += float(kl.mean())  # a host sync, only with an adaptive coefficient
        if micro == self.grad_accum - 1:
            mean = torch.tensor(self.kl_sum / self.grad_accum, dtype=torch.float64, device=kl.device)
            if dist.is_initialized():
                dist.all_reduce(mean)
                mean /= self.world
            n = kl.numel() * self.grad_accum * self.world  # completions this step
            self.value = adaptive_kl_coef(self.value, float(mean), self.cfg.target_kl, n, self.cfg.horizon)
            self.kl_sum = 0.0

    def state(self) -> dict:
        return {"kl_coef": self.value}

    def load(self, state: dict) -> None:
        self.value = float(state.get("kl_coef", self.cfg.kl_coef))


def train_rloo(model: torch.nn.Module, tokenizer, scorer, prompts: list, cfg: RLOOConfig, run: TrainRun,
               runtime: Runtime, label: str = "rloo") -> dict:
    """Train the model's fresh LoRA adapter (B = 0: the caller applies it) with RLOO; returns the last logged
    metrics, the final kl_coef and the training seconds. The caller evaluates afterwards, as for every method."""
    get_batch = make_rollout_fn(model, tokenizer, scorer, prompts, cfg, run.loop.grad_accum, runtime)
    params = trainable_adapter(model, "train_rloo")
    kl = KLController(cfg, run.loop.grad_accum, runtime.world)

    def step_fn(rollout: Rollout) -> tuple[Tensor, dict[str, Tensor], int, int]:
        model.train()  # LoRA dropout on in every training step (the rollout sampled in eval mode)
        loss, metrics, log_ratio = rloo_loss(model, rollout, cfg, kl.value, runtime.autocast)
        kl.observe(log_ratio, rollout.micro)  # after the loss: this step used the previous coefficient
        return loss, metrics, rollout.n_tokens, log_ratio.numel()

    setting = f"kl_coef={cfg.kl_coef:g}" if cfg.target_kl is None else f"target_kl={cfg.target_kl:g}"
    summary = train_loop(run, params, get_batch, step_fn, {"rloo": asdict(cfg)}, state=kl, log=runtime.log,
                         label=f"{label} {setting}", show=RLOO_SHOW, item_name="completions")
    return {**summary, "kl_coef": kl.value}
