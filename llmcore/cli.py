"""The ``llmcore`` command (a Typer app; the pipeline's stages have their own scripts in ``stages/``).

    llmcore ask "Name a primary color." --model data/models/instruct   # one answer, streamed
    llmcore chat --model data/models/instruct < questions.txt          # a conversation, one message a line
    llmcore classify "WINNER!! Claim your prize" --model data/models/classify   # label, probability, text
    llmcore serve --model data/models/instruct                       # Ollama + OpenAI APIs on 127.0.0.1:11434
    llmcore serve --model data/models/instruct --model data/models/pretrain --name instruct --name base
    llmcore export data/models/instruct --format gguf --precision q8_0 --out data/export/instruct
    llmcore profile params/fineweb-d12.yaml --run -n d12        # dvc exp run with the profile's params
    llmcore profile params/fineweb-d12.yaml --write run.yaml    # the merged params file, for stages by hand
    llmcore benchmark data/models/gpt2-124m --tasks hellaswag,arc_easy --limit 200   # lm-evaluation-harness
    llmcore compare                                                  # DVC experiments side by side
    llmcore metrics                                                  # the run's headline figures (--all: every one)

Each command's ``--help`` lists its options.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import typer

from llmcore.common import LLMCoreError, stage_errors

app = typer.Typer(no_args_is_help=True, add_completion=False, help="llmcore: tools around the pipeline's models.")


@app.callback()
def main() -> None:
    """llmcore: tools around the pipeline's models."""  # a callback keeps `serve` a subcommand while it is alone


@app.command()
def profile(
    path: Path = typer.Argument(..., help="a profile: a partial params file (params/*.yaml)"),
    params: Path = typer.Option(Path("params.yaml"), help="the params file it is merged over"),
    write: Path = typer.Option(None, help="write the merged params here (python -m stages.X --params FILE)"),
    run: bool = typer.Option(
        False, "--run", metavar="", help="run `dvc exp run` with the profile as --set-param arguments"
    ),  # metavar "": a flag takes no value, so no <bool> beside it in --help
    name: str = typer.Option(None, "-n", "--name", help="experiment name for --run"),
) -> None:
    """Merge a params profile over params.yaml: print the `dvc exp run` command, write the file, or run it."""
    import shlex
    import subprocess

    import yaml

    from llmcore.common import write_text_atomic
    from llmcore.params import merge_params, profile_overrides, read_params

    with stage_errors():
        base, overrides = read_params(params), read_params(path)
        merged = yaml.safe_dump(merge_params(base, overrides), sort_keys=False)
        check_profile(merged, path, params)
        if write is not None:
            write_text_atomic(write, merged)
            typer.echo(f"wrote {write}")
        cmd = ["dvc", "exp", "run", *(["-n", name] if name else [])]
        for arg in profile_overrides(base, overrides):
            cmd += ["-S", arg]
        if not run:
            if write is None:
                typer.echo(shlex.join(cmd))
            return
        raise SystemExit(subprocess.call(cmd))


def check_profile(merged: str, profile: Path, params: Path) -> None:
    """Load the merged params through every stage's loader (the `check-params` stage, ``stages/check_params.py``, of
    the repository that holds ``params``), so a bad key or value in the profile is one line before anything is
    written or run."""
    import os
    import subprocess
    import sys
    import tempfile

    root = params.resolve().parent
    if not (root / "stages" / "check_params.py").is_file():
        raise LLMCoreError(f"{params}: no stages/ beside it to validate {profile} with (run from the repository)")
    # beside params.yaml, so the dvc.yaml there decides which sections exist
    fd, tmp = tempfile.mkstemp(prefix=".profile-", suffix=".yaml", dir=root)
    checked = tmp + ".checked"
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(merged)
        proc = subprocess.run(
            [sys.executable, "-m", "stages.check_params", "--params", tmp, "--out", checked],
            cwd=root,
            capture_output=True,
            text=True,
        )
    finally:
        for path in (tmp, checked):
            if os.path.exists(path):
                os.unlink(path)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
        why = lines[-1].removeprefix("error: ").replace(f"{tmp}: ", "").replace(tmp, "the merged params")
        raise LLMCoreError(f"{profile} (merged over {params}): {why}")


