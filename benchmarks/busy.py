"""Busy-machine benchmark: each workload on an idle CPU and beside one CPU-bound process, llmcore against its peers.

    python -m benchmarks.busy                  # full run (~4 min on 2 cores), writes reports/busy_bench.json
    python -m benchmarks.busy --quick          # tiny shapes, one repetition, well under a minute (CI smoke)
    python -m benchmarks.busy --only generate --out /tmp/busy.json

On a 2-core machine with one other busy process, OpenMP workers that spin between parallel regions steal the
other process' time slices, and the thread holding the real work waits for a core: llmcore used to run 10-20x
slower there. ``llmcore/threads.py`` is the fix (``GOMP_SPINCOUNT`` set when ``llmcore`` is imported, threads
``auto``); this benchmark measures whether it works, and how peers run on the same machine in the same run.

Workloads, each measured IDLE and then BUSY (beside a ``while True: pass`` process the bench starts, lets the
scheduler see for 0.5 s, and kills after the measurement, also on SIGINT/SIGTERM/SIGHUP; its pids are in the JSON):

- training tokens/s of the pipeline's default model (``params.yaml``: ``model`` section, vocab from ``tokenize``,
  ``pretrain.train.batch_size`` sequences of ``model.context_length``): llmcore as the loop runs it
  (``init_runtime(HardwareConfig(device="cpu"))``, threads ``auto``; chunked head + loss inside the forward via
  ``lm_loss``; ``make_optimizer``'s fused AdamW; forward, backward, step) vs transformers (``LlamaForCausalLM`` /
  ``GPT2LMHeadModel`` of the same shape, ``labels=``, AdamW's default kernel, torch's default threads).
- batch-1 greedy generation tokens/s after a 16-token prompt, for that model (128 new tokens) and the GPT-2 124M
  shape (32 new tokens), random weights: llmcore ``generate`` inside ``threads_for_inference("auto", cfg)`` (what
  the stages and the CLI do); transformers ``generate`` (KV cache, default threads); llama.cpp (llama-cpp-python,
  ``eval`` + argmax per token) on the same weights exported to an f32 GGUF (``llmcore.weights.export``), with its
  default ``n_threads`` and with the thread count llmcore's policy chose.
- serving: ``llmcore serve``'s defaults (``ModelHandle`` with threads ``auto``, 8 batch slots; uvicorn on loopback,
  streaming Ollama API; ``benchmarks.serve_bench.bench_server``) on both shapes: aggregate tokens/s with 1 and 8
  concurrent clients, time to first token p50/p95. Beside it, the HTTP floor (``serve_bench.bench_http_floor``): the
  same clients against llmcore's HTTP server with no model behind it (every piece at once, one write each), so the
  serving ratios can be read against what the clients and the server's one interpreter cost on this machine alone;
  and the engine alone (``serve_bench.bench_engine_burst``): the served model's TTFT with no HTTP, one request and 8
  submitted at once, the share of the TTFT ratio that is the prompt passes' arithmetic and the engine's scheduling.

Fairness: every measurement runs in a fresh interpreter (``--worker``), so thread pools and OpenMP state are its
own. llmcore's workers import ``llmcore`` first and so run with the environment llmcore sets for itself. Peers run
with the user's environment untouched: this module snapshots ``os.environ`` before anything imports llmcore (whose
import sets ``GOMP_SPINCOUNT``) and hands that copy to every worker; a peer worker loads torch (or llama.cpp) before
anything else and restores its environment after importing the shared helpers. Each result records the OpenMP
variables as its libraries loaded (``env_at_load``) and at the measurement (``env``), and its thread count.

Figures are medians of a few repetitions after warm-up, wall clock (process CPU time beside them). busy/idle is the
ratio of speeds (for TTFT, idle ms / busy ms): 1.0 means the other process cost nothing. The targets are printed,
not asserted.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.timing import median, repeat

# The user's environment, before anything here imports llmcore (its import sets GOMP_SPINCOUNT): peers run in it.
ORIGINAL_ENV = dict(os.environ)

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "BUSY_RESULT "
HOG_SETTLE_S = 0.5  # after starting the busy process, before measuring: the scheduler has seen it
# One busy core. It also asks Linux to kill it when the bench dies (PR_SET_PDEATHSIG), even by SIGKILL.
HOG_CODE = """\
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)
except Exception:
    pass
if os.getppid() != {parent}:
    sys.exit()
