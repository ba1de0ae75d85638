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

Which log-probs. generate() forbids end-of-text before min_new_tokens, so what is sampled is pi~: the policy's
next-token distribution with end-of-text removed and renormalized at those steps (minidpo.evaluate's definition).
Every log-prob here is of pi~ (and ref~ for the reference), so the estimator is exactly on-policy and the logged
"kl/sampled" estimates the same KL(pi~ || ref~) that evaluation reports. With log pi instead, the gradient would
also push down end-of-text at steps where it can never be sampled, spending KL on nothing.

Tuning on the tiny preset (bundled 7M model, IMDB sample, LoRA r=8 on every projection, lengths 8-16, evaluation
on 128 held-out prompts at temperature 1; one seed each, 1 thread of a shared 2-core machine). Gain = policy minus
reference reward (0.400), its standard error ~0.01-0.02:

    prompts x K       steps  lr     kl_coef  sampling     gain    KL (exact, eval)
    8 x 4             120    5e-3   0.05     T=1          +0.024   0.36
    16 x 4            100    1e-2   0.05     T=1          +0.019   0.72
    8 x 4             120    2e-2   0.05     T=1          +0.008  15.5    (noise-driven drift)
    8 x 8             100    1e-2   0.02     top-k 50     +0.111  20.8    (word salad: the unsampled tail fills up)
    8 x 8              60    1e-2   0.10     T=0.7        +0.018   0.66
    8 x 8              60    1e-2   0.05     T=0.7        +0.065   2.00
    8 x 8              80    1e-2   0.03     T=0.7        +0.146   5.31    (seed 1: +0.160 at 6.51)
    8 x 8              80    1e-2   0.02     T=0.7        +0.216   8.66

`python train.py --preset tiny --method rloo` (kl_coef 0.02) then gave reference 0.417 -> policy 0.649 at exact KL
10.2 in 2 min 20 s wall on the 2 cores (load ~2); with --kl-coef 0.03, 0.417 -> 0.530 at KL 4.8.

At temperature 1 the 7M model's next-token entropy is high (test loss 5.9 nats/token), so log pi(y|x) of a whole
completion varies by many nats between samples and the score-function estimate is mostly noise at a few thousand
samples. Sampling at T=0.7, with every log-prob of the tempered policy (still on-policy, as TRL does), cuts that
noise, and what is learned carries over to the temperature-1 evaluation.

Exact resume. A micro-batch is a pure function of (seed, step, micro, rank) and the weights: the prompts come from
a seeded stream of shuffled epochs, and the budgets and the sampling generator are seeded from those numbers. The
adaptive kl_coef is updated at the end of each optimizer step inside the step itself, and saved in the checkpoint
(train_loop's get_state / set_state), so a resumed run continues with the coefficient it had.
"""

import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, ContextManager

import torch
import torch.distributed as dist
from torch import Tensor

from minidpo.batching import pair_indices
from minidpo.evaluate import sampler_logits
from minidpo.length_sampler import LengthSampler
from minidpo.logprobs import linear_token_logprobs, naive_token_logps, token_logprobs
from minidpo.lora import adapters_are_zero, lora_disabled, lora_layers
from minidpo.pairs import cut_at_eot, response_text
from minidpo.pg import RLOO_SHOW, RLOOConfig, adaptive_kl_coef, kl_penalized_rewards, policy_gradient_loss, \
    rloo_advantages
from minidpo.progress import Log, quiet
from minidpo.sft import batch_seed
from minidpo.trainer import Checkpointer, LoopConfig, train_loop


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
                     cfg: RLOOConfig) -> Tensor:
    """(B,) log pi~(y|x) of right-padded prompt + completion rows, pi~ being what generate() samples from: the
    model's next-token distribution with end-of-text removed (the rest renormalized) before min_new_tokens.

    Naive equivalent (cfg.logprobs "naive"): log_softmax(evaluate.sampler_logits(model(ids)))[next token], summed
    over the completion. "fused" scores only completion positions, holds their (M, V) logits only when they fit in
    SMALL_LOGITS_BYTES (their gradient then reuses their storage; larger ones are recomputed chunk by chunk in
    backward, as dpo.score_sequences does) and renormalizes with log pi~(y) = log pi(y) - log(1 - pi(eot)), where
    log pi(eot) = logit(eot) - logit(y) + log pi(y) needs two dot products, not another pass over the vocabulary.
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
    if h.size(0) * W.size(0) * h.element_size() <= SMALL_LOGITS_BYTES:  # one (M, V) buffer: no recompute
        logp = token_logprobs(h @ W.t(), y, inplace_backward=True)         # (M,) log pi(y)
    else:                                                                  # never holds (M, V)
        logp = linear_token_logprobs(h, W, y)
    forbidden = steps.reshape(-1)[rows] < cfg.min_new_tokens               # (M,) eot was masked at these
    hf, Wf = h.float(), W.float()
    log_eot = (hf * Wf[cfg.eot_id]).sum(-1) - (hf * Wf[y]).sum(-1) + logp  # (M,) log pi(eot)
    log_eot = torch.where(forbidden, log_eot, -30.0)  # elsewhere unused; keeps log(0) out of the gradient
    logp = logp - torch.where(forbidden, torch.log(-torch.expm1(log_eot)), 0.0)  # log(1 - pi(eot))
    return torch.zeros(B, dtype=logp.dtype, device=ids.device).index_add(0, rows // (T - 1), logp)


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


def rloo_loss(model: torch.nn.Module, rollout: Rollout, cfg: RLOOConfig, kl_coef: float,
              autocast: ContextManager | None = None) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """The RLOO surrogate loss of one rollout, its metrics (0-dim tensors) and the (P*K,) sampled log-ratios
    log pi(y|x) - log ref(y|x), whose mean estimates KL(policy || reference)."""
    with autocast or nullcontext():
        policy = completion_logps(model, rollout.ids, rollout.response_mask, rollout.prompt_lens, cfg).float()  # (B,)
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


def make_rollout_fn(model: torch.nn.Module, tokenizer, scorer, prompts: list, cfg: RLOOConfig, grad_accum: int,
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
    loop = replace(loop, show=RLOO_SHOW, item_name="completions", label=f"rloo kl_coef={cfg.kl_coef:g}")
    summary = train_loop(loop, params, get_batch, step_fn,
                         Checkpointer(run_dir / "checkpoint", params), run_dir / "log.jsonl", on_step_end,
                         resume=resume, log=log, get_state=kl.state, set_state=kl.load)
    return {**summary, "kl_coef": kl.value, "seconds": time.perf_counter() - t0}
