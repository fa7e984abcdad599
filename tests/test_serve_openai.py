"""`llmcore serve` through the official `openai` client, and bad input fired at a running server.

Same tiny random model and server as tests/test_serve.py (its fixtures are imported): "tiny" has the Alpaca
template, "tiny-raw" none.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import time
from pathlib import Path

import ollama
import openai
import pytest
from typer.testing import CliRunner

from llmcore.cli import app
from llmcore.text.prompts import extract_response, format_alpaca
from tests.test_serve import GREEDY, handles, model_dir, post, reference, url  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(60)

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}]


@pytest.fixture
def oai(url: str) -> openai.OpenAI:  # noqa: F811
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)


def test_models_list(oai: openai.OpenAI) -> None:
    models = oai.models.list()
    assert sorted(m.id for m in models.data) == ["tiny-raw:latest", "tiny:latest"]
    assert all(m.owned_by == "llmcore" and m.object == "model" for m in models.data)
    assert oai.models.retrieve("tiny").id == "tiny:latest"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("nope")


def test_chat_completion_and_stream(oai: openai.OpenAI, url: str) -> None:  # noqa: F811
    r = oai.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=24)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == "tiny:latest" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    # The same conversation through the Ollama API (same template, greedy) gives the same reply.
    ollama_reply = ollama.Client(host=url).chat("tiny", messages=MESSAGES, options=GREEDY)
    assert ollama_reply.message.content == choice.message.content

    chunks = list(
        oai.chat.completions.create(
            model="tiny",
            messages=MESSAGES,
            temperature=0,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == choice.finish_reason and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_completions_are_raw_and_seeded(oai: openai.OpenAI, handles) -> None:  # noqa: F811
    r = oai.completions.create(model="tiny-raw", prompt="Name a color.", temperature=0, max_tokens=24)
    assert r.object == "text_completion"
    assert r.choices[0].text == reference(handles["tiny"], "Name a color.", 24)
    streamed = oai.completions.create(
        model="tiny-raw", prompt="Name a color.", temperature=0, max_tokens=24, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text
    # the instruction model's completions endpoint is raw too: no template is applied
    prompt = format_alpaca("Name a color.")
    raw = oai.completions.create(model="tiny", prompt=prompt, temperature=0, max_tokens=24).choices[0].text
    assert raw == extract_response(reference(handles["tiny"], prompt, 24))

    default = oai.completions.create(model="tiny-raw", prompt="Once", temperature=0)
    assert default.usage.completion_tokens <= 16  # OpenAI's default max_tokens for completions

    sampled = {"model": "tiny-raw", "prompt": "The sky", "temperature": 1.0, "top_p": 0.95, "max_tokens": 30}
    a = oai.completions.create(**sampled, seed=7).choices[0].text
    b = oai.completions.create(**sampled, seed=7).choices[0].text
    c = oai.completions.create(**sampled, seed=8).choices[0].text
    assert a == b != c

    long = oai.completions.create(model="tiny-raw", prompt="The sky", temperature=0, max_tokens=30)
    text = long.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = oai.completions.create(model="tiny-raw", prompt="The sky", temperature=0, max_tokens=30, stop=[stop])
    assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"
    if long.choices[0].finish_reason == "length":
        assert long.usage.completion_tokens == 30


@pytest.mark.parametrize(
    ("kwargs", "param", "code"),
    [
        ({"n": 2}, "n", None),
        ({"response_format": {"type": "xml"}}, "response_format.type", None),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", None),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "a", "schema": {"type": "array", "uniqueItems": True}},
                }
            },
            "response_format",
            None,
        ),
        ({"temperature": "hot"}, "temperature", None),
        ({"temperature": 3}, "temperature", None),
        ({"max_tokens": 1000}, "messages", "context_length_exceeded"),
        ({"messages": [{"role": "user", "content": "word " * 400}]}, "messages", "context_length_exceeded"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", None),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", None),
        ({"stop": 5}, "stop", None),
    ],
)
def test_chat_errors_raise_the_sdk_exceptions(oai: openai.OpenAI, kwargs, param: str, code) -> None:
    body = {"model": "tiny", "messages": MESSAGES, **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(**body)
    assert e.value.status_code == 400 and e.value.param == param and e.value.code == code
    assert (
        param.split("[")[0] in e.value.message or code in str(e.value.message) or "maximum context" in (e.value.message)
    )


def test_unknown_model_is_not_found(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        oai.chat.completions.create(model="nope", messages=MESSAGES)
    assert e.value.code == "model_not_found" and "nope" in e.value.message


# --------------------------------------------------------------------------------------------------
# Bad input, then a normal request


def raw_request(url: str, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:  # noqa: F811
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    status, data = r.status, json.loads(r.read())
    conn.close()
    return status, data


def hang_up(url: str, path: str, body: dict) -> None:  # noqa: F811
    """Send a request, and hang up once the stream starts (or, for a whole answer, while it is computed)."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(
            b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            b"%s" % (path.encode(), len(data), data)
        )
        if body.get("stream", path.startswith("/api/")):
            assert s.recv(1024).startswith(b"HTTP/1.1 200")  # the stream started; hang up now
        else:
            time.sleep(0.05)