@app.command()
def serve(
    model: list[Path] = typer.Option(
        ..., "--model", "-m", help="model directory (model.safetensors + tokenizer.json); repeat to serve several"
    ),
    name: list[str] = typer.Option(
        None, "--name", help="name to serve the n-th --model under (default: its directory name, tag :latest)"
    ),
    host: str = typer.Option("127.0.0.1", help="address to bind; 0.0.0.0 exposes the server to the network"),
    port: int = typer.Option(11434, help="port (Ollama's by default; 0 picks a free one)"),
    template: str = typer.Option(
        None,
        help="prompt template: alpaca | chatml (a chat model: needs <|im_start|>/<|im_end|>) | raw (the prompt as "
        "given) | a format string with {instruction} and {input}; "
        "default: the template stored with the model by instruction tuning, else raw (base models)",
    ),
    device: str = typer.Option("auto", help="auto | cpu | cuda | mps"),
    max_batch: int = typer.Option(8, min=1, help="sequences of one model decoded together (continuous batching)"),
    admit_window: float = typer.Option(
        20.0,
        min=0.0,
        max=1000.0,
        help="milliseconds an idle model waits for more requests after one arrives, so "
        "requests sent together share one prefill pass (it stops after a quarter of this with none new; 0: never)",
    ),
    stream_interval: float = typer.Option(
        20.0,
        min=0.0,
        max=1000.0,
        help="milliseconds a stream waits after a write before the next; the tokens that came meanwhile go out "
        "together (the first goes out at once; only streams faster than one token per interval are grouped; 0: a "
        "write per token)",
    ),
    max_body: int = typer.Option(2**20, min=1024, help="largest request body in bytes (413 above)"),
    threads: str = typer.Option(
        "auto",
        help="CPU threads per model: auto (one for small models, every available CPU for wide ones; "
        "llmcore/threads.py) or a number",
    ),
    allow_host: list[str] = typer.Option(
        None,
        "--allow-host",
        help="a Host name to serve besides addresses, localhost and --host (repeat, or "
        "comma-separated; * wildcards; default $LLMCORE_ALLOWED_HOSTS): others get 403, against DNS rebinding",
    ),
    allow_origin: list[str] = typer.Option(
        None,
        "--allow-origin",
        help="a web page origin that may call the APIs, e.g. https://app.example.com "
        "(repeat, or comma-separated; * wildcards; default $LLMCORE_ORIGINS); loopback and the server's own pages "
        "always may",
    ),
    request_timeout: float = typer.Option(
        30.0, min=0.1, help="seconds for a request's headers and body to arrive (408 after)"
    ),
    max_connections: int = typer.Option(256, min=1, help="open connections at once (503 beyond)"),
) -> None:
    """Serve llmcore checkpoints over the Ollama API (/api/*), the OpenAI API (/v1/*) and a chat page (/)."""
    from llmcore.device import resolve_device  # torch: import late (`llmcore --help` stays fast)
    from llmcore.serve.app import make_server
    from llmcore.serve.models import ModelHandle, served_names
    from llmcore.threads import inference_threads, parse_threads

    with stage_errors():
        names = served_names(model, name or [])
        torch_device = resolve_device(device)
        try:
            parse_threads(threads, "--threads")
        except ValueError as e:
            raise LLMCoreError(str(e)) from None
        models = {}
        for served, path in zip(names, model, strict=True):
            typer.echo(f"loading {path} as {served} ...")
            models[served] = ModelHandle.load(
                path,
                template=template,
                device=torch_device,
                max_batch=max_batch,
                threads=threads,
                admit_window=admit_window / 1000,
                stream_interval=stream_interval / 1000,
            )
        # torch threads may be shared by all threads of the process (libgomp): every engine gets the widest count
        count = max(inference_threads(threads, handle.model.cfg) for handle in models.values())
        for handle in models.values():
            handle.engine.threads = count
        typer.echo(f"{count} CPU thread{'s' * (count > 1)} (--threads {threads})")
        try:
            server = make_server(
                models,
                host,
                port,
                max_body=max_body,
                allowed_hosts=allow_host or None,
                allowed_origins=allow_origin or None,
                request_timeout=request_timeout,
                max_connections=max_connections,
            )
        except OSError as e:
            raise LLMCoreError(
                f"cannot listen on {host}:{port}: {e.strerror or e} (is Ollama already running? try --port)"
            ) from None

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"warning: listening on {host}: anyone who can reach this address can use the models", err=True)
    typer.echo(
        f"serving {', '.join(names)} on {server.url} (Ollama API /api, OpenAI API /v1, chat page /; Ctrl-C to stop)"
    )
    # uvicorn stops gracefully on SIGINT/SIGTERM, then re-raises the signal: a stop asked for is a clean exit.
    import signal
    import sys
    import threading

    if threading.current_thread() is threading.main_thread():  # (a server run from a thread has no signals)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: sys.exit(0))
    try:
        server.serve_forever()
    finally:
        server.server_close()
        typer.echo("stopped")


