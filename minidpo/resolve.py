"""
What a run uses when the user leaves it to us: the device, the model weights and the IMDB data.

`--device auto` picks CUDA, then Apple's MPS, then the CPU. `--model auto` picks the official GPT-2 (124M) when it is
in the cache or can be downloaded, else the small model bundled in data/tiny-imdb-gpt2/, with a banner that says so.
`--data auto` picks the full IMDB set in the cache, else the ~1,000-review sample shipped in data/. Every choice is
reported back so that summary.json can record what was really used.
"""

import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from minidpo.model import GPT

REPO = Path(__file__).resolve().parent.parent
BUNDLED_MODEL = REPO / "data" / "tiny-imdb-gpt2"


def pick_device(name: str = "auto") -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


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


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA (tensor cores, no loss scaling needed); plain fp32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else None


def banner(lines: list[str]) -> None:
    width = max(len(s) for s in lines) + 4
    print("+" + "-" * (width - 2) + "+", file=sys.stderr)
    for s in lines:
        print(f"| {s:<{width - 4}} |", file=sys.stderr)
    print("+" + "-" * (width - 2) + "+", file=sys.stderr, flush=True)


def load_model(name: str, device: torch.device) -> tuple[GPT, str]:
    """(model, what was loaded). `auto`: official gpt2, else the bundled model; anything else goes to load_gpt2."""
    from minidpo.download import DownloadError
    from minidpo.weights import load_gpt2

    if name == "bundled":
        return load_gpt2(BUNDLED_MODEL, device=device), str(BUNDLED_MODEL.relative_to(REPO))
    if name != "auto":
        return load_gpt2(name, device=device), name
    try:
        return load_gpt2("gpt2", device=device), "gpt2"
    except DownloadError as e:
        banner(["--model auto: the official GPT-2 weights are not cached and could not be downloaded:",
                f"  {str(e).splitlines()[0][:150]}",
                f"Using the small bundled model {BUNDLED_MODEL.relative_to(REPO)} (trained on IMDB, see data/README.md).",
                "To use GPT-2 124M: run once with network access, or place OpenAI's files by hand (see README).",
                "train.py's defaults are sized for GPT-2; `python train.py --preset tiny` is tuned for this model."])
        return load_gpt2(BUNDLED_MODEL, device=device), str(BUNDLED_MODEL.relative_to(REPO))


def imdb_source(name: str) -> Path:
    """`auto`: the full set in the cache, else the shipped sample; `sample`: the sample; else a path."""
    from minidpo.imdb import IMDB_SAMPLE_PATH, default_imdb_source

    if name == "auto":
        return Path(default_imdb_source(verbose=True))
    if name == "sample":
        return Path(IMDB_SAMPLE_PATH)
    path = Path(name)
    if not path.exists():
        raise FileNotFoundError(f"--data {name}: no such file or directory (expected aclImdb_v1.tar.gz or an "
                                "extracted aclImdb directory; `auto` uses the cache or the shipped sample)")
    return path
