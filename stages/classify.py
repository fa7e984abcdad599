"""Stage `classify`: fine-tune the base model into an SMS spam classifier (the book's chapter 6), and `predict`.

    dvc repro classify           # the DVC stage: fine-tune, evaluate, save; its dvc.yaml command passes every path:
    python -m stages.classify --params params.yaml --data data/raw/sms-spam/SMSSpamCollection --models-dir data/models \
        --out data/models/classify --reports reports/classify --work-dir .cache/classify
    python -m stages.classify predict "WINNER!! Claim your prize now" "See you at 6?"
    cut -f2 data/raw/sms-spam/SMSSpamCollection | head | python -m stages.classify predict   # one text a line

Data: the SMS Spam Collection (validated row by row), ham undersampled to the spam count, shuffled and split
train/val/test (the book: 70/10/20), all seeded by ``classify.split_seed``; messages are tokenized with the
base model's tokenizer and truncated to ``classify.max_length`` tokens (null: the longest training message,
at most the model's context). Model: ``data/models/${base_model}`` with a linear head on the hidden state of
each message's last real token (``llmcore/classifier.py``: padding never changes a prediction). What trains
is ``classify.trainable``: ``head``, ``last_blocks`` (the book's), ``all`` or ``lora``. The loop is
``llmcore.training.loop.fit`` (cross-entropy); validation accuracy is logged at every evaluation.

Outputs, each written atomically:

    data/models/classify/            model.safetensors (LoRA merged; head + labels inside) + tokenizer.json
    reports/classify/metrics.json    train/val/test accuracy, precision, recall, F1 (spam = positive), sizes
    reports/classify/predictions.csv test split: text, label, prediction, probability (of the prediction)
    reports/classify/confusion.csv   test split: actual, predicted (DVC's confusion-matrix template)
    reports/classify/live/           dvclive curves by step (plots/metrics/{train,val}/*.tsv: loss, accuracy)

Resumable training checkpoints go to ``.cache/classify`` (not a DVC out: a killed run continues; only a run with the
same params and inputs resumes). A finished run is reloaded, not trained again, even by ``dvc repro -f``:
``LLMCORE_FRESH=1 dvc repro -f -s classify`` trains from scratch.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import typer

from llmcore.common import (
    LLMCoreError,
    atomic_path,
    print0,
    require_options,
    sha256_file,
    stage_errors,
    write_stage_reports,
)
from llmcore.data.datasets import load_spam_table
from llmcore.data.spam import ClassificationBatches, balance_classes, encode_texts, label_ids, split_table
from llmcore.eval.metrics import classification_metrics, confusion_matrix
from llmcore.models.classifier import LABELS, GPTClassifier, classification_loss, predict_proba, set_trainable
from llmcore.models.lora import LoRAParams, merge_lora
from llmcore.params import load_base_model, load_section
from llmcore.training.config import HardwareConfig, TrainConfig
from llmcore.training.loop import fit_logged
from llmcore.training.runtime import init_runtime, relaunch_if_several
from llmcore.weights.model_dir import TOKENIZER_FILE, open_model_dir, save_classifier


def _default_train() -> TrainConfig:
    return TrainConfig(
        batch_size=16,
        lr=2e-3,
        min_lr=2e-4,
        warmup_steps=10,
        epochs=5,
        eval_every=65,
        eval_batches=None,
        checkpoint_every=65,
        log_every=5,
        seed=123,
    )


@dataclass
class ClassifyParams:
    balance: bool = True  # undersample ham to the spam count (the book); false keeps the 87/13 imbalance
    train_fraction: float = 0.7
    val_fraction: float = 0.1  # test gets the rest
    split_seed: int = 123  # balancing and splitting
    max_length: int | None = None  # tokens kept per message; null = longest training message, at most the context
    trainable: Literal["head", "last_blocks", "all", "lora"] = "lora"
    last_blocks: int = 1  # trainable: last_blocks only; the book trains the last block + final norm + head
    lora: LoRAParams = field(default_factory=LoRAParams)  # trainable: lora only (adapters + head train)
    train: TrainConfig = field(default_factory=_default_train)
    eval_batch_size: int = 64  # rows per batch when scoring the splits at the end

    def __post_init__(self) -> None:
        fractions = (self.train_fraction, self.val_fraction)
        if not (all(0 < f < 1 for f in fractions) and sum(fractions) < 1):
            raise LLMCoreError(
                f"classify.val_fraction: train_fraction + val_fraction must be two positive fractions that leave "
                f"some test data, got {self.train_fraction} + {self.val_fraction}"
            )
        if self.max_length is not None and self.max_length < 1:
            raise LLMCoreError(f"classify.max_length: expected a positive int or null, got {self.max_length}")
        if self.last_blocks < 1:
            raise LLMCoreError(f"classify.last_blocks: expected a positive int, got {self.last_blocks}")
        if self.eval_batch_size < 1:
            raise LLMCoreError(f"classify.eval_batch_size: expected a positive int, got {self.eval_batch_size}")


def load_params(path: Path) -> tuple[ClassifyParams, str, HardwareConfig]:
    """The ``classify`` and ``hardware`` sections and the top-level ``base_model``."""
    cfg, hw = load_section("classify", ClassifyParams, path), load_section("hardware", HardwareConfig, path)
    return cfg, load_base_model(path), hw


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")


def run(
    cfg: ClassifyParams,
    base_model: str,
    hw: HardwareConfig,
    data: Path,
    models_dir: Path,
    out: Path,
    reports: Path,
    work_dir: Path,
) -> dict | None:
    """The stage: returns its metrics (None on ranks other than 0, which only train)."""
    start = time.perf_counter()
    base = open_model_dir(models_dir / base_model).require_lm("the classify stage's base_model")  # before any work
    table = load_spam_table(data)
    if cfg.balance:
        table = balance_classes(table, cfg.split_seed)
    splits = dict(
        zip(
            ("train", "val", "test"),
            split_table(table, (cfg.train_fraction, cfg.val_fraction), cfg.split_seed),
            strict=True,
        )
    )
    for name, df in splits.items():
        if df["label"].nunique() < len(LABELS):
            raise LLMCoreError(f"{data}: the {name} split ({len(df)} rows) lacks a class; more data or other fractions")

    rt = init_runtime(hw)
    torch.manual_seed(cfg.train.seed)  # head and LoRA init: the same on every rank
    gpt, tok = base.load_lm(), base.tokenizer
    ctx = gpt.cfg.context_length
    lengths = [len(ids) for ids in encode_texts(tok, splits["train"]["text"].tolist(), max_length=sys.maxsize)]
    max_length = cfg.max_length or min(max(lengths), ctx)
    if max_length > ctx:
        raise LLMCoreError(f"classify.max_length: {max_length} exceeds the context length {ctx} of {base_model}")
    seqs = {k: encode_texts(tok, df["text"].tolist(), max_length) for k, df in splits.items()}
    labels = {k: label_ids(df["label"].tolist()) for k, df in splits.items()}
    truncated = sum(n > max_length for n in lengths)

    model = GPTClassifier(gpt, num_classes=len(LABELS))
    try:
        trainable = set_trainable(model, cfg.trainable, cfg.last_blocks, cfg.lora)
    except LLMCoreError as e:
        raise LLMCoreError(f"classify.{e}") from None
    print0(
        f"{base_model}: {gpt.num_params():,} parameters, {trainable:,} trained ({cfg.trainable}); "
        f"{len(seqs['train'])} train / {len(seqs['val'])} val / {len(seqs['test'])} test messages, max_length "
        f"{max_length} ({truncated} training messages truncated)"
    )
    B, ranks = cfg.train.batch_size, dict(rank=rt.rank, world_size=rt.world_size)
    train_data = ClassificationBatches(seqs["train"], labels["train"], B, tok.eot_id, seed=cfg.train.seed, **ranks)
    val_data = ClassificationBatches(seqs["val"], labels["val"], B, tok.eot_id, shuffle=False, **ranks)
    device = rt.device

    def score(split: str):
        """(predicted ids, probability of each prediction, metrics) of one split."""
        probs = predict_proba(model, seqs[split], tok.eot_id, cfg.eval_batch_size, device)
        conf, pred = probs.max(dim=-1)
        pred = pred.tolist()
        return pred, conf.tolist(), classification_metrics(labels[split], pred, positive=LABELS.index("spam"))

    def on_eval(_model, _step) -> dict[str, float]:
        return {"accuracy": score("val")[2]["accuracy"]}  # fit logs it as val/accuracy

    # Anything outside cfg.train that decides the weights: a checkpoint made with other inputs is not resumed.
    fingerprint = {
        "data": sha256_file(data),
        "base": [sha256_file(base.weights), sha256_file(base.path / TOKENIZER_FILE)],
        "classify": {k: v for k, v in asdict(cfg).items() if k not in ("train", "eval_batch_size")},
    }
    result = fit_logged(
        model,
        train_data,
        val_data,
        classification_loss,
        cfg.train,
        hw,
        work_dir,
        rt,
        reports / "live",
        on_eval=on_eval,
        fingerprint=fingerprint,
        unit="examples",
    )
    if result is None:  # not rank 0
        return None

    scores = {split: score(split) for split in ("train", "val", "test")}
    pred, conf, _ = scores["test"]
    test = splits["test"]
    write_csv(
        reports / "predictions.csv",
        ["text", "label", "prediction", "probability"],
        [[t, y, LABELS[p], round(c, 6)] for t, y, p, c in zip(test["text"], test["label"], pred, conf, strict=True)],
    )
    write_csv(
        reports / "confusion.csv",
        ["actual", "predicted"],
        [[y, LABELS[p]] for y, p in zip(test["label"], pred, strict=True)],
    )

    merge_lora(model)  # plain nn.Linear again: the saved base has the base architecture's tensors
    metadata = {
        "stage": "classify",
        "base_model": base_model,
        "trainable": cfg.trainable,
        "max_length": str(max_length),
    }
    save_classifier(out, model, tok, LABELS, metadata)

    (tn, fp), (fn, tp) = confusion_matrix(labels["test"], pred, len(LABELS))
    metrics = {
        "trainable_params": trainable,
        **{f"{k}_messages": len(v) for k, v in seqs.items()},
        "max_length": max_length,
        "truncated": truncated,
        "steps": result.step,
        "epochs": round(result.epochs, 3),
        "train_loss": round(result.train_loss, 4),
        "val_loss": round(result.val_loss, 4),
        **{split: {k: round(v, 4) for k, v in s[2].items()} for split, s in scores.items()},
        "test_confusion": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
    }
    timing = {
        "train_seconds": round(result.train_time_s, 1),
        "examples_per_s": round(result.items_per_s, 1),
        "stage_seconds": round(time.perf_counter() - start, 1),
    }
    facts = {"base_model": base_model, "trainable": cfg.trainable, "device": str(device)}
    write_stage_reports(reports, metrics, timing, facts)
    return {**metrics, **timing, **facts}


app = typer.Typer(add_completion=False, help="Spam-classifier fine-tuning (stage `classify`) and `predict`.")


@app.callback(invoke_without_command=True)
def main(
    ctx: typer.Context,
    params: Path = typer.Option(None, help="params file (required by the stage)"),
    data: Path = typer.Option(None, help="the SMS Spam Collection (required by the stage)"),
    models_dir: Path = typer.Option(
        None, help="model folders; the base is <models-dir>/<base_model> (required by the stage)"
    ),
    out: Path = typer.Option(None, help="where the classifier's model folder goes (required by the stage)"),
    reports: Path = typer.Option(None, help="metrics, predictions, confusion matrix, curves (required by the stage)"),
    work_dir: Path = typer.Option(None, help="resumable training checkpoints (required by the stage)"),
) -> None:
    """Fine-tune data/models/${base_model} as a spam classifier and evaluate it (the DVC stage)."""
    if ctx.invoked_subcommand is not None:
        return
    require_options(ctx)
    with stage_errors():
        cfg, base_model, hw = load_params(params)
        relaunch_if_several(hw.nproc, "stages.classify")
        metrics = run(cfg, base_model, hw, data, models_dir, out, reports, work_dir)
        if metrics is not None:
            print0(json.dumps({split: metrics[split] for split in ("train", "val", "test")}))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, add_help_option=False)
def predict(ctx: typer.Context) -> None:
    """The old spelling of `llmcore classify` (same arguments), kept for a release."""
    raise SystemExit(subprocess.call([sys.executable, "-m", "llmcore.cli", "classify", *ctx.args]))


if __name__ == "__main__":
    app()
