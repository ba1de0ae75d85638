"""GPT-2 model: sizes, padding-aware attention, KV-cached generation and sampling."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minidpo.model.generate import generate, sample
from minidpo.model.gpt import GPT, GPTConfig, attention_bias, positions_from_mask

TINY = GPTConfig(block_size=128, vocab_size=97, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(scope="module")
def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(TINY).eval()


@pytest.mark.parametrize("name,alias,count", [
    ("gpt2", "124M", 124_439_808),
    ("gpt2-medium", "355M", 354_823_168),
    ("gpt2-large", "774M", 774_030_080),
    ("gpt2-xl", "1558M", 1_557_611_200),
])
def test_preset_parameter_counts_match_the_released_models(name, alias, count):
    assert GPTConfig.from_name(alias) == GPTConfig.from_name(name)
    with torch.device("meta"):  # no memory: only shapes are needed
        model = GPT(GPTConfig.from_name(name))
    assert model.num_params() == count


def test_unknown_preset_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="gpt2-medium"):
        GPTConfig.from_name("gpt3")


@pytest.mark.parametrize("kw,field", [({"n_head": 0}, "n_head"), ({"n_layer": 0}, "n_layer"),
                                      ({"n_embd": 0}, "n_embd"), ({"n_embd": 30, "n_head": 4}, "n_embd"),
                                      ({"vocab_size": 0}, "vocab_size"), ({"block_size": 0}, "block_size"),
                                      ({"dropout": 1.0}, "dropout"), ({"dropout": math.nan}, "dropout")])
def test_gpt_config_rejects_impossible_sizes_naming_the_field(kw, field):
    with pytest.raises(ValueError, match=field) as err:
        GPTConfig(**kw)
    assert err.value.field == field


def test_head_is_tied_to_token_embedding(tiny_model):
    assert tiny_model.lm_head.weight is tiny_model.transformer.wte.weight


def test_mlp_activation_is_gelu_tanh_form_not_erf():
    from minidpo.model.gpt import MLP
    C = TINY.n_embd
    mlp = MLP(TINY)
    with torch.no_grad():  # identity in, identity out: the MLP then computes its activation alone
        mlp.c_fc.weight.copy_(torch.eye(4 * C, C))
        mlp.c_fc.bias.zero_()
        mlp.c_proj.weight.copy_(torch.eye(C, 4 * C))
        mlp.c_proj.bias.zero_()
        x = torch.linspace(-4, 4, C)[None]
        y = mlp(x)
    tanh_form = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    erf_form = 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    torch.testing.assert_close(y, tanh_form, atol=1e-6, rtol=0)
    assert (y - erf_form).abs().max() > 1e-4


def pad_batch(seqs: list[torch.Tensor], side: str, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[slice]]:
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    cols = []
    for i, s in enumerate(seqs):
        c = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[i, c], mask[i, c] = s, 1
        cols.append(c)
    return ids, mask, cols


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_logits_equal_each_sequence_run_alone(tiny_model, side):
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, TINY.vocab_size, (n,), generator=g) for n in (7, 1, 13, 4)]
    ids, mask, cols = pad_batch(seqs, side, pad=5)
    with torch.no_grad():
        batched = tiny_model(ids, attention_mask=mask)
        for i, s in enumerate(seqs):
            alone = tiny_model(s[None])[0]
            torch.testing.assert_close(batched[i, cols[i]], alone, atol=1e-5, rtol=0)


def test_pad_token_values_do_not_change_real_logits(tiny_model):
    seqs = [torch.arange(3, 9), torch.arange(1, 3)]
    a, mask, _ = pad_batch(seqs, "left", pad=0)
    b, _, _ = pad_batch(seqs, "left", pad=42)
    with torch.no_grad():
        la, lb = tiny_model(a, mask), tiny_model(b, mask)
    assert torch.isfinite(la).all()
    torch.testing.assert_close(la[mask.bool()], lb[mask.bool()], atol=1e-6, rtol=0)


def test_right_padding_without_mask_is_plain_causal(tiny_model):
    seqs = [torch.arange(2, 12), torch.arange(5, 9)]
    ids, mask, cols = pad_batch(seqs, "right")
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(ids)[mask.bool()], tiny_model(ids, mask)[mask.bool()], atol=1e-5, rtol=0)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.booleans(), min_size=1, max_size=8), min_size=1, max_size=3).filter(
    lambda rows: len({len(r) for r in rows}) == 1))
def test_attention_bias_never_lets_a_real_query_see_a_pad_or_the_future(rows):
    key_mask = torch.tensor(rows, dtype=torch.long)
    B, T = key_mask.shape
    allowed = attention_bias(key_mask, 0, T)[:, 0]  # (B, T, T)
    for b in range(B):
        for i in range(T):
            assert allowed[b, i, i]  # every row has at least itself: no all-masked softmax
            for j in range(T):
                expected = j <= i and (bool(rows[b][j]) or i == j)
                assert bool(allowed[b, i, j]) == expected
    pos = positions_from_mask(key_mask)
    for b in range(B):
        real = [t for t in range(T) if rows[b][t]]
        assert [int(pos[b, t]) for t in real] == list(range(len(real)))


def left_padded_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, TINY.vocab_size, (n,), generator=g) for n in (6, 2, 9)]
    ids, mask, _ = pad_batch(seqs, "left", pad=0)
    return ids, mask


def test_greedy_with_cache_is_token_identical_to_greedy_without_cache_for_50_tokens(tiny_model):
    ids, mask = left_padded_prompts()
    cached = generate(tiny_model, ids, 50, temperature=0, attention_mask=mask, eos_id=None)
    uncached = generate(tiny_model, ids, 50, temperature=0, attention_mask=mask, eos_id=None, use_cache=False)
    assert cached.shape == (3, ids.size(1) + 50)
    assert torch.equal(cached, uncached)


def test_unpadded_greedy_with_cache_equals_without_cache(tiny_model):
    ids = torch.randint(0, TINY.vocab_size, (2, 5), generator=torch.Generator().manual_seed(9))
    for mask in (None, torch.ones_like(ids)):  # an all-ones mask takes the same mask-free path
        cached = generate(tiny_model, ids, 50, temperature=0, eos_id=None, attention_mask=mask)
        uncached = generate(tiny_model, ids, 50, temperature=0, eos_id=None, attention_mask=mask, use_cache=False)
        assert torch.equal(cached, uncached)


def test_batched_generation_equals_each_prompt_generated_alone(tiny_model):
    ids, mask = left_padded_prompts()
    batched = generate(tiny_model, ids, 20, temperature=0, attention_mask=mask, eos_id=None)
    for i in range(ids.size(0)):
        prompt = ids[i, mask[i].bool()][None]
        alone = generate(tiny_model, prompt, 20, temperature=0, eos_id=None)
        assert torch.equal(batched[i, -20:], alone[0, -20:])


def test_seeded_sampling_repeats_and_different_seeds_differ(tiny_model):
    ids, mask = left_padded_prompts()

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return generate(tiny_model, ids, 30, temperature=1.0, top_k=20, top_p=0.9, attention_mask=mask, generator=g,
                                   eos_id=None)
    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def test_min_new_tokens_forbids_eos_and_rows_stop_after_eos(tiny_model):
    ids, mask = left_padded_prompts()
    # make eos the most likely token everywhere by choosing the greedy first token as "eos"
    eos = int(generate(tiny_model, ids, 1, temperature=0, attention_mask=mask, eos_id=None)[0, -1])
    out = generate(tiny_model, ids, 12, min_new_tokens=4, temperature=0, attention_mask=mask, eos_id=eos)
    new = out[:, ids.size(1):]
    assert (new[:, :4] != eos).all()
    for row in new.tolist():
        if eos in row:
            first = row.index(eos)
            assert all(t == eos for t in row[first:])


def test_generation_stops_early_when_every_row_finished(tiny_model):
    ids, mask = left_padded_prompts()
    greedy = generate(tiny_model, ids, 3, temperature=0, attention_mask=mask, eos_id=None)[:, -3:]
    eos = int(greedy[0, 0])
    out = generate(tiny_model, ids[:1], 40, temperature=0, attention_mask=mask[:1], eos_id=eos)
    assert out.size(1) == ids.size(1) + 1 and int(out[0, -1]) == eos


def test_generation_rejects_lengths_past_the_context(tiny_model):
    ids = torch.zeros(1, 100, dtype=torch.long)
    with pytest.raises(ValueError, match="block_size"):
        generate(tiny_model, ids, 50)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 20), st.floats(0.05, 1.0), st.integers(0, 10_000))
def test_top_k_and_top_p_only_sample_allowed_tokens(k, p, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 30, generator=g)
    tok = sample(logits, temperature=1.0, top_k=k, top_p=p, generator=g)
    probs = logits.softmax(-1)
    for b in range(4):
        order = probs[b].argsort(descending=True).tolist()
        rank = order.index(int(tok[b]))
        assert rank < k
        mass_before = probs[b, order[:rank]].sum().item()
        assert mass_before < p + 1e-6  # nucleus: tokens after the mass reached p are dropped


def test_temperature_zero_is_argmax():
    logits = torch.randn(5, 40)
    assert torch.equal(sample(logits, temperature=0), logits.argmax(-1))


