"""The pipeline report: a report card first, then what the model does, curves, details and params.

``build_report(reports_dir, params, ...)`` reads what the stages wrote under ``reports/<stage>/``:
``metrics.json`` (headline numbers), ``timing.json`` (run-time figures), ``facts.json`` (names, digests,
the environment), dvclive curves (``live/plots/metrics/**.tsv``), samples, predictions and judge scores.
``to_markdown`` / ``to_html`` render it; the HTML is one self-contained file (CSS and figures inline, no
script, no CDN) and the Markdown shows the same content for GitHub, with the figures as files beside it.

The card is data-driven: ``CARDS`` maps a stage name to the function that turns its outputs into card rows
(key figure, the baselines it must beat, the book's reference). A stage in the pipeline with no outputs is a
"not run" row with the reason; a stage folder with no card function gets a generic row. Nothing a stage
wrote (missing files, NaN losses, malformed JSON) stops the report: it says what is wrong in that row.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmcore.eval.metric_table import spec
from llmcore.eval.published import benchmark_rows

# The book's own run (Raschka, ch. 5-7; ../shared/README.md). ``comparable``: same data and task as ours.
BOOK = {
    "pretrain": (6.37, "124M GPT on the-verdict, ctx 256, 10 epochs (other corpus and tokenizer)", False),
    "classify": (0.9567, "GPT-2 124M, last block + norm + head, 5 epochs", True),
    "evaluate": (49.45, "GPT-2 355M (a different model), 2 epochs, Llama 3 8B judge, 110 entries", False),
    "align": (0.610, "DPO of the book's 355M instruct model (a different model, its own pairs), 1 epoch, beta 0.1: "
              "val DPO loss 0.693 → 0.610", False),
}  # fmt: skip
# Stages in pipeline order; a folder under reports/ not listed here comes after them.
STAGE_ORDER = ("download", "tokenize", "pretrain", "import", "classify", "instruct", "align", "evaluate", "benchmark")
NESTED = ("import", "benchmark")  # one folder per model: reports/<stage>/<name>/metrics.json
MACHINE = "†"  # marks figures that depend on the machine (and its load)


# --------------------------------------------------------------------------------------------------
# Reading a stage's outputs


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


def _read_json(path: Path) -> tuple[Any, str | None]:
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
    metrics, problem = _read_json(folder / "metrics.json")
    if problem or not isinstance(metrics, dict):
        stage.problem = problem or f"{folder / 'metrics.json'}: not a JSON object"
    else:
        stage.metrics, old_facts = split_numbers(metrics)
        stage.facts.update(old_facts)
    timing, _ = _read_json(folder / "timing.json")
    if isinstance(timing, dict):
        timing = timing.get("timing", timing) if isinstance(timing.get("timing"), dict) else timing
        stage.timing = split_numbers(timing)[0]
    facts, _ = _read_json(folder / "facts.json")
    if isinstance(facts, dict):
        stage.facts.update(facts)
    return stage


def discover_stages(reports_dir: Path, pipeline: dict[str, str | None] | None) -> dict[str, StageData]:
    """Every stage with outputs, plus every pipeline stage without (as "not run"), in pipeline order.

    ``pipeline`` maps the stages that write ``reports/<stage>/metrics.json`` to None, or, for a ``foreach``
    stage writing ``reports/<stage>/<item>/``, to the params key it iterates over (``import.models``).
    """
    names = [s for s in STAGE_ORDER if (pipeline is not None and s in pipeline) or (reports_dir / s).is_dir()]
    extra = sorted(p.name for p in reports_dir.iterdir() if p.is_dir() and p.name not in STAGE_ORDER) \
        if reports_dir.is_dir() else []  # fmt: skip
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
# The card


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
    """The direction ``llmcore.eval.metric_table`` declares for ``key`` (a metric with none reads as higher)."""
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
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def _not_run(stage: StageData, figure: str) -> Row:
    """A missing metrics.json: the stage has not run; an unreadable one: it failed."""
    reason = stage.problem or f"no {stage.folder / 'metrics.json'}"
    if reason.startswith("no "):
        return Row(stage.name, figure, status="not run", reason=f"{reason} (`dvc repro {stage.name.split('/')[0]}`)")
    return Row(stage.name, figure, status="failed", reason=reason)


def _nan_row(stage: StageData, figure: str, key: str) -> Row | None:
    """A row saying the key figure is not a number (a NaN loss is written as null), else None."""
    if stage.metrics is not None and stage.has_key(key) and stage.num(key) is None:
        return Row(stage.name, figure, status="failed",
                   reason=f"{key} is not a number (NaN or null in {stage.folder / 'metrics.json'}: training diverged?)")
    return None


def card_download(s: StageData, ctx: Context) -> list[Row]:
    if s.metrics is None:
        return [_not_run(s, "sources verified")]
    mb = (s.num("bytes") or 0) / 1e6
    return [Row(s.name, "sources verified", s.num("sources"), "int", detail=f"{mb:.1f} MB, sha256 or content checked")]


def card_tokenize(s: StageData, ctx: Context) -> list[Row]:
    figure = "bytes per token"
    if s.metrics is None:
        return [_not_run(s, figure)]
    kind = s.facts.get("tokenizer", "")
    detail = (f"{kind} vocab {fmt(s.num('vocab_size'), 'int')}; {fmt(s.num('train_tokens'), 'int')} train / "
              f"{fmt(s.num('val_tokens'), 'int')} val tokens")  # fmt: skip
    return [Row(s.name, figure, s.num("bytes_per_token"), baselines=[Ref("raw bytes", 1.0)], detail=detail.strip())]


def _loss_figure(s: StageData, what: str = "val loss") -> str:
    return f"{what} ({spec('val_loss', s.name).unit})"


def card_pretrain(s: StageData, ctx: Context) -> list[Row]:
    figure = _loss_figure(s)
    if s.metrics is None:
        return [_not_run(s, figure)]
    if bad := _nan_row(s, figure, "val_loss"):
        return [bad]
    loss = s.num("val_loss")
    parts = [f"{fmt(s.num('params'), 'int')} params", f"{fmt(s.num('step'), 'int')} steps",
             f"{fmt(s.num('tokens_seen'), 'int')} tokens", f"ppl {fmt(s.num('val_ppl'))}"]  # fmt: skip
    bpt = ctx.stages.get("tokenize")
    bpt = bpt.num("bytes_per_token") if bpt else None
    if loss is not None and bpt:
        parts.append(f"{loss / math.log(2) / bpt:.3f} bits/byte")
    book = BOOK["pretrain"]
    return [Row(s.name, figure, loss, higher_is_better=higher_is_better("val_loss", s.name),
                baselines=[Ref("bigram", s.num("bigram_val_loss")), Ref("unigram", s.num("unigram_val_loss"))],
                book=Ref(book[1], book[0], book[2]), detail=", ".join(parts))]  # fmt: skip


def card_import(s: StageData, ctx: Context) -> list[Row]:
    figure = _loss_figure(s)
    if s.metrics is None:
        return [_not_run(s, figure)]
    if bad := _nan_row(s, figure, "val_loss"):
        return [bad]
    detail = (f"{s.facts.get('family', '')} {fmt(s.num('params'), 'int')} params, {fmt(s.num('val_bpb'))} bits/byte "
              f"on {s.facts.get('corpus', 'the corpus')}")  # fmt: skip
    return [Row(s.name, figure, s.num("val_loss"), higher_is_better=higher_is_better("val_loss", s.name),
                detail=detail.strip())]  # fmt: skip


def card_classify(s: StageData, ctx: Context) -> list[Row]:
    figure = "test accuracy"
    if s.metrics is None:
        return [_not_run(s, figure)]
    if bad := _nan_row(s, figure, "test.accuracy"):
        return [bad]
    conf = [s.num(f"test_confusion.{k}") for k in ("tn", "fp", "fn", "tp")]
    baselines = []
    if all(c is not None for c in conf) and sum(conf):
        tn, fp, fn, tp = conf
        baselines.append(Ref("majority class", max(tn + fp, fn + tp) / (tn + fp + fn + tp)))
    n = sum(c for c in conf if c is not None)
    acc = s.num("test.accuracy")
    ci = wilson(acc * n, n) if acc is not None and n else None  # over the test messages
    detail = (f"F1 {fmt(s.num('test.f1'))} (spam positive), {fmt(n, 'int')} test messages"
              + (f" (95% CI {fmt(ci[0], 'pct')}–{fmt(ci[1], 'pct')})" if ci else "")
              + f", {s.facts.get('trainable', '')} on {s.facts.get('base_model', 'the base model')}")  # fmt: skip
    book = BOOK["classify"]
    return [Row(s.name, figure, acc, "pct", higher_is_better=higher_is_better("test.accuracy", s.name),
                baselines=baselines, book=Ref(book[1], book[0], book[2]), detail=detail, ci=ci)]  # fmt: skip


def card_instruct(s: StageData, ctx: Context) -> list[Row]:
    figure = _loss_figure(s, "test loss")
    if s.metrics is None:
        return [_not_run(s, figure)]
    if bad := _nan_row(s, figure, "test_loss"):
        return [bad]
    # the data format: Alpaca (the book's prompt template) or chat (ChatML conversations); runs before it was
    # recorded name none
    fmt_name = {"alpaca": "Alpaca ", "chat": "chat (ChatML) "}.get(s.facts.get("format"), "")
    detail = (f"{fmt_name}{s.facts.get('finetune', '')} fine-tune of {s.facts.get('base_model', 'the base')}, "
              f"{fmt(s.num('epochs'))} epochs; response-only loss {fmt(s.num('test_response_loss'))}, "
              f"{fmt(s.num('test_entries'), 'int')} test responses")  # fmt: skip
    return [Row(s.name, figure, s.num("test_loss"), higher_is_better=higher_is_better("test_loss", s.name),
                detail=detail)]  # fmt: skip


def card_align(s: StageData, ctx: Context) -> list[Row]:
    figure = _loss_figure(s, "val DPO loss")
    if s.metrics is None:
        return [_not_run(s, figure)]
    key = next((k for k in ("val_dpo_loss", "val.dpo_loss", "val_loss", "dpo_loss") if s.has_key(k)), "val_loss")
    if bad := _nan_row(s, figure, key):
        return [bad]
    acc = s.num("val_reward_accuracy", "val.reward_accuracy", "reward_accuracy")
    margin = s.num("val_reward_margin", "val.reward_margin", "reward_margin")
    detail = f"reward accuracy {fmt(acc, 'pct')}, reward margin {fmt(margin)}"
    book = BOOK["align"]
    return [Row(s.name, figure, s.num(key), higher_is_better=higher_is_better(key, s.name),
                baselines=[Ref("untrained policy (ln 2)", math.log(2))], book=Ref(book[1], book[0], book[2]),
                detail=detail)]  # fmt: skip


def _paired_ci(s: StageData, key: str) -> str:
    """The paired difference's interval of evaluate's ``key`` (compare.rouge_l, compare_base.judge, ...)."""
    return (f"paired 95% CI {fmt(s.num(f'{key}.diff_ci95_low'))} to {fmt(s.num(f'{key}.diff_ci95_high'))} over "
            f"{fmt(s.num(f'{key}.n'), 'int')} prompts")


def _judged_row(s: StageData, key: str, name: str, label: str) -> Row:
    """Model ``name``'s judge mean and 95% CI over the prompts judged for it and for the instruct model."""
    return Row(s.name, f"judge mean score (0-100), {label}", s.num(f"{key}.{name}_mean"),
               higher_is_better=higher_is_better(f"{key}.{name}_mean", s.name), ci=_interval(s, f"{key}.{name}_"),
               detail=f"95% CI {fmt(s.num(f'{key}.{name}_ci95_low'))}–{fmt(s.num(f'{key}.{name}_ci95_high'))} "
                      f"over {fmt(s.num(f'{key}.n'), 'int')} prompts judged for both")  # fmt: skip


