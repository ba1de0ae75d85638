"""The benchmarks' clock: the median of repeated runs after a warm-up, CUDA-synchronized."""

import statistics
import time
from collections.abc import Callable

import torch


def timed(fn: Callable[[], object], device: torch.device, repeats: int = 1) -> float:
    """Median wall seconds of fn() over `repeats` runs after one warm-up (allocator, kernels, lazy init); on CUDA
    the clock stops only when the queued kernels have finished."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