# The options `ask` and `chat` share: the model folder and how its answers are decoded
MODEL = typer.Option(Path("data/models/instruct"), "--model", "-m", help="instruction model folder")
MAX_NEW_TOKENS = typer.Option(256, help="answer length limit, in tokens")
TEMPERATURE = typer.Option(0.0, help="0 = greedy")
TOP_K = typer.Option(None, help="sample from the k most likely tokens")
TOP_P = typer.Option(None, help="nucleus sampling mass")
SEED = typer.Option(None, help="sampling seed")
DEVICE = typer.Option("auto", help="auto | cpu | cuda | mps")
THREADS = typer.Option(
    "auto",
    help="CPU threads: auto (one for narrow models, all available CPUs for wide ones; "
    "$OMP_NUM_THREADS wins) or a number",
)


def _load_answerer(command: str, model_dir: Path, device: str, threads: str, **sampling: Any):
    """(model, tokenizer, template, SamplingConfig) for ``ask`` and ``chat``; a chat model stops at <|im_end|>."""
    from llmcore.common import LLMCoreError
    from llmcore.device import resolve_device
    from llmcore.models.generate import SamplingConfig  # torch: import late
    from llmcore.text.chat import CHATML, IM_END
    from llmcore.threads import parse_threads
    from llmcore.weights.model_dir import load_instruct_model

    try:
        parse_threads(threads, f"{command}: --threads")
    except ValueError as e:
        raise LLMCoreError(str(e)) from None
    model, tok, template = load_instruct_model(model_dir, device=resolve_device(device), use=command)
    cfg = SamplingConfig(**sampling)
    if template == CHATML:
        cfg.stop_ids = (tok.special_tokens[IM_END],)
    return model, tok, template, cfg


def _stream_answer(model, tok, prompt_ids: list[int] | str, sampling, threads: str, chat: bool) -> str:
    """Write the answer to stdout while it is generated, then a newline; returns its text."""
    import sys

    from llmcore.models.responses import stream_response
    from llmcore.threads import threads_for_inference

    pieces = []
    with threads_for_inference(threads, model.cfg):
        for piece in stream_response(model, tok, prompt_ids, sampling, sections=not chat):
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return "".join(pieces)


