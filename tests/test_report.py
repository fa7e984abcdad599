"""The report card (stage `report`), its figures, the three report files a stage writes, and `llmcore compare`."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from llmcore.common import write_stage_reports
from llmcore.report import experiments as cmp
from llmcore.report.card import build_report
from llmcore.report.render import to_markdown
from stages import report as report_stage
from tests.conftest import REPO_ROOT

RESPONSES = [
    {
        "id": "0",
        "instruction": "Name the capital of France.",
        "input": "",
        "output": "Paris is the capital.",
        "model_response": "Paris is the capital.",
    },
    {"id": "1", "instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "model_response": "It is 6."},
    {"id": "2", "instruction": "Say hi.", "input": "", "output": "Hi there!", "model_response": "Hi!"},
]
PIPELINE = ["download", "tokenize", "pretrain", "import", "classify", "instruct", "evaluate", "report"]


def tsv(path, column, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"timestamp\tstep\t{column}\n" + "".join(f"0\t{s}\t{v}\n" for s, v in rows))


def make_reports(r, *, judged=False, pretrain_loss=3.76):
    """A reports/ folder as the default pipeline writes it, small."""
    write_stage_reports(
        r / "download",
        {"sources": 6, "bytes": 3_045_723},
        {"seconds": 0.03},
        {"files": {"x": {"file": "data/raw/x", "sha256": "ab" * 32}}},
    )
    write_stage_reports(
        r / "tokenize",
        {"vocab_size": 1024, "train_tokens": 383352, "val_tokens": 45666, "bytes_per_token": 2.6},
        {"tokenizer_seconds": 0.8},
        {"tokenizer": "bpe"},
    )
    write_stage_reports(
        r / "pretrain",
        {
            "step": 100,
            "train_loss": 3.2,
            "val_loss": pretrain_loss,
            "val_ppl": 43.0,
            "unigram_val_loss": 5.99,
            "bigram_val_loss": 4.40,
            "tokens_seen": 204800,
            "params": 1_000_576,
        },
        {"tokens_per_s": 16000.0, "mfu": 0.4, "peak_tflops": 0.16, "train_time_s": 126.0},
        {"stop_reason": "max_steps", "device": "cpu"},
    )
    live = r / "pretrain/live/plots/metrics"
    tsv(live / "train/loss.tsv", "loss", [(10, 6.5), (20, 5.0), (30, float("nan")), (40, 4.0)])
    tsv(live / "val/loss.tsv", "loss", [(0, 7.0), (40, 4.2)])
    tsv(live / "train/lr.tsv", "lr", [(10, 1e-3), (20, 3e-3), (40, 1e-4)])
    tsv(live / "train/tokens_per_s.tsv", "tokens_per_s", [(10, 15000), (20, 16000)])
    (r / "pretrain/samples.md").write_text(
        "# Pretraining samples\n\nStep 100.\n\n## 1. **ROMEO:**\n\n```text\nROMEO: I am gold or his last.\n```\n"
    )
    write_stage_reports(
        r / "classify",
        {"test": {"accuracy": 0.96, "f1": 0.9595}, "test_confusion": {"tn": 146, "fp": 7, "fn": 5, "tp": 142}},
        {"stage_seconds": 5.8},
        {"trainable": "lora", "base_model": "pretrain"},
    )
    (r / "classify/confusion.csv").write_text("actual,predicted\nspam,spam\nham,ham\nham,spam\nspam,ham\n")
    (r / "classify/predictions.csv").write_text(
        "text,label,prediction,probability\nWIN A PRIZE now,spam,spam,0.99\nsee you at six,ham,spam,0.91\n"
        '"call me, later",ham,spam,0.97\nFREE entry,spam,ham,0.6\n'
    )
    tsv(r / "classify/live/plots/metrics/val/accuracy.tsv", "accuracy", [(0, 0.5), (65, 0.9)])
    write_stage_reports(
        r / "instruct",
        {"test_loss": 1.0, "epochs": 4.0, "test_entries": 3},
        {"stage_seconds": 5.0},
        {"finetune": "full", "base_model": "pretrain"},
    )
    (r / "instruct/responses.json").write_text(json.dumps(RESPONSES))
    metrics = {"n_items": 3, "rouge_l": 0.6, "exact_match": 1 / 3, "reference_loss": 2.6}
    if judged:
        metrics.update(mean=55.0, median=60.0, ci95_low=20.0, ci95_high=90.0, n_scored=3, n_refused=1, n_error=0)
        facts = {"judge_status": "scored", "judge_model": "llama3:8b"}
        scores = [
            {"id": "0", "score": 95, "status": "scored"},
            {"id": "1", "score": 5, "status": "scored"},
            {"id": "2", "score": 65, "status": "scored"},
        ]
    else:
        facts = {"judge_status": "skipped", "judge_skip_reason": "cannot reach Ollama (start `ollama serve`)"}
        scores = [{"id": r["id"], "score": None, "status": "skipped"} for r in RESPONSES]
    write_stage_reports(r / "evaluate", metrics, None, facts)
    (r / "evaluate/scores.jsonl").write_text("".join(json.dumps(s) + "\n" for s in scores))
    return r


def run_report(tmp_path, reports, params=None):
    stages = {s: {"cmd": "true", "metrics": [f"reports/{s}/metrics.json"]} for s in PIPELINE if s != "import"}
    stages["import"] = {"foreach": "${import.models}", "do": {"metrics": [{"reports/import/${item}/metrics.json": {}}]}}
    stages["export"] = {"foreach": "${export.models}", "do": {"outs": ["data/export/${item}"]}}  # no report
    params = params or {"model": {"preset": "llama3-tiny"}}
    stages["report"] = {"cmd": "true", "params": list(params), "outs": ["reports/report.md"]}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    args = [
        "--params",
        str(tmp_path / "params.yaml"),
        "--reports",
        str(reports),
        "--dvc-yaml",
        str(tmp_path / "dvc.yaml"),
    ]
    result = CliRunner().invoke(report_stage.app, args)
    assert result.exit_code == 0, result.output
    return (reports / "report.md").read_text(), (reports / "report.html").read_text()


def card(md: str) -> dict[str, list[str]]:
    """Report-card rows of report.md, keyed by 'stage: key figure'."""
    start = md.index("## Report card")
    rows = {}
    for line in md[start : md.index("### Run facts")].splitlines():
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        if line.startswith("| ") and len(cells) == 6 and cells[0] != "stage":
            rows[f"{cells[0]}: {cells[1]}"] = cells
    return rows


# --------------------------------------------------------------------------------------------------
# What a stage writes


def test_stage_reports_split_numbers_timing_and_facts(tmp_path):
    write_stage_reports(
        tmp_path,
        {"val_loss": float("nan"), "test": {"accuracy": 0.9}, "n": 3},
        {"seconds": 1.5},
        {"path": tmp_path, "digest": "ab" * 32},
    )
    metrics = json.loads((tmp_path / "metrics.json").read_text())  # strict JSON: NaN became null
    assert metrics == {"val_loss": None, "test": {"accuracy": 0.9}, "n": 3}
    assert json.loads((tmp_path / "timing.json").read_text()) == {"timing": {"seconds": 1.5}}
    facts = json.loads((tmp_path / "facts.json").read_text())
    assert facts["path"] == str(tmp_path) and facts["environment"]["cpu_count"] == os.cpu_count()
    assert re.match(r"\d{4}-\d\d-\d\dT", facts["environment"]["date"])
    with pytest.raises(TypeError, match=r"metrics\.model: DVC metrics hold numbers, got str"):
        write_stage_reports(tmp_path / "bad", {"model": "gpt2"})
    with pytest.raises(TypeError, match=r"timing\.when"):
        write_stage_reports(tmp_path / "bad", {}, {"when": "now"})


def test_dvc_yaml_declares_metrics_timing_and_facts_apart():
    """Every stage whose script writes its reports with write_stage_reports declares timing.json as a metric and
    facts.json as an output (never a metric); the report's figures travel with report.md (git, not the cache)."""
    spec = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    checked = []
    for name, stage in spec.items():
        stage = stage.get("do", stage)
        metrics = [next(iter(m)) if isinstance(m, dict) else m for m in stage.get("metrics", [])]
        outs = [next(iter(o)) if isinstance(o, dict) else o for o in stage.get("outs", [])]
        assert not any(m.endswith(("facts.json", "info.json")) for m in metrics), name
        script = REPO_ROOT / (stage["cmd"].split()[2].replace(".", "/") + ".py")
        if "write_stage_reports(" in script.read_text() and any(m.endswith("/metrics.json") for m in metrics):
            assert any(m.endswith("/timing.json") for m in metrics), name
            assert any(o.endswith("/facts.json") for o in outs), name
            checked.append(name)
    assert {"download", "tokenize", "pretrain", "import", "classify", "instruct", "align", "evaluate"} <= set(checked)
    report_outs = {next(iter(o)): o[next(iter(o))] for o in spec["report"]["outs"]}
    assert report_outs["reports/figures"] == {"cache": False}


