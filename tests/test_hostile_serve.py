"""Hostile input to `llmcore serve` (issue #32, cases 1-6), against the real server on loopback.

Where an attack could hurt others, bystanders run beside it and their answers must be exactly what they are
without the attacker. Last, a property-based fuzz of the request JSON of both APIs: a 4xx or a 2xx, never a 500.
The tiny random model and tokenizer are tests/test_serve.py's.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient
from typer.testing import CliRunner

from llmcore.cli import app
from llmcore.models.config import ModelConfig
from llmcore.models.generate import MIN_TEMPERATURE, SamplingConfig, sample_next
from llmcore.models.gpt import GPT
from llmcore.models.responses import StopMatcher, TextStream, _cut
from llmcore.serve import guard, protocol
from llmcore.serve.app import create_app, make_server
from llmcore.serve.engine import Engine, Finished, Request
from llmcore.serve.models import ModelHandle
from llmcore.text.tokenizer import Tokenizer
from llmcore.weights.weight_file import save_checkpoint
from tests.test_serve import model_dir  # noqa: F401  (fixture)

pytestmark = pytest.mark.timeout(60)

DEADLINE = 1.0  # the request deadline of the servers here (seconds)


# --------------------------------------------------------------------------------------------------
# A server on loopback, and raw HTTP


def start(model_dir: Path, **limits) -> tuple:  # noqa: F811
    handles = {"tiny": ModelHandle.load(model_dir), "tiny-raw": ModelHandle.load(model_dir, template="raw")}
    server = make_server(handles, "127.0.0.1", 0, **{"request_timeout": DEADLINE, **limits}).start()
    return server, handles


@pytest.fixture(scope="module")
def served(model_dir: Path):  # noqa: F811
    server, handles = start(model_dir)
    yield server, handles
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def url(served) -> str:
    return served[0].url


def call(
    url: str,
    path: str,
    body: bytes | dict | None = None,
    method: str = "POST",
    headers: dict | None = None,
    timeout: float = 30,
) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one request on its own connection."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    try:
        conn.request(method, path, body=data, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def post(url: str, path: str, body: bytes | dict, **kw) -> tuple[int, dict]:
    status, _, data = call(url, path, body, **kw)
    return status, json.loads(data)


def raw(url: str, data: bytes, drip: float | None = None, timeout: float = 10) -> tuple[bytes, float]:
    """Send ``data`` on a raw socket (a byte every ``drip`` seconds after the first half, if given); return what
    the server answered before closing, and the seconds it took."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    began = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        if drip is None:
            s.sendall(data)
        else:
            s.sendall(data[: len(data) // 2])
            s.settimeout(drip)
            for byte in data[len(data) // 2 :]:
                try:
                    s.sendall(bytes([byte]))
                    if s.recv(1, socket.MSG_PEEK):
                        break  # the server answered
                except TimeoutError:
                    continue
                except OSError:
                    break
            s.settimeout(timeout)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer, time.monotonic() - began


def parse(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def ollama_text(url: str, options: dict, prompt: str = "Once upon a time", stream: bool = False) -> str:
    body = {"model": "tiny-raw", "prompt": prompt, "options": options, "stream": stream}
    status, _, data = call(url, "/api/generate", body)
    assert status == 200, data
    lines = [json.loads(line) for line in data.splitlines()]
    assert not any("error" in line for line in lines), lines
    assert lines[-1]["done"]
    return "".join(line["response"] for line in lines)


def openai_text(url: str, body: dict) -> str:
    status, answer = post(url, "/v1/completions", {"model": "tiny-raw", "prompt": "Once upon a time", **body})
    assert status == 200, answer
    return answer["choices"][0]["text"]


def bystanders(url: str, n: int = 4) -> list:
    """Requests of ordinary users: sampled and seeded, streamed or not, through both APIs."""
    calls = []
    for i in range(n):
        options = {"temperature": 0.9, "top_k": 50, "seed": 100 + i, "num_predict": 40}
        if i % 2:
            calls.append(lambda o=options, i=i: ollama_text(url, o, f"Name color number {i}.", stream=True))
        else:
            calls.append(lambda i=i: openai_text(url, {"temperature": 0.9, "seed": 100 + i, "max_tokens": 40}))
    return calls


# --------------------------------------------------------------------------------------------------
# 1. A temperature so small that the probabilities overflow


def test_tiny_temperature_is_greedy_and_bystanders_keep_their_text(served, url: str) -> None:
    calls = bystanders(url)
    alone = [c() for c in calls]
    greedy = ollama_text(url, {"temperature": 0, "num_predict": 40})
    attacks = [lambda t=t: ollama_text(url, {"temperature": t, "num_predict": 40}) for t in (1e-300, 1e-39)]
    attacks += [lambda t=t: openai_text(url, {"temperature": t, "max_tokens": 40}) for t in (1e-300, 1e-39)]
    engine = served[1]["tiny-raw"].engine
    engine.max_live = 0
    with ThreadPoolExecutor(len(calls) + len(attacks)) as pool:
        futures = [pool.submit(c) for c in [*calls, *attacks]]
        results = [f.result() for f in futures]
    assert results[: len(calls)] == alone  # nobody else's stream died, or changed
    assert results[len(calls) :][:2] == [greedy, greedy]  # below the floor: greedy
    openai_greedy = openai_text(url, {"temperature": 0, "max_tokens": 40})
    assert results[len(calls) :][2:] == [openai_greedy, openai_greedy]
    assert engine.max_live >= 2, "the attackers did not share a batch with the bystanders"
    assert SamplingConfig(temperature=MIN_TEMPERATURE / 2).greedy and not SamplingConfig(temperature=0.01).greedy


def test_sampling_extremes_stay_finite() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, float("-inf")]])  # -inf: a padded vocabulary row
    extremes = [
        {"temperature": 1e300},
        {"temperature": 0.8, "top_p": 8.5e-119},
        {"temperature": 1e-39, "top_k": 1},
        {"temperature": 2, "top_k": 2, "top_p": 1e-300},
    ]
    for cfg in (SamplingConfig(**e) for e in extremes):
        assert int(sample_next(logits, cfg, torch.Generator().manual_seed(0))[0]) in (0, 1, 2), cfg
    with pytest.raises(ValueError, match="not finite"):
        sample_next(torch.full((1, 4), float("nan")), SamplingConfig(temperature=1.0), None)


def test_a_row_whose_sampling_fails_ends_alone(model_dir: Path, monkeypatch) -> None:  # noqa: F811
    from llmcore.serve import engine as engine_module

    handle = ModelHandle.load(model_dir, template="raw")
    real, calls = engine_module.sample_next, []

    def flaky(logits, cfg, generator):
        calls.append(cfg.seed)
        if cfg.seed == 13 and calls.count(13) > 3:  # the fourth token: NaN, as NaN logits would give
            return real(torch.full_like(logits, float("nan")), cfg, generator)
        return real(logits, cfg, generator)

    monkeypatch.setattr(engine_module, "sample_next", flaky)
    ids = handle.tokenizer.encode("Once upon a time")

    def run(engine: Engine, seeds: list[int]) -> list[tuple[str, Finished]]:
        out = {seed: [] for seed in seeds}
        with engine._cv:  # all admitted in one turn: one batch
            for seed in seeds:
                cfg = SamplingConfig(30, temperature=1.0, seed=seed, stop_ids=(handle.tokenizer.eot_id,))
                engine.submit(Request(list(ids), cfg, out[seed].append))
        deadline = time.monotonic() + 30
        while not all(events and isinstance(events[-1], Finished) for events in out.values()):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        return [("".join(e for e in out[s] if isinstance(e, str)), out[s][-1]) for s in seeds]

    engine = Engine(handle.model, handle.tokenizer, max_batch=8)
    try:
        alone = [run(engine, [seed])[0] for seed in (1, 2, 3)]
        together = run(engine, [1, 13, 2, 3])
    finally:
        engine.stop()
    assert together[1][1].reason == "error" and "not finite" in together[1][1].error
    assert together[1][1].completion_tokens == 3
    assert [t for t, _ in together[:1] + together[2:]] == [t for t, _ in alone]
    assert engine.max_live == 4


# --------------------------------------------------------------------------------------------------
# 2. Stop strings: capped, and matched in time linear in the text


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/api/generate", {"options": {"stop": ["x" * 900_000]}}, "at most 1000 characters, got one of 900000"),
        ("/api/generate", {"options": {"stop": ["s"] * 17}}, "option stop takes at most 16 strings, got 17"),
        ("/v1/completions", {"stop": "y" * 1001}, "at most 1000 characters, got one of 1001"),
        ("/v1/completions", {"stop": ["a", "b", "c", "d", "e"]}, "stop takes at most 4 strings, got 5"),
    ],
)
def test_stop_strings_are_capped(url: str, path: str, body: dict, message: str) -> None:
    status, answer = post(url, path, {"model": "tiny-raw", "prompt": "Once", **body})
    assert status == 400
    error = answer["error"] if path.startswith("/api/") else answer["error"]["message"]
    assert message in error and "\n" not in error