def _paired_ref(s: StageData, label: str, value_key: str, key: str) -> Ref:
    """``label``'s value, with the paired difference's interval of evaluate's ``key`` (instruct - base, ...)."""
    return Ref(label, s.num(value_key), diff_ci=_interval(s, f"{key}.diff_"))


def card_evaluate(s: StageData, ctx: Context) -> list[Row]:
    """ROUGE-L and the judge's mean for the instruct model, beside the base model it was tuned from (compare_base:
    instruct - base, paired) and the aligned model (compare: align - instruct, paired, and a head-to-head)."""
    if s.metrics is None:
        return [_not_run(s, "ROUGE-L")]
    baselines = []
    if ctx.copy_rouge is not None:  # instruct - copy, paired over the items (older outputs: none recorded)
        baselines.append(Ref("copying the prompt", ctx.copy_rouge, diff_ci=_interval(s, "copy_prompt_diff_")))
    if s.num("compare_base.rouge_l.base_mean") is not None:
        baselines.append(_paired_ref(s, "base model", "compare_base.rouge_l.base_mean", "compare_base.rouge_l"))
    # the instruct model's own interval, where a comparison recorded it: the verdict of a baseline with no paired one
    own = next((ci for k in ("compare.rouge_l.instruct_", "compare_base.rouge_l.instruct_") if (ci := _interval(s, k))),
               None)  # fmt: skip
    rows = [Row(s.name, "ROUGE-L vs reference", s.num("rouge_l"), baselines=baselines, ci=own,
                higher_is_better=higher_is_better("rouge_l", s.name),
                detail=f"exact match {fmt(s.num('exact_match'), 'pct')}, reference loss "
                       f"{fmt(s.num('reference_loss'))}, {fmt(s.num('n_items'), 'int')} items")]  # fmt: skip
    if s.num("compare_base.rouge_l.diff_mean") is not None:
        rows.append(_diff_row(s, "ROUGE-L, instruct − base", "compare_base.rouge_l"))
    status = s.facts.get("judge_status")
    book = BOOK["evaluate"]
    judge = Row(s.name, "judge mean score (0-100)", book=Ref(book[1], book[0], book[2]),
                higher_is_better=higher_is_better("mean", s.name))  # fmt: skip
    if status == "scored" and s.num("mean") is not None:
        judge.value, judge.ci = s.num("mean"), _interval(s, "")
        judge.detail = (f"95% CI {fmt(s.num('ci95_low'))}–{fmt(s.num('ci95_high'))}, {fmt(s.num('n_scored'), 'int')} "
                        f"of {fmt(s.num('n_items'), 'int')} scored by {s.facts.get('judge_model', 'the judge')}"
                        + (f" ({fmt(s.num('n_refused'), 'int')} refused: no score in the asked form)"
                           if s.num("n_refused") else ""))  # fmt: skip
        if s.num("compare_base.judge.base_mean") is not None:  # the base model's row, then instruct's beside it
            rows.append(_judged_row(s, "compare_base.judge", "base", "base model"))
            judge.baselines = [_paired_ref(s, "base model", "compare_base.judge.base_mean", "compare_base.judge")]
            judge.detail += (f"; instruct − base {fmt(s.num('compare_base.judge.diff_mean'))}, "
                             f"{_paired_ci(s, 'compare_base.judge')}")  # fmt: skip
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
        aligned.detail += (f"; align − instruct {fmt(s.num('compare.judge.diff_mean'))}, "
                           f"{_paired_ci(s, 'compare.judge')}")  # fmt: skip
        rows.append(aligned)
    if s.num("compare.rouge_l.diff_mean") is not None:
        rows.append(_diff_row(s, "ROUGE-L, align − instruct", "compare.rouge_l"))
    rate = s.num("compare.head_to_head.align_win_rate")
    if rate is not None:
        h2h = [s.num(f"compare.head_to_head.{k}") or 0.0 for k in ("align_wins", "instruct_wins", "ties")]
        ci = wilson(h2h[0] + h2h[2] / 2, sum(h2h))  # ties count half, as in the rate; over the decided pairs
        rows.append(Row(s.name, "head-to-head: align's win rate", rate, "pct", baselines=[Ref("a coin toss", 0.5)],
                        higher_is_better=higher_is_better("compare.head_to_head.align_win_rate", s.name), ci=ci,
                        detail=(f"95% CI {fmt(ci[0], 'pct')}–{fmt(ci[1], 'pct')}; " if ci else "")
                        + f"{fmt(h2h[0], 'int')} wins, {fmt(h2h[1], 'int')} losses, {fmt(h2h[2], 'int')} ties, "
                        "judged in a random order"))  # fmt: skip
    return rows