# --------------------------------------------------------------------------------------------------
# The report card


def test_card_marks_baselines_and_book_and_lists_what_was_skipped(tmp_path):
    reports = make_reports(tmp_path / "reports")
    md, page = run_report(tmp_path, reports)
    rows = card(md)
    pre = rows["pretrain: val loss (nats/token)"]
    assert pre[2] == "3.76" and "bigram 4.4 (better)" in pre[3] and "unigram 5.99 (better)" in pre[3]
    assert "not comparable" in pre[4]  # the book pretrained on another corpus
    assert "2.086 bits/byte" in pre[5]  # 3.76 / ln 2 / 2.6 bytes per token
    cls = rows["classify: test accuracy"]
    assert cls[2] == "96.0%" and "majority class 51.0% (better)" in cls[3]
    # 96.0% of 300 messages (Wilson 95% CI 93.1-97.7%) and the book's 95.7%: no clear difference
    assert cls[4].startswith("95.7% (no clear difference)") and "95% CI 93.1%–97.7%" in cls[5]
    assert "copying the prompt" in rows["evaluate: ROUGE-L vs reference"][3]
    judge = rows["evaluate: judge mean score (0-100)"]
    assert judge[2] == "skipped" and "ollama serve" in judge[5]
    assert "- import: none run (`import.models` lists none, the default)" in md and "export" not in md
    assert "- evaluate, judge mean score (0-100): skipped" in md
    assert "| pretraining throughput | 16,000 tokens/s, MFU 40.0%" in md and "†" in md and "classify 5.8 s" in md
    assert re.search(r"\| git commit \| ", md) and "| params digest | sha256 " in md
    # what the model does: samples, the classifier's most confident mistake first, responses ranked by ROUGE-L
    assert "ROMEO: I am gold" in md
    mistakes = md.index("most confident mistakes")
    assert md.index("call me, later", mistakes) < md.index("see you at six", mistakes) < md.index("FREE entry")
    assert "best 3 by ROUGE-L" in md and "worst 3 by ROUGE-L" in md
    # library-drawn figures, referenced by the Markdown, embedded in the HTML
    figures = sorted(p.name for p in (reports / "figures").glob("*.svg"))
    assert figures == [
        "classify_accuracy.svg",
        "classify_confusion.svg",
        "pretrain_loss.svg",
        "pretrain_lr.svg",
        "pretrain_throughput.svg",
    ]
    svg = (reports / "figures/pretrain_loss.svg").read_text()
    assert "matplotlib" in svg and "loss (nats/token)" in svg and "optimizer step" in svg
    assert all(f"figures/{f}" in md for f in figures)
    assert page.count("<img src='data:image/svg+xml;base64,") == len(figures)
    assert "<script" not in page and "http://" not in page and "https://" not in page  # self-contained
    # params last, collapsed
    assert md.rindex("## Params") > md.index("## Curves") and "<details>" in md[md.rindex("## Params") :]


