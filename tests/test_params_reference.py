"""params.yaml, the params reference (docs/params.md) and the code's schemas stay in step.

The schemas are found, not listed: every ``load_section("<section>", Schema)`` call in ``stages/*.py`` names a
section and its dataclass (nested dataclasses and ``dict[str, Dataclass]`` fields are walked), plus the two
sections read without a dataclass: ``model`` (a preset plus ``ModelConfig`` overrides) and ``base_model``.

- params.yaml: every field appears, with a comment on its line or a comment line right above it; every key in the
  file is a field. A ``dict[str, Dataclass]`` field (``download.sources``) is an open mapping: its entries' keys must
  be fields of the dataclass, and the comment of the mapping names every one of them.
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
import types
import typing
from dataclasses import dataclass
from typing import Any, Union

import yaml

from llmcore.models.config import ModelConfig
from tests.conftest import REPO_ROOT

PARAMS = REPO_ROOT / "params.yaml"
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


def yaml_keys() -> list[tuple[str, int]]:
    """(path, line index) of every key in params.yaml; entries of open mappings get ``<name>``."""
    paths = schema_paths()
    out: list[tuple[str, int]] = []

    def walk(node: yaml.Node, prefix: str) -> None:
        if not isinstance(node, yaml.MappingNode):
            return
        mapping = prefix in paths and paths[prefix].mapping
        for key, value in node.value:
            name = NAME if mapping else key.value
            path = f"{prefix}.{name}" if prefix else name
            out.append((path if not mapping else f"{prefix}.{key.value}", key.start_mark.line))
            walk(value, path)

    walk(yaml.compose(PARAMS.read_text(encoding="utf-8")), "")
    return out


def generic(path: str) -> str:
    """``download.sources.tinyshakespeare.url`` -> ``download.sources.<name>.url``."""
    paths, parts = schema_paths(), path.split(".")
    for i in range(1, len(parts)):
        head = ".".join(parts[:i])
        if head in paths and paths[head].mapping:
            parts[i] = NAME
    return ".".join(parts)


def comment(lines: list[str], i: int) -> str:
    """The comment on line ``i`` and the comment lines right above it ('' if none)."""
    text = [lines[i].split(" #", 1)[1]] if " #" in lines[i] else []
    while i > 0 and lines[i - 1].strip().startswith("#"):
        i -= 1
        text.append(lines[i].strip()[1:])
    return " ".join(text)


def params_problems() -> list[str]:
    paths = schema_paths()
    lines = PARAMS.read_text(encoding="utf-8").splitlines()
    keys = yaml_keys()
    present = {generic(p) for p, _ in keys}
    problems = []
    for path, line in keys:
        g = generic(path)
        parent = g.rsplit(".", 1)[0] if "." in g else ""
        if g not in paths and "." not in g:
            problems.append(f"params.yaml line {line + 1}: {path}: no stage reads this section (no "
                            f"load_section({path!r}, Schema) in stages/*.py)")  # fmt: skip
        elif g not in paths:
            problems.append(f"params.yaml line {line + 1}: {path}: no such key in the code (a typo, or a field "
                            "removed from its schema?)")  # fmt: skip
        elif parent.endswith(NAME):
            continue  # a key inside an entry of an open mapping: documented by the mapping's comment
        elif NAME in g.split("."):
            continue  # the entry's own name
        elif not comment(lines, line).strip():
            problems.append(f"params.yaml line {line + 1}: {path}: no comment on its line or the line above")
    for path, node in sorted(paths.items()):
        if path.startswith("model.") or NAME in path.split("."):
            continue  # model: overrides only, listed in docs/params.md; entries of open mappings are free
        if path not in present:
            problems.append(f"params.yaml: {path}: missing (a field of {node.where}); add it with its default "
                            "and a comment")  # fmt: skip
        if node.mapping:
            line = next(i for p, i in keys if p == path)
            missing = [f.name for f in dataclasses.fields(node.schema) if not re.search(rf"\b{f.name}\b",
                                                                                         comment(lines, line))]
            if missing:
                problems.append(f"params.yaml line {line + 1}: {path}: its comment should name every key an entry "
                                f"takes; missing {', '.join(missing)}")  # fmt: skip
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
            keys = MODEL_KEYS if head == "model" else (
                {f.name for f in dataclasses.fields(paths[head].schema)} if paths[head].schema else set())
            for key in re.findall(r"`([a-z_][a-z0-9_]*)`", cell):  # backticked identifiers are keys
                if key not in keys:
                    problems.append(f"docs/params.md: row `{head}`: `{key}` is not a key of {head} "
                                    "(write values and choices without backticks)")  # fmt: skip
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
