"""
Cost of choosing the next token: minidpo's `sample` (one uniform per row, two-level inverse CDF) against
`torch.multinomial(logits.softmax(-1), 1)` (one exponential random number per vocabulary entry) and against
`sample_naive` (the same filters as `sample`, then multinomial), on (batch, vocab) float32 logits.

    python bench/sampling.py                       # (64, 50257), the issue's shape
    python bench/sampling.py --batch 8 --vocab 50257 --threads 1 --device cuda

Times are the median of --repeats runs after one warm-up; every method reads the same logits tensor (none of them
writes to it). The last column is multinomial's time divided by the row's: above 1 is faster than multinomial.
"""

import argparse
import platform
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing
from timing import timed  # noqa: E402  (bench/timing.py, beside this file)

from minidpo.model.generate import sample, sample_naive  # noqa: E402

# (label, temperature, top_k, top_p)
SETTINGS = [("T=1", 1.0, None, None), ("T=0.8", 0.8, None, None), ("top-k 50", 1.0, 50, None),
            ("top-k 50, top-p 0.95", 1.0, 50, 0.95), ("top-p 0.95", 1.0, None, 0.95)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, device {device}")
    g = torch.Generator(device=device).manual_seed(0)
    # GPT-2-like spread: a few likely tokens and a long tail
    logits = torch.randn(args.batch, args.vocab, generator=g, device=device) * 3
    base = timed(lambda: torch.multinomial(logits.softmax(-1), 1, generator=g), device, args.repeats)
    print(f"logits ({args.batch}, {args.vocab}) float32")
    print(f"{'method':>34} | {'ms':>8} | vs multinomial(softmax)")
    print(f"{'multinomial(softmax), T=1':>34} | {base * 1e3:>8.2f} | 1.00x")
    for label, temperature, top_k, top_p in SETTINGS:
        for name, fn in (("sample", sample), ("sample_naive", sample_naive)):
            if name == "sample_naive" and top_p is not None and top_k is None and args.repeats > 3:
                reps = 3  # a full sort of the vocabulary per row: slow, and not what this table is about
            else:
                reps = args.repeats
            t = timed(partial(fn, logits, temperature, top_k, top_p, generator=g), device, reps)
            print(f"{name + ', ' + label:>34} | {t * 1e3:>8.2f} | {base / t:.2f}x")


if __name__ == "__main__":
    main()
