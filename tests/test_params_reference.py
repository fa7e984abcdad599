"""params.yaml, the params reference (docs/params.md) and the code's schemas stay in step.

The schemas are found, not listed: every ``load_section("<section>", Schema)`` call in ``stages/*.py`` names a
section and its dataclass (nested dataclasses and ``dict[str, Dataclass]`` fields are walked), plus the two
sections read without a dataclass: ``model`` (a preset plus ``ModelConfig`` overrides) and ``base_model``.

- params.yaml: every field appears, with a comment on its line or a comment line right above it (or, for a value
  written over several lines, a flow mapping or a long string, on one of its lines); every key in the file is a
  field. The file's layout is the one DVC writes back after ``dvc exp run -S key=value``, so an experiment
  changes only the lines of the keys it sets (``python -m tests.test_params_reference --write`` puts it in that
  layout, through DVC's own code). A ``dict[str, Dataclass]`` field (``download.sources``) is an open mapping:
  its entries' keys must be fields of the dataclass, and the comment of the mapping names every one of them.
- docs/params.md, the "Params reference" table: a row per section (first cell: its backticked path(s), ``<name>`` for a
  mapping's entries); the second cell names the section's keys in backticks (values and choices in plain text).
  Every field is named in its section's row or has its own row; every backticked name is a field.

A failure lists every problem, one per line, naming the key and the file to fix.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import re
import shutil
import subprocess
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import yaml

from llmcore.models.config import ModelConfig
from tests.conftest import REPO_ROOT

PARAMS = REPO_ROOT / "params.yaml"
DVC = Path(sys.executable).with_name("dvc")  # the venv's dvc, as `make pipeline` puts it on PATH
README = REPO_ROOT / "docs" / "params.md"  # the params reference page of the manual
NAME = "<name>"  # a path component standing for any entry of a dict[str, Dataclass] field
# model: a preset plus overrides of ModelConfig fields; vocab_size always follows the tokenizer (not a param)
MODEL_KEYS = {"preset"} | {f.name for f in dataclasses.fields(ModelConfig) if f.name != "vocab_size"}


@dataclass
class Node:
    """One key of the params tree as the code reads it."""

    schema: type | None  # the dataclass of this key's value (None: a plain value)
    mapping: bool = False  # dict[str, schema]: the keys below are free names, entries are `schema`s
    where: str = ""  # the code that defines it, for messages


def _dataclass_of(tp: Any) -> tuple[type | None, bool]:
    """(dataclass, is_mapping) for a field type: ``X``, ``X | None``, ``dict[str, X]``; (None, False) otherwise."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        return _dataclass_of(options[0]) if len(options) == 1 else (None, False)
    if origin is dict and dataclasses.is_dataclass(args[1]):
        return args[1], True
    return (tp, False) if dataclasses.is_dataclass(tp) else (None, False)


def _where(schema: type) -> str:
    return f"{schema.__name__} in {schema.__module__.replace('.', '/')}.py"


def sections() -> dict[str, Node]:
    """Top-level section -> schema, from the stages' ``load_section`` calls."""
    found: dict[str, Node] = {}
    for path in sorted((REPO_ROOT / "stages").glob("*.py")):
        module = None
        for call in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(call, ast.Call) and getattr(call.func, "id", None) == "load_section"):
                continue
            section, schema = call.args[0], call.args[1]
            assert isinstance(section, ast.Constant) and isinstance(schema, ast.Name), ast.unparse(call)
            module = module or importlib.import_module(f"stages.{path.stem}")
            found[section.value] = Node(getattr(module, schema.id), where=_where(getattr(module, schema.id)))
    return found


@functools.cache
def schema_paths() -> dict[str, Node]:
    """Every key path the code reads (``evaluate.judge.min_scored``, ``download.sources.<name>.url``)."""
    paths: dict[str, Node] = {"base_model": Node(None, where="load_base_model in llmcore/params.py")}
    paths.update({f"model.{k}": Node(None, where="ModelConfig in llmcore/models/config.py") for k in MODEL_KEYS})
    paths["model"] = Node(None, where="model_config_from_params in llmcore/models/config.py")

    def walk(prefix: str, schema: type) -> None:
        hints = typing.get_type_hints(schema)
        for f in dataclasses.fields(schema):
            if not f.init:
                continue
            sub, mapping = _dataclass_of(hints[f.name])
            path = f"{prefix}.{f.name}"
            paths[path] = Node(sub, mapping, _where(schema))
            if mapping:
                paths[f"{path}.{NAME}"] = Node(sub, where=_where(schema))
            if sub is not None:
                walk(f"{path}.{NAME}" if mapping else path, sub)

    for section, node in sections().items():
        paths[section] = node
        walk(section, node.schema)
    return paths


