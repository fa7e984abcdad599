"""Content checks on the real mirrored datasets and on small malformed copies of them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmcore.common import LLMCoreError
from llmcore.data.datasets import (
    check_spam_table,
    check_text_corpus,
    load_instruction_data,
    load_spam_table,
)
from llmcore.download import extract_zip

SPAM_ZIP = "archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
INSTRUCTIONS = "raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/instruction-data.json"
VERDICT = "raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/01_main-chapter-code/the-verdict.txt"


# --- the real files -----------------------------------------------------------------------------------


def test_real_spam_collection(mirror_dir: Path, tmp_path: Path) -> None:
    [table] = extract_zip(mirror_dir / SPAM_ZIP, tmp_path, members=["SMSSpamCollection"])
    df = check_spam_table(table)
    assert list(df.columns) == ["label", "text"]
    assert len(df) == 5574
    assert (df["label"] == "spam").sum() == 747
    assert df["text"].str.contains('"').any()  # quotes inside messages did not merge rows


def test_real_instruction_data(mirror_dir: Path) -> None:
    data = load_instruction_data(mirror_dir / INSTRUCTIONS)
    assert len(data) == 1100
    assert set(data[0]) == {"instruction", "input", "output"}


def test_real_text_corpus(mirror_dir: Path) -> None:
    text = check_text_corpus(mirror_dir / VERDICT, min_bytes=20_000)
    assert text.startswith("I HAD always thought Jack Gisburn")


# --- spam table ---------------------------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_spam_table_parses_quotes_and_tabs(tmp_path: Path) -> None:
    table = write(tmp_path / "t", 'ham\tsay "hi\nspam\tWIN\tnow "free"\n')
    df = load_spam_table(table)
    assert df.to_dict("records") == [
        {"label": "ham", "text": 'say "hi'},
        {"label": "spam", "text": 'WIN\tnow "free"'},
    ]


@pytest.mark.parametrize(
    "text, match",
    [
        ("ham\tok\nxyz\thello\n", "row 2: unknown label 'xyz'"),
        ("ham\tok\nham\tfine\nspam\t \n", "row 3: empty text"),
        ("ham\tok\njust text without a tab\n", "row 2: missing column"),
        ("ham\tok\n\nham\tok\n", "row 2: missing column"),  # a blank line is not silently skipped
    ],
)
def test_spam_table_bad_rows(tmp_path: Path, text: str, match: str) -> None:
    table = write(tmp_path / "SMSSpamCollection", text)
    with pytest.raises(LLMCoreError, match=match) as err:
        load_spam_table(table)
    assert "SMSSpamCollection" in str(err.value)


def test_spam_table_row_count(tmp_path: Path) -> None:
    table = write(tmp_path / "t", "ham\tok\n")
    with pytest.raises(LLMCoreError, match="expected 5574 rows, found 1"):
        check_spam_table(table)
    assert len(check_spam_table(table, expected_rows=1)) == 1


def test_spam_table_not_utf8(tmp_path: Path) -> None:
    table = tmp_path / "t"
    table.write_bytes(b"ham\t\xff\n")
    with pytest.raises(LLMCoreError, match="not valid UTF-8"):
        load_spam_table(table)


# --- instruction data ---------------------------------------------------------------------------------

GOOD = {"instruction": "Add.", "input": "", "output": "Done."}


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"instruction": "x", "input": ""}, "entry 2: missing key 'output'"),
        ({**GOOD, "input": 3}, "entry 2: key 'input' must be a string, got int"),
        ({**GOOD, "instruction": None}, "entry 2: key 'instruction' must be a string"),
        ({**GOOD, "output": "  "}, "entry 2: key 'output' is empty"),
        (["not", "an", "object"], "entry 2: expected an object"),
    ],
)
def test_instruction_data_bad_entry(tmp_path: Path, bad, match: str) -> None:
    path = write(tmp_path / "data.json", json.dumps([GOOD, GOOD, bad, GOOD]))
    with pytest.raises(LLMCoreError, match=match) as err:
        load_instruction_data(path)
    assert "data.json" in str(err.value)


def test_instruction_data_bad_json(tmp_path: Path) -> None:
    with pytest.raises(LLMCoreError, match="invalid JSON at line 1"):
        load_instruction_data(write(tmp_path / "d.json", '[{"instruction": '))
    with pytest.raises(LLMCoreError, match="expected a JSON list"):
        load_instruction_data(write(tmp_path / "d.json", json.dumps(GOOD)))


# --- text corpus --------------------------------------------------------------------------------------


def test_text_corpus_checks(tmp_path: Path) -> None:
    with pytest.raises(LLMCoreError, match="0 bytes, expected at least 1"):
        check_text_corpus(write(tmp_path / "empty.txt", ""))
    with pytest.raises(LLMCoreError, match="only whitespace"):
        check_text_corpus(write(tmp_path / "blank.txt", " \n\n"))
    with pytest.raises(LLMCoreError, match="expected at least 100"):
        check_text_corpus(write(tmp_path / "short.txt", "tiny"), min_bytes=100)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café".encode("latin-1"))
    with pytest.raises(LLMCoreError, match="latin1.txt: not valid UTF-8 at byte 3"):
        check_text_corpus(bad)
    with pytest.raises(LLMCoreError, match="no such file"):
        check_text_corpus(tmp_path / "missing.txt")
