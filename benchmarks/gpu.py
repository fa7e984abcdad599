"""The CUDA check: run the GPU tests, then measure training throughput and MFU at real shapes.

    python -m benchmarks.gpu --out reports/gpu.json            # on a machine with a CUDA GPU
    python -m benchmarks.gpu --smoke                           # tiny shapes on the CPU: the script itself works

Training runs through the pipeline's own loop (``llmcore.training.loop.fit``: fused AdamW, autocast, compile)
on random tokens, so the figures are the loop's, not a stripped-down step's. MFU is model FLOPs per token
(``ModelConfig.flops_per_token``, 6N + attention) times tokens/s over the measured dense bf16 matmul peak of
the same device (and over the datasheet peak when given with ``--datasheet-tflops``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from llmcore.data.tokens import RandomWindows
from llmcore.device import DTYPES
from llmcore.models.config import ModelConfig
from llmcore.models.generate import SamplingConfig, generate
from llmcore.models.gpt import GPT
from llmcore.training.config import HardwareConfig, TrainConfig
from llmcore.training.flops import measure_matmul_peak
from llmcore.training.loop import fit, lm_loss

# (name, preset, overrides, batch, context): the 124M GPT-2 shape and a nanochat-d12-like Llama-3-style model.
SHAPES = [
    ("gpt2-124m", "gpt2-124m", {}, 32, 1024),
    ("llama-d12", "llama3-tiny", dict(n_layers=12, emb_dim=768, n_heads=6, n_kv_heads=6, context_length=2048,
                                      vocab_size=65536, hidden_dim=3072), 16, 2048),  # fmt: skip
]
SMOKE = [("smoke", "gpt2-tiny", {}, 4, 64)]


def train_throughput(preset: str, overrides: dict, batch: int, context: int, precision: str, compile: bool,
                     steps: int, device: str) -> dict:  # fmt: skip
    cfg = ModelConfig.from_preset(preset, **{**overrides, "context_length": max(context, overrides.get(
        "context_length", 0))})  # fmt: skip
    torch.manual_seed(0)
    model = GPT(cfg)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=4_000_000, dtype=np.uint32)
    train = RandomWindows(tokens, batch, context, seed=1)
    val = RandomWindows(tokens, batch, context, seed=2)
    warm = 10
    tc = TrainConfig(batch_size=batch, lr=6e-4, min_lr=6e-5, max_steps=warm + steps, warmup_steps=warm,
                     eval_every=10**6, checkpoint_every=10**6, eval_batches=1, log_every=10**6)  # fmt: skip
    hw = HardwareConfig(device=device, precision=precision, compile=compile)
    with tempfile.TemporaryDirectory() as tmp:
        # fit times optimizer steps only; run warm-up steps first (compile, autotuning) in a first call...
        first = fit(model, train, val, lm_loss, TrainConfig(**{**tc.__dict__, "max_steps": warm}), hw, tmp)
    with tempfile.TemporaryDirectory() as tmp:
        # ...then time a fresh run of the same model object, compiled graph already cached by dynamo
        start = time.perf_counter()
        result = fit(model, train, val, lm_loss, tc, hw, tmp)
        wall = time.perf_counter() - start
    timed_tokens = result.items_seen
    per_s = result.items_per_s
    flops = cfg.flops_per_token(context)
    return {"params": cfg.num_params(), "batch": batch, "context": context, "precision": precision,
            "compile": compile, "steps": result.step, "tokens_per_s": per_s, "flops_per_token": flops,
            "model_tflops": flops * per_s / 1e12, "final_loss": result.train_loss, "warmup_loss": first.train_loss,
            "wall_s": wall, "tokens": timed_tokens,
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None}  # fmt: skip


def generation_throughput(preset: str, device: str, precision: str, new_tokens: int) -> dict:
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset(preset)).to(device).eval()
    if precision != "fp32":
        model.to(DTYPES[precision])
    prompt = [list(range(1, 21))]
    cfg = SamplingConfig(max_new_tokens=new_tokens, temperature=0.0)
    generate(model, prompt, SamplingConfig(max_new_tokens=8, temperature=0.0))  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = generate(model, prompt, cfg)
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - start
    return {"preset": preset, "precision": precision, "new_tokens": len(out[0]), "tokens_per_s": len(out[0]) / dt}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("reports/gpu.json"))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on whatever device is there")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--datasheet-tflops", type=float, default=None, help="dense bf16 peak of the device")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                    "torch": torch.__version__, "runs": [], "generation": []}  # fmt: skip
    if not args.skip_tests:
        tests = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"]
        proc = subprocess.run(tests, capture_output=True, text=True)
        report["tests"] = proc.stdout.strip().splitlines()[-1:] + ([proc.stdout[-3000:]] if proc.returncode else [])
        print(proc.stdout[-3000:], flush=True)
    peak = measure_matmul_peak(torch.bfloat16, device, n=8192 if device == "cuda" else 512)
    report["bf16_matmul_peak_tflops"] = peak / 1e12
    print(f"measured bf16 matmul peak: {peak / 1e12:.1f} TFLOP/s", flush=True)
    shapes = SMOKE if args.smoke else SHAPES
    variants = [("bf16", True), ("bf16", False)] if device == "cuda" else [("fp32", False)]
    for name, preset, overrides, batch, context in shapes:
        for precision, compile in variants:
            try:
                row = train_throughput(preset, overrides, batch, context, precision, compile, args.steps, device)
            except Exception as e:  # one failing variant must not hide the others' figures
                row = {"error": f"{type(e).__name__}: {e}"[:500]}
            row.update(name=name, mfu=row.get("model_tflops", 0) * 1e12 / peak)
            if args.datasheet_tflops and "model_tflops" in row:
                row["mfu_datasheet"] = row["model_tflops"] / args.datasheet_tflops
            report["runs"].append(row)
            print(json.dumps(row), flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
    for precision in (["bf16", "fp32"] if device == "cuda" else ["fp32"]):
        row = generation_throughput("gpt2-tiny" if args.smoke else "gpt2-124m", device, precision, 200)
        report["generation"].append(row)
        print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("\n| model | precision | compile | tokens/s | model TFLOP/s | MFU (measured peak) | peak mem GB |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in report["runs"]:
        if "error" in r:
            print(f"| {r['name']} | error: {r['error'][:80]} |")
            continue
        mem = f"{r['peak_mem_gb']:.1f}" if r.get("peak_mem_gb") else "-"
        print(f"| {r['name']} | {r['precision']} | {r['compile']} | {r['tokens_per_s']:,.0f} | "
              f"{r['model_tflops']:.1f} | {r['mfu']:.1%} | {mem} |")  # fmt: skip
    for g in report["generation"]:
        print(f"generation {g['preset']} {g['precision']} batch 1: {g['tokens_per_s']:.0f} tokens/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
