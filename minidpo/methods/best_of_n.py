"""
Best-of-N sampling: the reference samples N completions of a prompt and the one the reward classifier scores highest
is kept. It trains nothing, so it is the yardstick for what DPO and RLOO buy on the reward-KL frontier.

References: Stiennon et al. 2020, "Learning to summarize from human feedback" (arXiv:2009.01325), appendix G.3: the
KL of the best-of-N policy from the reference is log N - (N - 1) / N; Beirami et al. 2024, "Theoretical guarantees
on the best-of-n alignment policy" (arXiv:2401.01879): that number is an upper bound on the actual KL (equal when
no two samples tie), so it is reported as `kl_bound`; Gao et al. 2023, "Scaling Laws for Reward Model
Overoptimization", for best-of-N as the baseline of RL against a learned reward.

Measured like the other methods, with evaluation's sampler on the same held-out prompts. Round j draws one
completion per prompt with generator seed cfg.seed + j, so round 0 is exactly the reference sample that evaluation
scores, and the samples of best-of-n are the first n rounds of best-of-n' for every n' > n: the kept reward can only
grow with n (`best_of_n_sweep` samples max(ns) rounds once and reads every n from them).
"""

import math
from dataclasses import replace

import torch

from minidpo.methods.evaluate import EvalConfig, sample_plain
from minidpo.model.completions import response_text
from minidpo.model.lora import reference_of
from minidpo.progress import Log, quiet


def kl_bound(n: int) -> float:
    """Upper bound on KL(best-of-n || reference) in nats: log n - (n - 1) / n (0 for n = 1)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"best-of-n needs an integer n >= 1, got {n!r}")
    return math.log(n) - (n - 1) / n


def sample_rounds(model: torch.nn.Module, tokenizer, scorer, prompts: list, rounds: int, cfg: EvalConfig,
                  log: Log = quiet) -> tuple[list[list[list[int]]], torch.Tensor]:
    """`rounds` reference completions per prompt and their rewards: (ids[round][prompt], scores (rounds, P)).

    The reference is the model with its adapter disabled when it has one, else the model itself.
    """
    completions, scores = [], []
    with reference_of(model):
        for j in range(rounds):
            ids = sample_plain(model, tokenizer, prompts, replace(cfg, seed=cfg.seed + j))
            texts = [p.text + response_text(c, tokenizer) for p, c in zip(prompts, ids)]
            completions.append(ids)
            scores.append(torch.as_tensor(scorer.score(texts), dtype=torch.float32).reshape(len(prompts)))
            log(f"[best-of-n] sampled round {j + 1}/{rounds}")
    return completions, torch.stack(scores) if scores else torch.zeros(0, len(prompts))


def pick_best(completions: list[list[list[int]]], scores: torch.Tensor, n: int, tokenizer) -> dict:
    """Best of the first n rounds per prompt (the earliest on ties): reward, kl_bound, kept completions."""
    if not 1 <= n <= scores.size(0):
        raise ValueError(f"best-of-n: n must be in 1..{scores.size(0)} (the rounds sampled), got {n}")
    best_scores, best = scores[:n].max(dim=0)  # (P,) each: max returns the first index of a tie
    kept = [completions[j][i] for i, j in enumerate(best.tolist())]
    return {"n": n, "reward": float(best_scores.mean()), "kl_bound": kl_bound(n), "scores": best_scores.tolist(),
            "completions": kept, "texts": [response_text(c, tokenizer) for c in kept]}


def best_of_n(model: torch.nn.Module, tokenizer, scorer, prompts: list, n: int, cfg: EvalConfig,
              log: Log = quiet) -> dict:
    """n reference samples per prompt, keep the highest-reward one; returns {"n", "reward" (mean kept reward),
    "kl_bound", "scores", "completions" (ids), "texts"}."""
    kl_bound(n)  # checks n before any sampling
    completions, scores = sample_rounds(model, tokenizer, scorer, prompts, n, cfg, log)
    return pick_best(completions, scores, n, tokenizer)


def best_of_n_sweep(model: torch.nn.Module, tokenizer, scorer, prompts: list, ns: list[int], cfg: EvalConfig,
                    log: Log = quiet) -> list[dict]:
    """best_of_n for every n in ns from one set of max(ns) rounds (the same result as separate calls)."""
    if not ns:
        raise ValueError("best-of-n: no values of n given")
    for n in ns:
        kl_bound(n)
    completions, scores = sample_rounds(model, tokenizer, scorer, prompts, max(ns), cfg, log)
    return [pick_best(completions, scores, n, tokenizer) for n in ns]
