"""Judge-free metrics: classification (accuracy, precision, recall, F1, confusion matrix) and text overlap
(ROUGE-L, exact match)."""

from __future__ import annotations

import math
import string
from collections.abc import Sequence


def confusion_matrix(actual: Sequence[int], predicted: Sequence[int], num_classes: int) -> list[list[int]]:
    """``m[a][p]`` = number of rows of actual class ``a`` predicted as ``p``."""
    m = [[0] * num_classes for _ in range(num_classes)]
    for a, p in zip(actual, predicted, strict=True):
        m[a][p] += 1
    return m


def classification_metrics(actual: Sequence[int], predicted: Sequence[int], positive: int = 1) -> dict[str, float]:
    """Accuracy, and precision/recall/F1 of the ``positive`` class (0.0 where undefined, as sklearn)."""
    pairs = list(zip(actual, predicted, strict=True))
    tp = sum(a == positive and p == positive for a, p in pairs)
    fp = sum(a != positive and p == positive for a, p in pairs)
    fn = sum(a == positive and p != positive for a, p in pairs)
    correct = sum(a == p for a, p in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": correct / len(pairs) if pairs else math.nan,
        "precision": precision,
        "recall": recall,
        "f1": f1,
    }


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1: longest common subsequence of lowercased whitespace tokens (Lin, 2004; beta = 1)."""
    c, r = candidate.lower().split(), reference.lower().split()
    if not c or not r:
        return float(c == r)  # both empty: a perfect match; one empty: nothing in common
    prev = [0] * (len(r) + 1)  # LCS table, one row at a time
    for tc in c:
        cur = [0]
        for j, tr in enumerate(r):
            cur.append(prev[j] + 1 if tc == tr else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(c), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_text(text: str) -> str:
    return " ".join(text.lower().translate(_PUNCT).split())


def exact_match(a: str, b: str) -> bool:
    """Equal after lowercasing, dropping ASCII punctuation and collapsing whitespace."""
    return normalize_text(a) == normalize_text(b)
