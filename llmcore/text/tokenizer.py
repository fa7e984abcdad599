"""The tokenizer every stage uses: trained byte-level BPE, GPT-2's own BPE, or characters, one interface.

BPE kinds (``"bpe"``, ``"gpt2"``) wrap a ``tiktoken.Encoding`` built from local ranks, so encoding and
decoding run in tiktoken's Rust core; nothing here ever downloads (``tiktoken.get_encoding`` is never
called). The ``"char"`` kind is a plain dict lookup over the corpus' characters.

    tok = Tokenizer.train(text, vocab_size=1024, pattern="gpt2")   # llmcore.text.bpe.train_bpe
    tok = Tokenizer.gpt2("encoder.json", "vocab.bpe")               # GPT-2's released BPE, eot 50256
    tok = Tokenizer.char(text)                                      # sorted unique chars + <|endoftext|>
    ids = tok.encode("Hello<|endoftext|>")                         # specials -> their ids by default
    tok.save("tokenizer.json"); tok = Tokenizer.load("tokenizer.json")

File format (one UTF-8 JSON object, written atomically)::

    {
      "format": "llmcore-tokenizer",
      "version": 1,
      "kind": "bpe" | "gpt2" | "char",
      "name": "bpe1024-gpt2",
      "pattern": "<split regex>",              # bpe/gpt2 only: pre-tokenization regex (`regex` syntax)
      "ranks": ["AA==", "AQ==", ...],          # bpe/gpt2 only: base64 token bytes; list index = id = rank
      "chars": ["\\n", " ", "!", ...],          # char only: one character per id, list index = id
      "special_tokens": {"<|endoftext|>": 1023}  # string -> id; ids follow the ranks/chars
    }

For BPE kinds the ranks must contain all 256 single bytes (so any text encodes) and be distinct;
special token ids must be exactly ``len(ranks) .. vocab_size - 1`` (``len(chars) ..`` for char), and
``<|endoftext|>`` must be among them. ``Tokenizer.load`` checks all of this and names the file on error.
"""

from __future__ import annotations

import base64
import binascii
import operator
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import regex
import tiktoken

from llmcore.common import LLMCoreError, read_json, write_json_atomic
from llmcore.text.bpe import ENDOFTEXT, GPT2_PATTERN, resolve_pattern, train_bpe

FORMAT = "llmcore-tokenizer"
VERSION = 1
KINDS = ("bpe", "gpt2", "char")
GPT2_EOT_ID = 50256


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-ins for raw bytes (``bytes_to_unicode`` in openai/gpt-2 encoder.py), inverted.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to chr(256), chr(257), ... in order.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + n)
            n += 1
    return {c: b for b, c in chars.items()}


