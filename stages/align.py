"""Stage `align`: Direct Preference Optimization of the instruction model on the preference pairs.

    dvc repro align              # DPO from data/models/${align.base_model} on data/align/pairs.json; its command:
    python -m stages.align --params params.yaml --pairs data/align/pairs.json \
        --test-prompts reports/instruct/responses.json --models-dir data/models --out data/models/align \
        --reports reports/align --work-dir .cache/align

The pairs come from the `preferences` stage (``stages/preferences.py``); its keys of the ``align`` section
(``llmcore.data.pairs.PreferencesParams``) are part of this stage's schema too, which validates the whole section.

DPO (``llmcore.training.dpo``): the policy starts as the instruction model; the reference is the same
weights, frozen, whose log-probabilities of every pair are computed once before training. Loss
``-logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))`` over answer tokens only, on the shared loop
(``llmcore.training.loop.fit``): full fine-tune or LoRA (merged into the saved weights). The tuned model then
answers the instruct stage's test prompts (``reports/instruct/responses.json``) with the same decoding, so
the evaluate stage compares the two models answer by answer.

Outputs, each written atomically:

    data/models/align/               model.safetensors (prompt template in its metadata) + tokenizer.json
    reports/align/responses.json     the aligned model's answers to the instruct test prompts
    reports/align/metrics.json       numbers only: DPO loss, reward accuracy and margins (first and last
                                     evaluation), sizes, timings
    reports/align/timing.json        run-time figures: seconds, pairs/s
    reports/align/facts.json         the strings: preference source, base model, fine-tune kind
    reports/align/live/              dvclive curves: {train,val}/{loss,reward_accuracy,reward_margin,...}

Resumable training checkpoints go to ``.cache/align`` (not a DVC output: a killed run continues; only a run with the
same params and inputs resumes). ``LLMCORE_FRESH=1`` trains from scratch instead of reloading a finished run.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import typer

from llmcore.common import (
    LLMCoreError,
    print0,
    read_json,
    sha256_file,
    stage_errors,
    write_json_atomic,
    write_stage_reports,
)
from llmcore.data.datasets import load_instruction_data, validate_preferences
from llmcore.data.pairs import PreferencesParams
from llmcore.data.preferences import PreferenceBatches, encode_pairs
from llmcore.models.lora import LoRAParams, apply_lora, count_trainable, mark_trainable, merge_lora
from llmcore.models.responses import GenerateParams, generate_responses
from llmcore.params import load_section
from llmcore.text.chat import CHATML
from llmcore.text.prompts import answer_end_id, entry_prompt_ids
from llmcore.threads import threads_for_inference
from llmcore.training.config import HardwareConfig, TrainConfig
from llmcore.training.dpo import DPOLoss, attach_reference_logps
from llmcore.training.loop import fit_logged
from llmcore.training.runtime import init_runtime, relaunch_if_several
from llmcore.weights.model_dir import TEMPLATE_KEY, TOKENIZER_FILE, open_model_dir, save_model_dir


def _default_train() -> TrainConfig:
    return TrainConfig(
        batch_size=8,
        lr=1e-4,
        min_lr=1e-5,
        warmup_steps=10,
        epochs=1,
        eval_every=25,
        eval_batches=None,
        checkpoint_every=50,
        log_every=5,
        seed=123,
    )


@dataclass
class AlignParams(PreferencesParams):
    """The whole ``align`` section: the pair-making keys (``PreferencesParams``) and DPO's."""

    max_length: int | None = None  # longest sequence (prompt + answer); longer pairs are dropped, counted
    group_by_length: bool = True
    beta: float = 0.1  # DPO temperature: how far the policy may move from the reference
    average_logps: bool = False  # mean instead of sum of answer-token log-probs (the book's notebook)
    finetune: Literal["full", "lora"] = "full"
    lora: LoRAParams = field(default_factory=lambda: LoRAParams(dropout=0.0))
    train: TrainConfig = field(default_factory=_default_train)
    generate: GenerateParams = field(default_factory=GenerateParams)

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise LLMCoreError(f"align.beta: expected > 0, got {self.beta}")
        super().__post_init__()
        if self.max_length is not None and self.max_length < 2:
            raise LLMCoreError(f"align.max_length: expected an int >= 2 or null, got {self.max_length}")


