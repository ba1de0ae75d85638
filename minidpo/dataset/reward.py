"""
A from-scratch sentiment classifier that plays the reward model of the DPO IMDb experiment.

Reference: Rafailov et al. 2023, "Direct Preference Optimization", sec. 6.1: the reward of a completion
is a sentiment classifier's opinion of it (the paper used a pre-trained RoBERTa; we train our own so
nothing is downloaded). The model is NB-LR, the logistic-regression twin of Wang & Manning 2012,
"Baselines and Bigrams: Simple, Good Sentiment and Topic Classification" (NBSVM), which reports
~91% on IMDb with unigrams + bigrams:

    x  = binarized bag of hashed unigrams and bigrams            (hashing trick, Weinberger et al. 2009)
    r  = log(p / |p|_1) - log(q / |q|_1)                          naive-Bayes log-count ratio per feature
    P(positive | text) = sigmoid((x * r) . w + b)                 logistic regression on NB-scaled features

Only v = r * w and b are stored, so scoring is one sparse mat-vec. Files are safetensors, never pickle.
"""

from __future__ import annotations

import json
import os
import re
import time
import warnings
import zlib
from typing import Sequence

import torch
from torch import Tensor

from minidpo.formats.safetensors import load_file, load_metadata, save_file

TOKEN_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[!?]")  # words, contractions kept whole, and ! ?
BIGRAM_MULT = 1_000_003  # mixes the first word's hash so (a, b) and (b, a) land in different buckets
BIGRAM_SALT = 0x9E3779B9  # keeps a bigram off the bucket of its own second word
FORMAT = "minidpo.dataset.reward.SentimentClassifier/1"


def tokenize(text: str) -> list[str]:
    """Lowercase regex word tokenizer: "Great film!" -> ["great", "film", "!"]."""
    return TOKEN_RE.findall(text.lower())


def word_hash(word: str) -> int:
    """A stable 32-bit hash (Python's hash() is salted per process, so it cannot be saved)."""
    return zlib.crc32(word.encode("utf-8"))


