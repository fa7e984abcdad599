"""The evaluate stage (judge = llmcore's own Ollama-compatible server on loopback) and the report stage."""

from __future__ import annotations

import json
import socket
import threading

import pytest
import torch
import yaml
from typer.testing import CliRunner

from llmcore.eval.report import Curve, svg_lines
from llmcore.models.config import ModelConfig
from llmcore.models.gpt import GPT
from llmcore.serve.app import make_server
from llmcore.serve.models import ModelHandle
from llmcore.text.tokenizer import Tokenizer
from llmcore.weights.weight_file import save_checkpoint
from stages import evaluate, report
from tests.fixed_reply import save_fixed_reply_model

TEXT = "Below is an instruction. ### Response: The capital of France is Paris. Score: 85 " * 20

RESPONSES = [
    {"instruction": "Name the capital of France.", "input": "", "output": "Paris.", "model_response": "Paris."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "model_response": "It is 6."},
    {"instruction": "Say hi.", "input": "", "output": "Hi!", "model_response": ""},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("instruct")
    tok = Tokenizer.train(TEXT, 300)
    torch.manual_seed(0)
    save_checkpoint(path / "model.safetensors", GPT(ModelConfig.from_preset("llama3-tiny", vocab_size=tok.vocab_size)))
    tok.save(path / "tokenizer.json")
    return path


@pytest.fixture(scope="module")
def judge_url(tmp_path_factory):
    """`llmcore serve` as the Ollama judge: "judge" answers 85 to everything, "prose" answers a word."""
    root = tmp_path_factory.mktemp("judges")
    models = {"judge:latest": save_fixed_reply_model(root / "judge", "85"),
              "prose:latest": save_fixed_reply_model(root / "prose", "Fine")}  # fmt: skip
    server = make_server({name: ModelHandle.load(path, template="raw") for name, path in models.items()}, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.url
    server.shutdown()


def write_params(tmp_path, **judge):
    mode = judge.pop("mode", "required")
    params = {"evaluate": {"judge_mode": mode, "judge": {"model": "judge", "timeout": 20, "retries": 0, **judge}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "responses.json").write_text(json.dumps(RESPONSES))
    return tmp_path / "params.yaml"


def run_evaluate(tmp_path, model_dir):
    args = ["--params", str(tmp_path / "params.yaml"), "--responses", str(tmp_path / "responses.json"),
            "--model-dir", str(model_dir), "--cache", str(tmp_path / "cache.jsonl"),
            "--reports", str(tmp_path / "reports")]  # fmt: skip
    return CliRunner().invoke(evaluate.app, args)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_evaluate_with_llmcore_serve_as_judge(tmp_path, model_dir, judge_url):
    write_params(tmp_path, host=judge_url)
    result = run_evaluate(tmp_path, model_dir)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "reports/metrics.json").read_text())
    assert metrics["judge_status"] == "scored" and metrics["judge_model"] == "judge:latest"
    assert len(metrics["judge_digest"]) == 64
    assert (metrics["n_scored"], metrics["n_unparsable"], metrics["n_error"]) == (len(RESPONSES), 0, 0)
    assert metrics["mean"] == 85.0 and metrics["ci95_low"] == metrics["ci95_high"] == 85.0
    records = [json.loads(line) for line in (tmp_path / "reports/scores.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["0", "1", "2"] and {r["raw"] for r in records} == {"85"}
    # judge-free metrics
    assert metrics["exact_match"] == pytest.approx(1 / 3, abs=1e-3) and metrics["empty_responses"] == 1
    assert metrics["reference_loss"] > 0 and metrics["reference_perplexity"] > 1

    again = run_evaluate(tmp_path, model_dir)  # the cache answers everything that was parsed
    assert again.exit_code == 0
    assert json.loads((tmp_path / "reports/metrics.json").read_text())["n_cached"] >= metrics["n_scored"]


def test_a_judge_that_answers_prose_fails_required_and_is_recorded_as_failed(tmp_path, model_dir, judge_url):
    # reachable, has the model, answers every request: but nothing it says is a score
    write_params(tmp_path, host=judge_url, model="prose")
    result = run_evaluate(tmp_path, model_dir)
    assert result.exit_code == 1
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert error == [
        f"error: the judge 'prose:latest' at {judge_url} scored 0 of 3 responses (3 unparsable, 0 failed), "
        "under evaluate.judge.min_scored = 0.9: does it answer with a number?"
    ], result.output
    assert not (tmp_path / "reports/metrics.json").exists()
    assert {json.loads(line)["raw"] for line in (tmp_path / "reports/scores.jsonl").read_text().splitlines()} == {
        "Fine"
    }  # its replies are kept to look at

    write_params(tmp_path, host=judge_url, model="prose", mode="skip_if_unreachable")
    result = run_evaluate(tmp_path, model_dir)
    assert result.exit_code == 0, result.output
    assert "warning: judge failed: the judge 'prose:latest'" in result.output
    metrics = json.loads((tmp_path / "reports/metrics.json").read_text())
    assert metrics["judge_status"] == "failed" and metrics["mean"] is None
    assert (metrics["n_scored"], metrics["n_unparsable"]) == (0, 3) and "0 of 3" in metrics["judge_skip_reason"]
    report_md = render_report(tmp_path, metrics)
    assert "did not score this run (failed): the judge 'prose:latest'" in report_md.splitlines()[2]

    write_params(tmp_path, host=judge_url, model="prose", mode="off")  # never asked
    assert run_evaluate(tmp_path, model_dir).exit_code == 0
    assert json.loads((tmp_path / "reports/metrics.json").read_text())["judge_status"] == "off"
    assert (tmp_path / "reports/scores.jsonl").read_text() == ""

    # the threshold is a param: 0 accepts whatever the judge says
    write_params(tmp_path, host=judge_url, model="prose", min_scored=0.0)
    result = run_evaluate(tmp_path, model_dir)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "reports/metrics.json").read_text())["judge_status"] == "scored"


def render_report(tmp_path, evaluate_metrics: dict) -> str:
    reports = tmp_path / "reports_all"
    (reports / "evaluate").mkdir(parents=True, exist_ok=True)
    (reports / "evaluate/metrics.json").write_text(json.dumps(evaluate_metrics))
    (tmp_path / "p.yaml").write_text("evaluate: {judge_mode: skip_if_unreachable}\n")
    result = CliRunner().invoke(report.app, ["--params", str(tmp_path / "p.yaml"), "--reports", str(reports)])
    assert result.exit_code == 0, result.output
    return (reports / "report.md").read_text()


def test_min_scored_is_checked_and_errors_name_the_full_key(tmp_path, model_dir):
    write_params(tmp_path, min_scored=1.5)
    result = run_evaluate(tmp_path, model_dir)
    assert result.exit_code == 1 and "error: evaluate.judge.min_scored: expected a fraction in [0, 1], got 1.5" in (
        result.output
    )
    write_params(tmp_path, prompt_template="Score {response}")
    result = run_evaluate(tmp_path, model_dir)
    assert "error: evaluate.judge.prompt_template: lacks the placeholder(s) {input}, {reference}" in result.output


def test_unreachable_judge_fails_with_fix_or_is_recorded_as_skipped(tmp_path, model_dir):
    host = f"http://127.0.0.1:{closed_port()}"
    write_params(tmp_path, host=host)
    result = run_evaluate(tmp_path, model_dir)
    assert result.exit_code == 1
    assert host in result.output and "ollama serve" in result.output
    assert not (tmp_path / "reports/metrics.json").exists()

    write_params(tmp_path, host=host, mode="skip_if_unreachable")
    result = run_evaluate(tmp_path, model_dir)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "reports/metrics.json").read_text())
    assert metrics["judge_status"] == "skipped" and "ollama serve" in metrics["judge_skip_reason"]

    # the report says so at the top
    reports = tmp_path / "reports_all"
    (reports / "evaluate").mkdir(parents=True)
    (reports / "evaluate/metrics.json").write_text(json.dumps(metrics))
    (tmp_path / "p.yaml").write_text("evaluate: {judge_mode: skip_if_unreachable}\n")
    result = CliRunner().invoke(report.app, ["--params", str(tmp_path / "p.yaml"), "--reports", str(reports)])
    assert result.exit_code == 0, result.output
    md = (reports / "report.md").read_text()
    assert md.splitlines()[2].startswith("> **Judge skipped.**")
    assert "Judge skipped" in (reports / "report.html").read_text()


