"""Experiments side by side: ``llmcore compare [EXP...]`` writes reports/compare.html and reports/compare.md.

Reads ``dvc exp show --json`` (params and metrics of the baseline commit and each experiment) and each
experiment's dvclive curves from its git commit (DVC commits ``cache: false`` outputs with the experiment).
The page lists the params that differ, the headline metrics (every ``metrics.json``) side by side with their
unit, direction and the best of each marked, the run-time figures (``timing.json``) apart, and one chart per
curve with a line per experiment. Units and directions come from ``llmcore.report.metric_table``; a metric with
no direction (a count, a setting) is never marked. A mean recorded with its 95% interval is shown with it (the
bounds are no rows of their own), is marked best only when its interval clears every other run's, and a
paired difference (``diff_mean``) reads "better" or "worse" only when its interval excludes 0 ("no clear
difference" otherwise). With no experiment it says how to make some.

The baseline is the commit the experiments were made from, with the metrics committed in it: measured on the
machine that made that commit, which need not be this one, and the page says so. ``baseline=NAME`` (the CLI's
``--baseline``) takes one of the user's own experiments as the baseline instead, measured like the others.
The page is written by ``llmcore.report.render``, the report's renderer: Markdown and HTML from one walk.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmcore.common import LLMCoreError
from llmcore.report.card import Figure, fmt
from llmcore.report.metric_table import interval_keys, spec
from llmcore.report.outputs import flatten
from llmcore.report.render import Block, Code, Details, Figures, Heading, Table, Text, to_html, to_markdown

HOW_TO = (
    "No experiments to compare yet. Make some with `dvc exp run`, e.g.\n\n"
    "    dvc exp run -n llama -S model.preset=llama3-tiny\n"
    "    dvc exp run -n gpt2 -S model.preset=gpt2-tiny\n\n"
    "then run `llmcore compare` (or `make compare`) again."
)
COMMITTED = "committed, measured on another machine"  # the label of a baseline read from a commit's metrics
COMMITTED_NOTE = (
    "The committed baseline's figures are the ones committed with it, measured on the machine that made that "
    "commit: other CPUs give other last digits, and other timings. For a baseline measured like the experiments, "
    "run one without changes (`dvc exp run -n base`) and pass it: `llmcore compare --baseline base`."
)
LIVE = "live/plots/metrics/"


@dataclass
class Experiment:
    name: str
    rev: str
    params: dict[str, Any] = field(default_factory=dict)  # flat: "model.preset" -> value
    metrics: dict[str, Any] = field(default_factory=dict)  # flat: "pretrain: val_loss" -> value
    timing: dict[str, Any] = field(default_factory=dict)
    baseline: bool = False
    committed: bool = False  # the baseline is a commit's metrics, not a run of this machine's


def run_dvc_exp_show(repo: Path) -> list[dict[str, Any]]:
    cmd = [sys.executable, "-m", "dvc", "exp", "show", "--json"]
    try:
        proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LLMCoreError(f"`dvc exp show --json` failed: {e}") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise LLMCoreError(f"`dvc exp show --json` failed in {repo}: {last}")
    try:
        return json.loads(proc.stdout or "[]")
    except json.JSONDecodeError as e:
        raise LLMCoreError(f"`dvc exp show --json` printed something that is not JSON ({e})") from None


def _stage_of(path: str) -> str:
    """reports/pretrain/metrics.json -> pretrain; reports/import/gpt2-124m/metrics.json -> import/gpt2-124m."""
    parts = Path(path).parts
    inner = parts[1:-1] if parts and parts[0] == "reports" else parts[:-1]
    return "/".join(inner) or path


def _experiment(entry: dict[str, Any], name: str, baseline: bool = False) -> Experiment:
    data = entry.get("data") or {}
    exp = Experiment(name=name, rev=str(entry.get("rev", "")), baseline=baseline)
    for source in (data.get("params") or {}).values():
        exp.params.update(flatten((source or {}).get("data") or {}))
    for path, source in (data.get("metrics") or {}).items():
        values = (source or {}).get("data") or {}
        target = exp.timing if Path(path).name == "timing.json" else exp.metrics
        if target is exp.timing and isinstance(values.get("timing"), dict):
            values = values["timing"]
        values = flatten(values)
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                target[f"{_stage_of(path)}: {k}"] = v
    return exp


def parse_exp_show(
    shown: list[dict[str, Any]], names: list[str] | None = None, baseline: str | None = None
) -> list[Experiment]:
    """The baseline commit(s) that have experiments, then the experiments: those named, in that order, or all,
    oldest first (``dvc exp show`` lists the newest first).

    Args:
        shown: ``dvc exp show --json``.
        names: experiment names or revs to compare; None: every experiment.
        baseline: an experiment's name or rev to compare against, in place of the committed baseline.
    """
    if baseline is not None and names is not None and baseline not in names:
        names = [baseline, *names]
    out: list[Experiment] = []
    found: set[str] = set()
    for commit in shown:
        if commit.get("rev") == "workspace":
            continue
        exps = []
        for group in commit.get("experiments") or []:
            for rev in group.get("revs") or []:
                name = rev.get("name") or group.get("name") or str(rev.get("rev", ""))[:7]
                if names is None or name in names or str(rev.get("rev", "")).startswith(tuple(names)):
                    exps.append(_experiment(rev, name))
                    found.add(name)
        if exps:
            exps.sort(key=lambda e: names.index(e.name) if names and e.name in names else 0)
            if not names:
                exps.reverse()
            base_name = commit.get("name") or str(commit.get("rev", ""))[:7]
            out.append(_experiment(commit, f"{base_name} ({COMMITTED})", baseline=True))
            out[-1].committed = True
            out += exps
    missing = [n for n in names or [] if n not in found and not any(e.rev.startswith(n) for e in out)]
    if missing:
        raise LLMCoreError(f"no experiment named {missing[0]!r} in `dvc exp show` (see `dvc exp list`)")
    if baseline is None:
        return out
    chosen = next((e for e in out if not e.baseline and (e.name == baseline or e.rev.startswith(baseline))), None)
    if chosen is None:
        raise LLMCoreError(
            f"--baseline {baseline}: no experiment of that name or rev in `dvc exp show` (see `dvc exp list`)"
        )
    chosen.name, chosen.baseline = f"{chosen.name} (your baseline)", True
    return [chosen, *(e for e in out if e is not chosen and not e.committed)]


def direction(key: str) -> int:
    """+1 higher is better, -1 lower is better, 0 neither (``metric_table``); ``key`` is ``"stage: name"``."""
    return spec(key).direction


Interval = tuple[float, float]


def best_of(values: list[Any], sign: int, intervals: list[Interval | None] | None = None) -> set[int]:
    """Indexes of the best value; none without a direction or a difference. With 95% intervals, the best is
    marked only when its interval clears every other run's (no overlap): otherwise the runs are not told apart."""
    nums = [(i, v) for i, v in enumerate(values) if isinstance(v, (int, float)) and math.isfinite(v)]
    if sign == 0 or len(nums) < 2 or len({v for _, v in nums}) < 2:
        return set()
    target = (max if sign > 0 else min)(v for _, v in nums)
    best = {i for i, v in nums if v == target}
    if intervals is not None:
        for i in best:
            if intervals[i] is None:
                return set()
            lo, hi = intervals[i]
            for j, _ in nums:
                other = intervals[j]
                if j not in best and (other is None or not (other[1] < lo or other[0] > hi)):
                    return set()
    return best


