"""minidpo/model/generate.py: sampling is exact (chi-square against the target distribution), never draws a masked
token, repeats under a seed, treats top_k=0 / top_p=1 as off, and rejects settings that are no distribution."""


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minidpo.config import ConfigError
from minidpo.model.generate import (
    SamplingConfig,
    generate,
    inverse_cdf,
    nucleus_drop,
    sample,
    sample_naive,
    trim_finished,
)
from minidpo.model.gpt import GPT, GPTConfig

TINY = GPTConfig(block_size=64, vocab_size=97, n_layer=2, n_head=2, n_embd=32)
LOGITS = torch.tensor([2.0, 1.3, 1.1, 0.7, 0.2, 0.0, -0.4, -0.9, -1.5, -2.2, -3.0, 0.45])  # distinct: no ties
DRAWS = 40_000


@pytest.fixture(scope="module")
def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(TINY).eval()


def target_probs(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """The definition, in float64 and plain Python: softmax(logits / T), keep the k most likely, then the smallest
    most-likely prefix whose mass reaches p, renormalise."""
    probs = (logits.double() / temperature).softmax(-1)
    order = sorted(range(len(probs)), key=lambda i: -float(probs[i]))
    keep = order[:top_k] if top_k else order
    if top_p is not None:
        kept_mass = sum(float(probs[i]) for i in keep)
        nucleus, mass = [], 0.0
        for i in keep:
            if mass >= top_p:
                break
            nucleus.append(i)
            mass += float(probs[i]) / kept_mass
        keep = nucleus
    out = torch.zeros_like(probs)
    out[keep] = probs[keep]
    return out / out.sum()


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """P(chi2 >= observed) for counts against probs over the cells with probs > 0 (survival function of the
    chi-square distribution: the regularised upper incomplete gamma Q(df/2, x/2))."""
    expected = probs * counts.sum()
    cells = probs > 0
    stat = ((counts[cells] - expected[cells]) ** 2 / expected[cells]).sum()
    df = int(cells.sum()) - 1
    if df == 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def draw_counts(sampler, logits: torch.Tensor, n: int = DRAWS, seed: int = 0, **kw) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = sampler(logits.expand(n, -1), generator=g, **kw)  # n independent rows in one call
    return torch.bincount(tokens, minlength=logits.numel()).double()


def test_chi_square_helper_rejects_a_wrong_distribution():
    probs = target_probs(LOGITS, 1.0, None, None)
    wrong = target_probs(LOGITS, 1.2, None, None)
    counts = draw_counts(sample, LOGITS)
    assert chi_square_p_value(counts, probs) > 1e-4
    assert chi_square_p_value(counts, wrong) < 1e-10


@pytest.mark.parametrize("sampler", [sample, sample_naive], ids=["fast", "naive"])
@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, None, None), (0.6, None, None), (2.5, None, None),   # plain, temperature
    (1.0, 4, None), (0.7, 1, None),                             # top-k
    (1.0, None, 0.7), (1.0, None, 0.2), (1.3, None, 0.95),      # top-p alone
    (0.8, 6, 0.8),                                              # top-k then top-p
])
def test_sampled_frequencies_match_the_target_distribution(sampler, temperature, top_k, top_p):
    probs = target_probs(LOGITS, temperature, top_k, top_p)
    counts = draw_counts(sampler, LOGITS, temperature=temperature, top_k=top_k, top_p=top_p)
    assert (counts[probs == 0] == 0).all(), "a token outside the top-k / nucleus was drawn"
    assert chi_square_p_value(counts, probs) > 1e-4


@pytest.mark.parametrize("block", [1, 3, 4, 5, 256])
def test_two_level_inverse_cdf_is_exact_for_every_block_size_including_a_partial_last_block(block):
    weights = torch.tensor([0.5, 0.0, 3.0, 1.0, 0.25, 0.0, 0.0, 2.0, 1.5, 0.75, 0.0])
    u = torch.rand(DRAWS, 1, generator=torch.Generator().manual_seed(block))
    counts = torch.bincount(inverse_cdf(weights.expand(DRAWS, -1), u, block=block), minlength=11).double()
    probs = weights.double() / weights.sum()
    assert (counts[probs == 0] == 0).all()
    assert chi_square_p_value(counts, probs) > 1e-4


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([0.0, 0.0, 1e-30, 1e-8, 0.3, 1.0, 7.0]), min_size=1, max_size=40)
       .filter(lambda w: any(x > 0 for x in w)),
       st.sampled_from([0.0, 0.5, 1 - 2 ** -24, 1.0]), st.sampled_from([1, 2, 3, 8]))