def test_long_stop_strings_cost_linear_time(served) -> None:
    tok = served[1]["tiny-raw"].tokenizer
    ids = tok.encode("ab" * 3000)
    # The longest and most stop strings a request may carry, and (the TextStream itself has no cap) a longer one.
    for stops in (["a" * (protocol.MAX_STOP_CHARS - 1) + "b"] * protocol.MAX_STOPS, ["a" * 99_999 + "b"]):
        began = time.perf_counter()
        stream = TextStream(tok, stop=stops)
        text = "".join(stream.push(i) for i in ids) + stream.finish()
        assert text == "ab" * 3000 and not stream.stopped
        assert time.perf_counter() - began < 1.5  # before: ~5 s, and ~0.1 s a token for the 100,000 characters


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(st.text("ab\u00e9", max_size=4), max_size=12),
    stops=st.lists(st.text("ab\u00e9", min_size=1, max_size=5), max_size=3),
)
def test_stop_matcher_agrees_with_find(pieces: list[str], stops: list[str]) -> None:
    matcher, text = StopMatcher(stops), ""
    for piece in pieces:
        text += piece
        matcher.feed(text)
        shown, stopped = _cut(text, stops, final=False)
        if stopped:
            assert matcher.match == len(shown)
            break
        assert matcher.match is None and len(text) - matcher.held == len(shown)


