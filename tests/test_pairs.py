"""Tests for minidpo/pairs.py: prompts, both pair modes, the pairs cache and the DPO collate, on the shipped sample."""

import json
import os
import warnings
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings, strategies as st

from minidpo.dpo import concatenated_forward
from minidpo.imdb import IMDB_SAMPLE_PATH, load_imdb
from minidpo.model import GPT, GPTConfig
from minidpo.pairs import (Pair, PairsConfig, Prompt, build_pairs, cached_pairs, collate_pairs, cut_at_eot,
                           fit_pairs, load_pairs, make_prompts, module_fingerprint, pairs_fingerprint,
                           preference_pairs, read_fingerprint, save_pairs, split_pairs)
from minidpo.tokenizer import Tokenizer

SETTINGS = settings(max_examples=40, deadline=None)
EOT = 50256


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer()


@pytest.fixture(scope="module")
def reviews():
    return load_imdb(IMDB_SAMPLE_PATH, "train"), load_imdb(IMDB_SAMPLE_PATH, "test")


@pytest.fixture(scope="module")
def prompts(reviews, tok) -> list[Prompt]:
    return make_prompts(reviews[0], tok, n=6, seed=0)


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)  # vocab must be GPT-2's: prompts are real tokenizer ids up to 50256
    return GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=1, n_head=2, n_embd=16)).eval()


def eot_loving_gpt() -> GPT:
    """Every position outputs the same hidden vector v and wte[eot] = 30 v / |v|^2, so the eot logit is 30 while
    the others stay ~0: the model ends exactly at min_new_tokens, once eot is allowed."""
    model = tiny_gpt(1)
    with torch.no_grad():
        v = torch.randn(16)
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(v)
        model.transformer.wte.weight[EOT] = 30 * v / v.dot(v)
    return model


def len_scorer(texts: list[str]) -> list[float]:
    return [float(len(t)) for t in texts]


def make_pair(prompt_len: int, chosen_len: int, rejected_len: int, split: str = "train") -> Pair:
    p, c, r = list(range(1, prompt_len + 1)), list(range(100, 100 + chosen_len)), list(range(200, 200 + rejected_len))
    return Pair("p", "c", "r", p, c, r, 1.0, 0.0, split)


# ----------------------------------------------------------------------------- prompts


def test_prompts_are_the_first_2_to_8_tokens_of_distinct_train_reviews(reviews, tok):
    train = reviews[0]
    out = make_prompts(train, tok, n=200, seed=3)
    by_name = {f"{r.split}/{r.label}/{r.id}": r for r in train}
    assert len(out) == 200 and len({p.review for p in out}) == 200
    assert {len(p.ids) for p in out} == set(range(2, 9))  # inclusive range, both ends reached in 200 draws
    for p in out:
        assert p.ids == tok.encode(by_name[p.review].text)[:len(p.ids)]
        assert p.text == tok.decode(p.ids) and p.split == "train"


def test_prompts_are_reproducible_from_the_seed_and_change_with_it(reviews, tok):
    a, b, c = (make_prompts(reviews[0], tok, n=20, seed=s) for s in (5, 5, 6))
    assert a == b and a != c


def test_make_prompts_rejects_more_prompts_than_reviews(reviews, tok):
    with pytest.raises(ValueError, match="n=601"):
        make_prompts(reviews[0], tok, n=len(reviews[0]) + 1)


# ----------------------------------------------------------------------------- pairing logic


@SETTINGS
@given(st.lists(st.integers(0, 4), min_size=2, max_size=8))
def test_all_pairs_are_exactly_the_distinct_score_pairs_with_higher_score_chosen(scores):
    pairs = preference_pairs(scores, "all")
    expected = {frozenset((i, j)) for i in range(len(scores)) for j in range(i) if scores[i] != scores[j]}
    assert len(pairs) == len(expected) and {frozenset(p) for p in pairs} == expected
    assert all(scores[c] > scores[r] for c, r in pairs)


