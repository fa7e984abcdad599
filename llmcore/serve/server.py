"""An HTTP server that speaks Ollama's API, so any Ollama client can talk to an llmcore checkpoint.

    llmcore serve --model data/models/instruct                 # http://127.0.0.1:11434, model "instruct:latest"
    curl http://127.0.0.1:11434/api/generate -d '{"model": "instruct", "prompt": "Name a primary color."}'

    import ollama
    ollama.Client(host="http://127.0.0.1:11434").chat("instruct", messages=[{"role": "user", "content": "Hi"}])

A model directory holds ``model.safetensors`` and ``tokenizer.json`` side by side. Endpoints (the shapes of
github.com/ollama/ollama ``docs/api.md``, checked against the official ``ollama`` Python client):

    GET  /api/version    {"version": ...}
    GET  /api/tags       the served models; ``digest`` is the sha256 of model.safetensors
    GET  /api/ps         the same models, as loaded ones (all are, for the server's lifetime)
    POST /api/show       details, ``model_info`` (architecture numbers), template
    POST /api/generate   {"model", "prompt", "system"?, "raw"?, "stream"?, "options"?}
    POST /api/chat       {"model", "messages", "stream"?, "options"?}

``stream`` defaults to true: one NDJSON object per text piece, then a final ``"done": true`` object with the
counts and durations (nanoseconds); with ``"stream": false`` one object holds the whole text. Options honoured:
``temperature`` (default 0.8), ``top_k`` (40), ``top_p`` (0.9), ``seed`` (random when absent or negative),
``num_predict`` (-1: until the context is full) and ``stop`` (strings; the output is cut at the first one).
Other fields and options (``format``, ``images``, ``keep_alive``, ``num_ctx``, ...) are accepted and ignored.
As in Ollama, ``"prompt": ""`` (or ``"messages": []``) only answers ``"done_reason": "load"``.

Prompts, by ``--template``:

- ``alpaca`` (instruction-tuned models): ``/api/generate`` wraps the prompt with
  :func:`llmcore.text.prompts.format_alpaca` unless ``"raw": true``. ``/api/chat`` makes the last message (which must
  come from the user) the instruction; system messages and earlier turns become the ``### Input:`` text, one
  ``Role: content`` line per message, so the model sees the conversation as context. ``system`` in a generate
  request counts as a system message. The reply stops at the end-of-text token or where the model starts a new
  ``###`` section (with ``"raw": true`` too, like a Modelfile ``stop`` parameter), and is stripped of
  surrounding whitespace, as :func:`llmcore.text.prompts.extract_response` does.
- ``raw`` (base models, or a judge whose prompt is complete): the text is the prompt itself; for chat, the
  messages' contents joined by blank lines. Generation stops at the end-of-text token only.

Concurrency: each request has its own KV cache and random generator; a lock per model serialises decoding
*steps* (not whole requests), so a slow streaming client does not stall the others. A client that hangs up
mid-stream only ends its own generation. The server binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import codecs
import json
import logging
import math
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
from safetensors import safe_open

from llmcore import __version__
from llmcore.common import LLMCoreError, sha256_file
from llmcore.models.generate import SamplingConfig, generate_steps
from llmcore.models.gpt import GPT
from llmcore.text.prompts import check_template, format_alpaca, format_prompt, section_start
from llmcore.text.tokenizer import Tokenizer
from llmcore.weights.model_dir import open_model_dir

log = logging.getLogger("llmcore.serve.server")

DEFAULT_HOST = "127.0.0.1"  # loopback only: exposing the server is an explicit choice (--host 0.0.0.0)
DEFAULT_PORT = 11434  # Ollama's port, so clients find it without configuration
OLLAMA_API_VERSION = "0.6.0"  # what /api/version reports: the Ollama API level these endpoints follow
WEIGHTS_FILE, TOKENIZER_FILE = "model.safetensors", "tokenizer.json"
MAX_BODY_BYTES = 16 * 2**20


# ---------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------


@dataclass
class ModelHandle:
    """One served model: the network, its tokenizer, how prompts are built, and what /api/tags says."""

    model: GPT
    tokenizer: Tokenizer
    template: str = "alpaca"  # alpaca | raw (see the module docstring)
    path: Path | None = None  # the model.safetensors file
    digest: str = ""  # sha256 hex of model.safetensors
    size: int = 0  # bytes of model.safetensors
    modified_at: str = ""  # RFC 3339 mtime of model.safetensors
    quantization: str = "F32"  # dtype of the stored weights, as Ollama names it (F32, BF16, F16)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if self.template != "raw":
            check_template(self.template, where="--template")
        # Requests decode in interleaved steps, and generate_steps restores the train/eval mode it found when a
        # request ends: a model in eval mode from the start keeps every request in eval mode (no dropout).
        self.model.eval()

    @classmethod
    def load(cls, path: str | Path, template: str | None = None, device: str | torch.device = "cpu") -> ModelHandle:
        """Load a model folder (or its ``model.safetensors``); ``template`` None: the one stored with the model
        by instruction tuning, else ``alpaca``."""
        folder = open_model_dir(path).require_lm("serve")
        weights, tokenizer = folder.weights, folder.tokenizer
        model = folder.load_lm(device)
        template = template or folder.template or "alpaca"
        with safe_open(str(weights), framework="pt") as f:
            first = next(iter(f.keys()), None)
            quantization = f.get_slice(first).get_dtype() if first else "F32"
        stat = weights.stat()
        return cls(
            model=model,
            tokenizer=tokenizer,
            template=template,
            path=weights,
            digest=sha256_file(weights),
            size=stat.st_size,
            modified_at=_rfc3339(stat.st_mtime),
            quantization=quantization,
        )

    @property
    def family(self) -> str:
        return "llama" if self.model.cfg.pos_emb == "rope" else "gpt2"

    def details(self) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": "safetensors",
            "family": self.family,
            "families": [self.family],
            "parameter_size": _human_count(self.model.num_params()),
            "quantization_level": self.quantization,
        }


def resolve_weights(path: str | Path) -> Path:
    """``dir`` -> ``dir/model.safetensors``; a ``.safetensors`` file stays as it is."""
    path = Path(path)
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    if not weights.is_file():
        raise LLMCoreError(f"{path}: no model here (expected a directory holding {WEIGHTS_FILE} and {TOKENIZER_FILE})")
    return weights


def default_name(path: str | Path) -> str:
    """Ollama-style name of a model directory: ``data/models/instruct`` -> ``instruct:latest``."""
    path = Path(path)
    folder = path.parent if path.suffix == ".safetensors" else path
    return qualify(folder.resolve().name)


def qualify(name: str) -> str:
    """Add Ollama's default tag: ``instruct`` -> ``instruct:latest``."""
    return name if ":" in name else f"{name}:latest"


