"""Every command block of the docs (README.md, docs/*.md) is run or says why not, and shown output is what it prints.

Marker convention: an HTML comment on the line right before a fenced ```bash or ```console block.

    <!-- doc-test -->             run the block's commands, in order, in a copy of the default run (offline)
    <!-- doc-test slow -->        the same, marked slow (it trains, or reruns stages)
    <!-- doc-test skip: WHY -->   not run here, and why (the network, a GPU, Ollama, Docker, a server in the
                                  background, the whole pipeline); WHY names where it is tested, if it is

In a ```bash block every line is a command (``#`` comments dropped). In a ```console block a command is a line
starting ``$ ``; the lines after it, up to the next command, are what it prints, compared line by line (``...``
inside a line matches any text: a probability that differs across CPUs). Every command must exit 0. A ```bash or
```console block without a marker fails :func:`test_every_command_block_is_marked`: a new example is run or
explained, never silently left out.

The default run is the one `make pipeline` makes: set ``LLMCORE_DEFAULT_RUN`` to a workspace that has run it (its
``data/`` and ``reports/`` are copied), else the stages the blocks need run here (`dvc repro classify`, offline
through ``LLMCORE_MIRROR``: minutes).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

MARKER = re.compile(r"<!--\s*doc-test(?:\s+(slow|skip:\s*(?P<why>.*?)))?\s*-->\s*$")
FENCE = re.compile(r"^```(bash|console)\s*$")


@dataclass
class Block:
    doc: str  # README.md, docs/x.md
    line: int  # 1-based line of the opening fence
    kind: str  # bash | console
    marker: str | None  # run | slow | skip (None: unmarked)
    why: str = ""
    commands: list[tuple[str, list[str]]] = field(default_factory=list)  # (command, expected output lines)

    @property
    def name(self) -> str:
        return f"{self.doc}:{self.line}"


def docs(root: Path = REPO_ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("**/*.md"))]


def blocks(path: Path, root: Path = REPO_ROOT) -> list[Block]:
    """The ```bash / ```console blocks of one document, with their markers and commands."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out = []
    for i, line in enumerate(lines):
        fence = FENCE.match(line)
        if not fence:
            continue
        found = MARKER.search(lines[i - 1]) if i else None
        marker = None if found is None else "skip" if found.group("why") is not None else found.group(1) or "run"
        block = Block(str(path.relative_to(root)), i + 1, fence.group(1), marker, (found and found.group("why")) or "")
        body = []
        for text in lines[i + 1 :]:
            if text.startswith("```"):
                break
            body.append(text)
        if block.kind == "bash":
            joined = "\n".join(body).replace("\\\n", " ")  # a trailing backslash continues the line
            for text in joined.splitlines():
                command = without_comment(text)
                if command:
                    block.commands.append((command, []))
        else:
            for text in body:
                if text.startswith("$ "):
                    block.commands.append((text[2:].strip(), []))
                elif block.commands:
                    block.commands[-1][1].append(text)
        out.append(block)
    return out


