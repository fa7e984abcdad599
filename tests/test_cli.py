"""One command line: `llmcore ask`, `chat` and `classify` beside serve, export, benchmark, compare and profile; the
old spellings (`python -m stages.instruct ask`, `python -m stages.classify predict`) forward to them."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from llmcore.cli import app
from llmcore.models.config import ModelConfig
from llmcore.models.gpt import GPT
from llmcore.text.tokenizer import Tokenizer
from llmcore.weights.model_dir import save_model_dir
from tests.conftest import REPO_ROOT

TEXT = "Below is an instruction that describes a task. Write a response that appropriately completes the request. " * 8


def test_every_command_is_an_llmcore_command():
    out = CliRunner().invoke(app, ["--help"]).output
    for command in ("ask", "chat", "classify", "serve", "export", "benchmark", "compare", "profile"):
        assert f"│ {command} " in out, out


def test_a_flag_shows_no_value_in_help():
    lines = [line for line in CliRunner().invoke(app, ["profile", "--help"]).output.splitlines() if "--run" in line]
    assert lines and "<bool>" not in lines[0] and "run `dvc exp run`" in lines[0], lines


@pytest.mark.parametrize(
    "old, new",
    [(["stages.instruct", "ask"], "ask"), (["stages.classify", "predict"], "classify")],
    ids=["ask", "predict"],
)
def test_old_spellings_forward_to_the_llmcore_command(tmp_path, old, new):
    args = ["--model", str(tmp_path / "nowhere"), "hello"]
    proc = subprocess.run(
        [sys.executable, "-m", *old, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    direct = CliRunner().invoke(app, [new, *args])
    assert proc.returncode == direct.exit_code == 1
    assert proc.stderr.strip() == direct.output.strip() and str(tmp_path / "nowhere") in proc.stderr, proc.stderr


def test_chat_with_an_alpaca_model_answers_each_line_as_ask_does(tmp_path):
    """An Alpaca-template model has no turns: each line's answer is `llmcore ask`'s answer to it."""
    tok = Tokenizer.train(TEXT, 300)
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(
        "llama3-tiny",
        vocab_size=tok.vocab_size,
        context_length=256,
        n_layers=1,
        emb_dim=32,
        n_heads=2,
        n_kv_heads=1,
        hidden_dim=64,
    )
    save_model_dir(tmp_path / "m", GPT(cfg), tok, metadata={"template": "alpaca"})
    opts = ["--model", str(tmp_path / "m"), "--max-new-tokens", "12", "--device", "cpu"]
    lines = ["Name a colour.", "Write a task."]
    chat = CliRunner().invoke(app, ["chat", *opts], input="\n".join([lines[0], "", lines[1]]) + "\n")
    assert chat.exit_code == 0, chat.output
    asked = [CliRunner().invoke(app, ["ask", *opts, line]) for line in lines]
    assert chat.output == "".join(a.output for a in asked) and chat.output.count("\n") == 2
