"""The `classify` stage end to end on a tiny model: outputs, learning, LoRA export, `predict`, bad input.

The base model is a 2-layer GPT over raw bytes (257 ids), built here; the data is a small synthetic SMS
collection in the real file's format whose spam shouts about prizes and whose ham chats, so a few dozen
steps must separate them and the test can check the predictions, not just that files exist.
"""

from __future__ import annotations

import csv
import json
import random
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from llmcore.cli import app as cli
from llmcore.data.datasets import load_spam_table
from llmcore.data.spam import balance_classes, split_table
from llmcore.models.classifier import predict_proba
from llmcore.models.config import ModelConfig
from llmcore.models.gpt import GPT
from llmcore.text.bpe import ENDOFTEXT, GPT2_PATTERN
from llmcore.text.tokenizer import Tokenizer
from llmcore.weights.model_dir import load_classifier, save_model_dir
from llmcore.weights.weight_file import load_state, read_metadata
from stages.classify import app
from tests.resume import curves, kill_after_first_checkpoint, without_timings

N_HAM, N_SPAM = 60, 30  # balanced to 30 + 30 -> 42 train / 6 val / 12 test with the book's fractions


def byte_tokenizer() -> Tokenizer:
    return Tokenizer("bpe", "bytes", {ENDOFTEXT: 256}, ranks={bytes([b]): b for b in range(256)}, pattern=GPT2_PATTERN)


def make_rows() -> list[str]:
    rng = random.Random(0)
    words = ["ok", "see", "you", "later", "home", "soon", "lunch", "call", "me", "when", "free", "tonight"]
    ham = [" ".join(rng.choices(words, k=rng.randint(2, 6))) for _ in range(N_HAM)]
    spam = [f"WIN {rng.randint(100, 999)} CASH!!! TXT {rng.randint(10000, 99999)} NOW" for _ in range(N_SPAM)]
    rows = [f"ham\t{t}" for t in ham] + [f"spam\t{t}" for t in spam]
    rng.shuffle(rows)
    return rows


def write_params(path: Path, **classify) -> Path:
    params = {
        "base_model": "base",
        # one thread: tiny matmuls gain nothing from two, and a busy machine makes OpenMP spin (100x slower)
        "hardware": {"device": "cpu", "threads": 1},
        "classify": {
            "trainable": "all",
            "train": {
                "batch_size": 8,
                "lr": 0.003,
                "min_lr": 0.0003,
                "warmup_steps": 5,
                "max_steps": 40,
                "eval_every": 20,
                "eval_batches": None,
                "checkpoint_every": 40,
                "log_every": 10,
                "seed": 1,
            },
            **classify,
        },
    }
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """spam.tsv (the synthetic collection) and models/base/ (a random 2-layer byte-level GPT)."""
    root = tmp_path_factory.mktemp("classify")
    (root / "spam.tsv").write_text("\n".join(make_rows()) + "\n", encoding="utf-8")
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("gpt2-tiny", vocab_size=257, context_length=64, emb_dim=32, n_layers=2, n_heads=2)
    save_model_dir(root / "models" / "base", GPT(cfg), byte_tokenizer())
    return root


def stage_args(root: Path, params: Path, data: Path | None = None, out: str = "classify", reports: str = "reports"):
    return [
        "--params",
        str(params),
        "--data",
        str(data or root / "spam.tsv"),
        "--models-dir",
        str(root / "models"),
        "--out",
        str(root / "models" / out),
        "--reports",
        str(root / reports),
        "--work-dir",
        str(root / f"work-{out}"),
    ]


def invoke(root: Path, params: Path, data: Path | None = None, out: str = "classify", reports: str = "reports"):
    return CliRunner().invoke(app, stage_args(root, params, data, out, reports))


