"""``params.yaml`` -> typed, validated config objects.

``params.yaml`` is the pipeline's single source of configuration, one section per stage. A stage loads
the sections it uses into dataclasses (each defined next to the code that uses it) with
``load_section(name, Schema)``. Validation is strict and names the key path of the first problem:

    model.n_heads: expected int, got 'eight'
    pretrain.precision: expected one of fp32|bf16|fp16, got 'fp8'
    tokenize.vocab_sise: unknown key (known: kind, vocab_size, ...)

Supported field types: int, float, str, bool, ``Literal[...]``, ``X | None``, ``list[X]``,
``dict[str, X]``, ``Any`` and nested dataclasses. Fields without defaults are required.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from llmcore.common import LLMCoreError

T = TypeVar("T")
DEFAULT_PATH = Path("params.yaml")


class ParamsError(LLMCoreError):
    """A bad value in params.yaml; the message starts with the key path."""


def read_params(path: str | os.PathLike = DEFAULT_PATH) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ParamsError(f"{path}:{where} invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    return data


def load_section(section: str, schema: type[T], path: str | os.PathLike = DEFAULT_PATH) -> T:
    """Load ``params.yaml``'s ``section`` into ``schema`` (a dataclass), validating every key."""
    data = read_params(path)
    if section not in data:
        raise ParamsError(f"{section}: missing section in {path}")
    return from_dict(schema, data[section], section)


def from_dict(schema: type[T], data: Any, where: str) -> T:
    """Build dataclass ``schema`` from plain data; errors name ``where``.key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamsError(f"{where}: expected a mapping, got {_show(data)}")
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ParamsError(f"{where}.{unknown[0]}: unknown key (known: {', '.join(fields)})")
    values = {}
    for name, f in fields.items():
        if name in data:
            values[name] = convert(hints[name], data[name], f"{where}.{name}")
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
        raise ParamsError(f"{where}: expected {names}, got {_show(value)}")
    if origin is Literal:
        if value not in args:
            raise ParamsError(f"{where}: expected one of {'|'.join(map(str, args))}, got {_show(value)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ParamsError(f"{where}: expected a list, got {_show(value)}")
        return [convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{where}: expected a mapping, got {_show(value)}")
        return {convert(args[0], k, where): convert(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{where}: expected bool, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{where}: expected int, got {_show(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{where}: expected float, got {_show(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ParamsError(f"{where}: expected str, got {_show(value)}")
        return value
    raise TypeError(f"{where}: unsupported schema type {tp!r}")  # a bug in a schema, not in params.yaml


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _show(value: Any) -> str:
    return repr(value) if not isinstance(value, (dict, list)) else type(value).__name__


def load_base_model(path: str | os.PathLike = DEFAULT_PATH) -> str:
    """The top-level ``base_model``: the model folder under ``data/models`` the fine-tunes start from."""
    base_model = read_params(path).get("base_model", "pretrain")
    if not isinstance(base_model, str) or not base_model or "/" in base_model or base_model.startswith("."):
        raise ParamsError(f"base_model: expected a model folder name under data/models, got {base_model!r}")
    return base_model


def model_config_from_params(data: Any, where: str = "model", **fixed: Any):
    """The ``model`` section: a ``preset`` name plus field overrides, e.g. ``{preset: llama3-tiny, n_layers: 2}``.

    ``fixed`` values (the tokenizer's vocab size, say) override both.
    """
    from llmcore.models.config import PRESETS, ConfigError, ModelConfig

    if not isinstance(data, dict):
        raise ParamsError(f"{where}: expected a mapping, got {_show(data)}")
    data = dict(data)
    preset = data.pop("preset", None)
    if preset is not None and preset not in PRESETS:
        raise ParamsError(f"{where}.preset: expected one of {'|'.join(PRESETS)}, got {_show(preset)}")
    hints = typing.get_type_hints(ModelConfig)
    for key, value in data.items():
        if key not in hints:
            raise ParamsError(f"{where}.{key}: unknown key (known: preset, {', '.join(hints)})")
        data[key] = convert(hints[key], value, f"{where}.{key}")
    try:
        base = PRESETS[preset] if preset else {}
        return ModelConfig.from_dict({**base, **data, **fixed})
    except ConfigError as e:
        raise ParamsError(str(e)) from None


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
