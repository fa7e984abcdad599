"""One command line: `llmcore ask` and `llmcore classify` beside serve, export, benchmark, compare and profile; the
old spellings (`python -m stages.instruct ask`, `python -m stages.classify predict`) forward to them."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from llmcore.cli import app
from tests.conftest import REPO_ROOT


def test_every_command_is_an_llmcore_command():
    out = CliRunner().invoke(app, ["--help"]).output
    for command in ("ask", "classify", "serve", "export", "benchmark", "compare", "profile"):
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
    proc = subprocess.run([sys.executable, "-m", *old, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    direct = CliRunner().invoke(app, [new, *args])
    assert proc.returncode == direct.exit_code == 1
    assert proc.stderr.strip() == direct.output.strip() and str(tmp_path / "nowhere") in proc.stderr, proc.stderr
