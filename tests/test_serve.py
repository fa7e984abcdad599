"""`llmcore serve`: the Ollama-compatible server, checked with the official `ollama` client and raw HTTP.

A tiny random Llama-style model (junk text, which is fine) and a small BPE tokenizer are built once in a
temp dir; the server runs in-process on 127.0.0.1 with an ephemeral port.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import logging
import shlex
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import ollama
import pytest
import torch
from typer.testing import CliRunner

from llmcore.cli import app
from llmcore.common import LLMCoreError
from llmcore.models.config import ModelConfig
from llmcore.models.generate import SamplingConfig, generate
from llmcore.models.gpt import GPT
from llmcore.models.responses import TextStream
from llmcore.serve.app import make_server
from llmcore.serve.engine import Finished
from llmcore.serve.models import ModelHandle, chat_prompt, served_names
from llmcore.text.prompts import extract_response, format_alpaca
from llmcore.text.tokenizer import Tokenizer
from llmcore.weights.weight_file import save_checkpoint

pytestmark = pytest.mark.timeout(60)

GREEDY = {"temperature": 0, "num_predict": 24}


# --------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    text = "".join(
        format_alpaca(f"Name a color, number {i}.", "red or green" if i % 2 else "")
        + f"Blue {i}. Café ☕.<|endoftext|>"
        for i in range(40)
    )
    tok = Tokenizer.train(text, vocab_size=384)
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("llama3-tiny", vocab_size=tok.vocab_size))
    d = tmp_path_factory.mktemp("models") / "tiny"
    save_checkpoint(d / "model.safetensors", model)
    tok.save(d / "tokenizer.json")
    return d


@pytest.fixture(scope="module")
def handles(model_dir: Path) -> dict[str, ModelHandle]:
    # the same checkpoint twice: as an instruction model (Alpaca template) and as a raw completion model
    return {"tiny": ModelHandle.load(model_dir, template="alpaca"), "tiny-raw:latest": ModelHandle.load(model_dir)}


@pytest.fixture(scope="module")
def url(handles):
    server = make_server(handles, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.url
    server.shutdown()
    server.server_close()


@pytest.fixture
def client(url: str) -> ollama.Client:
    return ollama.Client(host=url, timeout=30)


def post(url: str, path: str, body: bytes | dict | list, method: str = "POST") -> tuple[int, dict]:
    """A curl-like request: (status, decoded JSON body)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data if method == "POST" else None, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def reference(handle: ModelHandle, prompt: str, num_predict: int) -> str:
    """Greedy text straight from the library: what the server must return for a raw prompt."""
    tok = handle.tokenizer
    cfg = SamplingConfig(num_predict, stop_ids=(tok.eot_id,))
    (ids,) = generate(handle.model, [tok.encode(prompt, allow_special=False)], cfg)
    return tok.decode(ids)


# --------------------------------------------------------------------------------------------------
# Endpoints through the official client


def test_version_list_show_ps(url: str, client: ollama.Client, model_dir: Path) -> None:
    status, version = post(url, "/api/version", b"", method="GET")
    assert status == 200 and version["version"]

    listed = {m.model: m for m in client.list().models}
    assert set(listed) == {"tiny:latest", "tiny-raw:latest"}
    digest = hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()
    assert listed["tiny:latest"].digest == digest
    assert listed["tiny:latest"].details.family == "llama" and listed["tiny:latest"].details.format == "safetensors"
    assert listed["tiny:latest"].size == (model_dir / "model.safetensors").stat().st_size

    shown = client.show("tiny")  # the tag defaults to :latest, as in Ollama
    assert shown.modelinfo["llama.context_length"] == 128
    assert "### Instruction:" in shown.template and "range .Messages" in shown.template  # the server's own prompts
    assert shown.parameters == 'stop "###"'
    assert shown.capabilities == ["completion", "embedding"]
    assert {m.model for m in client.ps().models} == set(listed)


@pytest.mark.parametrize("name", ["tiny", "tiny-raw"])
def test_generate_stream_equals_non_stream(client: ollama.Client, handles, name: str) -> None:
    whole = client.generate(name, "Name a color.", options=GREEDY)
    parts = list(client.generate(name, "Name a color.", options=GREEDY, stream=True))
    assert "".join(p.response for p in parts) == whole.response
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    final = parts[-1]
    assert final.done_reason == whole.done_reason and final.done_reason in ("stop", "length")
    assert final.eval_count == whole.eval_count and 0 < whole.eval_count <= GREEDY["num_predict"]
    assert whole.prompt_eval_count > 0 and whole.total_duration >= whole.eval_duration > 0
    assert whole.model == f"{name}:latest" and whole.created_at

    # The server's text is the library's greedy generation: as is (raw), or cut and stripped (Alpaca).
    handle = handles["tiny"]
    if name == "tiny-raw":
        assert whole.response == reference(handle, "Name a color.", GREEDY["num_predict"])
    else:
        expected = reference(handle, format_alpaca("Name a color."), GREEDY["num_predict"])
        assert whole.response == extract_response(expected)


