"""
On-policy sampling, shared by the two methods that learn from the policy's own samples: RLOO (minidpo/methods/rloo.py) and
online DPO (minidpo/methods/online_dpo.py). Both follow TRL's RLOOTrainer and OnlineDPOTrainer: each step the CURRENT policy
samples K completions per prompt and the reward model scores them. Every log-prob here is of the distribution the
samples came from (the tempered policy, end-of-text forbidden before min_new_tokens), as in TRL's RLOOTrainer; TRL
1.16's OnlineDPOTrainer instead scores its tempered samples with untempered log-probs (see minidpo/methods/online_dpo.py for
why minidpo tempers both policy and reference). Sampling and scoring run in eval mode (no LoRA dropout), as TRL
generates under model.eval(); each training step runs in train mode.

One rollout (`sample_rollout`), no gradient: the policy samples K completions per prompt from left-padded prompts,
all in one generate call up to the largest budget; each row is then cut at its prompt's budget (the same
distribution as generating with that budget: sampling is left to right; the budgets follow TRL's gpt2-sentiment
example, LengthSampler(min_new_tokens, max_new_tokens) per prompt) and at its first end-of-text, which it keeps, so
the policy also learns when to stop. The classifier scores prompt text + completion text; the reference (adapter
disabled) scores each right-padded (prompt + completion) row. The method's loss then needs only the policy's
log-probs of the same rows, with gradient (`completion_logps`).

Which log-probs. generate() forbids end-of-text before min_new_tokens, so what is sampled is pi~: the policy's
next-token distribution with end-of-text removed and renormalized at those steps (minidpo.methods.evaluate's definition).
Every log-prob here is of pi~ (and ref~ for the reference), so the samples are exactly on-policy for the log-probs
the loss uses. With log pi instead, the gradient would also push down end-of-text at steps where it can never be
sampled, spending KL on nothing.

Exact resume. A micro-batch is a pure function of (seed, step, micro, rank) and the weights: the prompts come from
a seeded stream of shuffled epochs, and the budgets and the sampling generator are seeded from those numbers.
"""

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
from torch import Tensor

from minidpo.dataset.batching import batch_seed, pair_indices
from minidpo.config import require
from minidpo.methods.evaluate import sampler_logits
from minidpo.dataset.length_sampler import LengthSampler
from minidpo.methods.fused_logprobs import linear_token_logprobs, token_logprobs
from minidpo.methods.logprobs import LOGPROBS, naive_token_logps
from minidpo.model.generate import generate
from minidpo.model.lora import adapters_are_zero, lora_disabled, lora_layers
from minidpo.dataset.pairs import cut_at_eot, response_text
from minidpo.model.tokenizer import EOT_ID
from minidpo.training.trainer import trainable_parameters

MIN_TEMPERATURE = 0.05  # the lowest rollout temperature: the tiny preset trains with finite losses down to it


@dataclass(frozen=True)
class RolloutConfig:
    k: int = 4                      # completions per prompt (both methods compare a prompt's samples: K >= 2)
    prompts_per_step: int = 8       # prompts per micro-batch per process
    min_new_tokens: int = 4         # end-of-text is forbidden before this many new tokens
    max_new_tokens: int = 16        # each prompt's budget is drawn from [min_new_tokens, max_new_tokens]
    temperature: float = 1.0        # sampling temperature; log-probs (and the KL) are of the tempered distributions
    top_k: int | None = None        # top-k of the training samples (None: full softmax; k: off-policy)
    logprobs: str = "fused"         # fused (response rows only, memory-lean) | naive (log_softmax + gather)
    eot_id: int = EOT_ID
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.k >= 2, "k", f"must be >= 2 (each prompt's samples are compared with each other), got {self.k}")
        require(self.prompts_per_step >= 1, "prompts_per_step", f"must be >= 1, got {self.prompts_per_step}")
        require(self.min_new_tokens >= 1, "min_new_tokens", f"must be >= 1, got {self.min_new_tokens}")
        require(self.max_new_tokens >= self.min_new_tokens, "max_new_tokens",
                f"must be >= min_new_tokens ({self.min_new_tokens}), got {self.max_new_tokens}")
        require(math.isfinite(self.temperature) and self.temperature >= MIN_TEMPERATURE, "temperature",
                f"must be a finite number >= {MIN_TEMPERATURE:g} (on-policy methods need a stochastic policy, and "
                f"the tempered log-ratios grow as 1 / T: the loss became NaN at 0.01), got {self.temperature}")
        require(self.top_k is None or self.top_k >= 1, "top_k", f"must be none or >= 1, got {self.top_k}")
        require(self.logprobs in LOGPROBS, "logprobs", f"must be one of {', '.join(LOGPROBS)}, got {self.logprobs!r}")