def test_card_with_a_judge_ranks_responses_by_score_and_draws_the_histogram(tmp_path):
    reports = make_reports(tmp_path / "reports", judged=True)
    md, _ = run_report(tmp_path, reports)
    judge = card(md)["evaluate: judge mean score (0-100)"]
    assert judge[2] == "55" and judge[4].startswith("49.45 (not comparable)") and "95% CI 20–90" in judge[5]
    assert "(1 refused: no score in the asked form)" in judge[5] and "3 scored, 1 refused, 0 failed" in md
    best = md.index("best 3 by judge score")
    assert md.index("Name the capital", best) < md.index("Say hi.", best) < md.index("Add the numbers.", best)
    assert (reports / "figures/judge_scores.svg").is_file()


def paired(a: str, b: str, a_mean: float, b_mean: float, lo: float, hi: float, n: int = 3) -> dict:
    """compare.py's paired_stats under the evaluate stage's names: each model's mean and 95% CI, and b - a's."""
    return {
        "n": n,
        f"{a}_mean": a_mean,
        f"{a}_ci95_low": a_mean - 10,
        f"{a}_ci95_high": a_mean + 10,
        f"{b}_mean": b_mean,
        f"{b}_ci95_low": b_mean - 10,
        f"{b}_ci95_high": b_mean + 10,
        "diff_mean": b_mean - a_mean,
        "diff_ci95_low": lo,
        "diff_ci95_high": hi,
    }


def test_card_shows_base_instruct_and_align_judged_side_by_side(tmp_path):
    """Did instruction tuning help by the judge's measure? The base model's answers are judged beside
    instruct's and align's, with paired intervals; the book's figure stays, marked as another model's."""
    reports = make_reports(tmp_path / "reports", judged=True)
    metrics = json.loads((reports / "evaluate/metrics.json").read_text())
    metrics["compare_base"] = {
        "n_items": 3,
        "base_rouge_l": 0.2,
        "judge_unscored_pairs": 0,
        "rouge_l": paired("base", "instruct", 0.2, 0.6, 0.1, 0.7),
        "judge": paired("base", "instruct", 20.0, 55.0, 15.0, 50.0),
    }
    metrics["compare"] = {
        "n_items": 3,
        "align_rouge_l": 0.55,
        "judge_unscored_pairs": 0,
        "rouge_l": paired("instruct", "align", 0.6, 0.55, -0.1, 0.02),
        "judge": paired("instruct", "align", 55.0, 60.0, -5.0, 12.0),
    }
    (reports / "evaluate/metrics.json").write_text(json.dumps(metrics))
    md, _ = run_report(tmp_path, reports)
    rows = card(md)
    names = [k for k in rows if k.startswith("evaluate: judge")]
    assert names == [
        "evaluate: judge mean score (0-100), base model",
        "evaluate: judge mean score (0-100)",
        "evaluate: judge mean score (0-100), align",
    ]
    base, instruct, align = (rows[k] for k in names)
    assert base[2] == "20" and "95% CI 10–30" in base[5] and base[4] == ""
    assert instruct[2] == "55" and "base model 20 (better)" in instruct[3]
    assert "instruct − base 35, paired 95% CI 15 to 50 over 3 prompts" in instruct[5]
    assert instruct[4].startswith("49.45 (not comparable)") and "a different model" in instruct[4]
    assert align[2] == "60" and "instruct 55 (no clear difference)" in align[3]  # paired CI -5 to 12 holds 0
    assert "align − instruct 5, paired 95% CI -5 to 12 over 3 prompts" in align[5]
    rouge = rows["evaluate: ROUGE-L vs reference"]
    assert "base model 0.2 (better)" in rouge[3] and "copying the prompt" in rouge[3]
    gain = rows["evaluate: ROUGE-L, instruct − base"]
    assert gain[2] == "0.4" and "paired 95% CI 0.1 to 0.7 over 3 prompts" in gain[5]


def test_params_changed_from_the_committed_file_come_first(tmp_path):
    reports = make_reports(tmp_path / "reports")
    params = {"model": {"preset": "gpt2-tiny", "n_layers": 2}, "tokenize": {"vocab_size": 512}}
    report = build_report(
        reports,
        params,
        default_params={"model": {"preset": "llama3-tiny", "n_layers": 2}, "tokenize": {"vocab_size": 512}},
    )
    md = to_markdown(report)
    table = md[md.rindex("## Params") :]
    assert "(1 changed from the committed file" in table
    assert table.index("| model.preset | gpt2-tiny | changed |") < table.index("| model.n_layers | 2 |")


