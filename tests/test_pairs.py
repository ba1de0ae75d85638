"""Tests for minidpo/dataset/pairs.py and minidpo/dataset/pairs_cache.py: both pair modes, the config checks, the pairs
file and its cache, on the shipped IMDB sample."""

import hashlib
import itertools
import json
import math
import os
from dataclasses import replace

import pytest
import torch
from conftest import tiny_gpt, with_sampling
from hypothesis import given, settings
from hypothesis import strategies as st

from minidpo.config import ConfigError
from minidpo.dataset.imdb import IMDB_SAMPLE_PATH, load_imdb
from minidpo.dataset.pairs import Pair, PairsConfig, build_pairs, preference_pairs
from minidpo.dataset.pairs_cache import (
    FORMAT,
    PairsFileError,
    cached_pairs,
    load_pairs,
    module_fingerprint,
    pairs_fingerprint,
    read_fingerprint,
    save_pairs,
)
from minidpo.dataset.prompts import Prompt, make_prompts
from minidpo.model.completions import cut_at_eot
from minidpo.model.generate import SamplingConfig
from minidpo.model.gpt import GPT
from minidpo.model.tokenizer import EOT_ID, Tokenizer

SETTINGS = settings(max_examples=40, deadline=None)
EOT = EOT_ID


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer()


@pytest.fixture(scope="module")
def reviews():
    return load_imdb(IMDB_SAMPLE_PATH, "train"), load_imdb(IMDB_SAMPLE_PATH, "test")


@pytest.fixture(scope="module")
def prompts(reviews, tok) -> list[Prompt]:
    return make_prompts(reviews[0], tok, n=6, seed=0)


def gpt2_vocab_gpt(seed: int = 0) -> GPT:
    # vocab must be GPT-2's: prompts are real tokenizer ids up to 50256
    return tiny_gpt(seed, vocab_size=50257, n_layer=1, n_embd=16, block_size=64)


def eot_loving_gpt() -> GPT:
    """Every position outputs the same hidden vector v and wte[eot] = 30 v / |v|^2, so the eot logit is 30 while
    the others stay ~0: the model ends exactly at min_new_tokens, once eot is allowed."""
    model = gpt2_vocab_gpt(1)
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

    cfg = PairsConfig(sampling=SamplingConfig(min_new_tokens=2, max_new_tokens=6), batch_size=8, seed=1)
    pairs = build_pairs(cfg, prompts, tok, model=gpt2_vocab_gpt(), scorer=recording_scorer)
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
    cfg = PairsConfig(sampling=SamplingConfig(min_new_tokens=2, max_new_tokens=4), batch_size=8, seed=1)
    a = build_pairs(cfg, prompts[:3], tok, model=gpt2_vocab_gpt(), scorer=len_scorer)
    b = build_pairs(cfg, prompts[:3], tok, model=gpt2_vocab_gpt(), scorer=len_scorer)
    c = build_pairs(replace(cfg, seed=2), prompts[:3], tok, model=gpt2_vocab_gpt(), scorer=len_scorer)
    assert a == b and a != c


def test_completion_ends_at_first_eot_which_ids_keep_and_text_drops(prompts, tok):
    cfg = PairsConfig(sampling=SamplingConfig(min_new_tokens=3, max_new_tokens=8), length_per_batch=False,
                      batch_size=16)
    pairs = build_pairs(cfg, prompts[:3], tok, model=eot_loving_gpt(), scorer=len_scorer)
    assert pairs
    for x in pairs:
        for ids, text in ((x.chosen_ids, x.chosen), (x.rejected_ids, x.rejected)):
            assert len(ids) == 4 and ids[-1] == EOT and EOT not in ids[:-1] and text == tok.decode(ids[:-1])


def test_budget_is_drawn_per_batch_and_shared_by_a_prompts_completions(prompts, tok):
    # random tiny GPT virtually never emits eot, so every completion uses its whole budget
    cfg = PairsConfig(sampling=SamplingConfig(min_new_tokens=2, max_new_tokens=9), n_completions=2, batch_size=2,
                      seed=4)
    pairs = build_pairs(cfg, prompts, tok, model=gpt2_vocab_gpt(), scorer=len_scorer)
    for x in pairs:
        assert len(x.chosen_ids) == len(x.rejected_ids)
    assert len({len(x.chosen_ids) for x in pairs}) > 1


def test_progress_goes_through_log_one_line_per_phase_and_nothing_is_printed(prompts, tok, capsys):
    cfg = PairsConfig(sampling=SamplingConfig(min_new_tokens=1, max_new_tokens=2), batch_size=4)
    lines: list[str] = []
    build_pairs(cfg, prompts[:3], tok, model=gpt2_vocab_gpt(), scorer=len_scorer, log=lines.append)
    assert capsys.readouterr() == ("", "")
    assert [x.split(" (")[0] for x in lines] == ["pairs: generated prompts 3/3", "pairs: scored 12/12"]


