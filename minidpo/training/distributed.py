"""
Everything about ranks in one place: starting and ending the process group under torchrun, who is rank 0, waiting
for each other, building a shared artifact once, and averaging gradients.

References: PyTorch's torch.distributed and DistributedDataParallel, whose gradient all-reduce `average_gradients`
reproduces for the few trainable (LoRA) tensors: one flat buffer, one all_reduce, divide by the world size. nccl
when every process has a GPU, gloo on CPU. Without torchrun every function here is the single-process no-op.
"""

import os
from contextlib import contextmanager
from typing import Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")


def is_main() -> bool:
    """True on rank 0, and in a plain (non-distributed) run."""
    return not dist.is_initialized() or dist.get_rank() == 0


def rank_and_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when not distributed."""
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def barrier() -> None:
    """Wait until every rank gets here (nothing to wait for in a plain run)."""
    if dist.is_initialized():
        dist.barrier()


def setup_distributed(device: str = "auto") -> tuple[int, int, str | None]:
    """(rank, world size, device override) under torchrun; (0, 1, None) otherwise. nccl with one GPU per local rank
    when CUDA is available, else gloo with the CPU cores shared out between the local processes."""
    world = _env_int("WORLD_SIZE", 1)
    if world == 1:
        return 0, 1, None
    local = _env_int("LOCAL_RANK", 0)
    cuda = torch.cuda.is_available() and not device.startswith("cpu")
    if cuda and local >= torch.cuda.device_count():
        raise RuntimeError(f"LOCAL_RANK {local} has no GPU: this machine has {torch.cuda.device_count()}; start "
                           f"at most that many processes per node (torchrun --nproc_per_node)")
    if cuda:
        torch.cuda.set_device(local)  # before init, so nccl's communicator binds to this rank's GPU
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        return dist.get_rank(), world, f"cuda:{local}"
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return dist.get_rank(), world, "cpu"


def teardown() -> None:
    """End the process group if one was started (a no-op otherwise), so torchrun sees a clean exit."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise RuntimeError(f"environment variable {name}={raw!r} is not an integer (set by torchrun)") from None


@contextmanager
def rank_zero_first() -> Iterator[None]:
    """`with rank_zero_first(): build()`: rank 0 runs the block first, then the other ranks (which then read the
    cache rank 0 wrote). If rank 0 fails, every rank raises instead of waiting forever at a barrier.
    """
    if not dist.is_initialized():
        yield
        return
    if dist.get_rank() != 0:
        status: list[object] = [None]
        dist.broadcast_object_list(status, src=0)
        if status[0] is not None:
            raise RuntimeError(f"rank 0 failed while building a shared stage: {status[0]}")
        yield
        return
    try:
        yield
    except BaseException as e:
        dist.broadcast_object_list([f"{type(e).__name__}: {e}"], src=0)
        raise
    dist.broadcast_object_list([None], src=0)


def average_gradients(params: Sequence[Tensor], extras: Sequence[Tensor] = ()) -> list[Tensor]:
    """All-reduce the mean gradient over ranks in one flat buffer (what DDP computes), and with it the mean of
    `extras` (the step's loss and metrics, so a NaN on one rank stops all of them); returns the averaged extras.
    Naive equivalent: `for p in params: dist.all_reduce(p.grad); p.grad /= world` plus one all_reduce per extra.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(extras)
    world = dist.get_world_size()
    if not params and not extras:
        return []
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    like = grads[0] if grads else extras[0]
    pieces = [g.reshape(-1) for g in grads] + [e.detach().reshape(-1).to(like) for e in extras]
    flat = torch.cat(pieces)  # (sum of numels,)
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n
    out = []
    for e in extras:
        out.append(flat[offset:offset + e.numel()].view_as(e).to(e.dtype))
        offset += e.numel()
    return out


def share_from_main(obj: T) -> T:
    """Rank 0's `obj` on every rank (each other rank passes a placeholder); `obj` itself in a plain run. Naive
    equivalent: every rank computing obj itself, which for a file check races with rank 0's writes."""
    if not dist.is_initialized():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