@app.command()
def ask(
    prompt: str = typer.Argument(None, help="the instruction (read from stdin when absent)"),
    input: str = typer.Option("", "--input", "-i", help="optional input for the instruction (Alpaca's ### Input)"),
    model_dir: Path = MODEL,
    max_new_tokens: int = MAX_NEW_TOKENS,
    temperature: float = TEMPERATURE,
    top_k: int = TOP_K,
    top_p: float = TOP_P,
    seed: int = SEED,
    device: str = DEVICE,
    threads: str = THREADS,
    compiled_decode: str = typer.Option(
        None,
        help="auto | always | never: decode with the compiled step (CPU; ~20 s to build once per machine and model "
        "shape, then loaded from ~/.cache/llmcore/decode in milliseconds). auto (the default, or "
        "$LLMCORE_COMPILED_DECODE) uses a step built already and builds one only where it pays, which one answer "
        "does not",
    ),
) -> None:
    """Answer one instruction with an instruction model, streaming the answer as it is generated."""
    import sys

    from llmcore.common import LLMCoreError
    from llmcore.models import static_decode  # torch: import late
    from llmcore.text.chat import CHATML, render_chat
    from llmcore.text.prompts import format_prompt

    with stage_errors():
        text = sys.stdin.read() if prompt is None else prompt
        if not text.strip():
            raise LLMCoreError("ask: empty instruction (pass it as an argument or on stdin)")
        if compiled_decode is not None and compiled_decode not in static_decode.POLICIES:
            raise LLMCoreError(
                f"ask: --compiled-decode must be one of {'|'.join(static_decode.POLICIES)}, got {compiled_decode!r}"
            )
        model, tok, template, sampling = _load_answerer(
            "ask",
            model_dir,
            device,
            threads,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
        )
        if compiled_decode is not None:
            static_decode.set_policy(compiled_decode)
        try:
            if template == CHATML:
                messages = [{"role": "user", "content": text.strip() + (f"\n\n{input}" if input else "")}]
                prompt_ids = render_chat(tok, messages, add_generation_prompt=True).ids
            else:
                prompt_ids = format_prompt(template, text.strip(), input)
            _stream_answer(model, tok, prompt_ids, sampling, threads, chat=template == CHATML)
        finally:
            if compiled_decode is not None:
                static_decode.set_policy(None)


@app.command()
def chat(
    model_dir: Path = MODEL,
    system: str = typer.Option(None, help="a system message to start the conversation with (chat models)"),
    max_new_tokens: int = MAX_NEW_TOKENS,
    temperature: float = TEMPERATURE,
    top_k: int = TOP_K,
    top_p: float = TOP_P,
    seed: int = SEED,
    device: str = DEVICE,
    threads: str = THREADS,
) -> None:
    """Talk with an instruction model: one message a line on stdin, each answer streamed after it (Ctrl-D ends).

    A chat (ChatML) model sees the conversation so far, its oldest turns dropped when it outgrows the context; an
    Alpaca-template model has no turns and answers each line on its own."""
    import sys

    from llmcore.text.chat import CHATML, render_chat
    from llmcore.text.prompts import format_prompt

    with stage_errors():
        model, tok, template, sampling = _load_answerer(
            "chat",
            model_dir,
            device,
            threads,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
        )
        is_chat = template == CHATML
        history = [{"role": "system", "content": system}] if system and is_chat else []
        room = model.cfg.context_length - 1  # the prompt and at least one new token
        for line in sys.stdin:
            text = line.strip()
            if not text:
                continue
            if not is_chat:
                _stream_answer(model, tok, format_prompt(template, text, ""), sampling, threads, chat=False)
                continue
            history.append({"role": "user", "content": text})
            prompt_ids = render_chat(tok, history, add_generation_prompt=True).ids
            first = 1 if history[0]["role"] == "system" else 0
            while len(prompt_ids) > room and len(history) - first > 1:  # drop the oldest exchange
                del history[first : first + 2]
                prompt_ids = render_chat(tok, history, add_generation_prompt=True).ids
            answer = _stream_answer(model, tok, prompt_ids, sampling, threads, chat=True)
            history.append({"role": "assistant", "content": answer})


