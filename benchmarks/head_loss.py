"""The output head + next-token loss, both ways, on this machine: which one ``hardware.head_loss: auto`` should pick.

    python -m benchmarks.head_loss                      # the shapes below on the default device (cuda if present)
    python -m benchmarks.head_loss --device cpu --threads 2 --compile

``chunked`` is ``llmcore.models.ops.linear_cross_entropy`` (logits never held whole, head gradients built in the
forward pass); ``full`` is the (N, vocab) logits followed by ``F.cross_entropy``, the formulation
``torch.compile`` fuses on a GPU. Each is timed as forward + backward of the head and the loss alone, from the
final hidden states (N, C) and the (V, C) head weight, in fp32 and under bf16 autocast; ``--compile`` also times
``full`` compiled (inductor). Figures: milliseconds per call (median of ``--reps``) and the peak memory the call
allocates on CUDA. ``benchmarks/gpu.py`` runs it on the GPU at the GPT-2 124M shape.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Callable

import torch

from llmcore.models.ops import head_loss

# (name, rows N = batch x context, emb C, vocab V)
SHAPES = [
    ("bench: vocab 50257, emb 384, 4 x 256", 4 * 256, 384, 50257),
    ("default: llama3-tiny, vocab 1024, 8 x 256", 8 * 256, 128, 1024),
]
GPU_SHAPES = [("gpt2-124m: vocab 50257 (50304 padded), emb 768, 16 x 1024", 16 * 1024, 768, 50304)]
SMOKE = [("smoke", 64, 16, 101)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    N: int, C: int, V: int, device: torch.device, reps: int = 5, compile: bool = False, vocab_size: int | None = None
) -> list[dict]:
    """Rows of {impl, precision, ms, peak_mem_gb} for one shape; ``vocab_size`` < V scores only the first rows.

    The implementations take turns within each repetition (a busy machine slows them alike); ``ms`` is the
    median over ``reps``, after two untimed calls each (three for compiled ones: compile, then recompiles).
    """
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, C, generator=g).to(device).requires_grad_()
    weight = (torch.randn(V, C, generator=g) * 0.02).to(device).requires_grad_()
    real = vocab_size or V
    targets = torch.randint(0, real, (N,), generator=g).to(device)
    impls: list[tuple[str, Callable]] = [
        ("chunked", functools.partial(head_loss, impl="chunked", vocab_size=real)),
        ("full", functools.partial(head_loss, impl="full", vocab_size=real)),
    ]
    if compile:
        impls.append(("full, compiled", torch.compile(functools.partial(head_loss, impl="full", vocab_size=real))))
    rows = []
    for precision in ("fp32", "bf16"):

        def step(impl, precision=precision) -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = impl(hidden, weight, targets) / N
            loss.backward()
            hidden.grad = weight.grad = None
            _sync(device)

        walls: dict[str, list[float]] = {name: [] for name, _ in impls}
        peaks: dict[str, float | None] = {}
        for name, impl in impls:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            for _ in range(3 if "compiled" in name else 2):
                step(impl)
            peaks[name] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        for _ in range(reps):
            for name, impl in impls:
                start = time.perf_counter()
                step(impl)
                walls[name].append(time.perf_counter() - start)
        rows += [
            {
                "impl": name,
                "precision": precision,
                "ms": statistics.median(walls[name]) * 1e3,
                "peak_mem_gb": peaks[name],
            }
            for name, _ in impls
        ]
    return rows


def run(
    shapes: list[tuple[str, int, int, int]],
    device: torch.device,
    reps: int = 5,
    compile: bool = False,
    log: Callable[[str], None] = print,
) -> list[dict]:
    out = []
    for name, N, C, V in shapes:
        real = 50257 if V == 50304 else V
        rows = measure(N, C, V, device, reps, compile, vocab_size=real)
        for r in rows:
            log(f"{name} | {r['impl']} | {r['precision']} | {r['ms']:.1f} ms")
        out.append(
            {
                "shape": name,
                "rows": N,
                "emb": C,
                "vocab": V,
                "scored_vocab": real,
                "device": str(device),
                "results": rows,
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.head_loss", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time the full path under torch.compile")
    parser.add_argument("--smoke", action="store_true", help="one tiny shape (seconds)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shapes = SMOKE if args.smoke else (GPU_SHAPES if device.type == "cuda" else SHAPES)
    print(json.dumps(run(shapes, device, args.reps, args.compile), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
