"""
Prompts for the IMDb controlled-sentiment experiment: the first 2-8 tokens of movie reviews.

Reference: Rafailov et al. 2023, "Direct Preference Optimization" (arXiv:2305.18290), sec. 6.1 and appendix C.1:
"x is a prefix of a movie review from the IMDb dataset", 2-8 tokens long, following TRL's gpt2-sentiment notebook
(`input_size = LengthSampler(2, 8)`; ours includes the 8, see minidpo.dataset.length_sampler).

Each prompt comes from a distinct review and remembers where it was cut from and its split: prompts cut from
test-split reviews are held out, and a test prompt whose token ids equal a training prompt's is skipped.
"""

import random
from dataclasses import dataclass
from typing import Any, Sequence

from minidpo.config import require
from minidpo.dataset.length_sampler import PROMPT_MAX_TOKENS, PROMPT_MIN_TOKENS, LengthSampler


@dataclass
class Prompt:
    ids: list[int]
    text: str
    split: str = "train"  # split of the source review: "test" prompts are for held-out evaluation
    review: str = ""      # "train/pos/123": where it was cut from


def review_name(review: Any) -> str:
    """A review's identity, "<split>/<label>/<id>", e.g. "train/pos/123" (unique within IMDb)."""
    return f"{review.split}/{review.label}/{review.id}"


def make_prompts(reviews: Sequence[Any], tokenizer: Any, n: int | None = None, min_len: int = PROMPT_MIN_TOKENS,
                 max_len: int = PROMPT_MAX_TOKENS, seed: int = 0,
                 exclude: Sequence[Prompt] = ()) -> list[Prompt]:
    """n prompts, each the first k tokens of a distinct review, k ~ LengthSampler(min_len, max_len, seed).

    Reviews are visited in a seeded random order; one with no token after its k-th is skipped, and so is one whose
    prefix has the token ids of a prompt in `exclude`. n=None: one prompt per usable review. Naive equivalent:
    [prefix(r, k) for r in shuffled(reviews) if len(tokens(r)) > k and prefix(r, k) not in exclude][:n].
    """
    if n is not None and n < 0:
        raise ValueError(f"make_prompts: n must be >= 0, got {n}")
    order = list(range(len(reviews)))
    random.Random(f"prompts/{seed}").shuffle(order)  # a stream of its own, not the length sampler's
    lengths = LengthSampler(min_len, max_len, seed=seed)
    seen = {tuple(p.ids) for p in exclude}
    prompts: list[Prompt] = []
    for i in order:
        if n is not None and len(prompts) == n:
            break
        k, ids = lengths(), tokenizer.encode(reviews[i].text)
        if len(ids) > k and tuple(ids[:k]) not in seen:
            prompts.append(Prompt(ids[:k], tokenizer.decode(ids[:k]), reviews[i].split, review_name(reviews[i])))
    if n is not None and len(prompts) < n:
        raise ValueError(f"make_prompts: asked for n={n} prompts but only {len(prompts)} of the {len(reviews)} "
                         f"reviews are longer than their {min_len}-{max_len} token prefix"
                         + (" and differ from the excluded prompts" if seen else ""))
    return prompts


@dataclass(frozen=True)
class PromptConfig:
    train: int = 512          # training prompts (from train reviews)
    heldout: int = 32         # test prompts whose pairs measure held-out implicit-reward accuracy
    eval: int = 64            # test prompts whose samples measure reward and KL
    min_tokens: int = 2
    max_tokens: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.train >= 1, "num_prompts", f"must be >= 1, got {self.train}")
        require(self.heldout >= 0, "heldout_prompts", f"must be >= 0, got {self.heldout}")
        require(self.eval >= 1, "eval_prompts", f"must be >= 1, got {self.eval}")
        require(1 <= self.min_tokens <= self.max_tokens, "prompt_min_tokens",
                f"must be >= 1 and <= prompt_max_tokens ({self.max_tokens}), got {self.min_tokens}")