def test_identical_completions_never_form_a_pair_and_are_reported(prompts, tok):
    counter = itertools.count()

    def impure_scorer(texts):  # a scorer that is not a function of the text, e.g. batch-dependent rounding
        return [float(next(counter)) for _ in texts]

    # greedy: 4 equal samples
    cfg = PairsConfig(sampling=SamplingConfig(min_new_tokens=2, max_new_tokens=3, temperature=0.0), batch_size=8)
    lines: list[str] = []
    pairs = build_pairs(cfg, prompts[:2], tok, model=gpt2_vocab_gpt(), scorer=impure_scorer, log=lines.append)
    assert pairs == []
    assert any("dropped 12 of 12 pairs" in x and "same tokens" in x for x in lines)


def test_scorer_object_with_score_method_and_bad_scores(prompts, tok):
    class Classifier:
        def score(self, texts):
            return torch.tensor(len_scorer(texts))

    cfg = PairsConfig(sampling=SamplingConfig(min_new_tokens=1, max_new_tokens=2), batch_size=4,
                      pairing="best_vs_worst")
    pairs = build_pairs(cfg, prompts[:2], tok, model=gpt2_vocab_gpt(), scorer=Classifier())
    assert len(pairs) <= 2 and all(x.chosen_score > x.rejected_score for x in pairs)
    with pytest.raises(ValueError, match="one finite score per text"):
        build_pairs(cfg, prompts[:2], tok, model=gpt2_vocab_gpt(), scorer=lambda t: [0.0])


# ----------------------------------------------------------------------------- labels mode


def test_label_pairs_continue_with_same_range_of_a_pos_and_a_neg_review(reviews, tok):
    train, test = reviews
    ps = make_prompts(train, tok, n=10, seed=0) + make_prompts(test, tok, n=5, seed=0)
    cfg = PairsConfig(sampling=SamplingConfig(min_new_tokens=4, max_new_tokens=12), mode="labels", seed=2)
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


@pytest.mark.parametrize("bad, field", [
    (dict(mode="ppo"), "mode"), (dict(pairing="best"), "pairing"), (dict(n_completions=1), "n_completions"),
    (dict(batch_size=0), "batch_size"), (dict(min_new_tokens=0), "min_new_tokens"),
    (dict(min_new_tokens=5, max_new_tokens=4), "max_new_tokens"), (dict(temperature=-0.5), "temperature"),
    (dict(temperature=math.nan), "temperature"), (dict(temperature=math.inf), "temperature"),
    (dict(top_k=-1), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=math.nan), "top_p"),
])
def test_pairs_config_rejects_bad_values_with_a_config_error_naming_the_field(bad, field):
    with pytest.raises(ConfigError) as err:
        with_sampling(PairsConfig, **bad)
    assert err.value.field == field and str(err.value).startswith(field)


def test_pairs_config_accepts_the_edge_values_that_mean_off_or_greedy():
    cfg = PairsConfig(sampling=SamplingConfig(temperature=0.0, top_k=0, top_p=1.0, min_new_tokens=1, max_new_tokens=1),
                      n_completions=2, batch_size=1)
    assert cfg.sampling.top_k == 0 and cfg.sampling.top_p == 1.0


def test_top_k_zero_samples_like_top_k_off(prompts, tok):
    cfg = PairsConfig(sampling=SamplingConfig(min_new_tokens=2, max_new_tokens=3), batch_size=8, seed=3)
    off = build_pairs(cfg, prompts[:2], tok, model=gpt2_vocab_gpt(), scorer=len_scorer)
    assert build_pairs(replace(cfg, sampling=replace(cfg.sampling, top_k=0)), prompts[:2], tok, model=gpt2_vocab_gpt(),
                       scorer=len_scorer) == off


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
    first = cached_pairs(path, "fp1", build)
    mtime = path.stat().st_mtime_ns
    again = cached_pairs(path, "fp1", build)
    assert len(calls) == 1 and again == first and path.stat().st_mtime_ns == mtime
    rebuilt = cached_pairs(path, "fp2", build)
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
        cached_pairs(path, "new", failing_build)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["pairs.jsonl"]


