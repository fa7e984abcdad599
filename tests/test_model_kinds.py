"""Every command that loads a language model refuses a classifier folder with one line saying what it holds
(serve and export are checked in test_serve.py and test_import_stage.py), and `classify predict` refuses a
language model the same way."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from llmcore.cli import app as cli
from llmcore.models.classifier import GPTClassifier
from llmcore.models.config import ModelConfig
from llmcore.models.gpt import GPT
from llmcore.text.tokenizer import ENDOFTEXT, GPT2_PATTERN, Tokenizer
from llmcore.weights.model_dir import save_classifier, save_model_dir
from stages import classify, evaluate, import_weights, instruct
from tests.conftest import REPO_ROOT


def byte_tokenizer() -> Tokenizer:
    return Tokenizer("bpe", "bytes", {ENDOFTEXT: 256}, ranks={bytes([b]): b for b in range(256)}, pattern=GPT2_PATTERN)


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(
        ModelConfig.from_preset("gpt2-tiny", n_layers=1, emb_dim=32, n_heads=2, vocab_size=257, context_length=32)
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """``<root>/clf`` (a classifier folder) and ``<root>/lm`` (a language model), as the stages write them."""
    root = tmp_path_factory.mktemp("models")
    save_classifier(root / "clf", GPTClassifier(tiny_gpt(), num_classes=2), byte_tokenizer(), ["ham", "spam"])
    save_model_dir(root / "lm", tiny_gpt(), byte_tokenizer())
    return root


def error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def refusal(models, use: str) -> str:
    return (
        f"error: {models / 'clf' / 'model.safetensors'}: a 'classify' checkpoint, not a causal language model; "
        f"{use} needs one (a pretrain, import or instruct model folder)"
    )


def test_ask_refuses_a_classifier(models):
    result = CliRunner().invoke(cli, ["ask", "hi", "--model", str(models / "clf")])
    assert error_line(result) == refusal(models, "ask")


@pytest.mark.parametrize("stage", [classify, instruct])
def test_fine_tunes_refuse_a_classifier_base_model_before_any_work(tmp_path, models, stage):
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["base_model"] = "clf"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    args = [
        "--params",
        str(tmp_path / "params.yaml"),
        "--models-dir",
        str(models),
        "--out",
        str(tmp_path / "out"),
        "--reports",
        str(tmp_path / "reports"),
        "--work-dir",
        str(tmp_path / "work"),
    ]
    name = stage.__name__.rsplit(".", 1)[-1]
    args += ["--data", str(tmp_path / "no-data")] if name == "classify" else ["--raw-dir", str(tmp_path / "no-raw")]
    result = CliRunner().invoke(stage.app, args)  # no data there: the base model is checked first
    assert error_line(result) == refusal(models, f"the {name} stage's base_model")
    assert not (tmp_path / "out").exists() and not (tmp_path / "reports").exists()


def test_evaluate_refuses_a_classifier_for_the_reference_loss(tmp_path, models):
    (tmp_path / "params.yaml").write_text("evaluate: {judge_mode: 'off'}\n")
    entries = [{"instruction": "Say hi.", "input": "", "output": "Hi!", "model_response": "Hi."}]
    (tmp_path / "responses.json").write_text(json.dumps(entries))
    args = [
        "--params",
        str(tmp_path / "params.yaml"),
        "--responses",
        str(tmp_path / "responses.json"),
        "--model-dir",
        str(models / "clf"),
        "--cache",
        str(tmp_path / "judge.jsonl"),
        "--reports",
        str(tmp_path / "reports"),
    ]
    result = CliRunner().invoke(evaluate.app, args)
    assert error_line(result) == refusal(models, "the loss on the reference answers (evaluate)")
    assert not (tmp_path / "reports" / "metrics.json").exists()


def test_import_says_an_llmcore_folder_is_not_a_hugging_face_one(tmp_path, models):
    (tmp_path / "params.yaml").write_text("import: {}\n")
    args = [
        "--name",
        "mine",
        "--params",
        str(tmp_path / "params.yaml"),
        "--from-dir",
        str(models / "clf"),
        "--raw-dir",
        str(tmp_path / "raw"),
        "--cache-dir",
        str(tmp_path / "hub"),
        "--out",
        str(tmp_path / "out"),
        "--reports",
        str(tmp_path / "reports"),
    ]
    result = CliRunner().invoke(import_weights.app, args)
    assert error_line(result).startswith(f"error: {models / 'clf'}: an llmcore model folder, not a Hugging Face one")


def test_classify_predict_refuses_a_language_model(models):
    result = CliRunner().invoke(cli, ["classify", "win a prize", "--model", str(models / "lm")])
    assert error_line(result) == (
        f"error: {models / 'lm' / 'model.safetensors'}: a causal language model, not a classifier; this needs a "
        "folder written by the classify stage (data/models/classify)"
    )
