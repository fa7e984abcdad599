"""Atomic writes honour the umask, as open() and mkdir() would: outputs are shareable, not private."""

from __future__ import annotations

import os
import stat

import pytest

from llmcore.common import atomic_path, write_json_atomic, write_text_atomic
from llmcore.models.config import ModelConfig
from llmcore.models.gpt import GPT
from llmcore.text.tokenizer import Tokenizer
from llmcore.weights.model_dir import open_model_dir, save_model_dir


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize(("mask", "file_mode"), [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_atomic_files_get_the_mode_open_would_give(tmp_path, umask, mask, file_mode):
    umask(mask)
    write_text_atomic(tmp_path / "a.txt", "hello")
    write_json_atomic(tmp_path / "b.json", {"x": 1})
    with atomic_path(tmp_path / "c.bin") as tmp:
        tmp.write_bytes(b"\0")
    with open(tmp_path / "reference.txt", "w") as f:  # what a plain open() makes under this umask
        f.write("x")
    assert mode(tmp_path / "reference.txt") == file_mode
    for name in ("a.txt", "b.json", "c.bin"):
        assert mode(tmp_path / name) == file_mode, name


def test_model_folders_are_readable_by_others(tmp_path, umask):
    umask(0o022)
    model = GPT(ModelConfig.from_preset("gpt2-tiny"))
    save_model_dir(tmp_path / "m", model, Tokenizer.char("some text to make a vocabulary"))
    assert mode(tmp_path / "m") == 0o755
    assert mode(tmp_path / "m" / "model.safetensors") == 0o644
    assert mode(tmp_path / "m" / "tokenizer.json") == 0o644
    assert open_model_dir(tmp_path / "m").task == "lm"
