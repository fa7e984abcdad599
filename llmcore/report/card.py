"""The report card: one row per stage with its key figure, the baselines it must beat and the book's figure.

``build_report(reports_dir, params, ...)`` reads what the stages wrote under ``reports/<stage>/`` (see
``llmcore.report.outputs``) and gathers everything the report shows into a ``Report``: the card's rows, what
was skipped, the run facts, the examples and the figures. ``llmcore.report.render`` turns it into Markdown and
HTML.

The card is data-driven: ``KEY_FIGURES`` names each stage's key figure and the metric that must be a number,
``CARDS`` maps a stage to the function that turns its outputs into rows. One guard, ``did_not_run``, stands in
front of every card function: a stage with no outputs is a "not run" row, one with unreadable outputs or a
NaN key figure a "failed" row, each with the reason; a stage folder with no card function gets a generic row.
Nothing a stage wrote stops the report.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmcore.report.metric_table import spec
from llmcore.report.outputs import (
    StageData,
    confident_mistakes,
    discover_stages,
    flatten,
    read_confusion,
    read_curves,
    read_responses,
    read_samples,
    read_scores,
)
from llmcore.report.published import benchmark_rows

# The book's own run (Raschka, ch. 5-7; ../shared/README.md). ``comparable``: same data and task as ours.
BOOK = {  # stage: (value, what the book ran, comparable)
    "pretrain": (6.37, "124M GPT on the-verdict, ctx 256, 10 epochs (other corpus and tokenizer)", False),
    "classify": (0.9567, "GPT-2 124M, last block + norm + head, 5 epochs", True),
    "evaluate": (49.45, "GPT-2 355M (a different model), 2 epochs, Llama 3 8B judge, 110 entries", False),
    "align": (
        0.610,
        "DPO of the book's 355M instruct model (a different model, its own pairs), 1 epoch, beta 0.1: "
        "val DPO loss 0.693 → 0.610",
        False,
    ),
}
MACHINE = "†"  # marks figures that depend on the machine (and its load)


# --------------------------------------------------------------------------------------------------
# Rows


@dataclass
class Ref:
    """A number to compare the key figure with: a baseline it must beat, or the book's figure."""

    label: str
    value: float | None
    comparable: bool = True  # False: shown for context, not judged (other data or task)
    diff_ci: tuple[float, float] | None = None  # 95% interval of (key figure - this value), paired, when recorded


@dataclass
class Row:
    stage: str
    figure: str  # what the key figure is, with its unit
    value: float | None = None
    kind: str = "num"  # num | pct | int
    higher_is_better: bool = True
    baselines: list[Ref] = field(default_factory=list)
    book: Ref | None = None
    detail: str = ""
    status: str = "ok"  # ok | not run | skipped | failed
    reason: str = ""
    ci: tuple[float, float] | None = None  # the key figure's 95% interval, when known

    def verdict(self, ref: Ref | None) -> str:
        """better / worse than ``ref``; with an interval (the paired difference's, else the key figure's) only when
        it excludes no difference; "not comparable" for another model's or corpus's figure."""
        if ref is None or ref.value is None or self.value is None:
            return ""
        if not ref.comparable:
            return "not comparable"
        interval = ref.diff_ci or (self.ci and (self.ci[0] - ref.value, self.ci[1] - ref.value))
        if interval:
            lo, hi = interval
            if lo <= 0 <= hi:
                return "no clear difference"
            return "better" if (lo > 0) == self.higher_is_better else "worse"
        if math.isclose(self.value, ref.value, rel_tol=1e-9, abs_tol=1e-12):
            return "equal"
        return "better" if (self.value > ref.value) == self.higher_is_better else "worse"


def higher_is_better(key: str, stage: str) -> bool:
    """The direction ``llmcore.report.metric_table`` declares for ``key`` (a metric with none reads as higher)."""
    return spec(key, stage).direction >= 0


def wilson(successes: float, n: float) -> tuple[float, float] | None:
    """Wilson score 95% interval of a proportion (accuracy over n test items, a win rate over n decided pairs)."""
    if not n:
        return None
    z2, p = 1.96**2, successes / n
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = 1.96 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _interval(s: StageData, key: str) -> tuple[float, float] | None:
    """``key``'s recorded 95% interval (``<prefix>ci95_low``/``_high``, as the evaluate stage writes them)."""
    lo, hi = s.num(f"{key}ci95_low"), s.num(f"{key}ci95_high")
    return (lo, hi) if lo is not None and hi is not None else None


