"""The report's figures, drawn by matplotlib into SVG text (no pyplot state, no display, no network).

Every figure has a title, labelled axes with units and the same styling. SVGs are deterministic (no date,
fixed element ids), so rerunning the report on the same data rewrites identical files. Text stays text
(``svg.fonttype: none``): small files, readable in a browser and on GitHub.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib
import numpy as np

matplotlib.use("Agg")  # before anything imports pyplot: never open a window

from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator  # noqa: E402

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]

STYLE = {
    "svg.fonttype": "none",
    "svg.hashsalt": "llmcore",  # stable ids: the same data gives the same file
    "font.family": "sans-serif",
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.grid": True,
    "grid.color": "#e5e5e5",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.prop_cycle": matplotlib.cycler(color=PALETTE),
    "legend.frameon": False,
    "legend.fontsize": 8,
    "lines.linewidth": 1.4,
}


@dataclass
class Series:
    """One line: a name for the legend and its points (non-finite values are dropped when drawn)."""

    name: str
    x: Sequence[float]
    y: Sequence[float]
    style: str = "-"  # matplotlib format: "-" line, "o-" line with markers


def finite_points(x: Sequence[float], y: Sequence[float]) -> tuple[list[float], list[float]]:
    pts = [(a, b) for a, b in zip(x, y, strict=False) if math.isfinite(a) and math.isfinite(b)]
    return [a for a, _ in pts], [b for _, b in pts]


def to_svg(fig: Figure) -> str:
    buf = io.StringIO()
    with matplotlib.rc_context(STYLE):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    return buf.getvalue()


def _figure(width: float = 5.6, height: float = 3.2) -> tuple[Figure, object]:
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(width, height))
        ax = fig.subplots()
    return fig, ax


def line_chart(
    title: str, series: Sequence[Series], xlabel: str, ylabel: str, logy: bool = False, ppl_axis: bool = False
) -> str | None:
    """Several series on one axis; None when no series has a finite point. ``ppl_axis``: the values are a language
    model's loss in nats per token, and a right-hand axis reads them as perplexity (exp); never for other losses."""
    with matplotlib.rc_context(STYLE):
        fig, ax = _figure()
        drawn = 0
        for i, s in enumerate(series):
            x, y = finite_points(s.x, s.y)
            if not x:
                continue
            ax.plot(x, y, s.style, label=s.name, color=PALETTE[i % len(PALETTE)], markersize=3)
            drawn += 1
        if not drawn:
            return None
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if logy:
            ax.set_yscale("log")
        if ppl_axis:
            to_ppl = lambda v: np.exp(np.clip(v, None, 50.0))
            to_loss = lambda p: np.log(np.clip(p, 1e-12, None))
            ppl = ax.secondary_yaxis("right", functions=(to_ppl, to_loss))
            ppl.set_ylabel("perplexity")
            ppl.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # 1-2-5 steps: 10, 20, 50, 100, ...
            ppl.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        if drawn > 1 or series[0].name:
            ax.legend(loc="best")
        return to_svg(fig)


def bar_chart(title: str, labels: Sequence[str], counts: Sequence[float], xlabel: str, ylabel: str) -> str | None:
    if not labels:
        return None
    with matplotlib.rc_context(STYLE):
        fig, ax = _figure()
        bars = ax.bar(range(len(labels)), counts, color=PALETTE[0])
        ax.bar_label(bars, fmt="%g", fontsize=8)
        ax.set_xticks(range(len(labels)), labels, rotation=30 if len(labels) > 6 else 0)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(axis="x", visible=False)
        return to_svg(fig)


def heatmap(
    title: str, matrix: Sequence[Sequence[int]], rows: Sequence[str], cols: Sequence[str], ylabel: str, xlabel: str
) -> str | None:
    """A confusion matrix: counts written in the cells, darker = more."""
    if not rows or not cols:
        return None
    with matplotlib.rc_context(STYLE):
        fig, ax = _figure(3.6, 3.0)
        top = max((max(r) for r in matrix), default=0) or 1
        ax.imshow(matrix, cmap="Blues", vmin=0, vmax=top)
        ax.grid(False)
        ax.set_xticks(range(len(cols)), cols)
        ax.set_yticks(range(len(rows)), rows)
        for i, r in enumerate(matrix):
            for j, v in enumerate(r):
                ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black")
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        return to_svg(fig)