def _diff_row(s: StageData, figure: str, key: str) -> Row:
    """A paired difference (``key``: compare.rouge_l, ...) beside no difference: better or worse only when its
    95% interval excludes 0."""
    ci = _interval(s, f"{key}.diff_")
    return Row(s.name, figure, s.num(f"{key}.diff_mean"), baselines=[Ref("no difference", 0.0, diff_ci=ci)], ci=ci,
               higher_is_better=higher_is_better(f"{key}.diff_mean", s.name), detail=_paired_ci(s, key))  # fmt: skip


def card_generic(s: StageData, ctx: Context) -> list[Row]:
    """A stage without a card function (e.g. benchmark/<model>): its first accuracy-like number, the rest as detail."""
    if s.metrics is None:
        return [_not_run(s, "key figure")]
    flat = {k: v for k, v in flatten(s.metrics).items() if isinstance(v, (int, float)) and v is not None}
    key = next((k for k in flat if re.search(r"acc|score|f1|rouge", k)), next(iter(flat), None))
    if key is None:
        return [Row(s.name, "key figure", status="failed", reason=f"{s.folder / 'metrics.json'} holds no number")]
    chance = s.num("chance", "random_baseline")
    others = [f"{k} {fmt(v)}" for k, v in flat.items() if k != key and not k.startswith("chance")][:4]
    return [Row(s.name, key, float(flat[key]), higher_is_better=higher_is_better(key, s.name),
                baselines=[Ref("chance", chance)] if chance is not None else [], detail=", ".join(others))]  # fmt: skip