def fmt(v: Any, kind: str = "num") -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and not math.isfinite(v):
        return "NaN"
    if kind == "pct":
        return f"{100 * v:.1f}%"
    if kind == "int" or (isinstance(v, int) and not isinstance(v, bool)):
        return f"{int(v):,}"
    if isinstance(v, float):
        if abs(v) >= 1e4:
            return f"{v:,.0f}"
        text = f"{v:.4g}"
        # 1.0005 is "1.000", not "1": a rounded figure keeps its zeros so it does not read as exact
        return f"{v:#.4g}" if v != int(v) and not any(c in text for c in ".e") else text
    return str(v)


# Each stage's key figure (``{unit}``: its loss unit, from ``metric_table``) and the metrics that must hold a
# number for it (the first one present): a NaN loss, written as null, is a failed row, not a figure.
KEY_FIGURES: dict[str, tuple[str, tuple[str, ...]]] = {
    "download": ("sources verified", ()),
    "tokenize": ("bytes per token", ()),
    "pretrain": ("val loss ({unit})", ("val_loss",)),
    "import": ("val loss ({unit})", ("val_loss",)),
    "classify": ("test accuracy", ("test.accuracy",)),
    "instruct": ("test loss ({unit})", ("test_loss",)),
    "align": ("val DPO loss ({unit})", ("val_dpo_loss", "val.dpo_loss", "val_loss", "dpo_loss")),
    "evaluate": ("ROUGE-L", ()),
    "benchmark": ("benchmark accuracy", ()),
}
GENERIC_FIGURE = "key figure"


def key_figure(s: StageData) -> str:
    """The label of ``s``'s key figure in the card, e.g. "val loss (nats/token)"."""
    template, _ = KEY_FIGURES.get(s.name.split("/")[0], (GENERIC_FIGURE, ()))
    return template.format(unit=spec("val_loss", s.name).unit)


def key_metric(s: StageData) -> str | None:
    """The metrics key holding ``s``'s key figure: the first of its candidates present, else the first one."""
    _, keys = KEY_FIGURES.get(s.name.split("/")[0], (GENERIC_FIGURE, ()))
    return next((k for k in keys if s.has_key(k)), keys[0] if keys else None)


def did_not_run(s: StageData) -> Row | None:
    """The one guard in front of every card function: a row saying why ``s`` has no key figure, else None.

    No ``metrics.json``: the stage has not run. An unreadable one: it failed. A key figure that is not a number
    (NaN is written as null): it failed, training diverged.
    """
    figure = key_figure(s)
    if s.metrics is None:
        reason = s.problem or f"no {s.folder / 'metrics.json'}"
        if reason.startswith("no "):
            return Row(s.name, figure, status="not run", reason=f"{reason} (`dvc repro {s.name.split('/')[0]}`)")
        return Row(s.name, figure, status="failed", reason=reason)
    key = key_metric(s)
    if key is not None and s.has_key(key) and s.num(key) is None:
        where = s.folder / "metrics.json"
        reason = f"{key} is not a number (NaN or null in {where}: training diverged?)"
        return Row(s.name, figure, status="failed", reason=reason)
    return None


def card_download(s: StageData, ctx: Context) -> list[Row]:
    mb = (s.num("bytes") or 0) / 1e6
    detail = f"{mb:.1f} MB, sha256 or content checked"
    return [Row(s.name, key_figure(s), s.num("sources"), "int", detail=detail)]


def card_tokenize(s: StageData, ctx: Context) -> list[Row]:
    kind = s.facts.get("tokenizer", "")
    detail = (
        f"{kind} vocab {fmt(s.num('vocab_size'), 'int')}; {fmt(s.num('train_tokens'), 'int')} train / "
        f"{fmt(s.num('val_tokens'), 'int')} val tokens"
    )
    row = Row(s.name, key_figure(s), s.num("bytes_per_token"), baselines=[Ref("raw bytes", 1.0)])
    row.detail = detail.strip()
    return [row]


def book_ref(stage: str) -> Ref:
    value, label, comparable = BOOK[stage]
    return Ref(label, value, comparable)