def test_chat_maps_to_alpaca(client: ollama.Client) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
    ]
    reply = client.chat("tiny", messages=messages, options=GREEDY)
    assert reply.message.role == "assistant" and reply.done and reply.done_reason in ("stop", "length")
    parts = list(client.chat("tiny", messages=messages, options=GREEDY, stream=True))
    assert "".join(p.message.content for p in parts) == reply.message.content
    assert parts[-1].eval_count == reply.eval_count

    # Documented mapping: last user message = instruction, earlier turns = "Role: content" lines as input.
    prompt = format_alpaca("Another one?", "System: Be brief.\nUser: Name a color.\nAssistant: Blue.")
    assert client.generate("tiny", prompt, raw=True, options=GREEDY).response == reply.message.content

    with pytest.raises(ollama.ResponseError) as e:
        client.chat("tiny", messages=messages[:3], options=GREEDY)
    assert e.value.status_code == 400 and "user" in e.value.error


def test_options(client: ollama.Client) -> None:
    prompt = "The color of the sky"
    long = client.generate("tiny-raw", prompt, options={"temperature": 0, "num_predict": 30})
    short = client.generate("tiny-raw", prompt, options={"temperature": 0, "num_predict": 5})
    assert short.eval_count <= 5 and long.response.startswith(short.response)
    if short.done_reason == "length":
        assert short.eval_count == 5

    sampled = {"temperature": 1.0, "top_k": 50, "top_p": 0.95, "num_predict": 30}
    a = client.generate("tiny-raw", prompt, options={**sampled, "seed": 7})
    b = client.generate("tiny-raw", prompt, options={**sampled, "seed": 7})
    c = client.generate("tiny-raw", prompt, options={**sampled, "seed": 8})
    assert a.response == b.response != c.response

    text = long.response
    assert len(text) >= 6, "the random model should produce some text"
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = client.generate("tiny-raw", prompt, options={"temperature": 0, "num_predict": 30, "stop": [stop]})
    assert cut.response == text[: text.find(stop)] and cut.done_reason == "stop"
    streamed = client.generate("tiny-raw", prompt, options={"temperature": 0, "stop": [stop]}, stream=True)
    assert "".join(p.response for p in streamed) == cut.response


def test_empty_prompt_only_loads(client: ollama.Client) -> None:
    r = client.generate("tiny", "")
    assert r.done and r.done_reason == "load" and r.response == ""


# --------------------------------------------------------------------------------------------------
# Errors, concurrency, disconnects


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 400, "invalid JSON"),
        (b"", 400, "missing request body"),
        (b"[1, 2]", 400, "JSON object"),
        (b'{"model": "tiny", "prompt": "hi", "options": {"temperature": NaN}}', 400, "NaN"),
        ({"prompt": "hi"}, 400, "model is required"),
        ({"model": "tiny"}, 400, "prompt is required"),
        ({"model": "tiny", "prompt": 3}, 400, "prompt must be a string"),
        ({"model": "tiny", "prompt": "hi", "stream": "yes"}, 400, "stream must be a boolean"),
        ({"model": "tiny", "prompt": "hi", "options": {"temperature": "hot"}}, 400, "temperature"),
        ({"model": "tiny", "prompt": "hi", "options": {"top_k": 1.5}}, 400, "top_k"),
        ({"model": "tiny", "prompt": "hi", "options": {"stop": [1]}}, 400, "stop"),
        ({"model": "tiny", "prompt": "hi", "options": [1]}, 400, "options must be a JSON object"),
        ({"model": "nope", "prompt": "hi"}, 404, "model 'nope' not found"),
    ],
)
def test_bad_generate_requests(url: str, body, status: int, message: str) -> None:
    got, answer = post(url, "/api/generate", body)
    assert got == status and message in answer["error"]


