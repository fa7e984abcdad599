"""Serving benchmarks: continuous batching over HTTP, time to first token, and single-stream decode vs transformers.

    python -m benchmarks.serve_bench            # tiny and 124M-shaped random models (a few minutes on 2 cores)
    python -m benchmarks.serve_bench --quick    # tiny shapes only, seconds (CI smoke)

What is measured, each figure the median of ``reps`` runs in the same process:

- aggregate decode tokens/s of ``llmcore serve`` (in-process uvicorn on loopback, the Ollama API, streaming, greedy,
  a fixed number of tokens per request) with 1 client and with 8 concurrent clients; the ratio is what continuous
  batching buys (8 requests share each forward pass). Tokens are the server's own ``eval_count``s; the wall clock
  runs from the first request sent to the last stream closed.
- time to first token (TTFT) of every request in those runs: p50 and p95, from sending the request to reading
  the first non-empty piece, with 1 client and with 8 (requests that arrive together share a prefill pass).
- TTFT on the engine alone (``bench_engine_burst``: no HTTP, requests submitted from this process): one request's,
  and the p95 of 8 submitted at once, as the served runs define them; what the model's prompt passes and the
  engine's scheduling give the served TTFT ratio, the rest being HTTP's.
- single-stream decode tokens/s: the engine alone (no HTTP) and ``llmcore.models.generate`` vs Hugging Face
  ``transformers`` ``generate`` with its KV cache, batch 1, greedy, same random GPT-2-shaped weights layout.

``bench_http_floor`` (measured by ``benchmarks.busy`` beside the server's figures) runs the same clients against
llmcore's HTTP server with no model behind it: what the clients and the server's interpreter cost on their own.

Models are random (the speed of a forward pass does not depend on the weights); prompts are random token ids.
Nothing here is asserted: the figures and ratios are printed and written to ``reports/serve_bench.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.timing import median, percentile
from llmcore.common import write_json_atomic
from llmcore.models.config import ModelConfig
from llmcore.models.generate import SamplingConfig, generate
from llmcore.models.gpt import GPT

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Case:
    name: str
    preset: str  # a ModelConfig preset (random weights)
    overrides: dict
    prompt: int  # prompt tokens
    new: int  # tokens per request
    clients: tuple[int, ...] = (1, 8)
    reps: int = 3


CASES = [
    Case("tiny (llama3-tiny, 0.6M)", "llama3-tiny", {"vocab_size": 1024}, prompt=16, new=64),
    # 96 new tokens: the 16-token prefills stay a small share of the work, as in a chat
    Case("124M (gpt2-124m shape)", "gpt2-124m", {"context_length": 256}, prompt=16, new=96, reps=2),
]
QUICK = [Case("tiny (llama3-tiny)", "llama3-tiny", {"vocab_size": 512}, prompt=8, new=16, reps=1)]


class _Tokens:
    """A stand-in tokenizer: the engine only needs ``eot_id``, ``vocab_size`` and token bytes."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.eot_id = vocab_size - 1
        self.name = "bench"

    def decode_bytes(self, ids: list[int]) -> bytes:
        return b"".join(b"t%d " % i for i in ids)

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        return [int(t[1:]) for t in text.split()]


