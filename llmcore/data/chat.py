"""Conversations for chat fine-tuning: read and checked (encoding: ``llmcore.data.instruct.encode_conversations``).

Sources (a download source's folder under ``data/raw``):

- JSONL: one object per line with a ``messages`` list of ``{"role", "content"}`` records (OpenAI's chat form);
- parquet: a ``messages`` column of role/content records (SmolTalk's layout), one or more files, in name order;
- the book's Alpaca JSON list, each entry becoming a user turn and an assistant turn
  (:func:`llmcore.text.chat.alpaca_to_messages`).

A malformed conversation (unknown role, empty content, no assistant turn, a wrong type) stops the stage with one
line naming the file and the 1-based row. Every conversation becomes a dict ``{"messages": [...]}`` (Alpaca
entries keep their ``instruction``/``input``/``output`` too, for the reports).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from llmcore.common import LLMCoreError
from llmcore.data.datasets import load_instruction_data
from llmcore.text.messages import alpaca_to_messages, check_messages

CONVERSATION_SUFFIXES = (".jsonl", ".parquet")


def load_conversations_file(path: str | os.PathLike) -> list[dict]:
    """Conversations from one ``.jsonl`` or ``.parquet`` file (see the module docstring)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return _load_jsonl(path)
    if path.suffix == ".parquet":
        return _load_parquet(path)
    raise LLMCoreError(f"{path}: conversations come as .jsonl or .parquet files")


def _load_jsonl(path: Path) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LLMCoreError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise LLMCoreError(f"{path}: not valid UTF-8 at byte {e.start}") from None
    out = []
    for row, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise LLMCoreError(f"{path}: row {row}: invalid JSON at column {e.colno}: {e.msg}") from None
        out.append(_conversation(obj, f"{path}: row {row}"))
    if not out:
        raise LLMCoreError(f"{path}: no conversations")
    return out


def _load_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise LLMCoreError(f"{path}: reading parquet needs pyarrow (the data extra)") from None
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise LLMCoreError(f"{path}: no such file") from None
    except (pa.ArrowException, OSError) as e:
        raise LLMCoreError(f"{path}: not a readable parquet file ({str(e).strip().splitlines()[0]})") from None
    if "messages" not in table.column_names:
        raise LLMCoreError(f"{path}: no column 'messages' (columns: {', '.join(table.column_names)})")
    out = [
        _conversation({"messages": m}, f"{path}: row {row}")
        for row, m in enumerate(table.column("messages").to_pylist(), start=1)
    ]
    if not out:
        raise LLMCoreError(f"{path}: no conversations")
    return out


def _conversation(obj: object, where: str) -> dict:
    if not isinstance(obj, dict) or "messages" not in obj:
        raise LLMCoreError(f"{where}: expected an object with a 'messages' list")
    return {"messages": check_messages(obj["messages"], where)}


def load_chat_data(files: Sequence[Path]) -> list[dict]:
    """Conversations from a source's files: one Alpaca ``.json`` list (converted), or ``.jsonl``/``.parquet``."""
    if len(files) == 1 and files[0].suffix == ".json":
        return [{**e, "messages": alpaca_to_messages(e)} for e in load_instruction_data(files[0])]
    return [c for f in files for c in load_conversations_file(f)]


def find_chat_files(folder: str | os.PathLike, key: str) -> list[Path]:
    """The data files of a downloaded source: one ``.json`` (Alpaca), or ``.jsonl``/``.parquet`` files."""
    folder = Path(folder)
    files = sorted(p for p in folder.glob("*") if p.is_file() and not p.name.startswith("."))
    conv = [p for p in files if p.suffix in CONVERSATION_SUFFIXES]
    alpaca = [p for p in files if p.suffix == ".json"]
    if conv:
        return conv
    if len(alpaca) == 1:
        return alpaca
    raise LLMCoreError(
        f"{key}: expected .jsonl or .parquet conversation files, or one Alpaca .json file, in {folder}; found "
        f"{len(files)} file(s)"
    )


def chat_prompt_and_reference(conversation: dict) -> tuple[list[dict], str]:
    """A test conversation as (the messages before its last assistant turn, that turn's content)."""
    messages = conversation["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]