@app.command()
def classify(
    texts: list[str] = typer.Argument(None, help="messages to classify (read from stdin, one a line, when absent)"),
    model_dir: Path = typer.Option(Path("data/models/classify"), "--model", "-m", help="classifier model folder"),
    batch_size: int = typer.Option(64, help="messages per forward pass"),
    device: str = typer.Option("auto", help="auto | cpu | cuda | mps"),
) -> None:
    """Classify messages with a classifier folder: `label<TAB>probability<TAB>text` for each."""
    import sys

    from llmcore.common import LLMCoreError
    from llmcore.device import resolve_device
    from llmcore.models.classifier import predict_proba  # torch: import late
    from llmcore.weights.model_dir import open_model_dir

    with stage_errors():
        if not texts:
            texts = [line.rstrip("\r") for line in sys.stdin.read().split("\n") if line.strip()]
        if not texts:
            raise LLMCoreError("classify: no text (pass messages as arguments or on stdin, one a line)")
        dev = resolve_device(device)
        folder = open_model_dir(model_dir)
        model, tok, labels = folder.load_classifier(dev), folder.tokenizer, folder.labels
        stored = folder.metadata.get("max_length", "")
        max_length = int(stored) if stored.isdigit() and int(stored) > 0 else model.cfg.context_length
        max_length = min(max_length, model.cfg.context_length)  # truncate as training did
        seqs = []
        for i, text in enumerate(texts):
            ids = tok.encode(text, allow_special=False)[:max_length]
            if not ids:
                raise LLMCoreError(f"classify: text {i + 1} is empty")
            seqs.append(ids)
        probs = predict_proba(model, seqs, tok.eot_id, batch_size, dev)
        conf, pred = probs.max(dim=-1)
        for text, p, c in zip(texts, pred.tolist(), conf.tolist(), strict=True):
            print(f"{labels[p]}\t{c:.4f}\t{text}")


@app.command()
def export(
    model_dir: Path = typer.Argument(..., help="model folder (model.safetensors + tokenizer.json)"),
    out: Path = typer.Option(..., "--out", "-o", help="folder to write (created if missing)"),
    format: str = typer.Option(
        "hf",
        "--format",
        "-f",
        help="gguf: model.gguf + an Ollama Modelfile (llama.cpp, Ollama, LM Studio) | "
        "hf: the Hugging Face layout (config.json, model.safetensors, tokenizer files)",
    ),
    precision: str = typer.Option(None, help="GGUF weights: f32 | f16 (default) | bf16 | q8_0"),
    template: str = typer.Option(
        None,
        help="prompt template for the Modelfile / chat template: alpaca | chatml | raw | a format string with "
        "{instruction} and {input}; default: the one stored with the model by instruction tuning, else raw",
    ),
    name: str = typer.Option(None, help="model name inside the GGUF file and the Modelfile (default: the folder's)"),
) -> None:
    """Export a GPT-2- or Llama-family language model for other tools. LoRA fine-tunes are saved merged.

    --format gguf: `ollama create NAME -f OUT/Modelfile`, `llama-cli -m OUT/model.gguf`, or load OUT/model.gguf in
    LM Studio. --format hf: AutoModelForCausalLM / AutoTokenizer.from_pretrained(OUT)."""
    from llmcore.weights.export import export_model  # torch: import late

    with stage_errors():
        result = export_model(model_dir, out, fmt=format, precision=precision, template=template, name=name)
    files = ", ".join(f"{out}/{f}" for f in result.files)
    typer.echo(f"wrote {files} ({result.arch}, {result.n_params:,} parameters, template {result.template})")


@app.command()
def benchmark(
    model_dir: Path = typer.Argument(..., help="language-model folder (model.safetensors + tokenizer.json)"),
    tasks: str = typer.Option(..., help="comma-separated lm-eval tasks/groups/tags or task YAML files"),
    limit: int = typer.Option(None, min=1, help="items per task (default: all)"),
    num_fewshot: int = typer.Option(None, min=0, help="few-shot examples (default: each task's own)"),
    batch_size: int = typer.Option(16, min=1, help="rows per forward pass"),
    include_path: Path = typer.Option(None, help="a folder of extra task YAML files to index"),
    device: str = typer.Option("auto", help="auto | cpu | cuda | mps"),
    precision: str = typer.Option("fp32", help="fp32 | bf16 | fp16 (autocast)"),
    out: Path = typer.Option(None, "--out", "-o", help="also write the metrics JSON here"),
) -> None:
    """Score a model on standard benchmarks with EleutherAI's lm-evaluation-harness (needs the eval extra)."""
    import json

    from llmcore.common import write_json_atomic

    with stage_errors():
        from llmcore.eval.harness import benchmark as run_benchmark  # lm-eval and torch: import late

        names = [t.strip() for t in tasks.split(",") if t.strip()]
        metrics = run_benchmark(
            model_dir,
            names,
            device=device,
            precision=precision,
            batch_size=batch_size,
            limit=limit,
            num_fewshot=num_fewshot,
            include_path=include_path,
        )
        if out is not None:
            write_json_atomic(out, metrics)
    for task, row in metrics["tasks"].items():
        typer.echo(f"{task}: {json.dumps(row)}")
    if metrics["truncated_requests"]:
        typer.echo(
            f"{metrics['truncated_requests']} requests lost context tokens on the left (context_length "
            f"{metrics['context_length']})"
        )