def test_other_errors(url: str, client: ollama.Client) -> None:
    assert post(url, "/api/chat", {"model": "tiny", "messages": "hi"})[0] == 400
    assert post(url, "/api/chat", {"model": "tiny", "messages": [{"content": "hi"}]})[0] == 400
    assert post(url, "/api/show", {"model": "nope"}) == (404, {"error": "model 'nope' not found"})
    # a name that would break the message's line is quoted escaped (found by tests/test_hostile_serve.py's fuzzing)
    assert post(url, "/api/show", {"model": "a\nb"}) == (404, {"error": "model '\"a\\nb\"' not found"})
    assert post(url, "/api/nothing", {})[0] == 404
    assert post(url, "/api/generate", b"", method="GET")[0] == 405
    with pytest.raises(ollama.ResponseError) as e:
        client.generate("nope", "hi")
    assert e.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as e:  # streaming requests fail before the stream starts
        list(client.chat("nope", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert e.value.status_code == 404


def test_concurrent_requests_match_sequential(url: str) -> None:
    def ask(i: int) -> str:
        c = ollama.Client(host=url, timeout=30)
        opts = {"temperature": 1.0, "seed": i, "num_predict": 20}
        prompt = f"Name color number {i}."
        if i % 2:
            return "".join(p.response for p in c.generate("tiny-raw", prompt, options=opts, stream=True))
        return c.chat("tiny", messages=[{"role": "user", "content": prompt}], options=opts).message.content

    sequential = [ask(i) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(ask, range(8))) == sequential


def test_client_hanging_up_mid_stream(url: str, client: ollama.Client, caplog) -> None:
    caplog.set_level(logging.INFO, logger="llmcore.serve")
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"model": "tiny-raw", "prompt": "Once upon a time", "options": {"num_predict": -1}}).encode()
    for _ in range(3):
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(
                b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            assert s.recv(1024).startswith(b"HTTP/1.1 200")  # the stream started; hang up now
    assert client.generate("tiny", "Name a color.", options=GREEDY).done  # the server still answers
    deadline = time.monotonic() + 10
    while sum("hung up" in r.getMessage() for r in caplog.records) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sum("hung up" in r.getMessage() for r in caplog.records) == 3  # each generation ended, quietly
    assert not any(r.levelno >= logging.ERROR for r in caplog.records)


# --------------------------------------------------------------------------------------------------
# Incremental text and the prompt template


def test_text_stream_utf8_sections_and_stops(handles) -> None:
    tok = handles["tiny"].tokenizer
    ids = tok.encode("  Café ☕ is hot.\n### Instruction:\nmore")
    assert len(ids) > len("  Café ☕ is hot.\n### Instruction:\nmore") // 4

    stream = TextStream(tok, sections=True)
    pieces = [stream.push(i) for i in ids]
    pieces.append(stream.finish())
    assert "".join(pieces) == "Café ☕ is hot." and stream.stopped
    assert not any("\ufffd" in p for p in pieces)  # split multi-byte characters arrive whole

    stream = TextStream(tok, stop=["hot", "is c"])  # "is " could start "is c": held back until it cannot
    pieces = [stream.push(i) for i in tok.encode("Café is hot")]
    assert "".join(pieces) == "Café is " and stream.stopped and stream.finish() == ""

    stream = TextStream(tok, stop=["hots"])  # a stop string's prefix at the very end is released at the end
    text = "".join(stream.push(i) for i in tok.encode("it is ho")) + stream.finish()
    assert text == "it is ho" and not stream.stopped


def test_format_alpaca() -> None:
    head = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    assert format_alpaca("Add 2 and 3.") == f"{head}\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n"
    assert format_alpaca("Add.", "2, 3") == f"{head}\n\n### Instruction:\nAdd.\n\n### Input:\n2, 3\n\n### Response:\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  The answer is 5.  \n", "The answer is 5."),
        ("The answer is 5.\n\n### Instruction:\nAdd 1 and 1.", "The answer is 5."),
        ("### Input:\nnothing", ""),
        ("Use C# or ### inline\nfine", "Use C# or ### inline\nfine"),  # only a ### at a line start opens a section
        (format_alpaca("Add 2 and 3.") + " 5\n### Response:\n6", "5"),  # the prompt itself is stripped
    ],
)
def test_extract_response(text: str, expected: str) -> None:
    assert extract_response(text) == expected


# --------------------------------------------------------------------------------------------------
# CLI