def test_report_gathers_metrics_curves_confusion_and_examples(tmp_path):
    r = tmp_path / "reports"
    (r / "pretrain/live/plots/metrics/train").mkdir(parents=True)
    (r / "pretrain/metrics.json").write_text(json.dumps({"val_loss": 4.2, "baselines": {"unigram_loss": 6.1}}))
    (r / "pretrain/live/plots/metrics/train/loss.tsv").write_text("timestamp\tstep\tloss\n1\t0\t7.0\n2\t10\t5.5\n")
    (r / "classify").mkdir()
    (r / "classify/metrics.json").write_text(json.dumps({"test_accuracy": 0.95}))
    (r / "classify/confusion.csv").write_text("actual,predicted\nspam,spam\nham,ham\nham,spam\n")
    (r / "evaluate").mkdir()
    (r / "evaluate/metrics.json").write_text(json.dumps({"judge_status": "scored", "mean": 50.0}))
    (r / "evaluate/score_histogram.csv").write_text("bin,count\n0-10,1\n90-100,1\n")
    (r / "evaluate/scores.jsonl").write_text(
        '{"id": "0", "score": 90, "status": "scored"}\n{"id": "1", "score": 5, "status": "scored"}\n'
        '{"id": "2", "score": null, "status": "unparsable"}\n'
    )
    (r / "instruct").mkdir()
    (r / "instruct/responses.json").write_text(json.dumps(RESPONSES))
    (tmp_path / "params.yaml").write_text("model: {preset: llama3-tiny}\n")
    result = CliRunner().invoke(report.app, ["--params", str(tmp_path / "params.yaml"), "--reports", str(r)])
    assert result.exit_code == 0, result.output
    md = (r / "report.md").read_text()
    assert "| model.preset | llama3-tiny |" in md
    assert "| baselines.unigram_loss | 6.1 |" in md
    assert "| ham | 1 | 1 |" in md  # confusion row: actual ham -> predicted ham 1, spam 1
    assert "95.67% accuracy" in md  # the book's figure beside ours
    best = md.index("## Best scored responses")
    assert "**90**" in md[best:] and "Name the capital of France." in md[best:]
    html = (r / "report.html").read_text()
    assert html.count("<svg") == 2  # loss curve + score histogram
    assert "<script" not in html and "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_svg_lines_skips_non_finite_values():
    svg = svg_lines("loss", [Curve("a", [0, 1, 2], [1.0, float("nan"), 0.5])])
    assert svg.count("<polyline") == 1 and "nan" not in svg


def chromium_console(page, screenshot):
    """Render ``page`` in headless Chromium; returns the page's console lines (errors included)."""
    import os
    import shutil
    import subprocess

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("chromium not installed (.ci/run installs Debian's chromium)")
        pytest.skip("chromium not installed (apt-get install chromium)")
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={screenshot.parent / 'chromium-profile'}", "--enable-logging=stderr", "--log-level=0",
           "--window-size=1100,1600", f"--screenshot={screenshot}", page.as_uri()]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    return [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]


def test_html_report_renders_in_headless_chromium_without_console_errors(tmp_path):
    test_report_gathers_metrics_curves_confusion_and_examples(tmp_path)
    shot = tmp_path / "report.png"
    assert chromium_console(tmp_path / "reports/report.html", shot) == []
    assert shot.stat().st_size > 10_000  # a real rendering, not a blank page
    # the check can fail: a page with a script error is caught
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>undefined_fn();</script></body></html>")
    assert any("undefined_fn" in line for line in chromium_console(bad, tmp_path / "bad.png"))
