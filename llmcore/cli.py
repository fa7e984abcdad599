"""The ``llmcore`` command (a Typer app; the pipeline's stages have their own scripts in ``stages/``).

    llmcore serve --model data/models/instruct                       # Ollama + OpenAI APIs on 127.0.0.1:11434
    llmcore serve --model data/models/instruct --model data/models/pretrain --name instruct --name base
    llmcore export data/models/instruct --format gguf --precision q8_0 --out data/export/instruct
    llmcore profile params/fineweb-d12.yaml --run -n d12        # dvc exp run with the profile's params
    llmcore profile params/fineweb-d12.yaml --write run.yaml    # the merged params file, for stages by hand
    llmcore benchmark data/models/gpt2-124m --tasks hellaswag,arc_easy --limit 200   # lm-evaluation-harness
    llmcore compare                                                  # DVC experiments side by side
"""

from __future__ import annotations

import logging
from pathlib import Path

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
    run: bool = typer.Option(False, "--run", help="run `dvc exp run` with the profile as --set-param arguments"),
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
        if write is not None:
            write_text_atomic(write, yaml.safe_dump(merge_params(base, overrides), sort_keys=False))
            typer.echo(f"wrote {write}")
        cmd = ["dvc", "exp", "run", *(["-n", name] if name else [])]
        for arg in profile_overrides(base, overrides):
            cmd += ["-S", arg]
        if not run:
            if write is None:
                typer.echo(shlex.join(cmd))
            return
        raise SystemExit(subprocess.call(cmd))


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
        20.0, min=0.0, max=1000.0, help="milliseconds an idle model waits for more requests after one arrives, so "
        "requests sent together share one prefill pass (it stops after a quarter of this with none new; 0: never)"
    ),
    max_body: int = typer.Option(2**20, min=1024, help="largest request body in bytes (413 above)"),
    threads: str = typer.Option(
        "auto", help="CPU threads per model: auto (one for small models, every available CPU for wide ones; "
        "llmcore/threads.py) or a number"
    ),
    allow_host: list[str] = typer.Option(
        None, "--allow-host", help="a Host name to serve besides addresses, localhost and --host (repeat, or "
        "comma-separated; * wildcards; default $LLMCORE_ALLOWED_HOSTS): others get 403, against DNS rebinding"
    ),
    allow_origin: list[str] = typer.Option(
        None, "--allow-origin", help="a web page origin that may call the APIs, e.g. https://app.example.com "
        "(repeat, or comma-separated; * wildcards; default $LLMCORE_ORIGINS); loopback and the server's own pages "
        "always may"
    ),
    request_timeout: float = typer.Option(30.0, min=0.1, help="seconds for a request's headers and body to arrive "
                                          "(408 after)"),  # fmt: skip
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
            models[served] = ModelHandle.load(path, template=template, device=torch_device, max_batch=max_batch,
                                              threads=threads, admit_window=admit_window / 1000)  # fmt: skip
        # torch threads may be shared by all threads of the process (libgomp): every engine gets the widest count
        count = max(inference_threads(threads, handle.model.cfg) for handle in models.values())
        for handle in models.values():
            handle.engine.threads = count
        typer.echo(f"{count} CPU thread{'s' * (count > 1)} (--threads {threads})")
        try:
            server = make_server(models, host, port, max_body=max_body, allowed_hosts=allow_host or None,
                                 allowed_origins=allow_origin or None, request_timeout=request_timeout,
                                 max_connections=max_connections)  # fmt: skip
        except OSError as e:
            raise LLMCoreError(
                f"cannot listen on {host}:{port}: {e.strerror or e} (is Ollama already running? try --port)"
            ) from None

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"warning: listening on {host}: anyone who can reach this address can use the models", err=True)
    typer.echo(f"serving {', '.join(names)} on {server.url} (Ollama API /api, OpenAI API /v1, chat page /; "
               "Ctrl-C to stop)")
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


@app.command()
def export(
    model_dir: Path = typer.Argument(..., help="model folder (model.safetensors + tokenizer.json)"),
    out: Path = typer.Option(..., "--out", "-o", help="folder to write (created if missing)"),
    format: str = typer.Option(
        "hf", "--format", "-f", help="gguf: model.gguf + an Ollama Modelfile (llama.cpp, Ollama, LM Studio) | "
        "hf: the Hugging Face layout (config.json, model.safetensors, tokenizer files)"
    ),
    precision: str = typer.Option(None, help="GGUF weights: f32 | f16 (default) | bf16 | q8_0"),
    template: str = typer.Option(
        None, help="prompt template for the Modelfile / chat template: alpaca | chatml | raw | a format string with "
        "{instruction} and {input}; default: the one stored with the model by instruction tuning, else raw"
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
            model_dir, names, device=device, precision=precision, batch_size=batch_size, limit=limit,
            num_fewshot=num_fewshot, include_path=include_path,
        )  # fmt: skip
        if out is not None:
            write_json_atomic(out, metrics)
    for task, row in metrics["tasks"].items():
        typer.echo(f"{task}: {json.dumps(row)}")
    if metrics["truncated_requests"]:
        typer.echo(f"{metrics['truncated_requests']} requests lost context tokens on the left (context_length "
                   f"{metrics['context_length']})")  # fmt: skip


@app.command()
def compare(
    experiments: list[str] = typer.Argument(None, help="experiment names or revs (default: every experiment)"),
    repo: Path = typer.Option(Path("."), help="the DVC repository"),
    out: Path = typer.Option(Path("reports"), help="where compare.html, compare.md and compare_figures/ go"),
) -> None:
    """Compare DVC experiments: params that differ, headline metrics with the best marked, overlaid curves."""
    from llmcore.eval.experiments import HOW_TO, compare, parse_exp_show, run_dvc_exp_show, write_comparison

    with stage_errors():
        exps = parse_exp_show(run_dvc_exp_show(repo), experiments or None)
        md, page = write_comparison(compare(repo, exps), repo / out if not out.is_absolute() else out)
    if not exps:
        typer.echo(HOW_TO)
    typer.echo(f"wrote {page} and {md}: {len(exps)} runs compared")


if __name__ == "__main__":
    app()
