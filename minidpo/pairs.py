"""
Preference pairs for the IMDb controlled-sentiment experiment, and the batches DPO trains on.

Reference: Rafailov et al. 2023, "Direct Preference Optimization" (arXiv:2305.18290), sec. 6.1 and appendix C.1:
prompts are prefixes of 2-8 tokens of IMDb reviews; the reference policy samples 4 completions per prompt; a
sentiment classifier scores them; every two completions with different scores give one (chosen = higher score,
rejected = lower) pair, so 6 pairs per prompt. Default completion lengths (4-16 new tokens) follow TRL's
gpt2-sentiment notebook (`output_length_sampler = LengthSampler(4, 16)`), the setup that experiment built on.

Two modes (PairsConfig.mode):
- "generated", the paper's. Each generate call holds whole prompts (all n completions of a prompt share a call) and
  draws one response budget L ~ LengthSampler(min_new_tokens, max_new_tokens) (length_per_batch=True), so lengths
  vary over the dataset but the completions that get compared have the same budget and the classifier cannot
  simply prefer the longer one. End-of-text is forbidden before min_new_tokens, so a completion has
  min_new_tokens..L tokens before its eot. A completion ends at its first eot: the text excludes it, the ids KEEP
  it, so DPO also learns where to stop. The classifier scores prompt + completion (it saw full reviews).
- "labels", no model or classifier: prompt = first k tokens of a review; chosen = tokens k..k+m-1 of a random
  positive review, rejected = the same token range of a random negative one (same m for both, m ~
  LengthSampler(min_new, max_new)), drawn from the prompt's own split so held-out pairs never reuse training text.
  Starting at offset k makes the continuation look like what follows a k-token prefix (mid-review, no capital
  letter); it is not a fluent continuation of THIS prompt, so this mode teaches sentiment, not coherence.
  Scores are the labels: 1.0 chosen, 0.0 rejected.

A pairs file is JSONL: a header {"format", "fingerprint", "n_pairs"}, then one Pair per line. The fingerprint is the
sha256 of a canonical JSON of every input (config, prompt ids, model, classifier and data identities);
`cached_pairs` rebuilds when it differs. Writes are atomic (temporary file + os.replace).

Batches: `fit_pairs` drops, once per dataset, pairs that cannot fit max_length with a non-empty response (the
prompt alone has >= max_length tokens) and reports them in one warning; `collate_pairs` then only truncates
responses from the right and pads, with no side effects. Response masks are over id positions: minidpo.dpo shifts
them to score token t with the logits at t - 1.
"""

import hashlib
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from minidpo.length_sampler import PROMPT_MAX_TOKENS, PROMPT_MIN_TOKENS, LengthSampler

FORMAT = "minidpo-pairs/1"
MODES = ("generated", "labels")
PAIRINGS = ("all", "best_vs_worst")
EOT_ID = 50256
SIDES = ("chosen", "rejected")
Scorer = Callable[[list[str]], Sequence[float]]  # or an object with .score(texts), e.g. reward.SentimentClassifier


@dataclass
class Prompt:
    ids: list[int]
    text: str
    split: str = "train"  # split of the source review: "test" prompts are for held-out evaluation
    review: str = ""      # "train/pos/123": where it was cut from


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
    mode: str = "generated"
    n_completions: int = 4           # per prompt (generated mode)
    pairing: str = "all"             # "all": every distinct-score pair; "best_vs_worst": one per prompt
    min_new_tokens: int = 4
    max_new_tokens: int = 16
    length_per_batch: bool = True    # draw each generate call's budget from [min, max]; False: always max
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    batch_size: int = 64             # sequences per generate / scoring call; results depend on it (RNG order)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"PairsConfig: mode must be one of {MODES}, got {self.mode!r}")
        if self.pairing not in PAIRINGS:
            raise ValueError(f"PairsConfig: pairing must be one of {PAIRINGS}, got {self.pairing!r}")
        if not 1 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"PairsConfig: need 1 <= min_new_tokens <= max_new_tokens, got "
                             f"{self.min_new_tokens}, {self.max_new_tokens}")
        if self.n_completions < 2 or self.batch_size < 1 or self.temperature < 0:
            raise ValueError(f"PairsConfig: need n_completions >= 2, batch_size >= 1, temperature >= 0; got "
                             f"{self.n_completions}, {self.batch_size}, {self.temperature}")


# -----------------------------------------------------------------------------
# prompts


def review_name(review: Any) -> str:
    return f"{review.split}/{review.label}/{review.id}"