WIDTH = 120  # `llmcore metrics` lines never exceed it


@app.command()
def metrics(
    reports: Path = typer.Option(Path("reports"), help="the run's reports folder (reports/<stage>/metrics.json ...)"),
    every: bool = typer.Option(False, "--all", help="every number of every stage, one per line (timings marked †)"),
) -> None:
    """The run's headline figures, one line per stage's key figure (the report card), at most 120 columns wide."""
    from llmcore.report.card import build_report, fmt
    from llmcore.report.outputs import flatten

    with stage_errors():
        if not reports.is_dir():
            raise LLMCoreError(f"{reports}: no such folder (run the pipeline first: dvc repro)")
        report = build_report(reports, {})
    if every:
        for name, stage in report.stages.items():
            for source, mark in ((stage.metrics, ""), (stage.timing, " †")):
                for key, value in flatten(source or {}).items():
                    if isinstance(value, int | float) and not isinstance(value, bool):
                        typer.echo(f"{name:<10} {key + mark:<48} {fmt(value)}"[:WIDTH])
        return
    for row in report.rows:
        value = fmt(row.value, row.kind) if row.status == "ok" else row.status
        refs = "; ".join(
            f"{r.label} {fmt(r.value, row.kind)}" + (f" ({v})" if (v := row.verdict(r)) else "")
            for r in [*row.baselines, *([row.book] if row.book else [])]
        )
        line, rest = f"{row.stage:<10} {row.figure[:46]:<46} {value:>9}", refs or row.reason
        while rest:  # what it is compared with, wrapped under the figure
            room = WIDTH - len(line) - 2
            cut = rest if len(rest) <= room else rest[: rest.rfind(" ", 0, room) if " " in rest[:room] else room]
            typer.echo(f"{line}  {cut}".rstrip())
            line, rest = " " * 67, rest[len(cut) :].lstrip()
        if line.strip():
            typer.echo(line.rstrip())


@app.command()
def compare(
    experiments: list[str] = typer.Argument(None, help="experiment names or revs (default: every experiment)"),
    repo: Path = typer.Option(Path("."), help="the DVC repository"),
    out: Path = typer.Option(Path("reports"), help="where compare.html, compare.md and compare_figures/ go"),
    baseline: str = typer.Option(
        None, help="an experiment (name or rev) to compare against, instead of the committed metrics"
    ),
) -> None:
    """Compare DVC experiments: params that differ, headline metrics with the best marked, overlaid curves.

    The baseline is the commit the experiments came from, with the metrics committed in it (measured on the
    machine that made the commit); `--baseline NAME` takes one of your experiments instead, e.g. a run without
    changes: `dvc exp run -n base`, then `llmcore compare --baseline base`.
    """
    from llmcore.report.experiments import HOW_TO, compare, parse_exp_show, run_dvc_exp_show, write_comparison

    with stage_errors():
        exps = parse_exp_show(run_dvc_exp_show(repo), experiments or None, baseline)
        md, page = write_comparison(compare(repo, exps), repo / out if not out.is_absolute() else out)
    if not exps:
        typer.echo(HOW_TO)
    typer.echo(f"wrote {page} and {md}: {len(exps)} runs compared")


if __name__ == "__main__":
    app()
