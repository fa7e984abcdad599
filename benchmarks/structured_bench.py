"""Structured outputs: decode tokens/s with a JSON schema against without, on the serving engine.

    python -m benchmarks.structured_bench            # tiny and 124M-shaped random models (a few minutes on 2 cores)
    python -m benchmarks.structured_bench --quick    # tiny shape only, seconds (CI smoke)

What is measured, each figure the median of ``reps`` runs in the same process: aggregate decode tokens/s of the
continuous-batching engine (:mod:`llmcore.serve.engine`, no HTTP) with 1 stream and with 8 concurrent streams,
each request sampled (temperature 1) for a fixed budget, once unconstrained and once constrained by a JSON schema
(:mod:`llmcore.serve.structured`: a token mask per row before each sample). The ratio constrained / unconstrained
is the cost of the grammar (target: at least 0.7x). The schema (a list of at least 64 records with a string, an
integer and an enum) keeps every request inside the grammar for the whole budget and walks its strings, numbers,
keys and separators, so the masks are the kinds a real structured reply needs.

Tokenizers are real, because the mask's cost depends on the vocabulary: a byte-level BPE trained here for the tiny
model, GPT-2's own 50,257-token BPE for the 124M shape (read from ``../shared/data/mirror`` or ``$LLMCORE_MIRROR``;
without it that case uses a trained BPE and says so). Models are random (the speed of a forward pass does not
depend on the weights). Nothing here is asserted: figures and ratios are printed and written to
``reports/structured_bench.json``.
"""

from __future__ import annotations

import argparse
import os
import queue
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from llmcore.common import write_json_atomic
from llmcore.models.config import ModelConfig
from llmcore.models.generate import SamplingConfig
from llmcore.models.gpt import GPT
from llmcore.serve import structured
from llmcore.serve.engine import Engine, Finished, Request
from llmcore.text.tokenizer import Tokenizer
from llmcore.threads import inference_threads

REPO_ROOT = Path(__file__).resolve().parents[1]
GPT2_FILES = "openaipublic.blob.core.windows.net/gpt-2/encodings/main"
TARGET_RATIO = 0.7

SCHEMA = {
    "type": "object",
    "properties": {
        "records": {
            "type": "array",
            "minItems": 64,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 24},
                    "age": {"type": "integer", "minimum": 0, "maximum": 120},
                    "kind": {"enum": ["cat", "dog", "fish", "bird"]},
                },
                "required": ["name", "age", "kind"],
            },
        }
    },
    "required": ["records"],
}


@dataclass
class Case:
    name: str
    preset: str  # a ModelConfig preset (random weights)
    overrides: dict
    tokenizer: str  # "gpt2" (GPT-2's BPE from the mirror) or "bpe<N>" (trained here, N ids)
    prompt: int = 16  # prompt tokens
    new: int = 64  # tokens per request
    clients: tuple[int, ...] = (1, 8)
    reps: int = 3


CASES = [
    Case("tiny (llama3-tiny, 0.6M)", "llama3-tiny", {"context_length": 512}, "bpe1024"),
    Case("124M (gpt2-124m shape)", "gpt2-124m", {"context_length": 256}, "gpt2", new=48, reps=2),
]
QUICK = [Case("tiny (llama3-tiny)", "llama3-tiny", {"context_length": 256}, "bpe512", prompt=8, new=16, reps=1)]


def _words(n: int, seed: int = 0) -> str:
    """Pseudo-English with JSON in it: enough distinct pairs for a small BPE."""
    rng = random.Random(seed)
    syllables = ["ka", "to", "ri", "ne", "sa", "mo", "lu", "pe", "di", "go", "fa", "chi", "th", "er", "in", "on"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(n)]
    return " ".join(w if i % 9 else f'{{"name": "{w}", "age": {i % 97}}}' for i, w in enumerate(words))


def load_tokenizer(spec: str, log=print) -> Tokenizer:
    if spec == "gpt2":
        mirror = Path(os.environ.get("LLMCORE_MIRROR", "") or REPO_ROOT.parent / "shared" / "data" / "mirror")
        folder = mirror / GPT2_FILES
        if (folder / "encoder.json").exists():
            return Tokenizer.gpt2(folder / "encoder.json", folder / "vocab.bpe")
        log(f"  GPT-2's BPE not found under {mirror}: a trained 1024-id BPE instead (masks cost less than at 50k)")
        spec = "bpe1024"
    return Tokenizer.train(_words(20000), int(spec.removeprefix("bpe")))


