"""Stage `evaluate`: score the instruction model's test responses with an LLM judge through Ollama.

Every response in ``reports/instruct/responses.json`` is scored 0-100 by the judge model (the book's
chapter 7 evaluation); unparsable and failed items are counted, never dropped. Metrics that need no
judge are always computed: ROUGE-L and exact match against the reference outputs, and the model's loss
and perplexity on the reference outputs (prompt tokens masked).

Judge modes (``evaluate.judge_mode``): ``required`` fails with a one-line fix when Ollama is not reachable,
and when fewer than ``evaluate.judge.min_scored`` of the responses got a score (a judge that answers prose is
reachable but useless); ``skip_if_unreachable`` records the first case as ``judge_status: skipped`` and the
second as ``failed`` (no mean reported; the report says so at the top); ``off`` never asks.
Judge answers are cached in ``data/cache/judge.jsonl`` (not a DVC output, so reruns reuse it).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import typer

from llmcore.common import LLMCoreError, atomic_path, print0, read_json, stage_errors, write_json_atomic
from llmcore.eval.judge import (
    JudgeConfig,
    JudgeItem,
    check_judge,
    score_items,
    shortfall,
    summarize,
    write_records,
)
from llmcore.eval.metrics import exact_match, rouge_l
from llmcore.params import load_section


@dataclass
class EvaluateParams:
    judge_mode: Literal["required", "skip_if_unreachable", "off"] = "skip_if_unreachable"
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    n_boot: int = 1000  # bootstrap resamples for the 95% confidence interval of the mean score
    loss_batch_size: int = 8


def load_responses(path: Path) -> list[JudgeItem]:
    entries = read_json(path, "run the instruct stage first")
    if not isinstance(entries, list):
        raise LLMCoreError(f"{path}: expected a JSON list of responses")
    return [JudgeItem.from_dict(e, default_id=str(i)) for i, e in enumerate(entries)]


def text_metrics(items: list[JudgeItem]) -> dict:
    rouge = [rouge_l(it.response, it.reference) for it in items]
    return {
        "rouge_l": round(statistics.fmean(rouge), 4) if rouge else None,
        "exact_match": round(sum(exact_match(it.response, it.reference) for it in items) / max(len(items), 1), 4),
        "empty_responses": sum(not it.response.strip() for it in items),
    }


def judge_scores(items: list[JudgeItem], cfg: EvaluateParams, cache: Path, scores_path: Path) -> dict:
    """Ask the judge; returns the judge metrics (or why it was skipped)."""
    if cfg.judge_mode == "off":
        write_records(scores_path, [])
        return {"judge_status": "off"}
    try:
        judge = check_judge(cfg.judge)
    except LLMCoreError as e:
        if cfg.judge_mode == "required":
            raise
        print0(f"warning: judge skipped: {e}")
        write_records(scores_path, [])
        return {"judge_status": "skipped", "judge_skip_reason": str(e)}
    records = score_items(items, cfg.judge, cache_path=cache, judge=judge)
    write_records(scores_path, records)  # kept either way: the replies show what the judge said
    summary = summarize(records, n_boot=cfg.n_boot)
    histogram = summary.pop("histogram")
    facts = {"judge_model": judge["model"], "judge_digest": judge["digest"], "judge_host": judge["host"]}
    problem = shortfall(summary, cfg.judge.min_scored, f"the judge '{judge['model']}' at {judge['host']}")
    if problem is None:
        return {"judge_status": "scored", **facts, **summary, "_histogram": histogram}
    if cfg.judge_mode == "required":
        raise LLMCoreError(problem)
    print0(f"warning: judge failed: {problem}")
    # The counts stay; the statistics over too few items are not reported as the run's score.
    summary.update(mean=None, median=None, std=None, ci95_low=None, ci95_high=None)
    return {"judge_status": "failed", "judge_skip_reason": problem, **facts, **summary}


app = typer.Typer(add_completion=False)


@app.command()
def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file"),
    responses: Path = typer.Option(Path("reports/instruct/responses.json"), help="instruct stage responses"),
    model_dir: Path = typer.Option(Path("data/models/instruct"), help="instruction model (for the test loss)"),
    cache: Path = typer.Option(Path("data/cache/judge.jsonl"), help="judge answer cache"),
    reports: Path = typer.Option(Path("reports/evaluate"), help="metrics folder"),
) -> None:
    """Judge every test response and compute judge-free metrics."""
    with stage_errors():
        cfg = load_section("evaluate", EvaluateParams, params)
        items = load_responses(responses)
        metrics = {"n_items": len(items), **text_metrics(items)}
        metrics.update(reference_loss(model_dir, responses, cfg.loss_batch_size))
        judged = judge_scores(items, cfg, cache, reports / "scores.jsonl")
        histogram = judged.pop("_histogram", [])
        metrics.update(judged)
        with atomic_path(reports / "score_histogram.csv") as tmp:
            tmp.write_text("bin,count\n" + "".join(f"{h['bin_low']}-{h['bin_high']},{h['count']}\n" for h in histogram))
        write_json_atomic(reports / "metrics.json", metrics)
        print0(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}))


def reference_loss(model_dir: Path, responses: Path, batch_size: int) -> dict:
    """Mean loss of the instruction model on the reference outputs (response tokens only)."""
    from llmcore.eval.instruct import reference_loss as compute

    return compute(model_dir, responses, batch_size)


if __name__ == "__main__":
    app()