@pytest.mark.parametrize("damage", ["missing", "nan", "null", "malformed", "garbage"])
def test_bad_stage_outputs_never_crash_the_report(tmp_path, damage):
    reports = make_reports(tmp_path / "reports")
    if damage == "missing":  # stages not run at all
        for stage in ("pretrain", "classify", "instruct", "evaluate"):
            shutil.rmtree(reports / stage)
    elif damage == "nan":  # a diverged run, written by an older writer as a bare NaN
        (reports / "pretrain/metrics.json").write_text('{"val_loss": NaN, "train_loss": NaN, "step": 5}')
    elif damage == "null":
        write_stage_reports(reports / "pretrain", {"val_loss": float("nan"), "step": 5})
    elif damage == "malformed":
        (reports / "classify/metrics.json").write_text("{not json")
        (reports / "pretrain/timing.json").write_text("[1, 2")
    else:
        (reports / "evaluate/scores.jsonl").write_text('not json\n{"id": 7}\n')
        (reports / "instruct/responses.json").write_text('{"a": 1}')
        (reports / "pretrain/live/plots/metrics/train/loss.tsv").write_text("step\nx\n")
        (reports / "classify/predictions.csv").write_text("text,label\n")
        (reports / "pretrain/samples.md").write_bytes(b"\xff\xfe")
    md, page = run_report(tmp_path, reports)
    rows = card(md)
    assert "</html>" in page
    if damage == "missing":
        for key in (
            "pretrain: val loss (nats/token)",
            "classify: test accuracy",
            "instruct: test loss (nats/token)",
            "evaluate: ROUGE-L",
        ):
            assert rows[key][2] == "not run" and "`dvc repro" in rows[key][5], key
        assert rows["tokenize: bytes per token"][2] == "2.6"
    elif damage in ("nan", "null"):
        row = rows["pretrain: val loss (nats/token)"]
        assert row[2] == "failed" and "val_loss is not a number" in row[5]
    elif damage == "malformed":
        row = rows["classify: test accuracy"]
        assert row[2] == "failed" and "unreadable (JSONDecodeError" in row[5]
        assert rows["pretrain: val loss (nats/token)"][2] == "3.76"
    else:
        assert "copying the prompt" not in md and "Instruction responses" not in md


def test_report_card_has_a_row_per_new_stage(tmp_path):
    """Stages added later (align, benchmark) slot in: their own card, a generic one, or "not run"."""
    reports = make_reports(tmp_path / "reports")
    write_stage_reports(reports / "align", {"val_dpo_loss": 0.61, "val_reward_accuracy": 0.7, "reward_margin": 1.9})
    write_stage_reports(
        reports / "benchmark/gpt2",
        {"tasks": {"hellaswag": {"acc": 0.30, "acc_stderr": 0.01, "acc_norm": 0.32}, "arc_easy": {"acc": 0.4}}},
    )
    evaluate = json.loads((reports / "evaluate/metrics.json").read_text())
    evaluate["compare"] = {
        "rouge_l": {"n": 3, "diff_mean": -0.02, "diff_ci95_low": -0.05, "diff_ci95_high": 0.01},
        "head_to_head": {"align_win_rate": 0.6, "align_wins": 3, "instruct_wins": 2, "ties": 0},
    }
    (reports / "evaluate/metrics.json").write_text(json.dumps(evaluate))
    md, _ = run_report(tmp_path, reports)
    rows = card(md)
    align = rows["align: val DPO loss (nats/pair)"]
    assert align[2] == "0.61" and "untrained policy (ln 2) 0.6931 (better)" in align[3] and "70.0%" in align[5]
    assert align[4].startswith("0.61 (not comparable)")  # the book's 355M on its own data: another model
    diff = rows["evaluate: ROUGE-L, align − instruct"]  # the interval holds 0: neither better nor worse
    assert diff[2] == "-0.02" and "no difference 0 (no clear difference)" in diff[3] and "CI -0.05 to 0.01" in diff[5]
    h2h = rows["evaluate: head-to-head: align's win rate"]  # 3 wins of 5: the interval holds a coin toss
    assert h2h[2:4] == ["60.0%", "a coin toss 50.0% (no clear difference)"] and "95% CI" in h2h[5]
    # lm-eval scores beside llm.c's published GPT-2 124M figures (the harness protocol), stderr as detail
    bench = rows["benchmark/gpt2: hellaswag acc_norm"]
    assert bench[2] == "32.0%" and "31.1%" in bench[4] and "better" in bench[4], bench
    acc = rows["benchmark/gpt2: hellaswag acc"]
    assert acc[2] == "30.0%" and "28.9%" in acc[4] and "1.0%" in acc[5], acc
    assert "(no clear difference)" in acc[4], acc  # 30.0% ± 1.96 x 1.0% holds 28.9%
    assert rows["benchmark/gpt2: arc_easy acc"][4] in ("", "—"), rows["benchmark/gpt2: arc_easy acc"]
    shutil.rmtree(reports / "align")
    (tmp_path / "p.yaml").write_text("{}")
    report = build_report(reports, {}, pipeline=[*PIPELINE, "align"])
    row = next(r for r in report.rows if r.stage == "align")
    assert row.figure == "val DPO loss (nats/pair)"
    assert row.status == "not run" and "align/metrics.json" in row.reason


# --------------------------------------------------------------------------------------------------
# In a browser


