"""The pipeline report: Markdown and one self-contained HTML file (inline SVG plots, no scripts, no CDN).

``build_report(reports_dir, params)`` gathers what the stages wrote under ``reports/`` (metrics.json,
dvclive/TSV curves, the spam confusion matrix, judge scores and responses) into a ``Report``;
``to_markdown`` and ``to_html`` render it. Every figure here is also declared in dvc.yaml, so
``dvc plots show`` / ``dvc plots diff`` render the same data.
"""

from __future__ import annotations

import csv
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The book's own run (Raschka, ch. 5-7; ../shared/README.md), shown beside ours.
BOOK_REFERENCE = {
    "pretrain": "124M-shaped GPT on the-verdict, context 256, 10 epochs: train loss 0.57, val loss 6.37 (overfits)",
    "classify": "GPT-2 124M, last block + final norm + head, 5 epochs: train 97.21%, val 97.32%, test 95.67% accuracy",
    "evaluate": "GPT-2 355M on instruction-data.json, 2 epochs, Llama 3 8B judge: mean score 49.45 over 110 entries",
}
STAGES = ("download", "tokenize", "pretrain", "import", "classify", "instruct", "evaluate")


@dataclass
class Curve:
    name: str  # e.g. "pretrain: train/loss"
    steps: list[float]
    values: list[float]


@dataclass
class Report:
    params: dict[str, Any]
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage -> flat metrics
    curves: dict[str, list[Curve]] = field(default_factory=dict)  # stage -> curves
    confusion: dict[tuple[str, str], int] = field(default_factory=dict)  # (actual, predicted) -> count
    histogram: list[tuple[str, int]] = field(default_factory=list)  # judge score bins
    examples: dict[str, list[dict]] = field(default_factory=dict)  # "best"/"worst" -> judged responses
    judge_note: str | None = None  # why the judge did not score, shown at the top


# --------------------------------------------------------------------------------------------------
# Gathering


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif not isinstance(v, list):
            out[key] = v
    return out


def read_tsv_curve(path: Path, stage_dir: Path) -> Curve | None:
    """A dvclive metric file: tab-separated with a ``step`` column and one value column."""
    with path.open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows or "step" not in rows[0]:
        return None
    value_col = [c for c in rows[0] if c not in ("step", "timestamp")]
    if len(value_col) != 1:
        return None
    try:
        steps = [float(r["step"]) for r in rows]
        values = [float(r[value_col[0]]) for r in rows]
    except (TypeError, ValueError):
        return None
    name = str(path.relative_to(stage_dir).with_suffix("")).replace("plots/metrics/", "")
    return Curve(name=name, steps=steps, values=values)


def build_report(reports_dir: Path, params: dict[str, Any]) -> Report:
    report = Report(params=params)
    for stage in STAGES:
        stage_dir = reports_dir / stage
        if not stage_dir.is_dir():
            continue
        # dvclive's own summary (live/metrics.json) repeats the stage's last step: skip it
        metrics_files = [
            p for p in sorted(stage_dir.rglob("metrics.json")) if "live" not in p.relative_to(stage_dir).parts
        ]
        for path in metrics_files:
            name = stage if path.parent == stage_dir else f"{stage}/{path.parent.relative_to(stage_dir)}"
            data = json.loads(path.read_text(encoding="utf-8"))
            if stage == "download":  # per-file facts are too detailed for the report
                data = {k: v for k, v in data.items() if k != "files"}
            report.metrics[name] = flatten(data)
        curves = [c for p in sorted(stage_dir.rglob("*.tsv")) if (c := read_tsv_curve(p, stage_dir))]
        if curves:
            report.curves[stage] = curves
    confusion = reports_dir / "classify" / "confusion.csv"
    if confusion.is_file():
        with confusion.open(encoding="utf-8") as f:
            for row in csv.DictReader(f):
                key = (row["actual"], row["predicted"])
                report.confusion[key] = report.confusion.get(key, 0) + 1
    histogram = reports_dir / "evaluate" / "score_histogram.csv"
    if histogram.is_file():
        with histogram.open(encoding="utf-8") as f:
            report.histogram = [(r["bin"], int(r["count"])) for r in csv.DictReader(f)]
    evaluate = report.metrics.get("evaluate", {})
    status = evaluate.get("judge_status")
    if status and status != "scored":
        reason = evaluate.get("judge_skip_reason", "judge_mode is off")
        report.judge_note = f"The LLM judge did not score this run ({status}): {reason}"
    report.examples = best_and_worst(
        reports_dir / "evaluate" / "scores.jsonl", reports_dir / "instruct" / "responses.json"
    )
    return report


