"""Stage `instruct`: instruction fine-tuning on Alpaca-format data (the book's chapter 7), and `ask` to try it.

    dvc repro instruct           # fine-tune, answer the test split, save the model; its dvc.yaml command:
    python -m stages.instruct --params params.yaml --raw-dir data/raw --models-dir data/models \
        --out data/models/instruct --reports reports/instruct --work-dir .cache/instruct
    python -m stages.instruct ask "Name three primary colors."   # stream the tuned model's answer
    echo "Convert 45 kilometers to meters." | python -m stages.instruct ask

The dataset (``instruct.dataset``: a download source, i.e. a folder of ``data/raw`` holding one JSON list of
``{instruction, input, output}`` entries) is validated entry by entry, split with a seed (the book: 85% train,
10% test, the remaining 5% validation) and formatted with the prompt template (``alpaca`` or a custom format
string). The base model ``data/models/${base_model}`` is fine-tuned by ``llmcore.training.loop.fit``: every weight, or
LoRA adapters that are merged back afterwards. The tuned model then answers every test entry (KV cache; stops
at end-of-text or at a new ``###`` section), and so does the base model, with the same prompts and decoding.

Outputs, each written atomically:

    data/models/instruct/            model.safetensors (prompt template in its metadata) + tokenizer.json
    reports/instruct/responses.json  per test entry: id, instruction, input, output (reference), model_response
    reports/instruct/base_responses.json   the same for the base model (same prompts, template and decoding)
    reports/instruct/metrics.json    train/val/test loss and perplexity, sizes, timings
    reports/instruct/live/           dvclive curves by step (plots/metrics/{train,val}/*.tsv: loss, lr, ppl, ...)

Resumable training checkpoints go to ``.cache/instruct`` (not a DVC output: a killed run continues; only a run with
the same params and inputs resumes). ``LLMCORE_FRESH=1`` trains from scratch instead of reloading a finished run.
"""

from __future__ import annotations

import json
import math
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
    print0,
    require_options,
    sha256_file,
    stage_errors,
    write_json_atomic,
    write_stage_reports,
)
from llmcore.data.chat import chat_prompt_and_reference, find_chat_files, load_chat_data
from llmcore.data.datasets import find_single_file, load_instruction_data
from llmcore.data.instruct import (
    InstructionBatches,
    check_split,
    encode_conversations,
    encode_entries,
    eval_batches,
    split_entries,
)
from llmcore.eval.instruct import evaluate_loss
from llmcore.models.lora import LoRAParams, apply_lora, count_trainable, mark_trainable, merge_lora
from llmcore.models.responses import GenerateParams, generate_responses
from llmcore.models.vocab import add_special_tokens
from llmcore.params import load_base_model, load_section
from llmcore.text.chat import CHAT_TOKENS, CHATML, IM_END, render_chat
from llmcore.text.prompts import check_template, format_prompt
from llmcore.threads import threads_for_inference
from llmcore.training.config import HardwareConfig, TrainConfig
from llmcore.training.loop import fit_logged, lm_loss
from llmcore.training.runtime import init_runtime, relaunch_if_several
from llmcore.weights.model_dir import TEMPLATE_KEY, TOKENIZER_FILE, open_model_dir, save_model_dir


def _default_train() -> TrainConfig:
    # for the ~1M-parameter pretrain model, which underfits in the book's 2 epochs at its lr (5e-5, GPT-2 355M)
    return TrainConfig(
        batch_size=8,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=20,
        epochs=4,
        eval_every=50,
        eval_batches=None,
        checkpoint_every=100,
        log_every=5,
        seed=123,
    )


