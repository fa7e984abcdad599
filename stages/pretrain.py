"""Stage `pretrain`: train a GPT-2- or Llama-3-style model from scratch on the tokenized corpus.

    dvc repro pretrain           # or its dvc.yaml command, which passes every path (none has a default):
    python -m stages.pretrain --params params.yaml --tokens data/tokens --out data/models/pretrain \
        --reports reports/pretrain --ckpt .cache/pretrain

Reads   params.yaml sections ``model`` (preset + overrides; vocab_size comes from the tokenizer),
        ``hardware`` and ``pretrain``; data/tokens/{meta.json, tokenizer.json, train_*.bin, val_*.bin}
        (the token shards, memory-mapped and read as one stream per split; llmcore/data/tokens.py)
Writes  data/models/pretrain/{model.safetensors, tokenizer.json}     the model folder downstream stages load
        reports/pretrain/metrics.json                                 losses, bits per byte, baselines,
                                                                      throughput, MFU
        reports/pretrain/samples.md                                   generations from ``pretrain.prompts``
        reports/pretrain/live/plots/metrics/{train,val}/*.tsv         dvclive curves (DVC plots)
Resume  .cache/pretrain/step_XXXXXXXX/ (``--ckpt``), deliberately *not* a DVC out: DVC deletes outs before
        it runs a stage. Rerun a killed stage and it continues from the last checkpoint; change a
        param that shapes the weights and it starts fresh (see llmcore/training/loop.py). A finished run
        is reloaded, not trained again: ``LLMCORE_FRESH=1 dvc repro -f -s pretrain`` trains from scratch.

Several processes (DistributedDataParallel; global batch = batch_size * grad_accum * processes):

    # one machine: set hardware.nproc; the stage re-launches itself as
    #   python -m torch.distributed.run --standalone --nproc_per_node=<nproc> -m stages.pretrain <args>
    dvc exp run -S hardware.nproc=4

    # several GPUs by hand (the stage sees torchrun's RANK/WORLD_SIZE and does not re-launch)
    torchrun --standalone --nproc_per_node=8 -m stages.pretrain

    # several nodes: the same command on every node, node_rank 0..nnodes-1, all pointing at node 0
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=10.0.0.1 --master_port=29500 \\
        -m stages.pretrain --ckpt /shared/ckpt/pretrain
    torchrun --nnodes=2 --node_rank=1 --nproc_per_node=8 --master_addr=10.0.0.1 --master_port=29500 \\
        -m stages.pretrain --ckpt /shared/ckpt/pretrain

Rank 0 writes every output; every rank reads the token files and, when resuming, the checkpoint, so on
several nodes both must be on storage all nodes see. NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import typer

from llmcore.common import LLMCoreError, stage_errors, write_stage_reports, write_text_atomic
from llmcore.data.tokens import RandomWindows, SequentialWindows, load_tokens, read_meta, shard_entries
from llmcore.device import DTYPES, autocast_context
from llmcore.eval.baselines import DEFAULT_K, baselines
from llmcore.eval.bpb import evaluate_bpb, token_byte_lengths
from llmcore.models.config import ModelConfig, model_config_from_params
from llmcore.models.generate import SamplingConfig, generate
from llmcore.models.gpt import GPT
from llmcore.params import ParamsError, load_section, plain, read_params
from llmcore.text.tokenizer import Tokenizer
from llmcore.threads import threads_for_inference
from llmcore.training.config import HardwareConfig, TrainConfig
from llmcore.training.flops import measure_matmul_peak
from llmcore.training.loop import FitResult, curves_logger, fit, lm_loss
from llmcore.training.runtime import Runtime, close_runtime, init_runtime, relaunch_if_several
from llmcore.weights.model_dir import save_model_dir

# Count baselines read at most this many tokens of each split (exact counts; O(N) memory): all of a small
# corpus, a prefix of a 10B-token one.
BASELINE_TOKENS = 20_000_000
# Shards are checked against their manifest sha256 when a split is at most this large (reads every byte);
# above it, against their sizes only (DVC verifies its cache; ``load_tokens(verify=True)`` does it by hand).
VERIFY_BYTES = 2 << 30


@dataclass
class SampleParams:
    max_new_tokens: int = 200  # per prompt (generation also stops at the context length)
    temperature: float = 0.8  # 0 = greedy
    top_k: int | None = 50
    top_p: float | None = None
    seed: int = 1337

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.temperature < 0:
            raise ValueError("max_new_tokens must be positive and temperature >= 0")


def _default_train() -> TrainConfig:
    # llama3-tiny on TinyShakespeare (BPE 1024): ~4-5 min on 2 CPU cores, val loss ~4.2 (unigram 6.0)
    return TrainConfig(
        batch_size=16,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=30,
        max_steps=300,
        eval_every=50,
        eval_batches=10,
        checkpoint_every=50,
        log_every=10,
    )


@dataclass
class PretrainParams:
    train: TrainConfig = field(default_factory=_default_train)  # optimisation, stopping, cadence (llmcore/train.py)
    windows: Literal["random", "sequential"] = "random"  # random offsets (nanoGPT) | strided epochs (the book)
    stride: int | None = None  # sequential: tokens between window starts (None = context_length)
    prompts: list[str] = field(default_factory=lambda: ["ROMEO:", "First Citizen:\n"])  # "" = start of text
    sample: SampleParams = field(default_factory=SampleParams)
    baseline_k: float = DEFAULT_K  # add-k smoothing of the unigram / bigram baselines

    def __post_init__(self) -> None:
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"stride: expected a positive int or null, got {self.stride}")
        if not self.baseline_k > 0:
            raise ValueError(f"baseline_k: expected a positive float, got {self.baseline_k}")


def build_data(p: PretrainParams, train_tokens, val_tokens, T: int, rt: Runtime):
    """Training and validation batches; every rank draws the global batch and keeps its slice."""
    cfg = p.train
    # on CUDA the batches are built in pinned memory: fit copies them to the device asynchronously
    ranks = dict(rank=rt.rank, world_size=rt.world_size, pin_memory=rt.device.type == "cuda")
    if p.windows == "random":
        train = RandomWindows(train_tokens, cfg.batch_size, T, seed=cfg.seed, **ranks)
        val = RandomWindows(val_tokens, cfg.batch_size, T, seed=cfg.seed + 1, **ranks)
    else:
        train = SequentialWindows(train_tokens, cfg.batch_size, T, stride=p.stride, seed=cfg.seed, **ranks)
        val = SequentialWindows(val_tokens, cfg.batch_size, T, shuffle=False, **ranks)
    return train, val


def make_bpb_eval(p: PretrainParams, val_tokens, tok: Tokenizer, T: int, hw: HardwareConfig, rt: Runtime):
    """``fit``'s ``on_eval``: bits per byte over the very batches the validation loss is measured on."""
    cfg = p.train
    _, val = build_data(p, val_tokens, val_tokens, T, rt)  # the validation sampler, built the same way
    start = val.state_dict()
    n_batches = cfg.eval_batches or len(val)
    token_bytes = token_byte_lengths(tok)

    def on_eval(model: GPT, step: int) -> dict[str, float]:
        val.load_state_dict(start)
        bpb = evaluate_bpb(
            model,
            val,
            n_batches,
            token_bytes,
            rt.device,
            autocast=lambda: autocast_context(rt.device, hw.precision),
            ddp=rt.ddp,
        )
        return {"bpb": bpb}

    return on_eval


