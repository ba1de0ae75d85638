"""Tests for minidpo/dataset/length_sampler.py: an inclusive, seeded, uniform integer sampler."""

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minidpo.dataset.length_sampler import PROMPT_MAX_TOKENS, PROMPT_MIN_TOKENS, LengthSampler

bounds = st.integers(0, 200).flatmap(lambda lo: st.tuples(st.just(lo), st.integers(lo, lo + 60)))
seeds = st.integers(0, 2**32)


@settings(max_examples=50, deadline=None)
@given(bounds=bounds, seed=seeds, n=st.integers(0, 200))
def test_every_draw_is_an_int_inside_the_inclusive_range(bounds, seed, n):
    lo, hi = bounds
    sampler = LengthSampler(lo, hi, seed=seed)
    draws = sampler.sample(n) + [sampler() for _ in range(10)]
    assert len(draws) == n + 10
    assert all(type(x) is int and lo <= x <= hi for x in draws)


@settings(max_examples=25, deadline=None)
@given(lo=st.integers(0, 100), width=st.integers(0, 9), seed=seeds)
def test_every_value_in_the_range_is_reachable(lo, width, seed):
    # 10 values, 2,000 draws: a value misses with probability about 10 * 0.9**2000, i.e. never
    draws = LengthSampler(lo, lo + width, seed=seed).sample(2000)
    assert set(draws) == set(range(lo, lo + width + 1))


@settings(max_examples=50, deadline=None)
@given(bounds=bounds, seed=seeds)
def test_same_seed_gives_the_same_sequence(bounds, seed):
    a, b = LengthSampler(*bounds, seed=seed), LengthSampler(*bounds, seed=seed)
    assert a.sample(30) == b.sample(30)
    assert [a() for _ in range(5)] == [b() for _ in range(5)]


@settings(max_examples=25, deadline=None)
@given(seed=seeds)
def test_calls_and_sample_draw_the_same_stream(seed):
    a, b = LengthSampler(2, 8, seed=seed), LengthSampler(2, 8, seed=seed)
    assert [a() for _ in range(20)] == b.sample(20)


def test_different_seeds_give_different_sequences():
    assert LengthSampler(0, 1000, seed=0).sample(20) != LengthSampler(0, 1000, seed=1).sample(20)


def test_max_value_is_included_unlike_trl():
    # TRL's LengthSampler(2, 8) never returns 8; ours returns it about 1/7 of the time
    counts = Counter(LengthSampler(PROMPT_MIN_TOKENS, PROMPT_MAX_TOKENS, seed=0).sample(7000))
    assert PROMPT_MAX_TOKENS in counts and PROMPT_MIN_TOKENS in counts
    assert max(counts) == PROMPT_MAX_TOKENS and min(counts) == PROMPT_MIN_TOKENS


def test_draws_are_roughly_uniform():
    n, k = 14000, 7
    counts = Counter(LengthSampler(2, 8, seed=123).sample(n))
    # chi-square with 6 degrees of freedom; 22.5 is its 0.999 quantile
    chi2 = sum((c - n / k) ** 2 / (n / k) for c in counts.values())
    assert chi2 < 22.5


def test_single_value_range_is_constant():
    assert LengthSampler(5, 5, seed=3).sample(10) == [5] * 10


def test_seeded_sampler_ignores_the_global_random_state():
    a = LengthSampler(0, 100, seed=7)
    random.seed(1)
    first = a.sample(10)
    random.seed(2)
    assert LengthSampler(0, 100, seed=7).sample(10) == first


@pytest.mark.parametrize("lo, hi, match", [(5, 4, "empty range"), (-1, 4, "negative"), (-3, -1, "negative")])
def test_empty_or_negative_ranges_raise_value_error(lo, hi, match):
    with pytest.raises(ValueError, match=match):
        LengthSampler(lo, hi)


def test_non_integer_bounds_and_bad_n_raise():
    with pytest.raises(TypeError, match="min_value"):
        LengthSampler(2.0, 8)
    with pytest.raises(TypeError, match="max_value"):
        LengthSampler(2, True)
    with pytest.raises(ValueError, match="n=-1"):
        LengthSampler(2, 8).sample(-1)