while True: pass
"""
OMP_VARS = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "OMP_NUM_THREADS")
FLOOR = "http-floor"  # not a peer to beat: what the serving figures' clients and HTTP server cost with no model
IMPLS = {  # key -> table label
    "llmcore": "llmcore",
    "transformers": "transformers",
    "llama.cpp": "llama.cpp (default threads)",
    "llama.cpp-same-threads": "llama.cpp (llmcore's threads)",
    FLOOR: "HTTP floor (no model)",
}
PEER_MODULES = {"transformers": "transformers", "llama.cpp": "llama_cpp", "llama.cpp-same-threads": "llama_cpp"}
WORKLOADS = ("train", "generate", "serve")
ENGINE_ALONE = "the served model's engine with no HTTP: time to first token, requests submitted in-process"


# ---------------------------------------------------------------------------------------------------
# What to run
# ---------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    train_warmup: int = 2
    train_reps: int = 5
    prompt: int = 16  # prompt tokens, generation and serving
    gen_new: dict[str, int] | None = None  # shape -> new tokens (batch-1 generation)
    gen_reps: int = 3
    serve_new: dict[str, int] | None = None  # shape -> tokens per request
    serve_reps: int = 5  # a 1-client TTFT of 2 requests was one outlier away from a target (28 ms against 8)
    big: bool = True  # also the gpt2-124m shape
    peers: tuple[str, ...] = ("transformers", "llama.cpp", "llama.cpp-same-threads", FLOOR)
    quick: bool = False
    # build llmcore's compiled decode steps for each shape before the runs (untimed; kept on disk, as a user's cache
    # holds them once a server or a long run built them): the runs then measure the defaults with the cache warm
    warm_decode: bool = True
    budget_s: float = 20  # timed repetitions stop once this much wall time is spent (at least one runs)
    timeout_s: float = 300  # per measurement


FULL = Plan(gen_new={"default": 128, "gpt2-124m": 32}, serve_new={"default": 64, "gpt2-124m": 24})
QUICK = Plan(
    train_warmup=1,
    train_reps=1,
    prompt=8,
    gen_new={"default": 16},
    gen_reps=1,
    serve_new={"default": 8},
    serve_reps=1,
    big=False,
    peers=("llama.cpp", "llama.cpp-same-threads", FLOOR),
    quick=True,
    warm_decode=False,  # (a build takes ~20 s; tests/test_static_decode.py covers the cache)
    timeout_s=120,
)
# --quick leaves transformers out: importing it takes seconds, in each of its four measurements


def omp_env(environ: dict[str, str] | os._Environ | None = None) -> dict[str, str | None]:
    """The OpenMP variables of ``environ`` (default: this process'): the three that matter here, always listed
    (None: unset), plus any other ``OMP_*`` / ``GOMP_*`` / ``KMP_*`` set."""
    environ = os.environ if environ is None else environ
    out: dict[str, str | None] = {k: environ.get(k) for k in OMP_VARS}
    out.update({k: v for k, v in environ.items() if k.startswith(("OMP_", "GOMP_", "KMP_"))})
    return out


def missing_peer(impl: str, plan: Plan | None = None) -> str | None:
    """Why ``impl`` is not measured here (not installed, or not in this plan), or None."""
    import importlib.util

    if plan is not None and impl != "llmcore" and impl not in plan.peers:
        return "not in --quick (the full run measures it)"
    module = PEER_MODULES.get(impl)
    if module is None or importlib.util.find_spec(module) is not None:
        return None
    return f"{module} not installed (`make bench` installs the peers)"


# ---------------------------------------------------------------------------------------------------
# The busy process
# ---------------------------------------------------------------------------------------------------

_HOGS: list[subprocess.Popen] = []


def _kill_hogs() -> None:
    for proc in list(_HOGS):
        with contextlib.suppress(OSError):
            proc.kill()
        with contextlib.suppress(Exception):
            proc.wait(timeout=5)
        with contextlib.suppress(ValueError):
            _HOGS.remove(proc)


def _on_signal(signum: int, _frame: Any) -> None:
    _kill_hogs()
    raise SystemExit(128 + signum)  # unwinds: a running worker is killed by subprocess.run, the finally blocks run


@contextlib.contextmanager
def cpu_hog(pids: list[int]) -> Iterator[int]:
    """One CPU-bound process for the duration of the block; its pid is appended to ``pids``."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOG_CODE.format(parent=os.getpid())],
        env=ORIGINAL_ENV,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    _HOGS.append(proc)
    pids.append(proc.pid)
    try:
        time.sleep(HOG_SETTLE_S)
        if proc.poll() is not None:
            raise RuntimeError(f"the busy process exited early ({proc.returncode})")
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()
        with contextlib.suppress(ValueError):
            _HOGS.remove(proc)


# ---------------------------------------------------------------------------------------------------
# Workers: one measurement each, in a fresh interpreter
# ---------------------------------------------------------------------------------------------------


def _peer_imports() -> None:
    """For a peer: load the shared helpers (``serve_bench`` imports llmcore, which sets GOMP_SPINCOUNT) *after*
    torch has loaded libgomp, then put the user's environment back as it was."""
    saved = dict(os.environ)
    import benchmarks.serve_bench  # noqa: F401

    os.environ.clear()
    os.environ.update(saved)


def timed(fn: Callable[[], Any], reps: int, budget_s: float) -> dict[str, list[float]]:
    """Wall and process-CPU seconds of up to ``reps`` calls of ``fn``: fewer once ``budget_s`` of wall time is
    spent (at least one), so that a peer running at a twentieth of its idle speed cannot take the whole run."""
    return repeat(fn, reps, warmup=0, budget_s=budget_s).as_dict()


def _stats(times: dict[str, list[float]], items: int) -> dict[str, Any]:
    return {"value": items / median(times["wall_s"]), **times}


def job_train(job: dict[str, Any]) -> dict[str, Any]:
    """Training tokens/s: forward + loss, backward, optimizer step, on one fixed random batch."""
    import torch

    if job["impl"] != "llmcore":
        _peer_imports()
    from llmcore.models.config import ModelConfig

    cfg = ModelConfig.from_dict(job["cfg"])
    B, T = job["batch_size"], cfg.context_length
    torch.manual_seed(0)
    x, y = torch.randint(0, cfg.vocab_size, (B, T)), torch.randint(0, cfg.vocab_size, (B, T))
    if job["impl"] == "llmcore":
        from llmcore.models.gpt import GPT
        from llmcore.models.ops import pick_head_loss
        from llmcore.training.config import HardwareConfig, TrainConfig
        from llmcore.training.loop import lm_loss, make_optimizer
        from llmcore.training.runtime import init_runtime

        hw = HardwareConfig(device="cpu")  # the defaults (threads: auto); a CPU benchmark even on a GPU machine
        rt = init_runtime(hw)
        model = GPT(cfg).to(rt.device).train()
        model.head_loss = pick_head_loss(hw.head_loss, rt.device)  # as fit() sets it
        opt = make_optimizer(model, TrainConfig(max_steps=1), rt.device)
        loss_fn = lambda: lm_loss(model, (x, y))[0]
    elif job["impl"] == "transformers":
        from types import SimpleNamespace

        from benchmarks.serve_bench import _hf_twin

        model = _hf_twin(SimpleNamespace(cfg=cfg)).train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
        loss_fn = lambda: model(input_ids=x, labels=x).loss  # labels shifted inside, as its users train
    else:
        raise ValueError(f"unknown training implementation {job['impl']!r}")

    def step() -> None:
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(job["warmup"]):
        step()
    times = timed(step, job["reps"], job["budget_s"])
    fused = bool(opt.defaults.get("fused"))
    return {**_stats(times, B * T), "unit": "tokens/s", "threads": torch.get_num_threads(), "fused_adamw": fused}


def job_generate(job: dict[str, Any]) -> dict[str, Any]:
    """Batch-1 greedy generation: new tokens/s over prompt + ``new`` tokens (prefill included), KV cache."""
    if job["impl"].startswith("llama.cpp"):
        return _generate_llama_cpp(job)
    import torch

    if job["impl"] != "llmcore":
        _peer_imports()

    prompt, new = job["prompt_ids"], job["new"]
    if job["impl"] == "llmcore":
        from llmcore.models.generate import SamplingConfig, generate
        from llmcore.threads import threads_for_inference
        from llmcore.weights.model_dir import open_model_dir

        model = open_model_dir(job["model_dir"]).load_lm("cpu")
        run = lambda n=new: generate(model, [prompt], SamplingConfig(max_new_tokens=n))[0]
        with threads_for_inference("auto", model.cfg) as threads:
            run(8)  # warm-up
            times = timed(lambda: _check_len(run(), new), job["reps"], job["budget_s"])
    elif job["impl"] == "transformers":
        from types import SimpleNamespace

        from benchmarks.serve_bench import _hf_twin
        from llmcore.models.config import ModelConfig

        model = _hf_twin(SimpleNamespace(cfg=ModelConfig.from_dict(job["cfg"])))
        ids = torch.tensor([prompt])

        def run(n: int = new) -> list[int]:
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                use_cache=True,
                pad_token_id=0,
            )
            return out[0, len(prompt) :].tolist()

        threads = torch.get_num_threads()
        run(8)
        times = timed(lambda: _check_len(run(), new), job["reps"], job["budget_s"])
    else:
        raise ValueError(f"unknown generation implementation {job['impl']!r}")
    return {**_stats(times, new), "unit": "tokens/s", "threads": threads}


