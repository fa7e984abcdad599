"""The GPU check, one prepared run of at most 8 minutes: training MFU at real shapes, decoding, a kernel profile.

    python -m benchmarks.gpu                         # on a CUDA machine: writes reports/gpu/<device>.json
    python -m benchmarks.gpu --smoke                 # tiny shapes on the CPU in seconds: the script itself works
    python -m benchmarks.gpu --budget 300 --tests    # a shorter budget; also run tests/test_cuda.py (if time is left)

Sections, in priority order; each runs only while the budget has room for it (a skipped one is listed with
its reason), the report is rewritten after every section, and a watchdog ends the process at the budget:

1. ``train``: GPT-2 124M (OpenAI's shape, vocabulary padded to a multiple of 64, context 1024) and a
   nanochat-d12-like Llama-3-style model (context 2048), bf16 autocast, compiled, through the pipeline's own
   loop (``llmcore.training.loop.fit``: fused AdamW, head + loss inside the compiled forward, syncs at log
   intervals only) on random tokens. The batch is the largest that an eager step's measured memory says fits
   in 85% of the device (``--batch`` forces one). Figures: tokens/s, model TFLOP/s (``flops_per_token``: 6N +
   12·L·C·T), MFU against the datasheet dense bf16 peak of the detected device (H100 SXM and H200 989, H100
   PCIe 756, A100 312 TFLOP/s; ``--datasheet-tflops`` for others) and against a measured bf16 matmul peak,
   peak memory.
2. ``profile``: the 10 kernels with the most device time in one compiled training step of GPT-2 124M.
3. ``decode``: ``llmcore.models.generate`` tokens/s at batch 1 and 8, fp32 and bf16 weights, greedy; and a
   hook for a CUDA-graph decode path (``cuda_graph_decode``) that llmcore does not offer yet.
4. ``head_loss``: the output head + loss, chunked against full logits (eager and compiled), at the 124M shape
   (``benchmarks/head_loss.py``): what ``hardware.head_loss: auto`` picks on CUDA, measured.
5. ``variants``: GPT-2 124M without the padded vocabulary, and with the chunked head + loss.
6. ``tests``: ``tests/test_cuda.py`` (only with ``--tests``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import head_loss as head_loss_bench
from llmcore.data.tokens import RandomWindows
from llmcore.models.config import ModelConfig
from llmcore.models.generate import SamplingConfig, generate
from llmcore.models.gpt import GPT
from llmcore.training.config import HardwareConfig, TrainConfig
from llmcore.training.flops import measure_matmul_peak
from llmcore.training.loop import fit, lm_loss

REPO_ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 450  # the whole run, start to report; with imports and the watchdog's grace under 8 minutes
BATCHES = (128, 96, 64, 48, 32, 24, 16, 12, 8, 4, 2, 1)  # candidate micro-batches, largest first
MEMORY_FRACTION = 0.85  # of the device's memory that the chosen batch's (eager) step may use

# name -> (preset, overrides, context): the shapes the issue names
SHAPES: dict[str, tuple[str, dict[str, Any], int]] = {
    "gpt2-124m": ("gpt2-124m", {"pad_vocab_multiple": 64}, 1024),
    "llama-d12": (
        "llama3-tiny",
        dict(
            n_layers=12,
            emb_dim=768,
            n_heads=6,
            n_kv_heads=6,
            hidden_dim=3072,
            vocab_size=65536,
            context_length=2048,
            rope_theta=10000.0,
        ),
        2048,
    ),
}
SMOKE_SHAPES: dict[str, tuple[str, dict[str, Any], int]] = {
    "gpt2-tiny": ("gpt2-tiny", {"vocab_size": 250, "pad_vocab_multiple": 64, "n_layers": 2}, 32),
    "llama-tiny": ("llama3-tiny", {"vocab_size": 256, "n_layers": 2}, 32),
}


def datasheet_tflops(name: str) -> tuple[float | None, str]:
    """(dense bf16 TFLOP/s without sparsity, which part) from the device name; None for devices not listed."""
    n = name.upper()
    if "H200" in n:
        return 989.0, "H200 (dense bf16, as H100 SXM)"
    if "H100" in n and "PCIE" in n:
        return 756.0, "H100 PCIe (dense bf16)"
    if "H100" in n and "NVL" not in n:
        return 989.0, "H100 SXM (dense bf16)"
    if "A100" in n:
        return 312.0, "A100 (dense bf16)"
    return None, f"{name}: no datasheet figure here (pass --datasheet-tflops)"


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3': the report's file name."""
    name = re.sub(r"^nvidia\s+", "", name.strip(), flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


class Budget:
    """Seconds left of the run; a section asks before it starts."""

    def __init__(self, total_s: float):
        self.total_s, self.start = total_s, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.total_s - self.elapsed()


class Report:
    """The report dict, written to ``path`` after every section (``status`` stays partial until the end)."""

    def __init__(self, path: Path, data: dict[str, Any], budget: Budget):
        self.path, self.data, self.budget = path, data, budget
        self.lock = threading.Lock()

    def write(self, status: str = "partial") -> None:
        with self.lock:
            self.data.update(status=status, elapsed_s=round(self.budget.elapsed(), 1))
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n", encoding="utf-8")
            os.replace(tmp, self.path)


def watchdog(report: Report, budget: Budget, grace_s: float = 10.0) -> threading.Event:
    """End the process when the budget (plus ``grace_s``) runs out, after writing what was measured; set the
    returned event to call it off."""
    done = threading.Event()

    def run() -> None:
        while budget.left() > -grace_s:
            if done.wait(1.0):
                return
        report.data.setdefault("skipped", []).append({"section": "(all that was left)", "reason": "budget"})
        report.write("stopped at the budget")
        print(f"budget of {budget.total_s:.0f} s spent: report written to {report.path}", flush=True)
        os._exit(3)

    threading.Thread(target=run, daemon=True).start()
    return done


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def model_config(shape: tuple[str, dict[str, Any], int], **overrides: Any) -> ModelConfig:
    preset, fields, context = shape
    return ModelConfig.from_preset(preset, **{**fields, "context_length": context, **overrides})


def eager_step_memory(cfg: ModelConfig, batch: int, device: torch.device) -> int:
    """Peak bytes of one eager bf16 forward + backward at ``batch`` (weights, grads, activations)."""
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    idx = torch.randint(0, cfg.vocab_size, (batch, cfg.context_length), device=device)
    _free(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = model(idx, targets=idx, loss_reduction="mean").loss
    loss.backward()
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    del model, loss, idx
    _free(device)
    return peak


def largest_batch(one: int, two: int, n_params: int, total_memory: int) -> tuple[int, int, int]:
    """(batch, bytes per sequence, fixed bytes): the largest of ``BATCHES`` whose step, extrapolated linearly from
    the peaks ``one`` and ``two`` of eager steps at batch 1 and 2, plus AdamW's two fp32 moments, fits in
    ``MEMORY_FRACTION`` of ``total_memory``; 1 when none does."""
    per_row = max(two - one, 1)
    fixed = one - per_row + 2 * 4 * n_params
    fits = [b for b in BATCHES if fixed + per_row * b <= MEMORY_FRACTION * total_memory]
    return (fits[0] if fits else 1), per_row, fixed


def pick_batch(cfg: ModelConfig, device: torch.device, forced: int | None = None) -> tuple[int, str]:
    """(micro-batch, how it was chosen): ``largest_batch`` from two measured eager steps on CUDA."""
    if forced:
        return forced, "forced (--batch)"
    if device.type != "cuda":
        return 4, "smoke"
    one, two = eager_step_memory(cfg, 1, device), eager_step_memory(cfg, 2, device)
    total = torch.cuda.get_device_properties(device).total_memory
    batch, per_row, fixed = largest_batch(one, two, cfg.num_params(), total)
    return batch, f"{per_row / 2**30:.2f} GiB per sequence (eager step), {fixed / 2**30:.1f} GiB fixed"


def train_run(
    name: str, cfg: ModelConfig, batch: int, device: torch.device, steps: int, compile: bool, head_loss: str = "auto"
) -> tuple[dict[str, Any], GPT]:
    """Warm-up steps (compile, autotuning) in a first ``fit``, then ``steps`` timed ones in a second (the same
    model object, so the compiled graphs are reused). Returns the figures and the trained model."""
    T = cfg.context_length
    torch.manual_seed(0)
    model = GPT(cfg)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=max(4_000_000, 4 * batch * (T + 1)))
    tokens = tokens.astype(np.uint32)
    pin = device.type == "cuda"
    train = RandomWindows(tokens, batch, T, seed=1, pin_memory=pin)
    val = RandomWindows(tokens, batch, T, seed=2, pin_memory=pin)
    warm = 10 if device.type == "cuda" else 2
    precision = "bf16"
    tc = dict(
        batch_size=batch,
        lr=6e-4,
        min_lr=6e-5,
        warmup_steps=warm,
        eval_every=10**6,
        checkpoint_every=10**6,
        eval_batches=1,
        log_every=10**6,
    )
    hw = HardwareConfig(device=device.type, precision=precision, compile=compile, head_loss=head_loss)
    _free(device)
    with tempfile.TemporaryDirectory() as tmp:
        first = fit(model, train, val, lm_loss, TrainConfig(max_steps=warm, **tc), hw, tmp)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = fit(model, train, val, lm_loss, TrainConfig(max_steps=warm + steps, **tc), hw, tmp)
        wall = time.perf_counter() - start
    flops = cfg.flops_per_token(T)
    return {
        "name": name,
        "params": cfg.num_params(),
        "vocab_size": cfg.vocab_size,
        "pad_vocab_multiple": cfg.pad_vocab_multiple,
        "head_loss": model.head_loss,
        "batch": batch,
        "context": T,
        "precision": precision,
        "compile": compile,
        "steps": result.step,
        "tokens": result.items_seen,
        "tokens_per_s": result.items_per_s,
        "flops_per_token": flops,
        "model_tflops": flops * result.items_per_s / 1e12,
        "final_loss": result.train_loss,
        "warmup_loss": first.train_loss,
        "wall_s": wall,
        "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }, model


def add_mfu(row: dict[str, Any], datasheet: float | None, measured: float) -> dict[str, Any]:
    if "model_tflops" in row:
        row["mfu_datasheet"] = row["model_tflops"] / datasheet if datasheet else None
        row["mfu_measured_peak"] = row["model_tflops"] / measured if measured else None
    return row


def profile_step(model: GPT, batch: int, device: torch.device, compile: bool, top: int = 10) -> dict:
    """The ``top`` kernels (CPU ops on a CPU) by device time in one training step of ``model`` (a model ``fit``
    trained: its compiled graphs are reused), after three warm-up steps."""
    from torch.profiler import ProfilerActivity, profile

    cfg = model.cfg
    model = model.to(device).train()
    step_model = torch.compile(model) if compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    idx = torch.randint(0, cfg.vocab_size, (batch, cfg.context_length), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = step_model(idx, targets=idx, loss_reduction="mean").loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        _sync(device)
    events = prof.key_averages()
    if device.type == "cuda":
        kernels = [e for e in events if str(e.device_type).endswith("CUDA")]

        def us(e):
            return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
    else:
        kernels = [e for e in events if e.self_cpu_time_total > 0]

        def us(e):
            return e.self_cpu_time_total

    total = sum(us(e) for e in kernels) or 1.0
    ranked = sorted(kernels, key=us, reverse=True)[:top]
    return {
        "batch": batch,
        "context": cfg.context_length,
        "kind": "kernels" if device.type == "cuda" else "cpu ops",
        "step_ms": total / 1e3,
        "top": [{"name": e.key[:160], "calls": e.count, "ms": us(e) / 1e3, "share": us(e) / total} for e in ranked],
    }


def decode_run(cfg: ModelConfig, device: torch.device, precision: str, batch: int, new_tokens: int) -> dict:
    """Greedy tokens/s of ``generate`` (KV cache) with fp32 or bf16 weights, ``batch`` 20-token prompts."""
    torch.manual_seed(0)
    model = GPT(cfg).to(device).eval()
    if precision == "bf16":
        model.to(torch.bfloat16)
    prompts = [[(13 * b + i) % cfg.vocab_size for i in range(1, 21)] for b in range(batch)]
    generate(model, prompts, SamplingConfig(max_new_tokens=8, temperature=0.0))  # warm-up
    _sync(device)
    start = time.perf_counter()
    out = generate(model, prompts, SamplingConfig(max_new_tokens=new_tokens, temperature=0.0))
    _sync(device)
    dt = time.perf_counter() - start
    made = sum(len(o) for o in out)
    del model
    _free(device)
    return {
        "mode": "generate",
        "precision": precision,
        "batch": batch,
        "new_tokens": made // batch,
        "tokens_per_s": made / dt,
        "steps_per_s": (made / batch) / dt,
    }


def cuda_graph_decode(cfg: ModelConfig, device: torch.device, batch: int, new_tokens: int) -> dict:
    """HOOK (issue #26, item 2): a static-shape decode step over a preallocated KV cache, captured in a CUDA graph
    (``torch.compile(mode="reduce-overhead")``), timed like ``decode_run`` after checking its greedy tokens
    against ``generate``'s. llmcore offers no such path yet, so this reports it as skipped; when it does, call it
    here and return the same keys as ``decode_run`` with ``"mode": "cuda-graph"``."""
    return {
        "mode": "cuda-graph",
        "batch": batch,
        "skipped": "llmcore has no compiled decode path yet (hook: benchmarks/gpu.py cuda_graph_decode)",
    }


def run_tests() -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT)
    lines = proc.stdout.strip().splitlines()
    return {
        "returncode": proc.returncode,
        "summary": lines[-1:] if lines else [],
        "output": proc.stdout[-3000:] if proc.returncode else "",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="report path (default reports/gpu/<device>.json)")
    parser.add_argument("--budget", type=float, default=None, help=f"seconds for the whole run (default {BUDGET_S})")
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps per training run")
    parser.add_argument("--batch", type=int, default=None, help="micro-batch for every training run")
    parser.add_argument("--new-tokens", type=int, default=100, help="decoded tokens per decode run")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, no compile: seconds")
    parser.add_argument("--tests", action="store_true", help="also run tests/test_cuda.py, if time is left")
    parser.add_argument("--datasheet-tflops", type=float, default=None, help="dense bf16 peak, for other devices")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    sheet, sheet_what = datasheet_tflops(name) if cuda else (None, "cpu: no datasheet figure")
    if args.datasheet_tflops:
        sheet, sheet_what = args.datasheet_tflops, f"{name}: --datasheet-tflops"
    budget = Budget(args.budget or (BUDGET_S if cuda else 120))
    out = args.out or REPO_ROOT / "reports" / "gpu" / f"{device_slug(name)}.json"
    if cuda:
        torch.set_float32_matmul_precision("high")  # as the training runtime does on CUDA
    shapes, compile = (SHAPES, True) if cuda else (SMOKE_SHAPES, False)
    steps = args.steps if cuda else 2
    report = Report(
        out,
        {
            "device": name,
            "torch": torch.__version__,
            "smoke": not cuda,
            "budget_s": budget.total_s,
            "datasheet_bf16_tflops": sheet,
            "datasheet": sheet_what,
            "train": [],
            "decode": [],
            "skipped": [],
        },
        budget,
    )
    done = watchdog(report, budget) if cuda else None  # the CPU smoke run (also inside pytest) is never killed
    print(
        f"device: {name}; datasheet dense bf16 peak: {sheet if sheet else 'unknown'} TFLOP/s ({sheet_what}); "
        f"budget {budget.total_s:.0f} s",
        flush=True,
    )

    def section(label: str, needs_s: float, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` if at least ``needs_s`` seconds are left; record a skip or an error, write the report."""
        if budget.left() < (needs_s if cuda else 0):
            report.data["skipped"].append(
                {"section": label, "reason": f"budget: {budget.left():.0f} s left, needs ~{needs_s:.0f} s"}
            )
            print(f"skipped {label}: budget", flush=True)
            return None
        print(f"[{budget.elapsed():5.0f} s] {label}", flush=True)
        try:
            return fn()
        except Exception as e:  # one failing section must not hide the others' figures
            report.data["skipped"].append({"section": label, "reason": f"{type(e).__name__}: {e}"[:500]})
            print(f"{label}: {type(e).__name__}: {e}"[:500], flush=True)
            _free(device)
            return None
        finally:
            report.write()

    peak = section("bf16 matmul peak", 20, lambda: measure_matmul_peak(torch.bfloat16, device, n=8192 if cuda else 256))
    peak = peak or math.nan
    report.data["matmul_peak_bf16_tflops"] = peak / 1e12

    batches: dict[str, int] = {}
    trained: dict[str, GPT] = {}

    def train(label: str, shape_name: str, **overrides: Any) -> None:
        head = overrides.pop("head_loss", "auto")
        cfg = model_config(shapes[shape_name], **overrides)
        if shape_name not in batches:
            batches[shape_name], why = pick_batch(cfg, device, args.batch)
            print(f"  batch {batches[shape_name]}: {why}", flush=True)
        row, model = train_run(label, cfg, batches[shape_name], device, steps, compile, head)
        if label == shape_name:
            trained[label] = model  # profiled below
        report.data["train"].append(add_mfu(row, sheet, peak / 1e12))
        keys = ("tokens_per_s", "model_tflops", "mfu_datasheet", "mfu_measured_peak", "peak_mem_gb", "batch")
        print("  " + json.dumps({k: row[k] for k in keys}), flush=True)

    first, second = list(shapes)
    section(f"train {first}", 150, lambda: train(first, first))
    if first in trained:
        report.data["profile"] = section(
            f"profile {first}", 60, lambda: profile_step(trained.pop(first), batches[first], device, compile)
        )
    trained.clear()
    _free(device)
    for precision in ("fp32", "bf16"):
        for batch in (1, 8):
            row = section(
                f"decode {first} {precision} batch {batch}",
                25,
                lambda p=precision, b=batch: decode_run(
                    model_config(shapes[first]), device, p, b, args.new_tokens if cuda else 8
                ),
            )
            if row:
                report.data["decode"].append(row)
    report.data["decode"].append(cuda_graph_decode(model_config(shapes[first]), device, 1, args.new_tokens))
    section(f"train {second}", 150, lambda: train(second, second))
    hl_shapes = head_loss_bench.GPU_SHAPES if cuda else head_loss_bench.SMOKE
    report.data["head_loss"] = section(
        "head + loss, chunked vs full",
        90,
        lambda: head_loss_bench.run(
            hl_shapes, device, reps=10 if cuda else 2, compile=cuda, log=lambda s: print("  " + s, flush=True)
        ),
    )
    section(
        f"train {first}, vocabulary not padded",
        120,
        lambda: train(f"{first} (vocabulary not padded)", first, pad_vocab_multiple=None),
    )
    section(
        f"train {first}, chunked head + loss",
        120,
        lambda: train(f"{first} (chunked head + loss)", first, head_loss="chunked"),
    )
    if args.tests:
        report.data["tests"] = section("tests/test_cuda.py", 90, run_tests)

    if done is not None:
        done.set()
    report.write("complete")
    print_tables(report.data)
    print(f"report: {out}")
    return 0


def print_tables(data: dict[str, Any]) -> None:
    def pct(x):
        return f"{x:.1%}" if isinstance(x, float) else "-"

    print(
        f"\n{data['device']}: datasheet {data['datasheet_bf16_tflops']} TFLOP/s ({data['datasheet']}), measured "
        f"bf16 matmul {data.get('matmul_peak_bf16_tflops', math.nan):.1f} TFLOP/s"
    )
    print("\n| run | batch × ctx | tokens/s | model TFLOP/s | MFU (datasheet) | MFU (measured peak) | peak mem GB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in data["train"]:
        mem = f"{r['peak_mem_gb']:.1f}" if r.get("peak_mem_gb") else "-"
        print(
            f"| {r['name']} ({r['head_loss']}) | {r['batch']} × {r['context']} | {r['tokens_per_s']:,.0f} | "
            f"{r['model_tflops']:.1f} | {pct(r.get('mfu_datasheet'))} | {pct(r.get('mfu_measured_peak'))} | {mem} |"
        )
    for d in data["decode"]:
        if "skipped" in d:
            print(f"decode {d['mode']} batch {d['batch']}: skipped ({d['skipped']})")
        else:
            print(f"decode {d['precision']} batch {d['batch']}: {d['tokens_per_s']:,.0f} tokens/s")
    if data.get("profile"):
        print(f"\ntop kernels of one step ({data['profile']['step_ms']:.1f} ms):")
        for k in data["profile"]["top"]:
            print(f"  {k['share']:6.1%} {k['ms']:8.2f} ms x{k['calls']:<4} {k['name'][:100]}")
    for s in data["skipped"]:
        print(f"skipped {s['section']}: {s['reason']}")


if __name__ == "__main__":
    raise SystemExit(main())
