"""What each pipeline stage reads and writes, traced, and checked against what dvc.yaml declares for it.

**The tracer** (``install``) runs inside the stage processes: ``tests/stage_io_site/sitecustomize.py`` imports this
file when ``tests/stage_io_site`` is on ``PYTHONPATH`` and ``STAGE_IO_LOG`` names a folder. In a process started as
``python -m stages.<name> ...`` (and in any process such a stage starts: it inherits the stage's command line through
``STAGE_IO_STAGE``) an audit hook (``sys.addaudithook``) logs every file the process opens, with whether it opened
it to read or to write, plus the renames (a file or folder written as a temporary beside its destination, then
renamed onto it: ``llmcore.common.atomic_path``), removals, new folders and folder listings. One JSON-lines file per
process under ``STAGE_IO_LOG``: a header with the stage's command line and working directory, then one
``[kind, path]`` (or ``["mv", src, dst]``) a line, each logged once, paths relative to the working directory (the
repository DVC runs the stage in). Paths outside it (the interpreter, site-packages, /tmp) are not logged.
Other processes (``dvc`` itself, the tests) are left alone. The tracer uses the standard library only.

What the audit hook cannot see: files opened by native code without Python's ``open`` (safetensors' Rust reader and
writer, torch's C++ zip writer). The stages write those through a temporary folder renamed into place, and read
them beside files Python opens (a model folder's ``tokenizer.json``), so the folders are still seen.

**The check** (``problems``) maps each logged path to the stage's declared deps and outs (metrics and plots included;
a folder holds its files) and names every stage and path that breaks the rules; see ``problems``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Iterable
from pathlib import Path

LOG_ENV = "STAGE_IO_LOG"  # the folder the logs go to; unset, the tracer does nothing
STAGE_ENV = "STAGE_IO_STAGE"  # the stage's command line (JSON), passed on to the processes the stage starts

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_EVENTS = frozenset(
    {
        "open",
        "os.rename",
        "os.replace",
        "os.remove",
        "os.rmdir",
        "os.mkdir",
        "os.listdir",
        "os.scandir",
        "os.link",
        "os.symlink",
        "shutil.copyfile",
        "shutil.copytree",
        "shutil.move",
        "shutil.rmtree",
    }
)


def _stage_argv() -> list[str] | None:
    """The command line of the stage this process belongs to: its own for ``python -m stages.<name>``, else the
    inherited one (a process the stage started), else None (not a stage's process)."""
    inherited = os.environ.get(STAGE_ENV)
    if inherited:
        return json.loads(inherited)
    argv = list(getattr(sys, "orig_argv", []))
    if "-m" in argv[:-1] and argv[argv.index("-m") + 1].startswith("stages."):
        return argv
    return None


def install() -> bool:
    """Start tracing this process if it is a pipeline stage's and ``STAGE_IO_LOG`` is set; True when it did."""
    log_dir = os.environ.get(LOG_ENV)
    argv = _stage_argv() if log_dir else None
    if argv is None:
        return False
    os.environ[STAGE_ENV] = json.dumps(argv)
    root = os.getcwd()
    os.makedirs(log_dir, exist_ok=True)
    # opened before the hook is added, and written with os.write (never audited): the log never logs itself
    fd = os.open(os.path.join(log_dir, f"{os.getpid()}.jsonl"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(fd, (json.dumps({"argv": argv, "cwd": root, "pid": os.getpid()}) + "\n").encode())
    roots = {root, os.path.realpath(root)}
    seen: set[tuple] = set()
    busy = threading.local()

    def rel(path) -> str | None:
        if isinstance(path, int) or path is None:  # a file descriptor: opened (and logged) by path before
            return None
        path = os.fsdecode(os.fspath(path))
        absolute = os.path.normpath(os.path.join(os.getcwd(), path))
        for r in roots:
            if absolute == r or absolute.startswith(r + os.sep):
                return os.path.relpath(absolute, r).replace(os.sep, "/")
        return None

    def log(*record) -> None:
        if None in record[1:] or record in seen:
            return
        seen.add(record)
        os.write(fd, (json.dumps(list(record)) + "\n").encode())

    def hook(event: str, args: tuple) -> None:
        if event not in _EVENTS or getattr(busy, "on", False):
            return
        busy.on = True
        try:
            if event == "open":
                path, mode, flags = args
                if isinstance(mode, str):
                    write = any(c in mode for c in "wax+")
                else:  # os.open: the flags say
                    write = bool((flags or 0) & _WRITE_FLAGS)
                    if not write and not isinstance(path, int) and not os.path.lexists(path):
                        return  # a name relative to a folder's descriptor (shutil.rmtree's), not to the cwd
                if not write and not isinstance(path, int) and os.path.isdir(path):  # shutil.rmtree, fsync of a folder
                    log("ls", rel(path))
                else:
                    log("w" if write else "r", rel(path))
            elif event in ("os.rename", "os.replace", "shutil.move"):
                log("mv", rel(args[0]), rel(args[1]))
            elif event in ("os.link", "os.symlink", "shutil.copyfile"):
                log("r", rel(args[0]))
                log("w", rel(args[1]))
            elif event == "shutil.copytree":  # a folder listed and made; each file copied is opened, and logged
                log("ls", rel(args[0]))
                log("mkdir", rel(args[1]))
            elif event in ("os.remove", "os.rmdir", "shutil.rmtree"):
                # removing what is not there changes nothing; a name relative to a folder descriptor (dir_fd, as
                # inside shutil.rmtree, whose own event names the tree) is not a path from the cwd
                if args[0] is not None and args[-1] in (None, -1) and os.path.lexists(args[0]):
                    log("rm", rel(args[0]))
            elif event == "os.mkdir":
                log("mkdir", rel(args[0]))
            else:  # os.listdir, os.scandir: a folder's names read
                log("ls", rel(args[0] if args[0] is not None else "."))
        except Exception:  # noqa: BLE001 (the traced program must never fail because of its tracer)
            pass
        finally:
            busy.on = False

    sys.addaudithook(hook)
    return True


# --------------------------------------------------------------------------------------------------
# The check


def under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def read_logs(log_dir: Path) -> list[dict]:
    """Each traced process: ``{"argv", "cwd", "pid", "events": [[kind, path...], ...]}``."""
    out = []
    for f in sorted(Path(log_dir).glob("*.jsonl")):
        lines = f.read_text().splitlines()
        out.append({**json.loads(lines[0]), "events": [json.loads(line) for line in lines[1:]]})
    return out


# Python's own reads and writes of the project's code: the stage's code deps, checked against its imports by
# tests/test_deps.py (a .py file in the project's packages, and the byte-code cache Python writes beside it).
CODE = ("llmcore/", "stages/", "tools/")  # a folder name ends with "/"


def is_code(path: str) -> bool:
    """A module, a package folder (listed by the import system) or byte-code of the project's packages."""
    if "/__pycache__/" in f"/{path}":
        return True
    in_package = any(under(path, c.rstrip("/")) for c in CODE)
    return in_package and (path.endswith(".py") or not Path(path).suffix)


# Read or written by the stages and declared as no stage's dep or out, deliberately:
# - params.yaml: each stage declares the keys it reads as `params` (tests/test_deps.py checks them), not the file;
# - dvc.yaml: every stage's params loader reads the sections it declares (llmcore.params.read_params: an unknown
#   section is a typo), and the report reads its stage names; DVC refuses dvc.yaml as a dep, and the parts of it
#   that make a stage (its cmd, deps, outs and params) are what DVC compares before rerunning it anyway;
# - git's and DVC's own files (.git/, .gitignore, .dvc/, .dvcignore): dvclive, the training stages' curve writer,
#   opens the repository to learn whether it runs inside `dvc exp run`; the curves do not depend on what it finds.
NOT_DVC_PATHS = ("params.yaml", "dvc.yaml", ".git/", ".gitignore", ".dvc/", ".dvcignore")
# Not paths: setuptools' editable install puts this name on sys.path, and the import system looks it up
IMPORT_HOOKS = ("__editable__.",)
# A dep a stage reads only with some params, by (stage, dep) -> (param, the value that makes the stage read it):
# DVC cannot make a dep conditional, so the stage declares it always, and it is required only with that value
CONDITIONAL_DEPS = {
    ("tokenize", "data/raw/gpt2-bpe"): ("tokenize.kind", "gpt2"),  # OpenAI's BPE, the gpt2 tokenizer's only
    ("preferences", "data/models/${align.base_model}"): ("align.preferences", "judge"),  # it answers, in judge mode
}
# Folders a stage's command passes that are deliberately not DVC outputs: DVC deletes a stage's outputs before it
# runs it, and these must outlive a run (a forced `dvc repro -f` resumes from them or reuses them):
# - .cache/<stage>/: resumable training checkpoints and tokenize's work folder (a killed run resumes there);
# - data/cache/: the judge's answers, shared by preferences and evaluate (two stages cannot share an output);
# - data/hub/: Hub downloads of the import stage, kept per repo/revision while their digests match.
# A stage may use them only where its command names them: one stage's cache is no other stage's input.
CACHES = (".cache/", "data/cache/", "data/hub/")


def cache_paths(cmd_words: Iterable[str]) -> list[str]:
    return [w.rstrip("/") for w in cmd_words if w.startswith(CACHES)]


def resolve_moves(path: str, moves: list[tuple[str, str]]) -> str:
    """Where a path written inside a temporary ended up: renamed onto its destination (a folder's files with it)."""
    for _ in range(len(moves) + 1):
        for src, dst in moves:
            if under(path, src):
                path = dst + path[len(src) :]
                break
        else:
            return path
    return path


def declared(body: dict, resolve) -> tuple[list[str], list[str]]:
    """A stage's data deps and its outputs (outs, metrics, plots), ``${...}`` filled in by ``resolve``."""
    deps = [resolve(d) for d in body.get("deps") or [] if not (d.startswith(CODE) and d.endswith(".py"))]
    outs = [
        resolve(e if isinstance(e, str) else next(iter(e)))
        for k in ("outs", "metrics", "plots")
        for e in body.get(k) or []
    ]
    # data/params-checked.txt: check-params' output, a dep of every other stage to order it first; no script reads it
    return [d for d in deps if d not in NOT_DVC_PATHS and d != "data/params-checked.txt"], outs


def check_stage(
    name: str, cmd_words: list[str], deps: list[str], outs: list[str], events: list[list], unread_ok: Iterable[str] = ()
) -> list[str]:
    """The rules, for one stage's traced events (all its processes together):

    - every path it reads lies in a declared dep or out (reading its own outputs back is fine), or is exempt;
    - every path it writes, renames onto, removes or makes lies in a declared out (a file written as a temporary
      counts where it was renamed to; a folder made or listed may also be one that holds a declared path, and a
      folder listed to remove it is only removed);
    - it reads every declared dep (a file in it, for a folder; ``unread_ok`` aside) and writes every declared out;
    - caches (``CACHES``) only where its command names them, never as deps or outs.
    """
    caches = cache_paths(cmd_words)
    moves = [(e[1], e[2]) for e in events if e[0] == "mv" and e[1] and e[2]]

    def ignored(path: str) -> bool:
        return (
            is_code(path)
            or any(under(path, n.rstrip("/")) for n in NOT_DVC_PATHS)
            or path.startswith(IMPORT_HOOKS)
            or any(under(path, c) for c in caches)
        )

    def holds_declared(path: str) -> bool:  # a folder above a declared dep, out or cache (made, or listed)
        return path == "." or any(under(p, path) for p in [*deps, *outs, *caches])

    removed = [e[1] for e in events if e[0] == "rm" and e[1]]
    problems, read, written = [], set(), set()
    for kind, *paths in events:
        if kind == "mv":  # a rename writes its destination
            kind, paths = "w", paths[1:]
        path = paths[0]
        if path is None or ignored(path):
            continue
        if kind in ("r", "ls"):
            path = resolve_moves(path, moves)  # a temporary read back before it is renamed: its destination
            if any(under(path, d) for d in [*deps, *outs]):
                read.add(path)
            elif not (kind == "ls" and (holds_declared(path) or any(under(path, r) for r in removed))):
                problems.append(f"{name}: reads {path}, which is no declared dep")
        else:  # "w", "rm", "mkdir"
            final = resolve_moves(path, moves)
            if any(under(final, o) for o in outs):
                written.add(final)
            elif kind == "mkdir" and holds_declared(final):
                pass
            elif kind == "rm" and any(under(src, final) or under(final, src) for src, _ in moves):
                pass  # a temporary removed (the one renamed away, or a stale one beside it)
            else:
                what = {"w": "writes", "rm": "removes", "mkdir": "makes"}[kind]
                problems.append(f"{name}: {what} {final}, which is no declared out")
    for d in deps:
        if d not in unread_ok and not any(under(p, d) for p in read):
            problems.append(f"{name}: never reads its declared dep {d}")
    for o in outs:
        if not any(under(p, o) for p in written):
            problems.append(f"{name}: never writes its declared out {o}")
    return list(dict.fromkeys(problems))  # a temporary and the rename onto its destination: one problem


def problems(spec: dict, logs: list[dict], params: dict) -> list[str]:
    """Every rule broken by every stage that ran (``check_stage``), by dvc.yaml's ``spec``, the ``params`` it ran
    with (they fill in ``${...}``) and the traced ``logs``.

    Each process is the stage whose command line it ran (or inherited). A traced process no stage of ``spec`` runs
    is a problem too (the check would say nothing about it).
    """
    import shlex

    from tools.reruns import resolve as fill

    def resolve(text: str) -> str:
        return fill(text, params)

    def param(key: str):
        node = params
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node

    by_stage: dict[str, list] = {}
    commands = {}
    for name, body in spec["stages"].items():
        if "foreach" not in body:
            commands[name] = shlex.split(resolve(body["cmd"]))
    out = []
    for proc in logs:
        argv = proc["argv"]
        module = argv[argv.index("-m") + 1] if "-m" in argv else None
        names = [
            n
            for n, words in commands.items()
            if "-m" in words and words[words.index("-m") :] == argv[argv.index("-m") :]
        ]
        if not names:
            out.append(f"a traced process runs no stage's command: {' '.join(argv)} ({module})")
            continue
        by_stage.setdefault(names[0], []).extend(proc["events"])
    for name, events in by_stage.items():
        body = spec["stages"][name]
        deps, outs = declared(body, resolve)
        unread_ok = [
            resolve(d) for (s, d), (key, value) in CONDITIONAL_DEPS.items() if s == name and param(key) != value
        ]
        out += check_stage(name, commands[name], deps, outs, events, unread_ok)
    return out
