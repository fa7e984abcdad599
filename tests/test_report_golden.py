"""The report's content, pinned: a fixed set of stage outputs renders to the same Markdown and HTML as before.

Three fixed inputs: a snapshot of a real default run's outputs (``tests/data/report_golden/reports``: the
metrics, timings, confusion matrix and curves the pipeline committed), a small judged run with every
comparison the evaluate stage records (base, instruct, align, head-to-head, a benchmark, an import), and the
snapshot with broken outputs (missing, NaN, malformed). Each renders to Markdown and HTML; both are compared
with the files under ``tests/data/report_golden/`` (figures' SVG bodies left out: matplotlib's output changes
with its version, their names and captions do not). A refactoring of ``llmcore.report`` keeps these bytes.

After a deliberate change to the report, regenerate the expected files and read their diff:
``LLMCORE_UPDATE_GOLDEN=1 python -m pytest tests/test_report_golden.py``.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest

from llmcore.common import write_stage_reports
from llmcore.report.card import build_report
from llmcore.report.render import to_html, to_markdown
from tests.conftest import REPO_ROOT
from tests.test_report import make_reports, paired, tsv

GOLDEN = REPO_ROOT / "tests" / "data" / "report_golden"
PIPELINE = {s: None for s in ("download", "tokenize", "pretrain", "classify", "instruct", "align", "evaluate")}
PIPELINE |= {"import": "import.models", "benchmark": "benchmark.models"}
PARAMS = {"model": {"preset": "llama3-tiny", "n_layers": 4}, "pretrain": {"train": {"lr": 0.003, "seed": 1337}}}
DEFAULT = {"model": {"preset": "llama3-tiny", "n_layers": 2}, "pretrain": {"train": {"lr": 0.003, "seed": 1337}}}
FACTS = [("git commit", "0123456789ab, clean"), ("report written", "2025-01-01T00:00:00+00:00")]


def snapshot(tmp_path):
    """The committed run's outputs, plus the DVC-cached ones it does not commit (facts, samples, responses)."""
    r = shutil.copytree(GOLDEN / "reports", tmp_path / "reports")
    env = {
        "torch": "2.13.0",
        "python": "3.11.2",
        "platform": "Linux-x86_64",
        "cpu": "Test CPU",
        "threads": 2,
        "cpu_count": 2,
        "date": "2025-01-01T00:00:00+00:00",
    }
    (r / "pretrain/facts.json").write_text(json.dumps({"device": "cpu", "environment": env}))
    (r / "classify/facts.json").write_text(json.dumps({"trainable": "lora", "base_model": "pretrain"}))
    (r / "instruct/facts.json").write_text(json.dumps({"finetune": "full", "base_model": "pretrain"}))
    (r / "tokenize/facts.json").write_text(json.dumps({"tokenizer": "bpe"}))
    (r / "evaluate/facts.json").write_text(
        json.dumps({"judge_status": "skipped", "judge_skip_reason": "cannot reach Ollama (start `ollama serve`)"})
    )
    scratch = make_reports(tmp_path / "scratch")
    for name in ("pretrain/samples.md", "classify/predictions.csv", "instruct/responses.json"):
        shutil.copy(scratch / name, r / name)
    return r