# --------------------------------------------------------------------------------------------------
# 3. JSON nested past the parser's recursion


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000,
        b'{"a":' * 100_000,
        b'{"model": "tiny-raw", "prompt": "hi", "options": ' + b"[" * 40 + b"]" * 40 + b"}",
    ],
    ids=["arrays", "objects", "nested-under-the-limit-of-json"],
)
@pytest.mark.parametrize("path", ["/api/generate", "/v1/chat/completions"])
def test_deep_nesting_is_a_400(url: str, path: str, body: bytes) -> None:
    status, answer = post(url, path, body)
    assert status == 400
    error = answer["error"] if path.startswith("/api/") else answer["error"]["message"]
    assert error == f"request body nested deeper than {protocol.MAX_DEPTH} levels"
    assert ollama_text(url, {"temperature": 0, "num_predict": 4})  # still serving


# --------------------------------------------------------------------------------------------------
# 4. Slow clients (slowloris) and too many connections


def test_dripping_headers_get_a_408_after_the_deadline(url: str) -> None:
    answer = {}
    request = (
        b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nX-Pad: " + b"p" * 200
    )
    attacker = threading.Thread(target=lambda: answer.update(got=raw(url, request, drip=0.05)))
    attacker.start()
    expected = [c() for c in bystanders(url, 2)]
    assert [c() for c in bystanders(url, 2)] == expected  # served while the attacker drips
    attacker.join(10)
    got, took = answer["got"]
    assert parse(got) == (408, {"error": f"request not complete within {DEADLINE:g} s"})
    assert DEADLINE <= took < DEADLINE + 3


def test_dripping_body_gets_a_408_in_the_apis_shape(url: str) -> None:
    body = json.dumps({"model": "tiny-raw", "messages": [{"role": "user", "content": "hi"}]}).encode() + b" " * 500
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % len(body)
    got, took = raw(url, head + body, drip=0.05)  # the headers and some of the body at once, then a byte at a time
    status, answer = parse(got)
    assert status == 408 and answer["error"]["message"] == f"request not complete within {DEADLINE:g} s"
    assert DEADLINE <= took < DEADLINE + 3