def card_pretrain(s: StageData, ctx: Context) -> list[Row]:
    loss = s.num("val_loss")
    parts = [
        f"{fmt(s.num('params'), 'int')} params",
        f"{fmt(s.num('step'), 'int')} steps",
        f"{fmt(s.num('tokens_seen'), 'int')} tokens",
        f"ppl {fmt(s.num('val_ppl'))}",
    ]
    bpt = ctx.stages.get("tokenize")
    bpt = bpt.num("bytes_per_token") if bpt else None
    if loss is not None and bpt:
        parts.append(f"{loss / math.log(2) / bpt:.3f} bits/byte")
    baselines = [Ref("bigram", s.num("bigram_val_loss")), Ref("unigram", s.num("unigram_val_loss"))]
    row = Row(s.name, key_figure(s), loss, higher_is_better=higher_is_better("val_loss", s.name), baselines=baselines)
    row.book, row.detail = book_ref("pretrain"), ", ".join(parts)
    return [row]


def card_import(s: StageData, ctx: Context) -> list[Row]:
    detail = (
        f"{s.facts.get('family', '')} {fmt(s.num('params'), 'int')} params, {fmt(s.num('val_bpb'))} bits/byte "
        f"on {s.facts.get('corpus', 'the corpus')}"
    )
    row = Row(s.name, key_figure(s), s.num("val_loss"), higher_is_better=higher_is_better("val_loss", s.name))
    row.detail = detail.strip()
    return [row]


def card_classify(s: StageData, ctx: Context) -> list[Row]:
    conf = [s.num(f"test_confusion.{k}") for k in ("tn", "fp", "fn", "tp")]
    baselines = []
    if all(c is not None for c in conf) and sum(conf):
        tn, fp, fn, tp = conf
        baselines.append(Ref("majority class", max(tn + fp, fn + tp) / (tn + fp + fn + tp)))
    n = sum(c for c in conf if c is not None)
    acc = s.num("test.accuracy")
    ci = wilson(acc * n, n) if acc is not None and n else None  # over the test messages
    detail = f"F1 {fmt(s.num('test.f1'))} (spam positive), {fmt(n, 'int')} test messages"
    if ci:
        detail += f" (95% CI {fmt(ci[0], 'pct')}–{fmt(ci[1], 'pct')})"
    detail += f", {s.facts.get('trainable', '')} on {s.facts.get('base_model', 'the base model')}"
    row = Row(s.name, key_figure(s), acc, "pct", higher_is_better=higher_is_better("test.accuracy", s.name), ci=ci)
    row.baselines, row.book, row.detail = baselines, book_ref("classify"), detail
    return [row]


def card_instruct(s: StageData, ctx: Context) -> list[Row]:
    # the data format: Alpaca (the book's prompt template) or chat (ChatML conversations); runs before it was
    # recorded name none
    fmt_name = {"alpaca": "Alpaca ", "chat": "chat (ChatML) "}.get(s.facts.get("format"), "")
    detail = (
        f"{fmt_name}{s.facts.get('finetune', '')} fine-tune of {s.facts.get('base_model', 'the base')}, "
        f"{fmt(s.num('epochs'))} epochs; response-only loss {fmt(s.num('test_response_loss'))}, "
        f"{fmt(s.num('test_entries'), 'int')} test responses"
    )
    row = Row(s.name, key_figure(s), s.num("test_loss"), higher_is_better=higher_is_better("test_loss", s.name))
    row.detail = detail
    return [row]


def card_align(s: StageData, ctx: Context) -> list[Row]:
    key = key_metric(s)
    acc = s.num("val_reward_accuracy", "val.reward_accuracy", "reward_accuracy")
    margin = s.num("val_reward_margin", "val.reward_margin", "reward_margin")
    row = Row(s.name, key_figure(s), s.num(key), higher_is_better=higher_is_better(key, s.name))
    row.baselines, row.book = [Ref("untrained policy (ln 2)", math.log(2))], book_ref("align")
    row.detail = f"reward accuracy {fmt(acc, 'pct')}, reward margin {fmt(margin)}"
    return [row]


def _paired_ci(s: StageData, key: str) -> str:
    """The paired difference's interval of evaluate's ``key`` (compare.rouge_l, compare_base.judge, ...)."""
    return (
        f"paired 95% CI {fmt(s.num(f'{key}.diff_ci95_low'))} to {fmt(s.num(f'{key}.diff_ci95_high'))} over "
        f"{fmt(s.num(f'{key}.n'), 'int')} prompts"
    )


