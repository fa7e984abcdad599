"""Published benchmark figures of reference models, and the rows that put a benchmark run beside them.

The ``benchmark`` stage writes ``reports/benchmark/<model>/metrics.json`` (``{"tasks": {task: {metric: value}}}``);
:func:`benchmark_rows` pairs its metrics with the published figures of the same task and metric, for the report.
Torch-free and lm-eval-free: the report can call it on a machine without the ``eval`` extra.

HellaSwag (validation, 10,042 items, 0-shot) for GPT-2 124M has two published pairs, from two protocols, both in
the docstring of ``dev/data/hellaswag.py`` in Karpathy's llm.c:

* lm-evaluation-harness (``hellaswag``: the activity label is part of the prompt): acc 0.2892, acc_norm 0.3114.
  This is the protocol the ``benchmark`` stage runs, so these are the like-for-like figures.
* llm.c's own completion-style evaluation (context without the label): acc 0.2859, acc_norm 0.2955.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmcore.common import read_json


@dataclass(frozen=True)
class Published:
    task: str  # lm-eval task name
    metric: str  # metric name as metrics.json writes it (acc, acc_norm, ...)
    value: float
    model: str  # the reference model
    source: str  # where the figure is published, and under which protocol


LLMC = "llm.c dev/data/hellaswag.py"
PUBLISHED: tuple[Published, ...] = (
    Published("hellaswag", "acc", 0.2892, "GPT-2 124M", f"{LLMC}: lm-evaluation-harness, 0-shot"),
    Published("hellaswag", "acc_norm", 0.3114, "GPT-2 124M", f"{LLMC}: lm-evaluation-harness, 0-shot"),
    Published("hellaswag", "acc", 0.2859, "GPT-2 124M", f"{LLMC}: llm.c completion style, 0-shot"),
    Published("hellaswag", "acc_norm", 0.2955, "GPT-2 124M", f"{LLMC}: llm.c completion style, 0-shot"),
)


def benchmark_rows(metrics: dict[str, Any] | str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a benchmark run that have a published counterpart.

    Args:
        metrics: a ``reports/benchmark/<model>/metrics.json`` path, or its parsed content.

    Returns:
        ``[{"task", "metric", "ours", "published", "model", "source"}]`` in the order of :data:`PUBLISHED`, only
        for task/metric pairs the run measured. ``ours`` is the run's value (e.g. 0.2871).
    """
    if not isinstance(metrics, dict):
        metrics = read_json(Path(metrics), "run the benchmark stage (benchmark.models, benchmark.tasks)")
    tasks = metrics.get("tasks", {}) if isinstance(metrics, dict) else {}
    rows = []
    for ref in PUBLISHED:
        ours = tasks.get(ref.task, {}).get(ref.metric)
        if isinstance(ours, int | float):
            rows.append(
                {
                    "task": ref.task,
                    "metric": ref.metric,
                    "ours": ours,
                    "published": ref.value,
                    "model": ref.model,
                    "source": ref.source,
                }
            )
    return rows
