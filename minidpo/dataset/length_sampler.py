"""
Uniform integer lengths for prompts and responses in the IMDb sentiment experiment.

Reference: Rafailov et al. 2023, "Direct Preference Optimization" sec. 6.1 / appendix C.1 (prompts of 2-8 tokens,
completions of a sampled length), after TRL's `LengthSampler` (trl/core.py, its gpt2-sentiment PPO example), with
one deliberate difference, documented on the class.
"""

from __future__ import annotations

import random

# prompt prefixes of 2-8 GPT-2 tokens, both ends included (DPO paper / TRL gpt2-sentiment example)
PROMPT_MIN_TOKENS, PROMPT_MAX_TOKENS = 2, 8


def _check_int(name: str, value: object) -> int:
    # bool is an int subclass, but LengthSampler(True, 8) is surely a mistake
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"LengthSampler: {name} must be an int, got {value!r} ({type(value).__name__})")
    return value


class LengthSampler:
    """Draw integers uniformly from the INCLUSIVE range [min_value, max_value].

    TRL's LengthSampler is `np.random.choice(range(min_value, max_value))`, so its max is EXCLUDED:
    TRL's `LengthSampler(2, 8)` ("prompts of 2-8 tokens") only ever yields 2-7. Ours includes the max,
    because the numbers in a config or paper ("2-8 tokens", "min/max new tokens") read as inclusive
    bounds, and `max_new_tokens` is itself an inclusive cap; an off-by-one silently shifts the prompt
    length distribution. To reproduce TRL exactly, pass `max_value - 1`.

    Naive equivalent of one draw: random.Random(seed).randint(min_value, max_value).
    """

    def __init__(self, min_value: int, max_value: int, seed: int | None = None) -> None:
        self.min_value = _check_int("min_value", min_value)
        self.max_value = _check_int("max_value", max_value)
        if min_value < 0:
            raise ValueError(f"LengthSampler: min_value={min_value} is negative; lengths must be >= 0")
        if max_value < min_value:
            raise ValueError(f"LengthSampler: empty range, max_value={max_value} < min_value={min_value}")
        self.seed = seed
        # a private generator: reproducible with a seed, and unaffected by other code using `random`
        self._rng = random.Random(seed)

    def __call__(self) -> int:
        return self._rng.randint(self.min_value, self.max_value)

    def sample(self, n: int) -> list[int]:
        """n independent draws (the same values n calls to the sampler would give)."""
        n = _check_int("n", n)
        if n < 0:
            raise ValueError(f"LengthSampler.sample: n={n} is negative")
        return [self() for _ in range(n)]

    def __repr__(self) -> str:
        return f"LengthSampler({self.min_value}, {self.max_value}, seed={self.seed})"