def diff_verdict(interval: Interval | None, sign: int) -> str:
    """A paired difference b - a: "better" or "worse" (for b) only when its 95% interval excludes 0."""
    if interval is None or sign == 0:
        return ""
    lo, hi = interval
    if lo <= 0 <= hi:
        return "no clear difference"
    return "better" if (lo > 0) == (sign > 0) else "worse"


# --------------------------------------------------------------------------------------------------
# Curves, read from each experiment's commit


def git_curves(repo: Path, rev: str) -> dict[str, tuple[list[float], list[float]]]:
    """``{"pretrain: val/loss": (steps, values)}`` from the dvclive TSVs committed in ``rev``."""
    listing = subprocess.run(
        ["git", "ls-tree", "-r", "--name-only", rev, "--", "reports"], cwd=repo, capture_output=True, text=True
    )
    if listing.returncode != 0:
        return {}
    out = {}
    for path in listing.stdout.splitlines():
        if LIVE not in path or not path.endswith(".tsv"):
            continue
        text = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=repo, capture_output=True, text=True).stdout
        stage = _stage_of(path.split("/live/")[0] + "/x")
        name = path.split(LIVE, 1)[1][: -len(".tsv")]
        steps, values = [], []
        lines = text.splitlines()
        header = lines[0].split("\t") if lines else []
        if "step" not in header or len(header) < 2:
            continue
        col = next(i for i, h in enumerate(header) if h not in ("step", "timestamp"))
        for line in lines[1:]:
            cells = line.split("\t")
            try:
                steps.append(float(cells[header.index("step")]))
                values.append(float(cells[col]))
            except (IndexError, ValueError):
                continue
        out[f"{stage}: {name}"] = (steps, values)
    return out


def curve_figures(repo: Path, exps: list[Experiment]) -> list[Figure]:
    from llmcore.report.figures import Series, line_chart

    per_exp = {e.name: git_curves(repo, e.rev) for e in exps}
    names = sorted({k for curves in per_exp.values() for k in curves}, key=lambda k: ("/val/" not in f"/{k}", k))
    figures = []
    for key in names:
        found = spec(key)
        if not found.plot:
            continue  # e.g. exp(loss) of a classifier: the training loop logs it, it is no perplexity
        series = [Series(e.name, *per_exp[e.name][key]) for e in exps if key in per_exp[e.name]]
        metric = key.rsplit("/", 1)[-1]
        unit = f"{metric} ({found.unit})" if found.unit and found.unit != metric else metric
        svg = line_chart(key, series, "optimizer step", unit, logy=metric == "grad_norm")
        if svg:
            slug = re.sub(r"[^A-Za-z0-9]+", "_", key).strip("_")
            figures.append(Figure(slug, key, svg))
    return figures


