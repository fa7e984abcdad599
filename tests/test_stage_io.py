"""The stage I/O tracer and its check (tests/stage_io.py) on a made-up stage: what it catches, and what it lets pass.

tests/test_pipeline.py::test_every_stage_reads_its_deps_and_writes_its_outs_and_nothing_else runs the same check on
the real pipeline; here a stage script in a temp folder (``python -m stages.fake``, traced the same way) reads and
writes what each test tells it to, so an undeclared read or write is known to be caught, by name.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import stage_io
from tests.conftest import REPO_ROOT

FAKE = '''\
"""A made-up stage: read=a,b  write=c,d (atomically, as the stages do)  rm=e,f  child=g (read by a process it starts)"""
import shutil
import subprocess
import sys
from pathlib import Path

from llmcore.common import write_json_atomic

args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
for path in filter(None, args.get("read", "").split(",")):
    Path(path).read_text()
for path in filter(None, args.get("write", "").split(",")):
    write_json_atomic(path, {"ok": 1})
for path in filter(None, args.get("rm", "").split(",")):
    shutil.rmtree(path) if Path(path).is_dir() else Path(path).unlink()
if args.get("child"):
    subprocess.run([sys.executable, "-c", f"open({args['child']!r}).read()"], check=True)
'''


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "__init__.py").write_text("")
    (tmp_path / "stages" / "fake.py").write_text(FAKE)
    for name in ("data/in.txt", "data/secret.txt", "data/raw/a/file.txt", "params.yaml"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x\n")
    return tmp_path


def traced_run(repo: Path, cmd: str, deps: list[str], outs: list[str]) -> list[str]:
    """Run ``cmd`` (python -m stages.fake ...) traced, as the stage of a dvc.yaml with ``deps`` and ``outs``; then a
    process that is no stage's. The check's problems; the logs are left in ``repo/../logs``."""
    logs = repo.parent / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    env = dict(os.environ, STAGE_IO_LOG=str(logs))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT / "tests" / "stage_io_site"), str(REPO_ROOT)])
    env.pop(stage_io.STAGE_ENV, None)
    words = shlex.split(cmd)
    subprocess.run([sys.executable, *words[1:]], cwd=repo, env=env, check=True)
    subprocess.run([sys.executable, "-c", "open('data/in.txt').read()"], cwd=repo, env=env, check=True)
    spec = {"stages": {"fake": {"cmd": cmd, "deps": ["stages/fake.py", *deps], "outs": outs}}}
    return stage_io.problems(spec, stage_io.read_logs(logs), {})


def test_declared_reads_and_atomic_writes_pass(repo):
    cmd = "python -m stages.fake read=data/in.txt,data/raw/a/file.txt,params.yaml write=out/r.json,reports/m.json"
    assert traced_run(repo, cmd, ["data/in.txt", "data/raw/a"], ["out", "reports/m.json"]) == []
    assert (repo / "out" / "r.json").is_file()  # written as a temporary beside it, then renamed: seen as out/r.json


def test_an_undeclared_read_is_named(repo):
    cmd = "python -m stages.fake read=data/in.txt,data/secret.txt write=out/r.json"
    assert traced_run(repo, cmd, ["data/in.txt"], ["out/r.json"]) == [
        "fake: reads data/secret.txt, which is no declared dep"
    ]


def test_a_read_in_a_process_the_stage_starts_is_the_stage_s(repo):
    cmd = "python -m stages.fake read=data/in.txt write=out/r.json child=data/secret.txt"
    assert traced_run(repo, cmd, ["data/in.txt"], ["out/r.json"]) == [
        "fake: reads data/secret.txt, which is no declared dep"
    ]


def test_an_undeclared_write_is_named(repo):
    cmd = "python -m stages.fake read=data/in.txt write=out/r.json,reports/live/metrics.json"
    assert traced_run(repo, cmd, ["data/in.txt"], ["out/r.json", "reports/live/plots"]) == [
        "fake: writes reports/live/metrics.json, which is no declared out",
        "fake: never writes its declared out reports/live/plots",
    ]


def test_an_undeclared_removal_is_named(repo):
    """A file or folder removed outside the outs (a folder by shutil.rmtree: named once, not file by file)."""
    cmd = "python -m stages.fake read=data/in.txt write=out/r.json rm=data/secret.txt,data/raw"
    assert traced_run(repo, cmd, ["data/in.txt"], ["out/r.json"]) == [
        "fake: removes data/secret.txt, which is no declared out",
        "fake: removes data/raw, which is no declared out",
    ]


def test_declarations_never_used_are_named(repo):
    cmd = "python -m stages.fake read=data/in.txt write=out/r.json"
    assert traced_run(repo, cmd, ["data/in.txt", "data/raw/a"], ["out/r.json", "out/other.json"]) == [
        "fake: never reads its declared dep data/raw/a",
        "fake: never writes its declared out out/other.json",
    ]


def test_a_cache_only_where_the_command_names_it(repo):
    ok = "python -m stages.fake --work .cache/fake read=data/in.txt write=out/r.json,.cache/fake/step.json"
    assert traced_run(repo, ok, ["data/in.txt"], ["out/r.json"]) == []
    other = "python -m stages.fake --work .cache/fake read=.cache/tokenize/x.json write=out/r.json"
    (repo / ".cache" / "tokenize").mkdir(parents=True)
    (repo / ".cache" / "tokenize" / "x.json").write_text("{}")
    assert traced_run(repo, other, [], ["out/r.json"]) == [
        "fake: reads .cache/tokenize/x.json, which is no declared dep"
    ]


def test_a_process_that_runs_no_stage_is_not_traced(repo, tmp_path):
    """Only `python -m stages.<name>` (and what it starts) is traced: dvc itself and the tests are not."""
    cmd = "python -m stages.fake read=data/in.txt write=out/r.json"
    traced_run(repo, cmd, ["data/in.txt"], ["out/r.json"])
    logs = stage_io.read_logs(repo.parent / "logs")
    assert [p["argv"][-2:] for p in logs] == [["read=data/in.txt", "write=out/r.json"]]  # not the `python -c` one
    assert ["r", "data/in.txt"] in logs[0]["events"] and [e[0] for e in logs[0]["events"] if e[0] == "mv"] == ["mv"]


def test_a_conditional_dep_may_go_unread_only_without_the_param_that_needs_it():
    """tokenize reads OpenAI's BPE only with tokenize.kind gpt2 (stage_io.CONDITIONAL_DEPS); dvc.yaml declares it."""
    spec = {
        "stages": {
            "tokenize": {"cmd": "python -m stages.tokenize", "deps": ["data/raw/c", "data/raw/gpt2-bpe"], "outs": ["t"]}
        }
    }
    logs = [{"argv": ["python", "-m", "stages.tokenize"], "events": [["r", "data/raw/c/a.txt"], ["w", "t/m.json"]]}]
    assert stage_io.problems(spec, logs, {"tokenize": {"kind": "bpe"}}) == []
    assert stage_io.problems(spec, logs, {"tokenize": {"kind": "gpt2"}}) == [
        "tokenize: never reads its declared dep data/raw/gpt2-bpe"
    ]


def test_a_traced_process_of_no_stage_is_named():
    spec = {"stages": {"a": {"cmd": "python -m stages.a --out x", "outs": ["x"]}}}
    logs = [{"argv": ["/venv/python", "-m", "stages.a", "--out", "y"], "events": [["w", "y"]]}]
    assert stage_io.problems(spec, logs, {}) == [
        "a traced process runs no stage's command: /venv/python -m stages.a --out y (stages.a)"
    ]