@pytest.fixture(scope="module")
def trained(workspace: Path) -> Path:
    result = invoke(workspace, write_params(workspace / "params.yaml"))
    assert result.exit_code == 0, result.output
    return workspace


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_stage_outputs(trained: Path) -> None:
    metrics = json.loads((trained / "reports" / "metrics.json").read_text())
    assert (metrics["train_messages"], metrics["val_messages"], metrics["test_messages"]) == (42, 6, 12)
    facts = json.loads((trained / "reports" / "facts.json").read_text())
    assert metrics["steps"] == 40 and facts["trainable"] == "all" and facts["base_model"] == "base"
    train = split_table(balance_classes(load_spam_table(trained / "spam.tsv"), 123), (0.7, 0.1), 123)[0]
    assert metrics["max_length"] == max(len(t.encode()) for t in train.text)  # longest training message, in bytes
    assert metrics["train"]["accuracy"] == 1.0 and metrics["test"]["accuracy"] == 1.0  # it learned the toy task
    assert set(metrics["test"]) == {"accuracy", "precision", "recall", "f1"}
    assert sum(metrics["test_confusion"].values()) == 12

    predictions = read_csv(trained / "reports" / "predictions.csv")
    assert len(predictions) == 12 and set(predictions[0]) == {"text", "label", "prediction", "probability"}
    texts = {r.split("\t")[1] for r in make_rows()}
    assert all(p["text"] in texts and p["label"] == p["prediction"] for p in predictions)
    assert all(0.5 <= float(p["probability"]) <= 1.0 for p in predictions)
    confusion = read_csv(trained / "reports" / "confusion.csv")
    assert [(c["actual"], c["predicted"]) for c in confusion] == [(p["label"], p["prediction"]) for p in predictions]

    curves = trained / "reports" / "live" / "plots" / "metrics"
    for curve, steps in (("train/loss", [10, 20, 30, 40]), ("val/loss", [0, 20, 40]), ("val/accuracy", [0, 20, 40])):
        rows = [line.split("\t") for line in (curves / f"{curve}.tsv").read_text().splitlines()]
        assert rows[0] == ["step", curve.split("/")[1]] and [int(r[0]) for r in rows[1:]] == steps
    assert float(rows[-1][1]) == metrics["val"]["accuracy"] == 1.0  # the last val/accuracy is the final model's

    model_dir = trained / "models" / "classify"
    meta = read_metadata(model_dir / "model.safetensors")
    assert (meta["task"], meta["pooling"], meta["trainable"], meta["base_model"]) == (
        "classify",
        "last_token",
        "all",
        "base",
    )
    model, tok, labels = load_classifier(model_dir)
    assert labels == ["ham", "spam"] and tok.vocab_size == 257 and model.cfg.n_layers == 2


def test_predict_from_arguments_and_stdin(trained: Path) -> None:
    model = str(trained / "models" / "classify")
    result = CliRunner().invoke(cli, ["classify", "--model", model, "WIN 555 CASH!!! TXT 12345 NOW", "see you soon"])
    assert result.exit_code == 0, result.output
    lines = [line.split("\t") for line in result.output.splitlines()]
    assert [(label, text) for label, _, text in lines] == [
        ("spam", "WIN 555 CASH!!! TXT 12345 NOW"),
        ("ham", "see you soon"),
    ]
    assert all(0.5 <= float(p) <= 1.0 for _, p, _ in lines)
    piped = CliRunner().invoke(cli, ["classify", "--model", model], input="see you soon\n\nWIN 1 CASH!!! TXT 2 NOW\n")
    assert piped.exit_code == 0 and [line.split("\t")[0] for line in piped.output.splitlines()] == ["ham", "spam"]
    assert piped.output.splitlines()[0] == lines[1][0] + "\t" + lines[1][1] + "\tsee you soon"  # same probability
    empty = CliRunner().invoke(cli, ["classify", "--model", model], input="  \n")
    assert empty.exit_code == 1 and "error: classify: no text" in empty.output
    missing = CliRunner().invoke(cli, ["classify", "--model", str(trained / "nowhere"), "hi"])
    assert missing.exit_code == 1 and "nowhere: no such model folder" in missing.output