def chromium(page, screenshot, width, script):
    """Render ``page`` in headless Chromium with ``script`` appended; returns its console lines."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("chromium not installed (.ci/run installs Debian's chromium)")
        pytest.skip("chromium not installed (apt-get install chromium)")
    probe = page.with_name(f"probe-{width}.html")  # the report itself has no script: the test adds one
    probe.write_text(page.read_text().replace("</body>", f"<script>{script}</script></body>"))
    cmd = [
        exe,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={screenshot.parent / 'profile'}",
        "--enable-logging=stderr",
        "--log-level=0",
        "--hide-scrollbars",
        "--virtual-time-budget=5000",
        f"--window-size={width},2400",
        f"--screenshot={screenshot}",
        probe.as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    return [line for line in proc.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


CHECK = """window.addEventListener('load', () => {
  const bad = [...document.images].filter(i => !i.complete || i.naturalWidth === 0).length;
  console.log(`images ${document.images.length - bad}/${document.images.length} loaded`);
  console.log(`overflow ${document.documentElement.scrollWidth - window.innerWidth}px`);
});"""


def test_html_report_in_headless_chromium_desktop_and_phone(tmp_path):
    reports = make_reports(tmp_path / "reports", judged=True)
    run_report(tmp_path, reports)
    n_images = (reports / "report.html").read_text().count("<img ")
    for width in (1200, 390):  # a desktop, a phone
        shot = tmp_path / f"report-{width}.png"
        lines = chromium(reports / "report.html", shot, width, CHECK)
        print(f"screenshot: {shot}")
        assert any(f"images {n_images}/{n_images} loaded" in line for line in lines), lines
        assert any("overflow 0px" in line for line in lines), lines  # no sideways scrolling of the page
        others = [line for line in lines if "images " not in line and "overflow " not in line]
        assert others == []  # no console errors
        assert shot.stat().st_size > 20_000  # a real rendering, not a blank page
    # the check can fail: a broken image and a script error are caught
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><img src='data:image/png;base64,AAAA'><script>undefined_fn();</script></body></html>")
    lines = chromium(bad, tmp_path / "bad.png", 390, CHECK)
    assert any("images 0/1 loaded" in line for line in lines) and any("undefined_fn" in line for line in lines)


# --------------------------------------------------------------------------------------------------
# llmcore compare


def fake_experiments(repo):
    """A git repo with a baseline and two experiment commits, and the `dvc exp show --json` that lists them."""
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    revs = []
    for name, losses in (("base", [6.0, 5.0]), ("llama", [6.0, 4.0]), ("gpt2", [6.0, 4.5])):
        tsv(repo / "reports/pretrain/live/plots/metrics/val/loss.tsv", "loss", [(0, losses[0]), (50, losses[1])])
        subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
        subprocess.run([*git, "commit", "-qm", name, "--allow-empty"], cwd=repo, check=True)
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True)
        revs.append(head.stdout.strip())

    def data(preset, loss, acc, seconds):
        return {
            "params": {"params.yaml": {"data": {"model": {"preset": preset}, "tokenize": {"vocab_size": 1024}}}},
            "metrics": {
                "reports/pretrain/metrics.json": {"data": {"val_loss": loss}},
                "reports/classify/metrics.json": {"data": {"test": {"accuracy": acc}}},
                "reports/pretrain/timing.json": {"data": {"timing": {"train_time_s": seconds}}},
            },
        }

    shown = [
        {"rev": "workspace", "name": None, "data": data("llama3-tiny", 5.0, 0.9, 10.0)},
        {
            "rev": revs[0],
            "name": "main",
            "data": data("llama3-tiny", 5.0, 0.9, 10.0),
            "experiments": [
                {
                    "name": "llama",
                    "revs": [{"rev": revs[1], "name": "llama", "data": data("llama3-tiny", 4.0, 0.95, 11.0)}],
                },
                {"name": "gpt2", "revs": [{"rev": revs[2], "name": "gpt2", "data": data("gpt2-tiny", 4.5, 0.97, 9.0)}]},
            ],
        },
    ]
    return shown


def test_compare_two_experiments(tmp_path):
    repo = tmp_path / "repo"
    shown = fake_experiments(repo)
    base = "main (committed, measured on another machine)"  # the committed metrics, labelled as such
    assert [e.name for e in cmp.parse_exp_show(shown)] == [base, "gpt2", "llama"]  # oldest first
    exps = cmp.parse_exp_show(shown, ["llama", "gpt2"])  # as asked
    assert [e.name for e in exps] == [base, "llama", "gpt2"]
    c = cmp.compare(repo, exps)
    assert c.params == [["model.preset", "llama3-tiny", "llama3-tiny", "gpt2-tiny"]]  # vocab_size is the same
    metrics = {k: (v, best) for k, v, best in c.metrics}
    assert metrics["pretrain: val_loss"] == ([5.0, 4.0, 4.5], {1})  # lower loss wins
    assert metrics["classify: test.accuracy"] == ([0.9, 0.95, 0.97], {2})  # higher accuracy wins
    assert c.timing == [("pretrain: train_time_s", [10.0, 11.0, 9.0])]  # apart, never marked best
    md, page = cmp.write_comparison(c, tmp_path / "out")
    text = md.read_text()
    assert "| pretrain: val_loss | nats/token | lower | 5 | **4** | 4.5 |" in text  # unit and direction from the table
    assert "| classify: test.accuracy | fraction | higher | 0.9 | 0.95 | **0.97** |" in text
    assert "compare_figures/pretrain_val_loss.svg" in text
    svg = (tmp_path / "out/compare_figures/pretrain_val_loss.svg").read_text()
    assert all(name in svg for name in (base, "llama", "gpt2"))  # one line per run, in the legend
    assert page.read_text().count("<img ") == 1 and "<strong>4</strong>" in page.read_text()
    # only some experiments; a wrong name is one line
    assert [e.name for e in cmp.parse_exp_show(shown, ["gpt2"])] == [base, "gpt2"]
    with pytest.raises(cmp.LLMCoreError, match="no experiment named 'mistral'"):
        cmp.parse_exp_show(shown, ["mistral"])
    assert "measured on the machine that made that commit" in text and "--baseline base" in text


def test_compare_against_your_own_baseline_run(tmp_path, monkeypatch):
    """`llmcore compare --baseline EXP`: one of the user's runs is the baseline, the committed metrics are left out."""
    repo = tmp_path / "repo"
    shown = fake_experiments(repo)
    exps = cmp.parse_exp_show(shown, baseline="llama")
    assert [e.name for e in exps] == ["llama (your baseline)", "gpt2"]
    assert [e.baseline for e in exps] == [True, False] and not any(e.committed for e in exps)
    assert [e.name for e in cmp.parse_exp_show(shown, ["gpt2"], baseline="llama")] == ["llama (your baseline)", "gpt2"]
    md, _ = cmp.write_comparison(cmp.compare(repo, exps), tmp_path / "out")
    text = md.read_text()
    assert text.count("committed") == 0 and "1 experiments" in text  # the baseline is no experiment of its own
    assert "| pretrain: val_loss | nats/token | lower | **4** | 4.5 |" in text
    with pytest.raises(cmp.LLMCoreError, match="--baseline mistral: no experiment"):
        cmp.parse_exp_show(shown, baseline="mistral")
    # through the CLI, with `dvc exp show` answered by the fake listing
    from llmcore import cli
    from llmcore.report import experiments

    monkeypatch.setattr(experiments, "run_dvc_exp_show", lambda _repo: shown)
    args = ["compare", "--repo", str(repo), "--out", str(tmp_path / "cli"), "--baseline", "gpt2"]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    page = (tmp_path / "cli/compare.md").read_text()
    assert "| classify: test.accuracy | fraction | higher | **0.97** | 0.95 |" in page


