"""
On-policy sampling, shared by the two methods that learn from the policy's own samples: RLOO (minidpo/methods/rloo.py)
and online DPO (minidpo/methods/online_dpo.py), after TRL's RLOOTrainer and OnlineDPOTrainer: each step the CURRENT
policy samples K completions per prompt and the reward scores them. Sampling and scoring run in eval mode (no LoRA
dropout), as TRL generates under model.eval(); each training step runs in train mode.

One rollout (`sample_rollout`), no gradient: K completions per prompt in one generate call up to the largest budget,
each row then cut at its prompt's budget (the same distribution as generating with that budget; the budgets follow
TRL's gpt2-sentiment example, LengthSampler(min_new_tokens, max_new_tokens) per prompt) and at its first
end-of-text, which it keeps, so the policy also learns when to stop. The classifier scores prompt + completion text;
the reference (adapter disabled) scores each row. The loss then needs only the policy's log-probs of the same rows.

Which log-probs. generate() forbids end-of-text before min_new_tokens and samples at the rollout's temperature, so
what is sampled is pi~, that tempered and renormalized distribution. Every log-prob here is of pi~ (and ref~ for the
reference), so the samples are exactly on-policy for the loss (minidpo/methods/scoring.py says why).

Exact resume. A micro-batch is a pure function of (seed, step, micro, rank) and the weights: the prompts come from
a seeded stream of shuffled epochs, and the budgets and the sampling generator are seeded from those numbers.
"""

import math
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Callable, ContextManager

import torch
from torch import Tensor

from minidpo.config import require
from minidpo.dataset.batching import batch_seed, stream_indices
from minidpo.dataset.length_sampler import LengthSampler
from minidpo.methods.logprobs import LOGPROBS
from minidpo.methods.scoring import completion_logps
from minidpo.model.completions import eval_mode, response_text, sample_completions
from minidpo.model.generate import SamplingConfig
from minidpo.model.lora import lora_disabled
from minidpo.training.runtime import Runtime

MIN_TEMPERATURE = 0.05  # the lowest rollout temperature: the tiny preset trains with finite losses down to it


@dataclass(frozen=True)
class RolloutConfig:
    sampling: SamplingConfig = SamplingConfig(min_new_tokens=4, max_new_tokens=16)  # each prompt's budget is drawn
    # from [min_new_tokens, max_new_tokens]; log-probs (and the KL) are of the tempered, eot-masked sampler
    k: int = 4                      # completions per prompt (both methods compare a prompt's samples: K >= 2)
    prompts_per_step: int = 8       # prompts per micro-batch per process
    logprobs: str = "fused"         # fused (response rows only, memory-lean) | naive (log_softmax + gather)
    seed: int = 0

    def __post_init__(self) -> None:
        s = self.sampling
        require(self.k >= 2, "k", f"must be >= 2 (each prompt's samples are compared with each other), got {self.k}")
        require(self.prompts_per_step >= 1, "prompts_per_step", f"must be >= 1, got {self.prompts_per_step}")
        require(s.min_new_tokens >= 1, "min_new_tokens", f"must be >= 1, got {s.min_new_tokens}")
        check_rollout_temperature(s.temperature)
        require(self.logprobs in LOGPROBS, "logprobs", f"must be one of {', '.join(LOGPROBS)}, got {self.logprobs!r}")


def check_rollout_temperature(temperature: float) -> None:
    """The one range of an on-policy sampling temperature (ConfigError naming "temperature" otherwise), whatever the
    bad value: nan, 0 or 1e-4 get the same message."""
    require(math.isfinite(temperature) and temperature >= MIN_TEMPERATURE, "temperature",
            f"must be a finite number >= {MIN_TEMPERATURE:g} (on-policy methods need a stochastic policy, and the "
            f"tempered log-ratios grow as 1 / T: the loss became NaN at 0.01), got {temperature}")


