"""
Batches of preference pairs for DPO: filtering, the data order, and two collations.

Reference: Rafailov et al. 2023, "Direct Preference Optimization" (arXiv:2305.18290), eq. 7: the loss needs
log pi(y|x) of the chosen and the rejected completion of every pair, under the policy and the reference. TRL's
DPOTrainer (`concatenated_forward`) stacks chosen and rejected rows into one forward; `collate_pairs` builds
that layout. In the IMDb setup every prompt has 4 completions and 6 pairs, so each completion appears in 3 pairs:
`collate_unique` lays out each distinct (prompt, completion) sequence once, plus an index per pair, and a step
that takes whole prompts (`prompt_groups`, `group_indices`) runs 4 sequences per prompt instead of 12.

Truncation and masks: `fit_pairs` drops, once per dataset, pairs that cannot keep a non-empty response within
max_length (the prompt alone has >= max_length tokens) and reports them in one warning; the collate functions then
only truncate responses from the right and pad, with no side effects. Rows are right-padded with `pad_id`, which
must be a valid id of the model's vocabulary (the embedding still looks padded positions up, masked or not): the
default is GPT-2's end-of-text, so a model with a smaller vocabulary must pass its own. Response masks are over id
positions: minidpo.methods.dpo shifts them to score token t with the logits at t - 1.

Data order: `stream_indices` is a pure function of (start, count, seed), the items start..start +
count - 1 of an endless stream of shuffled epochs, so a resumed run's data position is just its step number.
"""

import functools
import hashlib
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from minidpo.dataset.pairs import Pair
from minidpo.model.tokenizer import EOT_ID

SIDES = ("chosen", "rejected")


@dataclass
class PairData:
    """The pairs a DPO run trains and evaluates on, after split_pairs and fit_pairs."""
    train: list[Pair]
    heldout: list[Pair]
    groups: list[list[int]]   # indices into train, one list per prompt (for --batching unique)
    fingerprint: str


