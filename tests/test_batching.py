"""Tests for minidpo/dataset/batching.py: fit/split, the data order, and the two collations (per pair and per unique
sequence), including a model whose vocabulary is smaller than GPT-2's."""

import warnings

import pytest
import torch
from conftest import tiny_gpt
from hypothesis import given, settings
from hypothesis import strategies as st

from minidpo.dataset.batching import (
    collate_pairs,
    collate_unique,
    fit_pairs,
    prompt_groups,
    split_pairs,
    stream_indices,
)
from minidpo.dataset.pairs import Pair, preference_pairs
from minidpo.methods.dpo import concatenated_forward
from minidpo.model.gpt import GPT
from minidpo.model.tokenizer import EOT_ID

SETTINGS = settings(max_examples=40, deadline=None)
SIDES = ("chosen", "rejected")


def small_gpt(vocab_size: int = EOT_ID + 1, seed: int = 0) -> GPT:
    return tiny_gpt(seed, vocab_size=vocab_size, n_layer=1, n_embd=16, block_size=64)


def make_pair(prompt_len: int, chosen_len: int, rejected_len: int, split: str = "train") -> Pair:
    p, c, r = list(range(1, prompt_len + 1)), list(range(100, 100 + chosen_len)), list(range(200, 200 + rejected_len))
    return Pair("p", "c", "r", p, c, r, 1.0, 0.0, split)


def all_pairs(prompt: list[int], completions: list[list[int]], split: str = "train") -> list[Pair]:
    """The paper's pairing of one prompt's completions, completion i scored i."""
    return [Pair("p", "c", "r", prompt, completions[c], completions[r], float(c), float(r), split)
            for c, r in preference_pairs(list(range(len(completions))))]


def naive_response_logp(model: GPT, prompt: list[int], response: list[int]) -> torch.Tensor:
    seq = torch.tensor([prompt + response])
    logp = model(seq).log_softmax(-1)[0, :-1].gather(-1, seq[0, 1:, None]).squeeze(-1)  # (n-1,)
    return logp[len(prompt) - 1:].sum()


# ----------------------------------------------------------------------------- which pairs


def test_split_pairs_holds_out_test_review_prompts():
    pairs = [make_pair(2, 2, 2), make_pair(3, 2, 2, "test"), make_pair(4, 2, 2)]
    train, held_out = split_pairs(pairs)
    assert train == [pairs[0], pairs[2]] and held_out == [pairs[1]]


pair_shapes = st.lists(st.tuples(st.integers(1, 6), st.integers(1, 7), st.integers(1, 7)), min_size=1, max_size=6)


@SETTINGS
@given(pair_shapes, st.integers(2, 10))
def test_fit_pairs_drops_exactly_the_prompts_with_no_room_in_one_warning(shapes, max_length):
    pairs = [make_pair(*s) for s in shapes]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kept, n_dropped = fit_pairs(pairs, max_length)
    assert kept == [p for p in pairs if len(p.prompt_ids) < max_length]
    assert n_dropped == len(pairs) - len(kept)
    assert len(caught) == (1 if n_dropped else 0)
    if n_dropped:
        assert str(n_dropped) in str(caught[0].message)


# keys of a few prompts (two share ids but not split), each with a few completions drawn from a small pool
group_specs = st.lists(st.tuples(st.sampled_from([(1, 2), (3,), (1, 2, 4)]), st.sampled_from(["train", "test"]),
                                 st.lists(st.sampled_from([(7,), (8, 9), (7, 8), (9, 9, 9)]), min_size=2,
                                          max_size=4, unique=True)), min_size=1, max_size=5)


def pairs_from(specs) -> list[Pair]:
    return [p for prompt, split, comps in specs for p in all_pairs(list(prompt), [list(c) for c in comps], split)]


@SETTINGS
@given(group_specs)
def test_prompt_groups_partition_the_pairs_by_split_and_prompt_in_order_of_first_appearance(specs):
    pairs = pairs_from(specs)
    groups = prompt_groups(pairs)
    assert sorted(i for g in groups for i in g) == list(range(len(pairs)))
    keys = [(pairs[g[0]].split, pairs[g[0]].prompt_ids) for g in groups]
    assert len(set(map(str, keys))) == len(keys)
    for g, key in zip(groups, keys):
        assert g == sorted(g) and all((pairs[i].split, pairs[i].prompt_ids) == key for i in g)
    assert [g[0] for g in groups] == sorted(g[0] for g in groups)


# ----------------------------------------------------------------------------- data order


@SETTINGS
@given(st.integers(1, 12), st.integers(0, 40), st.integers(0, 30), st.integers(0, 30), st.integers(0, 3))
def test_index_stream_slices_compose_and_every_epoch_is_a_permutation(n, start, a, b, seed):
    whole = stream_indices(n, start, a + b, seed)
    assert whole == stream_indices(n, start, a, seed) + stream_indices(n, start + a, b, seed)  # resume = same stream
    stream = stream_indices(n, 0, 3 * n, seed)
    assert all(sorted(stream[e * n:(e + 1) * n]) == list(range(n)) for e in range(3))


def test_index_stream_depends_on_the_seed_and_refuses_nothing_to_draw():
    assert stream_indices(50, 0, 50, 0) != stream_indices(50, 0, 50, 1)
    assert stream_indices(50, 0, 50, 0) != stream_indices(50, 50, 50, 0)  # epochs differ
    with pytest.raises(ValueError, match="n >= 1"):
        stream_indices(0, 0, 4, 0)


# ----------------------------------------------------------------------------- collate_pairs