def make_prompts(reviews: Sequence[Any], tokenizer: Any, n: int | None = None, min_len: int = PROMPT_MIN_TOKENS,
                 max_len: int = PROMPT_MAX_TOKENS, seed: int = 0) -> list[Prompt]:
    """n prompts, each the first k tokens of a distinct review, k ~ LengthSampler(min_len, max_len, seed).

    Reviews are visited in a seeded random order; one with no token after its k-th is skipped. n=None: all.
    """
    n = len(reviews) if n is None else n
    order = list(range(len(reviews)))
    random.Random(f"prompts/{seed}").shuffle(order)  # a stream of its own, not the length sampler's
    lengths = LengthSampler(min_len, max_len, seed=seed)
    prompts: list[Prompt] = []
    for i in order:
        if len(prompts) == n:
            break
        k, ids = lengths(), tokenizer.encode(reviews[i].text)
        if len(ids) > k:
            prompts.append(Prompt(ids[:k], tokenizer.decode(ids[:k]), reviews[i].split, review_name(reviews[i])))
    if len(prompts) < n:
        raise ValueError(f"make_prompts: asked for n={n} prompts but only {len(prompts)} of the {len(reviews)} "
                         f"reviews are longer than their {min_len}-{max_len} token prefix")
    return prompts


# -----------------------------------------------------------------------------
# generated mode: sample, score, rank


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


def cut_at_eot(ids: list[int], eot_id: int = EOT_ID) -> list[int]:
    """Tokens up to AND including the first eot. Naive: ids[:ids.index(eot) + 1] if eot in ids else ids."""
    return ids[:ids.index(eot_id) + 1] if eot_id in ids else ids


def response_text(ids: list[int], tokenizer: Any) -> str:
    return tokenizer.decode(ids[:-1] if ids and ids[-1] == tokenizer.eot_id else ids)


def _log(progress: bool, what: str, done: int, total: int, t0: float) -> None:
    if progress:
        print(f"pairs: {what} {done}/{total} ({time.time() - t0:.0f}s elapsed)", file=sys.stderr, flush=True)


