"""Keep dvc.yaml honest: each stage's code deps are its script's import closure, its params what its loader reads.

    python -m tools.deps --check     # exit 1 with one line per stage and file (or key) that drifted
    python -m tools.deps --write     # rewrite dvc.yaml's code deps and params in place (`make deps`)

Code: a stage runs ``python -m stages.<name>``; its code is that script plus every project module it imports,
followed transitively: ``import a.b``, ``from a import b`` (``b`` a module or a name), relative imports
(``from . import x``, ``from ..models import gpt``), imports inside functions, and the ``__init__.py`` of every
package on the way (Python runs them; empty ones run nothing and are left out). Anything outside the project's
own packages (torch, yaml) is not code DVC should hash. The listed code deps (entries under a project package
folder) must equal that closure, file for file; data deps are left alone, after the code.

Params: every stage script has ``load_params(path)``, the only place it reads params.yaml (a script serving
several stages through subcommands may have ``load_<subcommand>_params(path)`` for some of them; the stages of
this pipeline have one script each). Loading the
repository's params.yaml through it under ``llmcore.params.track_reads`` gives the key paths it reads; the
stage's ``params:`` must cover exactly those keys (a whole section when every key in it is read). Keys a schema
marks ``NOT_A_DEP`` are validated but not dependencies (``import.models``: dvc.yaml's ``foreach`` expands it).
A stage that lists params.yaml itself as a dep (``check-params``, which reads every key) declares no params.
The sections the stages declare are also the sections params.yaml may have (``llmcore.params.read_params``).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("llmcore", "stages")  # the project's own code; the rest is third-party
FIX = "fix: make deps (python -m tools.deps --write)"


# --------------------------------------------------------------------------------------------------
# Imports (tests/test_layering.py uses the same walker)


def module_name(path: Path, root: Path = ROOT) -> str:
    """'llmcore/models/gpt.py' -> 'llmcore.models.gpt'; a package's __init__.py -> the package."""
    parts = path.resolve().relative_to(root.resolve()).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """Every module name ``path`` may import, anywhere in the file (function bodies included).

    ``from a import b`` yields both ``a`` and ``a.b`` (b may be a submodule); relative imports are resolved
    against the file's own package. Imports under ``if TYPE_CHECKING:`` never run (annotations only) and are left out.
    """
    package = module_name(path, root)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    never_run = {
        id(n) for block in ast.walk(tree) if _is_type_checking(block) for stmt in block.body for n in ast.walk(stmt)
    }
    for node in ast.walk(tree):
        if id(node) in never_run:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".") if package else []
                if node.level - 1 > len(parts):
                    raise ValueError(f"{path}:{node.lineno}: relative import beyond the top-level package")
                base = parts[: len(parts) - node.level + 1] + ([node.module] if node.module else [])
                module = ".".join(base)
            else:
                module = node.module or ""
            found.add(module)
            names = [alias.name for alias in node.names if alias.name != "*"]
            found.update(f"{module}.{name}" if module else name for name in names)
    found.discard("")
    return found


