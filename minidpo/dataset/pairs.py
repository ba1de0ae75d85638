"""
Preference pairs for the IMDb controlled-sentiment experiment: sample completions, score them, rank them.

Reference: Rafailov et al. 2023, "Direct Preference Optimization" (arXiv:2305.18290), sec. 6.1 and appendix C.1:
prompts are prefixes of 2-8 tokens of IMDb reviews (minidpo.dataset.prompts); the reference policy samples 4 completions
per prompt; a sentiment classifier scores them; every two completions with different scores give one (chosen =
higher score, rejected = lower) pair, so 6 pairs per prompt. Default completion lengths (4-16 new tokens) follow
TRL's gpt2-sentiment notebook (`output_length_sampler = LengthSampler(4, 16)`), the setup that experiment built on.

Two modes (PairsConfig.mode):
- "generated", the paper's. All n completions of a prompt share a generate call and one response budget
  L ~ LengthSampler(min_new_tokens, max_new_tokens), so the completions compared have the same budget and the
  classifier cannot simply prefer the longer one. A completion ends at its first eot: the text excludes it, the ids
  KEEP it, so DPO also learns where to stop. The classifier scores prompt + completion (it saw full reviews).
- "labels", no model or classifier: prompt = first k tokens of a review; chosen = tokens k..k+m-1 of a random
  positive review, rejected = the same token range of a random negative one, drawn from the prompt's own split so
  held-out pairs never reuse training text. This mode teaches sentiment, not coherence. Scores are the labels.

A pair whose two completions are the same tokens is dropped (it trains at loss ln 2 with zero gradient).
"""

import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from minidpo.config import require
from minidpo.dataset.length_sampler import LengthSampler
from minidpo.dataset.prompts import Prompt, review_name
from minidpo.model.completions import response_text, sample_completions
from minidpo.model.generate import SamplingConfig
from minidpo.progress import Log, ProgressLine, quiet

MODES = ("generated", "labels")
PAIRINGS = ("all", "best_vs_worst")
Scorer = Callable[[list[str]], Sequence[float]]  # or an object with .score(texts), e.g. reward.SentimentClassifier


@dataclass
class Pair:
    prompt: str
    chosen: str
    rejected: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    chosen_score: float
    rejected_score: float
    split: str = "train"


@dataclass(frozen=True)
class PairsConfig:
    sampling: SamplingConfig = SamplingConfig(min_new_tokens=4, max_new_tokens=16)  # the reference's sampler
    mode: str = "generated"
    n_completions: int = 4           # per prompt (generated mode)
    pairing: str = "all"             # "all": every distinct-score pair; "best_vs_worst": one per prompt
    min_margin: float = 0.0          # drop training pairs whose two scores differ by less (near ties)
    length_per_batch: bool = True    # draw each generate call's budget from [min, max]; False: always max
    batch_size: int = 64             # sequences per generate / scoring call; results depend on it (RNG order)
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.mode in MODES, "mode", f"must be one of {MODES}, got {self.mode!r}")
        require(self.pairing in PAIRINGS, "pairing", f"must be one of {PAIRINGS}, got {self.pairing!r}")
        require(self.n_completions >= 2, "n_completions", f"must be >= 2 to form a pair, got {self.n_completions}")
        require(self.sampling.min_new_tokens >= 1, "min_new_tokens",
                f"must be >= 1, got {self.sampling.min_new_tokens}")
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        require(0.0 <= self.min_margin < 1.0, "min_margin",
                f"must be in [0, 1) (scores are P(positive)), got {self.min_margin}")


def preference_pairs(scores: Sequence[float], pairing: str = "all") -> list[tuple[int, int]]:
    """(chosen index, rejected index) among one prompt's completions; equal scores never form a pair.

    Naive equivalent of "all": [(i, j) if s[i] > s[j] else (j, i) for i < j if s[i] != s[j]];
    "best_vs_worst": [(argmax s, argmin s)] unless every score is equal.
    """
    if pairing == "best_vs_worst":
        best = max(range(len(scores)), key=lambda i: scores[i])
        worst = min(range(len(scores)), key=lambda i: scores[i])
        return [(best, worst)] if scores[best] > scores[worst] else []
    if pairing != "all":
        raise ValueError(f"preference_pairs: pairing must be one of {PAIRINGS}, got {pairing!r}")
    out = []
    for i in range(len(scores)):
        for j in range(i + 1, len(scores)):
            if scores[i] != scores[j]:
                out.append((i, j) if scores[i] > scores[j] else (j, i))
    return out