@SETTINGS
@given(pair_shapes, st.integers(2, 10), st.integers(0, EOT_ID))
def test_collate_masks_are_exact_and_no_response_is_empty(shapes, max_length, pad_id):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pairs, _ = fit_pairs([make_pair(*s) for s in shapes], max_length)
    if not pairs:
        return
    batch = collate_pairs(pairs, max_length, pad_id=pad_id)
    T = batch["chosen_ids"].size(1)
    assert T <= max_length
    for side in SIDES:
        ids, attn, resp = (batch[f"{side}_{k}"] for k in ("ids", "attention_mask", "response_mask"))
        assert ids.shape == attn.shape == resp.shape == (len(pairs), T) and ids.dtype == torch.long
        for b, p in enumerate(pairs):
            n_p = len(p.prompt_ids)
            response = getattr(p, f"{side}_ids")[:max_length - n_p]
            n = n_p + len(response)
            assert len(response) >= 1
            assert ids[b, :n].tolist() == p.prompt_ids + response
            assert ids[b, n:].tolist() == [pad_id] * (T - n)
            assert attn[b].tolist() == [1] * n + [0] * (T - n)
            assert resp[b].tolist() == [0] * n_p + [1] * len(response) + [0] * (T - n)


def test_collated_batch_gives_dpo_the_naive_response_logprob():
    model = small_gpt()
    pairs = [make_pair(3, 4, 2), make_pair(2, 6, 5)]
    out = concatenated_forward(model, collate_pairs(pairs, max_length=7))
    for b, p in enumerate(pairs):
        for side in SIDES:
            expected = naive_response_logp(model, p.prompt_ids, getattr(p, f"{side}_ids")[:7 - len(p.prompt_ids)])
            torch.testing.assert_close(out[f"{side}_logps"][b], expected, atol=1e-4, rtol=1e-4)


def test_a_model_with_a_small_vocabulary_trains_on_prompts_of_different_lengths_with_its_own_pad_id():
    # GPT-2's eot (50256) as padding used to crash a 100-token model with IndexError once prompts differed in length
    model, pad_id = small_gpt(vocab_size=100), 99
    pairs = [Pair("p", "c", "r", [5, 6], [7, 8, 9], [10], 1.0, 0.0),
             Pair("p", "c", "r", [11, 12, 13, 14, 15], [16, 98], [17, 18, 19, 20], 1.0, 0.0)]
    batch = collate_pairs(pairs, max_length=12, pad_id=pad_id)
    assert int(batch["chosen_ids"].max()) < 100 and (batch["rejected_ids"] == pad_id).any()
    out = concatenated_forward(model, batch)
    unique = collate_unique(pairs, max_length=12, pad_id=pad_id)
    assert int(unique["ids"].max()) == pad_id
    logits = model(unique["ids"])  # (N, T, 100): runs, no out-of-vocabulary id
    assert logits.shape[:2] == unique["ids"].shape
    for b, p in enumerate(pairs):
        for side in SIDES:
            expected = naive_response_logp(model, p.prompt_ids, getattr(p, f"{side}_ids"))
            torch.testing.assert_close(out[f"{side}_logps"][b], expected, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- collate_unique


@SETTINGS
@given(group_specs, st.integers(4, 7), st.integers(0, 300))
def test_unique_rows_are_the_distinct_sequences_and_each_pair_points_at_its_collate_pairs_rows(specs, max_length,
                                                                                              pad_id):
    pairs = pairs_from(specs)
    if not pairs:
        return
    u = collate_unique(pairs, max_length, pad_id=pad_id)
    b = collate_pairs(pairs, max_length, pad_id=pad_id)
    distinct = {(tuple(p.prompt_ids), tuple(getattr(p, f"{s}_ids"))) for p in pairs for s in SIDES}
    N, T = u["ids"].shape
    assert N == len(distinct) and T == b["chosen_ids"].size(1)
    assert u["chosen_index"].shape == u["rejected_index"].shape == (len(pairs),)
    assert u["chosen_index"].dtype == u["rejected_index"].dtype == torch.long
    for side in SIDES:
        rows = u[f"{side}_index"]
        for key in ("ids", "attention_mask", "response_mask"):
            assert torch.equal(u[key][rows], b[f"{side}_{key}"]), (side, key)


def test_four_completions_paired_all_ways_are_four_sequences_for_six_pairs():
    pairs = all_pairs([1, 2, 3], [[10, EOT_ID], [11, 12, EOT_ID], [13, 14], [15]])
    u = collate_unique(pairs, max_length=16)
    assert len(pairs) == 6 and u["ids"].size(0) == 4
    # response_mask covers the completion and its final eot
    assert u["response_mask"].sum().item() == 2 + 3 + 2 + 1
    for c, r, p in zip(u["chosen_index"].tolist(), u["rejected_index"].tolist(), pairs):
        assert c != r and u["ids"][c, 3:3 + len(p.chosen_ids)].tolist() == p.chosen_ids


def test_unique_rows_of_whole_prompts_are_each_prompts_rows_in_turn():
    # the precomputed reference stores log-probs per prompt group and concatenates them for a batch of groups
    pairs = all_pairs([1, 2], [[5], [6, 7], [8]]) + all_pairs([3], [[5], [9, 9], [6, 7], [4]])
    groups = prompt_groups(pairs)
    together = collate_unique(pairs, max_length=8)
    alone = [collate_unique([pairs[i] for i in g], max_length=8) for g in groups]

    def rows(batch):
        return [ids[mask.bool()].tolist() for ids, mask in zip(batch["ids"], batch["attention_mask"])]

    assert rows(together) == rows(alone[0]) + rows(alone[1])
    offset = alone[0]["ids"].size(0)
    assert together["chosen_index"].tolist() == (alone[0]["chosen_index"].tolist()
                                                 + [offset + i for i in alone[1]["chosen_index"].tolist()])