def _is_type_checking(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``): imports for annotations, which never run."""
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def module_files(module: str, root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> list[Path]:
    """The project files importing ``module`` runs: each package's __init__.py on the way, then the module.
    Empty for third-party modules and for names that are not modules (``from llmcore.common import x``)."""
    parts = module.split(".")
    if parts[0] not in packages:
        return []
    files = []
    for i in range(1, len(parts) + 1):
        stem = root.joinpath(*parts[:i])
        if (stem / "__init__.py").is_file():
            files.append(stem / "__init__.py")
        elif stem.with_suffix(".py").is_file():
            files.append(stem.with_suffix(".py"))
        else:
            break  # a name inside the module, not a module
    return files


def import_closure(script: Path, root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[Path, Path | None]:
    """Every project file running ``script`` executes -> the file that first imports it (None for the script)."""
    script = script.resolve()
    seen: dict[Path, Path | None] = {script: None}
    todo = [script]
    for pkg_file in module_files(module_name(script, root), root, packages)[:-1]:  # `-m stages.x` runs stages/
        seen.setdefault(pkg_file.resolve(), script)
        todo.append(pkg_file.resolve())
    while todo:
        current = todo.pop()
        for module in sorted(imported_modules(current, root)):
            for f in module_files(module, root, packages):
                f = f.resolve()
                if f not in seen:
                    seen[f] = current
                    todo.append(f)
    return seen


def import_chain(closure: dict[Path, Path | None], path: Path, root: Path = ROOT) -> str:
    """'stages/classify.py -> llmcore/training/loop.py -> llmcore/common.py': how the script reaches ``path``."""
    chain = []
    current: Path | None = path
    while current is not None:
        chain.append(rel(current, root))
        current = closure[current]
    return " -> ".join(reversed(chain))


def is_empty(path: Path) -> bool:
    """An empty file (a bare package marker) runs nothing; DVC warns about empty deps, so they are left out
    (the day one gets code, the check asks for it)."""
    return path.stat().st_size == 0


def rel(path: Path, root: Path = ROOT) -> str:
    return path.resolve().relative_to(root.resolve()).as_posix()


# --------------------------------------------------------------------------------------------------
# Stages


@dataclass
class Stage:
    name: str  # as in dvc.yaml (a foreach stage's name, without @item)
    body: dict  # the stage's definition (a foreach stage's `do`)
    module: str | None  # the `python -m` module its command runs, if one of ours
    command: str | None = None  # its subcommand (`python -m stages.align pairs` -> "pairs"), if any
    deps: list = field(default_factory=list)
    params: list = field(default_factory=list)

    @property
    def script(self) -> Path | None:
        return ROOT.joinpath(*self.module.split(".")).with_suffix(".py") if self.module else None


def subcommand(cmd: Any, module: str | None) -> str | None:
    """The first word after the module that is not an option: a Typer subcommand such as ``pairs``."""
    if module is None:
        return None
    words = shlex.split(str(cmd[0] if isinstance(cmd, list) else cmd))
    for i, word in enumerate(words):
        if word in (module, module.replace(".", "/") + ".py"):
            rest = words[i + 1 :]
            return rest[0] if rest and re.fullmatch(r"[a-z][a-z0-9_-]*", rest[0]) else None
    return None


def command_module(cmd: Any, packages: tuple[str, ...] = PACKAGES) -> str | None:
    """``python -m stages.pretrain --x`` (or ``torchrun ... -m stages.pretrain``, ``python stages/x.py``) ->
    ``stages.pretrain``; None when the command runs none of the project's scripts."""
    cmds = cmd if isinstance(cmd, list) else [cmd]
    for c in cmds:
        words = shlex.split(str(c))
        for i, word in enumerate(words):
            if word == "-m" and i + 1 < len(words) and words[i + 1].split(".")[0] in packages:
                return words[i + 1]
            if word.endswith(".py") and word.split("/")[0] in packages:
                return word[:-3].replace("/", ".")
    return None


def load_stages(spec: dict, packages: tuple[str, ...] = PACKAGES) -> list[Stage]:
    stages = []
    for name, body in (spec.get("stages") or {}).items():
        body = body.get("do", body)  # foreach/do: the template stands for every item
        module = command_module(body.get("cmd", ""), packages)
        stages.append(
            Stage(
                name,
                body,
                module,
                subcommand(body.get("cmd", ""), module),
                list(body.get("deps") or []),
                list(body.get("params") or []),
            )
        )
    return stages


def is_code_dep(dep: Any, packages: tuple[str, ...] = PACKAGES) -> bool:
    return isinstance(dep, str) and dep.split("/")[0] in packages