def card_benchmark(s: StageData, ctx: Context) -> list[Row]:
    """lm-eval scores of one model (benchmark/<model>), each beside the published GPT-2 124M figure of the same
    task and metric where one exists (``llmcore.eval.published``: the lm-evaluation-harness protocol first)."""
    if s.metrics is None or not isinstance(s.metrics.get("tasks"), dict):
        return [_not_run(s, "benchmark accuracy")]
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
            rows.append(Row(s.name, f"{task} {metric}", float(value), "pct",
                            ci=(value - 1.96 * stderr, value + 1.96 * stderr) if ok else None,
                            book=Ref(f"{ref['model']} ({ref['source']})", ref["published"]) if ref else None,
                            detail=f"± {fmt(stderr, 'pct')} (stderr)" if ok else ""))  # fmt: skip
    return rows or [Row(s.name, "benchmark accuracy", status="failed", reason=f"{s.folder / 'metrics.json'} holds no "
                        "acc, acc_norm or exact_match")]  # fmt: skip


CARDS: dict[str, Callable[[StageData, Context], list[Row]]] = {
    "download": card_download, "tokenize": card_tokenize, "pretrain": card_pretrain, "import": card_import,
    "classify": card_classify, "instruct": card_instruct, "align": card_align, "evaluate": card_evaluate,
    "benchmark": card_benchmark,
}  # fmt: skip


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


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def build_report(reports_dir: Path, params: dict[str, Any], *,
                 pipeline: dict[str, str | None] | list[str] | None = None,
                 run_facts: list[tuple[str, str]] | None = None, default_params: dict[str, Any] | None = None,
                 n_examples: int = 5) -> Report:  # fmt: skip
    """Gather everything under ``reports_dir``.

    Args:
        params: params.yaml as a dict.
        pipeline: the stages dvc.yaml defines that write reports/<stage>/ (see ``discover_stages``; a list:
            none of them a foreach); None: unknown, every stage with outputs is shown.
        run_facts: (label, value) lines the caller knows (git commit, params digest, report date).
        default_params: params to diff against (the committed params.yaml); changed keys are listed first.
    """
    import llmcore.eval.figures as figs

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
        card = CARDS.get(name.split("/")[0], card_generic)
        try:
            report.rows += card(stage, ctx)
        except Exception as e:  # a malformed output must cost one row, never the report
            report.rows.append(Row(name, "key figure", status="failed", reason=f"{type(e).__name__}: {e}"))
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
        report.judge_summary = (f"mean {fmt(ev.num('mean'))} (95% CI {fmt(ev.num('ci95_low'))}–"
                                f"{fmt(ev.num('ci95_high'))}), median {fmt(ev.num('median'))}, "
                                f"{fmt(ev.num('n_scored'), 'int')} scored, {fmt(ev.num('n_refused'), 'int')} "
                                f"refused, {fmt(ev.num('n_error'), 'int')} failed")  # fmt: skip

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
        svg = figs.bar_chart("Judge scores", [f"{10 * i}-{10 * i + 10}" for i in range(10)], counts,
                             "score (0-100)", "responses")  # fmt: skip
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
            ("trained on", f"{device}: {env.get('gpu') or env.get('cpu', '?')}, {env.get('threads', '?')} threads "
                           f"({env.get('cpu_count', '?')} CPUs) {MACHINE}"),
            ("software", f"torch {env.get('torch', '?')}, Python {env.get('python', '?')}, {env.get('platform', '')}"),
            ("trained", f"{env.get('date', '?')} ({env_stage.name} stage)"),
        ]  # fmt: skip
    pre = stages.get("pretrain")
    if pre and pre.metrics is not None:
        out.append(("model", f"{fmt(pre.num('params'), 'int')} parameters, {fmt(pre.num('tokens_seen'), 'int')} "
                             f"tokens seen in pretraining"))  # fmt: skip
        if pre.num("mfu") is not None:
            out.append(("pretraining throughput", f"{fmt(pre.num('tokens_per_s'))} tokens/s, MFU "
                        f"{fmt(pre.num('mfu'), 'pct')} of a {fmt(pre.num('peak_tflops'))} TFLOP/s peak (all three over "
                        f"the same training seconds, resumes included) {MACHINE}"))  # fmt: skip
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