@dataclass
class InstructParams:
    dataset: str = "instruction-data"  # a download source: data/raw/<dataset>/ holds one JSON list of entries
    format: Literal["alpaca", "chat"] = "alpaca"  # chat: ChatML conversations (jsonl/parquet, or Alpaca converted)
    template: str = "alpaca"  # alpaca | a format string with {instruction} and {input} (format: alpaca only)
    train_fraction: float = 0.85
    test_fraction: float = 0.10  # validation gets the rest
    split_seed: int = 123
    mask_prompt: bool = False  # score only the response tokens (the book scores the prompt too)
    max_length: int | None = None  # truncate sequences to this many positions; None = the model's context
    group_by_length: bool = True  # batch examples of similar length (less padding, faster on CPU)
    finetune: Literal["full", "lora"] = "full"
    lora: LoRAParams = field(default_factory=lambda: LoRAParams(dropout=0.05))  # finetune: lora only
    train: TrainConfig = field(default_factory=_default_train)
    generate: GenerateParams = field(default_factory=GenerateParams)

    def __post_init__(self) -> None:
        check_template(self.template)
        if self.format not in ("alpaca", "chat"):
            raise LLMCoreError(f"instruct.format: expected alpaca or chat, got {self.format!r}")
        check_split(self.train_fraction, self.test_fraction, "instruct")
        if self.max_length is not None and self.max_length < 1:
            raise LLMCoreError(f"instruct.max_length: expected a positive int or null, got {self.max_length}")


def load_params(path: Path) -> tuple[InstructParams, str, HardwareConfig]:
    """The ``instruct`` and ``hardware`` sections and the top-level ``base_model``."""
    cfg, hw = load_section("instruct", InstructParams, path), load_section("hardware", HardwareConfig, path)
    return cfg, load_base_model(path), hw


def _finite(x: float, digits: int = 4) -> float | None:
    return round(x, digits) if math.isfinite(x) else None  # JSON has no NaN