def test_cli(model_dir: Path, monkeypatch) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["serve", "--help"])
    assert result.exit_code == 0 and "--model" in result.output and "127.0.0.1" in result.output
    assert "serve" in runner.invoke(app, ["--help"]).output
    assert inspect.signature(make_server).parameters["host"].default == "127.0.0.1"

    calls = []

    class FakeServer:
        url = "http://127.0.0.1:0"

        def serve_forever(self) -> None:
            pass

        def server_close(self) -> None:
            pass

    def fake_make_server(models, host, port, max_body, **limits):
        calls.append((sorted(models), host, port))
        return FakeServer()

    monkeypatch.setattr("llmcore.serve.app.make_server", fake_make_server)
    result = runner.invoke(app, ["serve", "--model", str(model_dir), "--model", str(model_dir), "--name", "judge"])
    assert result.exit_code == 0, result.output
    assert calls == [(["judge:latest", "tiny:latest"], "127.0.0.1", 11434)]  # loopback by default

    result = runner.invoke(app, ["serve", "--model", str(model_dir / "missing")])
    assert result.exit_code == 1 and "error:" in result.output


# --------------------------------------------------------------------------------------------------
# Model folders: the stored template, and the wrong kind of model


def test_the_template_stored_with_the_model_is_served(model_dir: Path, tmp_path: Path) -> None:
    custom = "Q: {instruction}\nContext: {input}\nA:"
    vocab = Tokenizer.load(model_dir / "tokenizer.json").vocab_size
    model = GPT(ModelConfig.from_preset("llama3-tiny", vocab_size=vocab))
    save_checkpoint(tmp_path / "model.safetensors", model, {"template": custom})
    (tmp_path / "tokenizer.json").write_bytes((model_dir / "tokenizer.json").read_bytes())
    handle = ModelHandle.load(tmp_path)
    assert handle.template == custom
    assert chat_prompt([{"role": "user", "content": "Add 2 and 3."}], handle.template) == (
        "Q: Add 2 and 3.\nContext: \nA:"
    )
    from starlette.testclient import TestClient

    from llmcore.serve.app import create_app

    with TestClient(create_app({"custom": handle}), base_url="http://127.0.0.1") as http:  # /api/show: the Go template
        shown = http.post("/api/show", json={"model": "custom"})
        assert shown.status_code == 200 and "Q: {{ $content }}" in shown.json()["template"]
    assert ModelHandle.load(tmp_path, template="raw").template == "raw"  # --template still overrides it
    assert ModelHandle.load(model_dir).template == "raw"  # nothing stored: a base model, raw (as its GGUF export)
    assert ModelHandle.load(model_dir, template="alpaca").template == "alpaca"


def test_serving_a_classifier_is_refused_in_one_line(model_dir: Path, tmp_path: Path) -> None:
    vocab = Tokenizer.load(model_dir / "tokenizer.json").vocab_size
    model = GPT(ModelConfig.from_preset("llama3-tiny", vocab_size=vocab))
    save_checkpoint(tmp_path / "model.safetensors", model, {"task": "classify"})
    (tmp_path / "tokenizer.json").write_bytes((model_dir / "tokenizer.json").read_bytes())
    result = CliRunner().invoke(app, ["serve", "--model", str(tmp_path), "--port", "0"])
    assert result.exit_code == 1
    assert "a 'classify' checkpoint, not a causal language model; serve needs one" in result.output


def test_cli_imports_no_torch() -> None:
    import subprocess
    import sys

    code = "import sys, llmcore.cli; print(sorted(m for m in ('torch', 'starlette', 'uvicorn') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"  # `llmcore --help` stays fast: the server's stack loads when it is used


def _serve_args(line: str) -> tuple[list[str], list[str]]:
    """The --model and --name values of one documented command line, in order."""
    words = shlex.split(line, comments=True)
    models = [words[i + 1] for i, w in enumerate(words) if w in ("--model", "-m")]
    names = [words[i + 1] for i, w in enumerate(words) if w == "--name"]
    return models, names


def test_documented_multi_model_names_work() -> None:
    """Every documented `serve` line with several --model gives each model its own name (the Dockerfile's, the
    command's docstring and the manual's examples once named two models alike)."""
    root = Path(__file__).resolve().parents[1]
    docs = {
        "Dockerfile": (root / "Dockerfile").read_text(),
        "llmcore/cli.py": (root / "llmcore" / "cli.py").read_text(),
        **{str(p.relative_to(root)): p.read_text() for p in [root / "README.md", *(root / "docs").rglob("*.md")]},
    }
    checked = 0
    for doc, text in docs.items():
        for line in text.splitlines():
            line = line.lstrip("#").strip()
            if "--model" not in line or "--name" not in line or line.count("--model") < 2:
                continue
            models, names = _serve_args(line[line.index("llmcore") :])
            served = served_names(models, names)
            assert len(set(served)) == len(models) >= 2, (doc, line, served)
            checked += 1
    assert checked >= 3
    with pytest.raises(LLMCoreError, match="two models would share a name"):
        served_names(["/models/instruct", "/models/base"], ["base"])
    with pytest.raises(LLMCoreError, match="2 --name given for 1 --model"):
        served_names(["/models/instruct"], ["a", "b"])