def _generate_llama_cpp(job: dict[str, Any]) -> dict[str, Any]:
    import llama_cpp  # in the user's environment: its libgomp reads it as it loads
    import numpy as np

    prompt, new, n = job["prompt_ids"], job["new"], job.get("n_threads")
    threads = {} if n is None else {"n_threads": n, "n_threads_batch": n}
    llm = llama_cpp.Llama(model_path=job["gguf"], n_ctx=len(prompt) + new + 1, verbose=False, **threads)

    def run(count: int = new) -> list[int]:  # the loop llmcore runs: feed a token, argmax of its logits
        llm.reset()
        llm.eval(prompt)
        out: list[int] = []
        for _ in range(count):
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval(out[-1:])
        return out

    try:
        run(8)  # warm-up
        times = timed(lambda: _check_len(run(), new), job["reps"], job["budget_s"])
        return {
            **_stats(times, new),
            "unit": "tokens/s",
            "threads": llm.n_threads,
            "threads_batch": llm.n_threads_batch,
        }
    finally:
        llm.close()  # before interpreter shutdown, which would otherwise free it half torn down


def _check_len(ids: list[int], n: int) -> None:
    if len(ids) != n:
        raise RuntimeError(f"generated {len(ids)} tokens, expected {n}")


def job_serve(job: dict[str, Any]) -> dict[str, Any]:
    """``llmcore serve``'s defaults over loopback HTTP: 1 and 8 streaming clients (serve_bench); impl ``http-floor``:
    the same clients against llmcore's HTTP server with no model behind it (``serve_bench.bench_http_floor``)."""
    from benchmarks.serve_bench import Case, bench_http_floor, bench_server
    from llmcore.threads import inference_threads
    from llmcore.weights.model_dir import open_model_dir

    case = Case(job["label"], "", {}, prompt=job["prompt"], new=job["new"], clients=(1, 8), reps=job["reps"])
    log = lambda *a, **k: print(*a, file=sys.stderr, **k)  # noqa: E731
    if job["impl"] == FLOOR:
        return {"server": bench_http_floor(case, log=log), "threads": 1}  # the event loop's thread
    model = open_model_dir(job["model_dir"]).load_lm("cpu")
    out = bench_server(case, model, log=log)
    # the count ModelHandle gives its engine, which sets it on its own thread (torch.get_num_threads() here, on
    # the main thread, would not show it: libgomp keeps the count per thread)
    return {"server": out, "threads": inference_threads("auto", model.cfg)}


