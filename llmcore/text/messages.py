"""Conversations as messages: the roles, their validation, ChatML as text, and the book's Alpaca entries as
conversations. No tokenizer here: the download stage checks conversation files with this alone, so editing the
tokenizer does not rerun it (llmcore.text.chat renders messages to token ids).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llmcore.common import LLMCoreError

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


def alpaca_to_messages(entry: dict[str, str]) -> list[dict[str, str]]:
    """One Alpaca entry as a two-turn conversation: the instruction (and its input, after a blank line) from the
    user, the output from the assistant."""
    user = entry["instruction"] + (f"\n\n{entry['input']}" if entry.get("input") else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": entry["output"]}]