def _judged_row(s: StageData, key: str, name: str, label: str) -> Row:
    """Model ``name``'s judge mean and 95% CI over the prompts judged for it and for the instruct model."""
    return Row(
        s.name,
        f"judge mean score (0-100), {label}",
        s.num(f"{key}.{name}_mean"),
        higher_is_better=higher_is_better(f"{key}.{name}_mean", s.name),
        ci=_interval(s, f"{key}.{name}_"),
        detail=f"95% CI {fmt(s.num(f'{key}.{name}_ci95_low'))}–{fmt(s.num(f'{key}.{name}_ci95_high'))} "
        f"over {fmt(s.num(f'{key}.n'), 'int')} prompts judged for both",
    )


def _paired_ref(s: StageData, label: str, value_key: str, key: str) -> Ref:
    """``label``'s value, with the paired difference's interval of evaluate's ``key`` (instruct - base, ...)."""
    return Ref(label, s.num(value_key), diff_ci=_interval(s, f"{key}.diff_"))


def card_evaluate(s: StageData, ctx: Context) -> list[Row]:
    """ROUGE-L and the judge's mean for the instruct model, beside the base model it was tuned from (compare_base:
    instruct - base, paired) and the aligned model (compare: align - instruct, paired, and a head-to-head)."""
    baselines = []
    if ctx.copy_rouge is not None:  # instruct - copy, paired over the items (older outputs: none recorded)
        baselines.append(Ref("copying the prompt", ctx.copy_rouge, diff_ci=_interval(s, "copy_prompt_diff_")))
    if s.num("compare_base.rouge_l.base_mean") is not None:
        baselines.append(_paired_ref(s, "base model", "compare_base.rouge_l.base_mean", "compare_base.rouge_l"))
    # the instruct model's own interval, where a comparison recorded it: the verdict of a baseline with no paired one
    own = next(
        (ci for k in ("compare.rouge_l.instruct_", "compare_base.rouge_l.instruct_") if (ci := _interval(s, k))), None
    )
    rows = [
        Row(
            s.name,
            "ROUGE-L vs reference",
            s.num("rouge_l"),
            baselines=baselines,
            ci=own,
            higher_is_better=higher_is_better("rouge_l", s.name),
            detail=f"exact match {fmt(s.num('exact_match'), 'pct')}, reference loss "
            f"{fmt(s.num('reference_loss'))}, {fmt(s.num('n_items'), 'int')} items",
        )
    ]
    if s.num("compare_base.rouge_l.diff_mean") is not None:
        rows.append(_diff_row(s, "ROUGE-L, instruct − base", "compare_base.rouge_l"))
    status = s.facts.get("judge_status")
    judge = Row(
        s.name, "judge mean score (0-100)", book=book_ref("evaluate"), higher_is_better=higher_is_better("mean", s.name)
    )
    if status == "scored" and s.num("mean") is not None:
        judge.value, judge.ci = s.num("mean"), _interval(s, "")
        judge.detail = (
            f"95% CI {fmt(s.num('ci95_low'))}–{fmt(s.num('ci95_high'))}, {fmt(s.num('n_scored'), 'int')} "
            f"of {fmt(s.num('n_items'), 'int')} scored by {s.facts.get('judge_model', 'the judge')}"
            + (f" ({fmt(s.num('n_refused'), 'int')} refused: no score in the asked form)" if s.num("n_refused") else "")
        )
        if s.num("compare_base.judge.base_mean") is not None:  # the base model's row, then instruct's beside it
            rows.append(_judged_row(s, "compare_base.judge", "base", "base model"))
            judge.baselines = [_paired_ref(s, "base model", "compare_base.judge.base_mean", "compare_base.judge")]
            judge.detail += (
                f"; instruct − base {fmt(s.num('compare_base.judge.diff_mean'))}, {_paired_ci(s, 'compare_base.judge')}"
            )
    elif status == "scored":
        judge.status, judge.reason = "failed", f"the judge scored none of {fmt(s.num('n_items'), 'int')} responses"
    else:
        judge.status = "skipped" if status in ("skipped", "off") else "failed" if status else "not run"
        judge.reason = s.facts.get("judge_skip_reason") or (
            "evaluate.judge_mode is off" if status == "off" else f"judge status {status or 'not recorded'}"
        )
    rows.append(judge)
    # the align stage's answers to the same prompts, paired with the instruct model's (evaluate's "compare")
    if judge.status == "ok" and s.num("compare.judge.align_mean") is not None:
        aligned = _judged_row(s, "compare.judge", "align", "align")
        aligned.baselines = [_paired_ref(s, "instruct", "compare.judge.instruct_mean", "compare.judge")]
        aligned.detail += (
            f"; align − instruct {fmt(s.num('compare.judge.diff_mean'))}, {_paired_ci(s, 'compare.judge')}"
        )
        rows.append(aligned)
    if s.num("compare.rouge_l.diff_mean") is not None:
        rows.append(_diff_row(s, "ROUGE-L, align − instruct", "compare.rouge_l"))
    rate = s.num("compare.head_to_head.align_win_rate")
    if rate is not None:
        h2h = [s.num(f"compare.head_to_head.{k}") or 0.0 for k in ("align_wins", "instruct_wins", "ties")]
        ci = wilson(h2h[0] + h2h[2] / 2, sum(h2h))  # ties count half, as in the rate; over the decided pairs
        rows.append(
            Row(
                s.name,
                "head-to-head: align's win rate",
                rate,
                "pct",
                baselines=[Ref("a coin toss", 0.5)],
                higher_is_better=higher_is_better("compare.head_to_head.align_win_rate", s.name),
                ci=ci,
                detail=(f"95% CI {fmt(ci[0], 'pct')}–{fmt(ci[1], 'pct')}; " if ci else "")
                + f"{fmt(h2h[0], 'int')} wins, {fmt(h2h[1], 'int')} losses, {fmt(h2h[2], 'int')} ties, "
                "judged in a random order",
            )
        )
    return rows