def test_compare_without_experiments_says_how_to_make_some(tmp_path):
    c = cmp.compare(tmp_path, cmp.parse_exp_show([{"rev": "workspace", "data": {}}]))
    md, page = cmp.write_comparison(c, tmp_path)
    assert "dvc exp run -n llama -S model.preset=llama3-tiny" in md.read_text()
    assert "No experiments to compare yet" in page.read_text()


def test_compare_cli_outside_a_dvc_repo_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "llmcore.cli", "compare", "--repo", str(tmp_path)], capture_output=True, text=True
    )
    assert proc.returncode == 1 and proc.stderr.startswith("error: `dvc exp show --json` failed")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_best_marks_need_a_direction_and_a_difference():
    assert cmp.best_of([1.0, 1.0], -1) == set() and cmp.best_of([1.0, None, 2.0], 0) == set()
    assert cmp.best_of([1.0, math.nan, 2.0], -1) == {0}
    assert cmp.direction("pretrain: val_loss") == -1 and cmp.direction("classify: test.f1") == 1
    assert cmp.direction("classify: test_confusion.fp") == -1 and cmp.direction("tokenize: vocab_size") == 0


def test_dvc_plots_page_is_git_ignored():
    """`dvc plots show` writes dvc_plots/ (a page that needs a CDN); it never shows up as a change to commit."""
    proc = subprocess.run(["git", "check-ignore", "-q", "dvc_plots/index.html"], cwd=REPO_ROOT)
    assert proc.returncode == 0


def tolerance_holds(quoted: str, tolerance: str, value: float) -> bool:
    """``value`` (a fraction for a ``%`` figure) within the README's ``tolerance`` of ``quoted``: ``±0.05``,
    ``±2.0 pt`` (percentage points), ``30–70%`` (a range), ``exact`` (to the digits shown)."""
    pct = quoted.endswith("%")
    q = float(quoted.rstrip("%")) / (100 if pct else 1)
    if found := re.match(r"(\d+)–(\d+)%", tolerance):
        return int(found.group(1)) / 100 <= value <= int(found.group(2)) / 100
    if tolerance.startswith("exact"):
        digits = len(quoted.rstrip("%").split(".")[-1]) if "." in quoted else 0
        return abs(value - q) <= 0.5 * 10 ** -(digits + (2 if pct else 0)) + 1e-12
    found = re.match(r"±(\d+(?:\.\d+)?)( pt)?", tolerance)
    assert found, f"README: tolerance {tolerance!r} is not ±x, ±x pt, a-b% or exact"
    tol = float(found.group(1)) / (100 if found.group(2) else 1)
    return abs(value - q) <= tol + 1e-12


def test_readme_default_run_table_is_the_committed_run():
    """Run A of the README's table is what reports/ holds, within the tolerance the table quotes (not to the last
    digit: other CPUs train other weights), and the tolerance covers every other run the table lists."""
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    table = text[text.index("What the default run gives") : text.index("**Byte-identical on one machine")]
    rows = {
        cells[1]: cells[2:5]
        for line in table.splitlines()
        if line.startswith("| ") and len(cells := [c.strip() for c in line.strip("|").split("|")]) == 6
    }
    report = build_report(REPO_ROOT / "reports", {})
    stage = report.stages
    committed = {
        "BPE 1024": stage["tokenize"].num("bytes_per_token"),
        "Llama-3-style": stage["pretrain"].num("val_loss"),
        "MFU": stage["pretrain"].num("mfu"),
        "LoRA on the pretrained": stage["classify"].num("test.accuracy"),
        "F1": stage["classify"].num("test.f1"),
        "4 epochs": stage["instruct"].num("test_loss"),
        "DPO, 1 epoch": stage["align"].num("val_loss"),
        "val reward accuracy": stage["align"].num("val_reward_accuracy"),
        "ROUGE-L": stage["evaluate"].num("rouge_l"),
    }
    for prefix, value in committed.items():
        figure, (quoted, others, tolerance) = next((k, v) for k, v in rows.items() if k.startswith(prefix))
        quoted = quoted.strip("*")
        assert tolerance_holds(quoted, tolerance, value), (
            f"README: {figure}: run A {quoted} ± {tolerance}, "
            f"reports/ holds {value}: update the table (or the tolerance, if this CPU is new)"
        )
        for other in re.findall(r"\d+(?:\.\d+)?%?", others):
            v = float(other.rstrip("%")) / (100 if other.endswith("%") else 1)
            assert tolerance_holds(quoted, tolerance, v), f"README: {figure}: {other} is outside {quoted} ± {tolerance}"
    copy = next(k for k in rows if k.startswith("ROUGE-L"))
    rouge = next(r for r in report.rows if r.figure.startswith("ROUGE-L"))
    assert f"copying the prompt scores {rouge.baselines[0].value:.3f}" in copy
    assert not tolerance_holds("3.743", "±0.05", 3.80) and tolerance_holds("96.7%", "±2.0 pt", 0.973)
    assert tolerance_holds("2.600", "exact (integer counting)", 2.6004) and not tolerance_holds("2.600", "exact", 2.601)