def write_samples(
    path: Path, model: GPT, tok: Tokenizer, p: PretrainParams, step: int, threads: int | str = "auto"
) -> None:
    s = p.sample
    cfg = SamplingConfig(
        max_new_tokens=s.max_new_tokens,
        temperature=s.temperature,
        top_k=s.top_k,
        top_p=s.top_p,
        stop_ids=(tok.eot_id,),
        seed=s.seed,
    )
    prompts = [tok.encode(text) or [tok.eot_id] for text in p.prompts]  # "" starts a fresh document
    with threads_for_inference(threads, model.cfg):
        outputs = generate(model, prompts, cfg)
    lines = [
        "# Pretraining samples",
        "",
        f"Step {step}; temperature {s.temperature}, top_k {s.top_k}, top_p {s.top_p}, seed {s.seed}, "
        f"up to {s.max_new_tokens} new tokens. The prompt is in **bold**.",
        "",
    ]
    for i, (text, new) in enumerate(zip(p.prompts, outputs, strict=True), 1):
        prompt_shown = text.replace("\n", "\\n") if text else "(start of text)"
        lines += [f"## {i}. **{prompt_shown}**", "", "```text", text + tok.decode(new), "```", ""]
    write_text_atomic(path, "\n".join(lines))


def write_metrics(
    folder: Path,
    result: FitResult,
    model_cfg: ModelConfig,
    n_params: int,
    base: dict,
    world_size: int,
    wall_time_s: float,
    device: str,
) -> dict:
    """metrics.json (losses, baselines), timing.json (throughput, MFU, seconds), facts.json; returns all in one.

    Throughput, peak and MFU are one measurement: the tokens and training seconds of every segment of the run
    (summed over resumes) and each segment's own peak, weighted by its seconds (``FitResult.peak_flops``).
    """
    flops_per_token = model_cfg.flops_per_token()
    peak = result.peak_flops
    metrics = {
        "step": result.step,
        "epochs": round(result.epochs, 4),
        "train_loss": result.train_loss,
        "val_loss": result.val_loss,
        "val_ppl": result.val_ppl,
        "val_bpb": result.extra.get("bpb"),
        **{k: v for k, v in base.items() if k != "baseline_k"},
        "tokens_seen": result.items_seen,
        "params": n_params,
        "flops_per_token": flops_per_token,
    }
    timing = {
        "tokens_per_s": round(result.items_per_s, 1),
        "mfu": flops_per_token * result.items_per_s / (peak * world_size),
        "peak_tflops": float(f"{peak / 1e12:.6g}"),
        "train_time_s": round(result.train_time_s, 2),
        "wall_time_s": round(wall_time_s, 2),
    }
    facts = {
        "stop_reason": result.stop_reason,
        "resumed_from": result.resumed_from,
        "processes": world_size,
        "device": device,
        "baseline_k": base.get("baseline_k"),
    }
    write_stage_reports(folder, metrics, timing, facts)
    return {**metrics, **timing, **facts}