def test_lora_stage_exports_a_merged_model(workspace: Path) -> None:
    params = write_params(workspace / "lora.yaml", trainable="lora", lora={"rank": 2, "alpha": 4.0})
    result = invoke(workspace, params, out="lora", reports="reports-lora")
    assert result.exit_code == 0, result.output
    metrics = json.loads((workspace / "reports-lora" / "metrics.json").read_text())
    C, H, L = 32, 128, 2
    assert metrics["trainable_params"] == L * 2 * ((C + 3 * C) + (C + C) + (C + H) + (H + C)) + 2 * C + 2
    state = load_state(workspace / "models" / "lora" / "model.safetensors")
    assert not any("lora_" in k or ".base." in k for k in state)  # merged: the base architecture's tensors
    assert {"cls_head.weight", "cls_head.bias", "blocks.0.attn.qkv.weight"} <= set(state)
    base = load_state(workspace / "models" / "base" / "model.safetensors")
    assert not torch.equal(state["blocks.0.attn.qkv.weight"], base["blocks.0.attn.qkv.weight"])  # adapters folded in
    assert torch.equal(state["tok_emb.weight"], base["tok_emb.weight"])  # what LoRA does not adapt stays frozen
    assert metrics["test"]["accuracy"] == 1.0
    # the exported (merged) model gives the probabilities the LoRA model reported for the test split
    model, tok, _ = load_classifier(workspace / "models" / "lora")
    rows = read_csv(workspace / "reports-lora" / "predictions.csv")
    probs = predict_proba(model, [tok.encode(r["text"]) for r in rows], tok.eot_id).max(-1).values
    assert torch.allclose(probs, torch.tensor([float(r["probability"]) for r in rows]), atol=1e-5)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("spma\tWIN NOW", "row 5: unknown label 'spma' (expected ham or spam)"),
        ("ham\t   ", "row 5: empty text"),
        ("ham WIN NOW", "row 5: missing column (expected 'label<TAB>text')"),
    ],
)
def test_malformed_data_fails_with_the_row(workspace: Path, row: str, message: str) -> None:
    rows = make_rows()
    rows[4] = row
    bad = workspace / "bad.tsv"
    bad.write_text("\n".join(rows) + "\n", encoding="utf-8")
    result = invoke(workspace, write_params(workspace / "bad.yaml"), data=bad, out="bad", reports="reports-bad")
    assert result.exit_code == 1
    assert result.output.strip() == f"error: {bad}: {message}"  # one line, file and row named
    assert not (workspace / "models" / "bad").exists() and not (workspace / "reports-bad").exists()


@pytest.mark.parametrize(
    ("classify", "message"),
    [
        ({"trainable": "qlora"}, "classify.trainable: expected one of head|last_blocks|all|lora, got 'qlora'"),
        ({"trainable": "last_blocks", "last_blocks": 3}, "classify.last_blocks: expected 1..2"),
        ({"trainable": "lora", "lora": {"targets": ["attn.qkvv"]}}, "classify.lora.targets: 'attn.qkvv' matches no"),
        ({"train_fraction": 0.9, "val_fraction": 0.2}, "classify.val_fraction: train_fraction + val_fraction must be"),
        ({"max_length": 500}, "classify.max_length: 500 exceeds the context length 64 of base"),
        ({"batch": 8}, "classify.batch: unknown key"),
    ],
)
def test_bad_params_fail_with_the_key(workspace: Path, classify: dict, message: str) -> None:
    result = invoke(workspace, write_params(workspace / "bad.yaml", **classify), out="bad", reports="reports-bad")
    assert result.exit_code == 1 and result.output.startswith(f"error: {message}"), result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (workspace / "models" / "bad").exists() and not (workspace / "reports-bad").exists()


def test_missing_base_model(workspace: Path) -> None:
    params = write_params(workspace / "nobase.yaml")
    params.write_text(params.read_text().replace("base_model: base", "base_model: pretrain"))
    result = invoke(workspace, params, out="bad", reports="reports-bad")
    assert result.exit_code == 1 and "pretrain: no such model folder" in result.output


def test_kill_9_then_rerun_writes_the_bytes_of_an_uninterrupted_run(workspace: Path, tmp_path: Path) -> None:
    """SIGKILL mid-training, then the same command again: it resumes from the last checkpoint and every output
    (weights, tokenizer, predictions.csv, confusion.csv, metrics but timings, curves) equals a run never killed."""
    train = {
        "batch_size": 8,
        "lr": 0.003,
        "min_lr": 0.0003,
        "warmup_steps": 5,
        "max_steps": 50,
        "eval_every": 25,
        "eval_batches": None,
        "checkpoint_every": 10,
        "log_every": 10,
        "seed": 1,
    }
    params = write_params(tmp_path / "params.yaml", train=train)
    result = invoke(workspace, params, out="ref", reports="ref-reports")
    assert result.exit_code == 0, result.output
    args = stage_args(workspace, params, out="killed", reports="killed-reports")
    cmd = [sys.executable, "-m", "stages.classify", *args]
    saved = kill_after_first_checkpoint(cmd, workspace / "work-killed", tmp_path / "killed.log")
    assert saved[-1].name < "step_00000050" and not (workspace / "models" / "killed").exists()

    result = invoke(workspace, params, out="killed", reports="killed-reports")
    assert result.exit_code == 0, result.output
    assert f"resuming from {saved[-1]}" in result.output
    ref, run = workspace / "models" / "ref", workspace / "models" / "killed"
    for name in ("model.safetensors", "tokenizer.json"):
        assert (run / name).read_bytes() == (ref / name).read_bytes(), name
    for name in ("predictions.csv", "confusion.csv"):
        assert (workspace / "killed-reports" / name).read_bytes() == (workspace / "ref-reports" / name).read_bytes()
    metrics = [json.loads((workspace / d / "metrics.json").read_text()) for d in ("ref-reports", "killed-reports")]
    assert without_timings(metrics[1]) == without_timings(metrics[0])
    assert curves(workspace / "killed-reports") == curves(workspace / "ref-reports")