def test_better_or_worse_only_when_the_interval_excludes_zero(tmp_path):
    """A paired difference is better or worse only when its 95% interval excludes 0, whichever side it is on."""
    reports = make_reports(tmp_path / "reports")
    evaluate = json.loads((reports / "evaluate/metrics.json").read_text())
    for lo, hi, verdict in ((-0.05, 0.01, "no clear difference"), (-0.05, -0.01, "worse"), (0.01, 0.05, "better")):
        diff = {"n": 3, "diff_mean": (lo + hi) / 2, "diff_ci95_low": lo, "diff_ci95_high": hi}
        evaluate["compare"] = {"rouge_l": diff}
        (reports / "evaluate/metrics.json").write_text(json.dumps(evaluate))
        rows = card(to_markdown(build_report(reports, {})))
        assert f"no difference 0 ({verdict})" in rows["evaluate: ROUGE-L, align − instruct"][3], (lo, hi)
    # the baseline of copying the prompt: judged by the paired interval of instruct - copy the stage records
    evaluate.update(copy_prompt_rouge_l=0.55, copy_prompt_diff_ci95_low=-0.02, copy_prompt_diff_ci95_high=0.12)
    (reports / "evaluate/metrics.json").write_text(json.dumps(evaluate))
    rows = card(to_markdown(build_report(reports, {})))
    assert "copying the prompt 0.55 (no clear difference)" in rows["evaluate: ROUGE-L vs reference"][3]


def test_one_table_declares_each_metrics_direction_and_unit():
    from llmcore.report.metric_table import spec

    assert (spec("val_loss", "pretrain").direction, spec("val_loss", "pretrain").unit) == (-1, "nats/token")
    assert spec("val_loss", "pretrain").lm_loss and spec("val/loss", "instruct").lm_loss
    assert (spec("val_loss", "classify").unit, spec("val_loss", "classify").lm_loss) == ("nats/message", False)
    assert (spec("train/loss_avg", "align").unit, spec("val_loss", "align").lm_loss) == ("nats/pair", False)
    assert spec("val_rejected_reward", "align").direction == -1 and spec("val/chosen_reward", "align").direction == 1
    assert spec("val_reward_margin", "align").direction == 1 and spec("test.accuracy", "classify").direction == 1
    for bound in ("ci95_low", "compare.rouge_l.diff_ci95_high", "compare.judge.align_ci95_low", "tasks.x.acc_stderr"):
        assert spec(bound, "evaluate").direction == 0, bound  # an interval's bound is not a result
    assert spec("val/ppl", "classify").plot is False and spec("val/ppl", "pretrain").plot
    assert spec("val_loss", "newstage").direction == -1 and spec("steps", "pretrain").direction == 0
    # the compare page reads the same table
    assert cmp.direction("align: val_rejected_reward") == -1
    assert cmp.direction("evaluate: compare.rouge_l.diff_ci95_low") == 0


def test_losses_carry_their_own_unit_and_the_align_rewards_are_plotted(tmp_path):
    reports = make_reports(tmp_path / "reports")
    write_stage_reports(reports / "align", {"val_loss": 0.3, "val_reward_accuracy": 0.9, "val_reward_margin": 1.7})
    for stage in ("classify", "align"):
        live = reports / stage / "live/plots/metrics"
        tsv(live / "train/loss.tsv", "loss", [(10, 0.6), (20, 0.4)])
        tsv(live / "val/loss.tsv", "loss", [(0, 0.69), (20, 0.3)])
        tsv(live / "val/ppl.tsv", "ppl", [(0, 2.0), (20, 1.35)])  # the training loop logs exp(loss) for every stage
    live = reports / "align/live/plots/metrics"
    for split in ("train", "val"):
        tsv(live / f"{split}/reward_margin.tsv", "reward_margin", [(0, 0.0), (20, 1.7)])
        tsv(live / f"{split}/reward_accuracy.tsv", "reward_accuracy", [(0, 0.5), (20, 0.9)])
        tsv(live / f"{split}/chosen_reward.tsv", "chosen_reward", [(0, 0.0), (20, 0.3)])
        tsv(live / f"{split}/rejected_reward.tsv", "rejected_reward", [(0, 0.0), (20, -1.4)])
    run_report(tmp_path, reports)
    figures = {p.stem: p.read_text() for p in (reports / "figures").glob("*.svg")}
    assert "nats/token" in figures["pretrain_loss"] and "perplexity" in figures["pretrain_loss"]  # an LM loss
    for stage, unit in (("classify", "nats/message"), ("align", "nats/pair")):
        svg = figures[f"{stage}_loss"]
        assert unit in svg and "nats/token" not in svg and "perplexity" not in svg, stage
    assert not any("ppl" in name or "perplexity" in name for name in figures)
    assert "train" in figures["align_reward_margin"] and "val" in figures["align_reward_margin"]
    assert "chosen" in figures["align_rewards"] and "rejected" in figures["align_rewards"]
    assert "align_reward_accuracy" in figures