def judged(tmp_path):
    """A small judged run with every comparison the evaluate stage records, an import and a benchmark."""
    r = make_reports(tmp_path / "reports", judged=True)
    metrics = json.loads((r / "evaluate/metrics.json").read_text())
    metrics["copy_prompt_rouge_l"] = 0.3
    metrics["copy_prompt_diff_ci95_low"], metrics["copy_prompt_diff_ci95_high"] = 0.1, 0.5
    metrics["compare_base"] = {
        "n_items": 3,
        "rouge_l": paired("base", "instruct", 0.2, 0.6, 0.1, 0.7),
        "judge": paired("base", "instruct", 20.0, 55.0, 15.0, 50.0),
    }
    metrics["compare"] = {
        "n_items": 3,
        "rouge_l": paired("instruct", "align", 0.6, 0.55, -0.1, 0.02),
        "judge": paired("instruct", "align", 55.0, 60.0, -5.0, 12.0),
        "head_to_head": {"align_wins": 2, "instruct_wins": 1, "ties": 0, "align_win_rate": 2 / 3},
    }
    (r / "evaluate/metrics.json").write_text(json.dumps(metrics))
    write_stage_reports(
        r / "align",
        {"val_loss": 0.33, "val_reward_accuracy": 0.89, "val_reward_margin": 1.55},
        {"stage_seconds": 60.0},
        {"base_model": "instruct"},
    )
    for split in ("train", "val"):
        tsv(r / f"align/live/plots/metrics/{split}/reward_margin.tsv", "reward_margin", [(0, 0.0), (20, 1.5)])
    write_stage_reports(
        r / "import/gpt2-124m",
        {"val_loss": 3.3, "val_bpb": 1.2, "params": 124_439_808},
        None,
        {"family": "gpt2", "corpus": "tinyshakespeare"},
    )
    write_stage_reports(
        r / "benchmark/gpt2-124m",
        {
            "tasks": {"hellaswag": {"acc": 0.29, "acc_stderr": 0.0045, "acc_norm": 0.31, "n": 10042}},
            "truncated_requests": 0,
        },
        None,
        {"model": "gpt2-124m"},
    )
    for facts in r.rglob("facts.json"):  # this machine's CPU and date, which write_stage_reports may add: fixed data
        data = json.loads(facts.read_text())
        data.pop("environment", None)
        facts.write_text(json.dumps(data))
    return r


def broken(tmp_path):
    """The snapshot with a stage not run, a NaN loss, malformed JSON and an unreadable curve."""
    r = snapshot(tmp_path)
    shutil.rmtree(r / "align")
    (r / "pretrain/metrics.json").write_text(
        json.dumps({**json.loads((r / "pretrain/metrics.json").read_text()), "val_loss": None})
    )
    (r / "classify/metrics.json").write_text("{not json")
    (r / "instruct/live/plots/metrics/val/loss.tsv").write_text("garbage\n")
    (r / "tokenize/metrics.json").write_text("[1, 2]")
    return r


CASES = {"committed": snapshot, "judged": judged, "broken": broken}


def without_svg(html: str) -> str:
    return re.sub(r"data:image/svg\+xml;base64,[A-Za-z0-9+/=]+", "data:image/svg+xml;base64,…", html)


def render(reports) -> dict[str, str]:
    """Markdown, HTML and the figure list, with the temporary folder's path as ``<tmp>``."""
    report = build_report(reports, PARAMS, pipeline=dict(PIPELINE), run_facts=list(FACTS), default_params=DEFAULT)
    figures = "".join(f"{f.name}: {f.caption}\n" for figs in report.figures.values() for f in figs)
    out = {"md": to_markdown(report), "html": without_svg(to_html(report)), "figures.txt": figures}
    return {k: v.replace(str(reports.parent), "<tmp>") for k, v in out.items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_report_renders_the_same_content(tmp_path, case):
    rendered = render(CASES[case](tmp_path))
    for ext, text in rendered.items():
        expected = GOLDEN / f"{case}.{ext}"
        if os.environ.get("LLMCORE_UPDATE_GOLDEN"):
            expected.write_text(text, encoding="utf-8")
        assert expected.is_file(), f"{expected}: missing (LLMCORE_UPDATE_GOLDEN=1 writes it)"
        assert text == expected.read_text(encoding="utf-8"), f"{case}.{ext} differs from {expected}"


def test_golden_cases_hold_what_they_claim(tmp_path):
    """The fixed inputs exercise the card's paths: real figures, every comparison, and each kind of breakage."""
    md = {case: (GOLDEN / f"{case}.md").read_text(encoding="utf-8") for case in CASES}
    assert "| pretrain | val loss (nats/token) | 3.743 |" in md["committed"]
    assert "copying the prompt 0.3718 (worse)" in md["committed"]
    assert "| classify | test accuracy | 96.7% |" in md["committed"]
    for figure in (
        "judge mean score (0-100), base model",
        "judge mean score (0-100), align",
        "head-to-head: align's win rate",
        "hellaswag acc_norm",
        "ROUGE-L, align − instruct",
    ):
        assert f"| {figure} |" in md["judged"], figure
    assert "import/gpt2-124m" in md["judged"]
    assert "| pretrain | val loss (nats/token) | failed |" in md["broken"]
    assert "| align | val DPO loss (nats/pair) | not run |" in md["broken"]
    assert "| classify | test accuracy | failed |" in md["broken"]
    assert "| tokenize | bytes per token | failed |" in md["broken"]