def generate_completions(model: nn.Module, tokenizer: Any, prompts: Sequence[Prompt], cfg: PairsConfig,
                         log: Log = quiet) -> list[list[list[int]]]:
    """cfg.n_completions response id lists per prompt from the one sampler (minidpo.model.completions), whole
    prompts per call so that compared completions share a budget, one generator seeded with cfg.seed."""
    n, s = cfg.n_completions, cfg.sampling
    per_call = max(1, cfg.batch_size // n)
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(cfg.seed)
    budgets = LengthSampler(s.min_new_tokens, s.max_new_tokens, seed=cfg.seed)
    progress = ProgressLine("pairs: generated prompts", log)
    out: list[list[list[int]]] = []
    for start in range(0, len(prompts), per_call):
        chunk = prompts[start:start + per_call]
        budget = budgets() if cfg.length_per_batch else s.max_new_tokens
        new = sample_completions(model, tokenizer, [p.ids for p in chunk], s, generator, k=n,
                                 budgets=[budget] * len(chunk))
        out.extend(new[i * n:(i + 1) * n] for i in range(len(chunk)))
        progress.update(len(out), len(prompts))
    return out


def score_texts(scorer: Scorer | Any, texts: list[str]) -> list[float]:
    """Call a scorer function or an object's .score, and check it returned one finite float per text."""
    scores = getattr(scorer, "score", scorer)(texts)
    scores = scores.tolist() if isinstance(scores, Tensor) else [float(s) for s in scores]
    if len(scores) != len(texts) or not all(math.isfinite(s) for s in scores):
        raise ValueError(f"scorer must return one finite score per text: got {len(scores)} scores for "
                         f"{len(texts)} texts, first ones {scores[:4]}")
    return scores


def score_all(scorer: Scorer | Any, texts: list[str], batch_size: int, log: Log = quiet) -> list[float]:
    """score_texts over batches of batch_size texts. Naive equivalent: score_texts(scorer, texts)."""
    progress, scores = ProgressLine("pairs: scored", log), []
    for start in range(0, len(texts), batch_size):
        scores += score_texts(scorer, texts[start:start + batch_size])
        progress.update(len(scores), len(texts))
    return scores


def build_pairs(cfg: PairsConfig, prompts: Sequence[Prompt], tokenizer: Any, model: nn.Module | None = None,
                scorer: Scorer | Any = None, reviews: Sequence[Any] | None = None, log: Log = quiet) -> list[Pair]:
    """Pairs for every prompt, in prompt order. generated mode needs model and scorer; labels mode, reviews.

    Pairs whose two completions are the same tokens (a scorer that is not a pure function of the text, or two
    reviews that share a token range) are dropped, and how many is reported through `log`.
    """
    if cfg.mode == "labels":
        if reviews is None:
            raise ValueError("build_pairs: mode 'labels' needs reviews= (the pool of pos/neg continuations)")
        pairs = label_pairs(cfg, prompts, tokenizer, reviews, log)
    else:
        if model is None or scorer is None:
            raise ValueError("build_pairs: mode 'generated' needs model= (the reference policy) and scorer= "
                             "(e.g. a reward.SentimentClassifier)")
        pairs = generated_pairs(cfg, prompts, tokenizer, model, scorer, log)
    kept = [p for p in pairs if p.chosen_ids != p.rejected_ids]
    if len(kept) < len(pairs):
        log(f"pairs: dropped {len(pairs) - len(kept)} of {len(pairs)} pairs whose chosen and rejected completions are "
            f"the same tokens (they would train at loss ln 2 with zero gradient)")
    return kept


def generated_pairs(cfg: PairsConfig, prompts: Sequence[Prompt], tokenizer: Any, model: nn.Module,
                    scorer: Scorer | Any, log: Log = quiet) -> list[Pair]:
    """Sample cfg.n_completions per prompt, score prompt + completion, pair them by cfg.pairing. A training pair
    whose scores differ by less than cfg.min_margin is dropped (a near tie is mostly the classifier's noise);
    held-out pairs are all kept, so that the implicit reward's accuracy means the same whatever the margin."""
    completions = generate_completions(model, tokenizer, prompts, cfg, log)
    texts = [[response_text(c, tokenizer) for c in comps] for comps in completions]
    flat = [p.text + t for p, ts in zip(prompts, texts) for t in ts]  # the classifier sees the whole review
    scores = score_all(scorer, flat, cfg.batch_size, log)
    pairs, n = [], cfg.n_completions
    for q, (p, comps, ts) in enumerate(zip(prompts, completions, texts)):
        s = scores[q * n:(q + 1) * n]
        for i, j in preference_pairs(s, cfg.pairing):
            if p.split == "train" and s[i] - s[j] < cfg.min_margin:
                continue
            pairs.append(Pair(p.text, ts[i], ts[j], p.ids, comps[i], comps[j], s[i], s[j], p.split))
    return pairs


def label_pairs(cfg: PairsConfig, prompts: Sequence[Prompt], tokenizer: Any, reviews: Sequence[Any],
                log: Log = quiet) -> list[Pair]:
    """Chosen/rejected = the same token range k..k+m-1 of a random pos/neg review of the prompt's split."""
    pools: dict[tuple[str, str], list[tuple[str, list[int]]]] = {}
    for r, ids in zip(reviews, tokenizer.encode_batch([r.text for r in reviews])):
        pools.setdefault((r.split, r.label), []).append((review_name(r), ids))
    rng = random.Random(f"labels/{cfg.seed}")
    lengths = LengthSampler(cfg.sampling.min_new_tokens, cfg.sampling.max_new_tokens, seed=cfg.seed)
    pairs, skipped = [], 0
    for p in prompts:
        k, m = len(p.ids), lengths()
        drawn = [_draw(pools.get((p.split, label), []), rng, k + m, p.review) for label in ("pos", "neg")]
        if drawn[0] is None or drawn[1] is None:
            skipped += 1
            continue
        c, r = drawn[0][k:k + m], drawn[1][k:k + m]
        pairs.append(Pair(p.text, tokenizer.decode(c), tokenizer.decode(r), p.ids, c, r, 1.0, 0.0, p.split))
    if skipped:
        log(f"pairs: skipped {skipped} of {len(prompts)} prompts: no pos or neg review of their split with enough "
            f"tokens (pass reviews of every split the prompts come from)")
    return pairs


def _draw(pool: list[tuple[str, list[int]]], rng: random.Random, min_tokens: int, exclude: str) -> list[int] | None:
    for _ in range(100 if pool else 0):  # rejection sampling: nearly every review is long enough
        name, ids = rng.choice(pool)
        if len(ids) >= min_tokens and name != exclude:
            return ids
    return None
