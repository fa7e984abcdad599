"""The evaluate stage (judge = llmcore's own Ollama-compatible server on loopback); the report: tests/test_report.py."""

from __future__ import annotations

import json
import shutil
import socket
import threading

import pytest
import torch
import yaml
from typer.testing import CliRunner

from llmcore.models.config import ModelConfig
from llmcore.models.gpt import GPT
from llmcore.serve.app import make_server
from llmcore.serve.models import ModelHandle
from llmcore.text.tokenizer import Tokenizer
from llmcore.weights.weight_file import save_checkpoint
from stages import evaluate, report
from tests.conftest import REPO_ROOT
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
    """`llmcore serve` as the Ollama judge: "judge" answers 85 to everything, "prose" answers
    prose with a number in it (the parser once took "10 km" for a score of 10)."""
    root = tmp_path_factory.mktemp("judges")
    models = {
        "judge:latest": save_fixed_reply_model(root / "judge", "85"),
        "prose:latest": save_fixed_reply_model(root / "prose", "10 km"),
    }
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
    args = [
        "--params",
        str(tmp_path / "params.yaml"),
        "--responses",
        str(tmp_path / "responses.json"),
        "--model-dir",
        str(model_dir),
        "--cache",
        str(tmp_path / "cache.jsonl"),
        "--reports",
        str(tmp_path / "reports"),
    ]
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
    facts = json.loads((tmp_path / "reports/facts.json").read_text())
    assert facts["judge_status"] == "scored" and facts["judge_model"] == "judge:latest"
    assert len(facts["judge_digest"]) == 64 and facts["judge_format"] == "schema"  # llmcore serve takes a schema
    assert all(isinstance(v, (int, float)) or v is None for v in metrics.values())  # DVC metrics: numbers only
    assert (metrics["n_scored"], metrics["n_refused"], metrics["n_error"]) == (len(RESPONSES), 0, 0)
    assert metrics["mean"] == 85.0 and metrics["ci95_low"] == metrics["ci95_high"] == 85.0
    records = [json.loads(line) for line in (tmp_path / "reports/scores.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["0", "1", "2"] and {r["raw"] for r in records} == {'{"score": 85}'}
    # judge-free metrics
    assert metrics["exact_match"] == pytest.approx(1 / 3, abs=1e-3) and metrics["empty_responses"] == 1
    assert metrics["reference_loss"] > 0 and metrics["reference_perplexity"] > 1
    # answering with the prompt itself: the baseline, with the paired interval of instruct - copy for the card's verdict
    assert metrics["copy_prompt_diff_ci95_low"] <= metrics["rouge_l"] - metrics["copy_prompt_rouge_l"]
    assert metrics["rouge_l"] - metrics["copy_prompt_rouge_l"] <= metrics["copy_prompt_diff_ci95_high"]

    again = run_evaluate(tmp_path, model_dir)  # the cache answers everything that was parsed
    assert again.exit_code == 0
    assert json.loads((tmp_path / "reports/facts.json").read_text())["n_cached"] >= metrics["n_scored"]


def test_a_judge_that_answers_prose_fails_required_and_is_recorded_as_failed(tmp_path, model_dir, judge_url):
    # asked by schema, even this judge answers {"score": N}: its grammar leaves no room for prose
    asked = tmp_path / "schema"
    asked.mkdir()
    write_params(asked, host=judge_url, model="prose")
    assert run_evaluate(asked, model_dir).exit_code == 0
    records = [json.loads(line) for line in (asked / "reports/scores.jsonl").read_text().splitlines()]
    assert {r["status"] for r in records} == {"scored"} and all(r["raw"].startswith('{"score": ') for r in records)

    # asked in prose (schema: false): reachable, has the model, answers every request, but nothing it says is a score
    write_params(tmp_path, host=judge_url, model="prose", schema=False)
    result = run_evaluate(tmp_path, model_dir)
    assert result.exit_code == 1
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert error == [
        f"error: the judge 'prose:latest' at {judge_url} scored 0 of 3 responses (3 refused: not a bare 0-100 "
        "integer or score: N, 0 failed), "
        "under evaluate.judge.min_scored = 0.9: does it answer with a number?"
    ], result.output
    assert not (tmp_path / "reports/metrics.json").exists()
    assert {json.loads(line)["raw"] for line in (tmp_path / "reports/scores.jsonl").read_text().splitlines()} == {
        "10 km"
    }  # its replies are kept to look at

    write_params(tmp_path, host=judge_url, model="prose", mode="skip_if_unreachable", schema=False)
    result = run_evaluate(tmp_path, model_dir)
    assert result.exit_code == 0, result.output
    assert "warning: judge failed: the judge 'prose:latest'" in result.output
    metrics = json.loads((tmp_path / "reports/metrics.json").read_text())
    facts = json.loads((tmp_path / "reports/facts.json").read_text())
    assert facts["judge_status"] == "failed" and metrics["mean"] is None and facts["judge_format"] == "prose"
    assert (metrics["n_scored"], metrics["n_refused"]) == (0, 3) and "0 of 3" in facts["judge_skip_reason"]
    report_md = render_report(tmp_path)
    assert "| evaluate | judge mean score (0-100) | failed |" in report_md
    assert "- evaluate, judge mean score (0-100): failed: the judge 'prose:latest'" in report_md

    write_params(tmp_path, host=judge_url, model="prose", mode="off")  # never asked
    assert run_evaluate(tmp_path, model_dir).exit_code == 0
    assert json.loads((tmp_path / "reports/facts.json").read_text())["judge_status"] == "off"
    records = [json.loads(line) for line in (tmp_path / "reports/scores.jsonl").read_text().splitlines()]
    assert {r["status"] for r in records} == {"skipped"} and len(records) == 3  # never an empty file

    # the threshold is a param with a floor: 0 (accept whatever the judge says) is refused before anything runs
    write_params(tmp_path, host=judge_url, model="prose", min_scored=0.0)
    result = run_evaluate(tmp_path, model_dir)
    assert result.exit_code == 1 and "error: evaluate.judge.min_scored: expected a fraction in [0.5, 1]" in (
        result.output
    )


def render_report(tmp_path) -> str:
    """The report over the evaluate stage's outputs in tmp_path/reports."""
    reports = tmp_path / "reports_all"
    shutil.rmtree(reports, ignore_errors=True)
    shutil.copytree(tmp_path / "reports", reports / "evaluate")
    (tmp_path / "p.yaml").write_text("evaluate: {judge_mode: skip_if_unreachable}\n")
    args = ["--params", str(tmp_path / "p.yaml"), "--reports", str(reports), "--dvc-yaml", str(REPO_ROOT / "dvc.yaml")]
    result = CliRunner().invoke(report.app, args)
    assert result.exit_code == 0, result.output
    return (reports / "report.md").read_text()


def test_min_scored_is_checked_and_errors_name_the_full_key(tmp_path, model_dir):
    write_params(tmp_path, min_scored=1.5)
    result = run_evaluate(tmp_path, model_dir)
    assert result.exit_code == 1 and "error: evaluate.judge.min_scored: expected a fraction in [0.5, 1], got 1.5" in (
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
    facts = json.loads((tmp_path / "reports/facts.json").read_text())
    assert facts["judge_status"] == "skipped" and "ollama serve" in facts["judge_skip_reason"]
    # every item is accounted for, and the output is never empty (DVC would warn "'scores.jsonl' is empty")
    records = [json.loads(line) for line in (tmp_path / "reports/scores.jsonl").read_text().splitlines()]
    assert [(r["id"], r["status"], r["score"]) for r in records] == [(str(i), "skipped", None) for i in range(3)]

    # the report card says so, with the reason
    md = render_report(tmp_path)
    assert "| evaluate | judge mean score (0-100) | skipped |" in md and "ollama serve" in md
    assert "- evaluate, judge mean score (0-100): skipped: cannot reach" in md