def test_a_silent_connection_and_a_slow_second_request_are_closed(url: str) -> None:
    got, took = raw(url, b"")  # connects, sends nothing
    assert parse(got)[0] == 408 and DEADLINE <= took < DEADLINE + 3
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:  # kept alive: each request has a deadline
        s.sendall(b"GET /api/version HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        first = b""
        while not first.endswith(b"}"):
            first += s.recv(4096)
        began = time.monotonic()
        s.sendall(b"GET /api/version HTTP/1.1\r\n")
        s.settimeout(0.1)
        second = b""
        while not second:
            try:
                s.sendall(b"X-Pad: p\r\n")
                second = s.recv(4096)
            except TimeoutError:
                continue
        took = time.monotonic() - began
    assert first.startswith(b"HTTP/1.1 200") and second.startswith(b"HTTP/1.1 408") and DEADLINE <= took < DEADLINE + 3


def test_connections_over_the_cap_get_a_503_at_once(model_dir: Path) -> None:  # noqa: F811
    server, _ = start(model_dir, max_connections=4)
    try:
        host, port = server.url.removeprefix("http://").rsplit(":", 1)
        held = [socket.create_connection((host, int(port)), timeout=10) for _ in range(4)]
        for s in held:
            s.sendall(b"GET /api/version HTTP/1.1\r\n")  # headers never finished
        time.sleep(0.2)
        got, took = raw(server.url, b"GET /api/tags HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert parse(got) == (503, {"error": "too many connections (at most 4); try again later"}) and took < 1
        for s in held:  # the deadline frees them
            s.settimeout(DEADLINE + 3)
            assert s.recv(1024).startswith(b"HTTP/1.1 408")
            s.close()
        time.sleep(0.1)
        assert call(server.url, "/api/version", method="GET")[0] == 200
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------------------------------
# 5. DNS rebinding and cross-site pages


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("evil.example", 403),
        ("evil.example:{port}", 403),
        ("127.0.0.1.nip.io:{port}", 403),
        ("127.0.0.1:{port}", 200),
        ("localhost:{port}", 200),
        ("LOCALHOST.:{port}", 200),
        ("app.localhost:{port}", 200),
        ("[::1]:{port}", 200),
        ("192.168.1.20:{port}", 200),  # an address is never rebound
    ],
)
def test_host_header_is_checked(url: str, host: str, status: int) -> None:
    port = url.rsplit(":", 1)[1]
    body = {"model": "tiny-raw", "prompt": "Once", "options": {"num_predict": 2}, "stream": False}
    got, answer = post(url, "/api/generate", body, headers={"Host": host.format(port=port)})
    assert got == status
    if status == 403:
        assert answer["error"].startswith("host ") and "--allow-host" in answer["error"]
        status, answer = post(url, "/v1/models", b"", method="GET", headers={"Host": host.format(port=port)})
        assert status == 403 and answer["error"]["message"].startswith("host ")  # the OpenAI shape


@pytest.mark.parametrize(
    ("origin", "status"),
    [
        ("http://evil.example", 403),
        ("https://127.0.0.1.evil.example", 403),
        ("null", 403),
        ("http://localhost:3000", 200),
        ("http://127.0.0.1:{port}", 200),  # the chat page
    ],
)
def test_origin_header_is_checked(url: str, origin: str, status: int) -> None:
    port = url.rsplit(":", 1)[1]
    headers = {"Origin": origin.format(port=port), "Content-Type": "application/json"}
    body = {"model": "tiny-raw", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    got, answer = post(url, "/v1/chat/completions", body, headers=headers)
    assert got == status
    if status == 403:
        assert answer["error"]["message"].startswith("origin ") and "--allow-origin" in answer["error"]["message"]


def test_the_chat_page_works_by_any_allowed_name(url: str) -> None:
    port = url.rsplit(":", 1)[1]
    for name in (f"127.0.0.1:{port}", f"localhost:{port}"):
        status, _, page = call(url, "/", method="GET", headers={"Host": name})
        assert status == 200 and b'fetch("/v1/chat/completions"' in page
        headers = {"Host": name, "Origin": f"http://{name}", "Content-Type": "application/json"}
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True}
        status, _, events = call(url, "/v1/chat/completions", body, headers=headers)
        assert status == 200 and events.endswith(b"data: [DONE]\n\n")


