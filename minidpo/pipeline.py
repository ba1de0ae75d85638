"""
The cached stages between the model and DPO training in train.py: the reward classifier, the preference pairs,
the batches, and optionally the reference log-probs.

Each stage is keyed by a fingerprint of everything it depends on and reused when that has not changed, so a resumed
run or a beta sweep never regenerates what it already has. Under torchrun, rank 0 builds a stage first and the other
ranks then read it from the cache, so every rank trains on identical pairs.
"""

import hashlib
import json
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from minidpo.download import cache_dir
from minidpo.dpo import concatenated_forward
from minidpo.pairs import (PairsConfig, build_pairs, cached_pairs, collate_pairs, fingerprint, fit_pairs,
                           make_prompts, module_fingerprint, pairs_fingerprint, reviews_fingerprint, split_pairs)
from minidpo.reward import SentimentClassifier
from minidpo.safetensors import load_file, load_metadata, save_file
from minidpo.sft import batch_seed


def rank_zero_first(build: Callable[[], object]) -> object:
    """Run `build` on rank 0, then on the others (which then hit the cache rank 0 wrote)."""
    if not dist.is_initialized():
        return build()
    result = build() if dist.get_rank() == 0 else None
    dist.barrier()
    return result if dist.get_rank() == 0 else build()


def fit_classifier(data_src: Path, train_reviews, test_reviews, say: Callable[[str], None]) -> SentimentClassifier:
    """The reward: a sentiment classifier trained on the train labels, cached under <cache>/reward/."""
    clf = SentimentClassifier()
    key = fingerprint({"reviews": reviews_fingerprint(train_reviews), "config": clf.config()})[:16]
    path = cache_dir() / "reward" / f"sentiment-{key}.safetensors"

    def build() -> SentimentClassifier:
        if path.is_file():
            say(f"[reward] reusing {path}")
            return SentimentClassifier.load(path)
        say(f"[reward] training the sentiment classifier on {len(train_reviews):,} labelled reviews")
        fitted = clf.fit([r.text for r in train_reviews], [r.label for r in train_reviews])
        path.parent.mkdir(parents=True, exist_ok=True)
        fitted.save(path)
        acc = fitted.accuracy([r.text for r in test_reviews], [r.label for r in test_reviews])
        say(f"[reward] trained in {fitted.fit_seconds:.1f} s; test accuracy {acc:.3f}; saved {path}")
        return fitted
    return rank_zero_first(build)


def build_pair_sets(cfg, model, tok, scorer, train_reviews, test_reviews, out: Path, device, amp, rank,
                    say: Callable[[str], None]) -> dict:
    """Training pairs (train prompts), held-out pairs and evaluation prompts (test prompts), all cached."""
    pcfg = PairsConfig(mode=cfg.pairs_mode, n_completions=cfg.completions_per_prompt, pairing=cfg.pairing,
                       min_new_tokens=cfg.min_new_tokens, max_new_tokens=cfg.max_new_tokens,
                       temperature=cfg.gen_temperature, top_k=cfg.gen_top_k, batch_size=cfg.gen_batch_size,
                       seed=cfg.seed)
    try:
        train_prompts = make_prompts(train_reviews, tok, cfg.num_prompts, cfg.prompt_min_tokens,
                                     cfg.prompt_max_tokens, seed=cfg.seed)
        test_prompts = make_prompts(test_reviews, tok, cfg.heldout_prompts + cfg.eval_prompts, cfg.prompt_min_tokens,
                                    cfg.prompt_max_tokens, seed=cfg.seed + 1)
    except ValueError as e:  # one prompt per review: the shipped sample has 600 train and 300 test reviews
        raise SystemExit(f"error: {e}; lower --num-prompts (train) or --heldout-prompts + --eval-prompts (test), "
                         "or use the full IMDB set (--data)") from None
    heldout_prompts, eval_prompts = test_prompts[:cfg.heldout_prompts], test_prompts[cfg.heldout_prompts:]
    prompts = train_prompts + heldout_prompts
    scorer_id = hashlib.sha256(scorer.weight.numpy().tobytes()).hexdigest()
    fp = pairs_fingerprint(pcfg, prompts, model_id=module_fingerprint(model), scorer_id=scorer_id,
                           data_id=reviews_fingerprint(train_reviews + test_reviews) if cfg.pairs_mode == "labels"
                           else "")

    def build():
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            return build_pairs(pcfg, prompts, tok, model=model, scorer=scorer,
                               reviews=train_reviews + test_reviews, progress=rank == 0)
    pairs = rank_zero_first(lambda: cached_pairs(out / "pairs.jsonl", fp, build, verbose=rank == 0))
    train, heldout = split_pairs(pairs)
    train, dropped = fit_pairs(train, cfg.max_length)
    heldout, _ = fit_pairs(heldout, cfg.max_length)
    if not train:
        raise SystemExit("error: no training pairs (every prompt's completions scored the same?); "
                         "raise --num-prompts or --completions-per-prompt")
    say(f"[pairs] {len(train):,} training pairs from {len(train_prompts)} prompts, {len(heldout)} held-out pairs, "
        f"{len(eval_prompts)} evaluation prompts")
    return {"train": train, "heldout": heldout, "eval_prompts": eval_prompts, "fingerprint": fp}


