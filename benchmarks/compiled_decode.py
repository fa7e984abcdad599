"""Compiled decoding (``llmcore.models.static_decode``) against eager ``generate`` and llama.cpp, tokens per second.

    python -m benchmarks.compiled_decode                  # llama3-tiny and the gpt2-124m shape, batch 1 and 8,
                                                          # 1 and 2 threads, llama.cpp f32 beside batch 1 (~15 min)
    python -m benchmarks.compiled_decode --options        # the AOT package against the JIT step, llama3-tiny
    python -m benchmarks.compiled_decode --compile-time   # build (empty cache) and load (cached), fresh processes
    python -m benchmarks.compiled_decode --batch-shapes   # per step: a package per batch size, dynamic, all rows
    python -m benchmarks.compiled_decode --quick          # tiny shapes, one thread (the test)

``generate`` rows: greedy, equal-length prompts of 16 random tokens, ``--new`` new tokens per row, with the policy
``never`` (eager) and ``always`` (compiled, after a warm-up call that loads the package from the decode cache or
builds it there); tokens per second over all rows, best of ``--reps``, prefill included; each compiled run's tokens
are compared with the eager ones. llama.cpp: the same weights exported by ``llmcore.weights.gguf`` at f32, driven
through llama-cpp-python's C API (one ``llama_decode`` per token, argmax of its logits: the loop ``generate`` runs),
same prompt and thread count, batch 1.

``--options`` drives a bare greedy loop (prefill eagerly, then decode steps; only the steps are timed) to price the
ahead-of-time package the library loads against the JIT way it replaced: ``torch.compile`` of the same step
function (``static_decode._decode_step``) with inductor's ``cpp_wrapper`` and no dynamo guards on the model's modules
(the library's setting before its packages, set here in the benchmark), a static batch 1 graph and one with a dynamic
batch >= 2 as the library's; and, on the library's package, the argmax outside the graph and fresh input tensors
from Python ints every step (instead of reusing the step's outputs and one slot tensor). All in one process,
interleaved over ``--reps`` rounds (the best round of each counts), so machine load hits them alike; compile seconds
are the JIT's first call (inductor's own on-disk cache as found) and the package's load or build.
``--compile-time`` runs each model in fresh processes, batch 1: cold, the decode cache an empty temporary folder (the
package is built); warm, the same folder again (the package loads), with the policy ``always`` and with the default
``auto`` (which times ``MEASURE_STEPS`` eager steps before its first compiled one); each reports the seconds of the
load or build and from the start of the process's first ``generate`` to its first compiled step.
``--batch-shapes`` times single decode steps of 1 and 8 rows under each way of shaping the batch: the library's
batch-1 package and its dynamic batch >= 2 package against a package built here the same way (the library's step,
weights as inputs, the same inductor settings) for exactly 8 rows, run for 8 streams and for 1 stream padded to 8.
Writes ``reports/compiled_decode.json`` (``compiled_decode_<mode>.json`` for the other modes). Only
``--compile-time`` uses a temporary decode cache; the other modes use the default one (``$LLMCORE_DECODE_CACHE``,
else ``~/.cache/llmcore/decode``), where the library's packages stay for later runs. The models are random: speed
does not depend on what the weights say.
"""

from __future__ import annotations

import argparse
import json
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
    width = width_for(PROMPT + new, model.cfg.context_length)
    try:
        static_decode.set_policy("never")
        eager_tokens = generate(model, prompts, cfg)
        eager_s = best_seconds(lambda: generate(model, prompts, cfg), reps)
        static_decode.set_policy("always")
        decoder = static_decode.decoder_for(model, "always")
        loaded = decoder.loaded if decoder is not None else 0
        ready = decoder is not None and decoder.ready(batch, width)
        start = time.perf_counter()
        compiled_tokens = generate(model, prompts, cfg)  # loads the package or builds it (once per process)
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
        # how the first compiled call got its step: loaded from the decode cache, built there, or ready already
        "package": "ready" if ready else "loaded" if decoder is not None and decoder.loaded > loaded else "built",
        "compiled": decoder is not None and decoder.ready(batch, width),
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


# -- the AOT package against the JIT step it replaced -------------------------------------------------------------

