"""LLM-as-a-judge scoring through Ollama or an OpenAI-compatible server, plus judge-free metrics (ROUGE-L, EM).

This is the evaluation of the book's chapter 7 (Raschka, *Build a Large Language Model (From Scratch)*,
section 7.8): a larger model served by Ollama reads the instruction, the reference answer and the
fine-tuned model's response, and answers with a score from 0 to 100. Done here with what a
pipeline needs on top of the book's loop:

- the official ``ollama`` client with fixed ``seed``/``temperature``/``num_ctx`` options, so reruns agree; or, with
  ``api: openai``, the official ``openai`` client (chat completions with ``seed``/``temperature``) against any
  OpenAI-compatible server (vLLM, llama.cpp's server, LM Studio, ``llmcore serve``, Ollama's ``/v1``);
- the score asked for by JSON schema (``{"score": integer 0..100}``, :data:`SCORE_SCHEMA`) where the server takes
  one: Ollama's ``format`` (servers of API 0.5 and later), the OpenAI API's ``response_format`` (a one-token probe
  tells); the reply is then ``{"score": N}`` and cannot be prose. Other servers, or ``schema: false``, get the
  prompt alone and their prose is parsed;
- bounded concurrency, retries with exponential backoff on transient failures (connection refused or
  dropped, timeouts, HTTP 5xx/429), and one re-ask with a stricter prompt when a reply is not in the asked
  form (``parse_score``: a bare 0-100 integer, ``score: N`` or ``{"score": N}``; a number in prose is refused);
- every item gets a record (``scored``, ``refused`` or ``error``), in item order; nothing is dropped;
- a persistent JSONL cache so a rerun only asks about what changed (judge, digest, prompts, texts);
- ``summarize`` with a seeded bootstrap confidence interval of the mean and a histogram for plots.

Typical use from a stage::

    config = JudgeConfig(model="llama3")
    judge = check_judge(config)                      # fails early, one line, if Ollama is not ready
    records = score_items(items, config, cache_path="eval/judge_cache.jsonl", judge=judge)
    metrics = {**summarize(records), "judge_model": judge["model"], "judge_digest": judge["digest"]}
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
import numpy as np
import ollama
from tqdm import tqdm

from llmcore.common import LLMCoreError, atomic_path
from llmcore.text.prompts import RESPONSE_MARKER, format_alpaca

DEFAULT_HOST = "http://127.0.0.1:11434"
DEFAULT_OPENAI_BASE_URL = "http://127.0.0.1:11434/v1"  # `llmcore serve` (or Ollama) on its default port

# The book's prompt (ch. 7, `generate_model_scores`), with placeholders instead of f-string fields.
DEFAULT_PROMPT_TEMPLATE = (
    "Given the input `{input}` and correct output `{reference}`, "
    "score the model response `{response}` on a scale from 0 to 100, where 100 is the best score. "
    "Respond with the integer number only."
)
# Used once per item, only when the reply to the first prompt holds no usable score.
STRICT_PROMPT_TEMPLATE = (
    "Given the input `{input}` and correct output `{reference}`, "
    "score the model response `{response}` on a scale from 0 to 100, where 100 is the best score. "
    "Reply with only one integer between 0 and 100, for example 72. "
    "Do not write any words, explanation, ranges or fractions."
)
_PLACEHOLDERS = ("input", "reference", "response")

# What the judge is asked to answer with, where the server constrains output to a JSON schema.
SCORE_SCHEMA = {
    "type": "object",
    "properties": {"score": {"type": "integer", "minimum": 0, "maximum": 100}},
    "required": ["score"],
    "additionalProperties": False,
}
SCHEMA_OLLAMA_VERSION = (0, 5, 0)  # Ollama's format takes a JSON schema from this release on

# refused: no reply was in the asked form (parse_score); skipped: the judge was off or unreachable
Status = Literal["scored", "refused", "error", "skipped"]
MIN_SCORED_FLOOR = 0.5  # evaluate.judge.min_scored cannot go lower: a mean over fewer than half the items is no score


@dataclass
class JudgeConfig:
    """How to reach the judge and how to ask it (one ``judge`` section of params.yaml)."""

    api: Literal["ollama", "openai"] = "ollama"  # which API the judge server speaks
    host: str | None = None  # None: $OLLAMA_HOST (ollama) or $OPENAI_BASE_URL (openai), else 127.0.0.1:11434
    model: str = "llama3"  # model name on the server; for Ollama "llama3" means "llama3:latest"
    seed: int = 123  # sampling seed sent in the options, so reruns give the same replies
    temperature: float = 0.0  # greedy decoding: the score should not depend on luck
    num_ctx: int = 2048  # context window the judge runs with (Ollama's default is model dependent)
    timeout: float = 120.0  # seconds per HTTP request (connect, read, write each)
    max_concurrency: int = 4  # requests in flight at once; match OLLAMA_NUM_PARALLEL on the server
    retries: int = 3  # extra attempts per request after a transient failure (so up to retries + 1)
    backoff: float = 1.0  # seconds before the first retry, doubled before each further one
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE  # placeholders: {input} {reference} {response}
    strict_prompt_template: str = STRICT_PROMPT_TEMPLATE  # the single re-ask for refused replies
    min_scored: float = 0.9  # fraction of the items that must get a score for the judge's verdict to count (>= 0.5)
    schema: bool = True  # ask for {"score": N} by JSON schema where the server takes one; false: prose only

    def __post_init__(self) -> None:
        # Messages start with the field name: params.from_dict prefixes the section (evaluate.judge.retries: ...).
        if self.api not in ("ollama", "openai"):
            raise LLMCoreError(f"api: expected 'ollama' or 'openai', got {self.api!r}")
        if self.max_concurrency < 1:
            raise LLMCoreError(f"max_concurrency: expected >= 1, got {self.max_concurrency}")
        if self.retries < 0:
            raise LLMCoreError(f"retries: expected >= 0, got {self.retries}")
        if self.timeout <= 0:
            raise LLMCoreError(f"timeout: expected > 0 seconds, got {self.timeout}")
        if self.backoff < 0:
            raise LLMCoreError(f"backoff: expected >= 0 seconds, got {self.backoff}")
        if not MIN_SCORED_FLOOR <= self.min_scored <= 1.0:
            raise LLMCoreError(
                f"min_scored: expected a fraction in [{MIN_SCORED_FLOOR:g}, 1], got {self.min_scored:g} (the share of "
                "responses the judge must score; the safeguard cannot be switched off)"
            )
        for name in ("prompt_template", "strict_prompt_template"):
            missing = [p for p in _PLACEHOLDERS if "{" + p + "}" not in getattr(self, name)]
            if missing:
                raise LLMCoreError(f"{name}: lacks the placeholder(s) " + ", ".join("{" + p + "}" for p in missing))

    @property
    def resolved_host(self) -> str:
        if self.api == "openai":
            return self.host or os.environ.get("OPENAI_BASE_URL") or DEFAULT_OPENAI_BASE_URL
        return self.host or os.environ.get("OLLAMA_HOST") or DEFAULT_HOST

    @property
    def options(self) -> dict[str, Any]:
        return {"seed": self.seed, "temperature": self.temperature, "num_ctx": self.num_ctx}


@dataclass
class JudgeItem:
    """One response to judge. ``input`` may be empty, as in the Alpaca data."""

    id: str
    instruction: str
    input: str
    reference: str  # the dataset's correct output
    response: str  # the fine-tuned model's answer

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any], default_id: str = "") -> JudgeItem:
        """Accept the book's keys (``output``, ``model_response``) as well as this class's own."""
        try:
            return cls(
                id=str(entry.get("id", default_id)),
                instruction=entry["instruction"],
                input=entry.get("input") or "",
                reference=entry["reference"] if "reference" in entry else entry["output"],
                response=entry["response"] if "response" in entry else entry["model_response"],
            )
        except KeyError as e:
            raise LLMCoreError(f"judge item {entry.get('id', default_id)!r} lacks the field {e}") from None


@dataclass
class ScoreRecord:
    """The outcome for one item. ``attempts`` counts HTTP requests made in this run (0 when cached)."""

    id: str
    score: int | None  # 0..100 when status == "scored"
    status: Status
    raw: str | None = None  # reply to the first prompt
    raw_strict: str | None = None  # reply to the strict re-ask, None when there was none
    attempts: int = 0
    cached: bool = False
    error: str | None = None  # "ExceptionType: message" when status == "error"


# --------------------------------------------------------------------------------------------------
# Prompts


def format_input(instruction: str, input_text: str = "") -> str:
    """The Alpaca prompt the book fine-tunes on (ch. 7 ``format_input``), without the response header."""
    return format_alpaca(instruction, input_text)[: -len("\n\n" + RESPONSE_MARKER)]


def render_prompt(template: str, item: JudgeItem) -> str:
    # One regex pass instead of str.format: item texts often hold braces (code, JSON), and a text that
    # contains "{response}" must not be substituted again.
    values = {
        "input": format_input(item.instruction, item.input),
        "reference": item.reference,
        "response": item.response,
    }
    return re.sub(r"\{(input|reference|response)\}", lambda m: values[m.group(1)], template)


# --------------------------------------------------------------------------------------------------
# Reading a score out of a reply

# The forms the prompts ask for, and only those: a number somewhere in prose is not a score ("The car travels
# 100 meters" must not score 100: the response being judged often holds numbers, and the judge echoes them).
_INT = r"(100|[1-9]?[0-9])"  # 0..100, no sign, no leading zero, no fraction
_BARE_RE = re.compile(_INT + r"\.?")  # the whole reply: "85" or "85."
_LABEL_LINE_RE = re.compile(r"score\s*:\s*" + _INT + r"\.?", re.IGNORECASE)  # the whole reply, or one line of it
_FENCE_RE = re.compile(r"```(?:json)?\s*(.*?)\s*```", re.DOTALL | re.IGNORECASE)
_THINK_RE = re.compile(r"<think>.*?(?:</think>|$)", re.DOTALL | re.IGNORECASE)
SCORE_FORMS = "a bare 0-100 integer or score: N"  # what a refused reply was not, in messages


def _json_score(text: str) -> int | None:
    """The integer ``score`` of a reply that is one JSON object (maybe in a ```json fence), else None."""
    fenced = _FENCE_RE.fullmatch(text)
    try:
        obj = json.loads(fenced.group(1) if fenced else text)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    value = next((v for k, v in obj.items() if str(k).lower() == "score"), None)
    if isinstance(value, bool) or not isinstance(value, int):
        return None  # "72", 8.5, true: not the integer asked for
    return value if 0 <= value <= 100 else None


def parse_score(text: str | None) -> int | None:
    """Read a 0..100 integer score from a judge's reply, only in a form the prompts ask for; None otherwise.

    After dropping any ``<think>...</think>`` block (reasoning models deliberate there) and surrounding space,
    the reply must be one of:

    1. the integer alone: ``85`` or ``85.``;
    2. ``score: N`` (any case), as the whole reply or as exactly one line of it (``...\nScore: 90``);
    3. one JSON object whose ``score`` is an integer: ``{"score": 85}``, maybe in a ```json fence.

    N is 0..100 with no sign, leading zero or fraction. Everything else is refused: a number in prose
    (``100 meters``, ``I give it 70``), other scales (``8/10``, ``85%``, ``85 out of 100``), decorations
    (``**85**``), ``85.0``, two scores, or none. A refused first reply gets one strict re-ask (``score_items``).
    """
    if not text:
        return None
    text = _THINK_RE.sub("", text).strip()
    if not text:
        return None
    for pattern in (_BARE_RE, _LABEL_LINE_RE):  # rules 1 and 2 (the whole reply)
        m = pattern.fullmatch(text)
        if m:
            return int(m.group(1))
    if text.startswith(("{", "`")):  # rule 3
        return _json_score(text)
    labelled = [m for line in text.splitlines() if (m := _LABEL_LINE_RE.fullmatch(line.strip()))]  # rule 2 (a line)
    return int(labelled[0].group(1)) if len(labelled) == 1 else None


# --------------------------------------------------------------------------------------------------
# Talking to Ollama


def _client(config: JudgeConfig):
    if config.api == "openai":
        import openai

        key = os.environ.get("OPENAI_API_KEY") or "unused"  # local servers take any key
        return openai.OpenAI(base_url=config.resolved_host, api_key=key, timeout=config.timeout, max_retries=0)
    return ollama.Client(host=config.resolved_host, timeout=config.timeout)


def _check_openai(config: JudgeConfig) -> dict[str, Any]:
    import openai

    host = config.resolved_host
    with _client(config) as client:
        try:
            listed = [m.id for m in client.models.list()]
        except (openai.APIConnectionError, openai.APITimeoutError) as e:
            raise LLMCoreError(
                f"cannot reach the OpenAI-compatible server at {host} ({type(e).__name__}): start it (e.g. "
                "`llmcore serve --model DIR`) or point judge.host / OPENAI_BASE_URL at a running one"
            ) from None
        except openai.APIStatusError as e:
            raise LLMCoreError(
                f"the OpenAI-compatible server at {host} failed to list models: HTTP {e.status_code}"
            ) from None
    name = next((m for m in (config.model, f"{config.model}:latest") if m in listed), None)
    if name is None:
        raise LLMCoreError(
            f"judge model '{config.model}' is not on the OpenAI-compatible server at {host} "
            f"(it serves: {', '.join(listed) or 'nothing'})"
        )
    schema = False
    if config.schema:
        with _client(config) as client:
            schema = _openai_takes_schema(client, name, host)
    # The OpenAI API has no weight digest: the cache keys on the name (and the server's fingerprint is not stable).
    return {
        "host": host,
        "model": name,
        "digest": None,
        "family": None,
        "parameter_size": None,
        "quantization_level": None,
        "schema": schema,
    }


def _openai_takes_schema(client, model: str, host: str) -> bool:
    """Whether the OpenAI-compatible server honours ``response_format`` with a JSON schema: a one-token probe; a
    4xx answer (vLLM, llama.cpp and llmcore serve take it; others refuse it) means prose."""
    import openai

    try:
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Score: "}],
            max_tokens=1,
            temperature=0,
            response_format=_response_format(),
        )
    except openai.APIStatusError as e:
        if 400 <= e.status_code < 500:
            return False
        raise LLMCoreError(
            f"the OpenAI-compatible server at {host} failed a one-token request: HTTP {e.status_code}"
        ) from None
    except (openai.APIConnectionError, openai.APITimeoutError) as e:
        raise LLMCoreError(f"lost the OpenAI-compatible server at {host} ({type(e).__name__})") from None
    return True


def _response_format() -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "score", "schema": SCORE_SCHEMA, "strict": True}}


def _ollama_takes_schema(host: str, timeout: float) -> bool:
    """Whether the Ollama server's ``format`` takes a JSON schema: its ``/api/version`` is 0.5.0 or later (a dev
    build's 0.0.0 counts as new); a server that does not say is asked in prose."""
    url = (host if "://" in host else f"http://{host}").rstrip("/") + "/api/version"
    try:
        version = httpx.get(url, timeout=timeout).json().get("version", "")
    except (httpx.HTTPError, ValueError, AttributeError):
        return False
    m = re.match(r"(\d+)\.(\d+)\.(\d+)", str(version))
    if not m:
        return False
    parts = tuple(map(int, m.groups()))
    return parts >= SCHEMA_OLLAMA_VERSION or parts == (0, 0, 0)


def check_judge(config: JudgeConfig) -> dict[str, Any]:
    """Make sure the Ollama server answers and has the judge model; fail with one line otherwise.

    Returns:
        ``{"host", "model", "digest", "family", "parameter_size", "quantization_level", "schema"}``; ``model`` is
        the name the server lists (``llama3:latest``), ``digest`` its sha256 (None if the server did not list it),
        ``schema`` whether the score is asked for by JSON schema (``config.schema`` and the server takes one).
    """
    if config.api == "openai":
        return _check_openai(config)
    host = config.resolved_host
    with _client(config) as client:
        try:
            listed = client.list().models
        except (ConnectionError, httpx.TransportError) as e:
            raise LLMCoreError(
                f"cannot reach the Ollama server at {host} ({type(e).__name__}): "
                "start it with `ollama serve` or point judge.host / OLLAMA_HOST at a running one"
            ) from None
        except ollama.ResponseError as e:
            raise LLMCoreError(f"the Ollama server at {host} failed to list models: {e}") from None

        wanted = {config.model, f"{config.model}:latest"}
        entry = next((m for m in listed if m.model in wanted), None)
        if entry is None:
            # The list may spell names differently (registry prefixes); `show` resolves them like `generate`.
            try:
                shown = client.show(config.model)
            except ollama.ResponseError as e:
                if e.status_code == 404:
                    raise LLMCoreError(
                        f"judge model '{config.model}' is not on the Ollama server at {host}: "
                        f"run `ollama pull {config.model}`"
                    ) from None
                raise LLMCoreError(f"the Ollama server at {host} failed on '{config.model}': {e}") from None
            except (ConnectionError, httpx.TransportError) as e:
                raise LLMCoreError(
                    f"lost the Ollama server at {host} ({type(e).__name__}): is `ollama serve` still running?"
                ) from None
            name, digest, details = config.model, None, shown.details
        else:
            name, digest, details = entry.model, entry.digest, entry.details
    return {
        "host": host,
        "model": name,
        "digest": digest,
        "family": details.family if details else None,
        "parameter_size": details.parameter_size if details else None,
        "quantization_level": details.quantization_level if details else None,
        "schema": config.schema and _ollama_takes_schema(host, config.timeout),
    }


def _is_transient(e: Exception) -> bool:
    """Worth retrying: the server was down, slow, dropped us, or failed on its side (5xx, 429)."""
    if isinstance(e, ollama.ResponseError):
        return e.status_code >= 500 or e.status_code == 429
    if type(e).__module__.startswith("openai"):
        import openai

        if isinstance(e, openai.APIStatusError):
            return e.status_code >= 500 or e.status_code == 429
        return isinstance(e, (openai.APIConnectionError, openai.APITimeoutError))
    # ollama turns httpx.ConnectError into the builtin ConnectionError; timeouts, resets and
    # "server disconnected" arrive as raw httpx.TransportError subclasses.
    return isinstance(e, (ConnectionError, TimeoutError, httpx.TransportError))


def _complete(client, config: JudgeConfig, prompt: str, schema: bool = False) -> str:
    """The judge's reply to one prompt: Ollama's generate (the model's own template), or an OpenAI chat turn;
    ``schema``: constrained to :data:`SCORE_SCHEMA`."""
    if config.api == "openai":
        extra = {"response_format": _response_format()} if schema else {}
        reply = client.chat.completions.create(
            model=config.model,
            messages=[{"role": "user", "content": prompt}],
            temperature=config.temperature,
            seed=config.seed,
            **extra,
        )
        return reply.choices[0].message.content or ""
    fmt = SCORE_SCHEMA if schema else None
    return client.generate(config.model, prompt, options=config.options, stream=False, format=fmt).response or ""


def _judge_one(client, item: JudgeItem, config: JudgeConfig, schema: bool = False) -> ScoreRecord:
    attempts = 0

    def ask(prompt: str) -> str:
        nonlocal attempts
        for k in range(config.retries + 1):
            attempts += 1
            try:
                return _complete(client, config, prompt, schema)
            except Exception as e:
                if k == config.retries or not _is_transient(e):
                    raise
                time.sleep(config.backoff * 2**k)
        raise AssertionError("unreachable")

    raw = raw_strict = None
    try:
        raw = ask(render_prompt(config.prompt_template, item))
        score = parse_score(raw)
        if score is None:
            raw_strict = ask(render_prompt(config.strict_prompt_template, item))
            score = parse_score(raw_strict)
    except Exception as e:  # any failure becomes an "error" record: the run goes on, the item is counted
        error = f"{type(e).__name__}: {e}"
        return ScoreRecord(item.id, None, "error", raw, raw_strict, attempts, error=error)
    status: Status = "scored" if score is not None else "refused"
    return ScoreRecord(item.id, score, status, raw, raw_strict, attempts)


# --------------------------------------------------------------------------------------------------
# Cache


def cache_key(config: JudgeConfig, digest: str | None, item: JudgeItem, schema: bool = False) -> str:
    """sha256 over everything that can change the judge's answer for this item (``schema``: asked by schema)."""
    payload = {
        "model": config.model,
        "digest": digest or "",
        "options": config.options,
        "prompt_template": config.prompt_template,
        "strict_prompt_template": config.strict_prompt_template,
        "prompt": render_prompt(config.prompt_template, item),  # instruction, input, reference, response
    }
    if config.api != "ollama":  # Ollama keys stay as they were, so existing caches still hit
        payload["api"] = config.api
    if schema:  # prose answers keep their keys
        payload["format"] = SCORE_SCHEMA
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


class JudgeCache:
    """Append-only JSONL file of judge answers, one ``{"key": ..., **record}`` object per line.

    Appending one whole line per write (under a lock) keeps concurrent writers and crashes from damaging
    earlier entries; a torn last line is skipped on load. When a key appears twice the later line wins.
    Only answers are cached (``scored`` and ``refused``); ``error`` items are asked again next run. A hit's
    replies are parsed again by ``score_items``, so a cache written under older parsing rules scores the same
    as a fresh run.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._entries: dict[str, dict[str, Any]] = {}
        self._needs_newline = False
        if self.path.exists():
            text = self.path.read_text(encoding="utf-8")
            self._needs_newline = bool(text) and not text.endswith("\n")
            for line in text.splitlines():
                try:
                    obj = json.loads(line)
                    self._entries[obj.pop("key")] = obj
                except (ValueError, KeyError, AttributeError):
                    continue  # a torn or foreign line: ignore it, the item is simply asked again

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> dict[str, Any] | None:
        return self._entries.get(key)

    def put(self, key: str, entry: dict[str, Any]) -> None:
        line = json.dumps({"key": key, **entry}, ensure_ascii=False) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(("\n" if self._needs_newline else "") + line)
            self._needs_newline = False
            self._entries[key] = entry


# --------------------------------------------------------------------------------------------------
# Scoring


def score_items(
    items: Sequence[JudgeItem | Mapping[str, Any]],
    config: JudgeConfig,
    cache_path: str | os.PathLike | None = None,
    progress: bool = True,
    judge: dict[str, Any] | None = None,
) -> list[ScoreRecord]:
    """Score every item with the judge; one record per item, in item order.

    Args:
        items: ``JudgeItem``s or dicts with ``instruction``, ``input``, ``output``/``reference`` and
            ``response``/``model_response`` (``id`` defaults to the position).
        config: how to reach and ask the judge.
        cache_path: JSONL cache (see ``JudgeCache``); items answered before by the same judge (name and
            digest), options and prompts are not asked again. None: no cache.
        progress: show a tqdm bar.
        judge: the result of ``check_judge(config)`` if the caller already has it; checked here otherwise. Its
            ``schema`` says whether each prompt asks for :data:`SCORE_SCHEMA` by JSON schema.

    Returns:
        ``ScoreRecord``s; transient failures are retried ``config.retries`` times with exponential backoff,
        refused replies are re-asked once with ``config.strict_prompt_template``. Cached replies are parsed
        again: a cached first reply that is refused now, with no strict reply cached, is asked again.

    Raises:
        LLMCoreError: the server is unreachable or lacks the model (checked before any item is asked).
    """
    items = [x if isinstance(x, JudgeItem) else JudgeItem.from_dict(x, str(i)) for i, x in enumerate(items)]
    judge = judge if judge is not None else check_judge(config)
    cache = JudgeCache(cache_path) if cache_path is not None else None
    schema = bool(judge.get("schema"))
    keys = [cache_key(config, judge.get("digest"), it, schema) for it in items]

    records: list[ScoreRecord | None] = [None] * len(items)
    todo = []
    for i, (item, key) in enumerate(zip(items, keys, strict=True)):
        hit = cache.get(key) if cache is not None else None
        record = _from_cache(item.id, hit) if hit is not None else None
        if record is not None:
            records[i] = record
        else:
            todo.append(i)

    if todo:
        bar = tqdm(total=len(items), initial=len(items) - len(todo), desc=f"judge {config.model}", disable=not progress)
        pool = ThreadPoolExecutor(min(config.max_concurrency, len(todo)))
        with _client(config) as client, bar:
            try:
                futures = {pool.submit(_judge_one, client, items[i], config, schema): i for i in todo}
                for future in as_completed(futures):
                    i = futures[future]
                    record = records[i] = future.result()
                    if cache is not None and record.status != "error":  # written as we go: a crash keeps them
                        cache.put(
                            keys[i],
                            {
                                "id": record.id,
                                "score": record.score,
                                "status": record.status,
                                "raw": record.raw,
                                "raw_strict": record.raw_strict,
                                "judge_model": judge.get("model"),
                                "digest": judge.get("digest"),
                            },
                        )
                    bar.update(1)
            finally:
                # On Ctrl-C, drop the queued items instead of judging them all before exiting.
                pool.shutdown(wait=True, cancel_futures=True)
    assert all(r is not None for r in records)
    return records  # type: ignore[return-value]


def _from_cache(item_id: str, hit: Mapping[str, Any]) -> ScoreRecord | None:
    """A cached answer read by today's parser (the stored score may come from older, looser rules); None when the
    first reply is refused and no strict re-ask was cached: the item must be asked again."""
    raw, raw_strict = hit.get("raw"), hit.get("raw_strict")
    score = parse_score(raw)
    if score is None and raw_strict is None:
        return None
    if score is None:
        score = parse_score(raw_strict)
    return ScoreRecord(item_id, score, "scored" if score is not None else "refused", raw, raw_strict, cached=True)


def write_records(path: str | os.PathLike, records: Sequence[ScoreRecord]) -> None:
    """Write records as JSONL, atomically (readers never see half a file)."""
    with atomic_path(path) as tmp:
        lines = [json.dumps(asdict(r), ensure_ascii=False) + "\n" for r in records]
        tmp.write_text("".join(lines), encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# Summary statistics


def summarize(records: Sequence[ScoreRecord], n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Statistics over the scored items, plus counts of every status.

    Args:
        records: the output of ``score_items``.
        n_boot: bootstrap resamples for the confidence interval of the mean.
        seed: seed of the bootstrap's generator, so the interval is reproducible.

    Returns:
        ``mean``, ``median``, ``std`` (sample, ddof=1; 0 for one score), ``ci95_low``/``ci95_high``
        (percentile bootstrap of the mean), ``n_items``, ``n_scored``, ``n_refused`` (no reply in the asked
        form), ``n_error``,
        ``n_cached`` and ``histogram``: ten rows ``{"bin_low", "bin_high", "count"}`` for [0,10), ...,
        [90,100] (100 goes in the last bin). Statistics are None when nothing was scored. Refused and
        failed items are counted, not averaged in as zeros.
    """
    scores = np.array([r.score for r in records if r.status == "scored"], dtype=float)
    counts = {s: sum(r.status == s for r in records) for s in ("scored", "refused", "error")}
    out: dict[str, Any] = {
        "n_items": len(records),
        "n_scored": counts["scored"],
        "n_refused": counts["refused"],
        "n_error": counts["error"],
        "n_cached": sum(r.cached for r in records),
        "mean": None,
        "median": None,
        "std": None,
        "ci95_low": None,
        "ci95_high": None,
    }
    if len(scores):
        rng = np.random.default_rng(seed)
        boot = scores[rng.integers(0, len(scores), size=(n_boot, len(scores)))].mean(axis=1)  # (n_boot,)
        out.update(
            mean=float(scores.mean()),
            median=float(np.median(scores)),
            std=float(scores.std(ddof=1)) if len(scores) > 1 else 0.0,
            ci95_low=float(np.percentile(boot, 2.5)),
            ci95_high=float(np.percentile(boot, 97.5)),
        )
    hist = np.histogram(scores, bins=10, range=(0, 100))[0]  # numpy's last bin is closed: 100 lands in it
    out["histogram"] = [{"bin_low": 10 * b, "bin_high": 10 * b + 10, "count": int(c)} for b, c in enumerate(hist)]
    return out


def shortfall(summary: Mapping[str, Any], min_scored: float, judge: str = "the judge") -> str | None:
    """Why a judged run has no usable score, in one line; None when at least ``min_scored`` of the items got one.

    A judge that answers every request with prose (or errors) is reachable yet useless: its mean is over
    nothing, or over a few lucky items. ``summary`` is the output of ``summarize``.
    """
    n, scored = summary["n_items"], summary["n_scored"]
    if (scored / n if n else 0.0) >= min_scored:
        return None
    return (
        f"{judge} scored {scored} of {n} responses ({summary['n_refused']} refused: not {SCORE_FORMS}, "
        f"{summary['n_error']} failed), under evaluate.judge.min_scored = {min_scored:g}: does it answer with a number?"
    )