def batch_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed that is a pure function of its inputs, so every batch can be rebuilt on resume."""
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def split_pairs(pairs: Sequence[Pair]) -> tuple[list[Pair], list[Pair]]:
    """(training pairs, held-out pairs): held out = prompts cut from test-split reviews."""
    return [p for p in pairs if p.split != "test"], [p for p in pairs if p.split == "test"]


def fit_pairs(pairs: Sequence[Pair], max_length: int) -> tuple[list[Pair], int]:
    """(pairs that keep a non-empty response within max_length, how many were dropped); one warning per call."""
    kept = [p for p in pairs if 1 <= len(p.prompt_ids) < max_length and p.chosen_ids and p.rejected_ids]
    n_dropped = len(pairs) - len(kept)
    if n_dropped:
        warnings.warn(f"fit_pairs: dropped {n_dropped} of {len(pairs)} pairs with no room for a response in "
                      f"max_length={max_length} (prompt has >= max_length tokens, or a response is empty)",
                      stacklevel=2)
    return kept, n_dropped


def prompt_groups(pairs: Sequence[Pair]) -> list[list[int]]:
    """Indices of the pairs of each prompt (keyed by split and prompt ids), groups in order of first appearance.

    Naive equivalent: [[i for i, p in enumerate(pairs) if (p.split, p.prompt_ids) == key] for key in unique keys].
    """
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(pairs):
        groups.setdefault((p.split, tuple(p.prompt_ids)), []).append(i)
    return list(groups.values())


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    g = torch.Generator().manual_seed(batch_seed(seed, epoch))
    return tuple(torch.randperm(n, generator=g).tolist())


def stream_indices(n: int, start: int, count: int, seed: int) -> list[int]:
    """Items start..start+count-1 of an endless stream of shuffled epochs over range(n) (pairs, or prompt groups:
    a step takes `count` whole prompts). Naive equivalent: concatenate randperm_e(n) for e = 0, 1, 2, ... (each
    epoch seeded by (seed, e)) and slice."""
    if n < 1 or start < 0 or count < 0:
        raise ValueError(f"stream_indices: need n >= 1 items, start >= 0, count >= 0; got n={n}, start={start}, "
                         f"count={count}")
    return [_epoch_order(n, seed, k // n)[k % n] for k in range(start, start + count)]


def _pad_rows(rows: list[tuple[list[int], list[int]]], max_length: int, T: int,
              pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """(ids, attention_mask, response_mask), each (N, T) long, from (prompt, completion) rows truncated to
    max_length and right-padded to T."""
    N = len(rows)
    ids = torch.full((N, T), pad_id, dtype=torch.long)  # (N, T)
    attention = torch.zeros(N, T, dtype=torch.long)     # (N, T)
    response = torch.zeros(N, T, dtype=torch.long)      # (N, T)
    for b, (prompt, completion) in enumerate(rows):
        seq = prompt + completion[:max_length - len(prompt)]
        ids[b, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention[b, :len(seq)] = 1
        response[b, len(prompt):len(seq)] = 1
    return ids, attention, response


def _length(prompt: list[int], completion: list[int], max_length: int) -> int:
    return min(len(prompt) + len(completion), max_length)


def collate_pairs(pairs: Sequence[Pair], max_length: int, *, pad_id: int = EOT_ID) -> dict[str, Tensor]:
    """Right-padded (B, T) long tensors for dpo.concatenated_forward; T = the longest sequence after truncation
    (<= max_length), shared by both sides. Pairs must pass fit_pairs; pad_id must be in the model's vocabulary.

    Naive equivalent per row and side: seq = prompt + response[:max_length - len(prompt)];
    ids = seq + [pad_id] * (T - len(seq)); attention_mask = [1] * len(seq) + [0] * (T - len(seq));
    response_mask = 1 on seq[len(prompt):] only.
    """
    T = max(_length(p.prompt_ids, getattr(p, f"{s}_ids"), max_length) for p in pairs for s in SIDES)
    batch = {}
    for side in SIDES:
        rows = [(p.prompt_ids, getattr(p, f"{side}_ids")) for p in pairs]
        ids, attention, response = _pad_rows(rows, max_length, T, pad_id)
        batch[f"{side}_ids"], batch[f"{side}_attention_mask"] = ids, attention
        batch[f"{side}_response_mask"] = response
    return batch


def unique_sequences(pairs: Sequence[Pair]) -> tuple[list[tuple[list[int], list[int]]], list[int], list[int]]:
    """(distinct (prompt ids, completion ids) rows in order of first appearance, chosen row per pair, rejected row
    per pair). Walking pairs in order, chosen before rejected, fixes the order: the rows of a batch made of whole
    prompts are the rows of each prompt's group, group after group.

    Naive equivalent: rows = dedupe([(p.prompt_ids, p.chosen_ids), (p.prompt_ids, p.rejected_ids) for p in pairs]);
    chosen = [rows.index((p.prompt_ids, p.chosen_ids)) for p in pairs], the same for rejected.
    """
    index: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
    rows: list[tuple[list[int], list[int]]] = []
    picks: dict[str, list[int]] = {s: [] for s in SIDES}
    for p in pairs:
        for side in SIDES:
            completion = getattr(p, f"{side}_ids")
            key = (tuple(p.prompt_ids), tuple(completion))
            if key not in index:
                index[key] = len(rows)
                rows.append((p.prompt_ids, completion))
            picks[side].append(index[key])
    return rows, picks["chosen"], picks["rejected"]


def collate_unique(pairs: Sequence[Pair], max_length: int, *, pad_id: int = EOT_ID) -> dict[str, Tensor]:
    """One row per distinct (prompt, completion) sequence: ids, attention_mask, response_mask (N, T), right-padded as
    in collate_pairs, and chosen_index, rejected_index (P,) into the N rows. Naive equivalent: collate_pairs, then
    keep the first copy of each repeated row and point the pairs at it.
    """
    rows, chosen, rejected = unique_sequences(pairs)
    T = max(_length(prompt, completion, max_length) for prompt, completion in rows)
    ids, attention, response = _pad_rows(rows, max_length, T, pad_id)
    return {"ids": ids, "attention_mask": attention, "response_mask": response,
            "chosen_index": torch.tensor(chosen, dtype=torch.long),    # (P,)
            "rejected_index": torch.tensor(rejected, dtype=torch.long)}  # (P,)