def without_comment(line: str) -> str:
    """The shell line up to its ``#`` comment (a ``#`` inside quotes or a word is text)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].strip()
    return line.strip()


def all_blocks() -> list[Block]:
    return [b for path in docs() for b in blocks(path)]


def matches(expected: str, actual: str) -> bool:
    """``expected`` with ``...`` standing for any text."""
    return re.fullmatch(".*?".join(map(re.escape, expected.split("..."))), actual) is not None


def test_every_command_block_is_marked():
    unmarked = [b.name for b in all_blocks() if b.marker is None]
    assert not unmarked, (
        "command blocks without a <!-- doc-test --> / <!-- doc-test slow --> / <!-- doc-test "
        "skip: why --> marker on the line above (see tests/test_doc_commands.py): " + ", ".join(unmarked)
    )
    assert all(b.why.strip() for b in all_blocks() if b.marker == "skip")


def test_the_marker_convention_is_read_as_documented(tmp_path):
    (tmp_path / "README.md").write_text(
        "<!-- doc-test -->\n```console\n$ echo a b\na ...\n$ true\n```\n\n```bash\nls  # no marker\n```\n"
        "<!-- doc-test skip: needs the network -->\n```bash\ncurl x\n```\n<!-- doc-test slow -->\n```bash\n"
        "dvc repro  # trains\n```\n"
    )
    found = blocks(tmp_path / "README.md", tmp_path)
    assert [(b.marker, b.why, b.commands) for b in found] == [
        ("run", "", [("echo a b", ["a ..."]), ("true", [])]),
        (None, "", [("ls", [])]),
        ("skip", "needs the network", [("curl x", [])]),
        ("slow", "", [("dvc repro", [])]),
    ]
    assert matches("spam\t...\tWIN", "spam\t0.9731\tWIN") and not matches("spam\t...", "ham\t0.9")


# --------------------------------------------------------------------------------------------------
# Running them


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, mirror_url) -> tuple[Path, dict[str, str]]:
    """A clean copy of the repository holding the default run's data/ and reports/ (see the module docstring)."""
    from tests.test_pipeline import clean_copy, run

    repo = clean_copy(tmp_path_factory.mktemp("default-run"))
    env = dict(os.environ, LLMCORE_MIRROR=mirror_url, DVC_NO_ANALYTICS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # python, dvc, llmcore: this venv
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")]))  # the copy's code
    source = os.environ.get("LLMCORE_DEFAULT_RUN")
    if source:
        for name in ("data", "reports", "dvc.lock", ".cache"):  # .cache: the training checkpoints
            src = Path(source) / name
            if src.is_dir():
                shutil.copytree(src, repo / name, dirs_exist_ok=True, ignore=shutil.ignore_patterns("hub", "cache"))
            elif src.is_file():
                shutil.copy2(src, repo / name)
    else:
        run([sys.executable, "-m", "dvc", "repro", "classify"], repo, env)
    return repo, env


def runnable(slow: bool) -> list[Block]:
    return [b for b in all_blocks() if b.marker == ("slow" if slow else "run")]


def run_block(block: Block, repo: Path, env: dict[str, str]) -> None:
    for command, expected in block.commands:
        proc = subprocess.run(command, shell=True, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{block.name}: `{command}` exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
        if expected:
            actual = proc.stdout.rstrip("\n").splitlines()
            shown = [line for line in expected if line.strip()]
            assert len(actual) == len(shown) and all(map(matches, shown, actual)), (
                f"{block.name}: `{command}` printed\n{proc.stdout}but the docs show\n" + "\n".join(shown)
            )


@pytest.mark.slow
@pytest.mark.parametrize("block", runnable(False), ids=lambda b: b.name)
def test_doc_block_runs_as_shown(block, default_run):
    run_block(block, *default_run)


@pytest.mark.slow
@pytest.mark.parametrize("block", runnable(True), ids=lambda b: b.name)
def test_slow_doc_block_runs(block, default_run):
    run_block(block, *default_run)


def test_the_classify_examples_explanation_holds():
    """README, "Classify messages": the dataset's spam nearly always carries a digit or a £, which is why the tiny
    model reads "WINNER!! Claim your free prize now" as ham (the counts the README gives)."""
    import zipfile

    from tests.conftest import MIRROR_DIR, require_shared

    archive = require_shared(MIRROR_DIR / "archive.ics.uci.edu/static/public/228/sms+spam+collection.zip")
    rows = zipfile.ZipFile(archive).read("SMSSpamCollection").decode("utf-8").splitlines()
    spam = [line.split("\t", 1)[1] for line in rows if line.startswith("spam\t")]
    with_numbers = [s for s in spam if re.search(r"\d|£", s)]
    text = "\n".join(p.read_text(encoding="utf-8") for p in docs())
    assert f"{len(with_numbers)} of its {len(spam)} spam messages carry a phone number" in text
    assert (len(spam), len(with_numbers)) == (747, 708)