class _EchoEngine:
    """An engine that answers a request at once, from the submitting thread: all its events are queued before the
    consumer reads the first."""

    def __init__(self, events: list):
        self.events = events

    def submit(self, job) -> None:
        for event in self.events:
            job.sink(event)


def _handle(events: list) -> SimpleNamespace:
    return SimpleNamespace(engine=_EchoEngine(events), stop_ids=(), sections=False, stream_interval=0)


def test_events_that_came_together_are_one_batch() -> None:
    """A loop that fell behind the engine writes what it has in one go (one socket write per stream, not per
    token); the pieces keep their order and the Finished event ends the last batch."""
    from llmcore.serve.protocol import collect, generate

    done = Finished("stop", 2, 3)

    async def batches(events: list) -> list:
        return [batch async for batch in generate(_handle(events), [1, 2], SamplingConfig(), [], what="t")]

    assert asyncio.run(batches(["a", "b", "c", done])) == [["a", "b", "c", done]]
    assert asyncio.run(collect(generate(_handle(["x", "y", done]), [1], SamplingConfig(), [], what="t"))) == (
        "xy",
        done,
    )

    async def until_error() -> tuple[list, str]:
        seen = []
        failed = Finished("error", 2, 1, error="the step failed")
        with pytest.raises(RuntimeError) as e:
            async for batch in generate(_handle(["a", "b", failed]), [1], SamplingConfig(), [], what="t"):
                seen.append(batch)
        return seen, str(e.value)

    assert asyncio.run(until_error()) == ([["a", "b"]], "the step failed")  # pieces before the error still go out


def test_events_that_came_apart_are_separate_batches() -> None:
    """A loop that keeps up gets each event as it comes: streaming still streams token by token."""
    from llmcore.serve.protocol import generate

    read = threading.Semaphore(0)  # released by the consumer after each batch

    class SteppingEngine:  # emits from its own thread, the next event only once the last one was read
        def submit(self, job) -> None:
            def run() -> None:
                for event in ["a", "b", "c", Finished("length", 1, 3)]:
                    job.sink(event)
                    read.acquire(timeout=10)

            threading.Thread(target=run, daemon=True).start()

    async def run() -> list:
        out = []
        handle = SimpleNamespace(engine=SteppingEngine(), stop_ids=(), sections=False, stream_interval=0)
        async for batch in generate(handle, [1], SamplingConfig(), [], what="t"):
            out.append(batch)
            read.release()
        return out

    assert [[e if isinstance(e, str) else e.reason for e in b] for b in asyncio.run(run())] == [
        ["a"],
        ["b"],
        ["c"],
        ["length"],
    ]


def test_a_stream_writes_what_came_within_its_interval_together() -> None:
    """With a stream interval the first piece goes out at once, the pieces that come within the interval after a
    write go out together in the next, and the answer's end is not held back by the interval."""
    from llmcore.serve.protocol import generate

    first_read = threading.Event()

    class BurstEngine:  # "a"; once it was read, three pieces at once; a moment later the end
        def submit(self, job) -> None:
            def run() -> None:
                job.sink("a")
                first_read.wait(10)
                for piece in "bcd":
                    job.sink(piece)
                time.sleep(0.05)
                job.sink(Finished("stop", 1, 4))

            threading.Thread(target=run, daemon=True).start()

    async def run(interval: float) -> tuple[list, float]:
        out, start = [], time.perf_counter()
        handle = SimpleNamespace(engine=BurstEngine(), stop_ids=(), sections=False, stream_interval=interval)
        async for batch in generate(handle, [1], SamplingConfig(), [], what="t"):
            out.append([e if isinstance(e, str) else e.reason for e in batch])
            first_read.set()
        return out, time.perf_counter() - start

    batches, seconds = asyncio.run(run(30.0))
    assert batches == [["a"], ["b", "c", "d", "stop"]]  # the end came 50 ms into the 30 s pause: sent then
    assert seconds < 15
    first_read.clear()
    batches, _ = asyncio.run(run(0.0))
    assert batches[0] == ["a"] and len(batches) >= 2 and batches[-1][-1] == "stop"


def test_stream_interval_is_checked_and_reaches_the_handle(model_dir: Path) -> None:
    assert ModelHandle.load(model_dir, stream_interval=0.005).stream_interval == 0.005
    for bad in (-0.001, 2.0):
        with pytest.raises(ValueError, match="stream_interval is in seconds"):
            ModelHandle.load(model_dir, stream_interval=bad)
