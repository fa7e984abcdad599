"""The chat format: ChatML turns delimited by two reserved special tokens, rendered one way for training,
serving and every export.

    <|im_start|>system
    You are terse.<|im_end|>
    <|im_start|>user
    Name a primary color.<|im_end|>
    <|im_start|>assistant
    Red.<|im_end|>

ChatML (OpenAI's, then Qwen's, SmolLM's and many fine-tunes') is the convention most tools recognise: Hugging
Face's ``apply_chat_template``, llama.cpp's chat handler, Ollama templates, LM Studio. Its two tokens are
reserved special tokens: plain text never produces them (data and prompts are encoded as text, so a literal
``<|im_start|>`` in a message is just characters) and BPE training never merges across them.

    enc = render_chat(tok, messages)                         # ids + loss mask (assistant content + <|im_end|>)
    ids = render_chat(tok, messages, add_generation_prompt=True).ids  # a prompt ending "<|im_start|>assistant\\n"

The text between two special tokens is encoded in one piece (``role\\ncontent``, then the ``\\n`` after an end
token), which is how Hugging Face tokenizers and llama.cpp encode a rendered template: the ids are theirs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from llmcore.common import LLMCoreError
from llmcore.text.messages import (  # re-exported: the chat format's one import
    CHAT_TOKENS,
    CHATML,
    IM_END,
    IM_START,
    ROLES,
    alpaca_to_messages,
    chatml_text,
    check_messages,
)
from llmcore.text.tokenizer import Tokenizer

__all__ = [
    "CHAT_TOKENS",
    "CHATML",
    "IM_END",
    "IM_START",
    "ROLES",
    "ChatEncoding",
    "alpaca_to_messages",
    "chat_token_ids",
    "chatml_text",
    "check_messages",
    "has_chat_tokens",
    "render_chat",
]


def has_chat_tokens(tok: Tokenizer) -> bool:
    return all(t in tok.special_tokens for t in CHAT_TOKENS)


def chat_token_ids(tok: Tokenizer) -> tuple[int, int]:
    """``(<|im_start|> id, <|im_end|> id)``; an error saying how to reserve them when the tokenizer lacks them."""
    if not has_chat_tokens(tok):
        raise LLMCoreError(
            f"tokenizer {tok.name!r} has no {IM_START}/{IM_END} special tokens: list them in tokenize.special_tokens, "
            "or fine-tune with instruct.format: chat, which adds them"
        )
    return tok.special_tokens[IM_START], tok.special_tokens[IM_END]


@dataclass
class ChatEncoding:
    ids: list[int]
    mask: list[bool]  # per id: True where the model learns it (assistant content and its <|im_end|>)
    turn_ends: list[int]  # len(ids) after each message (cut points at turn boundaries)


def render_chat(
    tok: Tokenizer, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False
) -> ChatEncoding:
    """Token ids of a conversation in ChatML, with the assistant-only loss mask (see the module docstring).

    A token of an assistant turn is trained when it ends after the ``role\\n`` header (a token that straddles
    the header's newline and the content's first characters counts as content).
    """
    start, end = chat_token_ids(tok)
    newline = tok.encode("\n", allow_special=False)
    ids: list[int] = []
    mask: list[bool] = []
    turn_ends: list[int] = []
    for m in messages:
        header = f"{m['role']}\n"
        piece = tok.encode(header + m["content"], allow_special=False)
        trained = m["role"] == "assistant"
        ids.append(start)
        mask.append(False)
        if trained:
            at, header_len = 0, len(header.encode("utf-8"))
            for i in piece:
                at += len(tok.token_bytes(i))
                mask.append(at > header_len)
        else:
            mask.extend([False] * len(piece))
        ids.extend(piece)
        ids.append(end)
        mask.append(trained)
        ids.extend(newline)
        mask.extend([False] * len(newline))
        turn_ends.append(len(ids))
    if add_generation_prompt:
        piece = tok.encode("assistant\n", allow_special=False)
        ids += [start, *piece]
        mask += [False] * (1 + len(piece))
    return ChatEncoding(ids, mask, turn_ends)
