"""What the stages wrote, read for the report: metrics, timings, facts, curves, samples, predictions, scores.

Every reader tolerates what a broken or missing stage leaves behind: a missing or malformed file reads as
nothing (or, for ``metrics.json``, as a ``StageData`` whose ``problem`` says why), never as an exception.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Stages in pipeline order; a folder under reports/ not listed here comes after them.
STAGE_ORDER = ("download", "tokenize", "pretrain", "import", "classify", "instruct", "align", "evaluate", "benchmark")
NESTED = ("import", "benchmark")  # one folder per model: reports/<stage>/<name>/metrics.json


@dataclass
class StageData:
    name: str  # "pretrain", "import/gpt2-124m", "benchmark/gpt2"
    folder: Path
    metrics: dict[str, Any] | None = None  # None: no usable metrics.json
    timing: dict[str, Any] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None  # why metrics is None (missing, malformed)

    def num(self, *keys: str) -> float | None:
        """The first of ``keys`` (dotted for nested) that holds a finite number, from metrics then timing."""
        for source in (self.metrics or {}, self.timing):
            for key in keys:
                v = dig(source, key)
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    return float(v)
        return None

    def has_key(self, key: str) -> bool:
        return dig(self.metrics or {}, key, missing=...) is not ...


def dig(d: dict, dotted: str, missing: Any = None) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return missing
        d = d[part]
    return d


def read_json(path: Path) -> tuple[Any, str | None]:
    if not path.is_file():
        return None, f"no {path}"
    try:
        return json.loads(path.read_text(encoding="utf-8")), None  # json reads NaN as float('nan')
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"{path}: unreadable ({type(e).__name__}: {e})"


def split_numbers(d: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(numbers, the rest): outputs written before metrics held numbers only still read the same."""
    nums: dict[str, Any] = {}
    rest: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            n, r = split_numbers(v)
            if n:
                nums[k] = n
            if r:
                rest[k] = r
        elif v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)):
            nums[k] = v
        else:
            rest[k] = v
    return nums, rest


def read_stage(folder: Path, name: str) -> StageData:
    stage = StageData(name=name, folder=folder)
    metrics, problem = read_json(folder / "metrics.json")
    if problem or not isinstance(metrics, dict):
        stage.problem = problem or f"{folder / 'metrics.json'}: not a JSON object"
    else:
        stage.metrics, old_facts = split_numbers(metrics)
        stage.facts.update(old_facts)
    timing, _ = read_json(folder / "timing.json")
    if isinstance(timing, dict):
        timing = timing.get("timing", timing) if isinstance(timing.get("timing"), dict) else timing
        stage.timing = split_numbers(timing)[0]
    facts, _ = read_json(folder / "facts.json")
    if isinstance(facts, dict):
        stage.facts.update(facts)
    return stage


def discover_stages(reports_dir: Path, pipeline: dict[str, str | None] | None) -> dict[str, StageData]:
    """Every stage with outputs, plus every pipeline stage without (as "not run"), in pipeline order.

    ``pipeline`` maps the stages that write ``reports/<stage>/metrics.json`` to None, or, for a ``foreach``
    stage writing ``reports/<stage>/<item>/``, to the params key it iterates over (``import.models``).
    """
    names = [s for s in STAGE_ORDER if (pipeline is not None and s in pipeline) or (reports_dir / s).is_dir()]
    extra = (
        sorted(p.name for p in reports_dir.iterdir() if p.is_dir() and p.name not in STAGE_ORDER)
        if reports_dir.is_dir()
        else []
    )
    names += [n for n in extra if (reports_dir / n / "metrics.json").is_file() or n in (pipeline or [])]
    names += [n for n in (pipeline or []) if n not in names and n != "report"]
    out: dict[str, StageData] = {}
    for name in names:
        folder = reports_dir / name
        subs = sorted(p for p in folder.iterdir() if p.is_dir() and p.name != "live") if folder.is_dir() else []
        per_item = name in NESTED or bool((pipeline or {}).get(name))
        if per_item and subs:
            for sub in subs:
                out[f"{name}/{sub.name}"] = read_stage(sub, f"{name}/{sub.name}")
        elif (pipeline or {}).get(name) and not (folder / "metrics.json").is_file():
            continue  # a foreach over an empty list: none listed, none run (the notes say so)
        else:
            out[name] = read_stage(folder, name)
    return out


# --------------------------------------------------------------------------------------------------
# Examples: samples, predictions, responses, judge scores


def read_samples(path: Path, max_chars: int = 700) -> list[tuple[str, str]]:
    """(prompt, text) pairs from pretrain's samples.md (``## n. **prompt**`` then a fenced block)."""
    if not path.is_file():
        return []
    out = []
    text = path.read_text(encoding="utf-8", errors="replace")
    for m in re.finditer(r"^## \d+\. \*\*(.*?)\*\*\s*\n+```text\n(.*?)\n```", text, re.S | re.M):
        body = m.group(2)
        out.append((m.group(1), body if len(body) <= max_chars else body[:max_chars] + " …"))
    return out


def confident_mistakes(path: Path, n: int) -> list[dict[str, str]]:
    """The classifier's wrong predictions on the test split, most confident first."""
    if not path.is_file():
        return []
    rows = []
    with path.open(encoding="utf-8", newline="") as f:
        for r in csv.DictReader(f):
            try:
                p = float(r["probability"])
            except (KeyError, TypeError, ValueError):
                continue
            if r.get("label") != r.get("prediction") and math.isfinite(p):
                rows.append({**r, "p": p})
    rows.sort(key=lambda r: -r["p"])
    return [
        {"text": r["text"], "label": r["label"], "prediction": r["prediction"], "probability": f"{r['p']:.3f}"}
        for r in rows[:n]
    ]


def read_confusion(path: Path) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    if not path.is_file():
        return out
    with path.open(encoding="utf-8", newline="") as f:
        for r in csv.DictReader(f):
            if r.get("actual") and r.get("predicted"):
                key = (r["actual"], r["predicted"])
                out[key] = out.get(key, 0) + 1
    return out


def read_responses(path: Path) -> list[dict[str, Any]]:
    data, _ = read_json(path)
    if not isinstance(data, list):
        return []
    return [
        {**r, "id": str(r.get("id", i))}
        for i, r in enumerate(data)
        if isinstance(r, dict) and all(isinstance(r.get(k, ""), str) for k in ("instruction", "input", "output"))
    ]


def read_scores(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


# --------------------------------------------------------------------------------------------------
# Curves (dvclive TSVs)


@dataclass
class Curve:
    name: str  # e.g. "train/loss"
    steps: list[float]
    values: list[float]


def read_tsv_curve(path: Path, live_dir: Path) -> Curve | None:
    """A dvclive metric file: tab-separated with a ``step`` column and one value column."""
    try:
        with path.open(encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
    except (OSError, UnicodeDecodeError):
        return None
    if not rows or "step" not in rows[0]:
        return None
    value_col = [c for c in rows[0] if c not in ("step", "timestamp")]
    if len(value_col) != 1:
        return None
    steps, values = [], []
    for r in rows:
        try:
            steps.append(float(r["step"]))
            values.append(float(r[value_col[0]]))
        except (TypeError, ValueError):
            continue
    return Curve(str(path.relative_to(live_dir).with_suffix("")), steps, values)


def read_curves(live_dir: Path) -> dict[str, Curve]:
    if not live_dir.is_dir():
        return {}
    curves = [read_tsv_curve(p, live_dir) for p in sorted(live_dir.rglob("*.tsv"))]
    return {c.name: c for c in curves if c is not None}


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