def test_inverse_cdf_never_picks_a_zero_weight_even_at_the_ends_of_u(weights, u, block):
    w = torch.tensor(weights)[None]
    i = int(inverse_cdf(w, torch.tensor([[u]]), block=block))
    assert 0 <= i < len(weights) and weights[i] > 0
    if u == 1.0:  # past the total (what rounding of u * total can give): the last token that has weight, up to
        # those too light to move a float32 running sum
        assert sum(weights[i + 1:]) < 1e-6 * sum(weights)


@pytest.mark.parametrize("kw", [{}, {"top_k": 50}, {"top_p": 0.9}, {"temperature": 3.0}])
def test_a_masked_token_is_never_drawn_in_many_draws(kw):
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(1, 300, generator=g) * 0.1  # nearly uniform, so the masked tokens would come up often
    logits[0, [0, 150, 299]] = -float("inf")          # e.g. end-of-text before min_new_tokens
    tokens = sample(logits.expand(20_000, -1), generator=g, **kw)
    assert not torch.isin(tokens, torch.tensor([0, 150, 299])).any()


def test_full_vocabulary_sampling_matches_the_target_in_aggregate():
    logits = torch.randn(50257, generator=torch.Generator().manual_seed(2)) * 3
    probs = logits.double().softmax(-1)
    counts = sum(draw_counts(sample, logits, n=250, seed=s) for s in range(8))  # 2,000 draws, 100 MB at a time
    buckets = probs.argsort(descending=True).chunk(8)  # 8 groups of tokens, most likely first
    observed = torch.stack([counts[b].sum() for b in buckets])
    assert chi_square_p_value(observed, torch.stack([probs[b].sum() for b in buckets])) > 1e-4


def test_seeded_sampling_repeats_and_different_seeds_differ():
    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(0))
    for kw in ({}, {"top_k": 40}, {"top_p": 0.8}, {"top_k": 40, "top_p": 0.8, "temperature": 0.7}):
        a = sample(logits, generator=torch.Generator().manual_seed(1), **kw)
        b = sample(logits, generator=torch.Generator().manual_seed(1), **kw)
        c = sample(logits, generator=torch.Generator().manual_seed(2), **kw)
        assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("sampler", [sample, sample_naive], ids=["fast", "naive"])
def test_top_k_zero_none_or_vocabulary_size_and_top_p_one_are_all_off(sampler):
    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(0))
    off = sampler(logits, generator=torch.Generator().manual_seed(3))
    for kw in ({"top_k": 0}, {"top_k": None}, {"top_k": 50}, {"top_k": 500}, {"top_p": 1.0}, {"top_k": 0, "top_p": 1}):
        assert torch.equal(sampler(logits, generator=torch.Generator().manual_seed(3), **kw), off), kw


def test_temperature_zero_is_argmax_and_tiny_temperatures_stay_finite():
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample(logits, temperature=0), logits.argmax(-1))
    assert torch.equal(sample(logits, temperature=1e-30), logits.argmax(-1))  # (x - max) / T: no inf - inf


def test_sampling_does_not_modify_the_callers_logits():
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    for kw in ({}, {"top_k": 10, "top_p": 0.5}, {"top_p": 0.5}, {"temperature": 0.5}):
        sample(logits, **kw)
    assert torch.equal(logits, before)


