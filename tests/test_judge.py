"""Tests for llmcore.eval.judge: score parsing, the judge loop against a fake Ollama server, cache, stats, ROUGE-L.

The fake server speaks the three endpoints the ``ollama`` client uses here (``/api/tags``, ``/api/show``,
non-streaming ``/api/generate``) on 127.0.0.1 and misbehaves on cue, so retries, timeouts and the strict
re-ask are exercised over real HTTP without an Ollama install.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from llmcore.common import LLMCoreError
from llmcore.eval.judge import (
    DEFAULT_PROMPT_TEMPLATE,
    STRICT_PROMPT_TEMPLATE,
    JudgeCache,
    JudgeConfig,
    JudgeItem,
    ScoreRecord,
    cache_key,
    check_judge,
    format_input,
    parse_score,
    render_prompt,
    score_items,
    shortfall,
    summarize,
    write_records,
)
from llmcore.eval.metrics import exact_match, rouge_l

pytestmark = pytest.mark.timeout(30)

DIGEST = "365c0bd3c000a25d28ddbf732fe1c6add414de7275464c4e4d1c3b5fcb5d8ad1"
STRICT_MARK = "Reply with only one integer"  # tells the fake server a prompt is the strict re-ask
CLIENT_TIMEOUT = 0.5  # seconds; "hang" sleeps longer than this


# --------------------------------------------------------------------------------------------------
# A fake `ollama serve`


class FakeOllama:
    """Loopback stand-in for the Ollama HTTP API, answering each item from a script.

    A generate request belongs to the item whose ``[item-N]`` tag is in its prompt; it gets the next
    behaviour of that item's script (the last one repeats):

    - ``"ok:<text>"``: 200 with ``<text>`` as the response
    - ``"500"``: HTTP 500 ``{"error": ...}``, as Ollama sends when the runner crashes
    - ``"404"``: HTTP 404 model not found (not transient: no retry)
    - ``"hang"``: sleep past the client's timeout before answering
    - ``"drop"``: close the connection without sending anything
    """

    def __init__(self, scripts: dict[str, list[str]] | None = None, models: tuple[str, ...] = ("llama3:latest",)):
        self.scripts = {k: list(v) for k, v in (scripts or {}).items()}
        self.models = models
        self.requests: list[dict] = []  # one per generate request: tag, strict, behaviour, body
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                if self.path == "/api/tags":
                    self.reply(200, {"models": [fake.model_entry(m) for m in fake.models]})
                else:
                    self.reply(404, {"error": "not found"})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
                if self.path == "/api/show":
                    if fake.known(body.get("model", "")):
                        self.reply(200, fake.show_body())
                    else:
                        self.reply(404, {"error": f"model '{body.get('model')}' not found"})
                elif self.path == "/api/generate":
                    fake.generate(self, body)
                else:
                    self.reply(404, {"error": "not found"})

            def reply(self, code: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def known(self, name: str) -> bool:
        return name in self.models or f"{name}:latest" in self.models

    def model_entry(self, name: str) -> dict:
        return {
            "name": name,
            "model": name,
            "modified_at": "2024-05-01T10:00:00.000000+00:00",
            "size": 4661224676,
            "digest": DIGEST,
            "details": self.details(),
        }

    @staticmethod
    def details() -> dict:
        return {
            "parent_model": "",
            "format": "gguf",
            "family": "llama",
            "families": ["llama"],
            "parameter_size": "8.0B",
            "quantization_level": "Q4_0",
        }

    def show_body(self) -> dict:
        return {
            "modelfile": "FROM llama3",
            "parameters": 'stop "<|eot_id|>"',
            "template": "{{ .Prompt }}",
            "details": self.details(),
            "model_info": {"general.architecture": "llama"},
            "capabilities": ["completion"],
            "modified_at": "2024-05-01T10:00:00.000000+00:00",
        }

    def generate_count(self, tag: str | None = None, strict: bool | None = None) -> int:
        return sum(
            1 for r in self.requests if (tag is None or r["tag"] == tag) and (strict is None or r["strict"] == strict)
        )

    def generate(self, handler: BaseHTTPRequestHandler, body: dict) -> None:
        prompt = body.get("prompt", "")
        m = re.search(r"\[(item-\d+)\]", prompt)
        tag = m.group(1) if m else None
        with self.lock:
            script = self.scripts.setdefault(tag, ["ok:50"])
            behaviour = script.pop(0) if len(script) > 1 else script[0]
            self.requests.append({"tag": tag, "strict": STRICT_MARK in prompt, "behaviour": behaviour, "body": body})
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if not self.known(body.get("model", "")) or behaviour == "404":
                handler.reply(404, {"error": f'model "{body.get("model")}" not found, try pulling it first'})
            elif behaviour == "500":
                handler.reply(500, {"error": "llama runner process has terminated: exit status 2"})
            elif behaviour == "drop":
                handler.close_connection = True  # return without a byte: the client sees a disconnect
            elif behaviour == "hang":
                time.sleep(CLIENT_TIMEOUT * 2)
                with _suppress_socket_errors():
                    handler.reply(200, {"model": body["model"], "response": "0", "done": True})
            else:
                text = behaviour.removeprefix("ok:")
                handler.reply(
                    200,
                    {
                        "model": body["model"],
                        "created_at": "2024-05-01T10:00:00Z",
                        "response": text,
                        "done": True,
                        "done_reason": "stop",
                        "total_duration": 1000,
                        "eval_count": 2,
                    },
                )
        finally:
            with self.lock:
                self.in_flight -= 1


class _suppress_socket_errors:
    def __enter__(self) -> None:
        pass

    def __exit__(self, exc_type, exc, tb) -> bool:
        return exc_type is not None and issubclass(exc_type, (BrokenPipeError, ConnectionResetError))


@pytest.fixture
def fake_ollama():
    fakes: list[FakeOllama] = []

    def start(**kwargs) -> FakeOllama:
        fakes.append(FakeOllama(**kwargs))
        return fakes[-1]

    yield start
    for fake in fakes:
        fake.close()


def fast_config(host: str, **overrides) -> JudgeConfig:
    kwargs = dict(host=host, timeout=CLIENT_TIMEOUT, retries=2, backoff=0.01, max_concurrency=4)
    return JudgeConfig(**{**kwargs, **overrides})


def make_item(i: int, response: str = "The car is as fast as a bullet.") -> JudgeItem:
    return JudgeItem(
        id=f"item-{i}",
        instruction=f"[item-{i}] Rewrite the sentence using a simile.",
        input="The car is very fast.",
        reference="The car is as fast as lightning.",
        response=response,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------
# parse_score


@pytest.mark.parametrize(
    "text, expected",
    [
        # the form the prompt asks for: the integer alone (surrounding space and a final full stop are fine)
        ("85", 85),
        ("85.", 85),
        (" 85 \n", 85),
        ("0", 0),
        ("100", 100),
        # `score: N`, alone or as one line of its own among prose
        ("Score: 85", 85),
        ("score: 85", 85),
        ("SCORE:7", 7),
        ("The answer is right but short.\nScore: 90", 90),
        # JSON with an integer score, maybe fenced
        ('{"score": 85}', 85),
        ('{"Score": 72}', 72),
        ('```json\n{"score": 90, "reason": "ok"}\n```', 90),
        # reasoning models: the <think> block is dropped, the rest must be in the asked form
        ("<think>Maybe 60? No, 3 errors, so 70.</think>\n75", 75),
        ("<think>Between 60 and 80", None),
        # refused: a number in prose is not a score (the response being judged may well hold one)
        ("100 meters", None),
        ("The car travels 100 meters per second.", None),
        ("The response is perfect. 100", None),
        ("I give it 70, it is close but not exact", None),
        ("85\n\nThe response misses 2 details.", None),
        ("1. The response is accurate\n2. It is concise", None),
        # refused: other scales and decorations than the prompt asks for
        ("**85**", None),
        ("`85`", None),
        ("85/100", None),
        ("8/10", None),
        ("85%", None),
        ("Score: 85/100", None),
        ("I would rate it 85 out of 100", None),
        ("Rating: 7/10", None),
        ("**Score:** 85", None),
        ("Score: 85. A perfect answer gets 100.", None),
        ('Here you go: {"score": 64}', None),
        # refused: not an integer in 0..100, or not one score
        ("", None),
        ("   ", None),
        (None, None),
        ("no idea", None),
        ("eighty-five", None),
        ("85.0", None),
        ("8.5", None),
        ("150", None),
        ("-5", None),
        ("085", None),
        ("Score: 101", None),
        ("Score: 80\nScore: 90", None),
        ("between 60 and 70", None),
        ("60-70", None),
        ('{"score": 8.5}', None),
        ('{"score": "72"}', None),
        ('{"score": 185}', None),
        ('{"score": true}', None),
    ],
)
def test_parse_score(text, expected):
    assert parse_score(text) == expected


# --------------------------------------------------------------------------------------------------
# Prompts, config, items


def test_default_prompt_matches_the_book():
    entry = {
        "instruction": "Rewrite the sentence using a simile.",
        "input": "The car is very fast.",
        "output": "The car is as fast as lightning.",
        "model_response": "The car is as fast as a bullet.",
    }
    book_input = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        f"\n\n### Instruction:\n{entry['instruction']}\n\n### Input:\n{entry['input']}"
    )
    book_prompt = (
        f"Given the input `{book_input}` "
        f"and correct output `{entry['output']}`, "
        f"score the model response `{entry['model_response']}`"
        f" on a scale from 0 to 100, where 100 is the best score. "
        f"Respond with the integer number only."
    )
    item = JudgeItem.from_dict(entry, default_id="7")
    assert item.id == "7" and item.reference == entry["output"] and item.response == entry["model_response"]
    assert render_prompt(DEFAULT_PROMPT_TEMPLATE, item) == book_prompt
    assert "### Input" not in format_input("Name a color.", "")
    assert STRICT_MARK in STRICT_PROMPT_TEMPLATE and STRICT_MARK not in DEFAULT_PROMPT_TEMPLATE


def test_render_prompt_leaves_braces_in_texts_alone():
    item = JudgeItem("a", "Write {response} as JSON", "", '{"k": 1}', "{reference} {input}")
    prompt = render_prompt("I={input} R={reference} S={response}", item)
    assert prompt.endswith('R={"k": 1} S={reference} {input}')
    assert "Write {response} as JSON" in prompt


def test_config_validation_and_host(monkeypatch):
    with pytest.raises(LLMCoreError, match="max_concurrency"):
        JudgeConfig(max_concurrency=0)
    with pytest.raises(LLMCoreError, match=r"\{reference\}"):
        JudgeConfig(prompt_template="Score {response} for {input}")
    monkeypatch.delenv("OLLAMA_HOST", raising=False)
    assert JudgeConfig().resolved_host == "http://127.0.0.1:11434"
    monkeypatch.setenv("OLLAMA_HOST", "http://10.0.0.5:11434")
    assert JudgeConfig().resolved_host == "http://10.0.0.5:11434"
    assert JudgeConfig(host="http://judge:1").resolved_host == "http://judge:1"


def test_item_missing_field_is_a_user_error():
    with pytest.raises(LLMCoreError, match="response"):
        JudgeItem.from_dict({"id": "x", "instruction": "i", "output": "o"})


# --------------------------------------------------------------------------------------------------
# check_judge


def test_check_judge_reports_model_and_digest(fake_ollama):
    fake = fake_ollama()
    info = check_judge(fast_config(fake.host))
    assert info["model"] == "llama3:latest" and info["digest"] == DIGEST
    assert info["host"] == fake.host and info["parameter_size"] == "8.0B"
    assert info["schema"] is False  # no /api/version: a server that does not say is asked in prose
    score_items([make_item(0)], fast_config(fake.host), progress=False, judge=info)
    assert "format" not in fake.requests[-1]["body"] or fake.requests[-1]["body"]["format"] is None


@pytest.mark.parametrize(
    ("version", "schema"), [("0.4.7", False), ("0.5.0", True), ("0.12.3", True), ("0.0.0", True), ("dev", False)]
)
def test_an_ollama_of_0_5_or_later_is_asked_by_schema(http_dir, tmp_path, version, schema):
    from llmcore.eval.judge import _ollama_takes_schema

    (tmp_path / "api").mkdir()
    (tmp_path / "api/version").write_text(json.dumps({"version": version}))
    host = http_dir(tmp_path)
    assert _ollama_takes_schema(host, 5) is schema
    assert _ollama_takes_schema(host.removeprefix("http://"), 5) is schema  # OLLAMA_HOST may omit the scheme


def test_check_judge_uses_ollama_host_env(fake_ollama, monkeypatch):
    fake = fake_ollama()
    monkeypatch.setenv("OLLAMA_HOST", fake.host)
    assert check_judge(JudgeConfig())["digest"] == DIGEST


def test_unreachable_host_is_one_line_error():
    host = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(LLMCoreError) as e:
        check_judge(fast_config(host))
    msg = str(e.value)
    assert host in msg and "ollama serve" in msg and "\n" not in msg
    with pytest.raises(LLMCoreError, match="ollama serve"):  # score_items checks before asking
        score_items([make_item(0)], fast_config(host), progress=False)


def test_missing_model_says_pull(fake_ollama):
    fake = fake_ollama(models=("mistral:latest",))
    with pytest.raises(LLMCoreError) as e:
        check_judge(fast_config(fake.host, model="llama3"))
    assert "ollama pull llama3" in str(e.value) and fake.host in str(e.value)


# --------------------------------------------------------------------------------------------------
# score_items against a misbehaving server


def test_score_items_survives_a_misbehaving_server(fake_ollama):
    scripts = {
        "item-0": ["ok:85"],
        "item-1": ["ok:8/10", "ok:80"],  # another scale than asked: refused, the re-ask works
        "item-2": ["ok:I like it a lot.", "ok:70"],  # garbage, then the strict re-ask works
        "item-3": ["ok:no idea", "ok:still no idea"],  # garbage twice: refused
        "item-4": ["500", "ok:90"],
        "item-5": ["hang", "ok:60"],
        "item-6": ["drop", "ok:40"],
        "item-7": ["500"],  # always failing: error after 1 + retries attempts
        "item-8": ["drop"],
        "item-9": ["hang"],
        "item-10": ["ok:between 60 and 70", "500", "ok:65"],  # re-ask retried once
        "item-11": ["ok:garbage", "drop"],  # re-ask never answered: error, first reply kept
        "item-12": ["404"],  # not transient: no retry
    }
    fake = fake_ollama(scripts=scripts)
    items = [make_item(i) for i in range(13)]
    config = fast_config(fake.host)

    t0 = time.perf_counter()
    records = score_items(items, config, progress=False)
    elapsed = time.perf_counter() - t0

    assert [r.id for r in records] == [it.id for it in items]  # every item, in order
    by_id = {r.id: r for r in records}
    expected = {  # id: (status, score, attempts)
        "item-0": ("scored", 85, 1),
        "item-1": ("scored", 80, 2),
        "item-2": ("scored", 70, 2),
        "item-3": ("refused", None, 2),
        "item-4": ("scored", 90, 2),
        "item-5": ("scored", 60, 2),
        "item-6": ("scored", 40, 2),
        "item-7": ("error", None, 3),
        "item-8": ("error", None, 3),
        "item-9": ("error", None, 3),
        "item-10": ("scored", 65, 3),
        "item-11": ("error", None, 4),
        "item-12": ("error", None, 1),
    }
    assert {k: (r.status, r.score, r.attempts) for k, r in by_id.items()} == expected
    assert Counter(r.status for r in records) == {"scored": 7, "refused": 1, "error": 5}

    # The strict prompt was used once per refused first reply, and never otherwise.
    assert all(fake.generate_count(tag, strict=True) == 1 for tag in ("item-1", "item-2", "item-3"))
    assert fake.generate_count("item-10", strict=True) == 2  # one re-ask, retried once after the 500
    for tag in ("item-0", "item-4", "item-5", "item-6", "item-7", "item-8", "item-9", "item-12"):
        assert fake.generate_count(tag, strict=True) == 0
    assert by_id["item-3"].raw == "no idea" and by_id["item-3"].raw_strict == "still no idea"
    assert by_id["item-2"].raw_strict == "70" and by_id["item-0"].raw_strict is None
    assert by_id["item-11"].raw == "garbage" and "RemoteProtocolError" in by_id["item-11"].error
    assert "500" in by_id["item-7"].error and "Timeout" in by_id["item-9"].error
    assert "404" in by_id["item-12"].error

    # Nothing lost or invented: every request the server saw is counted in some record.
    assert len(fake.requests) == sum(r.attempts for r in records)
    assert fake.max_in_flight <= config.max_concurrency
    body = fake.requests[0]["body"]
    assert body["model"] == "llama3" and body["stream"] is False
    assert body["options"] == {"seed": 123, "temperature": 0.0, "num_ctx": 2048}
    assert elapsed < 10


def test_score_items_accepts_book_dicts(fake_ollama):
    fake = fake_ollama(scripts={"item-0": ["ok:77"]})
    entry = {"instruction": "[item-0] Name a color.", "input": "", "output": "Red.", "model_response": "Blue."}
    (record,) = score_items([entry], fast_config(fake.host), progress=False)
    assert (record.id, record.score, record.status) == ("0", 77, "scored")


# --------------------------------------------------------------------------------------------------
# Cache


def test_cache_skips_answered_items_and_reasks_on_change(fake_ollama, tmp_path):
    fake = fake_ollama(scripts={"item-0": ["ok:85"], "item-1": ["ok:nonsense", "ok:more nonsense"], "item-2": ["500"]})
    cache = tmp_path / "judge_cache.jsonl"
    config = fast_config(fake.host, retries=1)
    items = [make_item(i) for i in range(3)]

    first = score_items(items, config, cache_path=cache, progress=False)
    assert [r.status for r in first] == ["scored", "refused", "error"]
    assert fake.generate_count() == 1 + 2 + 2
    lines = [json.loads(line) for line in cache.read_text().splitlines()]
    assert {line["id"] for line in lines} == {"item-0", "item-1"}  # errors are not cached
    assert all(line["digest"] == DIGEST and len(line["key"]) == 64 for line in lines)

    # Rerun: answered items come from the cache, only the failed one is asked again.
    n = fake.generate_count()
    second = score_items(items, config, cache_path=cache, progress=False)
    assert fake.generate_count("item-0") + fake.generate_count("item-1") == 1 + 2  # unchanged
    assert fake.generate_count() - n == 2
    assert [(r.cached, r.attempts) for r in second] == [(True, 0), (True, 0), (False, 2)]
    assert [(r.score, r.status, r.raw, r.raw_strict) for r in second[:2]] == [
        (r.score, r.status, r.raw, r.raw_strict) for r in first[:2]
    ]

    # A changed response text is a new question.
    n = fake.generate_count("item-0")
    changed = [make_item(0, response="The car is as fast as a cheetah."), *items[1:]]
    third = score_items(changed, config, cache_path=cache, progress=False)
    assert fake.generate_count("item-0") - n == 1 and not third[0].cached and third[1].cached

    # A changed prompt template invalidates everything.
    n = fake.generate_count()
    template = "Rate `{response}` against `{reference}` for `{input}` from 0 to 100."
    fourth = score_items(
        items, fast_config(fake.host, retries=1, prompt_template=template), cache_path=cache, progress=False
    )
    assert not any(r.cached for r in fourth) and fake.generate_count() - n == 1 + 2 + 2


def test_cache_key_covers_judge_identity():
    config, item = JudgeConfig(), make_item(0)
    key = cache_key(config, DIGEST, item)
    assert key == cache_key(JudgeConfig(), DIGEST, make_item(0))
    assert key != cache_key(config, "sha256:other", item)
    assert key != cache_key(JudgeConfig(model="mistral"), DIGEST, item)
    assert key != cache_key(JudgeConfig(seed=1), DIGEST, item)
    assert key != cache_key(JudgeConfig(strict_prompt_template="{input}{reference}{response}"), DIGEST, item)
    assert key != cache_key(config, DIGEST, make_item(0, response="other"))


def test_cache_file_survives_torn_lines_and_threads(tmp_path):
    path = tmp_path / "c.jsonl"
    cache = JudgeCache(path)
    cache.put("k0", {"score": 1})
    with open(path, "a") as f:
        f.write('{"key": "torn", "sco')  # a crash mid-write
    cache = JudgeCache(path)
    assert len(cache) == 1

    def writer(t: int) -> None:
        for j in range(50):
            cache.put(f"t{t}-{j}", {"score": j, "raw": "x" * 500})

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reloaded = JudgeCache(path)
    assert len(reloaded) == 1 + 8 * 50 and reloaded.get("t7-49")["score"] == 49


# --------------------------------------------------------------------------------------------------
# Summary and judge-free metrics


def _records(scores: list[int]) -> list[ScoreRecord]:
    return [ScoreRecord(str(i), s, "scored") for i, s in enumerate(scores)]


def test_summarize_known_values():
    records = _records([50, 60, 70, 80, 90]) + [
        ScoreRecord("u", None, "refused"),
        ScoreRecord("e", None, "error", error="boom"),
    ]
    s = summarize(records, n_boot=2000, seed=0)
    assert (s["n_items"], s["n_scored"], s["n_refused"], s["n_error"]) == (7, 5, 1, 1)
    assert s["mean"] == 70 and s["median"] == 70
    assert s["std"] == pytest.approx(15.8113883, rel=1e-6)  # sample std, ddof=1
    assert 50 < s["ci95_low"] < s["mean"] < s["ci95_high"] < 90
    assert summarize(records, n_boot=2000, seed=0) == s  # seeded: reproducible
    assert [row["count"] for row in s["histogram"]] == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    edges = summarize(_records([0, 9, 10, 99, 100]))["histogram"]
    assert [row["count"] for row in edges] == [2, 1, 0, 0, 0, 0, 0, 0, 0, 2]
    assert (edges[-1]["bin_low"], edges[-1]["bin_high"]) == (90, 100)


def test_summarize_nothing_scored():
    s = summarize([ScoreRecord("u", None, "refused")])
    assert s["mean"] is None and s["ci95_low"] is None and s["n_refused"] == 1
    assert sum(row["count"] for row in s["histogram"]) == 0
    assert summarize(_records([42]))["std"] == 0.0


def test_shortfall_names_the_count_and_the_threshold():
    records = _records([80, 90]) + [ScoreRecord("u", None, "refused"), ScoreRecord("e", None, "error")]
    summary = summarize(records)
    assert shortfall(summary, 0.5) is None  # 2 of 4 scored: enough at 0.5
    assert shortfall(summary, 0.9) == (
        "the judge scored 2 of 4 responses (1 refused: not a bare 0-100 integer or score: N, 1 failed), "
        "under evaluate.judge.min_scored = 0.9: does it answer with a number?"
    )
    assert shortfall(summarize([]), 0.9) is not None and shortfall(summarize([]), 0.5) is not None
    with pytest.raises(LLMCoreError, match=r"min_scored: expected a fraction in \[0.5, 1\], got -0.1"):
        JudgeConfig(min_scored=-0.1)


@pytest.mark.parametrize("value", [0, 0.0, 0.2, 0.49])
def test_min_scored_has_a_floor_the_safeguard_cannot_be_switched_off(value):
    with pytest.raises(LLMCoreError, match=r"min_scored: expected a fraction in \[0.5, 1\].*cannot be switched off"):
        JudgeConfig(min_scored=value)
    assert JudgeConfig(min_scored=0.5).min_scored == 0.5 and JudgeConfig(min_scored=1).min_scored == 1


def test_cached_replies_are_read_again_by_the_current_parser(fake_ollama, tmp_path):
    """A cache written when prose numbers counted ("100 meters" scored 100) does not carry that score over:
    the reply is parsed again, refused, and the item is asked again with the strict prompt."""
    fake = fake_ollama(scripts={"item-0": ["ok:100 meters", "ok:40"], "item-1": ["ok:85"]})
    config = fast_config(fake.host)
    items = [make_item(0), make_item(1)]
    judge = check_judge(config)
    cache = tmp_path / "judge.jsonl"
    old = {"id": "item-0", "score": 100, "status": "scored", "raw": "100 meters", "raw_strict": None}
    cache.write_text(json.dumps({"key": cache_key(config, judge["digest"], items[0]), **old}) + "\n")
    records = score_items(items, config, cache_path=cache, progress=False, judge=judge)
    assert [(r.status, r.score) for r in records] == [("scored", 40), ("scored", 85)]
    assert fake.generate_count("item-0", strict=True) == 1  # re-asked: the old reply is no score
    again = score_items(items, config, cache_path=cache, progress=False, judge=judge)
    assert [(r.status, r.score, r.cached) for r in again] == [("scored", 40, True), ("scored", 85, True)]


def test_write_records_roundtrip(tmp_path):
    records = _records([1, 2]) + [ScoreRecord("e", None, "error", attempts=3, error="x")]
    write_records(tmp_path / "scores.jsonl", records)
    back = [ScoreRecord(**json.loads(line)) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert back == records


def test_rouge_l_known_values():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert rouge_l("the cat on the mat", "the cat sat on the mat") == pytest.approx(10 / 11)  # P=1, R=5/6
    assert rouge_l("The Cat", "the cat") == 1.0
    assert rouge_l("dog barks", "the cat sat") == 0.0
    assert rouge_l("", "") == 1.0 and rouge_l("", "x") == 0.0
    # LCS is order-aware: "a b c d" vs "d c b a" shares one token in order
    assert rouge_l("a b c d", "d c b a") == pytest.approx(0.25)


def test_exact_match():
    assert exact_match("The cat sat.", "  the CAT   sat ")
    assert exact_match("Hello, world!", "hello world")
    assert not exact_match("The cat sat.", "The cat sat on the mat.")
