"""Tests for minidpo/dataset/prompts.py: 2-8 token prefixes of distinct IMDB reviews, on the shipped sample."""

from types import SimpleNamespace

import pytest

from minidpo.dataset.imdb import IMDB_SAMPLE_PATH, load_imdb
from minidpo.dataset.prompts import make_prompts, review_name
from minidpo.model.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer()


@pytest.fixture(scope="module")
def train():
    return load_imdb(IMDB_SAMPLE_PATH, "train")


def test_prompts_are_the_first_2_to_8_tokens_of_distinct_train_reviews(train, tok):
    out = make_prompts(train, tok, n=200, seed=3)
    by_name = {review_name(r): r for r in train}
    assert len(out) == 200 and len({p.review for p in out}) == 200
    assert {len(p.ids) for p in out} == set(range(2, 9))  # inclusive range, both ends reached in 200 draws
    for p in out:
        assert p.ids == tok.encode(by_name[p.review].text)[:len(p.ids)]
        assert p.text == tok.decode(p.ids) and p.split == "train"


def test_prompts_are_reproducible_from_the_seed_and_change_with_it(train, tok):
    a, b, c = (make_prompts(train, tok, n=20, seed=s) for s in (5, 5, 6))
    assert a == b and a != c


def test_make_prompts_rejects_more_prompts_than_reviews(train, tok):
    with pytest.raises(ValueError, match="n=601"):
        make_prompts(train, tok, n=len(train) + 1)


def test_reviews_no_longer_than_their_prefix_are_skipped_and_n_none_takes_every_usable_one(tok):
    def review(i, text):
        return SimpleNamespace(split="test", label="pos", id=i, text=text)

    # 1, 9, 2 and 3 tokens: a 2-token prefix of the 1- or 2-token review would leave nothing to continue
    reviews = [review(0, "Great"), review(1, "A truly wonderful film, I loved it."), review(2, "Bad."),
               review(3, "Bad film.")]
    out = make_prompts(reviews, tok, n=None, min_len=2, max_len=2)
    assert sorted(p.review for p in out) == ["test/pos/1", "test/pos/3"]
    assert all(len(p.ids) == 2 and p.split == "test" for p in out)
    with pytest.raises(ValueError, match="only 2 of the 4"):
        make_prompts(reviews, tok, n=3, min_len=2, max_len=2)




@pytest.mark.parametrize("seed", [0, 1, 2])
def test_held_out_and_evaluation_prompts_never_repeat_a_training_prompt(tok, seed):
    """Distinct reviews open alike ("This is", "I love"): the tiny preset's split (576 train, 24 held-out, 128
    evaluation prompts on the shipped sample) once shared 0-5 prompts between train and test per seed."""
    from minidpo.dataset.prompts import PromptConfig
    from minidpo.experiment.context import Reviews
    from minidpo.experiment.stages import make_prompt_sets
    reviews = Reviews(IMDB_SAMPLE_PATH, load_imdb(IMDB_SAMPLE_PATH, "train", ("pos", "neg")),
                      load_imdb(IMDB_SAMPLE_PATH, "test", ("pos", "neg")))
    sets = make_prompt_sets(reviews, tok, PromptConfig(train=576, heldout=24, eval=128, seed=seed), reviews.train)
    train_ids = {tuple(p.ids) for p in sets.train}
    assert len(sets.heldout) == 24 and len(sets.eval) == 128
    assert not [p.text for p in sets.heldout + sets.eval if tuple(p.ids) in train_ids]


def test_excluded_prompts_are_skipped_and_the_next_review_takes_their_place(train, tok):
    first = make_prompts(train, tok, n=30, seed=4)
    again = make_prompts(train, tok, n=30, seed=4, exclude=first[:5])
    assert not {tuple(p.ids) for p in first[:5]} & {tuple(p.ids) for p in again}
    assert len(again) == 30 and [p for p in again if p in first[5:]] == [p for p in first[5:] if p in again]
