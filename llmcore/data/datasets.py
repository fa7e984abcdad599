"""Parsers and content checks for the downloaded datasets.

A digest proves we got the bytes we pinned; these checks prove the bytes are what the stages expect
(and cover files we cannot pin, such as the UCI spam archive, whose repacks differ byte for byte). Each
failure is an :class:`LLMCoreError` naming the file and the row or entry at fault.

- ``SMSSpamCollection`` (UCI SMS Spam Collection): ``label<TAB>text`` per line, no header, 5574 rows.
- ``instruction-data.json`` (LLMs-from-scratch ch07): a JSON list of Alpaca-style entries.
- ``instruction-data-with-preference.json`` (ch07 DPO): the same entries plus ``chosen`` and ``rejected`` answers.
- plain-text pretraining corpora (the-verdict.txt, TinyShakespeare).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import pandas as pd

from llmcore.common import LLMCoreError

SPAM_LABELS = ("ham", "spam")
SPAM_ROWS = 5574  # the real file: 4827 ham, 747 spam
INSTRUCTION_KEYS = ("instruction", "input", "output")
PREFERENCE_KEYS = ("instruction", "input", "chosen", "rejected")  # ``output`` (a reference) is optional


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise LLMCoreError(f"{path}: no such file") from None


def _decode_utf8(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LLMCoreError(f"{path}: not valid UTF-8 at byte {e.start}") from None


def load_spam_table(path: str | os.PathLike) -> pd.DataFrame:
    """Parse the SMS Spam Collection into a DataFrame with columns ``label`` and ``text``.

    Parsed by hand rather than with ``pd.read_csv``: messages contain stray quotes, and CSV quoting would
    silently merge rows (the book's ``read_csv`` call finds 5572 rows instead of 5574).

    Raises:
        LLMCoreError: naming the file and 1-based row for a missing tab, an unknown label or empty text.
    """
    path = Path(path)
    text = _decode_utf8(path, _read_bytes(path))
    # Split on "\n" only: str.splitlines would also break on form feeds or U+2028 inside a message.
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last row; it does not start a new one
    labels, texts = [], []
    for row, line in enumerate(lines, start=1):
        label, tab, message = line.rstrip("\r").partition("\t")
        if not tab:
            raise LLMCoreError(f"{path}: row {row}: missing column (expected 'label<TAB>text')")
        if label not in SPAM_LABELS:
            raise LLMCoreError(f"{path}: row {row}: unknown label '{label}' (expected ham or spam)")
        if not message.strip():
            raise LLMCoreError(f"{path}: row {row}: empty text")
        labels.append(label)
        texts.append(message)
    return pd.DataFrame({"label": labels, "text": texts})


def check_spam_table(path: str | os.PathLike, expected_rows: int = SPAM_ROWS) -> pd.DataFrame:
    """Load the spam table and check its row count; returns the table so callers parse it once."""
    df = load_spam_table(path)
    if len(df) != expected_rows:
        raise LLMCoreError(f"{path}: expected {expected_rows} rows, found {len(df)}")
    return df


def load_instruction_data(path: str | os.PathLike) -> list[dict]:
    """Load a JSON list of ``{"instruction", "input", "output"}`` string entries (``input`` may be empty).

    Raises:
        LLMCoreError: naming the file, the 0-based entry index and the key that is missing or not a string.
    """
    path = Path(path)
    text = _decode_utf8(path, _read_bytes(path))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise LLMCoreError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(data, list):
        raise LLMCoreError(f"{path}: expected a JSON list of entries, got {type(data).__name__}")
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise LLMCoreError(f"{path}: entry {i}: expected an object, got {type(entry).__name__}")
        for key in INSTRUCTION_KEYS:
            if key not in entry:
                raise LLMCoreError(f"{path}: entry {i}: missing key '{key}'")
            if not isinstance(entry[key], str):
                kind = type(entry[key]).__name__
                raise LLMCoreError(f"{path}: entry {i}: key '{key}' must be a string, got {kind}")
        for key in ("instruction", "output"):  # only the input may legitimately be empty
            if not entry[key].strip():
                raise LLMCoreError(f"{path}: entry {i}: key '{key}' is empty")
    return data


PREFERENCE_KEYS = ("instruction", "input", "chosen", "rejected")  # ``output`` (a reference) is optional


def validate_preferences(
    data: object, where: str, identical: Literal["error", "drop"] = "drop"
) -> tuple[list[dict], list[int]]:
    """Check a parsed JSON list of preference entries -> (kept entries, indices of dropped identical pairs).

    Every entry needs string ``instruction``, ``input`` (may be empty), ``chosen`` and ``rejected``; the
    instruction and both answers must be non-empty, and ``output`` is a string when present. An entry
    whose chosen and rejected answers are the same text (up to surrounding whitespace) carries no
    preference: with ``identical="drop"`` it is dropped and its index returned, with ``"error"`` it stops.

    Raises:
        LLMCoreError: ``<where>: entry <i>: ...`` naming the 0-based entry index and the field at fault.
    """
    if not isinstance(data, list):
        raise LLMCoreError(f"{where}: expected a JSON list of preference entries, got {type(data).__name__}")
    if not data:
        raise LLMCoreError(f"{where}: no preference entries")
    kept, dropped = [], []
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise LLMCoreError(f"{where}: entry {i}: expected an object, got {type(entry).__name__}")
        for key in PREFERENCE_KEYS + (("output",) if "output" in entry else ()):
            if key not in entry:
                raise LLMCoreError(f"{where}: entry {i}: missing key '{key}'")
            if not isinstance(entry[key], str):
                raise LLMCoreError(f"{where}: entry {i}: key '{key}' must be a string, got {type(entry[key]).__name__}")
        for key in ("instruction", "chosen", "rejected"):
            if not entry[key].strip():
                raise LLMCoreError(f"{where}: entry {i}: key '{key}' is empty")
        if entry["chosen"].strip() == entry["rejected"].strip():
            if identical == "error":
                raise LLMCoreError(f"{where}: entry {i}: 'chosen' and 'rejected' are the same text")
            dropped.append(i)
            continue
        kept.append(entry)
    if not kept:
        raise LLMCoreError(f"{where}: every entry has identical chosen and rejected answers")
    return kept, dropped


def load_preferences(
    path: str | os.PathLike, identical: Literal["error", "drop"] = "drop"
) -> tuple[list[dict], list[int]]:
    """Read and validate a preference file (a JSON list; see ``validate_preferences``)."""
    path = Path(path)
    text = _decode_utf8(path, _read_bytes(path))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise LLMCoreError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    return validate_preferences(data, str(path), identical)


def find_single_file(folder: str | os.PathLike, key: str, pattern: str = "*") -> Path:
    """The one data file in a downloaded folder (``data/raw/<source>``); ``key`` is the param that named it."""
    folder = Path(folder)
    files = sorted(p for p in folder.glob(pattern) if p.is_file() and not p.name.startswith("."))
    if len(files) != 1:
        kind = "file" if pattern == "*" else f"{pattern.lstrip('*')} file"
        raise LLMCoreError(f"{key}: expected one {kind} in {folder}, found {len(files)}")
    return files[0]


def check_text_corpus(path: str | os.PathLike, min_bytes: int = 1) -> str:
    """Check that a pretraining corpus is UTF-8 and at least ``min_bytes`` long; returns its text."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < min_bytes:
        raise LLMCoreError(f"{path}: {len(data)} bytes, expected at least {min_bytes}")
    text = _decode_utf8(path, data)
    if not text.strip():
        raise LLMCoreError(f"{path}: contains only whitespace")
    return text