def code_problems(stage: Stage, root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> list[str]:
    """One line per file the stage runs but does not list, or lists but never runs."""
    if stage.module is None:
        return []
    script = root.joinpath(*stage.module.split(".")).with_suffix(".py")
    if not script.is_file():
        return [f"dvc.yaml: stage '{stage.name}' runs {stage.module}, but {rel(script, root)} does not exist"]
    closure = import_closure(script, root, packages)
    want = {rel(f, root) for f in closure if not is_empty(f)}
    have = {d for d in stage.deps if is_code_dep(d, packages)}
    problems = [
        f"dvc.yaml: stage '{stage.name}' misses {f} ({import_chain(closure, root / f, root)})"
        for f in sorted(want - have)
    ]
    problems += [f"dvc.yaml: stage '{stage.name}' lists {f}, which its code never imports" for f in sorted(have - want)]
    return problems


# --------------------------------------------------------------------------------------------------
# Params


def leaves(data: Any, prefix: str = "") -> list[str]:
    """Key paths of params data in file order; lists and empty mappings are single values."""
    if isinstance(data, dict) and data:
        return [leaf for k, v in data.items() for leaf in leaves(v, f"{prefix}{k}.")]
    return [prefix[:-1]]


def covered(entry: str, all_leaves: list[str]) -> list[str]:
    return [leaf for leaf in all_leaves if leaf == entry or leaf.startswith(entry + ".")]


def compact(read: set[str], data: dict) -> list[str]:
    """The shortest list of params entries covering exactly ``read``: a section (or sub-mapping) whole when every
    key in it is read, else its keys one by one; in params.yaml's order."""

    def walk(node: Any, prefix: str) -> list[str]:
        keys = leaves(node, prefix + "." if prefix else "")
        if prefix and all(k in read for k in keys):
            return [prefix]
        if not (isinstance(node, dict) and node):
            return []
        return [e for k, v in node.items() for e in walk(v, f"{prefix}.{k}" if prefix else str(k))]

    return walk(data, "")


class MissingLoader(Exception):
    """A stage script without ``load_params``: its params cannot be checked."""


def read_keys(stage: Stage, params_path: Path) -> set[str]:
    """The key paths of ``params_path`` that the stage's ``load_params`` reads: what its ``params:`` must declare.

    Empty for a stage that lists the params file itself as a dep (``check-params``): DVC hashes the whole file.
    """
    from llmcore.params import track_reads

    if params_path.name in stage.deps:
        return set()

    module = importlib.import_module(stage.module)
    names = ([f"load_{stage.command.replace('-', '_')}_params"] if stage.command else []) + ["load_params"]
    loader = next((getattr(module, n) for n in names if hasattr(module, n)), None)
    if loader is None:
        raise MissingLoader(
            f"dvc.yaml: stage '{stage.name}' runs {rel(stage.script)}, which has no "
            f"{' or '.join(f'{n}(path)' for n in names)}: every stage script reads params.yaml "
            f"through one (see tools/deps.py)"
        )
    with track_reads() as reads:
        loader(params_path)
    return set(reads)


def params_problems(stage: Stage, data: dict, read: set[str]) -> list[str]:
    """One line per key the stage reads but does not declare, or declares but never reads."""
    all_leaves = leaves(data)
    declared = [p for p in stage.params if isinstance(p, str)]
    problems = []
    have: set[str] = set()
    for entry in declared:
        keys = covered(entry, all_leaves)
        if not keys:
            problems.append(f"dvc.yaml: stage '{stage.name}' declares param {entry}, which params.yaml does not have")
        unread = [k for k in keys if k not in read]
        if unread:
            problems.append(
                f"dvc.yaml: stage '{stage.name}' declares param {entry}, but its loader never reads "
                f"{', '.join(unread[:3])}{' ...' if len(unread) > 3 else ''}"
            )
        have.update(keys)
    missing = [k for k in all_leaves if k in read and k not in have]
    problems += [f"dvc.yaml: stage '{stage.name}' reads param {k} but does not declare it" for k in missing]
    return problems


# --------------------------------------------------------------------------------------------------
# dvc.yaml text: rewrite the managed list items, keep every comment and everything else


def rewrite(text: str, wanted: dict[str, dict[str, list[str]]], packages: tuple[str, ...] = PACKAGES) -> str:
    """``wanted[stage]["deps"]`` replaces the stage's code deps (data deps kept, after the code);
    ``wanted[stage]["params"]`` replaces its plain params entries (other params files kept). A stage without a
    ``deps:``/``params:`` key gets one after its ``cmd:`` line."""
    lines = _add_missing_keys(text.splitlines(keepends=True), wanted)
    out: list[str] = []
    stage = None
    i = 0
    while i < len(lines):
        line = lines[i]
        stage = _stage_at(line, stage)
        m = re.match(r"^(\s+)(deps|params):\s*(#.*)?$", line)
        if stage is not None and m and stage in wanted and m.group(2) in wanted[stage]:
            kind, indent = m.group(2), m.group(1)
            out.append(line)
            i += 1
            items: list[list[str]] = []  # the list's items, each with its continuation lines
            while i < len(lines) and lines[i].strip() and lines[i].startswith(indent + " "):
                if re.match(r"^\s*(- |#)", lines[i]) or not items:
                    items.append([lines[i]])
                else:
                    items[-1].append(lines[i])
                i += 1
            if not items and i < len(lines) and re.match(rf"^{indent}- ", lines[i]):  # `deps:` / `- x` same indent
                while i < len(lines) and re.match(rf"^{indent}(- |  )", lines[i]):
                    items.append([lines[i]])
                    i += 1
            first = next((it[0] for it in items if it[0].lstrip().startswith("- ")), None)
            item_indent = re.match(r"^(\s*)-", first).group(1) if first else indent + "  "
            keep = [it for it in items if not _managed(it, kind, packages)]
            out.extend(f"{item_indent}- {v}\n" for v in wanted[stage][kind])
            out.extend(line for it in keep for line in it)
            continue
        out.append(line)
        i += 1
    return "".join(out)


def _stage_at(line: str, stage: str | None) -> str | None:
    """Track which stage a dvc.yaml line belongs to (stages sit two spaces in, under ``stages:``)."""
    if re.match(r"^stages:\s*(#.*)?$", line):
        return ""
    if re.match(r"^\S", line) and not line.startswith("#"):
        return None
    m = re.match(r"^  ([^\s#:][^:]*):\s*(#.*)?$", line)
    if stage is not None and m:
        return m.group(1).strip("'\"")
    return stage


def _add_missing_keys(lines: list[str], wanted: dict[str, dict[str, list[str]]]) -> list[str]:
    spec = yaml.safe_load("".join(lines)) or {}
    bodies = {name: body.get("do", body) for name, body in (spec.get("stages") or {}).items()}
    out: list[str] = []
    stage = None
    for line in lines:
        out.append(line)
        stage = _stage_at(line, stage)
        m = re.match(r"^(\s+)cmd:\s*\S", line)
        if stage and m and stage in wanted:
            for kind in ("params", "deps"):
                if wanted[stage].get(kind) and kind not in bodies.get(stage, {}):
                    out.append(f"{m.group(1)}{kind}:\n")
    return out


def _managed(item_lines: list[str], kind: str, packages: tuple[str, ...]) -> bool:
    """Is this list item one the generator owns? Code deps; plain params.yaml keys."""
    if len(item_lines) > 1 or not item_lines[0].lstrip().startswith("- "):
        return False  # a comment, or a mapping item spread over lines
    value = yaml.safe_load(item_lines[0].strip()[2:])
    if not isinstance(value, str):
        return False
    return is_code_dep(value, packages) if kind == "deps" else True


# --------------------------------------------------------------------------------------------------


def check(dvc_yaml: Path = ROOT / "dvc.yaml", params: Path = ROOT / "params.yaml") -> list[str]:
    """Every drift between ``dvc_yaml`` and the code, one line each (empty: in sync)."""
    spec = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8"))
    data = yaml.safe_load(params.read_text(encoding="utf-8"))
    problems = []
    for stage in load_stages(spec):
        problems += code_problems(stage)
        if stage.module is not None and stage.script.is_file():
            try:
                problems += params_problems(stage, data, read_keys(stage, params))
            except MissingLoader as e:
                problems.append(str(e))
    return problems


def generate(dvc_yaml: Path = ROOT / "dvc.yaml", params: Path = ROOT / "params.yaml") -> str:
    """``dvc_yaml``'s text with every stage's code deps and params regenerated."""
    text = dvc_yaml.read_text(encoding="utf-8")
    spec = yaml.safe_load(text)
    data = yaml.safe_load(params.read_text(encoding="utf-8"))
    wanted = {}
    for stage in load_stages(spec):
        if stage.module is None or not stage.script.is_file():
            continue
        code = sorted(rel(f) for f in import_closure(stage.script) if not is_empty(f))
        try:
            wanted[stage.name] = {"deps": code, "params": compact(read_keys(stage, params), data)}
        except MissingLoader as e:
            raise SystemExit(str(e)) from None
    new = rewrite(text, wanted)
    _check_only_managed_changed(spec, yaml.safe_load(new), dvc_yaml)
    return new


def _check_only_managed_changed(old: dict, new: dict, dvc_yaml: Path) -> None:
    """The rewrite touches list items only: anything else that differs is a bug here, not in dvc.yaml."""

    def strip(spec: dict) -> dict:
        out = {}
        for name, body in (spec.get("stages") or {}).items():
            inner = dict(body.get("do", body))
            inner["deps"] = [d for d in inner.get("deps") or [] if not is_code_dep(d)]
            inner["params"] = [p for p in inner.get("params") or [] if not isinstance(p, str)]
            out[name] = inner
        return {**spec, "stages": out}

    if strip(old) != strip(new):
        raise SystemExit(f"{dvc_yaml}: could not rewrite its deps/params lists safely; edit it by hand")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.deps", description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="exit 1 naming every stage and file/key that drifted")
    mode.add_argument("--write", action="store_true", help="rewrite dvc.yaml's code deps and params in place")
    parser.add_argument("--dvc-yaml", type=Path, default=ROOT / "dvc.yaml")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    args = parser.parse_args(argv)
    if args.check:
        problems = check(args.dvc_yaml, args.params)
        for line in problems:
            print(line, file=sys.stderr)
        if problems:
            print(FIX, file=sys.stderr)
        return 1 if problems else 0
    old = args.dvc_yaml.read_text(encoding="utf-8")
    new = generate(args.dvc_yaml, args.params)
    if new != old:
        args.dvc_yaml.write_text(new, encoding="utf-8")
        print(f"{args.dvc_yaml.name}: code deps and params regenerated")
    else:
        print(f"{args.dvc_yaml.name}: already in sync")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