def _human_count(n: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.1f}{suffix}"
    return str(n)


def _rfc3339(timestamp: float | None = None) -> str:
    when = datetime.fromtimestamp(time.time() if timestamp is None else timestamp, tz=timezone.utc)
    return when.isoformat(timespec="microseconds").replace("+00:00", "Z")


# ---------------------------------------------------------------------------------------------------
# Requests: options and prompts
# ---------------------------------------------------------------------------------------------------


class RequestError(Exception):
    """A request the server refuses: becomes ``{"error": message}`` with this HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Options:
    """The sampling options a request may set; defaults are Ollama's."""

    temperature: float = 0.8
    top_k: int = 40  # <= 0: no top-k
    top_p: float = 0.9  # >= 1: no nucleus filtering
    seed: int | None = None  # None or negative: a fresh random seed per request
    num_predict: int = -1  # negative: until the context is full
    stop: list[str] = field(default_factory=list)

    def sampling(self, eot_id: int, context_length: int) -> SamplingConfig:
        top_k = self.top_k if self.top_k > 0 else None
        top_p = self.top_p if self.top_p < 1 else None
        if top_p is not None and top_p <= 0:  # an empty nucleus keeps the top token, as llama.cpp does
            top_k, top_p = 1, None
        seed = self.seed if self.seed is not None and self.seed >= 0 else secrets.randbits(63)
        return SamplingConfig(
            max_new_tokens=self.num_predict if self.num_predict >= 0 else context_length,
            temperature=self.temperature,
            top_k=top_k,
            top_p=top_p,
            stop_ids=(eot_id,),
            seed=seed % 2**64,
        )