# --------------------------------------------------------------------------------------------------
# params.yaml


def yaml_keys(params: Path | None = None) -> list[tuple[str, int, int]]:
    """(path, line index, last line index of its value) of every key in params.yaml; entries of open mappings get
    ``<name>``. The last line is the key's own unless the value is a scalar or a flow collection over more lines."""
    paths = schema_paths()
    out: list[tuple[str, int, int]] = []

    def walk(node: yaml.Node, prefix: str, outer: int = -1) -> None:  # outer: last line of an enclosing flow value
        if not isinstance(node, yaml.MappingNode):
            return
        mapping = prefix in paths and paths[prefix].mapping
        for key, value in node.value:
            name = NAME if mapping else key.value
            path = f"{prefix}.{name}" if prefix else name
            line = key.start_mark.line
            last = max(line, outer)
            if isinstance(value, yaml.ScalarNode) or getattr(value, "flow_style", False):
                last = max(last, value.end_mark.line - (value.end_mark.column == 0))
            out.append((path if not mapping else f"{prefix}.{key.value}", line, last))
            walk(value, path, last if getattr(value, "flow_style", False) else outer)

    walk(yaml.compose((params or PARAMS).read_text(encoding="utf-8")), "")
    return out


def generic(path: str) -> str:
    """``download.sources.tinyshakespeare.url`` -> ``download.sources.<name>.url``."""
    paths, parts = schema_paths(), path.split(".")
    for i in range(1, len(parts)):
        head = ".".join(parts[:i])
        if head in paths and paths[head].mapping:
            parts[i] = NAME
    return ".".join(parts)


def comment(lines: list[str], i: int, last: int | None = None) -> str:
    """The comments on lines ``i``..``last`` (a key and its value) and the comment lines right above ``i``."""
    text = [line.split(" #", 1)[1] for line in lines[i : (i if last is None else last) + 1] if " #" in line]
    while i > 0 and lines[i - 1].strip().startswith("#"):
        i -= 1
        text.append(lines[i].strip()[1:])
    return " ".join(text)


def params_problems(params: Path | None = None) -> list[str]:
    paths = schema_paths()
    lines = (params or PARAMS).read_text(encoding="utf-8").splitlines()
    keys = yaml_keys(params)
    present = {generic(p) for p, _, _ in keys}
    problems = []
    for path, line, last in keys:
        g = generic(path)
        parent = g.rsplit(".", 1)[0] if "." in g else ""
        if g not in paths and "." not in g:
            problems.append(
                f"params.yaml line {line + 1}: {path}: no stage reads this section (no "
                f"load_section({path!r}, Schema) in stages/*.py)"
            )
        elif g not in paths:
            problems.append(
                f"params.yaml line {line + 1}: {path}: no such key in the code (a typo, or a field "
                "removed from its schema?)"
            )
        elif parent.endswith(NAME):
            continue  # a key inside an entry of an open mapping: documented by the mapping's comment
        elif NAME in g.split("."):
            continue  # the entry's own name
        elif not comment(lines, line, last).strip():
            problems.append(f"params.yaml line {line + 1}: {path}: no comment on its line or the line above")
    for path, node in sorted(paths.items()):
        if path.startswith("model.") or NAME in path.split("."):
            continue  # model: overrides only, listed in docs/params.md; entries of open mappings are free
        if path not in present:
            problems.append(
                f"params.yaml: {path}: missing (a field of {node.where}); add it with its default and a comment"
            )
        if node.mapping:
            line = next(i for p, i, _ in keys if p == path)
            missing = [
                f.name for f in dataclasses.fields(node.schema) if not re.search(rf"\b{f.name}\b", comment(lines, line))
            ]
            if missing:
                problems.append(
                    f"params.yaml line {line + 1}: {path}: its comment should name every key an entry "
                    f"takes; missing {', '.join(missing)}"
                )
    return problems


