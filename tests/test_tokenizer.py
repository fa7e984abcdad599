"""Tokenizer: round trips, GPT-2 parity with an independently built tiktoken oracle, char kind, save/load."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import tiktoken
import tiktoken.load
from hypothesis import given, settings
from hypothesis import strategies as st
from tiktoken_ext.openai_public import r50k_pat_str

from llmcore.common import LLMCoreError
from llmcore.text.tokenizer import Tokenizer
from tests.conftest import require_shared

SHAKESPEARE = "raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
GPT2_DIR = "openaipublic.blob.core.windows.net/gpt-2/encodings/main"
EOT = "<|endoftext|>"

# A hermetic training text: English, code-ish punctuation, numbers and a little non-Latin script.
CORPUS = (
    "It was the best of times, it was the worst of times; it was the age of wisdom.\n"
    "    def f(x): return x ** 2  # squares 12345 and 67890\n\n"
    "Ça va? Très bien. 東京は日本の首都です。 Привет, мир! 🙂👍🏽\n"
) * 40

# Unicode text with the awkward bits mixed in: special tokens, whitespace runs, combining marks, emoji.
texts = st.lists(
    st.one_of(
        st.text(),
        st.sampled_from([EOT, "\n\n", "   ", "\t\r\n", "e\u0301", "🙂👍🏽", "你好", "'s", " don't", "<|", "|>"]),
    ),
    max_size=12,
).map("".join)


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return Tokenizer.train(CORPUS, 300)


@pytest.fixture(scope="module")
def gpt2_files(mirror_dir: Path) -> tuple[Path, Path]:
    d = mirror_dir / GPT2_DIR
    return require_shared(d / "encoder.json"), require_shared(d / "vocab.bpe")


@pytest.fixture(scope="module")
def gpt2(gpt2_files) -> Tokenizer:
    return Tokenizer.gpt2(*gpt2_files)


@pytest.fixture(scope="module")
def oracle(gpt2_files) -> tiktoken.Encoding:
    """tiktoken's own GPT-2 encoding built from the local files (tiktoken's converter, not ours)."""
    encoder_json, vocab_bpe = gpt2_files
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", "")  # no cache writes; plain local paths are read with open()
        ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(vocab_bpe), encoder_json_file=str(encoder_json)
        )
    return tiktoken.Encoding(
        name="gpt2-oracle", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={EOT: 50256}
    )


@pytest.fixture(scope="module")
def shakespeare(mirror_dir: Path) -> str:
    return require_shared(mirror_dir / SHAKESPEARE).read_text(encoding="utf-8")


# -- round trips -------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(text=texts)
def test_trained_roundtrip(bpe: Tokenizer, text: str) -> None:
    for allow_special in (True, False):
        ids = bpe.encode(text, allow_special=allow_special)
        assert all(0 <= i < bpe.vocab_size for i in ids)
        assert bpe.decode(ids) == text
        assert bpe.decode_bytes(ids) == text.encode("utf-8")


@settings(max_examples=300, deadline=None)
@given(text=texts)
def test_gpt2_roundtrip_and_parity(gpt2: Tokenizer, oracle: tiktoken.Encoding, text: str) -> None:
    ids = gpt2.encode(text)
    assert ids == oracle.encode(text, allowed_special="all")
    assert gpt2.decode(ids) == text
    assert gpt2.encode(text, allow_special=False) == oracle.encode_ordinary(text)


# -- GPT-2 -------------------------------------------------------------------------------------------


def test_gpt2_matches_oracle_on_sample(gpt2: Tokenizer, oracle: tiktoken.Encoding, shakespeare: str) -> None:
    sample = shakespeare[:20_000] + f"{EOT}Ünïcödé 東京 🙂 e\u0301\n\n\n  x{EOT}"
    ids = gpt2.encode(sample)
    assert ids == oracle.encode(sample, allowed_special="all")
    assert ids.count(50256) == 2
    assert gpt2.encode("Hello world") == [15496, 995]  # GPT-2's well-known ids
    assert (gpt2.kind, gpt2.name, gpt2.vocab_size, gpt2.eot_id) == ("gpt2", "gpt2", 50257, 50256)


def test_gpt2_vocabulary_matches_oracle(gpt2: Tokenizer, oracle: tiktoken.Encoding) -> None:
    assert [gpt2.token_bytes(i) for i in range(50257)] == [oracle.decode_single_token_bytes(i) for i in range(50257)]


def test_gpt2_rejects_bad_files(gpt2_files, tmp_path: Path) -> None:
    encoder_json, vocab_bpe = gpt2_files
    bad_json = tmp_path / "encoder.json"
    bad_json.write_text('{"a": 0}')
    with pytest.raises(LLMCoreError, match="encoder.json"):
        Tokenizer.gpt2(bad_json, vocab_bpe)
    lines = vocab_bpe.read_text(encoding="utf-8").split("\n")
    lines[1], lines[2] = lines[2], lines[1]  # two merges out of order
    bad_bpe = tmp_path / "vocab.bpe"
    bad_bpe.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(LLMCoreError, match=r"vocab\.bpe: merge 0"):
        Tokenizer.gpt2(encoder_json, bad_bpe)
    with pytest.raises(LLMCoreError, match="cannot read"):
        Tokenizer.gpt2(tmp_path / "missing.json", vocab_bpe)


# -- trained BPE -------------------------------------------------------------------------------------


def test_trained_attributes(bpe: Tokenizer) -> None:
    assert (bpe.kind, bpe.name, bpe.vocab_size, bpe.eot_id) == ("bpe", "bpe300-gpt2", 300, 299)
    assert bpe.token_bytes(ord("a")) == b"a"
    assert bpe.token_bytes(299) == EOT.encode()
    assert len(bpe.encode(CORPUS)) < 0.7 * len(CORPUS.encode())  # it compresses its training text


def test_train_special_tokens_and_vocab_size() -> None:
    tok = Tokenizer.train(CORPUS, 280, pattern="gpt4", special_tokens=[EOT, "<|pad|>"])
    assert tok.vocab_size == 280
    assert tok.special_tokens == {EOT: 278, "<|pad|>": 279}
    assert tok.encode(f"a{EOT}<|pad|>") == [ord("a"), 278, 279]
    with pytest.raises(LLMCoreError, match="must include"):
        Tokenizer.train(CORPUS, 280, special_tokens=["<|pad|>"])


def test_special_tokens(bpe: Tokenizer) -> None:
    text = f"one{EOT}two"
    ids = bpe.encode(text)
    assert bpe.eot_id in ids
    plain = bpe.encode(text, allow_special=False)
    assert bpe.eot_id not in plain and bpe.decode(plain) == text
    batch = ["a", text, "", "東京"]
    assert bpe.encode_batch(batch) == [bpe.encode(t) for t in batch]
    assert bpe.encode_batch(batch, allow_special=False) == [bpe.encode(t, allow_special=False) for t in batch]


def test_decode_partial_utf8_and_bad_ids(bpe: Tokenizer) -> None:
    assert bpe.decode([0xE6]) == "\ufffd"  # the first byte of a 3-byte character alone
    for bad in ([300], [-1], [2**70]):
        with pytest.raises(LLMCoreError, match="out of range"):
            bpe.decode(bad)
    with pytest.raises(LLMCoreError, match="out of range"):
        bpe.token_bytes(1000)


# -- char --------------------------------------------------------------------------------------------


def test_char_tokenizer(shakespeare: str) -> None:
    tok = Tokenizer.char(shakespeare)
    assert (tok.kind, tok.vocab_size, tok.eot_id) == ("char", 66, 65)  # 65 characters + <|endoftext|>
    sample = shakespeare[:5000]
    ids = tok.encode(sample)
    assert len(ids) == len(sample) and tok.decode(ids) == sample
    assert tok.encode("\n") == [0] and tok.decode([tok.eot_id]) == EOT
    assert tok.encode(f"a{EOT}b") == [tok.encode("a")[0], 65, tok.encode("b")[0]]
    with pytest.raises(LLMCoreError, match=r"'<' \(U\+003C\)"):
        tok.encode(f"a{EOT}b", allow_special=False)  # '<' never occurs in TinyShakespeare
    with pytest.raises(LLMCoreError, match=r"'東'"):
        tok.encode("a東")
    for bad in ([66], [-1]):
        with pytest.raises(LLMCoreError, match="out of range"):
            tok.decode(bad)


@settings(max_examples=100, deadline=None)
@given(text=texts)
def test_char_roundtrip(text: str) -> None:
    tok = Tokenizer.char(text + "x")
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, allow_special=False)) == text


# -- save / load -------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["bpe", "gpt2", "char"])
def test_save_load_identical(which: str, request, tmp_path: Path) -> None:
    tok = Tokenizer.char(CORPUS + EOT) if which == "char" else request.getfixturevalue(which)
    path = tmp_path / "tok" / "tokenizer.json"
    tok.save(path)
    back = Tokenizer.load(path)
    assert json.loads(path.read_text())["format"] == "llmcore-tokenizer"
    assert back.to_dict() == tok.to_dict()
    assert (back.kind, back.name, back.vocab_size, back.eot_id) == (tok.kind, tok.name, tok.vocab_size, tok.eot_id)
    text = CORPUS[:2000] + EOT + CORPUS[:100]
    assert back.encode(text) == tok.encode(text)
    assert back.encode(text, allow_special=False) == tok.encode(text, allow_special=False)
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no temp files left behind


def _corrupt(d: dict, change: str) -> dict:
    d = json.loads(json.dumps(d))
    if change == "format":
        d["format"] = "something-else"
    elif change == "version":
        d["version"] = 99
    elif change == "kind":
        d["kind"] = "wordpiece"
    elif change == "no_ranks":
        del d["ranks"]
    elif change == "bad_base64":
        d["ranks"][300 - 2] = "not base64!"
    elif change == "duplicate_rank":
        d["ranks"][298] = d["ranks"][297]
    elif change == "missing_byte":
        d["ranks"][65] = base64.b64encode(b"\xff\xfe\xfd").decode()
    elif change == "bad_pattern":
        d["pattern"] = "(unclosed"
    elif change == "no_eot":
        d["special_tokens"] = {"<|pad|>": 299}
    elif change == "special_collides":
        d["special_tokens"] = {EOT: 5}
    return d


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ("format", "format"),
        ("version", "unsupported version"),
        ("kind", "kind must be"),
        ("no_ranks", "ranks"),
        ("bad_base64", "not base64"),
        ("duplicate_rank", "duplicate"),
        ("missing_byte", "single-byte"),
        ("bad_pattern", "does not compile"),
        ("no_eot", "lacks <|endoftext|>"),
        ("special_collides", "special token ids"),
    ],
)
def test_load_rejects_malformed(bpe: Tokenizer, tmp_path: Path, change: str, match: str) -> None:
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(_corrupt(bpe.to_dict(), change)))
    with pytest.raises(LLMCoreError, match=match) as e:
        Tokenizer.load(path)
    assert str(path) in str(e.value)


def test_load_rejects_malformed_char_and_json(tmp_path: Path) -> None:
    d = Tokenizer.char("abc").to_dict()
    path = tmp_path / "char.json"
    path.write_text(json.dumps({**d, "chars": ["a", "bb"]}))
    with pytest.raises(LLMCoreError, match="single characters"):
        Tokenizer.load(path)
    path.write_text("{not json")
    with pytest.raises(LLMCoreError, match="not valid JSON"):
        Tokenizer.load(path)
    with pytest.raises(LLMCoreError, match="cannot read"):
        Tokenizer.load(tmp_path / "nope.json")