def run(
    cfg: InstructParams,
    base_model: str,
    hw: HardwareConfig,
    raw_dir: Path,
    models_dir: Path,
    out: Path,
    reports: Path,
    work_dir: Path,
) -> dict | None:
    """The stage: returns its metrics (None on ranks other than 0, which only train)."""
    start = time.perf_counter()
    base = open_model_dir(models_dir / base_model).require_lm("the instruct stage's base_model")  # before any work
    chat = cfg.format == "chat"
    if chat:
        data_files = find_chat_files(raw_dir / cfg.dataset, "instruct.dataset")
        entries = load_chat_data(data_files)
    else:
        data_files = [find_single_file(raw_dir / cfg.dataset, "instruct.dataset", "*.json")]
        entries = load_instruction_data(data_files[0])
    splits = split_entries(entries, cfg.train_fraction, cfg.test_fraction, cfg.split_seed)  # train, val, test

    rt = init_runtime(hw)
    torch.manual_seed(cfg.train.seed)  # LoRA's init: the same on every rank
    model, tok = base.load_lm(), base.tokenizer
    added_tokens = 0
    if chat:  # a base model without the chat tokens gets them (new rows: the mean of the others)
        vocab = tok.vocab_size
        model, tok = add_special_tokens(model, tok, CHAT_TOKENS)
        added_tokens = tok.vocab_size - vocab
    ctx = model.cfg.context_length
    max_length = cfg.max_length or ctx
    if max_length > ctx:
        raise LLMCoreError(f"instruct.max_length: {max_length} exceeds the context length {ctx} of {base_model}")
    cut = dropped = 0
    if chat:
        encoded = [encode_conversations(s, tok, max_length) for s in splits]
        train_ex, val_ex, test_ex = (e for e, _, _ in encoded)
        cut, dropped = sum(c for _, c, _ in encoded), sum(d for _, _, d in encoded)
        truncated = 0
        if not train_ex or not val_ex or not test_ex:
            raise LLMCoreError(f"instruct: every conversation of a split is longer than max_length {max_length}")
    else:
        train_ex, val_ex, test_ex = (encode_entries(s, tok, cfg.template) for s in splits)
        truncated = sum(len(e.ids) - 1 > max_length for e in train_ex + val_ex + test_ex)
    batching = dict(pad_id=tok.eot_id, mask_prompt=cfg.mask_prompt, max_length=max_length)
    B = cfg.train.batch_size
    train_data = InstructionBatches(
        train_ex,
        B,
        seed=cfg.train.seed,
        group_by_length=cfg.group_by_length,
        rank=rt.rank,
        world_size=rt.world_size,
        **batching,
    )
    val_data = InstructionBatches(val_ex, B, shuffle=False, rank=rt.rank, world_size=rt.world_size, **batching)

    n_params = model.num_params()
    if cfg.finetune == "lora":
        apply_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets)
        mark_trainable(model)  # only the adapters train
    trainable = count_trainable(model)
    print0(
        f"{base_model}: {n_params:,} parameters, {trainable:,} trained ({cfg.finetune}); "
        f"{len(train_ex)} train / {len(val_ex)} val / {len(test_ex)} test entries, "
        + (f"{cut} cut at a turn boundary, {dropped} dropped (over" if chat else f"{truncated} truncated to")
        + f" {max_length} tokens"
        + (")" if chat else "")
    )
    # Anything outside cfg.train that decides the weights: a checkpoint made with other inputs is not resumed.
    fingerprint = {
        "data": [sha256_file(f) for f in data_files] if chat else sha256_file(data_files[0]),
        "base": [sha256_file(base.weights), sha256_file(base.path / TOKENIZER_FILE)],
        "instruct": {k: v for k, v in asdict(cfg).items() if k not in ("train", "generate")},
    }
    result = fit_logged(
        model, train_data, val_data, lm_loss, cfg.train, hw, work_dir, rt, reports / "live", fingerprint=fingerprint
    )
    if result is None:  # not rank 0
        return None

    test_loss = evaluate_loss(model, eval_batches(test_ex, B, **batching))
    # the response tokens alone (what the evaluate stage calls the reference loss), whatever mask_prompt says
    answer_loss = evaluate_loss(model, eval_batches(test_ex, B, **{**batching, "mask_prompt": True}))
    if cfg.finetune == "lora":
        merge_lora(model)  # plain nn.Linear again: the saved model has the base architecture
    gen_start = time.perf_counter()
    test_entries = splits[2]
    sampling = cfg.generate.sampling()
    if chat:
        test_entries = [_chat_record(e) for e in test_entries]
        prompts = [render_chat(tok, e["prompt"], add_generation_prompt=True).ids for e in test_entries]
        sampling.stop_ids = (*sampling.stop_ids, tok.special_tokens[IM_END])
    else:
        prompts = [format_prompt(cfg.template, e["instruction"], e["input"]) for e in test_entries]
    answer_kw = dict(stop_at_section=cfg.generate.stop_at_section and not chat, chat=chat)
    with threads_for_inference(hw.threads, model.cfg):
        answers = generate_responses(model, tok, prompts, sampling, cfg.generate.batch_size, **answer_kw)
    gen_seconds = time.perf_counter() - gen_start
    # The model tuned from answers the same formatted prompts the same way: the evaluate stage judges both, so
    # the report can say what tuning bought (a pretrained model never saw the template; that is the comparison).
    base_start = time.perf_counter()
    base_lm = base.load_lm(device=rt.device)
    if chat:  # the base with the same added rows, so that it reads the same prompt ids
        base_lm, _ = add_special_tokens(base_lm, base.tokenizer, CHAT_TOKENS)
    with threads_for_inference(hw.threads, base_lm.cfg):
        base_answers = generate_responses(base_lm, tok, prompts, sampling, cfg.generate.batch_size, **answer_kw)
    base_seconds = time.perf_counter() - base_start
    for name, outputs in (("responses.json", answers), ("base_responses.json", base_answers)):
        records = [
            {
                "id": str(i),
                "instruction": e["instruction"],
                "input": e["input"],
                "output": e["output"],
                **({"messages": e["prompt"]} if chat else {}),
                "model_response": answer,
            }
            for i, (e, answer) in enumerate(zip(test_entries, outputs, strict=True))
        ]
        write_json_atomic(reports / name, records)
    template = CHATML if chat else cfg.template
    metadata = {TEMPLATE_KEY: template, "stage": "instruct", "base_model": base_model, "finetune": cfg.finetune}
    save_model_dir(out, model, tok, metadata)

    metrics = {
        "trainable_params": trainable,
        "train_entries": len(train_ex),
        "val_entries": len(val_ex),
        "test_entries": len(test_ex),
        "truncated_entries": truncated,
        **({"cut_conversations": cut, "dropped_conversations": dropped, "added_tokens": added_tokens} if chat else {}),
        "steps": result.step,
        "epochs": round(result.epochs, 3),
        "train_loss": _finite(result.train_loss),
        "val_loss": _finite(result.val_loss),
        "val_ppl": round(result.val_ppl, 3),
        "test_loss": round(test_loss, 4),
        "test_ppl": round(math.exp(min(test_loss, 50.0)), 3),
        "test_response_loss": round(answer_loss, 4),
        "empty_responses": sum(not a for a in answers),
    }
    timing = {
        "train_seconds": round(result.train_time_s, 1),
        "tokens_per_s": round(result.items_per_s, 1),
        "generate_seconds": round(gen_seconds, 1),
        "base_generate_seconds": round(base_seconds, 1),
        "stage_seconds": round(time.perf_counter() - start, 1),
    }
    facts = {"base_model": base_model, "finetune": cfg.finetune, "format": cfg.format, "device": str(rt.device)}
    write_stage_reports(reports, metrics, timing, facts)
    return {**metrics, **timing, **facts}