# The library's CPU setting before its packages: torch.compile of the step with the graph's launcher in C++ and no
# dynamo guards on the model's modules (the library checks the model's structure itself).
JIT_OPTIONS = {"cpp_wrapper": True, "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
LOOP_VARIANTS = ("argmax-outside", "fresh-tensors")


def scratch(model: GPT, rows: int, width: int) -> tuple[list, list, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step inputs laid out like a cache's (full-context buffers seen through width-wide views), as the library's
    builds use: k, v, ids, slot, start."""
    cfg, w = model.cfg, model.tok_emb.weight
    shape = (rows, cfg.n_kv_heads, cfg.context_length, cfg.head_dim)
    k = [torch.zeros(shape, dtype=w.dtype, device=w.device)[:, :, :width] for _ in range(cfg.n_layers)]
    v = [torch.zeros(shape, dtype=w.dtype, device=w.device)[:, :, :width] for _ in range(cfg.n_layers)]
    ids = torch.zeros(rows, 1, dtype=torch.long, device=w.device)
    return k, v, ids, torch.zeros(rows, dtype=torch.long), torch.zeros(rows, dtype=torch.long)


class JitStep:
    """``torch.compile`` of ``static_decode._decode_step`` with :data:`JIT_OPTIONS`, the way the library compiled it
    before (in this process, nothing kept on disk but inductor's own cache): a static graph for batch 1, a dynamic
    batch dimension for batch >= 2. Same interface as :class:`StaticDecoder` for :func:`greedy_loop`."""

    views = staticmethod(StaticDecoder.views)

    def __init__(self, model: GPT):
        self.model = model
        self.fn = torch.compile(static_decode._decode_step, fullgraph=True, dynamic=False, options=JIT_OPTIONS)

    def compile(self, n: int, width: int) -> None:
        k, v, ids, slot, start = scratch(self.model, 2 if n > 1 else 1, width)
        if n > 1:
            for t in (*k, *v, ids, slot, start):
                torch._dynamo.mark_dynamic(t, 0, min=2, max=1 << 16)
        self.fn(self.model, k, v, ids, slot, start)  # traces and compiles

    def step(self, k, v, ids, slot, start) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fn(self.model, k, v, ids, slot, start)


def greedy_loop(model: GPT, decoder, batch: int, new: int, variant: str) -> tuple[list[list[int]], float]:
    """Prefill eagerly, then ``new - 1`` compiled greedy steps the way ``generate`` runs them (``steps``), or with the
    argmax outside the graph (``argmax-outside``), or with fresh tensors and a sync per step (``fresh-tensors``).
    Returns the ``new`` tokens per row and the seconds of the decode steps (the prefill not counted)."""
    prompts = torch.tensor(prompts_for(model, batch))
    cache = model.new_cache(batch, model.cfg.context_length)
    width = width_for(PROMPT + new, model.cfg.context_length)
    logits = model(prompts, cache=cache, logits_to_keep=1).logits[:, -1]
    tokens = logits.argmax(-1)
    slot = torch.full((batch,), PROMPT, dtype=torch.long)
    start = torch.zeros(batch, dtype=torch.long)
    views = decoder.views(cache.k, cache.v, batch, width)
    out = [tokens]
    began = time.perf_counter()
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
    seconds = time.perf_counter() - began
    return torch.stack(out, 1).tolist(), seconds


JIT, LIBRARY = "JIT: torch.compile (cpp_wrapper, no module guards)", "AOT package (library)"


def option_rates(model: GPT, batch: int, new: int, reps: int, log=print) -> dict[str, Any]:
    """Decode steps per second of the bare greedy loop, the JIT step against the library's package and its loop
    variants, all in this process, interleaved over ``reps`` rounds (the best round of each counts)."""
    width = width_for(PROMPT + new, model.cfg.context_length)
    static_decode.set_policy("never")
    try:
        reference = generate(model, prompts_for(model, batch), SamplingConfig(new))  # eager greedy tokens
    finally:
        static_decode.set_policy(None)
    torch._dynamo.reset()  # the JIT compiles anew for this batch and thread count (nothing kept from an earlier one)
    runs: dict[str, dict[str, Any]] = {}
    with torch.no_grad():
        jit = JitStep(model)
        began = time.perf_counter()
        jit.compile(batch, width)
        runs[JIT] = {"decoder": jit, "variant": "steps", "compile_s": time.perf_counter() - began}
        library = StaticDecoder(model, static_decode.INDUCTOR_CONFIGS["cpu"])
        began = time.perf_counter()
        if not library.compile(batch, width):
            raise RuntimeError(f"the library's decode step did not compile: {library.failed}")
        runs[LIBRARY] = {
            "decoder": library,
            "variant": "steps",
            "compile_s": time.perf_counter() - began,
            "package": "loaded" if library.loaded else "built",
        }
        for variant in LOOP_VARIANTS:
            runs[f"AOT package, {variant}"] = {"decoder": library, "variant": variant, "compile_s": 0.0}
        for run in runs.values():  # first calls apart (a JIT recompile would show here, not in the timings)
            run["tokens_equal"] = greedy_loop(model, run["decoder"], batch, new, run["variant"])[0] == reference
        best = {name: float("inf") for name in runs}
        for _ in range(reps):
            for name, run in runs.items():
                best[name] = min(best[name], greedy_loop(model, run["decoder"], batch, new, run["variant"])[1])
    rows = {}
    for name, run in runs.items():
        rows[name] = {
            "steps_s": (new - 1) / best[name],
            "tok_s": batch * (new - 1) / best[name],
            "vs_jit": best[JIT] / best[name],
            "compile_s": run["compile_s"],
            "tokens_equal": run["tokens_equal"],
            **({"package": run["package"]} if "package" in run else {}),
        }
        row = rows[name]
        how = f", {row['package']}" if "package" in row else ""
        log(
            f"  {name:52s} {row['steps_s']:8.0f} steps/s  {row['vs_jit']:.2f}x JIT  (compile {row['compile_s']:.2f} s"
            f"{how}{'' if row['tokens_equal'] else ', TOKENS DIFFER'})"
        )
    return rows


# -- batch shapes: a package per batch size, a dynamic batch, or always every row ------------------------------


def static_batch_step(model: GPT, decoder: StaticDecoder, rows: int, width: int, path: Path):
    """The library's step compiled ahead of time for exactly ``rows`` rows (no dynamic batch), built the way the
    library builds its packages (exported with the weights as inputs, the same inductor settings) into ``path``;
    returns it loaded, with the library's step arguments."""
    from torch import _inductor as inductor

    k, v, ids, slot, start = scratch(model, rows, width)
    with torch.no_grad():
        program = torch.export.export(
            static_decode._WeightsAsInputs(model, decoder._names), (decoder._weights, k, v, ids, slot, start)
        )
    inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=decoder.inductor_configs)
    return static_decode._load_package(path)


def batch_shape_rates(model: GPT, rows: int, steps: int, reps: int, log=print) -> dict[str, Any]:
    """Per-step time of the ways to serve 1 and ``rows`` streams: the library's batch-1 package and its dynamic
    batch >= 2 package, against a package for exactly ``rows`` rows (for 1 stream it then runs a full batch)."""
    cfg = model.cfg
    width = width_for(PROMPT + steps, cfg.context_length)
    cache = model.new_batched_cache(rows)
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        for r, prompt in enumerate(prompts_for(model, rows)):
            model(torch.tensor([prompt]), cache=cache.rows(r, r + 1))
        library = StaticDecoder(model, static_decode.INDUCTOR_CONFIGS["cpu"])
        for n in (1, rows):
            if not library.compile(n, width):
                raise RuntimeError(f"the library's decode step did not compile: {library.failed}")
        began = time.perf_counter()
        static = static_batch_step(model, library, rows, width, Path(tmp) / f"static-{rows}.pt2")
        log(f"  (the static batch-{rows} package built in {time.perf_counter() - began:.1f} s)")
        start = torch.zeros(rows, dtype=torch.long)
        ids = torch.zeros(rows, 1, dtype=torch.long)

        def timed(fn, n: int) -> float:
            views = StaticDecoder.views(cache.k, cache.v, n, width)
            slot = cache.lengths[:n].clone()
            fn(views, ids[:n], slot, start[:n])  # a first call apart
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
            return static(library._weights, *views, ids_, slot, start_)

        def run_library(views, ids_, slot, start_):
            return library.step(*views, ids_, slot, start_)

        views = StaticDecoder.views(cache.k, cache.v, rows, width)  # the same step both ways: the same outputs
        ours, theirs = (
            run_library(views, ids, cache.lengths.clone(), start),
            run_static(views, ids, cache.lengths, start),
        )
        matches = torch.equal(ours[1], theirs[1]) and torch.allclose(ours[0], theirs[0], rtol=1e-4, atol=1e-5)
        per_step = {
            "1 stream: batch-1 package (library)": timed(run_library, 1),
            f"1 stream: always {rows} rows": timed(run_static, rows),
            f"{rows} streams: static batch-{rows} package": timed(run_static, rows),
            f"{rows} streams: dynamic batch >= 2 package (library)": timed(run_library, rows),
        }
        if library.failed:
            raise RuntimeError(f"the library's decode step failed: {library.failed}")
    out: dict[str, Any] = {}
    for name, seconds in per_step.items():
        streams = 1 if name.startswith("1 stream") else rows
        out[name] = {"us_per_step": seconds * 1e6, "tok_s": streams / seconds}
        log(f"  {name:52s} {seconds * 1e6:9.0f} us/step  {streams / seconds:8.0f} tok/s")
    out["static_matches_library"] = matches  # the static package's logits and tokens are the dynamic one's
    log(f"  the static package's outputs {'match' if matches else 'DIFFER FROM'} the library's")
    return out


# -- compile time: built (empty decode cache) and loaded (cached), in fresh processes --------------------------

COMPILE_TIME_NEW = 32  # new tokens: more than MEASURE_STEPS + 1, so ``auto`` reaches a compiled step


def first_generate(preset: str, threads: int, quick: bool, policy: str) -> dict[str, Any]:
    """In a fresh process: the first ``generate`` call (batch 1) under ``policy``, timed from its start to the end of
    the package's load or build, and to the first compiled step; then a second call, and an eager one."""
    torch.set_num_threads(threads)
    model = make_model(preset, quick)
    prompts, cfg = prompts_for(model, 1), SamplingConfig(COMPILE_TIME_NEW)
    marks: dict[str, float] = {}
    compile_, step_ = StaticDecoder.compile, StaticDecoder.step

    def compile(self, n, width, background=False):  # times the load or build that generate asks for
        began = time.perf_counter()
        try:
            return compile_(self, n, width, background)
        finally:
            marks.setdefault("compile_s", time.perf_counter() - began)

    def step(self, *args):
        out = step_(self, *args)
        if out is not None:
            marks.setdefault("first_compiled_step", time.perf_counter())
        return out

    StaticDecoder.compile, StaticDecoder.step = compile, step
    static_decode.set_policy(policy)
    try:
        began = time.perf_counter()
        tokens = generate(model, prompts, cfg)
        first_s = time.perf_counter() - began
        second_s = best_seconds(lambda: generate(model, prompts, cfg), 1)
    finally:
        StaticDecoder.compile, StaticDecoder.step = compile_, step_
        static_decode.set_policy("never")
    eager = generate(model, prompts, cfg)
    eager_s = best_seconds(lambda: generate(model, prompts, cfg), 1)
    decoder = static_decode.decoder_for(model, "always")
    return {
        "policy": policy,
        "package": "loaded" if decoder.loaded else "built",
        "compile_s": marks.get("compile_s"),
        "first_compiled_step_s": marks["first_compiled_step"] - began if "first_compiled_step" in marks else None,
        "first_generate_s": first_s,
        "second_generate_s": second_s,
        "eager_generate_s": eager_s,
        "tokens_equal": tokens == eager,
    }


def in_fresh_process(preset: str, threads: int, quick: bool, policy: str, cache_dir: str) -> dict[str, Any]:
    """:func:`first_generate` in a new interpreter whose decode cache is ``cache_dir``; adds the process's seconds."""
    env = {**os.environ, static_decode.CACHE_ENV: cache_dir}
    code = (
        "import json, benchmarks.compiled_decode as b; "
        f"print(json.dumps(b.first_generate({preset!r}, {threads}, {quick}, {policy!r})))"
    )
    began = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"compile-time run of {preset} ({policy}) failed: {out.stderr.strip()[-2000:]}")
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "process_s": time.perf_counter() - began}


