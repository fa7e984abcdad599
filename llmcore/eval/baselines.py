"""Count-based baselines a trained language model must beat: unigram and bigram cross-entropy.

Both are *exact* counts over the whole train stream (no sampling), scored on the whole validation stream,
in nats per token, the unit of the model's loss:

    unigram   p(t)     = (c(t) + k) / (N + k·V)
    bigram    p(b | a) = (c(a, b) + k) / (c(a) + k·V)       c(a) = times ``a`` is followed by a token

Add-k smoothing (Lidstone; k = 1 is Laplace) gives tokens and pairs never seen in training a small
probability, so a validation token unseen in training costs a finite loss instead of infinity. The
default k = 0.01 is small because the vocabulary is large next to the counts: Laplace's k = 1 would
hand most of the mass of a rare context's row to the V - (few) pairs never seen after it. The bigram's
first validation token has no predecessor and is not scored (N - 1 predictions).

``unigram_entropy`` is the entropy of the train stream's own token frequencies (no smoothing): the loss of
the best context-free predictor on the train stream itself. A model below it uses context.
Pairs are counted sparsely (``np.unique`` over ``a·V + b``), so a 50k vocabulary costs O(N) memory, not V².
"""

from __future__ import annotations

import numpy as np

DEFAULT_K = 0.01


def _as_ids(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    ids = np.asarray(tokens).astype(np.int64, copy=False)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"token ids must be in [0, {vocab_size}), got {ids.min()}..{ids.max()}")
    return ids


def unigram_counts(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    return np.bincount(_as_ids(tokens, vocab_size), minlength=vocab_size)


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats) of the empirical token distribution of ``tokens``."""
    counts = unigram_counts(tokens, vocab_size)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def unigram_loss(train: np.ndarray, val: np.ndarray, vocab_size: int, k: float = DEFAULT_K) -> float:
    """Mean -log p(t) over ``val`` under the add-k unigram model of ``train``."""
    counts = unigram_counts(train, vocab_size).astype(np.float64)
    logp = np.log(counts + k) - np.log(counts.sum() + k * vocab_size)
    return float(-logp[_as_ids(val, vocab_size)].mean())


def bigram_loss(train: np.ndarray, val: np.ndarray, vocab_size: int, k: float = DEFAULT_K) -> float:
    """Mean -log p(b | a) over consecutive ``val`` pairs under the add-k bigram model of ``train``."""
    train, val = _as_ids(train, vocab_size), _as_ids(val, vocab_size)
    if len(val) < 2:
        raise ValueError("the validation stream needs at least 2 tokens for a bigram loss")
    V = vocab_size
    pairs, pair_counts = np.unique(train[:-1] * V + train[1:], return_counts=True)  # sorted pair codes
    context_counts = np.bincount(train[:-1], minlength=V).astype(np.float64)
    query = val[:-1] * V + val[1:]
    pos = np.minimum(np.searchsorted(pairs, query), len(pairs) - 1)
    c_ab = np.where(pairs[pos] == query, pair_counts[pos], 0).astype(np.float64)
    logp = np.log(c_ab + k) - np.log(context_counts[val[:-1]] + k * V)
    return float(-logp.mean())


def baselines(train: np.ndarray, val: np.ndarray, vocab_size: int, k: float = DEFAULT_K) -> dict[str, float]:
    """The three numbers the pretraining report puts beside the model's losses."""
    return {
        "unigram_val_loss": unigram_loss(train, val, vocab_size, k),
        "bigram_val_loss": bigram_loss(train, val, vocab_size, k),
        "train_unigram_entropy": unigram_entropy(train, vocab_size),
        "baseline_k": k,
    }