@dataclass
class Rollout:
    """P prompts x K completions, row b = completion b % K of prompt b // K."""
    ids: Tensor              # (P*K, T) prompt + completion, right-padded
    response_mask: Tensor    # (P*K, T) bool: the completion's tokens (an end-of-text the policy chose included)
    scores: Tensor           # (P*K,) classifier reward of prompt text + completion text
    reference_logps: Tensor  # (P*K,) log ref~(y|x), summed over the completion
    prompt_lens: Tensor      # (P*K,) prompt tokens of each row: its completion starts at this column
    n_tokens: int            # real (non-pad) tokens in ids
    micro: int               # micro-step within the optimizer step (the last one updates the adaptive kl_coef)


def policy_logps(model: torch.nn.Module, rollout: Rollout, cfg: RolloutConfig) -> Tensor:
    """(P*K,) log pi~(y|x) of the rollout's completions under the model as it is now: the distribution generate()
    sampled them from (tempered, end-of-text masked before min_new_tokens; methods/scoring.py). Short completions:
    their logits are materialized when small (`small_logits`)."""
    return completion_logps(model, rollout.ids, rollout.response_mask, cfg.logprobs, cfg.sampling,
                            rollout.prompt_lens, small_logits=True)


@torch.no_grad()
def sample_rollout(model: torch.nn.Module, tokenizer, scorer, prompts: list, cfg: RolloutConfig, budgets: list[int],
                   generator: torch.Generator, autocast: ContextManager | None = None) -> Rollout:
    """K completions per prompt from the current policy, their scores and reference log-probs (no gradient), in eval
    mode. prompts: objects with .ids (list of token ids) and .text; budgets: one max-new-tokens per prompt."""
    K, amp = cfg.k, autocast or nullcontext()
    device = next(model.parameters()).device
    with eval_mode(model):
        with amp:
            completions = sample_completions(model, tokenizer, [p.ids for p in prompts], cfg.sampling, generator,
                                             k=K, budgets=budgets)
        texts = [prompts[b // K].text + response_text(c, tokenizer) for b, c in enumerate(completions)]
        scores = torch.as_tensor(scorer.score(texts), dtype=torch.float32)
        prompt_ids = [p.ids for p in prompts for _ in range(K)]
        ids, attention = tokenizer.pad([p + c for p, c in zip(prompt_ids, completions)], padding_side="right")
        response_mask = torch.zeros_like(ids, dtype=torch.bool)  # (B, T)
        for b, (p, c) in enumerate(zip(prompt_ids, completions)):
            response_mask[b, len(p):len(p) + len(c)] = True
        prompt_lens = torch.tensor([len(p) for p in prompt_ids], device=device)
        rollout = Rollout(ids.to(device), response_mask.to(device), scores.to(device), torch.zeros(0), prompt_lens,
                          int(attention.sum()), 0)  # reference_logps: scored next, by the same rows
        with amp, lora_disabled(model):
            return replace(rollout, reference_logps=policy_logps(model, rollout, cfg).float())


def make_rollout_fn(model: torch.nn.Module, tokenizer, scorer, prompts: list, cfg: RolloutConfig, grad_accum: int,
                    runtime: Runtime) -> Callable[[int, int], Rollout]:
    """get_batch(step, micro) -> this process's Rollout; a pure function of (cfg.seed, step, micro, rank) and the
    weights."""
    if not prompts:
        raise ValueError("make_rollout_fn: no training prompts")
    P, rank, world, device = cfg.prompts_per_step, runtime.rank, runtime.world, runtime.device

    def get_batch(step: int, micro: int) -> Rollout:
        slot = (step * grad_accum + micro) * world + rank
        chosen = [prompts[i] for i in stream_indices(len(prompts), slot * P, P, cfg.seed)]
        s = cfg.sampling
        budgets = LengthSampler(s.min_new_tokens, s.max_new_tokens, seed=batch_seed(cfg.seed, slot, 1)).sample(P)
        g = torch.Generator(device=device).manual_seed(batch_seed(cfg.seed, slot, 2))
        return replace(sample_rollout(model, tokenizer, scorer, chosen, cfg, budgets, g, runtime.autocast), micro=micro)
    return get_batch