class _Clients:
    """The client process (:mod:`benchmarks.http_clients`): started once per server, one job per run."""

    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.http_clients"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO_ROOT,
        )

    def run(self, url: str, prompts: list[str], new: int) -> tuple[float, list[tuple[int, float]]]:
        """(wall seconds, [(eval_count, ttft seconds)] per prompt) of the prompts sent at once."""
        self.proc.stdin.write(json.dumps({"url": url, "prompts": prompts, "new": new}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the client process exited ({self.proc.wait()})")
        out = json.loads(line)
        return out["wall_s"], [tuple(r) for r in out["results"]]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def bench_server(case: Case, model: GPT, log=print, admit_window: float | None = None) -> dict[str, Any]:
    """``admit_window``: the engine's wait for companions of a first request, seconds (None: the server's default)."""
    from llmcore.serve.app import make_server
    from llmcore.serve.models import ModelHandle

    tok = _Tokens(model.cfg.vocab_size)
    window = {} if admit_window is None else {"admit_window": admit_window}
    handle = ModelHandle(model=model, tokenizer=tok, template="raw", max_batch=max(case.clients), **window)
    server = make_server({"bench": handle}, port=0).start()
    try:
        results = _measure(case, server.url, tok.eot_id, log)
        results["max_live"] = handle.engine.max_live
        # how the 8 "simultaneous" requests were admitted: prefill passes run, requests an idle engine waited for
        results["prefill_passes"], results["gathered"] = handle.engine.prefill_passes, handle.engine.gathered
        results["engine_alone"] = bench_engine_burst(case, handle.engine, tok.eot_id, log)
    finally:
        server.shutdown()
        server.server_close()
    return results


class _Burst:
    """The first-piece times of ``n`` engine requests submitted together (their sinks run in the engine thread)."""

    def __init__(self, n: int):
        self.started, self.first = [0.0] * n, [None] * n
        self._ended = threading.Semaphore(0)

    def sink(self, i: int):
        from llmcore.serve.engine import Finished

        def put(event) -> None:
            if self.first[i] is None and (event or isinstance(event, Finished)):  # a piece; or, ending at once, its end
                self.first[i] = time.perf_counter() - self.started[i]
            if isinstance(event, Finished):
                self._ended.release()

        return put

    def wait(self) -> list[float]:
        for _ in self.first:
            if not self._ended.acquire(timeout=600):
                raise RuntimeError("the engine did not finish a request in 600 s")
        return self.first


def bench_engine_burst(case: Case, engine, vocab: int, log=print, reps: int = 5) -> dict[str, Any]:
    """TTFT through ``engine`` with no HTTP: one request at a time, and ``max(case.clients)`` submitted at once,
    ``reps`` times each (prompts of ``case.prompt`` random ids below ``vocab``, 2 new tokens: only the first one is
    timed, from a request's submit to its first piece). On the same weights, threads and compiled graphs as the
    served runs, so the ratio of the two is what the prompt passes' arithmetic and the engine's scheduling make of
    a burst, beside the served one."""
    from llmcore.serve.engine import Request

    g = torch.Generator().manual_seed(1)
    sampling = SamplingConfig(max_new_tokens=2)
    results: dict[str, Any] = {}
    for n in case.clients:
        ttfts: list[float] = []
        for _ in range(reps):
            burst = _Burst(n)
            prompts = [torch.randint(0, vocab, (case.prompt,), generator=g).tolist() for _ in range(n)]
            for i, prompt in enumerate(prompts):
                burst.started[i] = time.perf_counter()
                engine.submit(Request(prompt, sampling, burst.sink(i)))
            ttfts += burst.wait()
        results[f"clients_{n}"] = {
            "ttft_p50_ms": 1000 * percentile(ttfts, 0.5),
            "ttft_p95_ms": 1000 * percentile(ttfts, 0.95),
        }
    lo, hi = (results[f"clients_{n}"] for n in (min(case.clients), max(case.clients)))
    results["ttft_ratio"] = hi["ttft_p95_ms"] / lo["ttft_p50_ms"]
    log(
        f"  engine alone: TTFT {lo['ttft_p50_ms']:.1f} ms (1 request), p95 {hi['ttft_p95_ms']:.1f} ms "
        f"({max(case.clients)} at once): {results['ttft_ratio']:.2f}x"
    )
    return results


def floor_app():
    """The HTTP floor: ``/api/generate`` answering as llmcore's streaming Ollama API does, one NDJSON line per
    piece and one write each, with no model, engine or API layer behind it: what the same clients measure of
    llmcore's HTTP server alone (uvicorn, its guarded protocol, Starlette)."""
    import asyncio

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    async def generate(request: Request) -> StreamingResponse:
        body = await request.json()
        new, pieces = body["options"]["num_predict"], body["prompt"].split()

        async def lines():
            for i in range(new):
                piece = {"model": body["model"], "response": pieces[i % len(pieces)] + " ", "done": False}
                yield json.dumps(piece) + "\n"
                await asyncio.sleep(0)  # let the loop serve the other connections between pieces, as a stream would
            yield json.dumps({"model": body["model"], "response": "", "done": True, "eval_count": new}) + "\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    return Starlette(routes=[Route("/api/generate", generate, methods=["POST"])])


def bench_http_floor(case: Case, log=print) -> dict[str, Any]:
    """:func:`bench_server`'s measurement against :func:`floor_app` on llmcore's server class: the share of the
    figures that is HTTP and the client harness on this machine (no model)."""
    from llmcore.serve.app import Server

    server = Server(floor_app(), "127.0.0.1", 0).start()
    try:
        return _measure(case, server.url, 1000, log)
    finally:
        server.shutdown()
        server.server_close()


def _measure(case: Case, url: str, vocab: int, log=print) -> dict[str, Any]:
    """Tokens/s and TTFT of ``case``'s client counts against the server at ``url`` (prompts of random token ids
    below ``vocab``), and the batching speedup (most clients over fewest)."""
    g = torch.Generator().manual_seed(0)
    results: dict[str, Any] = {}
    clients = _Clients()  # in a process of their own, as a server's users are (see benchmarks.http_clients)
    try:
        clients.run(url, [" ".join(f"t{i}" for i in range(case.prompt))], 4)  # warm-up
        for n in case.clients:
            rates, ttfts = [], []
            for _ in range(case.reps):
                prompts = [
                    " ".join(f"t{int(t)}" for t in torch.randint(0, vocab, (case.prompt,), generator=g))
                    for _ in range(n)
                ]
                wall, out = clients.run(url, prompts, case.new)
                rates.append(sum(c for c, _ in out) / wall)
                ttfts += [t for _, t in out]
            results[f"clients_{n}"] = {
                "tokens_per_s": median(rates),
                "ttft_p50_ms": 1000 * percentile(ttfts, 0.5),
                "ttft_p95_ms": 1000 * percentile(ttfts, 0.95),
                "runs": rates,
            }
            log(
                f"  {n} client(s): {results[f'clients_{n}']['tokens_per_s']:.1f} tokens/s aggregate, TTFT p50 "
                f"{results[f'clients_{n}']['ttft_p50_ms']:.0f} ms, p95 {results[f'clients_{n}']['ttft_p95_ms']:.0f} ms"
            )
    finally:
        clients.close()
    lo, hi = min(case.clients), max(case.clients)
    results["batching_speedup"] = results[f"clients_{hi}"]["tokens_per_s"] / results[f"clients_{lo}"]["tokens_per_s"]
    return results


def bench_single_stream(case: Case, model: GPT, log=print) -> dict[str, Any]:
    """Batch-1 greedy decode tokens/s: the engine (no HTTP), llmcore ``generate``, transformers ``generate``."""
    from llmcore.serve.engine import Engine, Finished

    torch.manual_seed(1)
    prompt = torch.randint(0, model.cfg.vocab_size - 1, (case.prompt,)).tolist()
    cfg = SamplingConfig(max_new_tokens=case.new)  # no stop ids: always case.new tokens

    def timed(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(case.reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return case.new / median(times)

    engine = Engine(model, _Tokens(model.cfg.vocab_size), max_batch=1)
    try:
        engine_rate = timed(lambda: [e for e in engine.generate(prompt, cfg) if isinstance(e, Finished)])
    finally:
        engine.stop()
    library_rate = timed(lambda: generate(model, [prompt], cfg))
    results = {"engine_tokens_per_s": engine_rate, "generate_tokens_per_s": library_rate}
    hf = _hf_twin(model)
    if hf is None:
        results["transformers"] = "skipped: transformers not installed"
    else:
        ids = torch.tensor([prompt])

        def hf_generate() -> None:
            hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=case.new,
                min_new_tokens=case.new,
                do_sample=False,
                use_cache=True,
                pad_token_id=0,
            )

        results["transformers_tokens_per_s"] = timed(hf_generate)
        results["engine_vs_transformers"] = engine_rate / results["transformers_tokens_per_s"]
        results["generate_vs_transformers"] = library_rate / results["transformers_tokens_per_s"]
    log(
        f"  single stream: engine {engine_rate:.1f}, generate {library_rate:.1f}, transformers "
        f"{results.get('transformers_tokens_per_s', float('nan')):.1f} tokens/s"
    )
    return results


def _hf_twin(model: GPT):
    """A transformers model of the same family and shape (random weights; only speed is compared)."""
    try:
        import transformers
    except ImportError:
        return None
    cfg = model.cfg
    if cfg.pos_emb == "learned":
        config = transformers.GPT2Config(
            vocab_size=cfg.vocab_size,
            n_positions=cfg.context_length,
            n_embd=cfg.emb_dim,
            n_layer=cfg.n_layers,
            n_head=cfg.n_heads,
            resid_pdrop=0,
            embd_pdrop=0,
            attn_pdrop=0,
        )
        return transformers.GPT2LMHeadModel(config).eval()
    config = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.emb_dim,
        intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.context_length,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
    )
    return transformers.LlamaForCausalLM(config).eval()


def run(cases: list[Case], log=print, admit_window: float | None = None) -> dict[str, Any]:
    report: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cases": []}
    if admit_window is not None:
        report["admit_window_s"] = admit_window
    for case in cases:
        log(f"{case.name}: prompt {case.prompt}, {case.new} new tokens per request")
        torch.manual_seed(0)
        model = GPT(ModelConfig.from_preset(case.preset, **case.overrides, dropout=0.0)).eval()
        entry = {"case": asdict(case), "params": model.num_params()}
        entry["server"] = bench_server(case, model, log, admit_window)
        entry["single_stream"] = bench_single_stream(case, model, log)
        report["cases"].append(entry)
    report["table"] = format_table(report)
    return report


def format_table(report: dict[str, Any]) -> str:
    rows = [
        "| model | 1 client tok/s | 8 clients tok/s | ratio | TTFT p50 / p95 (1 client) | TTFT p50 / p95 "
        "(8 clients) | engine alone: TTFT 1 / p95 of 8 | single stream: engine / generate / transformers tok/s | "
        "generate vs transformers |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in report["cases"]:
        s, one = entry["server"], entry["single_stream"]
        alone = s["engine_alone"]
        lo, hi = (f"clients_{n}" for n in (min(entry["case"]["clients"]), max(entry["case"]["clients"])))
        hf = one.get("transformers_tokens_per_s")
        hf_rate = f"{hf:.0f}" if hf else "n/a"
        hf_ratio = f"{one['generate_vs_transformers']:.2f}x" if hf else "n/a"
        rows.append(
            f"| {entry['case']['name']} | {s[lo]['tokens_per_s']:.0f} | {s[hi]['tokens_per_s']:.0f} | "
            f"{s['batching_speedup']:.2f}x | {s[lo]['ttft_p50_ms']:.0f} / {s[lo]['ttft_p95_ms']:.0f} ms | "
            f"{s[hi]['ttft_p50_ms']:.0f} / {s[hi]['ttft_p95_ms']:.0f} ms | "
            f"{alone[lo]['ttft_p50_ms']:.1f} / {alone[hi]['ttft_p95_ms']:.1f} ms ({alone['ttft_ratio']:.2f}x) | "
            f"{one['engine_tokens_per_s']:.0f} / {one['generate_tokens_per_s']:.0f} / {hf_rate} | {hf_ratio} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes only (CI smoke)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "reports" / "serve_bench.json", help="report JSON")
    parser.add_argument("--case", default="", help="run only the cases whose name starts with this (tiny, 124M)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's); 1 is steadier on a busy shared machine",
    )
    parser.add_argument(
        "--admit-window",
        type=float,
        default=None,
        metavar="MS",
        help="the server's wait for requests sent together, ms (default: llmcore serve's; 0: none)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [c for c in (QUICK if args.quick else CASES) if c.name.startswith(args.case)]
    if not cases:
        parser.error(f"--case {args.case!r}: no such case")
    report = run(cases, admit_window=None if args.admit_window is None else args.admit_window / 1000)
    write_json_atomic(args.out, report)
    print("\n" + report["table"] + f"\n\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
