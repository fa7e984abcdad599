"""Experiments side by side: ``llmcore compare [EXP...]`` writes reports/compare.html and reports/compare.md.

Reads ``dvc exp show --json`` (params and metrics of the baseline commit and each experiment) and each
experiment's dvclive curves from its git commit (DVC commits ``cache: false`` outputs with the experiment).
The page lists the params that differ, the headline metrics (every ``metrics.json``) side by side with the
best of each marked, the run-time figures (``timing.json``) apart, and one chart per curve with a line per
experiment. With no experiment it says how to make some.
"""

from __future__ import annotations

import html
import json
import math
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmcore.common import LLMCoreError
from llmcore.eval.report import CSS, Figure, _html_table, _img, _md_table, flatten, fmt

HOW_TO = (
    "No experiments to compare yet. Make some with `dvc exp run`, e.g.\n\n"
    "    dvc exp run -n llama -S model.preset=llama3-tiny\n"
    "    dvc exp run -n gpt2 -S model.preset=gpt2-tiny\n\n"
    "then run `llmcore compare` (or `make compare`) again."
)
LOWER = re.compile(r"loss|ppl|perplexity|bpb|bits|(^|[._])(fp|fn)$|empty|unparsable|error|truncated")
HIGHER = re.compile(r"acc|f1|precision|recall|rouge|exact|mean|median|reward|score|(^|[._])(tp|tn)$")
LIVE = "live/plots/metrics/"


@dataclass
class Experiment:
    name: str
    rev: str
    params: dict[str, Any] = field(default_factory=dict)  # flat: "model.preset" -> value
    metrics: dict[str, Any] = field(default_factory=dict)  # flat: "pretrain: val_loss" -> value
    timing: dict[str, Any] = field(default_factory=dict)
    baseline: bool = False


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


def parse_exp_show(shown: list[dict[str, Any]], names: list[str] | None = None) -> list[Experiment]:
    """The baseline commit(s) that have experiments, then the experiments: those named, in that order, or all,
    oldest first (``dvc exp show`` lists the newest first)."""
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
            out.append(_experiment(commit, f"{base_name} (baseline)", baseline=True))
            out += exps
    missing = [n for n in names or [] if n not in found and not any(e.rev.startswith(n) for e in out)]
    if missing:
        raise LLMCoreError(f"no experiment named {missing[0]!r} in `dvc exp show` (see `dvc exp list`)")
    return out


def direction(key: str) -> int:
    """+1 higher is better, -1 lower is better, 0 unknown."""
    name = key.split(": ", 1)[-1]
    if LOWER.search(name):
        return -1
    return 1 if HIGHER.search(name) else 0


def best_of(values: list[Any], sign: int) -> set[int]:
    nums = [(i, v) for i, v in enumerate(values) if isinstance(v, (int, float)) and math.isfinite(v)]
    if sign == 0 or len(nums) < 2 or len({v for _, v in nums}) < 2:
        return set()
    target = (max if sign > 0 else min)(v for _, v in nums)
    return {i for i, v in nums if v == target}


# --------------------------------------------------------------------------------------------------
# Curves, read from each experiment's commit


def git_curves(repo: Path, rev: str) -> dict[str, tuple[list[float], list[float]]]:
    """``{"pretrain: val/loss": (steps, values)}`` from the dvclive TSVs committed in ``rev``."""
    listing = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, "--", "reports"], cwd=repo,
                             capture_output=True, text=True)  # fmt: skip
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
    from llmcore.eval.figures import Series, line_chart

    per_exp = {e.name: git_curves(repo, e.rev) for e in exps}
    names = sorted({k for curves in per_exp.values() for k in curves}, key=lambda k: ("/val/" not in f"/{k}", k))
    figures = []
    for key in names:
        series = [Series(e.name, *per_exp[e.name][key]) for e in exps if key in per_exp[e.name]]
        metric = key.rsplit("/", 1)[-1]
        unit = {"loss": "loss (nats/token)", "loss_avg": "loss (nats/token)", "lr": "learning rate",
                "tokens_per_s": "tokens/s", "examples_per_s": "examples/s"}.get(metric, metric)  # fmt: skip
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