# --------------------------------------------------------------------------------------------------
# What the model does


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
    return [{"text": r["text"], "label": r["label"], "prediction": r["prediction"], "probability": f"{r['p']:.3f}"}
            for r in rows[:n]]  # fmt: skip


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
    data, _ = _read_json(path)
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
        ranked = [{**r, "score": round(rouge_l(str(r.get("model_response", "")), r.get("output", "")), 3)}
                  for r in responses]  # fmt: skip
    ranked.sort(key=lambda r: (-r["score"], r["id"]))
    worst = sorted(ranked, key=lambda r: (r["score"], r["id"]))[:n]
    return {"best": ranked[:n], "worst": worst}, rank


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


# (figure, y label, [(curve name, legend, style)]): one axis per figure; the unit of the first curve (from
# llmcore.eval.metric_table, so a loss is per token, message or pair as its stage has it) goes in the label
CURVE_FIGURES = [
    ("loss", "loss", [("train/loss", "train", "-"), ("train/loss_avg", "train (smoothed)", "-"),
                      ("val/loss", "val", "o-")]),
    ("accuracy", "accuracy", [("val/accuracy", "val", "o-")]),
    ("reward_margin", "reward margin, chosen − rejected", [("train/reward_margin", "train", "-"),
                                                          ("val/reward_margin", "val", "o-")]),
    ("rewards", "implicit reward", [("train/chosen_reward", "chosen (train)", "-"),
                                    ("train/rejected_reward", "rejected (train)", "-"),
                                    ("val/chosen_reward", "chosen (val)", "o-"),
                                    ("val/rejected_reward", "rejected (val)", "o-")]),
    ("reward_accuracy", "reward accuracy", [("train/reward_accuracy", "train", "-"),
                                            ("val/reward_accuracy", "val", "o-")]),
    ("lr", "learning rate", [("train/lr", "", "-")]),
    ("throughput", "throughput", [("train/tokens_per_s", "tokens/s", "-"),
                                  ("train/examples_per_s", "examples/s", "-"), ("train/pairs_per_s", "pairs/s", "-")]),
    ("grad_norm", "gradient norm (before clipping)", [("train/grad_norm", "", "-")]),
]  # fmt: skip


