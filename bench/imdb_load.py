"""
Time minidpo.dataset.imdb.load_imdb reading the full IMDb train split straight from aclImdb_v1.tar.gz.

Reference: Maas et al. 2011 (Large Movie Review Dataset). The tarball is gzip, so it is read in one
sequential pass; this prints how long that pass takes for train (pos + neg, then with unsup) and test.

    python bench/imdb_load.py [--src ../shared/data/aclImdb_v1.tar.gz]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402  (only for the version line)

from minidpo.dataset.imdb import load_imdb  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description="IMDb loading benchmark")
    parser.add_argument("--src", default=str(ROOT.parent / "shared" / "data" / "aclImdb_v1.tar.gz"))
    args = parser.parse_args()
    print(f"machine: {platform.platform()}, cpu_count={os.cpu_count()}, python {platform.python_version()}, "
          f"torch {torch.__version__}, load average {os.getloadavg()[0]:.2f}")
    print(f"source: {args.src} ({Path(args.src).stat().st_size / 2**20:.1f} MiB)")
    for split, labels in [("train", ("pos", "neg")), ("train", ("pos", "neg", "unsup")), ("test", ("pos", "neg"))]:
        cpu0, t0 = time.process_time(), time.perf_counter()
        reviews = load_imdb(args.src, split, labels)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        counts = ", ".join(f"{k} {v:,}" for k, v in Counter(r.label for r in reviews).items())
        mib = sum(len(r.text.encode()) for r in reviews) / 2**20
        print(f"{split:5s} {'+'.join(labels):14s}: {len(reviews):6,} reviews ({counts}; {mib:.0f} MiB text) "
              f"in {wall:.2f} s wall, {cpu:.2f} s CPU")


if __name__ == "__main__":
    main()
