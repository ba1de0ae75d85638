"""
The batches of the offline preference pairs, shared by every method that trains on them: DPO, the paper's
baselines, ORPO and the learned reward model. Every method sees the same pairs, order and steps (Rafailov et al.
2023, sec. 6.1 and Figure 2), and only the loss differs.
"""

from dataclasses import dataclass
from typing import Callable

from minidpo.config import require
from minidpo.dataset.batching import PairData, collate_pairs, collate_unique, stream_indices
from minidpo.methods.logprobs import LOGPROBS
from minidpo.model.tokenizer import EOT_ID
from minidpo.training.runtime import Runtime

BATCHING = ("unique", "pairs")


@dataclass(frozen=True)
class BatchConfig:
    mode: str = "unique"    # unique | pairs
    pairs: int = 8          # pairs per micro-batch per process (mode "pairs")
    prompts: int = 2        # whole prompts per micro-batch per process (mode "unique")
    grad_accum: int = 1
    max_length: int = 64
    pad_id: int = EOT_ID
    logprobs: str = "fused"  # fused | naive (the plain log_softmax + gather path, for reading and checking)
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.mode in BATCHING, "batching", f"must be one of {', '.join(BATCHING)}, got {self.mode!r}")
        require(self.logprobs in LOGPROBS, "logprobs", f"must be one of {', '.join(LOGPROBS)}, got {self.logprobs!r}")
        require(self.pairs >= 1, "batch_size", f"must be >= 1, got {self.pairs}")
        require(self.prompts >= 1, "batch_prompts", f"must be >= 1, got {self.prompts}")
        require(self.grad_accum >= 1, "grad_accum", f"must be >= 1, got {self.grad_accum}")

    def draws_per_step(self, world: int) -> int:
        """Items (pairs or prompt groups) one optimizer step takes over all processes."""
        return (self.prompts if self.mode == "unique" else self.pairs) * self.grad_accum * world


def make_batch_fn(data: PairData, cfg: BatchConfig, runtime: Runtime) -> Callable[[int, int], tuple]:
    """get_batch(step, micro) -> (group or pair indices, tensors on runtime.device, real tokens, pairs) for this
    process (runtime.rank): a pure function of its arguments, so a resumed run's data position is just its step."""
    if not data.train:
        raise ValueError("make_batch_fn: no training pairs")
    rank, world, device = runtime.rank, runtime.world, runtime.device

    def get_batch(step: int, micro: int):
        slot = (step * cfg.grad_accum + micro) * world + rank
        if cfg.mode == "unique":
            idx = stream_indices(len(data.groups), slot * cfg.prompts, cfg.prompts, cfg.seed)
            pairs = [data.train[i] for g in idx for i in data.groups[g]]
            batch = collate_unique(pairs, cfg.max_length, pad_id=cfg.pad_id)
            n_tokens = int(batch["attention_mask"].sum())
        else:
            idx = stream_indices(len(data.train), slot * cfg.pairs, cfg.pairs, cfg.seed)
            pairs = [data.train[i] for i in idx]
            batch = collate_pairs(pairs, cfg.max_length, pad_id=cfg.pad_id)
            n_tokens = int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())
        # counted on the CPU before the copy, so logging tokens/s costs no device sync
        return idx, {k: v.to(device, non_blocking=True) for k, v in batch.items()}, n_tokens, len(pairs)
    return get_batch