@SETTINGS
@given(st.lists(st.integers(0, 4), min_size=2, max_size=8))
def test_best_vs_worst_gives_one_pair_unless_all_scores_tie(scores):
    pairs = preference_pairs(scores, "best_vs_worst")
    if len(set(scores)) == 1:
        assert pairs == []
    else:
        [(c, r)] = pairs
        assert scores[c] == max(scores) and scores[r] == min(scores)


def test_four_distinct_scores_give_six_pairs_and_ties_are_dropped():
    assert len(preference_pairs([0.1, 0.9, 0.5, 0.3])) == 6
    assert len(preference_pairs([0.5, 0.5, 0.5, 0.1])) == 3


def test_cut_at_eot_keeps_the_first_eot_and_nothing_after():
    assert cut_at_eot([5, 6, EOT, EOT, 7]) == [5, 6, EOT]
    assert cut_at_eot([5, 6]) == [5, 6]


# ----------------------------------------------------------------------------- generated mode


def test_generated_pairs_rank_scored_completions_within_length_bounds(prompts, tok):
    seen: list[str] = []

    def recording_scorer(texts):
        seen.extend(texts)
        return len_scorer(texts)

    cfg = PairsConfig(min_new_tokens=2, max_new_tokens=6, batch_size=8, seed=1)
    pairs = build_pairs(cfg, prompts, tok, model=tiny_gpt(), scorer=recording_scorer, progress=False)
    assert len(seen) == 4 * len(prompts)
    for q, p in enumerate(prompts):
        texts = seen[4 * q:4 * q + 4]
        assert all(t.startswith(p.text) for t in texts)  # the classifier sees prompt + completion
        mine = [x for x in pairs if x.prompt_ids == p.ids]
        assert len(mine) == len(preference_pairs(len_scorer(texts)))
    for x in pairs:
        assert x.chosen_score > x.rejected_score and x.split == "train"
        for ids, text in ((x.chosen_ids, x.chosen), (x.rejected_ids, x.rejected)):
            body = ids[:-1] if ids[-1] == EOT else ids
            assert 2 <= len(body) <= 6 and EOT not in body and text == tok.decode(body)


def test_generated_pairs_are_reproducible_and_change_with_the_seed(prompts, tok):
    cfg = PairsConfig(min_new_tokens=2, max_new_tokens=4, batch_size=8, seed=1)
    a = build_pairs(cfg, prompts[:3], tok, model=tiny_gpt(), scorer=len_scorer, progress=False)
    b = build_pairs(cfg, prompts[:3], tok, model=tiny_gpt(), scorer=len_scorer, progress=False)
    c = build_pairs(replace(cfg, seed=2), prompts[:3], tok, model=tiny_gpt(), scorer=len_scorer, progress=False)
    assert a == b and a != c


def test_completion_ends_at_first_eot_which_ids_keep_and_text_drops(prompts, tok):
    cfg = PairsConfig(min_new_tokens=3, max_new_tokens=8, length_per_batch=False, batch_size=16)
    pairs = build_pairs(cfg, prompts[:3], tok, model=eot_loving_gpt(), scorer=len_scorer, progress=False)
    assert pairs
    for x in pairs:
        for ids, text in ((x.chosen_ids, x.chosen), (x.rejected_ids, x.rejected)):
            assert len(ids) == 4 and ids[-1] == EOT and EOT not in ids[:-1] and text == tok.decode(ids[:-1])


def test_budget_is_drawn_per_batch_and_shared_by_a_prompts_completions(prompts, tok):
    # random tiny GPT virtually never emits eot, so every completion uses its whole budget
    cfg = PairsConfig(min_new_tokens=2, max_new_tokens=9, n_completions=2, batch_size=2, seed=4)
    pairs = build_pairs(cfg, prompts, tok, model=tiny_gpt(), scorer=len_scorer, progress=False)
    for x in pairs:
        assert len(x.chosen_ids) == len(x.rejected_ids)
    assert len({len(x.chosen_ids) for x in pairs}) > 1


def test_generation_progress_goes_to_stderr(prompts, tok, capsys):
    cfg = PairsConfig(min_new_tokens=1, max_new_tokens=2, batch_size=4)
    build_pairs(cfg, prompts[:2], tok, model=tiny_gpt(), scorer=len_scorer, progress=True)
    err = capsys.readouterr().err
    assert "generated prompts 2/2" in err and "elapsed" in err