def _csr(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # torch flags CSR as "beta" on first use; the ops used here are stable
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


def hashed_features(texts: Sequence[str], dim: int) -> Tensor:
    """Binarized bag of hashed unigrams + bigrams as a sparse CSR float matrix [N, dim].

    Naive equivalent: X[i, j] = 1.0 if any unigram u of texts[i] has word_hash(u) % dim == j, or any
    adjacent pair (a, b) has ((word_hash(a) * BIGRAM_MULT) ^ (word_hash(b) + BIGRAM_SALT)) % dim == j.
    """
    vocab: dict[str, int] = {}  # hash each distinct word once, not once per occurrence
    ids: list[int] = []
    offsets = [0]
    for text in texts:
        ids.extend([vocab.setdefault(w, len(vocab)) for w in tokenize(text)])
        offsets.append(len(ids))
    hashes = torch.tensor([word_hash(w) for w in vocab], dtype=torch.int64)  # (V,)
    h = hashes[torch.tensor(ids, dtype=torch.int64)]  # (T,) all tokens of all texts, concatenated
    lengths = torch.tensor(offsets[1:]) - torch.tensor(offsets[:-1])  # (N,)
    doc = torch.repeat_interleave(torch.arange(len(texts)), lengths)  # (T,) which text each token is in
    same_doc = doc[1:] == doc[:-1]  # (T-1,) a bigram must not straddle two texts
    bigram = ((h[:-1] * BIGRAM_MULT) ^ (h[1:] + BIGRAM_SALT))[same_doc]
    rows = torch.cat([doc, doc[1:][same_doc]])
    cols = torch.cat([h, bigram]) % dim
    # unique() both binarizes (drops repeats) and sorts by (row, col), which is CSR order
    key = torch.unique(rows * dim + cols)
    rows, cols = key // dim, key % dim
    crow = torch.zeros(len(texts) + 1, dtype=torch.int64)
    crow[1:] = torch.bincount(rows, minlength=len(texts)).cumsum(0)
    values = torch.ones(len(key), dtype=torch.float32)
    return _csr(crow, cols, values, (len(texts), dim))


def nb_log_count_ratio(X: Tensor, y: Tensor, alpha: float) -> Tensor:
    """Per-feature naive-Bayes log-count ratio r [dim] from binary features X [N, dim] and 0/1 labels y [N].

    Naive equivalent: p = alpha + X[y == 1].sum(0); q = alpha + X[y == 0].sum(0);
                      r = log(p / p.sum()) - log(q / q.sum())
    """
    col = X.col_indices()
    row = torch.repeat_interleave(torch.arange(X.shape[0]), X.crow_indices().diff())  # (nnz,)
    positive = y[row]  # (nnz,) 1.0 where that nonzero belongs to a positive text
    p = torch.bincount(col, weights=positive, minlength=X.shape[1]) + alpha
    q = torch.bincount(col, weights=1.0 - positive, minlength=X.shape[1]) + alpha
    return (torch.log(p / p.sum()) - torch.log(q / q.sum())).float()


def fit_logistic_regression(X: Tensor, y: Tensor, l2: float, max_iter: int) -> tuple[Tensor, Tensor]:
    """Full-batch L-BFGS on L2-regularized logistic regression; returns (w [dim], b [1]).

    Naive equivalent: argmin over w, b of
        binary_cross_entropy_with_logits(X @ w + b, y) + l2 / 2 * (w ** 2).sum()
    The gradient is written by hand (X^T (sigmoid(z) - y) / N + l2 w) so that both products are
    sparse CSR mat-vecs; X^T is built once.
    """
    n, dim = X.shape
    Xt = X.t().to_sparse_csr()  # (dim, N)
    w = torch.zeros(dim, requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=10, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        with torch.no_grad():
            z = X @ w + b  # (N,)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(z, y) + 0.5 * l2 * w.dot(w)
            err = (torch.sigmoid(z) - y) / n  # (N,) d loss / d z
            w.grad = Xt @ err + l2 * w
            b.grad = err.sum().reshape(1)
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def labels_to_tensor(labels: Sequence[int | bool | str] | Tensor, n: int, need_both: bool = True) -> Tensor:
    """Accept 1/0, True/False or "pos"/"neg" per text; return float y [n]. Anything else is an error."""
    if isinstance(labels, Tensor):
        labels = labels.tolist()
    labels = list(labels)
    if len(labels) != n:
        raise ValueError(f"SentimentClassifier: got {n} texts but {len(labels)} labels")
    mapping = {1: 1.0, 0: 0.0, "pos": 1.0, "neg": 0.0}
    y = []
    for i, label in enumerate(labels):
        # a float 1.0 would match the key 1; reject it so that probabilities are not mistaken for labels
        if not isinstance(label, (int, str)) or label not in mapping:
            raise ValueError(f"SentimentClassifier: labels[{i}] = {label!r}; expected 1/0, True/False or 'pos'/'neg'")
        y.append(mapping[label])
    if need_both and len(set(y)) < 2:
        raise ValueError("SentimentClassifier.fit: labels must contain both classes (positive and negative)")
    return torch.tensor(y, dtype=torch.float32)


def _check_texts(texts: Sequence[str], where: str) -> list[str]:
    if isinstance(texts, str):  # iterating a str would silently score each character
        raise TypeError(f"SentimentClassifier.{where}: expected a list of strings, got a single str")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"SentimentClassifier.{where}: texts[{i}] is {type(t).__name__}, expected str")
    return texts


class SentimentClassifier:
    """NB-LR sentiment classifier over hashed unigrams + bigrams. score(texts) -> P(positive) [N]."""

    def __init__(self, dim: int = 2**20, alpha: float = 1.0, l2: float = 1e-4, max_iter: int = 60) -> None:
        if dim < 1 or alpha <= 0 or l2 < 0 or max_iter < 1:
            raise ValueError(f"SentimentClassifier: bad config dim={dim} alpha={alpha} l2={l2} max_iter={max_iter}")
        self.dim, self.alpha, self.l2, self.max_iter = dim, alpha, l2, max_iter
        self.weight: Tensor | None = None  # (dim,) r * w, folded
        self.bias: Tensor | None = None  # (1,)
        self.fit_seconds = 0.0

    def fit(self, texts: Sequence[str], labels: Sequence[int | bool | str] | Tensor) -> "SentimentClassifier":
        t0 = time.perf_counter()
        texts = _check_texts(texts, "fit")
        y = labels_to_tensor(labels, len(texts))
        X = hashed_features(texts, self.dim)
        r = nb_log_count_ratio(X, y, self.alpha)
        scaled = _csr(X.crow_indices(), X.col_indices(), X.values() * r[X.col_indices()], tuple(X.shape))  # X * r
        w, b = fit_logistic_regression(scaled, y, self.l2, self.max_iter)
        self.weight, self.bias = r * w, b
        self.fit_seconds = time.perf_counter() - t0
        return self

    def logits(self, texts: Sequence[str]) -> Tensor:
        """log P(pos) - log P(neg) per text [N]; a real-valued alternative to score() as a reward."""
        texts = _check_texts(texts, "logits")
        if self.weight is None or self.bias is None:
            raise RuntimeError("SentimentClassifier: call fit() or load() before scoring")
        if not texts:
            return torch.zeros(0)
        # A sparse fp32 mat-vec, outside any autocast region on purpose: bf16 has no sparse kernel on CPU, and the
        # reward is a metric that must not depend on the policy's precision.
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return hashed_features(texts, self.dim) @ self.weight + self.bias  # (N,)

    def score(self, texts: Sequence[str]) -> Tensor:
        """P(positive) per text, a float tensor [N] with values in [0, 1]."""
        return torch.sigmoid(self.logits(texts))

    def accuracy(self, texts: Sequence[str], labels: Sequence[int | bool | str] | Tensor) -> float:
        """Fraction of texts whose score is on the side of 0.5 their label says."""
        texts = _check_texts(texts, "accuracy")
        y = labels_to_tensor(labels, len(texts), need_both=False)
        return ((self.score(texts) > 0.5).float() == y).float().mean().item()

    def config(self) -> dict:
        return {"dim": self.dim, "alpha": self.alpha, "l2": self.l2, "max_iter": self.max_iter}

    def save(self, path: str | os.PathLike) -> None:
        """Write weight, bias and the config (as JSON metadata) to a .safetensors file."""
        if self.weight is None or self.bias is None:
            raise RuntimeError("SentimentClassifier.save: nothing to save, call fit() first")
        meta = {"format": FORMAT, "config": json.dumps(self.config()), "token_re": TOKEN_RE.pattern}
        save_file({"weight": self.weight.contiguous(), "bias": self.bias.contiguous()}, path, metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SentimentClassifier":
        meta = load_metadata(path)
        if meta.get("format") != FORMAT or meta.get("token_re") != TOKEN_RE.pattern:
            raise ValueError(f"{path}: not a {FORMAT} file with this tokenizer (metadata: {meta})")
        model = cls(**json.loads(meta["config"]))
        tensors = load_file(path)
        for key, shape in (("weight", (model.dim,)), ("bias", (1,))):
            if key not in tensors or tuple(tensors[key].shape) != shape:
                raise ValueError(f"{path}: expected tensor {key!r} of shape {shape}")
        model.weight, model.bias = tensors["weight"].float().clone(), tensors["bias"].float().clone()
        return model