# below this, materializing the response logits beats recomputing them in backward (one head matmul fewer)
SMALL_LOGITS_BYTES = 256 * 2**20


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


def completion_logps(model: torch.nn.Module, ids: Tensor, response_mask: Tensor, prompt_lens: Tensor,
                     cfg: RolloutConfig) -> Tensor:
    """(B,) log pi~(y|x) of right-padded prompt + completion rows, pi~ being what generate() samples from: the
    model's next-token distribution with end-of-text removed (the rest renormalized) before min_new_tokens.

    Naive equivalent (cfg.logprobs "naive"): log_softmax(evaluate.sampler_logits(model(ids)))[next token], summed
    over the completion. "fused" scores only completion positions and holds their (M, V) logits only when they fit
    in SMALL_LOGITS_BYTES (their gradient then reuses their storage; larger ones are recomputed chunk by chunk in
    backward, as dpo.score_sequences does). At a step where end-of-text is forbidden, log pi~(y) = logit(y) -
    logsumexp over the vocabulary without end-of-text: the same kernels over the head without its end-of-text row.
    Never log pi(y) - log(1 - pi(eot)) from a difference: when 1 - pi(eot) is ~1e-7 that difference is lost to fp32
    rounding (and reaches log 0 = +inf in the sum).
    """
    B, T = ids.shape
    targets, keep = ids[:, 1:], response_mask[:, 1:] != 0                  # (B, T-1): position t-1 predicts t
    steps = torch.arange(1, T, device=ids.device) - prompt_lens[:, None]   # (B, T-1): generated step of each target
    if cfg.logprobs == "naive":  # plain causal attention is exact for right-padded rows
        logits = sampler_logits(model(ids)[:, :-1] / cfg.temperature, steps, cfg.eot_id, cfg.min_new_tokens)
        return torch.where(keep, naive_token_logps(logits, targets), 0.0).sum(-1)
    W = model.lm_head.weight                                               # (V, C), GPT-2's tied head, no bias
    rows = keep.reshape(-1).nonzero().squeeze(1)                           # (M,) flat completion positions
    h = model.hidden_states(ids[:, :-1]).reshape(B * (T - 1), -1)[rows]    # (M, C)
    if cfg.temperature != 1.0:
        h = h / cfg.temperature                                            # logits / T = (h / T) @ W.T
    y = targets.reshape(-1)[rows]                                          # (M,)
    forbidden = steps.reshape(-1)[rows] < cfg.min_new_tokens               # (M,) eot was masked at these
    f, a = forbidden.nonzero().squeeze(1), (~forbidden).nonzero().squeeze(1)
    # the head without end-of-text (a view when it is the last token, as GPT-2's is); y there is never eot
    W_no_eot = W[:-1] if cfg.eot_id == W.size(0) - 1 else torch.cat([W[:cfg.eot_id], W[cfg.eot_id + 1:]])  # (V-1, C)
    y_f = y[f] - (y[f] > cfg.eot_id).long()                                # (Mf,) ids in W_no_eot
    logp_f, logp_a = head_logprobs(h[f], W_no_eot, y_f), head_logprobs(h[a], W, y[a])
    dtype = torch.promote_types(torch.promote_types(logp_f.dtype, logp_a.dtype), torch.float32)
    logp = torch.zeros(rows.numel(), dtype=dtype, device=ids.device)
    logp = logp.index_copy(0, f, logp_f.to(dtype)).index_copy(0, a, logp_a.to(dtype))  # (M,)
    return torch.zeros(B, dtype=logp.dtype, device=ids.device).index_add(0, rows // (T - 1), logp)


def head_logprobs(h: Tensor, W: Tensor, y: Tensor) -> Tensor:
    """(M,) log softmax(h @ W.T)[y]: one (M, V) buffer when it fits in SMALL_LOGITS_BYTES, else never built."""
    if h.size(0) == 0:
        return h.new_zeros(0)
    if h.size(0) * W.size(0) * h.element_size() <= SMALL_LOGITS_BYTES:
        return token_logprobs(h @ W.t(), y, inplace_backward=True)
    return linear_token_logprobs(h, W, y)


@torch.no_grad()
def sample_rollout(model: torch.nn.Module, tokenizer, scorer, prompts: list, cfg: RolloutConfig, budgets: list[int],
                   generator: torch.Generator, device: torch.device, micro: int = 0,
                   autocast: ContextManager | None = None) -> Rollout:
    """K completions per prompt from the current policy, their scores and reference log-probs (no gradient).

    prompts: objects with .ids (list of token ids) and .text; budgets: one max-new-tokens per prompt.
    """
    K, amp = cfg.k, autocast or nullcontext()
    was_training = model.training
    model.eval()  # sampling and scoring see no dropout, as TRL generates under model.eval(); training steps turn it on
    try:
        return _sample_rollout(model, tokenizer, scorer, prompts, cfg, budgets, generator, device, micro, amp, K)
    finally:
        model.train(was_training)


def _sample_rollout(model: torch.nn.Module, tokenizer, scorer, prompts: list, cfg: RolloutConfig, budgets: list[int],
                    generator: torch.Generator, device: torch.device, micro: int, amp: ContextManager,
                    K: int) -> Rollout:
    prompt_ids = [p.ids for p in prompts for _ in range(K)]
    idx, mask = tokenizer.pad(prompt_ids, padding_side="left")  # (P*K, Tp)
    with amp:
        seqs = generate(model, idx.to(device), max(budgets), min_new_tokens=cfg.min_new_tokens,
                              temperature=cfg.temperature, top_k=cfg.top_k, eos_id=cfg.eot_id,
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
    prompt_lens = torch.tensor([len(p) for p in prompt_ids], device=device)
    with amp, lora_disabled(model):
        reference = completion_logps(model, ids, response_mask, prompt_lens, cfg).float()
    return Rollout(ids, response_mask, scores.to(device), reference, prompt_lens, int(attention.sum()), micro)


def make_rollout_fn(model: torch.nn.Module, tokenizer, scorer, prompts: list, cfg: RolloutConfig, grad_accum: int,
                    rank: int, world: int, device: torch.device,
                    autocast: ContextManager | None = None) -> Callable[[int, int], Rollout]:
    """get_batch(step, micro) -> this process's Rollout; a pure function of (cfg.seed, step, micro, rank) and the
    weights."""
    P = cfg.prompts_per_step

    def get_batch(step: int, micro: int) -> Rollout:
        slot = (step * grad_accum + micro) * world + rank
        chosen = [prompts[i] for i in pair_indices(len(prompts), slot * P, P, cfg.seed)]
        budgets = LengthSampler(cfg.min_new_tokens, cfg.max_new_tokens, seed=batch_seed(cfg.seed, slot, 1)).sample(P)
        g = torch.Generator(device=device).manual_seed(batch_seed(cfg.seed, slot, 2))
        return sample_rollout(model, tokenizer, scorer, chosen, cfg, budgets, g, device, micro, autocast)
    return get_batch


def trainable_adapter(model: torch.nn.Module, prompts: list, who: str) -> dict[str, torch.nn.Parameter]:
    """The parameters an on-policy run trains, after checking that it can start: prompts to sample, and a fresh
    LoRA adapter (B = 0), so that the reference (the adapter disabled) is the starting policy."""
    if not prompts:
        raise ValueError(f"{who}: no training prompts")
    if not lora_layers(model):
        raise ValueError(f"{who}: the model has no LoRA adapter; apply_lora first (the reference is the model with "
                         "its adapter disabled)")
    if not adapters_are_zero(model):
        raise RuntimeError(f"{who}: a new LoRA adapter must start at B = 0, so that the reference is the starting "
                           "policy")
    return trainable_parameters(model)
