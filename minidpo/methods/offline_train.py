"""
Training on the offline preference pairs with any loss: the part that the paper's baselines (Preferred-FT and
Unlikelihood, minidpo/methods/baselines.py) and the learned reward model (minidpo/methods/reward_model.py) share with DPO.

Reference: Rafailov et al. 2023, "Direct Preference Optimization" (arXiv:2305.18290), sec. 6.1 and Figure 2: every
method sees the same preference pairs, so the batches here are DPO's own (`minidpo.dpo_train.make_batch_fn`: the
same pairs, order and steps), and only the loss differs. The loop is minidpo.training.trainer's (AdamW, warmup + cosine,
accumulation, clipping, logging, checkpoints, exact resume).

A batch comes in one of the two layouts of minidpo.dataset.batching: "pairs" (chosen_* and rejected_* rows) or "unique"
(each distinct sequence once, with chosen_index / rejected_index per pair). `as_unique` turns the first into the
second, so a loss is written once, against the unique layout.
"""

import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from minidpo.methods.dpo import BATCH_KEYS, UNIQUE_KEYS
from minidpo.methods.dpo_train import BatchConfig, make_batch_fn
from minidpo.progress import Log, quiet
from minidpo.dataset.batching import PairData
from minidpo.training.trainer import Checkpointer, LoopConfig, train_loop


def as_unique(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """A batch in the unique layout (ids, attention_mask, response_mask (N, T); chosen_index, rejected_index (P,)).

    A unique batch is returned as is. A pairs batch (chosen_*/rejected_* (B, t)) becomes N = 2B rows, chosen rows
    first, both sides right-padded to the longer T. Naive equivalent: rows = chosen rows + rejected rows,
    chosen_index = [0..B-1], rejected_index = [B..2B-1].
    """
    if all(k in batch for k in UNIQUE_KEYS):
        return batch
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise KeyError(f"as_unique: batch lacks {missing}; expected the keys {UNIQUE_KEYS} (unique batching) or "
                       f"{BATCH_KEYS} (pairs batching)")
    B = batch["chosen_ids"].size(0)
    T = max(batch["chosen_ids"].size(1), batch["rejected_ids"].size(1))
    stack = lambda k: torch.cat([F.pad(batch[f"{s}_{k}"], (0, T - batch[f"{s}_{k}"].size(1)))  # noqa: E731
                                 for s in ("chosen", "rejected")])  # (2B, T); pad columns are masked out
    index = torch.arange(B, device=batch["chosen_ids"].device)  # (B,)
    return {"ids": stack("ids"), "attention_mask": stack("attention_mask"), "response_mask": stack("response_mask"),
            "chosen_index": index, "rejected_index": index + B}


def train_on_pairs(params: dict[str, Tensor], data: PairData, bcfg: BatchConfig, loop: LoopConfig,
                   step_fn: Callable[[tuple], tuple], run_dir: Path, settings: dict, device: torch.device,
                   rank: int = 0, world: int = 1, on_step_end: Callable[[int], None] | None = None,
                   log: Log = quiet, resume: bool = True) -> dict:
    """Train `params` with `step_fn` on DPO's batches of `data`; returns train_loop's summary plus "seconds".

    step_fn(batch) -> (loss, metrics, n_tokens, n_pairs), batch being make_batch_fn's (indices, tensors on the
    device, real tokens, pairs). Writes run_dir/log.jsonl and run_dir/checkpoint, which a rerun with the same
    `settings` resumes from (other settings are refused, naming them).
    """
    if not data.train:
        raise ValueError("train_on_pairs: no training pairs")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    get_batch = make_batch_fn(data, bcfg, rank, world, device)
    t0 = time.perf_counter()
    summary = train_loop(loop, params, get_batch, step_fn, Checkpointer(run_dir / "checkpoint", params, settings),
                         run_dir / "log.jsonl", on_step_end, resume=resume, log=log)
    return {**summary, "seconds": time.perf_counter() - t0}