@torch.no_grad()
def generate_completions(model: nn.Module, tokenizer: Any, prompts: Sequence[Prompt], cfg: PairsConfig,
                         progress: bool = True, log_every: int = 10) -> list[list[list[int]]]:
    """cfg.n_completions response id lists per prompt, sampled with the KV cache from left-padded batches."""
    n = cfg.n_completions
    per_call = max(1, cfg.batch_size // n)  # whole prompts per call, so compared completions share a budget
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    budgets = LengthSampler(cfg.min_new_tokens, cfg.max_new_tokens, seed=cfg.seed)
    n_calls, t0 = math.ceil(len(prompts) / per_call), time.time()
    was_training = model.training
    model.eval()
    out: list[list[list[int]]] = []
    try:
        for call, start in enumerate(range(0, len(prompts), per_call)):
            chunk = prompts[start:start + per_call]
            ids, mask = tokenizer.pad([p.ids for p in chunk for _ in range(n)], padding_side="left")  # (B, T)
            budget = budgets() if cfg.length_per_batch else cfg.max_new_tokens
            seqs = model.generate(ids.to(device), max_new_tokens=budget, min_new_tokens=cfg.min_new_tokens,
                                  temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                                  eos_id=tokenizer.eot_id, attention_mask=mask.to(device), generator=generator,
                                  use_cache=True)                           # (B, T + <=budget)
            new = [cut_at_eot(row, tokenizer.eot_id) for row in seqs[:, ids.size(1):].tolist()]
            out.extend(new[i * n:(i + 1) * n] for i in range(len(chunk)))
            if (call + 1) % log_every == 0 or call + 1 == n_calls:
                _log(progress, "generated prompts", len(out), len(prompts), t0)
    finally:
        model.train(was_training)
    return out


def score_texts(scorer: Scorer | Any, texts: list[str]) -> list[float]:
    """Call a scorer function or an object's .score, and check it returned one finite float per text."""
    scores = getattr(scorer, "score", scorer)(texts)
    scores = scores.tolist() if isinstance(scores, Tensor) else [float(s) for s in scores]
    if len(scores) != len(texts) or not all(math.isfinite(s) for s in scores):
        raise ValueError(f"scorer must return one finite score per text: got {len(scores)} scores for "
                         f"{len(texts)} texts, first ones {scores[:4]}")
    return scores


def build_pairs(cfg: PairsConfig, prompts: Sequence[Prompt], tokenizer: Any, model: nn.Module | None = None,
                scorer: Scorer | Any = None, reviews: Sequence[Any] | None = None,
                progress: bool = True) -> list[Pair]:
    """Pairs for every prompt, in prompt order. generated mode needs model and scorer; labels mode, reviews."""
    if cfg.mode == "labels":
        if reviews is None:
            raise ValueError("build_pairs: mode 'labels' needs reviews= (the pool of pos/neg continuations)")
        return label_pairs(cfg, prompts, tokenizer, reviews)
    if model is None or scorer is None:
        raise ValueError("build_pairs: mode 'generated' needs model= (the reference policy) and scorer= "
                         "(e.g. a reward.SentimentClassifier)")
    completions = generate_completions(model, tokenizer, prompts, cfg, progress)
    texts = [[response_text(c, tokenizer) for c in comps] for comps in completions]
    flat = [p.text + t for p, ts in zip(prompts, texts) for t in ts]  # the classifier sees the whole review
    t0, scores = time.time(), []
    for call, start in enumerate(range(0, len(flat), cfg.batch_size)):
        scores += score_texts(scorer, flat[start:start + cfg.batch_size])
        _log(progress and ((call + 1) % 10 == 0 or len(scores) == len(flat)), "scored", len(scores), len(flat), t0)
    pairs, n = [], cfg.n_completions
    for q, (p, comps, ts) in enumerate(zip(prompts, completions, texts)):
        s = scores[q * n:(q + 1) * n]
        for i, j in preference_pairs(s, cfg.pairing):
            pairs.append(Pair(p.text, ts[i], ts[j], p.ids, comps[i], comps[j], s[i], s[j], p.split))
    return pairs


# -----------------------------------------------------------------------------
# labels mode


def label_pairs(cfg: PairsConfig, prompts: Sequence[Prompt], tokenizer: Any, reviews: Sequence[Any]) -> list[Pair]:
    """Chosen/rejected = the same token range k..k+m-1 of a random pos/neg review of the prompt's split."""
    pools: dict[tuple[str, str], list[tuple[str, list[int]]]] = {}
    for r, ids in zip(reviews, tokenizer.encode_batch([r.text for r in reviews])):
        pools.setdefault((r.split, r.label), []).append((review_name(r), ids))
    rng = random.Random(f"labels/{cfg.seed}")
    lengths = LengthSampler(cfg.min_new_tokens, cfg.max_new_tokens, seed=cfg.seed)
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
        warnings.warn(f"label_pairs: skipped {skipped} of {len(prompts)} prompts: no pos or neg review of their "
                      f"split with enough tokens (pass reviews of every split the prompts come from)", stacklevel=2)
    return pairs


def _draw(pool: list[tuple[str, list[int]]], rng: random.Random, min_tokens: int, exclude: str) -> list[int] | None:
    for _ in range(100 if pool else 0):  # rejection sampling: nearly every review is long enough
        name, ids = rng.choice(pool)
        if len(ids) >= min_tokens and name != exclude:
            return ids
    return None


# -----------------------------------------------------------------------------
# fingerprints, files, cache


def fingerprint(inputs: dict) -> str:
    """sha256 of the canonical JSON of `inputs` (sorted keys, no spaces, no NaN)."""
    blob = json.dumps(inputs, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def module_fingerprint(module: nn.Module, samples: int = 256) -> str:
    """A cheap identity of a model: names, shapes, dtypes and a strided sample of ~`samples` entries per tensor
    (any training step moves sampled entries; an edit to one unsampled entry would go unnoticed)."""
    h = hashlib.sha256(type(module).__name__.encode())
    for name, t in sorted(module.state_dict().items()):
        flat = t.detach().reshape(-1)  # (numel,)
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(flat[::max(1, flat.numel() // samples)].to("cpu", torch.float64).numpy().tobytes())
    return h.hexdigest()


def reviews_fingerprint(reviews: Sequence[Any]) -> str:
    return fingerprint({"reviews": [[review_name(r), r.rating, hashlib.sha256(r.text.encode()).hexdigest()]
                                    for r in reviews]})


def pairs_fingerprint(cfg: PairsConfig, prompts: Sequence[Prompt], model_id: str = "", scorer_id: str = "",
                      data_id: str = "") -> str:
    """Identity of a pairs file's inputs. The prompt ids stand for the data, prompt seed and prompt lengths."""
    return fingerprint({"format": FORMAT, "config": asdict(cfg), "prompts": [[p.split, p.ids] for p in prompts],
                        "model": model_id, "scorer": scorer_id, "data": data_id})


def save_pairs(pairs: Sequence[Pair], path: str | os.PathLike, fingerprint: str) -> None:
    """Write a header line then one JSON object per pair, atomically: a failure leaves any old file untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps({"format": FORMAT, "fingerprint": fingerprint, "n_pairs": len(pairs)}) + "\n")
            for p in pairs:
                f.write(json.dumps(asdict(p), ensure_ascii=False, allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_header(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        header = json.loads(f.readline())
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{path}: line 1 must be a header with format {FORMAT!r}, got {str(header)[:100]}")
    return header


def read_fingerprint(path: str | os.PathLike) -> str | None:
    """The fingerprint in a pairs file's header; None if the file is missing or not a pairs file."""
    try:
        return _read_header(Path(path))["fingerprint"]
    except (OSError, ValueError, KeyError):
        return None


def load_pairs(path: str | os.PathLike) -> list[Pair]:
    path = Path(path)
    header, names = _read_header(path), {f.name for f in fields(Pair)}
    pairs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if lineno == 1:
                continue
            obj = json.loads(line)
            if set(obj) != names:
                raise ValueError(f"{path}:{lineno}: expected keys {sorted(names)}, got {sorted(obj)}")
            pairs.append(Pair(**obj))
    if len(pairs) != header.get("n_pairs"):
        raise ValueError(f"{path}: header says {header.get('n_pairs')} pairs, file has {len(pairs)} (truncated?)")
    return pairs


def cached_pairs(path: str | os.PathLike, fingerprint: str, build_fn: Callable[[], list[Pair]],
                 verbose: bool = True) -> list[Pair]:
    """Load `path` if its fingerprint matches, else build_fn(), save and return it."""
    old = read_fingerprint(path)
    if old == fingerprint:
        if verbose:
            print(f"pairs: reusing {path} (inputs unchanged)", file=sys.stderr)
        return load_pairs(path)
    if verbose:
        why = "not found" if old is None else "inputs changed"
        print(f"pairs: building {path} ({why})", file=sys.stderr)
    pairs = build_fn()
    save_pairs(pairs, path, fingerprint)
    return pairs


def split_pairs(pairs: Sequence[Pair]) -> tuple[list[Pair], list[Pair]]:
    """(training pairs, held-out pairs): held out = prompts cut from test-split reviews."""
    return [p for p in pairs if p.split != "test"], [p for p in pairs if p.split == "test"]


# -----------------------------------------------------------------------------
# batches


def _fits(p: Pair, max_length: int) -> bool:
    return 1 <= len(p.prompt_ids) < max_length and len(p.chosen_ids) > 0 and len(p.rejected_ids) > 0


def fit_pairs(pairs: Sequence[Pair], max_length: int) -> tuple[list[Pair], int]:
    """(pairs that keep a non-empty response within max_length, how many were dropped); one warning per call."""
    kept = [p for p in pairs if _fits(p, max_length)]
    n_dropped = len(pairs) - len(kept)
    if n_dropped:
        warnings.warn(f"fit_pairs: dropped {n_dropped} of {len(pairs)} pairs with no room for a response in "
                      f"max_length={max_length} (prompt has >= max_length tokens, or a response is empty)",
                      stacklevel=2)
    return kept, n_dropped


def collate_pairs(pairs: Sequence[Pair], max_length: int, pad_id: int = EOT_ID) -> dict[str, Tensor]:
    """Right-padded (B, T) long tensors for dpo.concatenated_forward; T = the longest sequence after truncation
    (<= max_length), shared by both sides. Pairs must pass fit_pairs. Naive equivalent per row and side:
    seq = prompt + response[:max_length - len(prompt)]; ids = seq + [pad_id] * (T - len(seq));
    attention_mask = [1] * len(seq) + [0] * (T - len(seq)); response_mask = 1 on seq[len(prompt):] only."""
    bad = [i for i, p in enumerate(pairs) if not _fits(p, max_length)]
    if not pairs or bad:
        raise ValueError(f"collate_pairs: got {len(pairs)} pairs, {len(bad)} of them (e.g. index {bad[:1]}) leave "
                         f"no response within max_length={max_length}; filter with fit_pairs first")
    seqs = {s: [p.prompt_ids + getattr(p, f"{s}_ids")[:max_length - len(p.prompt_ids)] for p in pairs] for s in SIDES}
    B, T = len(pairs), max(len(q) for side in seqs.values() for q in side)
    batch = {}
    for side in SIDES:
        ids = torch.full((B, T), pad_id, dtype=torch.long)  # (B, T)
        attention = torch.zeros(B, T, dtype=torch.long)     # (B, T)
        response = torch.zeros(B, T, dtype=torch.long)      # (B, T)
        for b, (p, seq) in enumerate(zip(pairs, seqs[side])):
            ids[b, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            attention[b, :len(seq)] = 1
            response[b, len(p.prompt_ids):len(seq)] = 1
        batch[f"{side}_ids"], batch[f"{side}_attention_mask"] = ids, attention
        batch[f"{side}_response_mask"] = response
    return batch