def test_bad_input_then_the_server_still_serves(url: str, handles, caplog, monkeypatch) -> None:  # noqa: F811
    caplog.set_level(logging.INFO, logger="llmcore.serve")
    for path in ("/api/generate", "/v1/chat/completions"):
        status, answer = raw_request(url, path, b'{"model": "tiny", "prompt": ')  # malformed JSON
        assert status == 400 and "invalid JSON" in json.dumps(answer)
        status, answer = raw_request(url, path, b"x" * (2**20 + 1))  # over 1 MiB
        assert status == 413 and "over 1048576 bytes" in json.dumps(answer)
    # each API's own error shape
    status, answer = raw_request(
        url, "/v1/chat/completions", json.dumps({"model": "nope", "messages": MESSAGES}).encode()
    )
    assert status == 404 and answer["error"]["code"] == "model_not_found"
    status, answer = raw_request(url, "/api/chat", json.dumps({"model": "nope", "messages": MESSAGES}).encode())
    assert (status, answer) == (404, {"error": "model 'nope' not found"})
    status, answer = raw_request(
        url, "/v1/completions", json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": "many"}).encode()
    )
    assert status == 400 and answer["error"]["param"] == "max_tokens" and "max_tokens" in answer["error"]["message"]
    status, answer = raw_request(url, "/api/generate", json.dumps({"model": "tiny", "prompt": ["hi"]}).encode())
    assert status == 400 and answer["error"] == "prompt must be a string, got an array"
    status, answer = raw_request(
        url, "/v1/completions", json.dumps({"model": "tiny", "prompt": "word " * 400}).encode()
    )
    assert status == 400 and answer["error"]["code"] == "context_length_exceeded"
    assert post(url, "/v1/nothing", {})[0] == 404 and "error" in post(url, "/v1/nothing", {})[1]

    engine = handles["tiny-raw:latest"].engine
    model, forward = engine.model, engine.model.forward  # slowed, so each generation outlasts its client

    def slow_forward(*args, **kwargs):
        time.sleep(0.01)
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", slow_forward)
    long = {"model": "tiny-raw", "prompt": "Once", "options": {"num_predict": -1}}
    for path, body in (
        ("/api/generate", long),
        ("/api/generate", {**long, "stream": False}),
        ("/v1/chat/completions", {"model": "tiny-raw", "messages": MESSAGES, "stream": True}),
    ):
        hang_up(url, path, body)
    deadline = time.monotonic() + 10

    def hung_up() -> int:
        return sum("sequence was cancelled" in r.getMessage() for r in caplog.records)

    while (engine._live or hung_up() < 3) and time.monotonic() < deadline:  # the sequences leave the batch
        time.sleep(0.05)
    assert engine._live == [] and hung_up() == 3
    monkeypatch.setattr(model, "forward", forward)

    r = ollama.Client(host=url, timeout=30).generate("tiny", "Name a color.", options=GREEDY)
    assert r.done and r.eval_count > 0
    c = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0).chat.completions.create(
        model="tiny", messages=MESSAGES, temperature=0, max_tokens=5
    )
    assert c.choices[0].finish_reason in ("stop", "length")
    assert not any(r.levelno >= logging.ERROR for r in caplog.records)


# --------------------------------------------------------------------------------------------------
# The server is not silent: format, over-long prompts, model names