def _diff_row(s: StageData, figure: str, key: str) -> Row:
    """A paired difference (``key``: compare.rouge_l, ...) beside no difference: better or worse only when its
    95% interval excludes 0."""
    ci = _interval(s, f"{key}.diff_")
    return Row(
        s.name,
        figure,
        s.num(f"{key}.diff_mean"),
        baselines=[Ref("no difference", 0.0, diff_ci=ci)],
        ci=ci,
        higher_is_better=higher_is_better(f"{key}.diff_mean", s.name),
        detail=_paired_ci(s, key),
    )


def card_generic(s: StageData, ctx: Context) -> list[Row]:
    """A stage without a card function (e.g. benchmark/<model>): its first accuracy-like number, the rest as detail."""
    flat = {k: v for k, v in flatten(s.metrics).items() if isinstance(v, (int, float)) and v is not None}
    key = next((k for k in flat if re.search(r"acc|score|f1|rouge", k)), next(iter(flat), None))
    if key is None:
        return [Row(s.name, GENERIC_FIGURE, status="failed", reason=f"{s.folder / 'metrics.json'} holds no number")]
    chance = s.num("chance", "random_baseline")
    others = [f"{k} {fmt(v)}" for k, v in flat.items() if k != key and not k.startswith("chance")][:4]
    return [
        Row(
            s.name,
            key,
            float(flat[key]),
            higher_is_better=higher_is_better(key, s.name),
            baselines=[Ref("chance", chance)] if chance is not None else [],
            detail=", ".join(others),
        )
    ]


def card_benchmark(s: StageData, ctx: Context) -> list[Row]:
    """lm-eval scores of one model (benchmark/<model>), each beside the published GPT-2 124M figure of the same
    task and metric where one exists (``llmcore.report.published``: the lm-evaluation-harness protocol first)."""
    if not isinstance(s.metrics.get("tasks"), dict):  # metrics from something else: as good as not run
        reason = f"no {s.folder / 'metrics.json'} (`dvc repro benchmark`)"
        return [Row(s.name, key_figure(s), status="not run", reason=reason)]
    published: dict[tuple[str, str], dict] = {}
    for ref in benchmark_rows(s.metrics):
        published.setdefault((ref["task"], ref["metric"]), ref)
    rows = []
    for task, scores in s.metrics["tasks"].items():
        for metric in ("acc_norm", "acc", "exact_match"):
            value = scores.get(metric) if isinstance(scores, dict) else None
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            ref = published.get((task, metric))
            stderr = scores.get(f"{metric}_stderr")
            ok = isinstance(stderr, (int, float)) and not isinstance(stderr, bool) and math.isfinite(stderr)
            rows.append(
                Row(
                    s.name,
                    f"{task} {metric}",
                    float(value),
                    "pct",
                    ci=(value - 1.96 * stderr, value + 1.96 * stderr) if ok else None,
                    book=Ref(f"{ref['model']} ({ref['source']})", ref["published"]) if ref else None,
                    detail=f"± {fmt(stderr, 'pct')} (stderr)" if ok else "",
                )
            )
    return rows or [
        Row(
            s.name,
            "benchmark accuracy",
            status="failed",
            reason=f"{s.folder / 'metrics.json'} holds no acc, acc_norm or exact_match",
        )
    ]