def gpt2_byte_encoder() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (how HF ``tokenizers`` and GGUF files spell tokens)."""
    return {b: c for c, b in _gpt2_byte_decoder().items()}


class Tokenizer:
    """A tokenizer with one interface for every kind.

    Attributes:
        kind: ``"bpe"`` (trained here), ``"gpt2"`` (OpenAI's released BPE) or ``"char"``.
        name: a label saved with the tokenizer (e.g. ``"bpe1024-gpt2"``, ``"gpt2"``, ``"char65"``).
        vocab_size: number of ids, special tokens included; ids are ``0 .. vocab_size - 1``.
        eot_id: id of ``<|endoftext|>``.
        special_tokens: special token string -> id.
        pattern: the pre-tokenization regex (BPE kinds), ``None`` for char.
    """

    def __init__(
        self,
        kind: str,
        name: str,
        special_tokens: dict[str, int],
        *,
        ranks: dict[bytes, int] | None = None,
        pattern: str | None = None,
        chars: Sequence[str] | None = None,
    ) -> None:
        """Prefer the constructors (:meth:`train`, :meth:`gpt2`, :meth:`char`, :meth:`load`); arguments are
        assumed valid here (``load`` validates files)."""
        if kind not in KINDS:
            raise LLMCoreError(f"unknown tokenizer kind {kind!r}; expected one of {', '.join(KINDS)}")
        if ENDOFTEXT not in special_tokens:
            raise LLMCoreError(f"tokenizer {name!r} has no {ENDOFTEXT} special token")
        self.kind = kind
        self.name = name
        self.special_tokens = dict(special_tokens)
        self.eot_id = self.special_tokens[ENDOFTEXT]
        self.pattern = pattern
        self._enc: tiktoken.Encoding | None = None
        self._ranks = ranks
        if kind == "char":
            # id -> string; special ids follow the chars contiguously (from_dict checks files for this).
            self._itos = [*chars, *sorted(self.special_tokens, key=self.special_tokens.get)]
            self._stoi = {c: i for i, c in enumerate(chars)}
            # Longest first so that one special token that prefixes another cannot shadow it.
            alternation = "|".join(map(regex.escape, sorted(self.special_tokens, key=len, reverse=True)))
            self._special_split = regex.compile(f"({alternation})")
            self.vocab_size = len(self._itos)
        else:
            self._enc = tiktoken.Encoding(
                name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=self.special_tokens
            )
            self.vocab_size = self._enc.n_vocab

    # -- constructors -------------------------------------------------------------------------------

    @classmethod
    def train(
        cls,
        text: str,
        vocab_size: int,
        *,
        pattern: str = "gpt2",
        special_tokens: Sequence[str] = (ENDOFTEXT,),
        name: str | None = None,
    ) -> Tokenizer:
        """Train a byte-level BPE tokenizer (see :func:`llmcore.text.bpe.train_bpe`).

        Args:
            text: training corpus.
            vocab_size: exact vocabulary size, special tokens included.
            pattern: ``"gpt2"``, ``"gpt4"`` or a raw split regex.
            special_tokens: must include ``<|endoftext|>``; ids follow the merges, in this order.
            name: label saved with the tokenizer; default ``bpe{vocab_size}-{pattern}`` for named patterns.
        """
        special_tokens = list(special_tokens)
        if ENDOFTEXT not in special_tokens:
            raise LLMCoreError(f"special_tokens must include {ENDOFTEXT}, got {special_tokens!r}")
        ranks = train_bpe(text, vocab_size, pattern=pattern, special_tokens=special_tokens)
        specials = {s: len(ranks) + i for i, s in enumerate(special_tokens)}
        if name is None:
            name = f"bpe{vocab_size}-{pattern}" if pattern in ("gpt2", "gpt4") else f"bpe{vocab_size}"
        return cls("bpe", name, specials, ranks=ranks, pattern=resolve_pattern(pattern))

    @classmethod
    def gpt2(cls, encoder_json_path: str | os.PathLike, vocab_bpe_path: str | os.PathLike) -> Tokenizer:
        """GPT-2's released BPE from its ``encoder.json`` and ``vocab.bpe`` (local files, no download).

        encoder.json maps GPT-2's printable stand-in strings to ids; decoding the stand-ins back to raw
        bytes gives tiktoken's mergeable ranks directly (GPT-2's ids are merge ranks). vocab.bpe is used to
        check that: merge ``i`` must produce the token with id ``256 + i``.
        """
        byte_decoder = _gpt2_byte_decoder()

        def to_bytes(token: str, path: str | os.PathLike) -> bytes:
            try:
                return bytes(byte_decoder[c] for c in token)
            except KeyError as e:
                raise LLMCoreError(f"{path}: token {token!r} has a character outside GPT-2's byte map") from e

        encoder = read_json(encoder_json_path)
        if not isinstance(encoder, dict) or encoder.get(ENDOFTEXT) != GPT2_EOT_ID:
            raise LLMCoreError(f"{encoder_json_path}: not GPT-2's encoder.json (no {ENDOFTEXT} at id 50256)")
        ranks = {to_bytes(tok, encoder_json_path): i for tok, i in encoder.items() if tok != ENDOFTEXT}
        if sorted(ranks.values()) != list(range(GPT2_EOT_ID)):
            raise LLMCoreError(f"{encoder_json_path}: ids are not exactly 0..50255 plus {ENDOFTEXT}")

        try:
            lines = Path(vocab_bpe_path).read_text(encoding="utf-8").split("\n")
        except (OSError, UnicodeDecodeError) as e:
            raise LLMCoreError(f"cannot read {vocab_bpe_path}: {e}") from None
        merges = [line.split() for line in lines[1:] if line]  # first line is a "#version" header
        if len(merges) != GPT2_EOT_ID - 256 or any(len(m) != 2 for m in merges):
            raise LLMCoreError(f"{vocab_bpe_path}: expected 50000 merges of two tokens each")
        for i, (left, right) in enumerate(merges):
            merged = to_bytes(left, vocab_bpe_path) + to_bytes(right, vocab_bpe_path)
            if ranks.get(merged) != 256 + i:
                raise LLMCoreError(f"{vocab_bpe_path}: merge {i} ({left} {right}) does not match {encoder_json_path}")
        return cls("gpt2", "gpt2", {ENDOFTEXT: GPT2_EOT_ID}, ranks=ranks, pattern=GPT2_PATTERN)

    @classmethod
    def char(cls, text: str, *, name: str | None = None) -> Tokenizer:
        """Character-level tokenizer: ids are the sorted unique characters of ``text``, then ``<|endoftext|>``."""
        chars = sorted(set(text))
        if not chars:
            raise LLMCoreError("cannot build a char tokenizer from empty text")
        specials = {ENDOFTEXT: len(chars)}
        return cls("char", name or f"char{len(chars) + 1}", specials, chars=chars)

    def with_special_tokens(self, names: Sequence[str]) -> Tokenizer:
        """This tokenizer with ``names`` reserved as special tokens too (the ones it lacks get the next ids, in
        order); ordinary text encodes exactly as before."""
        specials = dict(self.special_tokens)
        for s in names:
            if not isinstance(s, str) or not s:
                raise LLMCoreError(f"special tokens must be non-empty strings, got {s!r}")
            specials.setdefault(s, self.vocab_size + len(specials) - len(self.special_tokens))
        if len(specials) == len(self.special_tokens):
            return self
        if self.kind == "char":
            return Tokenizer(self.kind, self.name, specials, chars=list(self._stoi))
        return Tokenizer(self.kind, self.name, specials, ranks=self._ranks, pattern=self.pattern)

    # -- encoding -----------------------------------------------------------------------------------

    def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
        """Text to ids. With ``allow_special`` special token strings become their ids; without, plain text."""
        if self._enc is not None:
            if allow_special:
                return self._enc.encode(text, allowed_special="all")
            return self._enc.encode_ordinary(text)
        if not allow_special:
            return self._encode_chars(text)
        ids: list[int] = []
        # re.split with a capturing group alternates plain text (even) and special tokens (odd).
        for k, part in enumerate(self._special_split.split(text)):
            if k % 2:
                ids.append(self.special_tokens[part])
            else:
                ids.extend(self._encode_chars(part))
        return ids

    def _encode_chars(self, text: str) -> list[int]:
        try:
            return [self._stoi[c] for c in text]
        except KeyError as e:
            raise LLMCoreError(
                f"character {e.args[0]!r} (U+{ord(e.args[0]):04X}) is not in the vocabulary of "
                f"char tokenizer {self.name!r}"
            ) from None

    def encode_batch(self, texts: Sequence[str], *, allow_special: bool = True) -> list[list[int]]:
        """:meth:`encode` over many texts (in parallel threads for BPE kinds)."""
        if self._enc is not None:
            if allow_special:
                return self._enc.encode_batch(list(texts), allowed_special="all")
            return self._enc.encode_ordinary_batch(list(texts))
        return [self.encode(t, allow_special=allow_special) for t in texts]

    # -- decoding -----------------------------------------------------------------------------------

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """Ids to raw bytes (a BPE token can be part of a UTF-8 character)."""
        if self._enc is not None:
            try:
                return self._enc.decode_bytes(ids)
            except (KeyError, ValueError, OverflowError, TypeError):
                self._check_ids(ids)
                raise
        return self.decode(ids).encode("utf-8")

    def decode(self, ids: Sequence[int]) -> str:
        """Ids to text; invalid UTF-8 (e.g. a cut-off multi-byte character) becomes U+FFFD."""
        if self._enc is not None:
            return self.decode_bytes(ids).decode("utf-8", errors="replace")
        self._check_ids(ids)  # also rejects negative ids, which list indexing would accept
        return "".join([self._itos[i] for i in ids])

    def token_bytes(self, id: int) -> bytes:
        """The bytes of one token (special tokens give their UTF-8 string)."""
        self._check_ids([id])
        if self._enc is not None:
            return self._enc.decode_single_token_bytes(id)
        return self._itos[id].encode("utf-8")

    def _check_ids(self, ids: Sequence[int]) -> None:
        """Raise LLMCoreError naming the first id that is not an integer in ``0 .. vocab_size - 1``."""
        for i in ids:
            try:
                ok = 0 <= operator.index(i) < self.vocab_size
            except TypeError:
                ok = False
            if not ok:
                raise LLMCoreError(
                    f"token id {i!r} is out of range for tokenizer {self.name!r} (vocab_size {self.vocab_size})"
                )

    # -- persistence --------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form written by :meth:`save` (format in the module docstring)."""
        out: dict[str, Any] = {"format": FORMAT, "version": VERSION, "kind": self.kind, "name": self.name}
        if self._enc is None:
            out["chars"] = list(self._stoi)
        else:
            out["pattern"] = self.pattern
            ranks = self._ranks
            out["ranks"] = [base64.b64encode(tok).decode("ascii") for tok in sorted(ranks, key=ranks.get)]
        out["special_tokens"] = self.special_tokens
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer to one JSON file, atomically."""
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Read a file written by :meth:`save`; a malformed file raises LLMCoreError naming it."""
        return cls.from_dict(read_json(path), source=str(path))

    @classmethod
    def from_dict(cls, d: Any, *, source: str = "<dict>") -> Tokenizer:
        """Validate and build from :meth:`to_dict`'s output; errors name ``source`` and the problem."""

        def bad(msg: str) -> LLMCoreError:
            return LLMCoreError(f"{source}: invalid tokenizer file: {msg}")

        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise bad(f'expected a JSON object with "format": "{FORMAT}"')
        if d.get("version") != VERSION:
            raise bad(f"unsupported version {d.get('version')!r} (this code reads version {VERSION})")
        kind, name = d.get("kind"), d.get("name")
        if kind not in KINDS:
            raise bad(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if not isinstance(name, str):
            raise bad('"name" must be a string')
        specials = d.get("special_tokens")
        if not isinstance(specials, dict) or not all(
            isinstance(s, str) and s and type(i) is int and i >= 0 for s, i in specials.items()
        ):
            raise bad('"special_tokens" must map non-empty strings to non-negative integer ids')
        if ENDOFTEXT not in specials:
            raise bad(f'"special_tokens" lacks {ENDOFTEXT}')

        if kind == "char":
            chars = d.get("chars")
            if not isinstance(chars, list) or not chars:
                raise bad('"chars" must be a non-empty list of characters')
            if not all(isinstance(c, str) and len(c) == 1 for c in chars) or len(set(chars)) != len(chars):
                raise bad('"chars" must hold distinct single characters')
            n_base = len(chars)
        else:
            pattern, ranks_b64 = d.get("pattern"), d.get("ranks")
            if not isinstance(pattern, str):
                raise bad('"pattern" must be a regex string')
            try:
                regex.compile(pattern)
            except regex.error as e:
                raise bad(f'"pattern" does not compile: {e}') from None
            if not isinstance(ranks_b64, list) or not all(isinstance(r, str) for r in ranks_b64):
                raise bad('"ranks" must be a list of base64 strings')
            try:
                tokens = [base64.b64decode(r, validate=True) for r in ranks_b64]
            except binascii.Error as e:
                raise bad(f'"ranks" has an entry that is not base64 ({e})') from None
            ranks = {tok: i for i, tok in enumerate(tokens)}
            if len(ranks) != len(tokens):
                raise bad('"ranks" has duplicate tokens')
            missing = [b for b in range(256) if bytes([b]) not in ranks]
            if missing:
                raise bad(f'"ranks" lacks {len(missing)} single-byte tokens (first: byte {missing[0]})')
            n_base = len(tokens)
        if sorted(specials.values()) != list(range(n_base, n_base + len(specials))):
            raise bad(
                f"special token ids must be {n_base}..{n_base + len(specials) - 1}, right after the "
                f"{n_base} regular tokens"
            )

        if kind == "char":
            return cls(kind, name, specials, chars=chars)
        return cls(kind, name, specials, ranks=ranks, pattern=pattern)

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, name={self.name!r}, vocab_size={self.vocab_size})"