def test_fingerprint_changes_with_every_input(prompts):
    cfg = PairsConfig()
    base = pairs_fingerprint(cfg, prompts, "m", "s", "d")
    assert base == pairs_fingerprint(PairsConfig(), list(prompts), "m", "s", "d")
    variants = [pairs_fingerprint(replace(cfg, seed=1), prompts, "m", "s", "d"),
                pairs_fingerprint(replace(cfg, n_completions=5), prompts, "m", "s", "d"),
                pairs_fingerprint(replace(cfg, sampling=replace(cfg.sampling, max_new_tokens=17)), prompts, "m", "s",
                                  "d"),
                pairs_fingerprint(replace(cfg, mode="labels"), prompts, "m", "s", "d"),
                pairs_fingerprint(cfg, prompts[:-1], "m", "s", "d"),
                pairs_fingerprint(cfg, prompts, "m2", "s", "d"),
                pairs_fingerprint(cfg, prompts, "m", "s2", "d"),
                pairs_fingerprint(cfg, prompts, "m", "s", "d2")]
    assert len(set(variants + [base])) == len(variants) + 1


def test_module_fingerprint_follows_the_weights():
    a, b = gpt2_vocab_gpt(0), gpt2_vocab_gpt(0)
    assert module_fingerprint(a) == module_fingerprint(b)
    with torch.no_grad():
        b.transformer.h[0].mlp.c_fc.weight[0, 0] += 1e-3
    assert module_fingerprint(a) != module_fingerprint(b)


# ----------------------------------------------------------------------------- damaged files


def _pairs_file(tmp_path, n: int = 3):
    path = tmp_path / "pairs.jsonl"
    pairs = [make_pair(2, 3, 4 + i) for i in range(n)]
    save_pairs(pairs, path, "fp")
    return path, pairs


def _with_valid_sha(header: dict, body: bytes) -> bytes:
    """A file whose header sha256 matches its body, so the checks after the checksum are reached."""
    header = dict(header, sha256=hashlib.sha256(body).hexdigest())
    return json.dumps(header).encode() + b"\n" + body


DAMAGES = {
    "cut mid-line": lambda data: data[:-7],
    "last line lost": lambda data: data[:data.rstrip(b"\n").rfind(b"\n") + 1],
    "line edited": lambda data: data.replace(b'"chosen_score": 1.0', b'"chosen_score": 9.0', 1),
    "header missing": lambda data: data[data.find(b"\n") + 1:],
    "header cut": lambda data: data[:20],
    "empty": lambda data: b"",
    "not utf-8": lambda data: data[:-3] + b"\xff\xfe\n",
    "older format": lambda data: data.replace(FORMAT.encode(), b"minidpo-pairs/1", 1),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_cached_pairs_rebuilds_a_damaged_file_with_one_message_naming_it(tmp_path, damage):
    path, _ = _pairs_file(tmp_path)
    path.write_bytes(DAMAGES[damage](path.read_bytes()))
    with pytest.raises(PairsFileError, match=str(path)):
        load_pairs(path)
    fresh = [make_pair(2, 2, 2)]
    lines: list[str] = []
    assert cached_pairs(path, "fp", lambda: fresh, log=lines.append) == fresh
    assert len(lines) == 1 and str(path) in lines[0] and "cannot use it" in lines[0]
    assert load_pairs(path) == fresh and os.listdir(tmp_path) == ["pairs.jsonl"]


def test_load_pairs_names_the_line_of_a_bad_pair_even_with_a_matching_checksum(tmp_path):
    path, pairs = _pairs_file(tmp_path)
    header, *lines = path.read_bytes().split(b"\n")[:-1]
    header = json.loads(header)
    cases = {3: b'{"prompt": "p"}', 4: b"{not json", 2: lines[0].replace(b"[1, 2]", b"[1, -2]")}
    for lineno, bad in cases.items():
        body = lines[:]
        body[lineno - 2] = bad
        path.write_bytes(_with_valid_sha(header, b"\n".join(body) + b"\n"))
        with pytest.raises(PairsFileError, match=f"{path}:{lineno}: "):
            load_pairs(path)
    path.write_bytes(_with_valid_sha(header, b"\n".join(lines[:2]) + b"\n"))
    with pytest.raises(PairsFileError, match="header says 3 pairs, file has 2"):
        load_pairs(path)
    path.write_bytes(_with_valid_sha(header, b"\n".join(lines).replace(b"1.0", b"NaN", 1) + b"\n"))
    with pytest.raises(PairsFileError, match=":2: "):
        load_pairs(path)


def test_header_records_count_and_body_checksum(tmp_path):
    path, pairs = _pairs_file(tmp_path)
    data = path.read_bytes()
    header = json.loads(data[:data.find(b"\n")])
    assert header == {"format": FORMAT, "fingerprint": "fp", "n_pairs": 3,
                      "sha256": hashlib.sha256(data[data.find(b"\n") + 1:]).hexdigest()}


def test_line_separators_inside_texts_survive_the_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    pairs = [replace(make_pair(2, 2, 2), chosen="a\u2028b\rc\nd\u0085e", rejected="\u00e9\u4e2d")]
    save_pairs(pairs, path, "fp")
    assert load_pairs(path) == pairs
