"""Byte-level BPE training, producing tiktoken-style mergeable ranks.

The output of :func:`train_bpe` is a ``dict[bytes, int]``: the 256 single bytes at ranks 0..255, then one
token per merge in the order the merges were learned. That is exactly what ``tiktoken.Encoding`` takes as
``mergeable_ranks``, so encoding and decoding afterwards run in tiktoken's Rust core (see ``tokenizer.py``).

Algorithm (the approach of GPT-2's BPE, HuggingFace ``tokenizers`` and Karpathy's minbpe/rustbpe):

1. Split the text on the special tokens (no merge may cross or learn them), then pre-tokenize each piece
   with a split regex (GPT-2's or GPT-4's ``cl100k`` pattern) into chunks; merges never cross chunks.
2. Count the chunks once: unique chunk -> frequency. TinyShakespeare has ~300k chunks but only ~15k unique.
3. Count adjacent pairs over the unique chunks, weighted by frequency, and index pair -> chunk ids.
4. Repeatedly take the most frequent pair from a max-heap, merge it in the chunks that contain it (the
   index says which), and update the pair counts *incrementally* from the before/after pairs of just those
   chunks. Heap entries go stale as counts change; they are fixed lazily when popped (see ``_pop_best``).

Tie-break (deterministic): among pairs with equal count, the pair whose ``(left token bytes, right token
bytes)`` is lexicographically smallest wins. Merges inside a chunk are applied left to right,
non-overlapping (``a a a`` merging ``(a, a)`` gives ``aa a``).

If a merge would produce a byte string that is already a token (rare: the same bytes split differently
in different contexts, e.g. ``(a, bc)`` learned after ``(ab, c)``), the chunks reuse the existing token and
no new rank is spent, as HuggingFace's trainer does: ranks stay unique, which tiktoken requires. Training
continues until ``vocab_size`` is reached exactly, or fails with :class:`LLMCoreError` if the text runs out
of pairs first.

:func:`train_bpe_naive` recounts every pair for every merge; it is the oracle for equivalence tests and the
baseline for benchmarks.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from collections.abc import Iterable
from itertools import pairwise

import regex

from llmcore.common import LLMCoreError

# GPT-2's split pattern as tiktoken writes it (r50k_base): equivalent to the original
# r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""" but faster.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# GPT-4's cl100k_base pattern: case-insensitive contractions, digits in groups of at most 3.
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s"""
)
PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}
ENDOFTEXT = "<|endoftext|>"

Pair = tuple[int, int]


def resolve_pattern(pattern: str) -> str:
    """Map ``"gpt2"``/``"gpt4"`` to their split regex; any other string is taken as a raw regex and checked."""
    pat = PATTERNS.get(pattern, pattern)
    try:
        regex.compile(pat)
    except regex.error as e:
        raise LLMCoreError(f"invalid BPE split pattern {pattern!r}: {e}") from None
    return pat


def count_chunks(text: str, pattern: str = "gpt2", special_tokens: Iterable[str] = (ENDOFTEXT,)) -> Counter:
    """Pre-tokenize ``text`` and count each unique chunk (as UTF-8 bytes); special tokens are cut out first."""
    split = regex.compile(resolve_pattern(pattern))
    specials = sorted(set(special_tokens), key=len, reverse=True)  # longest first, like tiktoken
    pieces = regex.split("|".join(map(regex.escape, specials)), text) if specials else [text]
    counts: Counter[str] = Counter()
    for piece in pieces:
        counts.update(split.findall(piece))
    return Counter({chunk.encode("utf-8"): n for chunk, n in counts.items() if chunk})


def _check_args(vocab_size: int, special_tokens: list[str]) -> int:
    """Validate and return the number of merges to learn."""
    if len(set(special_tokens)) != len(special_tokens) or any(not s for s in special_tokens):
        raise LLMCoreError(f"special_tokens must be distinct non-empty strings, got {special_tokens!r}")
    n_merges = vocab_size - 256 - len(special_tokens)
    if n_merges < 0:
        raise LLMCoreError(
            f"vocab_size={vocab_size} is too small: need at least 256 byte tokens + "
            f"{len(special_tokens)} special tokens = {256 + len(special_tokens)}"
        )
    return n_merges


def _out_of_pairs(vocab_size: int, n_tokens: int) -> LLMCoreError:
    return LLMCoreError(
        f"text too small for vocab_size={vocab_size}: it ran out of pairs to merge at {n_tokens} tokens"
    )


def _merge(ids: list[int], a: int, b: int, new: int) -> list[int]:
    """Replace every non-overlapping ``(a, b)`` in ``ids``, left to right, with ``new``."""
    out = []
    i, n = 0, len(ids)
    while i < n:
        if ids[i] == a and i + 1 < n and ids[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def train_bpe(
    text: str,
    vocab_size: int,
    *,
    pattern: str = "gpt2",
    special_tokens: list[str] | None = None,
) -> dict[bytes, int]:
    """Train a byte-level BPE vocabulary on ``text``.

    Args:
        text: the training corpus.
        vocab_size: total vocabulary size, *including* the special tokens, so the number of merges is
            ``vocab_size - 256 - len(special_tokens)``.
        pattern: ``"gpt2"``, ``"gpt4"`` (cl100k) or a raw regex (``regex`` module syntax) for pre-tokenization.
        special_tokens: strings cut out of the text before training; they get ids after the merges
            (assigned by the caller, e.g. :class:`llmcore.text.tokenizer.Tokenizer`). Default ``["<|endoftext|>"]``.

    Returns:
        Mergeable ranks ``{token bytes: rank}``: ``bytes([i]) -> i`` for the 256 bytes, then the merges in
        order, ``vocab_size - len(special_tokens)`` entries in all. Ties break toward the lexicographically
        smallest ``(left bytes, right bytes)``, so training is deterministic.

    Raises:
        LLMCoreError: vocab_size too small, invalid pattern, or a text too small to reach vocab_size.
    """
    special_tokens = [ENDOFTEXT] if special_tokens is None else list(special_tokens)
    n_merges = _check_args(vocab_size, special_tokens)
    chunk_counts = count_chunks(text, pattern, special_tokens)

    vocab: list[bytes] = [bytes([i]) for i in range(256)]  # token id -> bytes; ids double as ranks
    ranks: dict[bytes, int] = {tok: i for i, tok in enumerate(vocab)}
    words: list[list[int]] = [list(chunk) for chunk in chunk_counts]  # unique chunks as token ids
    freqs: list[int] = list(chunk_counts.values())

    # Pair counts over unique chunks, weighted by frequency, plus an index pair -> chunks containing it.
    # The index is allowed to hold stale chunk ids (chunks that no longer contain the pair); they are
    # skipped when visited, which is cheaper than removing them on every merge.
    counts: dict[Pair, int] = defaultdict(int)
    where: dict[Pair, set[int]] = defaultdict(set)
    for w, (ids, f) in enumerate(zip(words, freqs, strict=True)):
        for pair in pairwise(ids):
            counts[pair] += f
            where[pair].add(w)
    # Max-heap via negated counts; the bytes make ties break toward the smallest (left, right).
    heap = [(-c, vocab[a], vocab[b], (a, b)) for (a, b), c in counts.items()]
    heapq.heapify(heap)

    while len(vocab) < 256 + n_merges:
        best = _pop_best(heap, counts)
        if best is None:
            raise _out_of_pairs(vocab_size, len(vocab) + len(special_tokens))
        a, b = best
        merged = vocab[a] + vocab[b]
        new = ranks.get(merged)
        if new is None:  # usual case: a brand-new token
            new = ranks[merged] = len(vocab)
            vocab.append(merged)

        # Diff each affected chunk's pairs before/after the merge; only net changes touch `counts`.
        delta: dict[Pair, int] = defaultdict(int)
        for w in where.pop(best):
            ids = words[w]
            f = freqs[w]
            new_ids = _merge(ids, a, b, new)
            if len(new_ids) == len(ids):
                continue  # stale index entry
            words[w] = new_ids
            for pair in pairwise(ids):
                delta[pair] -= f
            for pair in pairwise(new_ids):
                delta[pair] += f
                # Only pairs with the new token can be new to this chunk; others were already indexed.
                if new in pair:
                    where[pair].add(w)
        for pair, d in delta.items():
            if d == 0:
                continue
            c = counts[pair] + d
            if c > 0:
                counts[pair] = c
                if d > 0:  # heap entries may only overestimate a count (see _pop_best): push increases
                    heapq.heappush(heap, (-c, vocab[pair[0]], vocab[pair[1]], pair))
            else:
                del counts[pair]
                where.pop(pair, None)
    return ranks


def _pop_best(heap: list, counts: dict[Pair, int]) -> Pair | None:
    """Pop the pair with the highest current count (ties: smallest bytes), or None when none is left.

    Invariant: every live pair has a heap entry whose stored count is >= its current count (decreases
    leave entries stale-high, increases push a fresh entry). So the first popped entry whose stored count
    equals the current count is the true best; stale-high entries are re-pushed with the current count.
    """
    while heap:
        neg, lb, rb, pair = heapq.heappop(heap)
        c = counts.get(pair, 0)
        if c == -neg:
            return pair
        if 0 < c < -neg:
            heapq.heappush(heap, (-c, lb, rb, pair))
        # else: the pair is gone, or a fresher (higher) entry for it is already in the heap
    return None


def train_bpe_naive(
    text: str,
    vocab_size: int,
    *,
    pattern: str = "gpt2",
    special_tokens: list[str] | None = None,
) -> dict[bytes, int]:
    """Reference trainer: same result as :func:`train_bpe`, but recounts every pair for every merge.

    Quadratic-ish and slow; kept as the oracle for tests and the baseline for benchmarks.
    """
    special_tokens = [ENDOFTEXT] if special_tokens is None else list(special_tokens)
    n_merges = _check_args(vocab_size, special_tokens)
    chunk_counts = count_chunks(text, pattern, special_tokens)
    vocab = [bytes([i]) for i in range(256)]
    ranks = {tok: i for i, tok in enumerate(vocab)}
    words = [(list(chunk), f) for chunk, f in chunk_counts.items()]
    while len(vocab) < 256 + n_merges:
        counts: Counter[Pair] = Counter()
        for ids, f in words:
            for pair in pairwise(ids):
                counts[pair] += f
        if not counts:
            raise _out_of_pairs(vocab_size, len(vocab) + len(special_tokens))
        a, b = min(counts, key=lambda p: (-counts[p], vocab[p[0]], vocab[p[1]]))
        merged = vocab[a] + vocab[b]
        if merged not in ranks:
            ranks[merged] = len(vocab)
            vocab.append(merged)
        words = [(_merge(ids, a, b, ranks[merged]), f) for ids, f in words]
    return ranks
