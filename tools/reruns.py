"""Which stages does an edit rerun? ``dvc status`` on a scratch copy of the pipeline, one edited file at a time.

    python -m tools.reruns llmcore/models/config.py llmcore/params.py     # one line per file: the stages named

The scratch copy holds the repository's code, dvc.yaml and params.yaml (no data, no dvc.lock). Every output and
data dependency of every stage gets a small placeholder and ``dvc commit`` records them as if the pipeline had
run, so ``dvc status`` names nothing. Then each file in turn gets a comment line appended, ``dvc status`` says
which stages changed, and the file is restored. Nothing is run and nothing is downloaded: it works on a clean
clone (tests/test_reruns.py uses it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
PLACEHOLDER = "placeholder\n"


def copy_code(dest: Path, root: Path = ROOT) -> Path:
    """The files a clone holds (tracked and untracked-not-ignored), without data/, reports/, DVC's own files
    and dvc.lock."""
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root, check=True, capture_output=True
    ).stdout.decode()
    for name in filter(None, out.split("\0")):
        src = root / name
        if not src.is_file() or name.startswith(("data/", "reports/", ".dvc/")) or name == "dvc.lock":
            continue
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / name)
    return dest


def resolve(text: str, params: dict, item: Any = None) -> str:
    """dvc.yaml's ``${section.key}`` and ``${item}`` filled in from params.yaml."""

    def value(m: re.Match) -> str:
        if m.group(1) == "item":
            return str(item)
        node: Any = params
        for part in m.group(1).split("."):
            node = node[part]
        return str(node)

    return re.sub(r"\$\{([^}]+)\}", value, text)


def stage_paths(spec: dict, params: dict) -> tuple[set[str], set[str]]:
    """(outputs, dependencies) of every stage, as paths; foreach stages once per item."""
    outs, deps = set(), set()
    for body in (spec.get("stages") or {}).values():
        items = [None]
        if "foreach" in body:
            items = (
                yaml.safe_load(resolve(str(body["foreach"]), params))
                if isinstance(body["foreach"], str)
                else body["foreach"]
            )
            body = body["do"]
        for item in items or []:
            for key in ("outs", "metrics", "plots"):
                for entry in body.get(key) or []:
                    outs.add(resolve(entry if isinstance(entry, str) else next(iter(entry)), params, item))
            deps.update(resolve(d, params, item) for d in body.get("deps") or [] if isinstance(d, str))
    return outs, deps


def materialise(repo: Path) -> None:
    """A placeholder for every output and missing data dependency: a file where the name has a suffix
    (``metrics.json``), else a folder holding one file (``data/tokens``)."""
    spec = yaml.safe_load((repo / "dvc.yaml").read_text(encoding="utf-8"))
    params = yaml.safe_load((repo / "params.yaml").read_text(encoding="utf-8"))
    outs, deps = stage_paths(spec, params)
    for path in sorted(outs | deps):
        target = repo / path
        if target.exists():
            continue
        if Path(path).suffix:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(PLACEHOLDER)
        else:
            target.mkdir(parents=True, exist_ok=True)
            (target / "placeholder.txt").write_text(PLACEHOLDER)


def dvc(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # `python` = this interpreter
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed ({proc.returncode}) in {repo}:\n{proc.stdout}{proc.stderr}")
    return proc


def scratch_pipeline(dest: Path, root: Path = ROOT, run: tuple[str, ...] = ()) -> Path:
    """A copy of ``root``'s pipeline in ``dest`` whose every stage is recorded as up to date; the stages in
    ``run`` (cheap ones: ``check-params``) really run first, so their outputs are the real ones."""
    copy_code(dest, root)
    dvc(dest, "init", "--no-scm", "-q")
    for stage in run:
        dvc(dest, "repro", "--single-item", stage)
    materialise(dest)
    dvc(dest, "commit", "--force", "-q")
    left = changed_stages(dest)
    if left:
        raise RuntimeError(f"{dest}: dvc status still names {sorted(left)} after dvc commit")
    return dest


def changed_stages(repo: Path) -> set[str]:
    """The stages ``dvc status`` names."""
    out = dvc(repo, "status", "--json").stdout
    return set(json.loads(out[out.index("{") :]) if "{" in out else {})


def reruns(repo: Path, files: list[str]) -> dict[str, set[str]]:
    """File -> the stages ``dvc status`` names once a comment line is appended to it (restored afterwards)."""
    out = {}
    for name in files:
        path = repo / name
        text = path.read_text(encoding="utf-8")
        try:
            path.write_text(text + "\n# an edit that changes nothing but the file's hash\n", encoding="utf-8")
            out[name] = changed_stages(repo)
        finally:
            path.write_text(text, encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.reruns", description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+", help="files to edit, relative to the repository root")
    parser.add_argument("--root", type=Path, default=ROOT, help="the repository (default: this one)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        repo = scratch_pipeline(Path(tmp), args.root)
        for name, stages in reruns(repo, args.files).items():
            print(f"{name}: {', '.join(sorted(stages)) or '(nothing)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