def load_params(path: Path) -> tuple[AlignParams, HardwareConfig]:
    """The ``align`` and ``hardware`` sections."""
    return load_section("align", AlignParams, path), load_section("hardware", HardwareConfig, path)


def _round(x: float, digits: int = 4) -> float | None:
    return round(x, digits) + 0.0 if math.isfinite(x) else None  # JSON has no NaN; + 0.0 turns -0.0 into 0.0


def run(
    cfg: AlignParams,
    hw: HardwareConfig,
    pairs_path: Path,
    test_prompts: Path,
    models_dir: Path,
    out: Path,
    reports: Path,
    work_dir: Path,
) -> dict | None:
    """DPO from ``data/models/<base_model>`` on the pairs; returns the metrics (None on ranks other than 0)."""
    start = time.perf_counter()
    records = read_json(pairs_path, "run the preferences stage first (python -m stages.preferences)")
    entries, _ = validate_preferences(records, str(pairs_path), cfg.identical)
    if any(e.get("split") not in ("train", "val") for e in entries):
        raise LLMCoreError(f"{pairs_path}: every pair needs a 'split' of 'train' or 'val'")
    tests = load_instruction_data(test_prompts)  # the instruct stage's test entries (and its answers)

    rt = init_runtime(hw)
    torch.manual_seed(cfg.train.seed)
    base = open_model_dir(models_dir / cfg.base_model)
    model, tok = base.load_lm(use="the align stage"), base.tokenizer
    template = base.template or "alpaca"
    ctx = model.cfg.context_length
    max_length = cfg.max_length or ctx
    if max_length > ctx:
        raise LLMCoreError(f"align.max_length: {max_length} exceeds the context length {ctx} of {cfg.base_model}")
    splits = {name: [e for e in entries if e["split"] == name] for name in ("train", "val")}
    encoded = {name: encode_pairs(part, tok, template, max_length) for name, part in splits.items()}
    (train_pairs, train_long), (val_pairs, val_long) = encoded["train"], encoded["val"]
    if not val_pairs:
        raise LLMCoreError(f"align: every validation pair is longer than {max_length} tokens (raise align.max_length?)")
    B = cfg.train.batch_size
    train_data = PreferenceBatches(
        train_pairs,
        B,
        tok.eot_id,
        seed=cfg.train.seed,
        group_by_length=cfg.group_by_length,
        rank=rt.rank,
        world_size=rt.world_size,
    )
    val_data = PreferenceBatches(val_pairs, B, tok.eot_id, shuffle=False, rank=rt.rank, world_size=rt.world_size)

    model.to(rt.device)
    ref_start = time.perf_counter()
    for data in (train_data, val_data):  # the frozen reference: the base weights, scored once per pair
        attach_reference_logps(model, data, batch_size=2 * B, average=cfg.average_logps)
    ref_seconds = time.perf_counter() - ref_start

    n_params = model.num_params()
    if cfg.finetune == "lora":
        apply_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets)
        mark_trainable(model)
    trainable = count_trainable(model)
    print0(
        f"{cfg.base_model}: {n_params:,} parameters, {trainable:,} trained ({cfg.finetune}); {len(train_pairs)} "
        f"train / {len(val_pairs)} val pairs, {len(train_long) + len(val_long)} longer than {max_length} dropped; "
        f"beta {cfg.beta}"
    )
    fingerprint = {
        "pairs": sha256_file(pairs_path),
        "base": [sha256_file(base.weights), sha256_file(base.path / TOKENIZER_FILE)],
        "align": {k: v for k, v in asdict(cfg).items() if k not in ("train", "generate", "pairs")},
    }
    loss_fn = DPOLoss(cfg.beta, cfg.average_logps)
    result = fit_logged(
        model,
        train_data,
        val_data,
        loss_fn,
        cfg.train,
        hw,
        work_dir,
        rt,
        reports / "live",
        fingerprint=fingerprint,
        unit="pairs",
    )
    if result is None:  # not rank 0
        return None
    first = _first_eval(reports / "live")
    if cfg.finetune == "lora":
        merge_lora(model)

    gen_start = time.perf_counter()
    prompts = [entry_prompt_ids(tok, template, t, f"{test_prompts}: entry {i}") for i, t in enumerate(tests)]
    chat = template == CHATML
    sampling = cfg.generate.sampling()
    sampling.stop_ids = (*sampling.stop_ids, answer_end_id(tok, template))
    with threads_for_inference(hw.threads, model.cfg):
        answers = generate_responses(
            model, tok, prompts, sampling, cfg.generate.batch_size, cfg.generate.stop_at_section and not chat, chat=chat
        )
    gen_seconds = time.perf_counter() - gen_start
    responses = [
        {
            "id": t.get("id", str(i)),
            "instruction": t["instruction"],
            "input": t["input"],
            "output": t["output"],
            **({"messages": t["messages"]} if "messages" in t else {}),
            "model_response": a,
        }
        for i, (t, a) in enumerate(zip(tests, answers, strict=True))
    ]
    write_json_atomic(reports / "responses.json", responses)
    metadata = {
        TEMPLATE_KEY: template,
        "stage": "align",
        "base_model": cfg.base_model,
        "finetune": cfg.finetune,
        "preferences": cfg.preferences,
        "beta": str(cfg.beta),
    }
    save_model_dir(out, model, tok, metadata)

    train_keys = {(e["instruction"], e["input"]) for e in splits["train"]}
    x = result.extra
    metrics = {
        "beta": cfg.beta,
        "trainable_params": trainable,
        "train_pairs": len(train_pairs),
        "val_pairs": len(val_pairs),
        "dropped_too_long": len(train_long) + len(val_long),
        "test_prompts_in_train": sum((t["instruction"], t["input"]) in train_keys for t in tests),
        "steps": result.step,
        "epochs": round(result.epochs, 3),
        "train_loss": _round(result.train_loss),
        "val_loss": _round(result.val_loss),
        "val_loss_start": _round(first.get("loss", math.nan)),
        "val_reward_accuracy": _round(x.get("reward_accuracy", math.nan)),
        "val_reward_margin": _round(x.get("reward_margin", math.nan)),
        "val_reward_margin_start": _round(first.get("reward_margin", math.nan)),
        "val_chosen_reward": _round(x.get("chosen_reward", math.nan)),
        "val_rejected_reward": _round(x.get("rejected_reward", math.nan)),
        "test_responses": len(responses),
        "empty_responses": sum(not a for a in answers),
    }
    timing = {
        "reference_seconds": round(ref_seconds, 1),
        "train_seconds": round(result.train_time_s, 1),
        "pairs_per_s": round(result.items_per_s, 2),
        "generate_seconds": round(gen_seconds, 1),
        "stage_seconds": round(time.perf_counter() - start, 1),
    }
    facts = {
        "base_model": cfg.base_model,
        "preferences": cfg.preferences,
        "finetune": cfg.finetune,
        "dataset": cfg.dataset,
    }
    write_stage_reports(reports, metrics, timing, facts)
    return {**metrics, **timing}