def test_scorer_object_with_score_method_and_bad_scores(prompts, tok):
    class Classifier:
        def score(self, texts):
            return torch.tensor(len_scorer(texts))

    cfg = PairsConfig(min_new_tokens=1, max_new_tokens=2, batch_size=4, pairing="best_vs_worst")
    pairs = build_pairs(cfg, prompts[:2], tok, model=tiny_gpt(), scorer=Classifier(), progress=False)
    assert len(pairs) <= 2 and all(x.chosen_score > x.rejected_score for x in pairs)
    with pytest.raises(ValueError, match="one finite score per text"):
        build_pairs(cfg, prompts[:2], tok, model=tiny_gpt(), scorer=lambda t: [0.0], progress=False)


# ----------------------------------------------------------------------------- labels mode


def test_label_pairs_continue_with_same_range_of_a_pos_and_a_neg_review(reviews, tok):
    train, test = reviews
    ps = make_prompts(train, tok, n=10, seed=0) + make_prompts(test, tok, n=5, seed=0)
    cfg = PairsConfig(mode="labels", min_new_tokens=4, max_new_tokens=12, seed=2)
    pairs = build_pairs(cfg, ps, tok, reviews=train + test)
    assert len(pairs) == 15
    pools = {}
    for r in train + test:
        pools.setdefault((r.split, r.label), []).append(tok.encode(r.text))
    for p, x in zip(ps, pairs):
        k, m = len(p.ids), len(x.chosen_ids)
        assert x.split == p.split and 4 <= m <= 12 and len(x.rejected_ids) == m
        assert (x.chosen_score, x.rejected_score) == (1.0, 0.0)
        assert any(ids[k:k + m] == x.chosen_ids for ids in pools[p.split, "pos"])
        assert any(ids[k:k + m] == x.rejected_ids for ids in pools[p.split, "neg"])
        assert x.chosen == tok.decode(x.chosen_ids)


@pytest.mark.parametrize("bad, match", [(dict(mode="ppo"), "mode"), (dict(pairing="best"), "pairing"),
                                        (dict(min_new_tokens=5, max_new_tokens=4), "min_new_tokens"),
                                        (dict(n_completions=1), "n_completions")])
def test_pairs_config_rejects_bad_values_naming_them(bad, match):
    with pytest.raises(ValueError, match=match):
        PairsConfig(**bad)


def test_labels_mode_needs_reviews_and_generated_mode_needs_model(prompts, tok):
    with pytest.raises(ValueError, match="reviews="):
        build_pairs(PairsConfig(mode="labels"), prompts, tok)
    with pytest.raises(ValueError, match="model="):
        build_pairs(PairsConfig(), prompts, tok, scorer=len_scorer)


# ----------------------------------------------------------------------------- files and cache


def test_save_then_load_roundtrips_one_json_object_per_pair(tmp_path):
    pairs = [make_pair(2, 3, 4), make_pair(3, 1, 2, split="test")]
    path = tmp_path / "pairs.jsonl"
    save_pairs(pairs, path, "abc")
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["fingerprint"] == "abc"
    assert json.loads(lines[2])["rejected_ids"] == pairs[1].rejected_ids
    assert load_pairs(path) == pairs and read_fingerprint(path) == "abc"


def test_cached_pairs_reuses_file_when_fingerprint_same_and_rebuilds_when_changed(tmp_path):
    calls = []

    def build():
        calls.append(1)
        return [make_pair(2, 3, len(calls))]

    path = tmp_path / "pairs.jsonl"
    first = cached_pairs(path, "fp1", build, verbose=False)
    mtime = path.stat().st_mtime_ns
    again = cached_pairs(path, "fp1", build, verbose=False)
    assert len(calls) == 1 and again == first and path.stat().st_mtime_ns == mtime
    rebuilt = cached_pairs(path, "fp2", build, verbose=False)
    assert len(calls) == 2 and rebuilt != first and read_fingerprint(path) == "fp2"


