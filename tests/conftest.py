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


SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_new_tokens", "max_new_tokens", "eot_id")


def with_sampling(cls, **kw):
    """cls (a config that embeds a SamplingConfig: pairs, rollouts, evaluation) with the sampling keywords among kw
    routed into its `sampling`, the lengths defaulting to 4..16 as in those configs."""
    from minidpo.model.generate import SamplingConfig
    sampling = {"min_new_tokens": 4, "max_new_tokens": 16, **{k: kw.pop(k) for k in SAMPLING_FIELDS if k in kw}}
    return cls(sampling=SamplingConfig(**sampling), **kw)