def compile_times(preset: str, threads: int, quick: bool, log=print) -> dict[str, Any]:
    """Cold (an empty decode cache: the package is built), then warm (the same folder: it loads), fresh processes."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="llmcore-decode-") as cache:
        for name, policy in (("cold", "always"), ("warm", "always"), ("warm_auto", "auto")):
            run = out[name] = in_fresh_process(preset, threads, quick, policy, cache)
            first = run["first_compiled_step_s"]
            took = "no compile call" if run["compile_s"] is None else f"in {run['compile_s']:.3f} s"
            log(
                f"  {name:9s} ({policy}): package {run['package']} {took}; first compiled step "
                f"{'none' if first is None else f'{first:.3f} s'} after the start of generate; process "
                f"{run['process_s']:.1f} s{'' if run['tokens_equal'] else '; TOKENS DIFFER'}",
                flush=True,
            )
    return out


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
                    f"{row['first_compiled_call_s']:.1f} s, package {row['package']}; tokens {same})"
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
    parser.add_argument("--options", action="store_true", help="the AOT package against the JIT step (llama3-tiny)")
    parser.add_argument(
        "--compile-time", action="store_true", help="build and load seconds, fresh processes, an empty decode cache"
    )
    parser.add_argument("--batch-shapes", action="store_true", help="package per batch size vs dynamic vs all rows")
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
        report["compile_time"] = {}
        for preset in presets:
            print(f"{preset}, batch 1, {threads[0]} thread(s): fresh processes, one decode cache", flush=True)
            report["compile_time"][preset] = compile_times(preset, threads[0], args.quick)
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
                print(f"{presets[0]} batch {batch}, {t} thread(s): the bare greedy loop, JIT and AOT", flush=True)
                report["options"][f"batch{batch}-threads{t}"] = option_rates(model, batch, new[presets[0]], args.reps)
    else:
        report["generate"] = run(presets, batches, threads, new, args.reps, args.quick, not args.no_llama_cpp)
    report["load_average_end"] = os.getloadavg()
    write_json_atomic(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