CARDS: dict[str, Callable[[StageData, Context], list[Row]]] = {
    "download": card_download,
    "tokenize": card_tokenize,
    "pretrain": card_pretrain,
    "import": card_import,
    "classify": card_classify,
    "instruct": card_instruct,
    "align": card_align,
    "evaluate": card_evaluate,
    "benchmark": card_benchmark,
}


# --------------------------------------------------------------------------------------------------
# The whole report


@dataclass
class Figure:
    name: str  # file stem: figures/<name>.svg
    caption: str
    svg: str


@dataclass
class Context:
    stages: dict[str, StageData]
    copy_rouge: float | None = None


@dataclass
class Report:
    params: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    stages: dict[str, StageData] = field(default_factory=dict)
    run_facts: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # skipped / not run, one line each
    samples: list[tuple[str, str]] = field(default_factory=list)  # (prompt, text)
    mistakes: list[dict[str, str]] = field(default_factory=list)
    responses: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # "best"/"worst"
    response_rank: str = ""  # "judge score" | "ROUGE-L"
    judge_summary: str = ""
    figures: dict[str, list[Figure]] = field(default_factory=dict)  # section -> figures
    changed_params: set[str] = field(default_factory=set)


def build_report(
    reports_dir: Path,
    params: dict[str, Any],
    *,
    pipeline: dict[str, str | None] | list[str] | None = None,
    run_facts: list[tuple[str, str]] | None = None,
    default_params: dict[str, Any] | None = None,
    n_examples: int = 5,
) -> Report:
    """Gather everything under ``reports_dir``.

    Args:
        params: params.yaml as a dict.
        pipeline: the stages dvc.yaml defines that write reports/<stage>/ (see ``discover_stages``; a list:
            none of them a foreach); None: unknown, every stage with outputs is shown.
        run_facts: (label, value) lines the caller knows (git commit, params digest, report date).
        default_params: params to diff against (the committed params.yaml); changed keys are listed first.
    """
    import llmcore.report.figures as figs

    report = Report(params=params, run_facts=list(run_facts or []))
    if isinstance(pipeline, list):
        pipeline = dict.fromkeys(pipeline)
    report.stages = stages = discover_stages(reports_dir, pipeline)
    ctx = Context(stages)
    responses = read_responses(reports_dir / "instruct" / "responses.json")
    ctx.copy_rouge = stages["evaluate"].num("copy_prompt_rouge_l") if "evaluate" in stages else None
    if ctx.copy_rouge is None and responses:  # an evaluate run from before the metric existed
        ctx.copy_rouge = copy_input_rouge(responses)
    for name, stage in stages.items():
        if (missing := did_not_run(stage)) is not None:
            report.rows.append(missing)
            continue
        card = CARDS.get(name.split("/")[0], card_generic)
        try:
            report.rows += card(stage, ctx)
        except Exception as e:  # a malformed output must cost one row, never the report
            report.rows.append(Row(name, GENERIC_FIGURE, status="failed", reason=f"{type(e).__name__}: {e}"))
    for name, key in (pipeline or {}).items():
        if key and not any(n == name or n.startswith(f"{name}/") for n in stages):
            report.notes.append(f"{name}: none run (`{key}` lists none, the default)")
    for row in report.rows:
        if row.status != "ok":
            report.notes.append(f"{row.stage}, {row.figure}: {row.status}: {row.reason}")
    report.run_facts += environment_facts(stages)

    report.samples = read_samples(reports_dir / "pretrain" / "samples.md")
    report.mistakes = confident_mistakes(reports_dir / "classify" / "predictions.csv", n_examples)
    scores = read_scores(reports_dir / "evaluate" / "scores.jsonl")
    report.responses, report.response_rank = best_and_worst(responses, scores, n_examples)
    ev = stages.get("evaluate")
    if ev and ev.facts.get("judge_status") == "scored" and ev.num("mean") is not None:
        report.judge_summary = (
            f"mean {fmt(ev.num('mean'))} (95% CI {fmt(ev.num('ci95_low'))}–"
            f"{fmt(ev.num('ci95_high'))}), median {fmt(ev.num('median'))}, "
            f"{fmt(ev.num('n_scored'), 'int')} scored, {fmt(ev.num('n_refused'), 'int')} "
            f"refused, {fmt(ev.num('n_error'), 'int')} failed"
        )

    examples: list[Figure] = []
    conf = read_confusion(reports_dir / "classify" / "confusion.csv")
    if conf:
        labels = sorted({a for a, _ in conf} | {p for _, p in conf})
        matrix = [[conf.get((a, p), 0) for p in labels] for a in labels]
        svg = figs.heatmap("Spam classifier, test split", matrix, labels, labels, "actual", "predicted")
        if svg:
            examples.append(Figure("classify_confusion", "Confusion matrix of the spam classifier (test split)", svg))
    hist = [s for s in scores if s.get("status") == "scored" and isinstance(s.get("score"), (int, float))]
    if hist:
        counts = [0] * 10
        for s in hist:
            counts[min(int(s["score"]) // 10, 9)] += 1
        svg = figs.bar_chart(
            "Judge scores", [f"{10 * i}-{10 * i + 10}" for i in range(10)], counts, "score (0-100)", "responses"
        )
        if svg:
            examples.append(Figure("judge_scores", f"Judge score histogram: {report.judge_summary}", svg))
    report.figures["examples"] = examples
    report.figures["curves"] = curve_figures(reports_dir, [n for n in stages if "/" not in n])
    if default_params is not None:
        base = flatten(default_params)
        report.changed_params = {k for k, v in flatten(params).items() if base.get(k, ...) != v}
    return report


def environment_facts(stages: dict[str, StageData]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    env_stage = next((s for s in stages.values() if "torch" in s.facts.get("environment", {})), None)
    if env_stage:
        env = env_stage.facts["environment"]
        device = env_stage.facts.get("device", "cpu")
        out += [
            (
                "trained on",
                f"{device}: {env.get('gpu') or env.get('cpu', '?')}, {env.get('threads', '?')} threads "
                f"({env.get('cpu_count', '?')} CPUs) {MACHINE}",
            ),
            ("software", f"torch {env.get('torch', '?')}, Python {env.get('python', '?')}, {env.get('platform', '')}"),
            ("trained", f"{env.get('date', '?')} ({env_stage.name} stage)"),
        ]
    pre = stages.get("pretrain")
    if pre and pre.metrics is not None:
        out.append(
            (
                "model",
                f"{fmt(pre.num('params'), 'int')} parameters, {fmt(pre.num('tokens_seen'), 'int')} "
                f"tokens seen in pretraining",
            )
        )
        if pre.num("mfu") is not None:
            out.append(
                (
                    "pretraining throughput",
                    f"{fmt(pre.num('tokens_per_s'))} tokens/s, MFU "
                    f"{fmt(pre.num('mfu'), 'pct')} of a {fmt(pre.num('peak_tflops'))} TFLOP/s peak (all three over "
                    f"the same training seconds, resumes included) {MACHINE}",
                )
            )
    times = []
    for name, s in stages.items():
        t = s.num("stage_seconds", "wall_time_s", "seconds")
        if t is None and s.timing:
            parts = [v for k, v in s.timing.items() if k.endswith("seconds") and isinstance(v, (int, float))]
            t = sum(parts) if parts else None
        train = s.num("train_time_s", "train_seconds")
        if t is not None and train is not None and train > t:  # resumed from a checkpoint: most training was earlier
            times.append(f"{name} {t:.1f} s (resumed; {train:.0f} s of training in all)")
        elif t is not None:
            times.append(f"{name} {t:.1f} s")
    if times:
        out.append(("wall time per stage", " · ".join(times) + f" {MACHINE}"))
    return out


def copy_input_rouge(responses: list[dict[str, Any]]) -> float | None:
    """ROUGE-L of answering with the prompt itself (instruction + input): what a model must beat."""
    from llmcore.eval.metrics import rouge_l

    values = [rouge_l(_prompt_text(r), r.get("output", "")) for r in responses]
    return round(statistics.fmean(values), 4) if values else None


def _prompt_text(r: dict[str, Any]) -> str:
    return f"{r.get('instruction', '')} {r.get('input', '')}".strip()


def best_and_worst(responses: list[dict[str, Any]], scores: list[dict[str, Any]], n: int):
    """Best and worst ``n`` responses by judge score, or by ROUGE-L when nothing was judged."""
    from llmcore.eval.metrics import rouge_l

    if not responses:
        return {}, ""
    by_id = {r["id"]: r for r in responses}
    judged = [
        {**by_id[str(s["id"])], "score": float(s["score"])}
        for s in scores
        if s.get("status") == "scored" and str(s.get("id")) in by_id and isinstance(s.get("score"), (int, float))
    ]
    if judged:
        ranked, rank = judged, "judge score"
    else:
        rank = "ROUGE-L"
        ranked = [
            {**r, "score": round(rouge_l(str(r.get("model_response", "")), r.get("output", "")), 3)} for r in responses
        ]
    ranked.sort(key=lambda r: (-r["score"], r["id"]))
    worst = sorted(ranked, key=lambda r: (r["score"], r["id"]))[:n]
    return {"best": ranked[:n], "worst": worst}, rank


# --------------------------------------------------------------------------------------------------
# Curves


# (figure, y label, [(curve name, legend, style)]): one axis per figure; the unit of the first curve (from
# llmcore.report.metric_table, so a loss is per token, message or pair as its stage has it) goes in the label
CURVE_FIGURES = [
    (
        "loss",
        "loss",
        [("train/loss", "train", "-"), ("train/loss_avg", "train (smoothed)", "-"), ("val/loss", "val", "o-")],
    ),
    ("accuracy", "accuracy", [("val/accuracy", "val", "o-")]),
    (
        "reward_margin",
        "reward margin, chosen − rejected",
        [("train/reward_margin", "train", "-"), ("val/reward_margin", "val", "o-")],
    ),
    (
        "rewards",
        "implicit reward",
        [
            ("train/chosen_reward", "chosen (train)", "-"),
            ("train/rejected_reward", "rejected (train)", "-"),
            ("val/chosen_reward", "chosen (val)", "o-"),
            ("val/rejected_reward", "rejected (val)", "o-"),
        ],
    ),
    (
        "reward_accuracy",
        "reward accuracy",
        [("train/reward_accuracy", "train", "-"), ("val/reward_accuracy", "val", "o-")],
    ),
    ("lr", "learning rate", [("train/lr", "", "-")]),
    (
        "throughput",
        "throughput",
        [
            ("train/tokens_per_s", "tokens/s", "-"),
            ("train/examples_per_s", "examples/s", "-"),
            ("train/pairs_per_s", "pairs/s", "-"),
        ],
    ),
    ("grad_norm", "gradient norm (before clipping)", [("train/grad_norm", "", "-")]),
]


def curve_figures(reports_dir: Path, stage_names: list[str]) -> list[Figure]:
    from llmcore.report.figures import Series, line_chart

    out = []
    for stage in stage_names:
        curves = read_curves(reports_dir / stage / "live" / "plots" / "metrics")
        for fig_name, ylabel, members in CURVE_FIGURES:
            series = [
                Series(legend, curves[c].steps, curves[c].values, style) for c, legend, style in members if c in curves
            ]
            if not series:
                continue
            found = spec(next(c for c, _, _ in members if c in curves), stage)
            label = f"{ylabel} ({found.unit})" if found.unit and found.unit != ylabel else ylabel
            # a language model's loss gets a perplexity axis (exp of it); a classifier's or DPO's does not
            svg = line_chart(
                f"{stage}: {fig_name.replace('_', ' ')}",
                series,
                "optimizer step",
                label,
                logy=fig_name == "grad_norm",
                ppl_axis=found.lm_loss,
            )
            if svg:
                out.append(Figure(f"{stage}_{fig_name}", f"{stage}: {fig_name.replace('_', ' ')}", svg))
    return out