def _chat_record(conversation: dict) -> dict:
    """A test conversation for responses.json: the prompt turns, and the evaluate stage's fields (instruction = the
    last user turn, input = the earlier turns as ``Role: content`` lines, output = the reference answer)."""
    prompt, reference = chat_prompt_and_reference(conversation)
    if "instruction" in conversation:  # converted from Alpaca: the entry's own fields
        return {
            "prompt": prompt,
            "instruction": conversation["instruction"],
            "input": conversation["input"],
            "output": conversation["output"],
        }
    *history, last = prompt
    return {
        "prompt": prompt,
        "instruction": last["content"],
        "output": reference,
        "input": "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in history),
    }


app = typer.Typer(add_completion=False, help="Instruction fine-tuning (stage `instruct`) and `ask`.")


@app.callback(invoke_without_command=True)
def main(
    ctx: typer.Context,
    params: Path = typer.Option(None, help="params file (required by the stage)"),
    raw_dir: Path = typer.Option(None, help="downloaded sources (required by the stage)"),
    models_dir: Path = typer.Option(
        None, help="model folders; the base is <models-dir>/<base_model> (required by the stage)"
    ),
    out: Path = typer.Option(None, help="where the tuned model folder goes (required by the stage)"),
    reports: Path = typer.Option(None, help="metrics, curves and responses (required by the stage)"),
    work_dir: Path = typer.Option(None, help="resumable training checkpoints (required by the stage)"),
) -> None:
    """Fine-tune data/models/${base_model} on instruction data and answer the test split (the DVC stage)."""
    if ctx.invoked_subcommand is not None:
        return
    require_options(ctx)
    with stage_errors():
        cfg, base_model, hw = load_params(params)
        relaunch_if_several(hw.nproc, "stages.instruct")
        metrics = run(cfg, base_model, hw, raw_dir, models_dir, out, reports, work_dir)
        if metrics is not None:
            print0(json.dumps({k: metrics[k] for k in ("val_loss", "test_loss", "stage_seconds")}))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, add_help_option=False)
def ask(ctx: typer.Context) -> None:
    """The old spelling of `llmcore ask` (same arguments), kept for a release."""
    raise SystemExit(subprocess.call([sys.executable, "-m", "llmcore.cli", "ask", *ctx.args]))


if __name__ == "__main__":
    app()