# --------------------------------------------------------------------------------------------------
# docs/params.md


def readme_rows() -> list[tuple[list[str], str]]:
    """(paths of the first cell, second cell) of each row of the params reference table (docs/params.md)."""
    text = README.read_text(encoding="utf-8")
    start = text.index("# Params reference")
    end = text.find("\n## ", start + 1) % (len(text) + 1)  # the next section, or the end of the page
    rows = []
    for line in text[start:end].splitlines():
        if not line.startswith("| `"):
            continue
        first, second = line.strip("|").split("|", 1)
        rows.append((re.findall(r"`([^`]+)`", first), second))
    return rows


def readme_problems() -> list[str]:
    paths = schema_paths()
    rows = readme_rows()
    named: set[str] = set()  # key paths the table documents
    problems = []
    for heads, cell in rows:
        for head in heads:
            if head not in paths:
                problems.append(f"docs/params.md: row `{head}`: no such key in the code")
                continue
            named.add(head)
            keys = (
                MODEL_KEYS
                if head == "model"
                else ({f.name for f in dataclasses.fields(paths[head].schema)} if paths[head].schema else set())
            )
            for key in re.findall(r"`([a-z_][a-z0-9_]*)`", cell):  # backticked identifiers are keys
                if key not in keys:
                    problems.append(
                        f"docs/params.md: row `{head}`: `{key}` is not a key of {head} "
                        "(write values and choices without backticks)"
                    )
                named.add(f"{head}.{key}")
    for path, node in sorted(paths.items()):
        if path not in named:
            parent = path.rsplit(".", 1)[0]
            fix = f"name `{path.rsplit('.', 1)[1]}` in the `{parent}` row" if "." in path else "add a row"
            problems.append(f"docs/params.md: {path}: not documented ({fix}; a field of {node.where})")
    return problems


def test_params_yaml_matches_the_schemas_and_comments_every_key():
    problems = params_problems()
    assert not problems, "\n" + "\n".join(problems)


def test_readme_params_reference_matches_the_schemas():
    problems = readme_problems()
    assert not problems, "\n" + "\n".join(problems)