def test_allow_lists_from_options_and_environment(served, monkeypatch) -> None:
    handles = served[1]
    monkeypatch.setenv(guard.HOSTS_ENV, "llm.lan, *.corp.example")
    monkeypatch.setenv(guard.ORIGINS_ENV, "https://app.example.com")
    http = TestClient(create_app(handles), base_url="http://llm.lan")
    assert http.get("/api/version").status_code == 200
    assert http.get("/api/version", headers={"Host": "gpu.corp.example"}).status_code == 200
    assert http.get("/api/version", headers={"Host": "evil.example"}).status_code == 403
    r = http.get("/api/version", headers={"Origin": "https://app.example.com"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example.com"
    preflight = http.options(
        "/v1/chat/completions", headers={"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST"}
    )
    assert preflight.status_code == 204 and "POST" in preflight.headers["access-control-allow-methods"]
    assert http.get("/api/version", headers={"Origin": "https://other.example.com"}).status_code == 403

    explicit = TestClient(create_app(handles, allowed_hosts=["other.lan"], allowed_origins=["*"]))
    assert explicit.get("/api/version", headers={"Host": "llm.lan"}).status_code == 403  # options replace $ENV
    assert explicit.get("/api/version", headers={"Host": "other.lan", "Origin": "http://x.example"}).status_code == 200
    exposed = TestClient(create_app(handles, bound="0.0.0.0", allowed_hosts=[]), base_url="http://llmcore:11434")
    assert exposed.get("/api/version").status_code == 200  # bound beyond loopback on purpose: any Host (containers)
    assert exposed.get("/api/version", headers={"Origin": "http://evil.example"}).status_code == 403
    assert exposed.get("/api/version", headers={"Origin": "http://llmcore:11434"}).status_code == 200  # its own page
    local = TestClient(create_app(handles, allowed_hosts=[]), base_url=f"http://{socket.gethostname()}:11434")
    assert local.get("/api/version").status_code == 200  # the machine's own name


def test_cli_passes_the_allow_lists_and_limits(model_dir: Path, monkeypatch) -> None:  # noqa: F811
    calls = []

    class FakeServer:
        url = "http://127.0.0.1:0"

        def serve_forever(self) -> None:
            pass

        def server_close(self) -> None:
            pass

    monkeypatch.setattr("llmcore.serve.app.make_server", lambda *args, **kw: calls.append(kw) or FakeServer())
    args = [
        "serve",
        "--model",
        str(model_dir),
        "--allow-host",
        "a.lan,b.lan",
        "--allow-origin",
        "https://x.example",
        "--request-timeout",
        "5",
        "--max-connections",
        "9",
    ]
    assert CliRunner().invoke(app, args).exit_code == 0
    assert calls[-1]["allowed_hosts"] == ["a.lan,b.lan"] and calls[-1]["allowed_origins"] == ["https://x.example"]
    assert calls[-1]["request_timeout"] == 5 and calls[-1]["max_connections"] == 9
    assert guard.split_list(["a.lan,b.lan", "c.lan"], "UNSET") == ["a.lan", "b.lan", "c.lan"]
    assert CliRunner().invoke(app, ["serve", "--model", str(model_dir)]).exit_code == 0
    assert calls[-1]["allowed_hosts"] is None  # then create_app reads $LLMCORE_ALLOWED_HOSTS
    assert calls[-1]["request_timeout"] == guard.REQUEST_TIMEOUT and calls[-1]["max_connections"] == 256


# --------------------------------------------------------------------------------------------------
# 6. What the server tells about itself, and errors below the app


def test_show_and_listings_do_not_leak_the_model_path(url: str, model_dir: Path) -> None:  # noqa: F811
    status, _, shown = call(url, "/api/show", {"model": "tiny"})
    assert status == 200 and b"FROM tiny:latest" in shown
    for path, method in (("/api/show", "POST"), ("/api/tags", "GET"), ("/api/ps", "GET"), ("/v1/models", "GET")):
        status, _, data = call(url, path, {"model": "tiny"} if method == "POST" else None, method=method)
        assert status == 200 and str(model_dir.parent).encode() not in data, path


@pytest.mark.parametrize(
    ("request_bytes", "status", "message"),
    [
        (b"GARBAGE\r\n\r\n", 400, "invalid HTTP request: illegal request line"),
        (
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"b" * 20_000 + b"\r\n\r\n",
            431,
            "request headers too large",
        ),
        (b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: nope\r\n\r\n", 400, "invalid HTTP"),
    ],
)
def test_errors_below_the_app_are_in_the_apis_shape(url: str, request_bytes: bytes, status: int, message: str) -> None:
    got, _ = raw(url, request_bytes)
    code, answer = parse(got)
    assert code == status and answer["error"].startswith(message) and "\n" not in answer["error"]
    assert b"content-type: application/json" in got.lower()
    status, answer = post(url, "/api/generate", b"{" + b" " * (2**20 + 10) + b"}")  # too large: the app's 413
    assert status == 413 and answer == {"error": f"request body over {2**20} bytes"}


# --------------------------------------------------------------------------------------------------
# Fuzz: random request JSON for both APIs gets a 4xx or a 2xx, never a 500


@pytest.fixture(scope="module")
def fuzz_url(model_dir: Path, tmp_path_factory):  # noqa: F811
    """A server of a model with a 32-token context: every generation is short."""
    tok = Tokenizer.load(model_dir / "tokenizer.json")
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("llama3-tiny", vocab_size=tok.vocab_size, context_length=32))
    folder = tmp_path_factory.mktemp("fuzz") / "tiny"
    save_checkpoint(folder / "model.safetensors", model)
    tok.save(folder / "tokenizer.json")
    server, _ = start(folder)
    yield server.url
    server.shutdown()
    server.server_close()


SCALARS = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
NUMBERS = st.sampled_from([0, -1, 1, 2, 1e-300, 1e-39, 0.5, 1e300, 2**63, -(2**63), 40]) | st.floats(allow_nan=False)
MODELS = st.sampled_from(["tiny", "tiny-raw", "tiny:latest", "nope", "", "tiny:", "../tiny"])
TEXTS = st.sampled_from(["", "hi", "Once upon a time", "\ud800", "<|endoftext|>", "### Response:"]) | st.text(
    max_size=30
)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", ""]) | VALUES, "content": TEXTS | VALUES}
)
STOPS = TEXTS | st.lists(TEXTS, max_size=6) | VALUES


def bodies(fields: dict, required: dict) -> st.SearchStrategy:
    """Objects with a random subset of the API's fields, each a plausible or an arbitrary value; or with the
    required fields right and the others random (these mostly get answers); or stray keys."""
    optional = {name: strategy | VALUES for name, strategy in fields.items()}
    valid = st.fixed_dictionaries(required, optional={k: v for k, v in fields.items() if k not in required})
    stray = st.dictionaries(st.text(max_size=6), VALUES, max_size=4)
    return valid | st.fixed_dictionaries({}, optional=optional) | stray


# JSON schemas: small real ones, with keywords the grammar engine lacks, or arbitrary objects
SCHEMAS = st.sampled_from(
    [
        {"type": "object"},
        {"type": "integer", "minimum": 0, "maximum": 9},
        {"type": "object", "properties": {"a": {"type": "string", "maxLength": 3}}},
        {"not": {}},
        {"type": "string", "pattern": "(?<=a)"},
        {"$ref": "#/nope"},
        {"type": "array", "minItems": 3, "maxItems": 1},
        {"enum": []},
    ]
) | st.dictionaries(
    st.sampled_from(["type", "properties", "items", "enum", "minimum", "maxLength", "anyOf", "x"]), VALUES, max_size=3
)
OLLAMA_OPTIONS = {name: NUMBERS for name in ("temperature", "top_k", "top_p", "seed", "num_predict", "num_ctx")}
OLLAMA = {
    "/api/generate": {
        "model": MODELS,
        "prompt": TEXTS,
        "system": TEXTS,
        "raw": st.booleans(),
        "stream": st.booleans(),
        "format": st.sampled_from(["", "json"]) | SCHEMAS,
        "think": st.booleans(),
        "options": st.fixed_dictionaries({}, optional={**OLLAMA_OPTIONS, "stop": STOPS}),
    },
    "/api/chat": {
        "model": MODELS,
        "messages": st.lists(MESSAGE, max_size=3),
        "stream": st.booleans(),
        "tools": VALUES,
        "options": st.fixed_dictionaries({}, optional={**OLLAMA_OPTIONS, "stop": STOPS}),
    },
    "/api/show": {"model": MODELS, "name": MODELS},
    "/api/embed": {
        "model": MODELS,
        "input": TEXTS | st.lists(TEXTS, max_size=3),
        "truncate": st.booleans(),
        "dimensions": NUMBERS,
    },
    "/api/embeddings": {"model": MODELS, "prompt": TEXTS},
}
TOKENS = st.integers(1, 8) | NUMBERS  # mostly what fits the context, or anything
OPENAI_COMMON = {
    "model": MODELS,
    "temperature": NUMBERS,
    "top_p": NUMBERS,
    "max_tokens": TOKENS,
    "seed": NUMBERS,
    "max_completion_tokens": TOKENS,
    "n": st.just(1) | NUMBERS,
    "stop": STOPS,
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "frequency_penalty": st.just(0) | NUMBERS,
    "response_format": st.just({"type": "text"})
    | VALUES
    | st.just({"type": "json_object"})
    | st.builds(
        lambda schema, strict: {
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": schema, "strict": strict},
        },
        SCHEMAS,
        st.booleans() | VALUES,
    ),
    "logprobs": st.just(False) | VALUES,
}
OPENAI = {
    "/v1/chat/completions": {**OPENAI_COMMON, "messages": st.lists(MESSAGE, max_size=3)},
    "/v1/completions": {**OPENAI_COMMON, "prompt": TEXTS | st.lists(TEXTS, max_size=2), "echo": VALUES},
    "/v1/embeddings": {
        "model": MODELS,
        "input": TEXTS | st.lists(TEXTS | st.lists(NUMBERS, max_size=3), max_size=3),
        "encoding_format": st.sampled_from(["float", "base64", "hex"]) | VALUES,
        "dimensions": NUMBERS,
    },
}


FUZZ_MODELS = st.sampled_from(["tiny-raw", "tiny"])
USER = [{"role": "user", "content": "hi"}]
GOOD = {
    "/api/generate": "Once",
    "/api/chat": USER,
    "/api/show": USER,
    "/v1/chat/completions": USER,
    "/v1/completions": "Once",
    "/api/embed": "Once",
    "/api/embeddings": "Once",
    "/v1/embeddings": "Once",
}


def check(url: str, path: str, body) -> None:
    data = json.dumps(body).encode()  # (a float overflowing to inf is written Infinity: the server says 400)
    status, headers, answer = call(url, path, data, headers={"Content-Type": "application/json"})
    event(f"{status // 100}xx")
    assert status < 500, (status, answer[:300])
    if status >= 400:
        error = json.loads(answer)["error"]
        message = error if path.startswith("/api/") else error["message"]
        assert isinstance(message, str) and "\n" not in message and len(message) < 400, message
    elif headers["content-type"].startswith("application/x-ndjson"):
        assert not any("error" in json.loads(line) for line in answer.splitlines()), answer[:300]
    elif headers["content-type"].startswith("text/event-stream"):
        assert b'"error"' not in answer and answer.endswith(b"data: [DONE]\n\n"), answer[:300]


FUZZ = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)


@FUZZ
@given(data=st.data())
def test_fuzz_ollama_requests(fuzz_url: str, data) -> None:
    path = data.draw(st.sampled_from(sorted(OLLAMA)))
    key = {"/api/generate": "prompt", "/api/embeddings": "prompt", "/api/embed": "input"}.get(path, "messages")
    required = {"model": FUZZ_MODELS, key: st.just(GOOD[path])}
    check(fuzz_url, path, data.draw(bodies(OLLAMA[path], required) | VALUES))


@FUZZ
@given(data=st.data())
def test_fuzz_openai_requests(fuzz_url: str, data) -> None:
    path = data.draw(st.sampled_from(sorted(OPENAI)))
    key = {"/v1/completions": "prompt", "/v1/embeddings": "input"}.get(path, "messages")
    required = {"model": FUZZ_MODELS, key: st.just(GOOD[path])}
    check(fuzz_url, path, data.draw(bodies(OPENAI[path], required) | VALUES))
