"""
Benchmark the sentiment reward model (minidpo/dataset/reward.py) on the full IMDb set.

Reference: Rafailov et al. 2023 (DPO) sec. 6.1 scores completions with a sentiment classifier; ours is
NB-LR (Wang & Manning 2012). Prints test accuracy on full reviews (goal >= 0.87), on the first 48 GPT-2
tokens of each review (what a generated completion looks like), and the training time on 2 threads
(goal <= 60 s), plus the machine.

    python bench/reward.py                                   # ../shared/data/aclImdb_v1.tar.gz
    python bench/reward.py --src ~/.cache/minidpo/aclImdb_v1.tar.gz --save /tmp/reward.safetensors
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from minidpo.dataset.imdb import load_imdb  # noqa: E402
from minidpo.dataset.reward import SentimentClassifier  # noqa: E402


def truncator(n_tokens: int):
    """Cut a text to its first n GPT-2 tokens; whitespace words if the project tokenizer is missing."""
    try:
        from minidpo.model.tokenizer import Tokenizer
    except ImportError:
        print(f"minidpo.model.tokenizer not found: truncating to the first {n_tokens} whitespace WORDS instead")
        return lambda texts: [" ".join(t.split()[:n_tokens]) for t in texts], "whitespace words"
    tok = Tokenizer()
    return lambda texts: [tok.decode(ids[:n_tokens]) for ids in tok.encode_batch(texts)], "GPT-2 tokens"


def main() -> None:
    parser = argparse.ArgumentParser(description="IMDb reward-model benchmark")
    parser.add_argument("--src", default=str(ROOT.parent / "shared" / "data" / "aclImdb_v1.tar.gz"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prefix", type=int, default=48, help="tokens kept for the short-text accuracy")
    parser.add_argument("--save", default=None, help="optional .safetensors path for the trained model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"cpu_count={os.cpu_count()}, torch threads={torch.get_num_threads()}, torch {torch.__version__}")
    print(f"load average before: {os.getloadavg()[0]:.2f} (other processes on a shared box inflate times)")

    t = time.perf_counter()
    train, test = load_imdb(args.src, "train"), load_imdb(args.src, "test")
    print(f"loaded {len(train):,} train / {len(test):,} test reviews from {args.src} "
          f"in {time.perf_counter() - t:.1f} s")

    model = SentimentClassifier()
    cpu0, t0 = time.process_time(), time.perf_counter()
    model.fit([r.text for r in train], [r.label for r in train])
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    print(f"training (featurize + NB ratios + L-BFGS), config {model.config()}: "
          f"{wall:.1f} s wall, {cpu:.1f} s CPU  (goal <= 60 s on 2 cores)")

    texts, labels = [r.text for r in test], [r.label for r in test]
    t = time.perf_counter()
    acc = model.accuracy(texts, labels)
    print(f"test accuracy, full reviews:      {acc:.4f}  (goal >= 0.87; scored in {time.perf_counter() - t:.1f} s)")
    cut, unit = truncator(args.prefix)
    short = cut(texts)
    print(f"test accuracy, first {args.prefix} {unit}: {model.accuracy(short, labels):.4f}")
    scores = model.score(short)
    print(f"P(pos) on the {args.prefix}-token prefixes: mean {scores.mean():.3f}, "
          f"fraction in (0.1, 0.9): {((scores > 0.1) & (scores < 0.9)).float().mean():.3f}")
    if args.save:
        model.save(args.save)
        print(f"saved {args.save} ({Path(args.save).stat().st_size / 2**20:.1f} MiB)")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
