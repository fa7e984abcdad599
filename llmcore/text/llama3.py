"""Llama-3's tokenizer: tiktoken-format ``tokenizer.model`` files (one ``base64-token rank`` per line) read with
Meta's split pattern and special tokens (reference: meta-llama/llama-models ``models/llama3/tokenizer.py``)."""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

from llmcore.common import LLMCoreError
from llmcore.text.bpe import ENDOFTEXT
from llmcore.text.tokenizer import Tokenizer


def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Parse a tiktoken BPE file (``<base64 token> <rank>`` per line) into mergeable ranks."""
    path = Path(path)
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise LLMCoreError(f"cannot read {path}: {e.strerror or e}") from None
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except (ValueError, binascii.Error):
            raise LLMCoreError(
                f"{path}: line {n} is not '<base64 token> <rank>' (a tiktoken BPE file is required; "
                "sentencepiece models such as Llama 2's are not supported)"
            ) from None
        if token in ranks:
            raise LLMCoreError(f"{path}: line {n}: duplicate token")
        ranks[token] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise LLMCoreError(f"{path}: ranks are not exactly 0..{len(ranks) - 1}")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise LLMCoreError(f"{path}: lacks {len(missing)} single-byte tokens (first: byte {missing[0]})")
    return ranks


def llama3_tokenizer(path: str | os.PathLike, name: str = "llama3") -> Tokenizer:
    """A ``"bpe"`` Tokenizer from a Llama-3 ``tokenizer.model`` (tiktoken format), with Meta's 256 specials.

    llmcore's Tokenizer requires an ``<|endoftext|>`` special token and takes the end-of-text id from it, so
    Llama's ``<|end_of_text|>`` (id ``len(ranks) + 1``, the base models' document separator) is stored under
    that name. Ids and encodings of ordinary text are Meta's; only that one special token's string differs.
    """
    # TODO: the string "<|end_of_text|>" encodes as plain text and id len(ranks)+1 decodes to "<|endoftext|>";
    # fixed once Tokenizer can name its end-of-text token (e.g. an `eot_token` argument saved in the file).
    ranks = read_tiktoken_ranks(path)
    names = [*LLAMA3_SPECIAL, *(f"<|reserved_special_token_{2 + i}|>" for i in range(245))]
    names[1] = ENDOFTEXT
    specials = {s: len(ranks) + i for i, s in enumerate(names)}
    return Tokenizer("bpe", name, specials, ranks=ranks, pattern=LLAMA3_PATTERN)


# Meta's pre-tokenizer: case-insensitive contractions, digits in groups of at most three.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


# Llama 3.1+ names for the first special ids; the rest are <|reserved_special_token_{2 + i}|>.
LLAMA3_SPECIAL = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
]
BEGIN_OF_TEXT = LLAMA3_SPECIAL[0]  # Meta's encodings start with it; exports make it bos, added by encoding


def bos_token(tok: Tokenizer) -> str | None:
    """The token every encoding of ``tok`` starts with in Meta's convention: ``<|begin_of_text|>`` where the
    tokenizer has it (Llama-3 tokenizers), else None (GPT-2 style: nothing is added)."""
    return BEGIN_OF_TEXT if BEGIN_OF_TEXT in tok.special_tokens else None
