"""Stage `evaluate`: score the instruction model's test responses with an LLM judge (Ollama or OpenAI API).

    dvc repro evaluate           # its dvc.yaml command passes every path (none has a default):
    python -m stages.evaluate --params params.yaml --responses reports/instruct/responses.json \
        --base-responses reports/instruct/base_responses.json --align-responses reports/align/responses.json \
        --model-dir data/models/instruct --cache data/cache/judge.jsonl --reports reports/evaluate

Every response in ``reports/instruct/responses.json`` is scored 0-100 by the judge model (the book's
chapter 7 evaluation). Where the server takes a JSON schema (Ollama's ``format``, the OpenAI API's
``response_format``) the score is asked for as ``{"score": integer 0..100}``; ``facts.json``'s ``judge_format``
says ``schema`` or ``prose``. A reply counts only in the form the prompt asks for (a bare integer 0-100,
``score: N`` or ``{"score": N}``; a number in prose is refused); ``metrics.json`` has ``n_scored``, ``n_refused`` and
``n_error``: refused and failed items are counted, never dropped. Metrics that need no judge are always
computed: ROUGE-L and exact match against the reference outputs (beside the ROUGE-L of answering with the
prompt itself, ``copy_prompt_rouge_l``, and the paired 95% interval of the difference), and the model's loss
and perplexity on the reference outputs (prompt tokens masked).

Judge modes (``evaluate.judge_mode``): ``required`` fails with a one-line fix when Ollama is not reachable,
and when fewer than ``evaluate.judge.min_scored`` of the responses got a score (a judge that answers prose is
reachable but useless; the params loader refuses a ``min_scored`` under 0.5, so the check stays on);
``skip_if_unreachable`` records the first case as ``judge_status: skipped`` and the second as ``failed`` (no
mean reported; the report card says so, with the reason); ``off`` never asks.
Judge answers are cached in ``data/cache/judge.jsonl`` (not a DVC output, so reruns reuse it).

Instruct vs aligned: given the align stage's answers to the same test prompts (``--align-responses``,
``reports/align/responses.json`` in the pipeline), both answer sets are judged and scored with ROUGE-L, and
``metrics.json`` gains ``compare``: for each metric the mean and bootstrap 95% interval of each model and
of the paired difference (align - instruct), plus a head-to-head where the judge sees both answers in a
random order and names the better one (``align_win_rate``: align's wins + half the ties, over the decided
items). Per-item outcomes go to ``reports/evaluate/head_to_head.jsonl``.

Base vs instruct: given the base model's answers to the same prompts (``--base-responses``, written by the
instruct stage to ``reports/instruct/base_responses.json`` with the same template and decoding), they are
judged by the same judge with the same prompt and seed, and ``compare_base`` holds the same paired statistics
(difference: instruct - base); the base model's scores go to ``reports/evaluate/base_scores.jsonl``.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import typer

from llmcore.common import LLMCoreError, atomic_path, print0, read_json, stage_errors, write_stage_reports
from llmcore.eval.judge import (
    JudgeConfig,
    JudgeItem,
    ScoreRecord,
    check_judge,
    score_items,
    shortfall,
    summarize,
    write_records,
)
from llmcore.eval.metrics import exact_match, rouge_l
from llmcore.eval.paired import HeadToHeadRecord, PairItem, head_to_head, paired_stats, summarize_head_to_head
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


def reach_judge(cfg: EvaluateParams) -> tuple[dict | None, dict]:
    """(``check_judge``'s answer or None, the status metrics when there is no judge)."""
    if cfg.judge_mode == "off":
        return None, {"judge_status": "off"}
    try:
        return check_judge(cfg.judge), {}
    except LLMCoreError as e:
        if cfg.judge_mode == "required":
            raise
        print0(f"warning: judge skipped: {e}")
        return None, {"judge_status": "skipped", "judge_skip_reason": str(e)}


def not_judged(items: list[JudgeItem]) -> list[ScoreRecord]:
    """One "skipped" record per item: every item is accounted for, and no output is ever empty (DVC warns
    "'<file>' is empty" on every command about an empty output)."""
    return [ScoreRecord(id=it.id, score=None, status="skipped") for it in items]


def not_compared(items: list[JudgeItem], why: str) -> list[HeadToHeadRecord]:
    return [HeadToHeadRecord(id=it.id, winner=None, b_first=False, error=why) for it in items]


def judge_scores(
    items: list[JudgeItem],
    cfg: EvaluateParams,
    cache: Path,
    scores_path: Path,
    reached: tuple[dict | None, dict] | None = None,
) -> dict:
    """Ask the judge; returns the judge metrics (or why it was skipped)."""
    judge, status = reached or reach_judge(cfg)
    if judge is None:
        write_records(scores_path, not_judged(items))
        return status
    records = score_items(items, cfg.judge, cache_path=cache, judge=judge)
    write_records(scores_path, records)  # kept either way: the replies show what the judge said
    summary = summarize(records, n_boot=cfg.n_boot)
    histogram = summary.pop("histogram")
    facts = {
        "judge_model": judge["model"],
        "judge_digest": judge["digest"],
        "judge_host": judge["host"],
        "judge_format": "schema" if judge.get("schema") else "prose",
    }  # asked by JSON schema, or parsed prose
    problem = shortfall(summary, cfg.judge.min_scored, f"the judge '{judge['model']}' at {judge['host']}")
    if problem is None:
        return {"judge_status": "scored", **facts, **summary, "_histogram": histogram, "_records": records}
    if cfg.judge_mode == "required":
        raise LLMCoreError(problem)
    print0(f"warning: judge failed: {problem}")
    # The counts stay; the statistics over too few items are not reported as the run's score.
    summary.update(mean=None, median=None, std=None, ci95_low=None, ci95_high=None)
    return {"judge_status": "failed", "judge_skip_reason": problem, **facts, **summary, "_records": records}


def _rounded(d: dict, digits: int = 4) -> dict:
    return {k: round(v, digits) if isinstance(v, float) else v for k, v in d.items()}


def _named(stats: dict, names: tuple[str, str]) -> dict:
    """paired_stats' a_/b_ keys under the models' names (base_, instruct_, align_), rounded."""
    a, b = names
    renamed = {
        f"{a}_{k[2:]}" if k.startswith("a_") else f"{b}_{k[2:]}" if k.startswith("b_") else k: v
        for k, v in stats.items()
    }
    return _rounded(renamed)


def compare_models(
    a: list[JudgeItem],
    b: list[JudgeItem],
    names: tuple[str, str],
    instruct_judged: dict,
    cfg: EvaluateParams,
    cache: Path,
    reports: Path,
    judge: dict | None,
) -> dict:
    """Model a vs model b on the same prompts, one of them the instruct model (judged already): the other's
    judge-free metrics, and ROUGE-L and judge scores paired (b - a). The other's judge records go to
    ``reports/<other>_scores.jsonl``; ``judge`` None: ROUGE-L only."""
    other, items = (names[1], b) if names[0] == "instruct" else (names[0], a)
    if [(x.instruction, x.input) for x in a] != [(y.instruction, y.input) for y in b]:
        stage = "instruct" if other == "base" else other
        raise LLMCoreError(
            f"evaluate: the {other} responses do not answer the instruct test prompts in the same "
            f"order (rerun the {stage} stage)"
        )
    out: dict = {"n_items": len(items), **{f"{other}_{k}": v for k, v in text_metrics(items).items()}}
    rouge = paired_stats(
        [rouge_l(i.response, i.reference) for i in a], [rouge_l(i.response, i.reference) for i in b], cfg.n_boot
    )
    out["rouge_l"] = _named(rouge, names)
    if judge is None:
        return out
    records = score_items(items, cfg.judge, cache_path=cache, judge=judge)
    write_records(reports / f"{other}_scores.jsonl", records)
    a_records, b_records = (
        (instruct_judged["_records"], records) if other == names[1] else (records, instruct_judged["_records"])
    )
    both = [
        (x.score, y.score)
        for x, y in zip(a_records, b_records, strict=True)
        if x.status == "scored" and y.status == "scored"
    ]
    out["judge_unscored_pairs"] = len(records) - len(both)
    if both:
        stats = paired_stats([x for x, _ in both], [y for _, y in both], cfg.n_boot)
        out["judge"] = _named(stats, names)
    return out


def compare_head_to_head(
    instruct: list[JudgeItem], align: list[JudgeItem], cfg: EvaluateParams, cache: Path, reports: Path, judge: dict
) -> dict:
    """The judge sees both answers in a random order per item and names the better one."""
    pairs = [
        PairItem(a.id, a.instruction, a.input, a.reference, a.response, b.response)
        for a, b in zip(instruct, align, strict=True)
    ]
    h2h = head_to_head(pairs, cfg.judge, judge, cache_path=cache, seed=cfg.judge.seed)
    write_h2h(reports / "head_to_head.jsonl", h2h)
    summary = summarize_head_to_head(h2h)
    return _rounded(
        {
            "n": summary["n"],
            "align_wins": summary["b_wins"],
            "instruct_wins": summary["a_wins"],
            "ties": summary["ties"],
            "undecided": summary["undecided"],
            "align_shown_first": summary["b_shown_first"],
            "align_win_rate": summary["b_win_rate"],
        }
    )


def write_h2h(path: Path, records: list) -> None:
    from dataclasses import asdict

    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(asdict(r), ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


# what the judge was and why it did not score: run facts (facts.json), not DVC metrics
FACT_KEYS = (
    "judge_status",
    "judge_skip_reason",
    "judge_model",
    "judge_digest",
    "judge_host",
    "judge_format",
    "n_cached",
)


def load_params(path: Path) -> EvaluateParams:
    """Everything this stage reads from params.yaml: the ``evaluate`` section."""
    return load_section("evaluate", EvaluateParams, path)


app = typer.Typer(add_completion=False)


@app.command()
def main(
    params: Path = typer.Option(..., help="params file"),
    responses: Path = typer.Option(..., help="instruct stage responses"),
    model_dir: Path = typer.Option(..., help="instruction model (for the test loss)"),
    cache: Path = typer.Option(..., help="judge answer cache"),
    reports: Path = typer.Option(..., help="metrics folder"),
    base_responses: Path = typer.Option(
        None,
        help="the base model's answers to the same prompts, to compare with "
        "(the DVC stage passes reports/instruct/base_responses.json)",
    ),
    align_responses: Path = typer.Option(
        None,
        help="the aligned model's answers to the same prompts, to compare "
        "with (the DVC stage passes reports/align/responses.json)",
    ),
) -> None:
    """Judge every test response and compute judge-free metrics; compare with the base and aligned models'."""
    with stage_errors():
        cfg = load_params(params)
        items = load_responses(responses)
        metrics = {"n_items": len(items), **text_metrics(items)}
        # the baseline a model must beat: answering with the prompt itself (kept as a metric, so a fresh clone's
        # report has it without the instruct stage's cached responses)
        copies = [rouge_l(f"{it.instruction} {it.input}".strip(), it.reference) for it in items]
        metrics["copy_prompt_rouge_l"] = round(statistics.fmean(copies), 4) if copies else None
        if copies:  # instruct - copy, paired over the items: the report calls it better or worse only outside 0
            paired = paired_stats(copies, [rouge_l(it.response, it.reference) for it in items], cfg.n_boot)
            metrics.update(_rounded({f"copy_prompt_diff_ci95_{k}": paired[f"diff_ci95_{k}"] for k in ("low", "high")}))
        metrics.update(reference_loss(model_dir, responses, cfg.loss_batch_size))
        reached = reach_judge(cfg)
        judged = judge_scores(items, cfg, cache, reports / "scores.jsonl", reached)
        histogram = judged.pop("_histogram", [])
        # placeholders, replaced by the comparisons' records when there are some
        write_records(reports / "base_scores.jsonl", not_judged(items))
        write_records(reports / "align_scores.jsonl", not_judged(items))
        write_h2h(reports / "head_to_head.jsonl", not_compared(items, f"not judged (judge {judged['judge_status']})"))
        judge = reached[0] if judged.get("judge_status") == "scored" else None  # not a judge that failed
        if base_responses is not None:  # instruct - base: what instruction tuning bought
            metrics["compare_base"] = compare_models(
                load_responses(base_responses), items, ("base", "instruct"), judged, cfg, cache, reports, judge
            )
        if align_responses is not None:  # align - instruct: what DPO bought
            align = load_responses(align_responses)
            metrics["compare"] = compare_models(items, align, ("instruct", "align"), judged, cfg, cache, reports, judge)
            if judge is not None:
                metrics["compare"]["head_to_head"] = compare_head_to_head(items, align, cfg, cache, reports, judge)
        judged.pop("_records", None)
        facts = {k: judged.pop(k) for k in FACT_KEYS if k in judged}
        metrics.update(judged)
        with atomic_path(reports / "score_histogram.csv") as tmp:
            tmp.write_text("bin,count\n" + "".join(f"{h['bin_low']}-{h['bin_high']},{h['count']}\n" for h in histogram))
        write_stage_reports(reports, metrics, None, facts)
        print0(json.dumps({**metrics, **facts}))


def reference_loss(model_dir: Path, responses: Path, batch_size: int) -> dict:
    """Mean loss of the instruction model on the reference outputs (response tokens only)."""
    from llmcore.eval.instruct import reference_loss as compute

    return compute(model_dir, responses, batch_size)


if __name__ == "__main__":
    app()