def _first_eval(live_dir: Path) -> dict[str, float]:
    """The step-0 evaluation's val metrics, read back from dvclive's curves (policy = reference there)."""
    out = {}
    for name in ("loss", "reward_margin", "reward_accuracy"):
        path = live_dir / "plots" / "metrics" / "val" / f"{name}.tsv"
        if path.is_file():
            rows = path.read_text(encoding="utf-8").splitlines()
            if len(rows) > 1:
                out[name] = float(rows[1].split("\t")[1])
    return out


app = typer.Typer(add_completion=False)


@app.command()
def main(
    params: Path = typer.Option(..., help="params file"),
    pairs_path: Path = typer.Option(..., "--pairs", help="the preferences stage's pairs"),
    test_prompts: Path = typer.Option(..., help="prompts to answer at the end"),
    models_dir: Path = typer.Option(..., help="model folders; the base is <models-dir>/<base_model>"),
    out: Path = typer.Option(..., help="where the aligned model folder goes"),
    reports: Path = typer.Option(..., help="metrics, curves and responses"),
    work_dir: Path = typer.Option(..., help="resumable training checkpoints"),
) -> None:
    """DPO-tune data/models/${align.base_model} on the preference pairs and answer the test prompts."""
    with stage_errors():
        cfg, hw = load_params(params)
        relaunch_if_several(hw.nproc, "stages.align")
        metrics = run(cfg, hw, pairs_path, test_prompts, models_dir, out, reports, work_dir)
        if metrics is not None:
            keys = ("val_loss_start", "val_loss", "val_reward_accuracy", "val_reward_margin", "stage_seconds")
            print0(json.dumps({k: metrics[k] for k in keys}))


if __name__ == "__main__":
    app()
