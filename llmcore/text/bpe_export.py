"""A byte-level BPE tokenizer as other tools store it: merges, GPT-2's byte stand-ins, and Hugging Face files.

llmcore keeps a BPE tokenizer the tiktoken way: a rank per token (bytes), no merge list. Hugging Face
``tokenizers`` and llama.cpp want the other form: tokens spelled with GPT-2's printable stand-ins for bytes
(``bytes_to_unicode``: space is ``Ġ``, newline ``Ċ``) and an ordered list of merges ``"left right"``.

Merges from ranks. tiktoken merges, inside a pre-tokenized piece, the adjacent pair whose *concatenation* has the
lowest rank (leftmost on ties); a merge list merges the listed *pair* with the lowest rank. The two agree when
every way of building a token from two tokens is listed at that token's rank, so :func:`bpe_merges` lists, per
token in rank order, first the split tiktoken's own BPE reaches (what a trained merge list holds), then every
other split of the token into two tokens. tiktoken also takes a piece that is a whole token as it is, without
merging; ``ignore_merges`` does the same in ``tokenizers`` (llama.cpp does it for the Llama-3 pre-tokenizer).

Hugging Face files (:func:`hf_tokenizer_files`): ``tokenizer.json`` (a ``BPE`` model with the split regex as a
``Split`` pre-tokenizer followed by ``ByteLevel``, the special tokens as added tokens), ``tokenizer_config.json``
and ``special_tokens_map.json``, so ``AutoTokenizer.from_pretrained`` on an exported folder gives llmcore's ids.
A tokenizer with ``<|begin_of_text|>`` (Llama-3) exports it as bos, added in front of every encoding by the
``tokenizer.json`` post-processor (``add_special_tokens=False`` leaves it out), as Meta's own files do.
"""

from __future__ import annotations

from typing import Any

from llmcore.common import LLMCoreError
from llmcore.text.bpe import ENDOFTEXT
from llmcore.text.llama3 import bos_token
from llmcore.text.tokenizer import Tokenizer, gpt2_byte_encoder


def require_bpe(tok: Tokenizer, use: str) -> None:
    """A one-line error unless ``tok`` is byte-level BPE (a char tokenizer has no byte-level form)."""
    if tok.kind == "char":
        raise LLMCoreError(
            f"tokenizer {tok.name!r} is character-level; {use} needs a byte-level BPE tokenizer "
            "(tokenize.kind: bpe or gpt2)"
        )


def regular_tokens(tok: Tokenizer) -> list[bytes]:
    """The non-special tokens as bytes; list index = id = rank."""
    require_bpe(tok, "this export")
    return [tok.token_bytes(i) for i in range(tok.vocab_size - len(tok.special_tokens))]


def byte_level(token: bytes, table: dict[int, str] | None = None) -> str:
    """``token`` spelled with GPT-2's printable stand-ins, one character per byte."""
    table = table or gpt2_byte_encoder()
    return "".join(table[b] for b in token)


def _bpe_split(token: bytes, ranks: dict[bytes, int], max_rank: int) -> list[bytes]:
    """tiktoken's BPE over the bytes of ``token`` using only ranks below ``max_rank``."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best, at = max_rank, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1], max_rank)
            if r < best:
                best, at = r, i
        if at < 0:
            break
        parts[at : at + 2] = [parts[at] + parts[at + 1]]
    return parts


def bpe_merges(tokens: list[bytes]) -> list[tuple[bytes, bytes]]:
    """The merge list equivalent to tiktoken ranks ``tokens`` (see the module docstring)."""
    ranks = {t: i for i, t in enumerate(tokens)}
    merges: list[tuple[bytes, bytes]] = []
    for rank, token in enumerate(tokens):
        if len(token) < 2:
            continue
        splits = [(token[:i], token[i:]) for i in range(1, len(token))]
        splits = [(a, b) for a, b in splits if a in ranks and b in ranks]
        older = [(a, b) for a, b in splits if ranks[a] < rank and ranks[b] < rank]
        first = older[0] if len(older) == 1 else None  # one way to build it from older tokens: BPE takes it
        if len(older) > 1:
            reached = _bpe_split(token, ranks, rank)
            first = (reached[0], reached[1]) if len(reached) == 2 else None
        if first:
            merges.append(first)
        merges.extend(pair for pair in splits if pair != first)
    return merges


# --- Hugging Face tokenizers ---------------------------------------------------------------------------


def hf_tokenizer_json(tok: Tokenizer) -> dict[str, Any]:
    """``tokenizer.json`` in the ``tokenizers`` format: the same ids as ``tok.encode`` (specials included)."""
    tokens = regular_tokens(tok)
    table = gpt2_byte_encoder()
    vocab = {byte_level(t, table): i for i, t in enumerate(tokens)}
    merges = [[byte_level(a, table), byte_level(b, table)] for a, b in bpe_merges(tokens)]
    added = [
        {
            "id": i,
            "content": s,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for s, i in sorted(tok.special_tokens.items(), key=lambda kv: kv[1])
    ]
    byte_level_step = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": tok.pattern}, "behavior": "Isolated", "invert": False},
                byte_level_step,
            ],
        },
        "post_processor": post_processor(tok, {**byte_level_step, "trim_offsets": False}),
        "decoder": {**byte_level_step, "trim_offsets": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,
            "vocab": vocab,
            "merges": merges,
        },
    }


def post_processor(tok: Tokenizer, byte_level: dict[str, Any]) -> dict[str, Any]:
    """``tokenizer.json``'s post-processor: byte-level offsets, then ``<|begin_of_text|>`` in front of every
    encoding when the tokenizer has it (Meta's Llama-3 files: a ``TemplateProcessing`` step)."""
    bos = bos_token(tok)
    if bos is None:
        return byte_level
    first = {"SpecialToken": {"id": bos, "type_id": 0}}
    template = {
        "type": "TemplateProcessing",
        "single": [first, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [
            first,
            {"Sequence": {"id": "A", "type_id": 0}},
            {"SpecialToken": {"id": bos, "type_id": 1}},
            {"Sequence": {"id": "B", "type_id": 1}},
        ],
        "special_tokens": {bos: {"id": bos, "ids": [tok.special_tokens[bos]], "tokens": [bos]}},
    }
    return {"type": "Sequence", "processors": [byte_level, template]}


def hf_tokenizer_files(tok: Tokenizer, context_length: int) -> dict[str, Any]:
    """File name -> JSON object for an HF model folder: tokenizer.json, tokenizer_config.json and
    special_tokens_map.json. ``<|endoftext|>`` is eos and pad, and bos as in GPT-2 (no token added by encoding);
    a Llama-3 tokenizer's bos is ``<|begin_of_text|>``, added in front of every encoding as Meta's is."""
    eot = ENDOFTEXT
    bos = bos_token(tok) or eot
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eot,
        "pad_token": eot,
        "unk_token": None,
        "add_bos_token": bos != eot,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": context_length,
        "added_tokens_decoder": {
            str(i): {
                "content": s,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for s, i in sorted(tok.special_tokens.items(), key=lambda kv: kv[1])
        },
    }
    return {
        "tokenizer.json": hf_tokenizer_json(tok),
        "tokenizer_config.json": config,
        "special_tokens_map.json": {"bos_token": bos, "eos_token": eot, "pad_token": eot},
    }
