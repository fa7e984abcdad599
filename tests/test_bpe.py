"""BPE trainer: the incremental trainer against the recount-per-merge oracle, determinism, vocab accounting."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmcore.common import LLMCoreError
from llmcore.text.bpe import GPT2_PATTERN, count_chunks, train_bpe, train_bpe_naive
from tests.conftest import require_shared

SHAKESPEARE = "raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"

# Small texts with many equal pair counts, so the tie-break rule decides most merges.
TIE_TEXTS = [
    "ab cd ef gh ab cd ef gh",
    "aaaa bbbb aaaa bbbb abab baba",
    "the cat sat on the mat; the rat ate the hat.\n\n  tabs\tand  spaces   ",
    "zyx wvu zyx wvu 12 34 12 34 1234567 ÿþ ÿþ 你好 你好 🙂🙂 é é",
    "x<|endoftext|>y x<|endoftext|>y xy xy",
]


def merges(ranks: dict[bytes, int]) -> list[bytes]:
    return [tok for tok, _ in sorted(ranks.items(), key=lambda kv: kv[1])[256:]]


@pytest.fixture(scope="module")
def shakespeare(mirror_dir) -> str:
    return require_shared(mirror_dir / SHAKESPEARE).read_text(encoding="utf-8")


@pytest.mark.parametrize("text", TIE_TEXTS)
@pytest.mark.parametrize("pattern", ["gpt2", "gpt4", r"\S+|\s+"])
def test_fast_matches_naive_on_small_texts(text: str, pattern: str) -> None:
    n_pairs = sum(len(c) - 1 for c in count_chunks(text, pattern))
    for vocab_size in (257, 260, 257 + min(n_pairs, 12)):  # up to when merges may run out
        try:
            expected = train_bpe_naive(text, vocab_size, pattern=pattern)
        except LLMCoreError:
            with pytest.raises(LLMCoreError, match="ran out of pairs"):
                train_bpe(text, vocab_size, pattern=pattern)
            continue
        assert list(train_bpe(text, vocab_size, pattern=pattern).items()) == list(expected.items())


@settings(max_examples=150, deadline=None)
@given(text=st.text(alphabet="ab c\n'é1", max_size=120), n_merges=st.integers(0, 25))
def test_fast_matches_naive_property(text: str, n_merges: int) -> None:
    vocab_size = 256 + n_merges + 1
    try:
        expected = train_bpe_naive(text, vocab_size)
    except LLMCoreError:
        with pytest.raises(LLMCoreError):
            train_bpe(text, vocab_size)
        return
    assert list(train_bpe(text, vocab_size).items()) == list(expected.items())


def test_fast_matches_naive_on_shakespeare(shakespeare: str) -> None:
    text = shakespeare[:20_000]
    assert merges(train_bpe(text, 400)) == merges(train_bpe_naive(text, 400))


def test_deterministic_and_well_formed(shakespeare: str) -> None:
    text = shakespeare[:200_000]
    ranks = train_bpe(text, 1024)
    assert list(ranks.items()) == list(train_bpe(text, 1024).items())
    assert len(ranks) == 1023  # vocab_size counts the one special token
    assert sorted(ranks.values()) == list(range(1023))
    assert all(ranks[bytes([i])] == i for i in range(256))
    # Every merged token is the concatenation of two tokens of lower rank.
    for tok, rank in ranks.items():
        if rank >= 256:
            assert any(ranks.get(tok[:k], rank) < rank and ranks.get(tok[k:], rank) < rank for k in range(1, len(tok)))
    assert b" the" in ranks and b"ing" in ranks


def test_tie_break_rule() -> None:
    # Pairs (a,b), (c,d) and (x,y) all occur twice: the smallest bytes win, in order.
    assert merges(train_bpe("ab cd xy ab cd xy", 257 + 3, pattern=r"\S+|\s")) == [b"ab", b"cd", b"xy"]
    # A higher count beats smaller bytes.
    assert merges(train_bpe("ab zz zz", 257 + 1, pattern=r"\S+|\s")) == [b"zz"]
    # Left-to-right, non-overlapping merging inside a chunk: "aaa" -> "aa" "a".
    assert merges(train_bpe("aaa", 257 + 2, pattern=r"\S+")) == [b"aa", b"aaa"]


def test_vocab_size_counts_special_tokens() -> None:
    text = "the quick brown fox jumps over the lazy dog " * 50
    specials = ["<|endoftext|>", "<|pad|>"]
    assert len(train_bpe(text, 270, special_tokens=specials)) == 268
    assert len(train_bpe(text, 270, special_tokens=[])) == 270
    assert len(train_bpe(text, 258, special_tokens=specials)) == 256


def test_special_tokens_are_cut_out_before_training() -> None:
    text = "<|endoftext|>hello world" * 200
    ranks = train_bpe(text, 256 + 1 + 5, pattern=GPT2_PATTERN)
    assert not any(b"endoftext" in tok or b"<|" in tok for tok in ranks)
    assert b" world" in ranks  # equal counts: the space-led pairs sort first
    # Without the cut the special token's pieces would be learned.
    assert b"<|" in train_bpe(text, 256 + 10, special_tokens=[])


def test_patterns_differ() -> None:
    text = "1234567 don't DON'T\n\n\nend " * 20
    assert count_chunks(text, "gpt2") != count_chunks(text, "gpt4")
    assert b"123" in count_chunks(text, "gpt4")  # cl100k splits digits in groups of at most three
    assert b" 1234567" in count_chunks(text, "gpt2")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"vocab_size": 200}, "too small"),
        ({"vocab_size": 256}, "too small"),  # no room for <|endoftext|>
        ({"vocab_size": 10_000}, "ran out of pairs"),
        ({"vocab_size": 300, "pattern": "(unclosed"}, "invalid BPE split pattern"),
        ({"vocab_size": 300, "special_tokens": ["<a>", "<a>"]}, "distinct"),
    ],
)
def test_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(LLMCoreError, match=match):
        train_bpe("some small text " * 10, **kwargs)