def job_warm_decode(job: dict[str, Any]) -> dict[str, Any]:
    """Build (or find) the compiled graphs generation and serving will load: decode steps of batch 1 and batch >= 2
    and the prompt pass, at the width and thread count they use, in the on-disk cache
    (``llmcore.models.static_decode``)."""
    from llmcore.models.packed import onednn_linears
    from llmcore.models.static_decode import decoder_for, width_for
    from llmcore.threads import threads_for_inference
    from llmcore.weights.model_dir import open_model_dir

    model = open_model_dir(job["model_dir"]).load_lm("cpu").eval()
    onednn_linears(model, packed_from=None)  # as generate and the engine set the model up: their graphs' layout
    width = width_for(job["need"], model.cfg.context_length)
    out: dict[str, Any] = {"width": width}
    with threads_for_inference("auto", model.cfg) as threads:
        decoder = decoder_for(model, "always")
        graphs = [(1, False), (2, False)]  # decode steps; and the server's prompt passes where it runs them
        if decoder is not None and decoder.prompt_pays:
            graphs.append((1, True))
        for rows, prompt in graphs:
            began = time.perf_counter()
            ok = decoder is not None and decoder.compile(rows, width, prompt=prompt)
            out["prompt" if prompt else f"rows_{rows}"] = {
                "ready": ok,
                "seconds": time.perf_counter() - began,
                "loaded": bool(decoder and decoder.loaded),
            }
        out["threads"], out["failed"] = threads, decoder.failed if decoder else "unsupported"
    return out


JOBS = {"train": job_train, "generate": job_generate, "serve": job_serve, "warm_decode": job_warm_decode}


def run_worker(job: dict[str, Any]) -> dict[str, Any]:
    """One measurement, in this (fresh) process. llmcore's workers import llmcore before torch, as every llmcore
    entry point does; peers load their own libraries first (see the module docstring)."""
    if job["impl"] in ("llmcore", FLOOR):  # the floor is llmcore's HTTP server
        import llmcore  # noqa: F401
    env_at_load = omp_env()
    result = JOBS[job["job"]](job)
    import resource

    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {**result, "env_at_load": env_at_load, "env": omp_env(), "pid": os.getpid(), "peak_rss_mb": rss_mb}


