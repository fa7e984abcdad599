"""``params.yaml`` -> typed, validated config objects.

``params.yaml`` is the pipeline's single source of configuration, one section per stage. A stage loads
the sections it uses into dataclasses (each defined next to the code that uses it) with
``load_section(name, Schema)``. Validation is strict and names the key path of the first problem:

    model.n_heads: expected int, got 'eight'
    pretrain.precision: expected one of fp32|bf16|fp16, got 'fp8'
    tokenize.vocab_sise: unknown key (known: kind, vocab_size, ...)

Supported field types: int, float, str, bool, ``Literal[...]``, ``X | None``, ``list[X]``,
``dict[str, X]``, ``Any`` and nested dataclasses. Fields without defaults are required.

The file is also checked as a whole: its top-level sections must be ones the pipeline's stages declare as
params in the ``dvc.yaml`` beside it (``tools/deps.py`` keeps those declarations equal to what each stage's
loader reads), so a typo such as ``pretrian:`` stops every stage with one line naming the closest section:

    params.yaml: unknown section 'pretrian' (did you mean 'pretrain'?)

``track_reads()`` records which keys a loader reads (``dvc.yaml``'s ``params:`` are checked against it).

Hostile files (README "Hostile input") end in one line too: bytes that are not UTF-8, a path that is a folder,
duplicate keys in a mapping (YAML would let the last one win silently), nesting past ``MAX_DEPTH``, anchors and
aliases that expand past ``MAX_NODES`` values (a "billion laughs" is a few hundred bytes on disk and gigabytes
once copied) or refer to themselves, all refused while the file is parsed, before anything is expanded; and a
float that is NaN or infinite (``.nan``, ``.inf``, ``1e999``), refused by ``convert`` wherever a float is read.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from llmcore.common import LLMCoreError

T = TypeVar("T")
DEFAULT_PATH = Path("params.yaml")
# dataclass field metadata: ``field(..., metadata={NOT_A_DEP: "why"})`` marks a key the loader validates but
# the stage's outputs do not depend on (e.g. a list dvc.yaml's ``foreach`` expands); it is not recorded as read.
NOT_A_DEP = "not_a_dep"


MAX_DEPTH = 50  # nesting levels a params file may have (params.yaml has 4)
MAX_NODES = 100_000  # values a params file may hold once its aliases are expanded (params.yaml: ~600)


class ParamsError(LLMCoreError):
    """A bad value in params.yaml; the message starts with the key path."""


def read_params(path: str | os.PathLike = DEFAULT_PATH) -> dict[str, Any]:
    """The whole file as plain data, after checking its top-level sections (see the module docstring)."""
    path = Path(path)
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    known = declared_sections(path.parent / "dvc.yaml")
    if known is not None:
        check_sections(data, known, path)
    recorder = _RECORDER.get()
    return TrackedDict(data, "", recorder) if recorder is not None else data


def load_yaml(path: Path) -> Any:
    """Parse a params file with :class:`ParamsLoader`; every failure is a ``ParamsError`` naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise ParamsError(f"{path}: not valid UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    except OSError as e:  # a folder, no permission, ...
        raise ParamsError(f"cannot read {path}: {e.strerror or e}") from None
    loader = None
    try:
        loader = ParamsLoader(text)  # the reader refuses unprintable characters here
        return loader.get_single_data()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ParamsError(f"{path}:{where} invalid YAML: {problem}") from None
    except RecursionError:  # MAX_DEPTH should stop it first; never a traceback
        raise ParamsError(f"{path}: nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as e:  # e.g. an int of more digits than Python converts
        raise ParamsError(f"{path}: invalid value: {str(e).splitlines()[0]}") from None
    except IndexError:  # PyYAML's constructors index into the scalar: `!!float` on an empty value
        raise ParamsError(f"{path}: invalid value: an explicit tag (!!float, !!int, ...) on an empty value") from None
    finally:
        if loader is not None:
            loader.dispose()


class ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing what no params file needs, while the file is parsed (nothing is expanded):
    duplicate keys in a mapping, nesting deeper than ``MAX_DEPTH``, and aliases that expand past ``MAX_NODES``
    values or refer to themselves."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):  # the composer recurses once per level of nesting
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(f"nested deeper than {MAX_DEPTH} levels", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self):
        node = super().compose_document()
        _check_expansion(node)
        return node

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else []:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue  # merged keys may be overridden: that is what `<<` is for
            key = self.construct_object(key_node)
            if key in seen:
                raise _Refused(f"duplicate key {key!r} in a mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


class _Refused(yaml.MarkedYAMLError):
    def __init__(self, problem: str, mark):
        super().__init__(problem=problem, problem_mark=mark)


def _check_expansion(root: yaml.Node | None) -> None:
    """Count the values of the composed document as if every alias were copied out, without copying anything
    (sizes are memoised per node); refuse past ``MAX_NODES``, and refuse an alias inside its own anchor."""
    if root is None:
        return
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()  # being counted: their children are on the stack
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        children = (
            [n for pair in node.value for n in pair]
            if isinstance(node, yaml.MappingNode)
            else node.value
            if isinstance(node, yaml.SequenceNode)
            else []
        )
        if children_done:
            open_nodes.discard(id(node))
            sizes[id(node)] = size = 1 + sum(sizes[id(c)] for c in children)
            if size > MAX_NODES:
                raise _Refused(f"aliases expand to more than {MAX_NODES} values (an alias bomb?)", node.start_mark)
            continue
        open_nodes.add(id(node))
        stack.append((node, True))
        for child in children:
            if id(child) in open_nodes:
                raise _Refused("an alias refers to itself (a recursive structure)", child.start_mark)
            if id(child) not in sizes:
                stack.append((child, False))


def declared_sections(dvc_yaml: Path) -> set[str] | None:
    """The top-level params.yaml sections that the stages of ``dvc_yaml`` declare; None without that file."""
    try:
        spec = yaml.load(dvc_yaml.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except FileNotFoundError:
        return None
    except yaml.YAMLError as e:
        raise ParamsError(f"{dvc_yaml}: invalid YAML: {getattr(e, 'problem', e)}") from None
    sections = set()
    for body in ((spec or {}).get("stages") or {}).values():
        body = body.get("do", body) if isinstance(body, dict) else {}
        for item in body.get("params") or []:
            if isinstance(item, str):
                sections.add(item.split(".", 1)[0])
            elif isinstance(item, dict):  # {params.yaml: [keys]}; other params files are not ours
                for file, keys in item.items():
                    if Path(file).name == DEFAULT_PATH.name:
                        sections.update(str(k).split(".", 1)[0] for k in keys or [])
    return sections


def check_sections(data: dict[str, Any], known: set[str], path: Path) -> None:
    """An unknown top-level section is an error naming it and the closest known section."""
    for name in data:
        if name in known:
            continue
        close = difflib.get_close_matches(str(name), sorted(known), n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(sorted(known))}"
        raise ParamsError(f"{path}: unknown section '{name}' ({hint})")


def plain(value: Any, record: bool = True) -> Any:
    """A plain deep copy of params data; under ``track_reads`` it reads (records) every value unless ``record``
    is false."""
    if isinstance(value, dict):
        get = value.__getitem__ if record else partial(dict.__getitem__, value)
        return {k: plain(get(k), record) for k in list(dict.keys(value))}
    if isinstance(value, list):
        return [plain(v, record) for v in value]
    return value


# --------------------------------------------------------------------------------------------------
# Which keys does a loader read? (tests/test_deps.py compares that with dvc.yaml's `params:`)

_RECORDER: contextvars.ContextVar[set[str] | None] = contextvars.ContextVar("params_recorder", default=None)


@contextlib.contextmanager
def track_reads() -> Iterator[set[str]]:
    """Record the key paths (``pretrain.train.lr``) whose values are read from ``read_params`` while active.

    A value counts as read when it is taken out of its mapping (indexing, ``get``, ``items``, ``values``,
    copying); listing key names or ``in`` tests do not count. Lists and empty mappings are single values.
    """
    reads: set[str] = set()
    token = _RECORDER.set(reads)
    try:
        yield reads
    finally:
        _RECORDER.reset(token)


class TrackedDict(dict):
    """A read-only view of a params mapping that records every value taken out of it."""

    def __init__(self, data: dict, prefix: str, reads: set[str]):
        super().__init__({k: self._wrap(v, f"{prefix}{k}", reads) for k, v in data.items()})
        self._prefix, self._reads = prefix, reads

    @staticmethod
    def _wrap(value: Any, path: str, reads: set[str]) -> Any:
        return TrackedDict(value, path + ".", reads) if isinstance(value, dict) and value else value

    def _read(self, key: Any) -> Any:
        value = super().__getitem__(key)
        if not isinstance(value, TrackedDict):  # a leaf; a non-empty mapping is read key by key
            self._reads.add(f"{self._prefix}{key}")
        return value

    def __getitem__(self, key: Any) -> Any:
        return self._read(key)

    def get(self, key: Any, default: Any = None) -> Any:
        return self._read(key) if key in self else default

    def __iter__(self):  # not dict's own iterator: dict(tracked) / {**tracked} then go through __getitem__
        return iter(list(dict.keys(self)))

    def items(self):
        return [(k, self._read(k)) for k in dict.keys(self)]

    def values(self):
        return [self._read(k) for k in dict.keys(self)]

    def copy(self) -> dict:
        return dict(self.items())


def load_section(section: str, schema: type[T], path: str | os.PathLike = DEFAULT_PATH) -> T:
    """Load ``params.yaml``'s ``section`` into ``schema`` (a dataclass), validating every key."""
    data = read_params(path)
    if section not in data:
        raise ParamsError(f"{section}: missing section in {path}")
    return from_dict(schema, data[section], section)


def load_fields(section: str, schema: type[T], path: str | os.PathLike = DEFAULT_PATH) -> T:
    """Like ``load_section``, for a stage that reads only part of a section: ``schema``'s keys of ``section``.

    The section's other keys belong to another stage's schema, which validates them (and refuses unknown
    ones); only the keys taken here are read, so the stage's ``params:`` in dvc.yaml list just these.
    """
    data = read_params(path)
    if section not in data:
        raise ParamsError(f"{section}: missing section in {path}")
    values = data[section]
    if values is not None and not isinstance(values, dict):
        raise ParamsError(f"{section}: expected a mapping, got {show_value(values)}")
    names = {f.name for f in dataclasses.fields(schema) if f.init}
    return from_dict(schema, {k: values[k] for k in list(values or {}) if k in names}, section)


def from_dict(schema: type[T], data: Any, where: str) -> T:
    """Build dataclass ``schema`` from plain data; errors name ``where``.key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamsError(f"{where}: expected a mapping, got {show_value(data)}")
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ParamsError(f"{where}.{unknown[0]}: unknown key (known: {', '.join(fields)})")
    values = {}
    for name, f in fields.items():
        if name in data:
            value = plain(dict.__getitem__(data, name), record=False) if f.metadata.get(NOT_A_DEP) else data[name]
            values[name] = convert(hints[name], value, f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ParamsError(f"{where}.{name}: missing required key")
    try:
        return schema(**values)
    except (LLMCoreError, ValueError, TypeError) as e:  # __post_init__ checks of the schema itself
        msg = str(e)
        if msg.startswith(where):  # already names the full key
            raise ParamsError(msg) from None
        # A library schema names its own field ("retries: expected >= 0"): make it the full key path.
        field_first = any(msg.startswith(name) and msg[len(name) : len(name) + 1] in (":", " ") for name in fields)
        raise ParamsError(f"{where}.{msg}" if field_first else f"{where}: {msg}") from None


def convert(tp: Any, value: Any, where: str) -> Any:
    """Check ``value`` against type ``tp`` (coercing int -> float only), recursing into containers."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return convert(option, value, where)
            except ParamsError as e:
                errors.append(str(e))
        if len(options) == 1:
            raise ParamsError(errors[0])
        names = " or ".join(_name(o) for o in options)
        raise ParamsError(f"{where}: expected {names}, got {show_value(value)}")
    if origin is Literal:
        if value not in args:
            raise ParamsError(f"{where}: expected one of {'|'.join(map(str, args))}, got {show_value(value)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ParamsError(f"{where}: expected a list, got {show_value(value)}")
        return [convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{where}: expected a mapping, got {show_value(value)}")
        return {convert(args[0], k, where): convert(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{where}: expected bool, got {show_value(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{where}: expected int, got {show_value(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{where}: expected float, got {show_value(value)}")
        number = float(value) if isinstance(value, float) or abs(value) < 2**1000 else math.inf
        if not math.isfinite(number):  # .nan, .inf, 1e999: no param means any of them
            raise ParamsError(f"{where}: expected a finite number, got {show_value(value)}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ParamsError(f"{where}: expected str, got {show_value(value)}")
        return value
    raise TypeError(f"{where}: unsupported schema type {tp!r}")  # a bug in a schema, not in params.yaml


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def show_value(value: Any) -> str:
    """A value as an error message shows it: scalars by repr, containers by type name."""
    return repr(value) if not isinstance(value, (dict, list)) else type(value).__name__


def load_base_model(path: str | os.PathLike = DEFAULT_PATH) -> str:
    """The top-level ``base_model``: the model folder under ``data/models`` the fine-tunes start from."""
    base_model = read_params(path).get("base_model", "pretrain")
    if not isinstance(base_model, str) or not base_model or "/" in base_model or base_model.startswith("."):
        raise ParamsError(f"base_model: expected a model folder name under data/models, got {base_model!r}")
    return base_model


# ---------------------------------------------------------------------------------------------------
# Profiles: params files (``params/*.yaml``) merged over params.yaml
# ---------------------------------------------------------------------------------------------------


def merge_params(base: dict[str, Any], profile: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``profile`` merged in: mappings merge key by key, anything else (lists too) replaces."""
    out = dict(base)
    for key, value in profile.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_params(out[key], value)
        else:
            out[key] = value
    return out


def _override_value(value: Any) -> str:
    """A value in the override grammar of ``dvc exp run --set-param`` (Hydra's): quoted strings, flow lists."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, list):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_override_value(v)}" for k, v in value.items()) + "}"
    raise ParamsError(f"profile: cannot express {value!r} as a --set-param value")


def profile_overrides(base: dict[str, Any], profile: dict[str, Any], prefix: str = "") -> list[str]:
    """``--set-param`` arguments that turn ``base`` into ``merge_params(base, profile)``, one per leaf.

    A key that ``base`` lacks is added with ``+key=value`` (Hydra's syntax for a new key), a whole new
    mapping at once.
    """
    args = []
    for key, value in profile.items():
        path = f"{prefix}{key}"
        if key not in base:
            args.append(f"+{path}={_override_value(value)}")
        elif isinstance(value, dict) and isinstance(base[key], dict):
            args += profile_overrides(base[key], value, f"{path}.")
        else:
            args.append(f"{path}={_override_value(value)}")
    return args
