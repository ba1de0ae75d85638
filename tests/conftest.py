"""Shared stand-ins for the tests: a tiny GPT and a reward that needs no classifier; and the `slow` marker's
default (pytest.ini registers it: subprocess and end-to-end tests; `-m "not slow"` skips them)."""

import sys
from pathlib import Path

import torch

# train.py and sample.py live at the repository root; tests import their config classes
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minidpo.model.gpt import GPT, GPTConfig  # noqa: E402


def tiny_gpt(seed: int = 0, vocab_size: int = 64, n_layer: int = 2, n_embd: int = 32, block_size: int = 32) -> GPT:
    """A randomly initialised GPT small enough for a unit test, in eval mode; the same seed gives the same weights."""
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=2,
                         n_embd=n_embd)).eval()


class VowelScorer:
    """A stand-in reward in [0, 1]: the share of letters that are vowels (continuous, so ties are rare)."""

    def score(self, texts: list[str]) -> torch.Tensor:
        letters = [[c for c in t.lower() if c.isalpha()] for t in texts]
        return torch.tensor([sum(c in "aeiou" for c in ls) / max(1, len(ls)) for ls in letters])
