"""Compiled decoding (``llmcore.models.static_decode``) against eager ``generate`` and llama.cpp, tokens per second.

    python -m benchmarks.compiled_decode                  # llama3-tiny and the gpt2-124m shape, batch 1 and 8,
                                                          # 1 and 2 threads, llama.cpp f32 beside batch 1 (~15 min)
    python -m benchmarks.compiled_decode --options        # what each step option buys, llama3-tiny (~3 min)
    python -m benchmarks.compiled_decode --compile-time   # compile seconds, cold (empty inductor cache) and warm
    python -m benchmarks.compiled_decode --batch-shapes   # per step: a graph per batch size, dynamic, all rows
    python -m benchmarks.compiled_decode --quick          # tiny shapes, one thread (the test)

``generate`` rows: greedy, equal-length prompts of 16 random tokens, ``--new`` new tokens per row, with the policy
``never`` (eager) and ``always`` (compiled, after a warm-up call that compiles); tokens per second over all rows,
best of ``--reps``, prefill included; each compiled run's tokens are compared with the eager ones. llama.cpp: the same
weights exported by ``llmcore.weights.gguf`` at f32, driven through llama-cpp-python's C API (one ``llama_decode``
per token, argmax of its logits: the loop ``generate`` runs), same prompt and thread count, batch 1.

``--options`` drives the library's decoder in a bare greedy loop (prefill eagerly, then decode steps) to price each
choice of the step against plain inductor: ``cpp_wrapper``, no dynamo guards on the model's modules, both (the
library's setting), the library's plus ``freezing``; and, on the library's decoder, the argmax outside the graph and
fresh input tensors from Python ints every step (instead of reusing the step's outputs and one slot tensor).
``--batch-shapes`` times single decode steps of 1 and 8 rows under each way of shaping the batch.
Writes ``reports/compiled_decode.json`` (``compiled_decode_<mode>.json`` for the other modes). The models are
random: speed does not depend on what the weights say.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.timing import repeat
from llmcore.common import write_json_atomic
from llmcore.models import static_decode
from llmcore.models.config import ModelConfig
from llmcore.models.generate import SamplingConfig, generate
from llmcore.models.gpt import GPT
from llmcore.models.static_decode import StaticDecoder, width_for

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPT = 16
QUICK = dict(vocab_size=280, context_length=64, emb_dim=32, n_layers=2, n_heads=2)  # test_static_decode.py's gpt2


def make_model(preset: str, quick: bool = False) -> GPT:
    torch.manual_seed(0)
    overrides = dict(QUICK) if quick else {"vocab_size": 1024} if "tiny" in preset else {}
    return GPT(ModelConfig.from_preset(preset, **overrides)).eval()


def prompts_for(model: GPT, batch: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, min(256, model.cfg.vocab_size), (batch, PROMPT), generator=g).tolist()


def best_seconds(fn, reps: int) -> float:
    return repeat(fn, reps, warmup=0).best


def first_difference(a: list[list[int]], b: list[list[int]]) -> int | None:
    """The first step at which any row differs (None: identical)."""
    for row_a, row_b in zip(a, b, strict=True):
        for i, (x, y) in enumerate(zip(row_a, row_b, strict=False)):
            if x != y:
                return i
    return None


def generate_rates(model: GPT, batch: int, new: int, reps: int) -> dict[str, Any]:
    """Eager and compiled ``generate`` on one model, batch and thread count (the current torch setting)."""
    prompts, cfg = prompts_for(model, batch), SamplingConfig(new)
    try:
        static_decode.set_policy("never")
        eager_tokens = generate(model, prompts, cfg)
        eager_s = best_seconds(lambda: generate(model, prompts, cfg), reps)
        static_decode.set_policy("always")
        start = time.perf_counter()
        compiled_tokens = generate(model, prompts, cfg)  # compiles (once per process, batch class and width)
        first_s = time.perf_counter() - start
        compiled_s = best_seconds(lambda: generate(model, prompts, cfg), reps)
    finally:
        static_decode.set_policy(None)
    decoder = static_decode.decoder_for(model, "always")
    n = batch * new
    return {
        "eager_tok_s": n / eager_s,
        "compiled_tok_s": n / compiled_s,
        "speedup": eager_s / compiled_s,
        "first_compiled_call_s": first_s,
        "compiled": decoder is not None and decoder.ready(batch, width_for(PROMPT + new, model.cfg.context_length)),
        "tokens_equal": first_difference(eager_tokens, compiled_tokens) is None,
        "first_difference": first_difference(eager_tokens, compiled_tokens),
    }


def llama_cpp_rate(model: GPT, new: int, threads: int, reps: int) -> dict[str, Any] | None:
    """llama.cpp f32 on the same weights, batch 1, greedy; None if llama-cpp-python or gguf is missing."""
    try:
        import llama_cpp
    except ImportError:
        return None
    from llmcore.text.tokenizer import Tokenizer
    from llmcore.weights.gguf import write_gguf

    # Any byte-level BPE tokenizer will do: ids are fed directly; rows it lacks are exported as unused tokens.
    text = "First Citizen: Before we proceed any further, hear me speak.\n" * 50
    tok = Tokenizer.train(text, min(300, model.cfg.vocab_size), pattern="gpt2")
    prompt = prompts_for(model, 1)[0]
    V = model.cfg.vocab_size
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.gguf"
        write_gguf(path, model, tok, precision="f32")
        llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=model.cfg.context_length,
            n_batch=PROMPT,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
        memory = llama_cpp.llama_get_memory(llm.ctx)
        prompt_arr = (llama_cpp.llama_token * PROMPT)(*prompt)
        one = (llama_cpp.llama_token * 1)()

        def run() -> list[int]:
            llama_cpp.llama_memory_clear(memory, True)
            if llama_cpp.llama_decode(llm.ctx, llama_cpp.llama_batch_get_one(prompt_arr, PROMPT)):
                raise RuntimeError("llama_decode failed")
            out = []
            for _ in range(new):
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(V,))
                out.append(int(logits.argmax()))
                one[0] = out[-1]
                if llama_cpp.llama_decode(llm.ctx, llama_cpp.llama_batch_get_one(one, 1)):
                    raise RuntimeError("llama_decode failed")
            return out

        theirs = run()
        seconds = best_seconds(run, reps)
        llm.close()
    static_decode.set_policy("never")
    try:
        ours = generate(model, [prompt], SamplingConfig(new))[0]
    finally:
        static_decode.set_policy(None)
    return {"tok_s": new / seconds, "first_difference_vs_llmcore": first_difference([ours], [theirs])}


# -- what each option of the step buys ---------------------------------------------------------------------------


def greedy_loop(model: GPT, decoder: StaticDecoder, batch: int, new: int, variant: str) -> list[list[int]]:
    """Prefill eagerly, then ``new - 1`` compiled greedy steps, the way ``generate`` runs them (``steps``), or with
    the argmax outside the graph (``argmax-outside``), or with fresh tensors and a sync per step (``fresh-tensors``)."""
    prompts = torch.tensor(prompts_for(model, batch))
    cache = model.new_cache(batch, model.cfg.context_length)
    width = width_for(PROMPT + new, model.cfg.context_length)
    logits = model(prompts, cache=cache, logits_to_keep=1).logits[:, -1]
    tokens = logits.argmax(-1)
    slot = torch.full((batch,), PROMPT, dtype=torch.long)
    start = torch.zeros(batch, dtype=torch.long)
    views = decoder.views(cache.k, cache.v, batch, width)
    out = [tokens]
    for i in range(new - 1):
        if variant == "fresh-tensors":  # new input tensors from Python ints every step
            ids = torch.tensor([[int(t)] for t in tokens.tolist()])
            fresh_slot, fresh_start = torch.tensor([PROMPT + i] * batch), torch.zeros(batch, dtype=torch.long)
            logits, tokens = decoder.step(*views, ids, fresh_slot, fresh_start)
        else:
            logits, tokens = decoder.step(*views, tokens[:, None], slot, start)
            slot += 1
            if variant == "argmax-outside":
                tokens = logits.argmax(-1)
        out.append(tokens)
    return torch.stack(out, 1).tolist()


NO_MODULE_GUARDS = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
LIBRARY = static_decode.COMPILE_SETTINGS["cpu"]["options"]
OPTIONS: dict[str, dict[str, Any]] = {
    "plain": {},
    "cpp_wrapper": {"cpp_wrapper": True},
    "no module guards": NO_MODULE_GUARDS,
    "library": LIBRARY,
    "library + freezing": {**LIBRARY, "freezing": True},
}
LOOP_VARIANTS = ("argmax-outside", "fresh-tensors")


def option_rates(model: GPT, batch: int, new: int, reps: int, log=print) -> dict[str, Any]:
    """Steps per second of the bare greedy loop for each option, all in this process, interleaved over ``reps``
    rounds (the best round of each counts), so machine load hits them alike."""
    reference = None
    runs: dict[str, Any] = {}
    with torch.no_grad():
        for name, options in OPTIONS.items():
            decoder = StaticDecoder(model, options=options)
            start = time.perf_counter()
            if not (decoder.compile(batch, width_for(PROMPT + new, model.cfg.context_length))):
                log(f"  {name}: compile failed ({decoder.failed})")
                continue
            compile_s = time.perf_counter() - start
            tokens = greedy_loop(model, decoder, batch, new, "steps")
            reference = reference or tokens
            runs[name] = (decoder, "steps", compile_s, tokens == reference)
        for variant in LOOP_VARIANTS:
            decoder = runs["library"][0]
            runs[f"library, {variant}"] = (
                decoder,
                variant,
                0.0,
                greedy_loop(model, decoder, batch, new, variant) == reference,
            )
        best = {name: float("inf") for name in runs}
        for _ in range(reps):
            for name, (decoder, variant, _, _) in runs.items():
                start = time.perf_counter()
                greedy_loop(model, decoder, batch, new, variant)
                best[name] = min(best[name], time.perf_counter() - start)
    rows = {
        name: {
            "tok_s": batch * new / best[name],
            "vs_plain": best["plain"] / best[name],
            "compile_s": runs[name][2],
            "tokens_equal": runs[name][3],
        }
        for name in runs
    }
    for name, row in rows.items():
        log(
            f"  {name:32s} {row['tok_s']:8.0f} tok/s  {row['vs_plain']:.2f}x plain  (compile {row['compile_s']:.1f} s"
            f"{'' if row['tokens_equal'] else ', TOKENS DIFFER'})"
        )
    return rows


# -- batch shapes: one graph per batch size, a dynamic batch, or always every row ------------------------------


def batch_shape_rates(model: GPT, rows: int, steps: int, reps: int, log=print) -> dict[str, Any]:
    """Per-step time of the ways to serve 1 and ``rows`` streams: a static graph per batch size, the library's
    dynamic graph for batches >= 2, and ``rows`` rows always (1 stream then costs a full batch)."""
    cfg = model.cfg
    width = width_for(PROMPT + steps, cfg.context_length)
    cache = model.new_batched_cache(rows)
    with torch.no_grad():
        for r, prompt in enumerate(prompts_for(model, rows)):
            model(torch.tensor([prompt]), cache=cache.rows(r, r + 1))
        library = StaticDecoder(model, options=LIBRARY)
        static = torch.compile(
            static_decode._own_copy(static_decode._decode_step), fullgraph=True, dynamic=False, options=LIBRARY
        )
        start = torch.zeros(rows, dtype=torch.long)
        ids = torch.zeros(rows, 1, dtype=torch.long)

        def timed(fn, n: int) -> float:
            views = StaticDecoder.views(cache.k, cache.v, n, width)
            slot = cache.lengths[:n].clone()
            fn(views, ids[:n], slot, start[:n])  # compiles on the first call
            best = float("inf")
            for _ in range(reps):
                slot.copy_(cache.lengths[:n])
                began = time.perf_counter()
                for _ in range(steps):
                    fn(views, ids[:n], slot, start[:n])
                    slot += 1
                best = min(best, (time.perf_counter() - began) / steps)
            return best

        def run_static(views, ids_, slot, start_):
            return static(model, *views, ids_, slot, start_)

        def run_library(views, ids_, slot, start_):
            n = ids_.shape[0]
            if not library.ready(n, width):
                library.compile(n, width)
            return library.step(*views, ids_, slot, start_)

        per_step = {
            "1 stream: static graph, batch 1 (library)": timed(run_library, 1),
            f"1 stream: always {rows} rows": timed(run_static, rows),
            f"{rows} streams: static graph, batch {rows}": timed(run_static, rows),
            f"{rows} streams: dynamic batch >= 2 graph (library)": timed(run_library, rows),
        }
    out = {}
    for name, seconds in per_step.items():
        streams = 1 if name.startswith("1 stream") else rows
        out[name] = {"us_per_step": seconds * 1e6, "tok_s": streams / seconds}
        log(f"  {name:48s} {seconds * 1e6:9.0f} us/step  {streams / seconds:8.0f} tok/s")
    return out


# -- compile time, cold and warm ---------------------------------------------------------------------------------


def compile_once(preset: str, batch: int, threads: int, quick: bool) -> float:
    """Seconds from a fresh process's first compiled ``generate`` call to its end, minus the same call eager."""
    torch.set_num_threads(threads)
    model = make_model(preset, quick)
    prompts, cfg = prompts_for(model, batch), SamplingConfig(8)
    static_decode.set_policy("never")
    generate(model, prompts, cfg)
    eager_s = best_seconds(lambda: generate(model, prompts, cfg), 1)
    static_decode.set_policy("always")
    return best_seconds(lambda: generate(model, prompts, cfg), 1) - eager_s