def test_the_checks_catch_drift(tmp_path, monkeypatch):
    """The checks above can fail: a key dropped from params.yaml, an uncommented key, an unknown key in the docs."""
    text = PARAMS.read_text(encoding="utf-8")
    broken = re.sub(r"\n    min_scored: .*", "", text)
    broken = re.sub(r"\n  n_boot: .*", "\n  n_boot: 1000", broken)
    broken += "\nfancy: 1  # not read by any stage\n"
    monkeypatch.setattr(f"{__name__}.PARAMS", tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text(broken, encoding="utf-8")
    problems = "\n".join(params_problems())
    assert "params.yaml: evaluate.judge.min_scored: missing (a field of JudgeConfig in llmcore/eval/judge.py)" in (
        problems
    )
    assert "evaluate.n_boot: no comment on its line or the line above" in problems
    assert "fancy: no stage reads this section (no load_section('fancy', Schema) in stages/*.py)" in problems

    readme = README.read_text(encoding="utf-8").replace("`min_scored`", "`min_score`")
    monkeypatch.setattr(f"{__name__}.README", tmp_path / "params.md")
    (tmp_path / "params.md").write_text(readme, encoding="utf-8")
    problems = "\n".join(readme_problems())
    assert "row `evaluate.judge`: `min_score` is not a key of evaluate.judge" in problems
    assert "evaluate.judge.min_scored: not documented (name `min_scored` in the `evaluate.judge` row" in problems


# --------------------------------------------------------------------------------------------------
# DVC's round trip: `dvc exp run -S key=value` rewrites params.yaml through ruamel.yaml


def dvc_queue_with(repo: Path, *overrides: str) -> str:
    """params.yaml as ``dvc exp run --queue -S ...`` leaves it in the experiment it queues (a scratch repository
    holding this params.yaml and dvc.yaml): DVC's own parsing, Hydra overrides and YAML writer."""
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    for cmd in (["git", "init", "-q"], [str(DVC), "init", "-q"], [*git, "add", "-A"], [*git, "commit", "-qm", "x"]):
        subprocess.run(cmd, cwd=repo, check=True, capture_output=True)
    args = [a for o in overrides for a in ("-S", o)]
    proc = subprocess.run([str(DVC), "exp", "run", "--queue", *args], cwd=repo, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return subprocess.run(
        ["git", "show", "refs/exps/celery/stash:params.yaml"], cwd=repo, check=True, capture_output=True, text=True
    ).stdout


def test_dvc_exp_run_set_param_changes_only_the_keys_it_sets(tmp_path):
    """The README's experiments (`dvc exp run -S ...`) leave a params.yaml that this suite still accepts, and
    DVC changes only the set keys' lines: the file is already in the layout DVC writes."""
    assert DVC.is_file(), f"{DVC}: dvc not installed (make venv installs it)"
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(REPO_ROOT / name, tmp_path / name)
    sets = {
        "pretrain.train.lr": "0.001",
        "align.beta": "0.5",
        "import.models": "[gpt2-124m]",
        "evaluate.judge.host": "http://127.0.0.1:11435",
        "pretrain.sample.top_p": "0.9",
    }
    queued = dvc_queue_with(tmp_path, *(f"{k}={v}" for k, v in sets.items()))
    before = PARAMS.read_text(encoding="utf-8").splitlines()
    lines = {path: line for path, line, _ in yaml_keys()}
    removed = [i for i, tag in _diff_old_lines(before, queued.splitlines()) if tag]
    assert removed == sorted(lines[k] for k in sets), (
        "DVC rewrote other lines of params.yaml:\n"
        + "\n".join(before[i] for i in removed if i not in {lines[k] for k in sets})
        + "\nfix: python -m tests.test_params_reference --write (the layout DVC writes, through DVC's code)"
    )
    (tmp_path / "params.yaml").write_text(queued, encoding="utf-8")
    assert params_problems(tmp_path / "params.yaml") == []
    data = yaml.safe_load(queued)
    assert (data["pretrain"]["train"]["lr"], data["import"]["models"], data["pretrain"]["sample"]["top_p"]) == (
        0.001,
        ["gpt2-124m"],
        0.9,
    )


def _diff_old_lines(old: list[str], new: list[str]) -> list[tuple[int, bool]]:
    """(index, changed) for every line of ``old``: changed when the diff to ``new`` replaces or deletes it."""
    import difflib

    out = []
    for tag, i1, i2, _, _ in difflib.SequenceMatcher(None, old, new, autojunk=False).get_opcodes():
        out += [(i, tag != "equal") for i in range(i1, i2)]
    return out


def test_a_comment_on_a_value_written_over_several_lines_counts(tmp_path, monkeypatch):
    """The check reads meaning: DVC wraps a long flow mapping and its comment ends up on the value's last line."""
    text = PARAMS.read_text(encoding="utf-8")
    sample = re.search(r"\n  sample: .*?(?=\n  baseline_k)", text, re.DOTALL).group(0)
    wrapped = (
        "\n  sample: {max_new_tokens: 120, temperature: 0.8, top_k: 50, top_p: null, seed:\n"
        "      1337}    # how samples.md is drawn"
    )
    monkeypatch.setattr(f"{__name__}.PARAMS", tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text(text.replace(sample, wrapped), encoding="utf-8")
    assert params_problems() == []
    (tmp_path / "params.yaml").write_text(text.replace(sample, wrapped.split("    #")[0]), encoding="utf-8")
    assert any(p.endswith(": pretrain.sample: no comment on its line or the line above") for p in params_problems())


def write_dvc_layout(path: Path = PARAMS) -> None:
    """Rewrite ``path`` the way ``dvc exp run -S`` does (DVC's own writer, setting a key to its own value)."""
    from dvc.utils.hydra import apply_overrides

    apply_overrides(path, [f"base_model={yaml.safe_load(path.read_text(encoding='utf-8'))['base_model']}"])


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        raise SystemExit("usage: python -m tests.test_params_reference --write   (params.yaml in DVC's layout)")
    write_dvc_layout()
    print(f"{PARAMS}: rewritten in the layout `dvc exp run -S` writes")
