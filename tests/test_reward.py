"""Tests for minidpo/dataset/reward.py, trained on the shipped IMDb sample (data/imdb_sample.tar.gz)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minidpo.dataset.imdb import IMDB_SAMPLE_PATH, load_imdb
from minidpo.dataset.reward import (
    BIGRAM_MULT,
    BIGRAM_SALT,
    SentimentClassifier,
    fit_logistic_regression,
    hashed_features,
    nb_log_count_ratio,
    tokenize,
    word_hash,
)
from minidpo.formats.safetensors import save_file

words = st.sampled_from(["good", "bad", "great", "awful", "film", "the", "not", "!", "?", "it's", "Boring", "10"])
texts = st.lists(words, max_size=12).map(" ".join)


@pytest.fixture(scope="module")
def sample():
    train = load_imdb(IMDB_SAMPLE_PATH, "train")
    test = load_imdb(IMDB_SAMPLE_PATH, "test")
    return train, test


@pytest.fixture(scope="module")
def model(sample):
    train, _ = sample
    return SentimentClassifier(dim=2**18).fit([r.text for r in train], [r.label for r in train])


def test_fit_on_sample_train_beats_chance_on_sample_test(model, sample):
    _, test = sample
    assert model.accuracy([r.text for r in test], [r.label for r in test]) > 0.7


def test_clearly_positive_text_scores_above_clearly_negative_text(model):
    pos, neg = model.score(["a wonderful, beautiful film. I loved it, the best acting and a great story",
                            "an awful, boring waste of time. the worst acting and a terrible story"])
    assert pos > 0.5 > neg


@settings(max_examples=30, deadline=None)
@given(batch=st.lists(texts, max_size=6))
def test_scores_are_probabilities_and_batching_does_not_change_them(model, batch):
    scores = model.score(batch)
    assert scores.shape == (len(batch),) and scores.dtype == torch.float32
    assert bool(((scores >= 0) & (scores <= 1)).all())
    one_by_one = torch.cat([model.score([t]) for t in batch]) if batch else torch.zeros(0)
    # bigrams never straddle two texts of a batch; only the sparse kernel's summation order may differ
    torch.testing.assert_close(scores, one_by_one, rtol=0, atol=1e-6)


def test_save_load_round_trip_gives_identical_scores(model, sample, tmp_path):
    _, test = sample
    model.save(tmp_path / "reward.safetensors")
    loaded = SentimentClassifier.load(tmp_path / "reward.safetensors")
    assert loaded.config() == model.config()
    batch = [r.text for r in test[:50]] + ["", "!!!"]
    assert torch.equal(loaded.score(batch), model.score(batch))


def test_load_rejects_a_foreign_safetensors_file(tmp_path):
    save_file({"weight": torch.zeros(4)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not a minidpo.dataset.reward"):
        SentimentClassifier.load(tmp_path / "other.safetensors")


@pytest.mark.parametrize("labels, match", [
    ([1, 2], r"labels\[1\] = 2"),
    (["pos", "unsup"], r"labels\[1\] = 'unsup'"),
    ([1, 0.0], r"labels\[1\] = 0.0"),
    ([1, None], r"labels\[1\] = None"),
    ([1], "2 texts but 1 labels"),
    ([1, 1], "both classes"),
    (torch.tensor([1, 1]), "both classes"),
])
def test_bad_labels_raise_a_clear_error(labels, match):
    with pytest.raises(ValueError, match=match):
        SentimentClassifier(dim=64).fit(["good", "bad"], labels)


def test_labels_may_be_ints_bools_strings_or_a_tensor():
    texts = ["good fun", "bad dull", "good", "dull"]
    forms = ([1, 0, 1, 0], [True, False, True, False], ["pos", "neg", "pos", "neg"], torch.tensor([1, 0, 1, 0]))
    scores = [SentimentClassifier(dim=256).fit(texts, y).score(texts) for y in forms]
    assert all(torch.equal(s, scores[0]) for s in scores)


def test_single_string_and_unfitted_model_raise(model):
    with pytest.raises(TypeError, match="single str"):
        model.score("a great film")
    with pytest.raises(RuntimeError, match="fit"):
        SentimentClassifier().score(["a great film"])


@settings(max_examples=40, deadline=None)
@given(batch=st.lists(texts, min_size=1, max_size=4), dim=st.sampled_from([7, 64, 2**20]))
def test_hashed_features_match_the_naive_definition(batch, dim):
    X = hashed_features(batch, dim).to_dense()
    expected = torch.zeros(len(batch), dim)
    for i, text in enumerate(batch):
        hashes = [word_hash(w) for w in tokenize(text)]
        for h in hashes:
            expected[i, h % dim] = 1.0
        for a, b in zip(hashes, hashes[1:]):
            expected[i, ((a * BIGRAM_MULT) ^ (b + BIGRAM_SALT)) % dim] = 1.0
    assert torch.equal(X, expected)


def test_tokenize_lowercases_and_keeps_contractions_and_exclamations():
    assert tokenize("It's GREAT!\nReally, 10/10?") == ["it's", "great", "!", "really", "10", "10", "?"]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), alpha=st.floats(0.1, 2.0))
def test_nb_log_count_ratio_matches_the_naive_formula(seed, alpha):
    g = torch.Generator().manual_seed(seed)
    X = (torch.rand(12, 9, generator=g) < 0.4).float()  # (N, dim) binary
    y = torch.tensor([1.0, 0.0] * 6)
    p = alpha + X[y == 1].sum(0)
    q = alpha + X[y == 0].sum(0)
    expected = torch.log(p / p.sum()) - torch.log(q / q.sum())
    torch.testing.assert_close(nb_log_count_ratio(X.to_sparse_csr(), y, alpha), expected)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), l2=st.sampled_from([1e-2, 1e-1]))
def test_logistic_regression_ends_at_a_stationary_point_of_its_objective(seed, l2):
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(40, 6, generator=g) * (torch.rand(40, 6, generator=g) < 0.5)  # (N, dim)
    y = (torch.rand(40, generator=g) < 0.5).float()
    y[:2] = torch.tensor([0.0, 1.0])
    w, b = fit_logistic_regression(X.to_sparse_csr(), y, l2=l2, max_iter=200)
    w, b = w.clone().requires_grad_(), b.clone().requires_grad_()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(X @ w + b, y) + 0.5 * l2 * (w**2).sum()
    loss.backward()
    # stationary up to float32: L-BFGS stops when a step changes the float32 loss by less than its resolution, which
    # leaves gradients up to a few 1e-4 on some draws (seed 134217727, l2 0.01: 2e-4); an unconverged fit is ~1e-1
    assert w.grad.abs().max() < 1e-3 and b.grad.abs().max() < 1e-3