def run_in_subprocess(job: dict[str, Any], timeout: float) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.busy", "--worker", json.dumps(job)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=ORIGINAL_ENV,
        timeout=timeout,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    raise RuntimeError(f"worker exited {proc.returncode}: {tail}")


# ---------------------------------------------------------------------------------------------------
# Models on disk (the same weights for llmcore and llama.cpp)
# ---------------------------------------------------------------------------------------------------


def default_config(quick: bool) -> tuple[Any, int, str]:
    """The pipeline's pretraining model (``params.yaml``), its batch size and its preset name."""
    from llmcore.models.config import ModelConfig, model_config_from_params
    from llmcore.params import read_params

    if quick:
        return ModelConfig.from_preset("llama3-tiny", vocab_size=512, context_length=64), 2, "llama3-tiny"
    raw = read_params(REPO_ROOT / "params.yaml")
    tokenize = raw.get("tokenize", {})
    vocab = {"bpe": tokenize.get("vocab_size", 1024), "gpt2": 50257}.get(tokenize.get("kind"), 1024)
    cfg = model_config_from_params(raw["model"], vocab_size=vocab)
    return cfg, int(raw["pretrain"]["train"]["batch_size"]), raw["model"].get("preset", "model")


def write_model(folder: Path, cfg: Any, gguf: bool) -> dict[str, str]:
    """A random model of ``cfg`` as a model folder and (``gguf``) an f32 GGUF of the same weights.

    The tokenizer is a small byte-level BPE (the model's remaining rows are padding in the GGUF): prompts are
    random byte tokens, and a forward pass costs the same whatever the weights and tokens are."""
    import torch

    from llmcore.models.gpt import GPT
    from llmcore.text.tokenizer import Tokenizer
    from llmcore.weights.export import export_model
    from llmcore.weights.model_dir import save_model_dir

    text = "First Citizen: Before we proceed any further, hear me speak. All: Speak, speak! 12:30, 3.14.\n" * 40
    tok = Tokenizer.train(text, 300, pattern="gpt2" if cfg.pos_emb == "learned" else "gpt4")
    torch.manual_seed(0)
    save_model_dir(folder / "model", GPT(cfg).eval(), tok, {"stage": "benchmarks.busy"})
    out = {"model_dir": str(folder / "model")}
    if gguf:
        export_model(folder / "model", folder / "gguf", fmt="gguf", precision="f32", template="raw")
        out["gguf"] = str(folder / "gguf" / "model.gguf")
    return out


# ---------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------