# --------------------------------------------------------------------------------------------------
# Rendering


@dataclass
class Comparison:
    exps: list[Experiment]
    params: list[list[str]]  # key, value per experiment (only keys that differ)
    metrics: list[tuple[str, list[Any], set[int]]]  # key, values, indexes of the best
    timing: list[tuple[str, list[Any]]]
    figures: list[Figure]
    intervals: dict[str, list[Interval | None]] = field(default_factory=dict)  # key -> each run's 95% interval


def compare(repo: Path, exps: list[Experiment]) -> Comparison:
    keys = sorted({k for e in exps for k in e.params})
    params = []
    for k in keys:
        values = [json.dumps(e.params.get(k)) if not isinstance(e.params.get(k), str) else e.params[k] for e in exps]
        if len(set(values)) > 1:
            params.append([k, *values])
    metrics, intervals = [], {}
    keys = list(dict.fromkeys(k for e in exps for k in e.metrics))
    bounds = {b for k in keys if (pair := interval_keys(k)) and all(b in keys for b in pair) for b in pair}
    for k in keys:
        if k in bounds:
            continue  # shown with its mean, never a result (or a best) of its own
        values = [e.metrics.get(k) for e in exps]
        pair = interval_keys(k)
        cis = None
        if pair and all(b in keys for b in pair):
            cis = intervals[k] = [_interval(e.metrics.get(pair[0]), e.metrics.get(pair[1])) for e in exps]
        metrics.append((k, values, best_of(values, direction(k), cis)))
    timing = [(k, [e.timing.get(k) for e in exps]) for k in dict.fromkeys(k for e in exps for k in e.timing)]
    return Comparison(exps, params, metrics, timing, curve_figures(repo, exps) if exps else [], intervals)


def _interval(lo: Any, hi: Any) -> Interval | None:
    ok = all(isinstance(v, (int, float)) and math.isfinite(v) for v in (lo, hi))
    return (float(lo), float(hi)) if ok else None


def metric_cells(c: Comparison, key: str, values: list[Any]) -> list[str]:
    """Each run's value, with its 95% interval when one was recorded, and for a paired difference the verdict."""
    cis = c.intervals.get(key)
    out = []
    for i, v in enumerate(values):
        text = fmt(v)
        if cis and cis[i] is not None:
            text += f" [{fmt(cis[i][0])}, {fmt(cis[i][1])}]"
            if key.endswith("diff_mean"):
                text += f", {diff_verdict(cis[i], direction(key))}"
        out.append(text)
    return out


def _unit_and_direction(key: str) -> list[str]:
    found = spec(key)
    return [found.unit, found.better]


def _cols(c: Comparison) -> list[str]:
    return [e.name for e in c.exps]


def document(c: Comparison, figures_dir: str = "compare_figures") -> list[Block]:
    """The comparison page as blocks for ``llmcore.report.render`` (one walk, Markdown and HTML)."""
    out: list[Block] = [Heading(1, "llmcore: experiments compared")]
    if not c.exps:
        return [*out, Code(HOW_TO)]
    n = len(c.exps) - sum(e.baseline for e in c.exps)
    out.append(
        Text(
            f"{n} experiments; the best value of each metric with a direction is in **bold**; with 95% "
            "intervals [low, high], only when its interval clears the others'."
        )
    )
    if any(e.committed for e in c.exps):
        out.append(Text(COMMITTED_NOTE, small=True))
    out.append(Heading(2, "Params that differ"))
    out.append(Table(["param", *_cols(c)], c.params) if c.params else Text("(none)"))
    bold = lambda k, vals, best: [f"**{t}**" if i in best else t for i, t in enumerate(metric_cells(c, k, vals))]
    rows = [[k, *_unit_and_direction(k), *bold(k, vals, best)] for k, vals, best in c.metrics]
    numeric = set(range(3, 3 + len(c.exps)))
    out += [Heading(2, "Headline metrics"), Table(["metric", "unit", "better", *_cols(c)], rows, numeric)]
    if c.timing:
        rows = [[k, *[fmt(v) for v in vals]] for k, vals in c.timing]
        table = Table(["figure", *_cols(c)], rows, set(range(1, len(c.exps) + 1)))
        out.append(Details("Run-time figures (machine-dependent)", table))
    if c.figures:
        out += [Heading(2, "Curves"), Figures(c.figures)]
    return out


def write_comparison(c: Comparison, out_dir: Path) -> tuple[Path, Path]:
    from llmcore.common import atomic_path, write_text_atomic

    figures = out_dir / "compare_figures"
    if c.figures:
        figures.mkdir(parents=True, exist_ok=True)
        for old in figures.glob("*.svg"):
            old.unlink()
        for f in c.figures:
            with atomic_path(figures / f"{f.name}.svg") as tmp:
                tmp.write_text(f.svg, encoding="utf-8")
    md, page = out_dir / "compare.md", out_dir / "compare.html"
    blocks = document(c)
    write_text_atomic(md, to_markdown(blocks, "compare_figures"))
    write_text_atomic(page, to_html(blocks, "llmcore: experiments compared"))
    return md, page