def test_compare_marks_a_best_only_with_a_direction_and_a_clear_interval(tmp_path):
    repo = tmp_path / "repo"
    shown = fake_experiments(repo)
    extra = {  # per run: rejected reward, ROUGE-L difference (align - instruct) with its interval, judge mean
        "main": (-1.0, (-0.005, -0.03, 0.02), (50.0, 45.0, 55.0)),
        "llama": (-1.5, (0.004, -0.02, 0.03), (52.0, 47.0, 57.0)),
        "gpt2": (-0.5, (0.08, 0.05, 0.11), (70.0, 66.0, 74.0)),
    }
    for entry in [shown[1], *(g["revs"][0] for g in shown[1]["experiments"])]:
        rejected, (d, lo, hi), (m, mlo, mhi) = extra[entry["name"]]
        metrics = entry["data"]["metrics"]
        metrics["reports/align/metrics.json"] = {"data": {"val_rejected_reward": rejected, "val_loss": 0.3}}
        metrics["reports/evaluate/metrics.json"] = {
            "data": {
                "mean": m,
                "ci95_low": mlo,
                "ci95_high": mhi,
                "compare": {"rouge_l": {"diff_mean": d, "diff_ci95_low": lo, "diff_ci95_high": hi}},
            }
        }
    tsv(repo / "reports/classify/live/plots/metrics/val/ppl.tsv", "ppl", [(0, 2.0), (10, 1.3)])
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "ppl"], cwd=repo, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True)
    shown[1]["experiments"][1]["revs"][0]["rev"] = head.stdout.strip()  # gpt2's commit now has a classify ppl curve
    c = cmp.compare(repo, cmp.parse_exp_show(shown, ["llama", "gpt2"]))
    rows = {k: (v, best) for k, v, best in c.metrics}
    assert rows["align: val_rejected_reward"][1] == {1}  # the lowest rejected reward: -1.5 (llama)
    assert rows["align: val_loss"][1] == set()  # all equal
    assert not any("ci95" in k for k in rows)  # bounds are not rows: they go with their mean
    assert rows["evaluate: mean"][1] == {2}  # 70 [66, 74] clears 52 [47, 57] and 50 [45, 55]
    assert rows["evaluate: compare.rouge_l.diff_mean"][1] == {2}  # 0.08 [0.05, 0.11] clears the others
    md = (cmp.write_comparison(c, tmp_path / "out")[0]).read_text()
    line = next(x for x in md.splitlines() if x.startswith("| evaluate: compare.rouge_l.diff_mean"))
    assert "-0.005 [-0.03, 0.02], no clear difference" in line and "**0.08 [0.05, 0.11], better**" in line
    assert "| pretrain: val_loss | nats/token | lower |" in md
    assert "| align: val_rejected_reward | β·log-ratio | lower |" in md
    assert not any("ppl" in f.name for f in c.figures)  # a classifier's exp(loss) is no perplexity
    # overlapping intervals: no best
    extra_rows = cmp.best_of([50.0, 52.0], 1, [(45.0, 55.0), (47.0, 57.0)])
    assert extra_rows == set()


def test_a_rounded_figure_keeps_its_zeros() -> None:
    """The default run's instruct test loss 1.0005 was shown as "1" on the card, as if exact."""
    from llmcore.report.card import fmt

    assert fmt(1.0005) == "1.000"
    assert (fmt(2.627), fmt(0.5), fmt(85.0), fmt(0.33184)) == ("2.627", "0.5", "85", "0.3318")


def test_llmcore_metrics_fits_120_columns_and_all_is_one_flag_away(tmp_path):
    """The README's headline command: one line per stage's key figure within 120 columns; `--all` every number."""
    from llmcore.cli import app as cli

    reports = make_reports(tmp_path / "reports")
    docs = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
    text = "\n".join(p.read_text(encoding="utf-8") for p in docs)
    assert "\nllmcore metrics " in text and "\nllmcore metrics --all " in text  # in the docs' command blocks
    assert "dvc metrics show --drop" not in text and "`dvc metrics show` has them; `--drop" not in text
    result = CliRunner().invoke(cli, ["metrics", "--reports", str(reports)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(map(len, lines)) <= 120, max(lines, key=len)
    heads = [line.split()[:1] + [line[11:57].strip(), line[58:67].strip()] for line in lines if line[:1] != " "]
    assert ["pretrain", "val loss (nats/token)", "3.76"] in heads and ["classify", "test accuracy", "96.0%"] in heads
    assert len(heads) <= 2 * len({h[0] for h in heads})  # one or two figures per stage
    every = CliRunner().invoke(cli, ["metrics", "--reports", str(reports), "--all"]).output.splitlines()
    assert max(map(len, every)) <= 120 and len(every) > 2 * len(lines)
    assert any(line.split() == ["classify", "test_confusion.fp", "7"] for line in every)
    assert any(line.split()[:2] == ["pretrain", "mfu", "†"] or "mfu †" in line for line in every)
    missing = CliRunner().invoke(cli, ["metrics", "--reports", str(tmp_path / "nope")])
    assert missing.exit_code == 1 and missing.output.startswith("error: ") and len(missing.output.splitlines()) == 1


def test_git_tracks_only_declared_uncached_outputs_under_reports():
    """The rule the README states for `git status` after `make pipeline`: under reports/ git tracks only what a stage
    declares as an uncached output in dvc.yaml (metrics, curves, confusion counts, the report and its figures: the
    committed run, which a run on another CPU rewrites) and benchmark records (reports/gpu/)."""
    spec = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text(encoding="utf-8"))
    declared = set()
    for body in spec["stages"].values():
        body = body.get("do", body)
        for kind in ("outs", "metrics", "plots"):
            for item in body.get(kind) or []:
                if isinstance(item, dict):
                    declared |= {path for path, opts in item.items() if (opts or {}).get("cache", True) is False}
    patterns = [re.escape(p).replace(re.escape("${item}"), "[^/]+") + "(/.*)?" for p in declared]
    tracked = subprocess.run(
        ["git", "ls-files", "reports"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    stray = [
        f
        for f in tracked
        if not (f.endswith("/.gitignore") or f.startswith("reports/gpu/") or any(re.fullmatch(p, f) for p in patterns))
    ]
    assert not stray, f"tracked under reports/ but no stage's uncached output: {stray}"
    text = "\n".join(
        p.read_text(encoding="utf-8") for p in [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
    )
    assert "`git status` after `make pipeline`" in text  # the docs say which files a run rewrites, and why