def parse_options(raw: Any) -> Options:
    """Validate the ``options`` object; a wrong type is a 400 naming the option."""
    if raw is None:
        return Options()
    if not isinstance(raw, dict):
        raise RequestError(400, f"options must be a JSON object, got {_json_type(raw)}")
    opts = Options()
    for name in ("temperature", "top_p"):
        if raw.get(name) is not None:
            setattr(opts, name, float(_number(raw[name], name)))
    for name in ("top_k", "seed", "num_predict"):
        if raw.get(name) is not None:
            value = _number(raw[name], name)
            if value != int(value):
                raise RequestError(400, f"option '{name}' must be an integer, got {value!r}")
            setattr(opts, name, int(value))
    stop = raw.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise RequestError(400, f"option 'stop' must be a list of strings, got {json.dumps(raw['stop'])}")
        opts.stop = [s for s in stop if s]
    return opts


def _number(value: Any, name: str) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(400, f"option '{name}' must be a number, got {json.dumps(value)}")
    return value


def _json_type(value: Any) -> str:
    names = {str: "a string", bool: "a boolean", int: "a number", float: "a number", list: "an array"}
    return "null" if value is None else names.get(type(value), "an object")


def _field(body: dict, name: str, kind: type, default: Any = None, required: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        if required:
            raise RequestError(400, f"{name} is required")
        return default
    if not isinstance(value, kind):
        expected = {str: "a string", bool: "a boolean", list: "an array", dict: "an object"}[kind]
        raise RequestError(400, f"{name} must be {expected}, got {_json_type(value)}")
    return value


def parse_messages(raw: list) -> list[dict[str, str]]:
    """Chat messages as ``{"role", "content"}`` dicts (``images``/``tool_calls`` are ignored)."""
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"]:
            raise RequestError(400, f"messages[{i}] must be an object with a string 'role'")
        content = m.get("content")
        if content is not None and not isinstance(content, str):
            raise RequestError(400, f"messages[{i}].content must be a string, got {_json_type(content)}")
        messages.append({"role": m["role"], "content": content or ""})
    return messages


def chat_prompt(messages: Sequence[dict[str, str]], template: str) -> str:
    """The prompt text for a conversation (see the module docstring)."""
    if template == "raw":
        return "\n\n".join(m["content"] for m in messages if m["content"])
    *history, last = messages
    if last["role"] != "user":
        raise RequestError(400, f"the last message must have role 'user' (got '{last['role']}')")
    context = "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in history)
    return format_prompt(template, last["content"], context)


# ---------------------------------------------------------------------------------------------------
# Generation: tokens -> the text pieces a client sees
# ---------------------------------------------------------------------------------------------------


def _cut(text: str, stops: Sequence[str], final: bool) -> tuple[str, bool]:
    """``(shown, stopped)``: ``text`` up to the first stop string; unless ``final``, also hold back a tail
    that could still grow into a stop string."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    if hits:
        return text[: min(hits)], True
    if final:
        return text, False
    held = max((k for s in stops for k in range(len(s) - 1, 0, -1) if text.endswith(s[:k])), default=0)
    return text[: len(text) - held], False


class TextStream:
    """Turns generated token ids into text pieces: incremental UTF-8, stop strings, Alpaca sections.

    Token bytes go through an incremental UTF-8 decoder, so a character split over several byte-level tokens
    is emitted once complete. Text that might be the start of a stop string (or, with ``sections``, of a new
    ``###`` section, or trailing whitespace) is held back until it is not, so the concatenated pieces always
    equal the final text: streaming and non-streaming answers agree.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), sections: bool = False):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.sections = sections  # Alpaca: stop at a new "###" section, strip surrounding whitespace
        self.stopped = False  # a stop string or section marker was reached
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text = ""
        self._sent = 0  # characters of the visible text already returned

    def push(self, token_id: int) -> str:
        """Add one token; return the newly visible text (often empty)."""
        if token_id < self.tokenizer.vocab_size:  # a padded model vocab can name ids the tokenizer lacks
            self._text += self._decoder.decode(self.tokenizer.decode_bytes([token_id]))
        return self._advance(final=False)

    def finish(self) -> str:
        """No more tokens: return what was held back (a cut-off character becomes U+FFFD)."""
        if not self.stopped:
            self._text += self._decoder.decode(b"", final=True)
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        text, stopped = _cut(self._text, self.stop, final)
        if self.sections:
            final = final or stopped
            end = section_start(text)
            if end >= 0:
                text, stopped = text[:end], True
            elif not final:
                text = _cut("\n" + text, ("\n###",), final=False)[0][1:]
            text = text.strip()
        self.stopped = self.stopped or stopped
        piece = text[self._sent :]
        self._sent = len(text)
        return piece