def pair_indices(n: int, start: int, count: int, seed: int) -> list[int]:
    """Items start..start+count-1 of an endless stream of shuffled epochs over range(n).

    Naive equivalent: concatenate randperm_e(n) for e = 0, 1, 2, ... (each epoch seeded by (seed, e)) and slice.
    A pure function of its arguments, so the data position of a resumed run is just its step number.
    """
    out, perms = [], {}
    for k in range(start, start + count):
        epoch = k // n
        if epoch not in perms:
            g = torch.Generator().manual_seed(batch_seed(seed, epoch))
            perms[epoch] = torch.randperm(n, generator=g).tolist()
        out.append(perms[epoch][k % n])
    return out


def make_batch_fn(pairs, cfg, rank: int, world: int,
                  device: torch.device) -> Callable[[int, int], tuple[Tensor, dict, int]]:
    """get_batch(step, micro) -> (pair indices, tensors on the device, real tokens) for this rank's share."""

    def get_batch(step: int, micro: int):
        slot = (step * cfg.grad_accum + micro) * world + rank
        idx = pair_indices(len(pairs), slot * cfg.batch_size, cfg.batch_size, cfg.seed)
        batch = collate_pairs([pairs[i] for i in idx], cfg.max_length)
        # counted on the CPU before the copy, so logging tokens/s costs no device sync
        n_tokens = int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())
        return (torch.tensor(idx, device=device),
                {k: v.to(device, non_blocking=True) for k, v in batch.items()}, n_tokens)
    return get_batch


REF_KEYS = ("chosen_logps", "rejected_logps", "chosen_logps_mean", "rejected_logps_mean")


def reference_fingerprint(model, sets: dict) -> str:
    return fingerprint({"model": module_fingerprint(model), "pairs": sets["fingerprint"],
                        "n": len(sets["train"])})


@torch.no_grad()
def precompute_reference(model, pairs, cfg, out: Path, device, amp, fp: str,
                         say: Callable[[str], None]) -> dict[str, Tensor]:
    """Reference log-probs of every training pair, from one pass before the adapter exists (so exactly the
    reference), cached in out/reference_logps.safetensors. Saves DPO the reference forward of every step."""
    path = out / "reference_logps.safetensors"

    def build() -> dict[str, Tensor]:
        if path.is_file() and load_metadata(path).get("fingerprint") == fp:
            say(f"[reference] reusing {path}")
            return load_file(path)
        say(f"[reference] precomputing log-probs of {len(pairs):,} pairs")
        cols: dict[str, list[Tensor]] = {k: [] for k in REF_KEYS}
        for i in range(0, len(pairs), cfg.batch_size):
            batch = {k: v.to(device) for k, v in collate_pairs(pairs[i:i + cfg.batch_size], cfg.max_length).items()}
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                r = concatenated_forward(model, batch)
            for k in REF_KEYS:
                cols[k].append(r[k].float().cpu())
        tensors = {k: torch.cat(v) for k, v in cols.items()}
        if not dist.is_initialized() or dist.get_rank() == 0:
            save_file(tensors, path, metadata={"fingerprint": fp, "n": json.dumps(len(pairs))})
        return tensors
    tensors = rank_zero_first(build)
    return {k: v.to(device) for k, v in tensors.items()}