def test_a_format_that_is_not_json_or_a_schema_is_refused_naming_the_field(url: str) -> None:  # noqa: F811
    for fmt in ("yaml", 5, ["json"]):
        status, answer = post(url, "/api/generate", {"model": "tiny", "prompt": "hi", "format": fmt})
        assert status == 400 and answer["error"].startswith('format must be "json" or a JSON schema object')
    status, answer = post(
        url,
        "/api/chat",
        {"model": "tiny", "messages": MESSAGES, "stream": False, "format": {"type": "object", "not": {}}},
    )
    assert status == 400 and answer["error"] == 'format: unsupported JSON schema: Unimplemented keys: ["not"]'
    assert (
        post(
            url,
            "/api/generate",
            {"model": "tiny", "prompt": "hi", "format": "", "stream": False, "options": {"num_predict": 2}},
        )[0]
        == 200
    )


def test_ollama_truncates_a_long_prompt_and_says_so(url: str, caplog, handles) -> None:  # noqa: F811
    caplog.set_level(logging.WARNING, logger="llmcore.serve")
    prompt = "word " * 600
    n_tokens = len(handles["tiny-raw:latest"].tokenizer.encode(prompt))
    assert n_tokens > 128
    status, r = post(
        url,
        "/api/generate",
        {"model": "tiny-raw", "prompt": prompt, "stream": False, "options": {"temperature": 0, "num_predict": 10}},
    )
    assert status == 200 and r["prompt_eval_count"] == 64 and 0 < r["eval_count"] <= 10  # half the window kept
    warnings = [rec.getMessage() for rec in caplog.records if "truncating input prompt" in rec.getMessage()]
    assert warnings and f"limit=128 prompt={n_tokens} new=64" in warnings[-1]

    status, r = post(
        url,
        "/api/generate",
        {"model": "tiny-raw", "prompt": "word " * 40, "stream": False, "options": {"num_ctx": 32, "num_predict": 100}},
    )
    assert status == 200 and r["prompt_eval_count"] == 16 and r["eval_count"] <= 16  # num_ctx is the window


def test_served_names_follow_ollama_rules(model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    runner = CliRunner()
    for bad in ("bad name!", "a:b:c", "-dash", "x" * 81):
        result = runner.invoke(app, ["serve", "--model", str(model_dir), "--name", bad, "--port", "0"])
        assert result.exit_code == 1 and "not a valid model name" in result.output, bad
    odd = tmp_path / "my model"
    odd.mkdir()
    result = runner.invoke(app, ["serve", "--model", str(odd), "--port", "0"])
    assert result.exit_code == 1 and "--name" in result.output
    from llmcore.serve.models import check_name

    assert check_name("library/llama3.1:8b-q4_K_M") == "library/llama3.1:8b-q4_K_M"
    assert check_name("judge") == "judge:latest"


# --------------------------------------------------------------------------------------------------
# README claims: `ask` and the server agree at temperature 0; the CLI serves and stops on SIGTERM


def test_greedy_curl_matches_ask(url: str, model_dir: Path) -> None:  # noqa: F811
    result = CliRunner().invoke(app, ["ask", "Name a primary colour.", "--model", str(model_dir), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    status, r = post(
        url,
        "/api/generate",
        {"model": "tiny", "prompt": "Name a primary colour.", "stream": False, "options": {"temperature": 0}},
    )
    assert status == 200 and r["response"] == result.output.strip()


def test_cli_serves_every_api_and_stops_on_sigterm(model_dir: Path) -> None:  # noqa: F811
    import signal
    import subprocess
    import sys
    import urllib.request

    cmd = [sys.executable, "-m", "llmcore.cli", "serve", "--model", str(model_dir), "--port", "0", "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("serving "):
                break
        base = lines[-1].split(" on ")[1].split()[0]
        assert base.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(base + "/", timeout=10) as r:
            page = r.read().decode()
        assert "<title>llmcore chat</title>" in page and "://" not in page  # no external assets
        with urllib.request.urlopen(base + "/v1/models", timeout=10) as r:
            assert json.loads(r.read())["data"][0]["id"] == "tiny:latest"
        status, answer = post(
            base, "/api/generate", {"model": "tiny", "prompt": "hi", "stream": False, "options": {"num_predict": 3}}
        )
        assert status == 200 and answer["done"]
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, rest
        assert "POST /api/generate 200" in rest  # every request is logged with its status and time
    finally:
        if proc.poll() is None:
            proc.kill()