@dataclass
class Completion:
    """One generation request; iterate :meth:`pieces`, then read the counts for the final response."""

    handle: ModelHandle
    prompt_ids: list[int]
    options: Options
    done_reason: str = ""
    prompt_eval_count: int = 0
    eval_count: int = 0
    load_duration: int = 0
    prompt_eval_duration: int = 0
    eval_duration: int = 0
    total_duration: int = 0

    @classmethod
    def create(cls, handle: ModelHandle, prompt: str, options: Options) -> Completion:
        try:
            ids = handle.tokenizer.encode(prompt, allow_special=False)  # as in training: "<|endoftext|>" is text
        except LLMCoreError as e:
            raise RequestError(400, str(e)) from None
        if not ids:
            raise RequestError(400, "the prompt is empty")
        ctx = handle.model.cfg.context_length
        return cls(handle, ids[-(ctx - 1) :], options)  # generate_steps keeps the same last tokens

    def pieces(self) -> Iterator[str]:
        """Yield text pieces as they become visible; sets ``done_reason`` and the counts when done."""
        h, start = self.handle, time.perf_counter_ns()
        cfg = self.options.sampling(h.tokenizer.eot_id, h.model.cfg.context_length)
        text = TextStream(h.tokenizer, self.options.stop, sections=h.template == "alpaca")
        steps = generate_steps(h.model, [self.prompt_ids], cfg)
        self.prompt_eval_count, first_step = len(self.prompt_ids), None
        try:
            while not self.done_reason:
                with h.lock:  # the model is shared: one decoding step at a time
                    tokens, alive = next(steps, (None, None))
                now = time.perf_counter_ns()
                if tokens is None:
                    self.done_reason = "length"  # num_predict reached, or the context is full
                    break
                # The first step runs the whole prompt (prefill): counted as prompt evaluation.
                first_step = first_step or now
                self.eval_count += 1
                if not alive[0]:
                    self.done_reason = "stop"  # end-of-text token
                    break
                piece = text.push(int(tokens[0]))
                if text.stopped:
                    self.done_reason = "stop"
                if piece:
                    yield piece
            tail = text.finish()
            if tail:
                yield tail
        finally:
            with h.lock:
                steps.close()
            end = time.perf_counter_ns()
            self.prompt_eval_duration = (first_step or end) - start
            self.eval_duration = end - (first_step or end)
            self.total_duration = end - start

    def stats(self) -> dict[str, Any]:
        return {
            "done_reason": self.done_reason,
            "total_duration": self.total_duration,
            "load_duration": self.load_duration,
            "prompt_eval_count": self.prompt_eval_count,
            "prompt_eval_duration": self.prompt_eval_duration,
            "eval_count": self.eval_count,
            "eval_duration": self.eval_duration,
        }


# ---------------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------------