@pytest.mark.parametrize("kw,field", [
    ({"temperature": -0.1}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"), ({"top_k": -1}, "top_k"), ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"top_p": float("nan")}, "top_p"),
])
def test_bad_sampling_settings_raise_a_value_error_naming_the_field(kw, field):
    with pytest.raises(ConfigError) as err:
        SamplingConfig(**kw)
    assert err.value.field == field


@pytest.mark.parametrize("kw,field", [({"max_new_tokens": 0}, "max_new_tokens"),
                                      ({"min_new_tokens": -1}, "min_new_tokens"),
                                      ({"min_new_tokens": 9, "max_new_tokens": 8}, "max_new_tokens")])
def test_sampling_config_checks_its_lengths(kw, field):
    with pytest.raises(ConfigError) as err:
        SamplingConfig(**kw)
    assert err.value.field == field


def test_nucleus_keeps_the_most_likely_token_even_when_it_alone_passes_p():
    w = torch.tensor([[0.9, 0.05, 0.05], [0.4, 0.35, 0.25]])
    assert nucleus_drop(w, 0.5).tolist() == [[False, True, True], [False, False, True]]


def test_sampled_generation_with_cache_equals_without_cache(tiny_model):
    ids = torch.randint(0, TINY.vocab_size, (4, 5), generator=torch.Generator().manual_seed(9))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding on one row
    for kw in ({}, {"top_k": 10, "top_p": 0.9, "temperature": 0.8}):
        a = generate(tiny_model, ids, 16, attention_mask=mask, eos_id=None,
                     generator=torch.Generator().manual_seed(4), **kw)
        b = generate(tiny_model, ids, 16, attention_mask=mask, eos_id=None, use_cache=False,
                     generator=torch.Generator().manual_seed(4), **kw)
        assert torch.equal(a, b)


def test_end_of_text_never_comes_before_min_new_tokens_in_sampled_generation(tiny_model):
    ids = torch.randint(0, TINY.vocab_size, (64, 3), generator=torch.Generator().manual_seed(2))
    eos = 7
    out = generate(tiny_model, ids, 12, min_new_tokens=6, temperature=20.0, eos_id=eos,  # near uniform
                   generator=torch.Generator().manual_seed(0))
    new = out[:, 3:]
    assert not (new[:, :6] == eos).any()
    assert (new[:, 6:] == eos).any(), "with 64 near-uniform rows some row should end after the minimum"
    for row in new.tolist():
        if eos in row:
            assert all(t == eos for t in row[row.index(eos):])


def test_trim_after_a_late_check_equals_stopping_at_the_first_all_finished_step():
    eos = 9
    new = torch.tensor([[1, 9, 9, 9, 9, 9], [2, 3, 4, 9, 9, 9], [9, 9, 9, 9, 9, 9]])
    out = torch.cat([torch.zeros(3, 2, dtype=torch.long), new], 1)
    assert torch.equal(trim_finished(out, 2, 8, eos), out[:, :2 + 4])  # the last row to finish did so at step 3


def test_generation_rejects_bad_lengths_and_settings_before_any_work(tiny_model):
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="block_size"):
        generate(tiny_model, ids, TINY.block_size)
    with pytest.raises(ValueError, match="min_new_tokens"):
        generate(tiny_model, ids, 3, min_new_tokens=4)
    with pytest.raises(ValueError, match="top_p"):
        generate(tiny_model, ids, 3, top_p=0)
    with pytest.raises(ValueError, match="eos_id"):
        generate(tiny_model, ids, 3, eos_id=TINY.vocab_size)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([-3e38, -1e30, -1e4, -50.0, 0.0, 1.0, 30.0, 1e4, 1e30, 3e38, -float("inf")]),
                min_size=1, max_size=600),
       st.sampled_from([1e-30, 1e-12, 1e-4, 0.01, 0.7, 1.0, 3.0, 1e30]),
       st.sampled_from([None, 3]), st.sampled_from([None, 0.9]), st.integers(0, 2**31 - 1))
def test_sample_never_returns_an_id_outside_the_vocabulary_or_of_zero_probability(values, temperature, top_k, top_p,
                                                                                  seed):
    """Extreme finite logits at any finite temperature: the token is in the vocabulary and one of the largest
    logits when T is tiny (softmax(x / T) puts all its mass there), never a -inf (forbidden) one."""
    if all(v == -float("inf") for v in values):
        values = values + [0.0]
    logits = torch.tensor([values, values[::-1]], dtype=torch.float32)  # (2, V)
    g = torch.Generator().manual_seed(seed)
    token = sample(logits.clone(), temperature, top_k, top_p, generator=g)
    V = logits.size(1)
    assert ((token >= 0) & (token < V)).all()
    picked = logits.gather(1, token[:, None]).squeeze(1)
    assert (picked > -float("inf")).all()
    if temperature <= 1e-4:
        gap = logits.amax(-1) - picked
        assert (gap <= temperature * 200).all()  # weight exp(-gap / T) of a lower logit is below e^-200