def test_failed_write_leaves_old_file_untouched_and_no_partial_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    bad = [make_pair(2, 2, 2), replace(make_pair(2, 2, 2), chosen_score=float("nan"))]
    with pytest.raises(ValueError):
        save_pairs(bad, path, "x")
    assert os.listdir(tmp_path) == []
    save_pairs([make_pair(2, 2, 2)], path, "old")
    before = path.read_bytes()

    def failing_build():
        raise RuntimeError("generation crashed")

    with pytest.raises(ValueError):
        save_pairs(bad, path, "new")
    with pytest.raises(RuntimeError):
        cached_pairs(path, "new", failing_build, verbose=False)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["pairs.jsonl"]


def test_fingerprint_changes_with_every_input(prompts):
    cfg = PairsConfig()
    base = pairs_fingerprint(cfg, prompts, "m", "s", "d")
    assert base == pairs_fingerprint(PairsConfig(), list(prompts), "m", "s", "d")
    variants = [pairs_fingerprint(replace(cfg, seed=1), prompts, "m", "s", "d"),
                pairs_fingerprint(replace(cfg, n_completions=5), prompts, "m", "s", "d"),
                pairs_fingerprint(replace(cfg, max_new_tokens=17), prompts, "m", "s", "d"),
                pairs_fingerprint(replace(cfg, mode="labels"), prompts, "m", "s", "d"),
                pairs_fingerprint(cfg, prompts[:-1], "m", "s", "d"),
                pairs_fingerprint(cfg, prompts, "m2", "s", "d"),
                pairs_fingerprint(cfg, prompts, "m", "s2", "d"),
                pairs_fingerprint(cfg, prompts, "m", "s", "d2")]
    assert len(set(variants + [base])) == len(variants) + 1


def test_module_fingerprint_follows_the_weights():
    a, b = tiny_gpt(0), tiny_gpt(0)
    assert module_fingerprint(a) == module_fingerprint(b)
    with torch.no_grad():
        b.transformer.h[0].mlp.c_fc.weight[0, 0] += 1e-3
    assert module_fingerprint(a) != module_fingerprint(b)


def test_split_pairs_holds_out_test_review_prompts():
    pairs = [make_pair(2, 2, 2), make_pair(3, 2, 2, "test"), make_pair(4, 2, 2)]
    train, held_out = split_pairs(pairs)
    assert train == [pairs[0], pairs[2]] and held_out == [pairs[1]]


# ----------------------------------------------------------------------------- collate


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


@SETTINGS
@given(pair_shapes, st.integers(2, 10), st.integers(0, EOT))
def test_collate_masks_are_exact_and_no_response_is_empty(shapes, max_length, pad_id):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pairs, _ = fit_pairs([make_pair(*s) for s in shapes], max_length)
    if not pairs:
        return
    batch = collate_pairs(pairs, max_length, pad_id=pad_id)
    T = batch["chosen_ids"].size(1)
    assert T <= max_length
    for side in ("chosen", "rejected"):
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


def test_collate_refuses_pairs_that_fit_pairs_would_drop():
    with pytest.raises(ValueError, match="fit_pairs"):
        collate_pairs([make_pair(2, 2, 2), make_pair(5, 2, 2)], max_length=5)


def test_collated_batch_gives_dpo_the_naive_response_logprob():
    model = tiny_gpt()
    pairs = [make_pair(3, 4, 2), make_pair(2, 6, 5)]
    batch = collate_pairs(pairs, max_length=7)
    out = concatenated_forward(model, batch)
    for b, p in enumerate(pairs):
        for side in ("chosen", "rejected"):
            resp = getattr(p, f"{side}_ids")[:7 - len(p.prompt_ids)]
            seq = torch.tensor([p.prompt_ids + resp])
            logp = model(seq).log_softmax(-1)[0, :-1].gather(-1, seq[0, 1:, None]).squeeze(-1)  # (n-1,)
            expected = logp[len(p.prompt_ids) - 1:].sum()
            torch.testing.assert_close(out[f"{side}_logps"][b], expected, atol=1e-4, rtol=1e-4)