def run_benchmarks(plan: Plan, workloads: tuple[str, ...] = WORKLOADS, log=print) -> dict[str, Any]:
    from llmcore.models.config import ModelConfig
    from llmcore.threads import available_cpus, inference_threads

    started, load_before = time.perf_counter(), os.getloadavg()
    hog_pids: list[int] = []
    cfg, batch_size, name = default_config(plan.quick)
    shapes = {name: cfg}
    if plan.big:
        shapes["gpt2-124m"] = ModelConfig.from_preset("gpt2-124m", context_length=256)
    rng = random.Random(0)
    prompt_ids = [rng.randrange(256) for _ in range(plan.prompt)]  # byte tokens: valid in every vocabulary
    report: dict[str, Any] = {"workloads": {}, "skipped": {}}

    def measure(key: str, impl: str, job: dict[str, Any]) -> dict[str, Any] | None:
        """Idle, then beside the busy process: {"idle": result, "busy": result} or None (recorded as skipped)."""
        reason = missing_peer(impl, plan)
        if reason is None:
            out = {}
            try:
                for state in ("idle", "busy"):
                    log(f"  {key} / {impl} / {state} ...", end="", flush=True)
                    t = time.perf_counter()
                    with cpu_hog(hog_pids) if state == "busy" else contextlib.nullcontext():
                        out[state] = run_in_subprocess({**job, "impl": impl}, plan.timeout_s)
                    log(f" {time.perf_counter() - t:.0f}s")
                return out
            except (RuntimeError, subprocess.TimeoutExpired) as e:  # one broken peer must not lose the rest
                reason = f"failed: {e}"
                log(" failed")
        report["skipped"][f"{key} / {impl}"] = reason
        return None

    def add(key: str, what: str, unit: str, impl: str, runs: dict[str, Any] | None, pick=lambda r: r["value"]):
        row = report["workloads"].setdefault(key, {"what": what, "unit": unit, "impls": {}})
        if runs is None:
            row["impls"][impl] = {"skipped": report["skipped"].get(f"{key.split(' (')[0]} / {impl}", "skipped")}
            return
        idle, busy = pick(runs["idle"]), pick(runs["busy"])
        speed = idle / busy if unit == "ms" else busy / idle
        row["impls"][impl] = {"idle": idle, "busy": busy, "busy_over_idle": speed, "runs": runs}

    with tempfile.TemporaryDirectory(prefix="busy-bench-") as tmp:
        need_gguf = "generate" in workloads and missing_peer("llama.cpp", plan) is None
        need_files = "generate" in workloads or "serve" in workloads
        files = {s: write_model(Path(tmp) / s, c, need_gguf) for s, c in shapes.items()} if need_files else {}
        if need_files and plan.warm_decode:
            report["decode_cache"] = {}
            for shape in shapes:
                need = plan.prompt + max(plan.gen_new["default" if shape == name else shape], 1)
                job = {"job": "warm_decode", "impl": "llmcore", "need": need, **files[shape]}
                log(f"  compiled decode steps for {shape} ...", end="", flush=True)
                report["decode_cache"][shape] = run_in_subprocess(job, plan.timeout_s)
                log(
                    " "
                    + ", ".join(
                        f"{k}: {v['seconds']:.1f}s"
                        for k, v in report["decode_cache"][shape].items()
                        if k.startswith("rows_") or k == "prompt"
                    )
                )
        if "train" in workloads:
            key = f"train {name}"
            job = {
                "job": "train",
                "cfg": cfg.to_dict(),
                "batch_size": batch_size,
                "warmup": plan.train_warmup,
                "reps": plan.train_reps,
                "budget_s": plan.budget_s,
            }
            what = f"training tokens/s, batch {batch_size} x {cfg.context_length}, fp32"
            for impl in ("llmcore", "transformers"):
                add(key, what, "tokens/s", impl, measure(key, impl, job))
        if "generate" in workloads:
            for shape, c in shapes.items():
                key, new = f"generate {shape}", plan.gen_new["default" if shape == name else shape]
                job = {
                    "job": "generate",
                    "cfg": c.to_dict(),
                    "prompt_ids": prompt_ids,
                    "new": new,
                    "reps": plan.gen_reps,
                    "budget_s": plan.budget_s,
                    **files[shape],
                }
                what = f"batch-1 greedy generation tokens/s, {plan.prompt}-token prompt + {new} new"
                ours = measure(key, "llmcore", job)
                add(key, what, "tokens/s", "llmcore", ours)
                # "the same threads": what llmcore's policy chose in its own (idle) run
                same = ours["idle"]["threads"] if ours else inference_threads("auto", c)
                for impl, extra in (
                    ("transformers", {}),
                    ("llama.cpp", {}),
                    ("llama.cpp-same-threads", {"n_threads": same}),
                ):
                    add(key, what, "tokens/s", impl, measure(key, impl, {**job, **extra}))
        if "serve" in workloads:
            for shape in shapes:
                new = plan.serve_new["default" if shape == name else shape]
                job = {
                    "job": "serve",
                    "label": shape,
                    "prompt": plan.prompt,
                    "new": new,
                    "reps": plan.serve_reps,
                    **files[shape],
                }
                base = f"serve {shape}"
                what = f"llmcore serve, streaming, {plan.prompt}-token prompts, {new} tokens each"
                s = lambda n, f: lambda r: r["server"][f"clients_{n}"][f]  # noqa: E731
                rows = (  # key, what, unit, figure
                    (f"{base} (1 client)", f"{what}: aggregate tokens/s", "tokens/s", s(1, "tokens_per_s")),
                    (f"{base} (8 clients)", f"{what}: aggregate tokens/s", "tokens/s", s(8, "tokens_per_s")),
                    (f"{base} (TTFT, 1 client)", f"{what}: time to first token p50", "ms", s(1, "ttft_p50_ms")),
                    (f"{base} (TTFT p50, 8 clients)", f"{what}: time to first token p50", "ms", s(8, "ttft_p50_ms")),
                    (f"{base} (TTFT p95, 8 clients)", f"{what}: time to first token p95", "ms", s(8, "ttft_p95_ms")),
                )
                alone = lambda n, f: lambda r: r["server"]["engine_alone"][f"clients_{n}"][f]  # noqa: E731
                engine_rows = (  # the same model with no HTTP (serve_bench.bench_engine_burst)
                    (f"{base} (engine alone TTFT, 1 request)", ENGINE_ALONE, "ms", alone(1, "ttft_p50_ms")),
                    (f"{base} (engine alone TTFT p95, 8 requests)", ENGINE_ALONE, "ms", alone(8, "ttft_p95_ms")),
                )
                for impl in ("llmcore", FLOOR):
                    runs = measure(base, impl, job)
                    for key, label, unit, pick in rows + (engine_rows if impl == "llmcore" else ()):
                        add(key, label, unit, impl, runs, pick)

    import torch

    from benchmarks.bench import _cpu_name

    versions = {"torch": torch.__version__}
    for module in ("transformers", "llama_cpp"):
        with contextlib.suppress(ImportError):
            versions[module] = __import__(module).__version__
    report["meta"] = {
        "quick": plan.quick,
        "plan": asdict(plan),
        "workloads": list(workloads),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "available_cpus": available_cpus(),
        "versions": versions,
        "outer_env": omp_env(ORIGINAL_ENV),
        "hog_pids": hog_pids,
        "hog_settle_s": HOG_SETTLE_S,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "seconds": time.perf_counter() - started,
    }
    report["ratios"] = peer_ratios(report)
    report["targets"] = targets(report)
    return report