def run_batch(engine: Engine, prompts: list[list[int]], new: int, grammar: structured.Grammar | None) -> float:
    """Submit one request per prompt at once; aggregate generated tokens per second until the last one ends."""
    done: queue.Queue = queue.Queue()
    counts = [0] * len(prompts)

    def sink(i: int):
        def put(event) -> None:
            if isinstance(event, Finished):
                counts[i] = event.completion_tokens
                done.put(event)

        return put

    start = time.perf_counter()
    with engine._cv:  # all admitted together: one batch from the first step
        for i, ids in enumerate(prompts):
            sampling = SamplingConfig(new, temperature=1.0, seed=i)  # no stop ids: each request runs its budget
            constraint = grammar.constraint() if grammar is not None else None
            engine.submit(Request(ids, sampling, sink(i), constraint=constraint))
    for _ in prompts:
        event = done.get(timeout=600)
        if event.reason not in ("length", "stop"):
            raise RuntimeError(f"a request ended with {event.reason}: {event.error}")
    return sum(counts) / (time.perf_counter() - start)


def bench_case(case: Case, log=print, threads: int | None = None) -> dict[str, Any]:
    tok = load_tokenizer(case.tokenizer, log)
    torch.manual_seed(0)
    model = GPT(
        ModelConfig.from_preset(case.preset, **{**case.overrides, "vocab_size": tok.vocab_size}, dropout=0.0)
    ).eval()
    began = time.perf_counter()
    grammar = structured.compile_schema(SCHEMA, tok, model.cfg.vocab_size, (tok.eot_id,))
    compile_ms = 1000 * (time.perf_counter() - began)  # the token table (once per tokenizer) and the schema
    # the server's thread policy (auto: one thread for a narrow model) and eager decoding on both paths: a decode
    # graph compiling in the background mid-run would time the compiler, not the mask
    threads = inference_threads(threads or "auto", model.cfg)
    engine = Engine(model, tok, max_batch=max(case.clients), threads=threads, compiled_decode=False).start()
    g = torch.Generator().manual_seed(0)
    results: dict[str, Any] = {
        "vocab_size": tok.vocab_size,
        "tokenizer": tok.name,
        "params": model.num_params(),
        "first_compile_ms": compile_ms,
        "threads": threads,
    }
    try:
        run_batch(engine, [[1, 2, 3]], 4, grammar)  # warm-up, both paths
        run_batch(engine, [[1, 2, 3]], 4, None)
        for n in case.clients:
            rates: dict[str, list[float]] = {"plain": [], "schema": []}
            for _ in range(case.reps):
                prompts = [torch.randint(0, tok.eot_id, (case.prompt,), generator=g).tolist() for _ in range(n)]
                for mode in ("plain", "schema"):  # the same prompts, back to back: the machine's load is shared
                    rates[mode].append(run_batch(engine, prompts, case.new, grammar if mode == "schema" else None))
            plain, schema = statistics.median(rates["plain"]), statistics.median(rates["schema"])
            results[f"streams_{n}"] = {
                "plain_tokens_per_s": plain,
                "schema_tokens_per_s": schema,
                "ratio": schema / plain,
                "runs": rates,
            }
            log(
                f"  {n} stream(s): {plain:.1f} tokens/s without a schema, {schema:.1f} with one ({schema / plain:.2f}x)"
            )
    finally:
        engine.stop()
    return results


def run(cases: list[Case], log=print, threads: int | None = None) -> dict[str, Any]:
    report: dict[str, Any] = {
        "torch": torch.__version__,
        "target_ratio": TARGET_RATIO,
        "cases": [],
    }
    for case in cases:
        log(f"{case.name}: prompt {case.prompt}, {case.new} new tokens per request, tokenizer {case.tokenizer}")
        report["cases"].append({"case": asdict(case), **bench_case(case, log, threads)})
    report["table"] = format_table(report)
    return report


def format_table(report: dict[str, Any]) -> str:
    rows = [
        "| model | vocab | streams | without schema tok/s | with schema tok/s | ratio (target >= 0.7x) |",
        "|---|---|---|---|---|---|",
    ]
    for entry in report["cases"]:
        for n in entry["case"]["clients"]:
            r = entry[f"streams_{n}"]
            rows.append(
                f"| {entry['case']['name']} | {entry['vocab_size']} | {n} | {r['plain_tokens_per_s']:.0f} | "
                f"{r['schema_tokens_per_s']:.0f} | {r['ratio']:.2f}x |"
            )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.structured_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shape only (CI smoke)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "reports" / "structured_bench.json", help="report JSON")
    parser.add_argument("--case", default="", help="run only the cases whose name starts with this (tiny, 124M)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="the engine's CPU threads (default: auto, as `llmcore serve`); 1 is steadier on a busy machine",
    )
    args = parser.parse_args(argv)
    cases = [c for c in (QUICK if args.quick else CASES) if c.name.startswith(args.case)]
    if not cases:
        parser.error(f"--case {args.case!r}: no such case")
    report = run(cases, threads=args.threads)
    write_json_atomic(args.out, report)
    print("\n" + report["table"] + f"\n\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