def compare(repo: Path, exps: list[Experiment]) -> Comparison:
    keys = sorted({k for e in exps for k in e.params})
    params = []
    for k in keys:
        values = [json.dumps(e.params.get(k)) if not isinstance(e.params.get(k), str) else e.params[k] for e in exps]
        if len(set(values)) > 1:
            params.append([k, *values])
    metrics = []
    for k in dict.fromkeys(k for e in exps for k in e.metrics):
        values = [e.metrics.get(k) for e in exps]
        metrics.append((k, values, best_of(values, direction(k))))
    timing = [(k, [e.timing.get(k) for e in exps]) for k in dict.fromkeys(k for e in exps for k in e.timing)]
    return Comparison(exps, params, metrics, timing, curve_figures(repo, exps) if exps else [])


def _cols(c: Comparison) -> list[str]:
    return [e.name for e in c.exps]


def to_markdown(c: Comparison, figures_dir: str) -> str:
    out = ["# llmcore: experiments compared", ""]
    if not c.exps:
        return "\n".join([*out, HOW_TO, ""])
    out += [f"{len(c.exps) - sum(e.baseline for e in c.exps)} experiments; the best value of each metric is in "
            "**bold** (lower loss, higher accuracy).", ""]  # fmt: skip
    out += ["## Params that differ", "", _md_table(["param", *_cols(c)], c.params) if c.params else "(none)", ""]
    rows = [[k, *[f"**{fmt(v)}**" if i in best else fmt(v) for i, v in enumerate(vals)]] for k, vals, best in c.metrics]
    out += ["## Headline metrics", "", _md_table(["metric", *_cols(c)], rows), ""]
    if c.timing:
        rows = [[k, *[fmt(v) for v in vals]] for k, vals in c.timing]
        out += ["<details>", "<summary>Run-time figures (machine-dependent)</summary>", "",
                _md_table(["figure", *_cols(c)], rows), "", "</details>", ""]  # fmt: skip
    if c.figures:
        out += ["## Curves", ""] + [f"![{f.caption}]({figures_dir}/{f.name}.svg)\n" for f in c.figures]
    return "\n".join(out) + "\n"


def to_html(c: Comparison) -> str:
    e = html.escape
    out = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
           "<meta name='viewport' content='width=device-width, initial-scale=1'>",
           f"<title>llmcore: experiments compared</title><style>{CSS}</style></head><body>",
           "<h1>llmcore: experiments compared</h1>"]  # fmt: skip
    if not c.exps:
        out.append(f"<pre>{e(HOW_TO)}</pre></body></html>")
        return "\n".join(out) + "\n"
    out.append(f"<p>{len(c.exps) - sum(x.baseline for x in c.exps)} experiments; the best value of each metric is "
               "<strong>bold</strong> (lower loss, higher accuracy).</p>")  # fmt: skip
    out += ["<h2>Params that differ</h2>", _html_table(["param", *_cols(c)], c.params) if c.params else "<p>none</p>"]
    head = "".join(f"<th>{e(h)}</th>" for h in ["metric", *_cols(c)])
    body = "".join(
        f"<tr><td>{e(k)}</td>" + "".join(
            f"<td class=num>{'<strong>' + e(fmt(v)) + '</strong>' if i in best else e(fmt(v))}</td>"
            for i, v in enumerate(vals)) + "</tr>"
        for k, vals, best in c.metrics
    )  # fmt: skip
    out += ["<h2>Headline metrics</h2>", f"<div class='scroll'><table><thead><tr>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table></div>"]  # fmt: skip
    if c.timing:
        rows = [[k, *[fmt(v) for v in vals]] for k, vals in c.timing]
        out.append("<details><summary>Run-time figures (machine-dependent)</summary>"
                   + _html_table(["figure", *_cols(c)], rows, set(range(1, len(c.exps) + 1))) + "</details>")
    if c.figures:
        out += ["<h2>Curves</h2>", "<div class='grid'>" + "".join(_img(f) for f in c.figures) + "</div>"]
    out.append("</body></html>")
    return "\n".join(out) + "\n"


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
    write_text_atomic(md, to_markdown(c, "compare_figures"))
    write_text_atomic(page, to_html(c))
    return md, page