def load_params(path: Path) -> tuple[HardwareConfig, PretrainParams, dict]:
    """Everything this stage reads from params.yaml: the ``hardware``, ``pretrain`` and ``model`` sections (the
    model section as plain data, validated here; its vocab size comes from the tokenizer later)."""
    hw = load_section("hardware", HardwareConfig, path)
    p = load_section("pretrain", PretrainParams, path)
    raw = read_params(path)
    if "model" not in raw:
        raise ParamsError(f"model: missing section in {path}")
    model = plain(raw["model"])
    model_config_from_params(model)
    return hw, p, model


app = typer.Typer(add_completion=False)


@app.command()
def main(
    params: Path = typer.Option(..., help="params file (sections model, hardware, pretrain)"),
    tokens: Path = typer.Option(..., help="tokenize stage output"),
    out: Path = typer.Option(..., help="model folder to write"),
    reports: Path = typer.Option(..., help="metrics, samples and curves"),
    ckpt: Path = typer.Option(..., help="resumable checkpoints (keep out of DVC outs)"),
) -> None:
    """Pretrain the model on data/tokens; resumes from --ckpt after a crash."""
    start = time.perf_counter()
    with stage_errors():
        hw, p, model_params = load_params(params)
        relaunch_if_several(hw.nproc, "stages.pretrain")

        meta = read_meta(tokens)
        tok = Tokenizer.load(tokens / "tokenizer.json")
        if tok.vocab_size != meta["vocab_size"]:
            raise LLMCoreError(f"{tokens}: tokenizer has {tok.vocab_size} ids but meta.json says {meta['vocab_size']}")
        model_cfg = model_config_from_params(model_params, vocab_size=tok.vocab_size)
        itemsize = np.dtype(meta["dtype"]).itemsize
        n_bytes = sum(e.get("tokens", 0) for s in meta.get("splits", {}).values() for e in s) * itemsize
        train_tokens = load_tokens(tokens, "train", meta, verify=n_bytes <= VERIFY_BYTES)
        val_tokens = load_tokens(tokens, "val", meta, verify=n_bytes <= VERIFY_BYTES)

        rt = init_runtime(hw)
        train, val = build_data(p, train_tokens, val_tokens, model_cfg.context_length, rt)
        on_eval = make_bpb_eval(p, val_tokens, tok, model_cfg.context_length, hw, rt)
        torch.manual_seed(p.train.seed)  # the same initial weights on every rank
        model = GPT(model_cfg)
        live = curves_logger(reports / "live") if rt.is_main else None
        shards = {
            split: [[e["file"], e.get("tokens"), e.get("sha256")] for e in shard_entries(tokens, split, meta)]
            for split in ("train", "val")
        }
        data_id = {
            "model": model_cfg.to_dict(),
            "windows": p.windows,
            "stride": p.stride,
            "meta": meta,
            "shards": shards,
            "lengths": [len(train_tokens), len(val_tokens)],
        }
        print(
            f"rank {rt.rank}/{rt.world_size} on {rt.device}: {model.num_params() / 1e6:.2f}M params, "
            f"{len(train_tokens)} train / {len(val_tokens)} val tokens in "
            f"{len(train_tokens.shards)} + {len(val_tokens.shards)} shard(s)",
            flush=True,
        )
        # MFU's denominator, measured before training, under the load this segment trains in; fit saves it with
        # every checkpoint, so a resumed run weights each segment's peak by that segment's time
        peak = None
        if rt.is_main:
            peak = hw.peak_tflops * 1e12 if hw.peak_tflops else measure_matmul_peak(DTYPES[hw.precision], rt.device)
        result = fit(
            model,
            train,
            val,
            lm_loss,
            p.train,
            hw,
            ckpt,
            live=live,
            fingerprint=data_id,
            on_eval=on_eval,
            peak_flops=peak,
        )

        if rt.is_main:
            model.eval()
            save_model_dir(out, model, tok, {"stage": "pretrain", "step": str(result.step)})
            write_samples(reports / "samples.md", model, tok, p, result.step, hw.threads)
            base = baselines(train_tokens[:BASELINE_TOKENS], val_tokens[:BASELINE_TOKENS], tok.vocab_size, p.baseline_k)
            metrics = write_metrics(
                reports,
                result,
                model_cfg,
                model.num_params(),
                base,
                rt.world_size,
                time.perf_counter() - start,
                str(rt.device),
            )
            live.end()
            print(
                f"step {result.step}: val loss {result.val_loss:.4f}, {metrics['val_bpb']:.4f} bits/byte "
                f"(unigram {base['unigram_val_loss']:.4f}, "
                f"bigram {base['bigram_val_loss']:.4f}), {metrics['tokens_per_s']:.0f} tokens/s, "
                f"MFU {metrics['mfu']:.1%}, {metrics['wall_time_s']:.0f} s"
            )
        close_runtime()


if __name__ == "__main__":
    app()