def compile_seconds(preset: str, batch: int, threads: int, quick: bool, cache_dir: str | None) -> float:
    env = dict(os.environ)
    if cache_dir is not None:
        env["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    code = (
        "import json, benchmarks.compiled_decode as b; "
        f"print(json.dumps(b.compile_once({preset!r}, {batch}, {threads}, {quick})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


# -- the run -----------------------------------------------------------------------------------------------------


def run(
    presets: list[str],
    batches: list[int],
    threads: list[int],
    new: dict[str, int],
    reps: int,
    quick: bool,
    llama: bool,
    log=print,
) -> list[dict[str, Any]]:
    rows = []
    for preset in presets:
        model = make_model(preset, quick)
        for t in threads:
            torch.set_num_threads(t)
            for batch in batches:
                row = {
                    "preset": preset,
                    "params": model.num_params(),
                    "threads": t,
                    "batch": batch,
                    "new": new[preset],
                    **generate_rates(model, batch, new[preset], reps),
                }
                if llama and batch == 1:
                    row["llama_cpp_f32"] = llama_cpp_rate(model, new[preset], t, reps)
                    if row["llama_cpp_f32"]:
                        row["compiled_vs_llama_cpp"] = row["compiled_tok_s"] / row["llama_cpp_f32"]["tok_s"]
                        row["eager_vs_llama_cpp"] = row["eager_tok_s"] / row["llama_cpp_f32"]["tok_s"]
                rows.append(row)
                cpp = row.get("llama_cpp_f32")
                same = "equal" if row["tokens_equal"] else f"differ at step {row['first_difference']}"
                log(
                    f"{preset} batch {batch} threads {t}: generate eager {row['eager_tok_s']:.0f} tok/s, compiled "
                    f"{row['compiled_tok_s']:.0f} tok/s ({row['speedup']:.2f}x; first call "
                    f"{row['first_compiled_call_s']:.1f} s; tokens {same})"
                    + (
                        f"; llama.cpp f32 {cpp['tok_s']:.0f} tok/s: compiled/llama.cpp "
                        f"{row['compiled_vs_llama_cpp']:.2f}x"
                        if cpp
                        else ""
                    ),
                    flush=True,
                )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compiled_decode", description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="llama3-tiny,gpt2-124m")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--threads", default="1,2", help="torch intra-op thread counts")
    parser.add_argument("--new", type=int, default=100, help="new tokens per row (the 124M shape: half)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp")
    parser.add_argument("--options", action="store_true", help="price each option of the step (llama3-tiny)")
    parser.add_argument("--compile-time", action="store_true", help="compile seconds, cold and warm (subprocesses)")
    parser.add_argument("--batch-shapes", action="store_true", help="graph per batch size vs dynamic vs all rows")
    parser.add_argument("--quick", action="store_true", help="a tiny gpt2, batch 1 and 3, 1 thread, 8 tokens")
    parser.add_argument("--out", type=Path, help="default: reports/compiled_decode[_MODE].json")
    args = parser.parse_args(argv)
    mode = next((m for m in ("options", "compile_time", "batch_shapes") if getattr(args, m)), None)
    args.out = args.out or REPO_ROOT / "reports" / f"compiled_decode{'_' + mode if mode else ''}.json"
    presets = args.presets.split(",")
    batches, threads = [int(b) for b in args.batches.split(",")], [int(t) for t in args.threads.split(",")]
    new = {p: args.new if "tiny" in p else max(args.new // 2, 1) for p in presets}
    if args.quick:
        presets, batches, threads, new, args.reps = ["gpt2-tiny"], [1, 3], [1], {"gpt2-tiny": 8}, 1
    report: dict[str, Any] = {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "prompt": PROMPT,
        "load_average_start": os.getloadavg(),
    }
    if args.compile_time:
        with tempfile.TemporaryDirectory() as cold_dir:
            report["compile_s"] = {}
            for preset in presets:
                cold = compile_seconds(preset, 1, threads[0], args.quick, cold_dir)
                warm = compile_seconds(preset, 1, threads[0], args.quick, cold_dir)  # the cache the cold run filled
                report["compile_s"][preset] = {"cold": cold, "warm": warm}
                print(
                    f"{preset}: compile (batch 1, {threads[0]} thread) cold {cold:.1f} s, warm cache {warm:.1f} s",
                    flush=True,
                )
    elif args.batch_shapes:
        report["batch_shapes"] = {}
        for t in threads:
            torch.set_num_threads(t)
            for preset in presets:
                print(f"{preset}, {t} thread(s): per decode step, 1 and {max(batches)} streams", flush=True)
                report["batch_shapes"][f"{preset}-threads{t}"] = batch_shape_rates(
                    make_model(preset, args.quick), max(batches), min(new[preset], 32), args.reps
                )
    elif args.options:
        model = make_model(presets[0], args.quick)
        report["options"] = {}
        for t in threads:
            torch.set_num_threads(t)
            for batch in batches:
                print(f"{presets[0]} batch {batch}, {t} thread(s): the bare greedy loop, each option", flush=True)
                report["options"][f"batch{batch}-threads{t}"] = option_rates(model, batch, new[presets[0]], args.reps)
    else:
        report["generate"] = run(presets, batches, threads, new, args.reps, args.quick, not args.no_llama_cpp)
    report["load_average_end"] = os.getloadavg()
    write_json_atomic(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