class OllamaServer(ThreadingHTTPServer):
    """A threaded HTTP server holding the served models by name (``name:tag``)."""

    daemon_threads = True

    def __init__(self, models: dict[str, ModelHandle], address: tuple[str, int]):
        self.models = models
        super().__init__(address, OllamaHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


def make_server(models: dict[str, ModelHandle], host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> OllamaServer:
    """Bind a server for ``models`` (name -> handle; ``:latest`` is added to untagged names).

    Port 0 picks a free port (see ``server.url``); call ``serve_forever()`` to run it (in a thread for tests).
    """
    if not models:
        raise LLMCoreError("no models to serve")
    named = {qualify(name): handle for name, handle in models.items()}
    if len(named) != len(models):
        raise LLMCoreError(f"two models share a name: {sorted(models)}")
    return OllamaServer(named, (host, port))


class OllamaHandler(BaseHTTPRequestHandler):
    server: OllamaServer
    protocol_version = "HTTP/1.1"  # keep-alive; streams use chunked transfer encoding, as Ollama does
    server_version = f"llmcore/{__version__}"
    disable_nagle_algorithm = True  # stream pieces leave at once
    timeout = 300  # seconds an idle keep-alive connection may hold its thread

    ROUTES = {
        "/": ("GET", "HEAD"),
        "/api/version": ("GET", "HEAD"),
        "/api/tags": ("GET", "HEAD"),
        "/api/ps": ("GET", "HEAD"),
        "/api/show": ("POST",),
        "/api/generate": ("POST",),
        "/api/chat": ("POST",),
    }

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)

    # -- dispatch -----------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        self._started = False  # whether a response (status line) went out
        try:
            path = urlsplit(self.path).path.rstrip("/") or "/"
            body = self._read_body() if self.command in ("POST", "PUT", "DELETE") else None
            if path not in self.ROUTES:
                raise RequestError(404, f"not found: {path}")
            if self.command not in self.ROUTES[path]:
                raise RequestError(405, f"method {self.command} not allowed on {path}")
            if path == "/":
                self._send(200, b"llmcore is running (Ollama API)", "text/plain; charset=utf-8")
            elif path == "/api/version":
                self._send_json(200, {"version": OLLAMA_API_VERSION, "llmcore": __version__})
            elif path in ("/api/tags", "/api/ps"):
                self._send_json(200, {"models": [self._listing(n, h, path == "/api/ps") for n, h in self._models()]})
            else:
                body = self._parse_json(body)
                {"/api/show": self._show, "/api/generate": self._generate, "/api/chat": self._chat}[path](body)
        except RequestError as e:
            self._error(e.status, str(e))
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError):
            log.info("%s hung up", self.address_string())
            self.close_connection = True
        except Exception as e:  # a bug, not the client's fault: answer 500 and keep serving
            log.exception("error on %s %s", self.command, self.path)
            self._error(500, f"{type(e).__name__}: {e}")

    def _models(self) -> list[tuple[str, ModelHandle]]:
        return sorted(self.server.models.items())

    def _model(self, body: dict, key: str = "model") -> tuple[str, ModelHandle]:
        name = _field(body, key, str, required=True)
        if not name:
            raise RequestError(400, f"{key} is required")
        models = self.server.models
        for candidate in (name, qualify(name)):
            if candidate in models:
                return candidate, models[candidate]
        raise RequestError(404, f"model '{name}' not found")

    # -- endpoints ----------------------------------------------------------------------------------

    @staticmethod
    def _listing(name: str, h: ModelHandle, running: bool) -> dict[str, Any]:
        entry = {"name": name, "model": name, "size": h.size, "digest": h.digest, "details": h.details()}
        if running:
            on_gpu = h.model.tok_emb.weight.device.type != "cpu"
            entry |= {"expires_at": "9999-12-31T23:59:59Z", "size_vram": h.size if on_gpu else 0}
            entry["context_length"] = h.model.cfg.context_length
        else:
            entry["modified_at"] = h.modified_at
        return entry

    def _show(self, body: dict) -> None:
        name, h = self._model(body, "model" if "model" in body else "name")
        cfg, arch = h.model.cfg, h.family
        template = format_alpaca("{{ .Prompt }}") if h.template == "alpaca" else "{{ .Prompt }}"
        parameters = 'stop "###"' if h.template == "alpaca" else ""
        self._send_json(200, {
            "license": "",
            "modelfile": f"# served by llmcore\nFROM {h.path}\nTEMPLATE \"\"\"{template}\"\"\"\n",
            "parameters": parameters,
            "template": template,
            "details": h.details(),
            "model_info": {
                "general.architecture": arch,
                "general.parameter_count": h.model.num_params(),
                f"{arch}.context_length": cfg.context_length,
                f"{arch}.embedding_length": cfg.emb_dim,
                f"{arch}.block_count": cfg.n_layers,
                f"{arch}.feed_forward_length": cfg.hidden_dim,
                f"{arch}.attention.head_count": cfg.n_heads,
                f"{arch}.attention.head_count_kv": cfg.n_kv_heads,
                f"{arch}.vocab_size": cfg.vocab_size,
                "tokenizer.name": h.tokenizer.name,
                "llmcore.template": h.template,
            },
            "capabilities": ["completion"],
            "modified_at": h.modified_at,
        })  # fmt: skip

    def _generate(self, body: dict) -> None:
        name, h = self._model(body)
        prompt = _field(body, "prompt", str, required=True)
        system = _field(body, "system", str, "")
        raw = _field(body, "raw", bool, False)
        stream = _field(body, "stream", bool, True)
        options = parse_options(body.get("options"))
        self._check_unsupported(name, body)
        head = {"model": name, "created_at": _rfc3339()}
        if not prompt:
            return self._send_json(200, {**head, "response": "", "done": True, "done_reason": "load"})
        if not raw:
            messages = [{"role": "system", "content": system}] if system else []
            prompt = chat_prompt([*messages, {"role": "user", "content": prompt}], h.template)
        completion = Completion.create(h, prompt, options)
        self._respond(completion, stream, lambda piece: {"response": piece}, name)

    def _chat(self, body: dict) -> None:
        name, h = self._model(body)
        messages = parse_messages(_field(body, "messages", list, required=True))
        stream = _field(body, "stream", bool, True)
        options = parse_options(body.get("options"))
        self._check_unsupported(name, body)
        if not messages:
            reply = {"role": "assistant", "content": ""}
            return self._send_json(200, {"model": name, "created_at": _rfc3339(), "message": reply, "done": True,
                                         "done_reason": "load"})  # fmt: skip
        completion = Completion.create(h, chat_prompt(messages, h.template), options)
        self._respond(completion, stream, lambda piece: {"message": {"role": "assistant", "content": piece}}, name)

    @staticmethod
    def _check_unsupported(name: str, body: dict) -> None:
        """Refuse what the model cannot do, with Ollama's status and wording, rather than ignore it."""
        if body.get("tools"):
            raise RequestError(400, f"registry.ollama.ai/library/{name} does not support tools")
        if body.get("think") not in (None, False):
            raise RequestError(400, f'"{name}" does not support thinking')

    def _respond(self, completion: Completion, stream: bool, content, name: str) -> None:
        """Run ``completion``; stream one NDJSON object per piece, or answer once with the whole text."""
        pieces = completion.pieces()
        try:
            if not stream:
                text = "".join(pieces)
                final = {"model": name, "created_at": _rfc3339(), **content(text), "done": True}
                return self._send_json(200, final | completion.stats())
            self._start(200, "application/x-ndjson", chunked=True)
            try:
                for piece in pieces:
                    self._chunk({"model": name, "created_at": _rfc3339(), **content(piece), "done": False})
                final = {"model": name, "created_at": _rfc3339(), **content(""), "done": True}
                self._chunk(final | completion.stats())
            except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError):
                raise
            except Exception as e:  # headers are out: report in the stream, as Ollama does
                log.exception("error while streaming %s", self.path)
                self._chunk({"error": f"{type(e).__name__}: {e}"})
            self.wfile.write(b"0\r\n\r\n")
        finally:
            pieces.close()  # a hung-up client ends its generation here

    # -- I/O ----------------------------------------------------------------------------------------

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._read_chunked()
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True
            raise RequestError(400, "bad Content-Length header") from None
        if not 0 <= length <= MAX_BODY_BYTES:
            self.close_connection = True  # the unread body would be taken for the next request
            raise RequestError(413, f"request body over {MAX_BODY_BYTES} bytes")
        return self.rfile.read(length)

    def _read_chunked(self) -> bytes:
        body = b""
        while True:
            try:
                size = int(self.rfile.readline(64).split(b";")[0], 16)
            except ValueError:
                self.close_connection = True
                raise RequestError(400, "bad chunked request body") from None
            if len(body) + size > MAX_BODY_BYTES:
                self.close_connection = True
                raise RequestError(413, f"request body over {MAX_BODY_BYTES} bytes")
            body += self.rfile.read(size)
            self.rfile.readline(64)  # the CRLF after the chunk (or after the trailers when size is 0)
            if size == 0:
                return body

    @staticmethod
    def _parse_json(body: bytes | None) -> dict:
        if not body or not body.strip():
            raise RequestError(400, "missing request body")
        try:
            obj = json.loads(body, parse_constant=_reject_constant)
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError(400, f"invalid JSON in request body: {e}") from None
        if not isinstance(obj, dict):
            raise RequestError(400, f"request body must be a JSON object, got {_json_type(obj)}")
        return obj

    def _start(self, status: int, content_type: str, length: int | None = None, chunked: bool = False) -> None:
        self._started = True
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(length))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self._start(status, content_type, len(body))
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj, ensure_ascii=False).encode(), "application/json; charset=utf-8")

    def _chunk(self, obj: Any) -> None:
        data = json.dumps(obj, ensure_ascii=False).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _error(self, status: int, message: str) -> None:
        if self._started:  # too late for a status code; drop the connection so the client sees a failure
            self.close_connection = True
            return
        try:
            self._send_json(status, {"error": message})
        except OSError:
            self.close_connection = True


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")  # Python's json would accept NaN and Infinity
