"""
RLOO training: the policy samples K completions of each prompt, the sentiment classifier scores them, and the LoRA
adapter takes a REINFORCE step with a leave-one-out baseline on the KL-penalized reward (the math, with its
derivation, is in minidpo/pg.py).

References: Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
Feedback in LLMs" (arXiv:2402.14740), and TRL's RLOOTrainer (one update per batch of samples, the whole completion
one action, reward = score - kl_coef * sum_t (log pi - log ref)); the response lengths follow TRL's gpt2-sentiment
example (a budget per prompt from LengthSampler(min_new_tokens, max_new_tokens)); the loop is minidpo.trainer's,
shared with SFT and DPO.

One step (per micro-batch, `prompts_per_step` prompts on each process):
1. rollout, no gradient (`sample_rollout`): the CURRENT policy samples K completions per prompt from left-padded
   prompts, all in one generate call up to the largest budget; each row is then cut at its prompt's budget (the
   same distribution as generating with that budget: sampling is left to right) and at its first end-of-text,
   which it keeps, so the policy also learns when to stop. The classifier scores prompt text + completion text;
   the reference (adapter disabled) scores each right-padded (prompt + completion) row.
2. loss, with gradient (`rloo_loss`): the policy's sequence log-probs of the same rows, the KL-penalized reward
   (policy log-probs detached), the leave-one-out advantages, the REINFORCE surrogate.

Exact resume. A micro-batch is a pure function of (seed, step, micro, rank) and the weights: the prompts come from
a seeded stream of shuffled epochs, and the budgets and the sampling generator are seeded from those numbers. The
adaptive kl_coef is updated at the end of each optimizer step inside the step itself, and saved in the checkpoint
(train_loop's get_state / set_state), so a resumed run continues with the coefficient it had.
"""

import hashlib
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, ContextManager

import torch
import torch.distributed as dist
from torch import Tensor

from minidpo.dpo import score_sequences
from minidpo.length_sampler import LengthSampler
from minidpo.lora import adapters_are_zero, lora_disabled, lora_layers
from minidpo.pairs import cut_at_eot, response_text
from minidpo.pg import RLOO_SHOW, RLOOConfig, adaptive_kl_coef, kl_penalized_rewards, policy_gradient_loss, \
    rloo_advantages
from minidpo.progress import Log, quiet
from minidpo.trainer import Checkpointer, LoopConfig, train_loop


@dataclass
class Rollout:
    """P prompts x K completions, row b = completion b % K of prompt b // K."""
    ids: Tensor              # (P*K, T) prompt + completion, right-padded
    response_mask: Tensor    # (P*K, T) bool: the completion's tokens (an end-of-text the policy chose included)
    scores: Tensor           # (P*K,) classifier reward of prompt text + completion text
    reference_logps: Tensor  # (P*K,) log ref(y|x), summed over the completion
    n_tokens: int            # real (non-pad) tokens in ids
    micro: int               # micro-step within the optimizer step (the last one updates the adaptive kl_coef)


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from any parts, e.g. ("rloo", seed, slot); the same parts give the same seed in any process."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def stream_indices(n: int, start: int, count: int, seed: int) -> list[int]:
    """Items start..start+count-1 of an endless stream of shuffled epochs over range(n).

    Naive equivalent: concatenate randperm_e(n) for e = 0, 1, 2, ... (epoch e seeded by (seed, e)) and slice.
    """
    out, perms = [], {}
    for i in range(start, start + count):
        epoch = i // n
        if epoch not in perms:
            g = torch.Generator().manual_seed(derived_seed("rloo-prompts", seed, epoch))
            perms[epoch] = torch.randperm(n, generator=g).tolist()
        out.append(perms[epoch][i % n])
    return out