def curve_figures(reports_dir: Path, stage_names: list[str]) -> list[Figure]:
    from llmcore.eval.figures import Series, line_chart

    out = []
    for stage in stage_names:
        curves = read_curves(reports_dir / stage / "live" / "plots" / "metrics")
        for fig_name, ylabel, members in CURVE_FIGURES:
            series = [Series(legend, curves[c].steps, curves[c].values, style) for c, legend, style in members
                      if c in curves]  # fmt: skip
            if not series:
                continue
            found = spec(next(c for c, _, _ in members if c in curves), stage)
            label = f"{ylabel} ({found.unit})" if found.unit and found.unit != ylabel else ylabel
            # a language model's loss gets a perplexity axis (exp of it); a classifier's or DPO's does not
            svg = line_chart(f"{stage}: {fig_name.replace('_', ' ')}", series, "optimizer step", label,
                             logy=fig_name == "grad_norm", ppl_axis=found.lm_loss)  # fmt: skip
            if svg:
                out.append(Figure(f"{stage}_{fig_name}", f"{stage}: {fig_name.replace('_', ' ')}", svg))
    return out


# --------------------------------------------------------------------------------------------------
# Rendering

MACHINE_NOTE = (f"{MACHINE} machine-dependent: timings, throughput and MFU change with the machine and its load. "
                "The losses and accuracies are bit-identical between runs on one machine; on another CPU they can "
                "differ in their last digits (other vector kernels, other float rounding).")  # fmt: skip


def card_table(report: Report) -> tuple[list[str], list[list[str]]]:
    header = ["stage", "key figure", "value", "baselines", "book", "details"]
    rows = []
    for r in report.rows:
        if r.status != "ok":
            rows.append([r.stage, r.figure, r.status, "", _book_cell(r) if r.book else "", r.reason])
            continue
        base = "; ".join(f"{b.label} {fmt(b.value, r.kind)} ({r.verdict(b) or 'n/a'})" for b in r.baselines)
        rows.append([r.stage, r.figure, fmt(r.value, r.kind), base, _book_cell(r), r.detail])
    return header, rows


def _book_cell(r: Row) -> str:
    if r.book is None:
        return ""
    verdict = r.verdict(r.book)
    mark = f" ({verdict})" if verdict else ""
    return f"{fmt(r.book.value, r.kind)}{mark}: {r.book.label}"


def params_rows(report: Report) -> list[list[str]]:
    flat = {k: v for k, v in flatten(report.params).items() if not k.startswith("download.")}
    keys = sorted(flat, key=lambda k: (k not in report.changed_params, list(flat).index(k)))
    return [[k, json.dumps(flat[k]) if not isinstance(flat[k], str) else flat[k],
             "changed" if k in report.changed_params else ""] for k in keys]  # fmt: skip


