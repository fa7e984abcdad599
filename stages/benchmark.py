"""Stage `benchmark`: score a model folder on standard benchmarks with EleutherAI's lm-evaluation-harness.

One DVC stage per entry of ``benchmark.models`` (``foreach``, like ``import``); the default ``[]`` keeps the
pipeline offline and lm-eval-free. Needs the ``eval`` extra (``pip install -e '.[eval]'``, which ``make venv``
installs).

    python -m stages.benchmark --name pretrain --params params.yaml --models data/models \
        --reports reports/benchmark/pretrain                     # data/models/pretrain on benchmark.tasks
    dvc exp run -S 'benchmark.models=[gpt2-124m]' -S 'benchmark.tasks=[hellaswag]' -S 'import.models=[gpt2-124m]'

``benchmark.tasks`` holds lm-eval task, group or tag names (``hellaswag``, ``arc_easy``, ``mmlu``; their datasets
come from the Hugging Face Hub, so they need internet or a warm HF cache) or paths to task YAML files (local tasks
over local JSONL work offline). Device and precision come from ``hardware``.

Output: ``reports/benchmark/<name>/metrics.json`` (DVC metrics, so ``dvc exp show`` compares runs)::

    {"model": "pretrain", "params": ..., "limit": 200, "num_fewshot": null, "truncated_requests": 0, "seconds": ...,
     "tasks": {"hellaswag": {"acc": 0.27, "acc_stderr": 0.031, "acc_norm": 0.26, "acc_norm_stderr": 0.031,
                             "samples": 200}}}

``llmcore.report.published.benchmark_rows`` puts these beside published GPT-2 124M figures for the report.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import typer

from llmcore.common import LLMCoreError, print0, stage_errors, write_json_atomic
from llmcore.params import NOT_A_DEP, load_section
from llmcore.threads import training_threads
from llmcore.training.config import HardwareConfig


@dataclass
class BenchmarkParams:
    # model folders under data/models, one stage each
    models: list[str] = field(default_factory=list, metadata={NOT_A_DEP: "expanded by dvc.yaml's foreach"})
    tasks: list[str] = field(default_factory=list)  # lm-eval task/group/tag names or task YAML files
    limit: int | None = None  # items per task (null = all); a quick look: 200
    num_fewshot: int | None = None  # few-shot examples (null = each task's default, 0 for most)
    batch_size: int = 16  # rows per forward pass
    seed: int = 1234  # lm-eval's seeds (few-shot sampling, sampled generation)

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise LLMCoreError(f"benchmark.limit: expected a positive int or null, got {self.limit}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise LLMCoreError(f"benchmark.num_fewshot: expected an int >= 0 or null, got {self.num_fewshot}")
        if self.batch_size < 1:
            raise LLMCoreError(f"benchmark.batch_size: expected a positive int, got {self.batch_size}")


def load_params(path: Path) -> tuple[BenchmarkParams, HardwareConfig]:
    """Everything this stage reads from params.yaml: the ``benchmark`` section (``models`` aside) and ``hardware``."""
    return load_section("benchmark", BenchmarkParams, path), load_section("hardware", HardwareConfig, path)


app = typer.Typer(add_completion=False)


@app.command()
def main(
    name: str = typer.Option(..., help="model folder name under --models (an entry of benchmark.models)"),
    params: Path = typer.Option(..., help="params file"),
    models: Path = typer.Option(..., help="where model folders live"),
    reports: Path = typer.Option(..., help="metrics folder (the DVC stage: reports/benchmark/<name>)"),
) -> None:
    """Run lm-eval's tasks on one model folder and write its metrics."""
    with stage_errors():
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise LLMCoreError(f"--name {name!r}: use letters, digits, '.', '_' and '-' only")
        cfg, hw = load_params(params)
        if not cfg.tasks:
            raise LLMCoreError("benchmark.tasks: empty; list lm-eval tasks (e.g. [hellaswag, arc_easy]) or YAML files")
        import torch

        torch.set_num_threads(training_threads(hw.threads))  # scoring runs batches of whole prompts: all CPUs
        from llmcore.eval.harness import benchmark  # lm-eval: only when the stage runs

        metrics = benchmark(
            models / name,
            cfg.tasks,
            device=hw.device,
            precision=hw.precision,
            batch_size=cfg.batch_size,
            limit=cfg.limit,
            num_fewshot=cfg.num_fewshot,
            seed=cfg.seed,
        )
        out = reports / "metrics.json"
        write_json_atomic(out, metrics)
        for task, row in metrics["tasks"].items():
            shown = ", ".join(f"{k} {v}" for k, v in row.items() if not k.endswith("stderr") and k != "samples")
            print0(f"{name} {task}: {shown} ({row.get('samples', '?')} items)")
        print0(f"wrote {out} ({metrics['seconds']} s)")


if __name__ == "__main__":
    app()
