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
from typing import TYPE_CHECKING, Any

from llmcore.common import LLMCoreError

if TYPE_CHECKING:  # annotations only: never run, so not a code dep of the stages (tools/deps.py)
    from llmcore.text.tokenizer import Tokenizer

CHATML = "chatml"  # the template name stored with a chat model (metadata ``template``)
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHAT_TOKENS = (IM_START, IM_END)
ROLES = ("system", "user", "assistant")


def check_messages(messages: Any, where: str, *, need_assistant: bool = True) -> list[dict[str, str]]:
    """A conversation as ``[{"role", "content"}, ...]``; a one-line error naming ``where`` otherwise.

    Roles are system, user and assistant; every content is a non-empty string; with ``need_assistant`` at
    least one assistant turn (something to learn).
    """
    if hasattr(messages, "tolist") and not isinstance(messages, (str, dict)):
        messages = messages.tolist()  # a parquet list column arrives as a numpy array of records
    if not isinstance(messages, (list, tuple)):
        raise LLMCoreError(f"{where}: 'messages' must be a list of role/content records, got {type(messages).__name__}")
    if not messages:
        raise LLMCoreError(f"{where}: 'messages' is empty")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise LLMCoreError(f"{where}: message {i} must be an object with role and content, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise LLMCoreError(f"{where}: message {i}: unknown role {role!r} (expected {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise LLMCoreError(f"{where}: message {i}: content must be a string, got {type(content).__name__}")
        if not content.strip():
            raise LLMCoreError(f"{where}: message {i}: empty content")
        out.append({"role": role, "content": content})
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise LLMCoreError(f"{where}: no assistant turn (nothing to learn)")
    return out


def chatml_text(messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """The conversation as ChatML text (what the Jinja template renders)."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


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


def alpaca_to_messages(entry: dict[str, str]) -> list[dict[str, str]]:
    """One Alpaca entry as a two-turn conversation: the instruction (and its input, after a blank line) from the
    user, the output from the assistant."""
    user = entry["instruction"] + (f"\n\n{entry['input']}" if entry.get("input") else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": entry["output"]}]