def best_and_worst(scores_path: Path, responses_path: Path, n: int = 3) -> dict[str, list[dict]]:
    if not scores_path.is_file() or not responses_path.is_file():
        return {}
    responses = json.loads(responses_path.read_text(encoding="utf-8"))
    by_id = {str(r.get("id", i)): r for i, r in enumerate(responses)}
    scored = []
    for line in scores_path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record.get("status") == "scored" and record["id"] in by_id:
            scored.append({**by_id[record["id"]], "score": record["score"]})
    scored.sort(key=lambda r: r["score"])
    return {"best": scored[::-1][:n], "worst": scored[:n]} if scored else {}


# --------------------------------------------------------------------------------------------------
# SVG plots (inline, so the HTML needs nothing from the network)

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 1)]


def svg_lines(title: str, curves: list[Curve], width: int = 560, height: int = 300) -> str:
    """A line chart of several curves sharing axes, as an inline ``<svg>`` element."""
    pts = [(s, v) for c in curves for s, v in zip(c.steps, c.values, strict=True) if math.isfinite(v)]
    if not pts:
        return ""
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y1 = y0 + 1
    L, R, T, B = 56, 12, 28, 40  # margins
    sx = lambda x: L + (x - x0) / (x1 - x0) * (width - L - R)
    sy = lambda y: height - B - (y - y0) / (y1 - y0) * (height - T - B)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'aria-label="{html.escape(title)}" font-family="sans-serif" font-size="11">',
        f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13">{html.escape(title)}</text>',
        f'<rect x="{L}" y="{T}" width="{width - L - R}" height="{height - T - B}" fill="none" stroke="#999"/>',
    ]
    for t in _ticks(y0, y1):
        parts.append(f'<line x1="{L}" x2="{width - R}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{L - 4}" y="{sy(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
    for t in _ticks(x0, x1):
        parts.append(f'<text x="{sx(t):.1f}" y="{height - B + 14}" text-anchor="middle">{t:g}</text>')
    parts.append(f'<text x="{width / 2}" y="{height - 6}" text-anchor="middle">step</text>')
    for i, c in enumerate(curves):
        color = PALETTE[i % len(PALETTE)]
        xy = " ".join(f"{sx(s):.1f},{sy(v):.1f}" for s, v in zip(c.steps, c.values, strict=True) if math.isfinite(v))
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{xy}"/>')
        parts.append(f'<text x="{L + 8}" y="{T + 14 + 13 * i}" fill="{color}">{html.escape(c.name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def svg_bars(title: str, bars: list[tuple[str, int]], width: int = 560, height: int = 260) -> str:
    if not bars:
        return ""
    top = max(v for _, v in bars) or 1
    L, R, T, B = 40, 12, 28, 40
    bw = (width - L - R) / len(bars)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'aria-label="{html.escape(title)}" font-family="sans-serif" font-size="11">',
        f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13">{html.escape(title)}</text>',
    ]
    for i, (label, value) in enumerate(bars):
        h = value / top * (height - T - B)
        x = L + i * bw
        parts.append(f'<rect x="{x + 2:.1f}" y="{height - B - h:.1f}" width="{bw - 4:.1f}" height="{h:.1f}" '
                     f'fill="{PALETTE[0]}"/>')  # fmt: skip
        parts.append(f'<text x="{x + bw / 2:.1f}" y="{height - B - h - 3:.1f}" text-anchor="middle">{value}</text>')
        parts.append(
            f'<text x="{x + bw / 2:.1f}" y="{height - B + 14}" text-anchor="middle">{html.escape(label)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def group_curves(curves: list[Curve]) -> dict[str, list[Curve]]:
    """One chart per metric family: losses together, everything else on its own."""
    groups: dict[str, list[Curve]] = {}
    for c in curves:
        key = "loss" if "loss" in c.name.rsplit("/", 1)[-1] else c.name
        groups.setdefault(key, []).append(c)
    return groups


# --------------------------------------------------------------------------------------------------
# Rendering


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _confusion_rows(confusion: dict[tuple[str, str], int]) -> tuple[list[str], list[list[str]]]:
    labels = sorted({a for a, _ in confusion} | {p for _, p in confusion})
    header = ["actual \\ predicted", *labels]
    rows = [[a, *[str(confusion.get((a, p), 0)) for p in labels]] for a in labels]
    return header, rows


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(lines)


def _params_summary(params: dict[str, Any]) -> list[list[str]]:
    keep = {k: v for k, v in params.items() if k != "download"}
    return [[k, _fmt(v)] for k, v in flatten(keep).items()]


def to_markdown(report: Report) -> str:
    out = ["# llmcore pipeline report", ""]
    if report.judge_note:
        out += [f"> **Judge skipped.** {report.judge_note}", ""]
    out += ["## Params", "", _md_table(["key", "value"], _params_summary(report.params)), ""]
    for stage, metrics in report.metrics.items():
        out += [f"## {stage}", ""]
        ref = BOOK_REFERENCE.get(stage)
        if ref:
            out += [f"Book reference: {ref}", ""]
        out += [_md_table(["metric", "value"], [[k, _fmt(v)] for k, v in metrics.items()]), ""]
        for c in report.curves.get(stage, []):
            if c.values:
                out.append(f"- curve `{c.name}`: {len(c.values)} points, last {c.values[-1]:.4g}")
        out.append("")
    if report.confusion:
        out += [
            "## Spam classifier: confusion matrix (test split)",
            "",
            _md_table(*_confusion_rows(report.confusion)),
            "",
        ]
    if report.histogram:
        out += ["## Judge scores", "", _md_table(["score", "count"], [[b, str(c)] for b, c in report.histogram]), ""]
    for kind in ("best", "worst"):
        if report.examples.get(kind):
            out += [f"## {kind.capitalize()} scored responses", ""]
            for ex in report.examples[kind]:
                out += [f"- **{ex['score']}** — {ex['instruction']} {ex.get('input', '')}".rstrip(),
                        f"  - reference: {ex['output']}", f"  - model: {ex['model_response']}"]  # fmt: skip
            out.append("")
    return "\n".join(out) + "\n"


CSS = """body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f3f3f3}.note{background:#fff3cd;border:1px solid #e0c36c;padding:.7em 1em}
.ref{color:#555;font-style:italic}svg{display:block;margin:.5em 0}"""


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def to_html(report: Report) -> str:
    e = html.escape
    out = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>llmcore pipeline report</title>",
           f"<style>{CSS}</style></head><body><h1>llmcore pipeline report</h1>"]  # fmt: skip
    if report.judge_note:
        out.append(f"<p class='note'><strong>Judge skipped.</strong> {e(report.judge_note)}</p>")
    out += ["<h2>Params</h2>", _html_table(["key", "value"], _params_summary(report.params))]
    for stage, metrics in report.metrics.items():
        out.append(f"<h2>{e(stage)}</h2>")
        if stage in BOOK_REFERENCE:
            out.append(f"<p class='ref'>Book reference: {e(BOOK_REFERENCE[stage])}</p>")
        out.append(_html_table(["metric", "value"], [[k, _fmt(v)] for k, v in metrics.items()]))
        for name, group in group_curves(report.curves.get(stage, [])).items():
            out.append(svg_lines(f"{stage}: {name}", group))
    if report.confusion:
        out += [
            "<h2>Spam classifier: confusion matrix (test split)</h2>",
            _html_table(*_confusion_rows(report.confusion)),
        ]
    if report.histogram:
        out += ["<h2>Judge scores</h2>", svg_bars("judge score histogram", report.histogram)]
    for kind in ("best", "worst"):
        if report.examples.get(kind):
            rows = [
                [str(x["score"]), f"{x['instruction']} {x.get('input', '')}".strip(), x["output"], x["model_response"]]
                for x in report.examples[kind]
            ]
            out += [f"<h2>{kind.capitalize()} scored responses</h2>",
                    _html_table(["score", "instruction", "reference", "model"], rows)]  # fmt: skip
    out.append("</body></html>")
    return "\n".join(out) + "\n"