def peer_ratios(report: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """workload -> peer -> {"idle", "busy"}: llmcore's speed over the peer's (> 1: llmcore faster)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for key, row in report["workloads"].items():
        ours = row["impls"].get("llmcore", {})
        if "idle" not in ours:
            continue
        for peer, theirs in row["impls"].items():
            if peer != "llmcore" and "idle" in theirs:
                out.setdefault(key, {})[peer] = {s: ours[s] / theirs[s] for s in ("idle", "busy")}
    return out


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets (printed beside the figures, not asserted)."""
    rows: list[dict[str, Any]] = []
    w = report["workloads"]

    def add(what: str, value: float | None, goal: float, at_most: bool = False) -> None:
        met = None if value is None else (value <= goal if at_most else value >= goal)
        rows.append({"what": what, "value": value, "goal": goal, "at_most": at_most, "met": met})

    def ours(key: str) -> dict[str, Any]:
        return w.get(key, {}).get("impls", {}).get("llmcore", {})

    for key, row in w.items():
        if key.startswith(("train", "generate")) or (key.startswith("serve") and "TTFT" not in key):
            add(f"{key}: llmcore busy/idle", ours(key).get("busy_over_idle"), 0.5)
        for peer, theirs in row["impls"].items():
            if peer in ("llmcore", FLOOR) or "busy_over_idle" not in theirs or "busy_over_idle" not in ours(key):
                continue
            add(
                f"{key}: llmcore busy/idle over {IMPLS[peer]}'s ({ours(key)['busy_over_idle']:.2f} / "
                f"{theirs['busy_over_idle']:.2f})",
                ours(key)["busy_over_idle"] / theirs["busy_over_idle"],
                1.0,
            )
    for key, ratio in report["ratios"].items():
        goal = 0.7 if "gpt2-124m" in key else 0.3
        if "llama.cpp-same-threads" in ratio:
            for state in ("idle", "busy"):
                add(
                    f"{key}: llmcore / llama.cpp f32 at llmcore's threads ({state})",
                    ratio["llama.cpp-same-threads"][state],
                    goal,
                )

    def floor(key: str) -> dict[str, Any]:
        return w.get(key, {}).get("impls", {}).get(FLOOR, {})

    def over(top: dict[str, Any], bottom: dict[str, Any], state: str) -> float | None:
        return top[state] / bottom[state] if state in top and state in bottom else None

    def floor_note(value: float | None) -> str:  # the same ratio of the HTTP server with no model, beside ours
        return "" if value is None else f"; HTTP floor {value:.2f}"

    def engine_note(value: float | None) -> str:  # the same ratio of the model with no HTTP
        return "" if value is None else f"; engine alone {value:.2f}"

    for shape in dict.fromkeys(k.split()[1] for k in w if k.startswith("serve")):  # in run order
        streams = f"serve {shape} (1 client)", f"serve {shape} (8 clients)"
        ttfts = f"serve {shape} (TTFT p95, 8 clients)", f"serve {shape} (TTFT, 1 client)"
        alone = f"serve {shape} (engine alone TTFT p95, 8 requests)", f"serve {shape} (engine alone TTFT, 1 request)"
        for state in ("idle", "busy"):
            value = over(ours(streams[1]), ours(streams[0]), state)
            if value is not None:
                note = floor_note(over(floor(streams[1]), floor(streams[0]), state))
                add(f"serve {shape}: 8 streams / 1 stream tokens/s ({state}{note})", value, 3.0)
            value = over(ours(ttfts[0]), ours(ttfts[1]), state)
            if value is not None:
                note = floor_note(over(floor(ttfts[0]), floor(ttfts[1]), state))
                note += engine_note(over(ours(alone[0]), ours(alone[1]), state))
                add(
                    f"serve {shape}: TTFT p95 at 8 simultaneous / one request's TTFT ({state}{note})",
                    value,
                    3.0,
                    at_most=True,
                )
    return rows


# ---------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------


def _num(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    if unit == "ratio":
        return f"{v:.2f}"
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}"


def format_table(report: dict[str, Any]) -> str:
    meta = report["meta"]
    la, lb = meta["loadavg_before"], meta["loadavg_after"]
    env = ", ".join(f"{k}={v}" for k, v in meta["outer_env"].items() if v is not None) or "no OpenMP variables"
    lines = [
        f"# llmcore busy-machine bench{' (--quick)' if meta['quick'] else ''}: {meta['cpu']}, {meta['cpu_count']} "
        f"CPUs ({meta['available_cpus']} available), torch {meta['versions']['torch']}, load avg {la[0]:.1f} -> "
        f"{lb[0]:.1f}, {meta['seconds']:.0f} s; outer env: {env}",
        "",
        "Busy = beside one `while True: pass` process. busy/idle: ratio of speeds (TTFT rows: idle ms / busy ms).",
        "",
    ]
    impls = [i for i in IMPLS if any(i in row["impls"] for row in report["workloads"].values())]
    head = ["workload", "unit"]
    for i in impls:
        head += [f"{IMPLS[i]} idle", "busy", "busy/idle"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (3 * len(impls))]
    for key, row in report["workloads"].items():
        cells = [key, row["unit"]]
        for i in impls:
            r = row["impls"].get(i)
            if r is None:
                cells += ["", "", ""]
            elif "skipped" in r:
                cells += ["skipped", "", ""]
            else:
                cells += [_num(r["idle"]), _num(r["busy"]), _num(r["busy_over_idle"], "ratio")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Threads and environment of each run (idle / busy)",
        "",
        "| workload | implementation | threads | GOMP_SPINCOUNT | OMP_NUM_THREADS |",
        "|---|---|---|---|---|",
    ]
    seen = set()
    for key, row in report["workloads"].items():
        for impl, r in row["impls"].items():
            runs = r.get("runs")
            if not runs or id(runs) in seen:
                continue
            seen.add(id(runs))
            i, b = runs["idle"], runs["busy"]
            threads = f"{i['threads']} / {b['threads']}"
            if "threads_batch" in i:
                threads += f" (batch {i['threads_batch']})"
            spin = f"{i['env'].get('GOMP_SPINCOUNT')} / {b['env'].get('GOMP_SPINCOUNT')}"
            omp = f"{i['env'].get('OMP_NUM_THREADS')} / {b['env'].get('OMP_NUM_THREADS')}"
            lines.append(f"| {key.split(' (')[0]} | {IMPLS[impl]} | {threads} | {spin} | {omp} |")
    lines += ["", "## Targets (reported, not asserted)", "", "| target | measured | goal | met |", "|---|---:|---|---|"]
    for t in report["targets"]:
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "NO")
        lines.append(
            f"| {t['what']} | {_num(t['value'], 'ratio')} | {'<=' if t['at_most'] else '>='} {t['goal']} | {met} |"
        )
    if report["skipped"]:
        lines += ["", "Skipped: " + "; ".join(f"{k}: {v}" for k, v in report["skipped"].items())]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.busy", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one repetition, < 1 min (CI smoke)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "reports" / "busy_bench.json", help="report JSON")
    parser.add_argument("--only", default=",".join(WORKLOADS), help=f"comma-separated of {','.join(WORKLOADS)}")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one measurement, print its result
    args = parser.parse_args(argv)
    if args.worker:
        result = run_worker(json.loads(args.worker))
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return 0
    workloads = tuple(s.strip() for s in args.only.split(",") if s.strip())
    unknown = sorted(set(workloads) - set(WORKLOADS))
    if unknown:
        parser.error(f"--only: unknown workload {unknown[0]!r} (choose from {', '.join(WORKLOADS)})")
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    atexit.register(_kill_hogs)
    import llmcore  # noqa: F401  (this process builds the models: spinning limited here too; peers get ORIGINAL_ENV)
    from llmcore.common import write_json_atomic

    print(f"llmcore busy-machine bench ({'quick' if args.quick else 'full'}): {', '.join(workloads)}", flush=True)
    try:
        report = run_benchmarks(QUICK if args.quick else FULL, workloads)
    finally:
        _kill_hogs()
    table = format_table(report)
    report["table"] = table
    write_json_atomic(args.out, report)
    print("\n" + table + f"\n\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