def details_rows(stage: StageData) -> list[list[str]]:
    rows = [[f"metrics: {k}", fmt(v)] for k, v in flatten(stage.metrics or {}).items()]
    rows += [[f"timing: {k}", f"{fmt(v)} {MACHINE}"] for k, v in flatten(stage.timing).items()]
    rows += [[f"facts: {k}", fmt(v)] for k, v in flatten(stage.facts).items() if not k.startswith("environment.")]
    return rows


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(lines)


def _short(text: str, n: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n] + " …"


def _prompt(r: dict[str, Any]) -> str:
    return f"{r.get('instruction', '')}" + (f" — input: {r['input']}" if r.get("input") else "")


def all_figures(report: Report) -> list[Figure]:
    return [f for figs in report.figures.values() for f in figs]


def to_markdown(report: Report, figures_dir: str = "figures") -> str:
    """The report as GitHub Markdown; figures are referenced as ``<figures_dir>/<name>.svg``."""
    out = ["# llmcore pipeline report", "", "## Report card", ""]
    out += [_md_table(*card_table(report)), ""]
    if report.notes:
        out += ["**Skipped or not run:**", ""] + [f"- {n}" for n in report.notes] + [""]
    facts = _md_table(["fact", "value"], [[k, v] for k, v in report.run_facts])
    out += ["**Run facts**", "", facts, "", MACHINE_NOTE, ""]
    out += ["## What the model does", ""]
    if report.samples:
        out += ["### Pretraining samples", ""]
        for prompt, text in report.samples:
            out += [f"Prompt **{prompt}**:", "", "```text", text, "```", ""]
    if report.mistakes:
        out += ["### Spam classifier: most confident mistakes (test split)", "",
                _md_table(["text", "label", "predicted", "probability"],
                          [[_short(m["text"], 200), m["label"], m["prediction"], m["probability"]]
                           for m in report.mistakes]), ""]  # fmt: skip
    for fig in report.figures.get("examples", []):
        out += [f"![{fig.caption}]({figures_dir}/{fig.name}.svg)", "", f"*{fig.caption}*", ""]
    for kind in ("best", "worst"):
        if report.responses.get(kind):
            out += [f"### Instruction responses: {kind} {len(report.responses[kind])} by {report.response_rank}", "",
                    _md_table([report.response_rank, "instruction", "reference", "model"],
                              [[fmt(r["score"]), _short(_prompt(r), 200), _short(r.get("output", ""), 200),
                                _short(r.get("model_response", ""), 200)] for r in report.responses[kind]]),
                    ""]  # fmt: skip
    if report.figures.get("curves"):
        out += ["## Curves", ""]
        for fig in report.figures["curves"]:
            out += [f"![{fig.caption}]({figures_dir}/{fig.name}.svg)", ""]
    out += ["## Stage details", ""]
    for name, stage in report.stages.items():
        rows = details_rows(stage)
        if rows:
            out += ["<details>", f"<summary>{name}</summary>", "", _md_table(["key", "value"], rows), "", "</details>",
                    ""]  # fmt: skip
    n_changed = len(report.changed_params)
    out += ["## Params", "", "<details>", f"<summary>params.yaml ({n_changed} changed from the committed file, listed "
            "first)</summary>", "", _md_table(["key", "value", ""], params_rows(report)), "", "</details>", ""]
    return "\n".join(out) + "\n"


CSS = """*{box-sizing:border-box}body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1100px;
margin:0 auto;padding:1em;color:#1d1d1f}h1{font-size:1.6em;margin:.2em 0 .6em}
h2{margin-top:1.6em;border-bottom:1px solid #ddd}h3{margin-top:1.2em}
.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch}table{border-collapse:collapse;
margin:.4em 0 1.2em;font-size:.92em}td,th{border:1px solid #d5d5d5;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f6}td.num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}
.better{color:#17632a;font-weight:600}.worse{color:#a4161a;font-weight:600}.status{font-weight:600;color:#8a5a00}
.notes{background:#fff7e0;border:1px solid #eed58a;padding:.5em 1em;border-radius:4px}.notes li{margin:.2em 0}
.small{color:#555;font-size:.88em}pre{white-space:pre-wrap;background:#f6f6f6;padding:.6em;border-radius:4px;
font-size:.88em}figure{margin:.6em 0;display:inline-block;max-width:100%;vertical-align:top}figure img{max-width:100%;
height:auto;display:block}figcaption{font-size:.85em;color:#555}.grid{display:flex;flex-wrap:wrap;gap:.6em}
.grid figure{flex:1 1 420px}details{margin:.4em 0}summary{cursor:pointer;font-weight:600}
@media (max-width:640px){table.card thead{display:none}table.card tr{display:block;border:1px solid #d5d5d5;
margin-bottom:.6em;padding:.3em 0}table.card td{display:block;border:none;padding:1px 8px;text-align:left}
table.card td:first-child{font-weight:700}table.card td:not(:first-child):before{content:attr(data-label) ": ";
color:#555}table.card td:empty{display:none}}"""


