"""
Supervised fine-tuning: next-token prediction on IMDB review text.

In the DPO paper's IMDb experiment (Rafailov et al. 2023, sec. 6.1) the reference policy is GPT-2 fine-tuned on IMDb
reviews, so that it writes movie reviews before DPO teaches it to write positive ones. Here that stage also trains the
bundled small model from random initialisation (see data/README.md).

Reviews are tokenized and concatenated into one stream, each preceded by end-of-text (GPT-2's document separator), and
training windows of block_size + 1 tokens are cut at random offsets, as in nanoGPT's openwebtext setup. Every
offset 0 .. len(stream) - block_size - 1 is possible, so every token of the stream, the last one included, can be
a target (nanoGPT's `randint(len(data) - block_size)` draws the same range).
"""

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from minidpo.config import require
from minidpo.dataset.batching import batch_seed
from minidpo.methods.fused_logprobs import fused_token_logps
from minidpo.model.completions import eval_mode
from minidpo.model.gpt import GPT
from minidpo.model.tokenizer import Tokenizer
from minidpo.training.runtime import Runtime
from minidpo.training.trainer import TrainRun, train_loop, trainable_parameters


def pack_texts(texts: list[str], tokenizer: Tokenizer) -> Tensor:
    """One 1-D token stream: [eot, review 1, eot, review 2, ...]; int32 halves the memory of a large corpus."""
    chunks = []
    for ids in tokenizer.encode_batch(texts):
        chunks.append(tokenizer.eot_id)
        chunks.extend(ids)
    return torch.tensor(chunks, dtype=torch.int32)


def random_windows(stream: Tensor, batch_size: int, block_size: int, seed: int) -> tuple[Tensor, Tensor]:
    """(x, y), each (B, block_size): windows at uniform random offsets; y is x shifted left by one token.

    Naive: s = random.randint(0, len(stream) - block_size - 1) (inclusive), x = stream[s:s + block_size],
    y = stream[s + 1:s + block_size + 1]; the last start puts stream[-1] in y.
    """
    if len(stream) < block_size + 1:
        raise ValueError(f"a window needs at least block_size + 1 = {block_size + 1} tokens, the stream has "
                         f"{len(stream)}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - block_size, (batch_size,), generator=g)  # high is exclusive
    windows = torch.stack([stream[s:s + block_size + 1] for s in starts.tolist()]).long()  # (B, block_size + 1)
    return windows[:, :-1], windows[:, 1:]


def lm_loss(model: GPT, x: Tensor, y: Tensor) -> Tensor:
    """Mean next-token cross-entropy; naive equivalent: F.cross_entropy(model(x).float().flatten(0, 1), y.flatten()).

    The [B, T, V] logits stay in the model's compute dtype: the fused kernel takes each row's logsumexp in fp32 and
    writes the gradient into the logits' own storage (an fp32 copy and a second [B, T, V] buffer cost more than the
    whole transformer body: bench/sft_speed.py).
    """
    logits = model(x)  # (B, T, V)
    return -fused_token_logps(logits, y, inplace_backward=logits.requires_grad).mean()


@torch.no_grad()
def eval_loss(model: GPT, stream: Tensor, block_size: int, batch_size: int = 8, max_batches: int = 20,
              device: str | torch.device = "cpu") -> float:
    """Mean loss over consecutive non-overlapping windows from the start of `stream` (deterministic)."""
    n = min(max_batches * batch_size, (len(stream) - 1) // block_size)
    if n == 0:
        raise ValueError(f"evaluation stream of {len(stream)} tokens is shorter than one block of {block_size}")
    total = 0.0
    with eval_mode(model):
        for i in range(0, n, batch_size):
            rows = range(i, min(i + batch_size, n))
            w = torch.stack([stream[r * block_size:r * block_size + block_size + 1] for r in rows]).long().to(device)
            total += lm_loss(model, w[:, :-1], w[:, 1:]).item() * len(rows)
    return total / n


@dataclass(frozen=True)
class SFTConfig:
    batch_size: int = 8      # windows per step
    block_size: int = 128    # window length
    lora: bool = True        # train a LoRA adapter (merged afterwards) instead of every weight
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.block_size >= 2, "block_size", f"must be >= 2, got {self.block_size}")


def run_sft(model: GPT, stream: Tensor, cfg: SFTConfig, run: TrainRun, runtime: Runtime) -> dict[str, float]:
    """Train every parameter that requires grad (all of them, or only LoRA's) on random windows of `stream`
    (cfg.batch_size windows of cfg.block_size tokens a step); run.run_dir: log.jsonl and sft_checkpoint/.

    `runtime.autocast` is entered anew for every step's forward, not around the loop: autocast caches its bf16 copy
    of each trained weight until the outermost region exits, so every forward would keep using the step-0 copies.
    Called inside an autocast region, run_sft refuses for that reason.
    """
    if any(torch.is_autocast_enabled(t) for t in ("cpu", "cuda")):
        raise RuntimeError("run_sft: called inside a torch.autocast region, whose weight-cast cache would freeze "
                           "the weights every forward sees; pass the context as "
                           "run_sft(..., runtime=Runtime(autocast=...))")
    model.train()
    params = trainable_parameters(model)

    def get_batch(step: int, micro: int):
        x, y = random_windows(stream, cfg.batch_size, cfg.block_size, batch_seed(cfg.seed, step, micro, runtime.rank))
        return x.to(runtime.device), y.to(runtime.device)

    def step_fn(batch):
        x, y = batch
        with runtime.autocast:
            loss = lm_loss(model, x, y)
        return loss, {}, x.numel()

    return train_loop(replace(run, checkpoint="sft_checkpoint"), params, get_batch, step_fn, log=runtime.log)