def test_rerun_resumes_only_its_own_run_and_fresh_env_trains_again(workspace: Path, tmp_path: Path, monkeypatch):
    """`dvc repro -f -s classify` reruns the command with the same params: the finished checkpoint is reloaded, not
    trained again, unless LLMCORE_FRESH=1 (DVC's -f does not reach the stage). A changed param or base tokenizer
    never resumes the stale run, and a checkpoint cut short is skipped (no SafetensorError on every rerun); each case
    says what it does in one line."""
    monkeypatch.delenv("LLMCORE_FRESH", raising=False)
    train = {
        "batch_size": 8,
        "lr": 0.003,
        "min_lr": 0.0003,
        "warmup_steps": 2,
        "max_steps": 6,
        "eval_every": 6,
        "eval_batches": None,
        "checkpoint_every": 6,
        "log_every": 6,
        "seed": 1,
    }
    params = write_params(tmp_path / "params.yaml", train=train)
    first = invoke(workspace, params, out="rerun", reports="rerun-reports")
    assert first.exit_code == 0 and "resuming" not in first.output, first.output
    weights = (workspace / "models" / "rerun" / "model.safetensors").read_bytes()
    work = workspace / "work-rerun"

    again = invoke(workspace, params, out="rerun", reports="rerun-reports")
    assert again.exit_code == 0 and f"resuming from {work / 'step_00000006'}" in again.output, again.output

    newest = work / "step_00000006" / "model.safetensors"  # the only checkpoint, cut short: one warning, trained again
    newest.write_bytes(newest.read_bytes()[:100])
    repaired = invoke(workspace, params, out="rerun", reports="rerun-reports")
    assert repaired.exit_code == 0 and "resuming" not in repaired.output, repaired.output
    warnings = [line for line in repaired.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(newest) in warnings[0]
    assert (workspace / "models" / "rerun" / "model.safetensors").read_bytes() == weights

    monkeypatch.setenv("LLMCORE_FRESH", "1")
    fresh = invoke(workspace, params, out="rerun", reports="rerun-reports")
    assert fresh.exit_code == 0 and "resuming" not in fresh.output, fresh.output
    assert sum("LLMCORE_FRESH" in line for line in fresh.output.splitlines()) == 1
    assert (workspace / "models" / "rerun" / "model.safetensors").read_bytes() == weights  # trained again, same bytes
    monkeypatch.delenv("LLMCORE_FRESH")

    changed = invoke(
        workspace,
        write_params(tmp_path / "p2.yaml", train={**train, "lr": 0.002}),
        out="rerun",
        reports="rerun-reports",
    )
    assert changed.exit_code == 0 and "resuming" not in changed.output, changed.output
    assert sum("starting fresh" in line for line in changed.output.splitlines()) == 1

    # the same weights with another tokenizer in the base folder: other inputs, so not the checkpoint's run
    other = workspace / "models" / "base-other-tok"
    shutil.copytree(workspace / "models" / "base", other)
    tok = json.loads((other / "tokenizer.json").read_text())
    (other / "tokenizer.json").write_text(json.dumps({**tok, "name": "bytes-renamed"}))
    base_swapped = tmp_path / "p3.yaml"
    base_swapped.write_text(params.read_text().replace("base_model: base", "base_model: base-other-tok"))
    invoke(workspace, params, out="rerun", reports="rerun-reports")  # the lr of `params` again: a fresh run
    swapped = invoke(workspace, base_swapped, out="rerun", reports="rerun-reports")
    assert swapped.exit_code == 0 and "resuming" not in swapped.output, swapped.output
    assert sum("starting fresh" in line for line in swapped.output.splitlines()) == 1