def _cell(text: str) -> str:
    e = html.escape(str(text))
    e = re.sub(r"\((better|worse)\)", r"(<span class='\1'>\1</span>)", e)
    return e


def _html_table(header: list[str], rows: list[list[str]], numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    td = lambda i: "<td class=num>" if i in numeric else "<td>"
    body = "".join("<tr>" + "".join(f"{td(i)}{_cell(c)}</td>" for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def _img(fig: Figure) -> str:
    data = base64.b64encode(fig.svg.encode("utf-8")).decode("ascii")
    return (f"<figure><img src='data:image/svg+xml;base64,{data}' alt='{html.escape(fig.caption)}'>"
            f"<figcaption>{html.escape(fig.caption)}</figcaption></figure>")  # fmt: skip


def to_html(report: Report) -> str:
    e = html.escape
    out = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
           "<meta name='viewport' content='width=device-width, initial-scale=1'>",
           f"<title>llmcore pipeline report</title><style>{CSS}</style></head><body>",
           "<h1>llmcore pipeline report</h1>", "<h2>Report card</h2>"]  # fmt: skip
    header, rows = card_table(report)
    body = []
    for r, cells in zip(report.rows, rows, strict=True):
        value = f"<span class='status'>{e(cells[2])}</span>" if r.status != "ok" else e(cells[2])
        body.append("<tr>" + "".join(
            f"<td data-label='{e(header[i])}'{' class=num' if i == 2 else ''}>{value if i == 2 else _cell(c)}</td>"
            for i, c in enumerate(cells)
        ) + "</tr>")  # fmt: skip
    out.append("<div class='scroll'><table class='card'><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in header)
               + "</tr></thead><tbody>" + "".join(body) + "</tbody></table></div>")  # fmt: skip
    if report.notes:
        out.append("<div class='notes'><strong>Skipped or not run</strong><ul>"
                   + "".join(f"<li>{e(n)}</li>" for n in report.notes) + "</ul></div>")  # fmt: skip
    out += ["<h3>Run facts</h3>", _html_table(["fact", "value"], [[k, v] for k, v in report.run_facts]),
            f"<p class='small'>{e(MACHINE_NOTE)}</p>", "<h2>What the model does</h2>"]  # fmt: skip
    if report.samples:
        out.append("<h3>Pretraining samples</h3>")
        for prompt, text in report.samples:
            out.append(f"<p class='small'>Prompt <strong>{e(prompt)}</strong></p><pre>{e(text)}</pre>")
    if report.mistakes:
        out += ["<h3>Spam classifier: most confident mistakes (test split)</h3>",
                _html_table(["text", "label", "predicted", "probability"],
                            [[_short(m["text"], 300), m["label"], m["prediction"], m["probability"]]
                             for m in report.mistakes], {3})]  # fmt: skip
    if report.figures.get("examples"):
        out.append("<div class='grid'>" + "".join(_img(f) for f in report.figures["examples"]) + "</div>")
    for kind in ("best", "worst"):
        if report.responses.get(kind):
            n = len(report.responses[kind])
            out += [f"<h3>Instruction responses: {kind} {n} by {e(report.response_rank)}</h3>",
                    _html_table([report.response_rank, "instruction", "reference", "model"],
                                [[fmt(r["score"]), _short(_prompt(r), 400), _short(r.get("output", ""), 400),
                                  _short(r.get("model_response", ""), 400)] for r in report.responses[kind]], {0})]
    if report.figures.get("curves"):
        out += ["<h2>Curves</h2>", "<div class='grid'>" + "".join(_img(f) for f in report.figures["curves"]) + "</div>"]
    out.append("<h2>Stage details</h2>")
    for name, stage in report.stages.items():
        rows = details_rows(stage)
        if rows:
            out.append(f"<details><summary>{e(name)}</summary>{_html_table(['key', 'value'], rows, {1})}</details>")
    out += ["<h2>Params</h2>", f"<details><summary>params.yaml ({len(report.changed_params)} changed from the "
            "committed file, listed first)</summary>", _html_table(["key", "value", ""], params_rows(report)),
            "</details>", "</body></html>"]  # fmt: skip
    return "\n".join(out) + "\n"