@torch.no_grad()
def sample_rollout(model: torch.nn.Module, tokenizer, scorer, prompts: list, cfg: RLOOConfig, budgets: list[int],
                   generator: torch.Generator, device: torch.device, micro: int = 0,
                   autocast: ContextManager | None = None) -> Rollout:
    """K completions per prompt from the current policy, their scores and reference log-probs (no gradient).

    prompts: objects with .ids (list of token ids) and .text; budgets: one max-new-tokens per prompt.
    """
    K, amp = cfg.k, autocast or nullcontext()
    prompt_ids = [p.ids for p in prompts for _ in range(K)]
    idx, mask = tokenizer.pad(prompt_ids, padding_side="left")  # (P*K, Tp)
    with amp:
        seqs = model.generate(idx.to(device), max(budgets), min_new_tokens=cfg.min_new_tokens,
                              temperature=1.0, top_k=cfg.top_k, eos_id=cfg.eot_id,
                              attention_mask=mask.to(device), generator=generator)
    new = seqs[:, idx.size(1):].tolist()
    completions = [cut_at_eot(row[:budgets[b // K]], cfg.eot_id) for b, row in enumerate(new)]
    texts = [prompts[b // K].text + response_text(c, tokenizer) for b, c in enumerate(completions)]
    scores = torch.as_tensor(scorer.score(texts), dtype=torch.float32)
    ids, attention = tokenizer.pad([p + c for p, c in zip(prompt_ids, completions)], padding_side="right")  # (B, T)
    response_mask = torch.zeros_like(ids, dtype=torch.bool)
    for b, (p, c) in enumerate(zip(prompt_ids, completions)):
        response_mask[b, len(p):len(p) + len(c)] = True
    ids, response_mask = ids.to(device), response_mask.to(device)
    with amp, lora_disabled(model):
        reference = score_sequences(model, ids, response_mask, cfg.logprobs).float()
    return Rollout(ids, response_mask, scores.to(device), reference, int(attention.sum()), micro)


def rloo_loss(model: torch.nn.Module, rollout: Rollout, cfg: RLOOConfig, kl_coef: float,
              autocast: ContextManager | None = None) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """The RLOO surrogate loss of one rollout, its metrics (0-dim tensors) and the (P*K,) sampled log-ratios
    log pi(y|x) - log ref(y|x), whose mean estimates KL(policy || reference)."""
    with autocast or nullcontext():
        policy = score_sequences(model, rollout.ids, rollout.response_mask, cfg.logprobs).float()  # (B,)
    kl = policy.detach() - rollout.reference_logps                                     # (B,) sampled log-ratio
    rewards = kl_penalized_rewards(rollout.scores, policy.detach(), rollout.reference_logps, kl_coef)
    advantages = rloo_advantages(rewards.view(-1, cfg.k))                              # (P, K)
    loss = policy_gradient_loss(advantages, policy.view(-1, cfg.k))
    metrics = {"reward": rollout.scores.mean(), "kl/sampled": kl.mean(), "rlhf_reward": rewards.mean(),
               "advantage_std": advantages.std(), "kl_coef": torch.tensor(kl_coef),
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


def make_rollout_fn(model: torch.nn.Module, tokenizer, scorer, prompts: list, cfg: RLOOConfig, grad_accum: int,
                    rank: int, world: int, device: torch.device,
                    autocast: ContextManager | None = None) -> Callable[[int, int], Rollout]:
    """get_batch(step, micro) -> this process's Rollout; a pure function of (cfg.seed, step, micro, rank) and the
    weights."""
    P = cfg.prompts_per_step

    def get_batch(step: int, micro: int) -> Rollout:
        slot = (step * grad_accum + micro) * world + rank
        chosen = [prompts[i] for i in stream_indices(len(prompts), slot * P, P, cfg.seed)]
        budgets = LengthSampler(cfg.min_new_tokens, cfg.max_new_tokens,
                                seed=derived_seed("rloo-budgets", cfg.seed, slot)).sample(P)
        g = torch.Generator(device=device).manual_seed(derived_seed("rloo-samples", cfg.seed, slot))
        return sample_rollout(model, tokenizer, scorer, chosen, cfg, budgets, g, device, micro, autocast)
    return get_batch


def train_rloo(model: torch.nn.Module, tokenizer, scorer, prompts: list, cfg: RLOOConfig, loop: LoopConfig,
               run_dir: Path, device: torch.device, log: Log = quiet, autocast: ContextManager | None = None,
               rank: int = 0, world: int = 1, on_step_end: Callable[[int], None] | None = None,
               resume: bool = True) -> dict:
    """Train the model's (fresh, B = 0) LoRA adapter with RLOO; returns the last logged metrics, the final kl_coef
    and the training seconds. Writes run_dir/log.jsonl and the checkpoint run_dir/checkpoint (resumed from when
    `resume` and it exists). The caller applies the adapter (`apply_lora`) and evaluates afterwards.
    """
    if not prompts:
        raise ValueError("train_rloo: no training prompts")
    if not lora_layers(model):
        raise ValueError("train_rloo: the model has no LoRA adapter; apply_lora first (the reference is the model "
                         "with its adapter disabled)")
    if not adapters_are_zero(model):
        raise RuntimeError("train_rloo: a new LoRA adapter must start at B = 0, so that the reference is the "
                           "starting policy")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    kl = KLController(cfg, loop.grad_accum, world)
    get_batch = make_rollout_fn(model, tokenizer, scorer, prompts, cfg, loop.grad_accum, rank, world, device,
                                autocast)

    def step_fn(rollout: Rollout) -> tuple[Tensor, dict[str, Tensor], int, int]:
        loss, metrics, log_ratio = rloo_loss(model, rollout, cfg, kl.value, autocast)
        kl.observe(log_ratio, rollout.micro)  # after the loss: this step used the previous coefficient
        return loss, metrics, rollout.n_tokens, log_ratio.numel()

    t0 = time.perf_counter()
    summary = train_loop(replace(loop, show=RLOO_SHOW, item_name="completions"), params, get_batch, step_fn,
                         Checkpointer(run_dir / "checkpoint", params), run_dir / "log.jsonl", on_step_end,
                         resume=resume, log=log, get_state=kl.state, set_state=kl.load)
    return {**summary, "kl_coef": kl.value, "seconds": time.perf_counter() - t0}
