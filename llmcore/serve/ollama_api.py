"""Ollama's API (github.com/ollama/ollama ``docs/api.md``), checked against the official ``ollama`` client.

    GET  /api/version    {"version": ...}
    GET  /api/tags       the served models; ``digest`` is the sha256 of model.safetensors
    GET  /api/ps         the same models, as loaded ones (all are, for the server's lifetime)
    POST /api/show       details, ``model_info`` (architecture numbers), template
    POST /api/generate   {"model", "prompt", "system"?, "raw"?, "stream"?, "options"?, "format"?}
    POST /api/chat       {"model", "messages", "stream"?, "options"?, "format"?}
    POST /api/embed      {"model", "input": text or [texts], "truncate"?}: {"embeddings": [[...], ...]}
    POST /api/embeddings {"model", "prompt"}: {"embedding": [...]} (the older endpoint)

``stream`` defaults to true: one NDJSON object per text piece, then a final ``"done": true`` object with the
counts and durations (nanoseconds); with ``"stream": false`` one object holds the whole text. Options honoured:
``temperature`` (default 0.8), ``top_k`` (40), ``top_p`` (0.9), ``seed`` (random when absent or negative),
``num_predict`` (-1: until the context is full), ``num_ctx`` (the context window, at most the model's) and
``stop``. A prompt longer than the window is truncated as Ollama does: it keeps its last ``num_ctx / 2``
tokens (the rest of the window is room for the reply), a warning is logged, and ``prompt_eval_count`` says how
many tokens were evaluated. ``format``: ``"json"`` (one JSON object) or a JSON schema (``Model.model_json_schema()``)
constrains sampling to it (:mod:`llmcore.serve.structured`; an object that lists ``properties`` takes no others
unless it says so, as in Ollama); a schema feature the grammar engine lacks is a 400 naming it, and a reply whose
``num_predict`` ends mid-object has ``"done_reason": "length"``.
Embeddings are the final hidden states mean-pooled over the input's tokens and L2-normalised (both endpoints); an
input over the context is cut to it (``"truncate": false``: a 400 instead); ``/api/show`` lists the capabilities
``completion`` and ``embedding``. ``tools`` and ``think`` are refused with Ollama's own messages. As in Ollama,
``"prompt": ""`` (or ``"messages": []``) only answers ``"done_reason": "load"``.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from llmcore import __version__
from llmcore.models.generate import SamplingConfig
from llmcore.serve.engine import Finished
from llmcore.serve.models import ModelHandle, RequestError, qualify, rfc3339
from llmcore.serve.protocol import (
    Stream,
    collect,
    embed_inputs,
    field,
    generate,
    json_constraint,
    json_endpoint,
    json_type,
    named,
    number,
    parse_messages,
    shown,
    stop_strings,
)
from llmcore.serve.structured import ANY_OBJECT
from llmcore.text.chat_templates import ollama_template
from llmcore.text.chat_templates import stop_strings as template_stops

log = logging.getLogger("llmcore.serve")

OLLAMA_API_VERSION = "0.6.0"  # what /api/version reports: the Ollama API level these endpoints follow


def error_response(e: RequestError) -> JSONResponse:
    return JSONResponse({"error": str(e)}, status_code=e.status)


def sampling_from_options(raw: Any, context_length: int) -> tuple[SamplingConfig, list[str], int]:
    """``(sampling, stop strings, num_ctx)`` from the ``options`` object; Ollama's defaults; 400 naming a bad one."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RequestError(400, f"options must be a JSON object, got {json_type(raw)}")
    where = "option "
    temperature = number(raw, "temperature", where)
    top_p = number(raw, "top_p", where)
    top_k = number(raw, "top_k", where, integer=True)
    seed = number(raw, "seed", where, integer=True)
    num_predict = number(raw, "num_predict", where, integer=True)
    num_ctx = number(raw, "num_ctx", where, integer=True)
    stop = stop_strings(raw.get("stop"), "option stop")
    temperature = 0.8 if temperature is None else temperature
    top_k = 40 if top_k is None else top_k
    top_p = 0.9 if top_p is None else top_p
    top_k = top_k if top_k > 0 else None  # <= 0: no top-k
    top_p = top_p if top_p < 1 else None  # >= 1: no nucleus filtering
    if top_p is not None and top_p <= 0:  # an empty nucleus keeps the top token, as llama.cpp does
        top_k, top_p = 1, None
    if num_ctx is not None and num_ctx < 2:
        raise RequestError(400, f"option num_ctx must be >= 2, got {num_ctx}")
    window = min(num_ctx or context_length, context_length)
    seed = seed if seed is not None and seed >= 0 else secrets.randbits(63)
    max_new = num_predict if num_predict is not None and num_predict >= 0 else window
    return SamplingConfig(max_new, temperature, top_k, top_p, seed=seed % 2**64), stop, window


def schema_from_format(value: Any) -> dict | None:
    """The JSON schema ``format`` asks for: ``"json"`` any JSON object, an object a schema, ``""``/null none."""
    if value in (None, ""):
        return None
    if value == "json":
        return ANY_OBJECT
    if isinstance(value, dict):
        return value
    raise RequestError(400, f'format must be "json" or a JSON schema object, got {shown(value)}')


def fit_window(ids: list[int], window: int, name: str) -> list[int]:
    """Ollama's truncation: a prompt that leaves no room in the window keeps its last ``window // 2`` tokens."""
    if len(ids) < window:
        return ids
    kept = ids[-(window // 2) :]
    log.warning("%s: truncating input prompt: limit=%d prompt=%d new=%d", name, window, len(ids), len(kept))
    return kept


class OllamaAPI:
    def __init__(self, models: dict[str, ModelHandle], max_body: int):
        self.models, self.max_body = models, max_body

    def routes(self) -> list[Route]:
        return [
            Route("/api/version", self.version, methods=["GET"]),
            Route("/api/tags", self.tags, methods=["GET"]),
            Route("/api/ps", self.ps, methods=["GET"]),
            Route("/api/show", self.endpoint(self.show), methods=["POST"]),
            Route("/api/generate", self.endpoint(self.generate), methods=["POST"]),
            Route("/api/chat", self.endpoint(self.chat), methods=["POST"]),
            Route("/api/embed", self.endpoint(self.embed), methods=["POST"]),
            Route("/api/embeddings", self.endpoint(self.embeddings), methods=["POST"]),
        ]

    def endpoint(self, handler: Callable) -> Callable:
        return json_endpoint(handler, self.max_body, error_response)

    def model(self, body: dict, key: str = "model") -> tuple[str, ModelHandle]:
        name = field(body, key, str, required=True)
        if not name:
            raise RequestError(400, f"{key} is required")
        for candidate in (name, qualify(name)):
            if candidate in self.models:
                return candidate, self.models[candidate]
        raise RequestError(404, f"model '{named(name)}' not found")

    # -- listings -----------------------------------------------------------------------------------

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": OLLAMA_API_VERSION, "llmcore": __version__})

    async def tags(self, request: Request) -> Response:
        return JSONResponse({"models": [self.listing(n, h, running=False) for n, h in sorted(self.models.items())]})

    async def ps(self, request: Request) -> Response:
        return JSONResponse({"models": [self.listing(n, h, running=True) for n, h in sorted(self.models.items())]})

    @staticmethod
    def listing(name: str, h: ModelHandle, running: bool) -> dict[str, Any]:
        entry = {"name": name, "model": name, "size": h.size, "digest": h.digest, "details": h.details()}
        if running:
            on_gpu = h.model.tok_emb.weight.device.type != "cpu"
            entry |= {"expires_at": "9999-12-31T23:59:59Z", "size_vram": h.size if on_gpu else 0}
            entry["context_length"] = h.context_length
        else:
            entry["modified_at"] = h.modified_at
        return entry

    async def show(self, body: dict) -> Response:
        name, h = self.model(body, "model" if "model" in body else "name")
        cfg, arch = h.model.cfg, h.family
        template = ollama_template(h.template)  # the Go template that builds the prompts this server builds
        parameters = "\n".join(f"stop {json.dumps(s)}" for s in template_stops(h.template))
        return JSONResponse(
            {
                "license": "",
                "modelfile": f'# served by llmcore\nFROM {name}\nTEMPLATE """{template}"""\n',
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
                "capabilities": ["completion", "embedding"],
                "modified_at": h.modified_at,
            }
        )

    # -- generation ---------------------------------------------------------------------------------

    async def generate(self, body: dict) -> Response:
        name, h = self.model(body)
        prompt = field(body, "prompt", str, required=True)
        system = field(body, "system", str, "")
        raw = field(body, "raw", bool, False)
        stream = field(body, "stream", bool, True)
        sampling, stop, window = sampling_from_options(body.get("options"), h.context_length)
        self.check_unsupported(name, body)
        schema = schema_from_format(body.get("format"))
        if not prompt:
            return JSONResponse(
                {"model": name, "created_at": rfc3339(), "response": "", "done": True, "done_reason": "load"}
            )
        if raw:
            ids = h.encode(prompt)
        else:
            messages = [{"role": "system", "content": system}] if system else []
            ids = h.chat_ids([*messages, {"role": "user", "content": prompt}])
        return await self.respond(name, h, ids, sampling, stop, window, stream, lambda t: {"response": t}, schema)

    async def chat(self, body: dict) -> Response:
        name, h = self.model(body)
        messages = parse_messages(field(body, "messages", list, required=True))
        stream = field(body, "stream", bool, True)
        sampling, stop, window = sampling_from_options(body.get("options"), h.context_length)
        self.check_unsupported(name, body)
        schema = schema_from_format(body.get("format"))
        if not messages:
            reply = {"role": "assistant", "content": ""}
            return JSONResponse(
                {"model": name, "created_at": rfc3339(), "message": reply, "done": True, "done_reason": "load"}
            )
        ids = h.chat_ids(messages)
        return await self.respond(
            name,
            h,
            ids,
            sampling,
            stop,
            window,
            stream,
            lambda t: {"message": {"role": "assistant", "content": t}},
            schema,
        )

    @staticmethod
    def check_unsupported(name: str, body: dict) -> None:
        """Refuse what the model cannot do, rather than ignore it."""
        if body.get("tools"):
            raise RequestError(400, f"registry.ollama.ai/library/{name} does not support tools")
        if body.get("think") not in (None, False):
            raise RequestError(400, f'"{name}" does not support thinking')

    async def respond(
        self,
        name: str,
        h: ModelHandle,
        ids: list[int],
        sampling: SamplingConfig,
        stop: list[str],
        window: int,
        stream: bool,
        content: Callable[[str], dict],
        schema: dict | None = None,
    ) -> Response:
        if not ids:
            raise RequestError(400, "the prompt is empty")
        ids = fit_window(ids, window, name)
        sampling.max_new_tokens = min(sampling.max_new_tokens, window - len(ids))
        constraint = await json_constraint(h, schema, "format")
        events = generate(h, ids, sampling, stop, what=name, constraint=constraint)

        def stats(done: Finished) -> dict[str, Any]:
            return {
                "done": True,
                "done_reason": done.reason,
                "total_duration": done.total_duration,
                "load_duration": 0,
                "prompt_eval_count": done.prompt_tokens,
                "prompt_eval_duration": done.prompt_eval_duration,
                "eval_count": done.completion_tokens,
                "eval_duration": done.eval_duration,
            }

        if not stream:
            text, done = await collect(events)
            return JSONResponse({"model": name, "created_at": rfc3339(), **content(text), **stats(done)})

        async def lines():
            try:
                async for batch in events:  # one write per batch (see protocol.generate)
                    out = []
                    for event in batch:
                        if isinstance(event, Finished):
                            obj = {"model": name, "created_at": rfc3339(), **content(""), **stats(event)}
                        else:
                            obj = {"model": name, "created_at": rfc3339(), **content(event), "done": False}
                        out.append(json.dumps(obj, ensure_ascii=False) + "\n")
                    yield "".join(out)
            except RuntimeError as e:  # headers are out: report in the stream, as Ollama does
                yield json.dumps({"error": str(e)}) + "\n"
            finally:
                await events.aclose()

        return Stream(lines(), media_type="application/x-ndjson")

    # -- embeddings ---------------------------------------------------------------------------------

    def embed_ids(self, h: ModelHandle, texts: list[str], window: int, truncate: bool, label: str) -> list[list[int]]:
        """Token ids of each text, cut to ``window`` tokens (``truncate``) or refused over it."""
        out = []
        for i, text in enumerate(texts):
            ids = h.encode(text)
            if len(ids) > window:
                if not truncate:
                    raise RequestError(
                        400, f"{label}[{i}]: input length {len(ids)} exceeds maximum context length {window}"
                    )
                ids = ids[:window]
            if not ids:
                raise RequestError(400, f"{label}[{i}] is empty")
            out.append(ids)
        return out

    async def embed(self, body: dict) -> Response:
        name, h = self.model(body)
        raw = body.get("input")
        if isinstance(raw, str):
            raw = [raw]
        if not isinstance(raw, list) or not all(isinstance(t, str) for t in raw):
            raise RequestError(400, f"input must be a string or a list of strings, got {shown(raw)}")
        truncate = field(body, "truncate", bool, True)
        dimensions = number(body, "dimensions", integer=True)
        if dimensions not in (None, h.model.cfg.emb_dim):
            raise RequestError(
                400, f"dimensions {dimensions} is not supported: {name} embeds in {h.model.cfg.emb_dim} dimensions"
            )
        _, _, window = sampling_from_options(body.get("options"), h.context_length)
        start = time.perf_counter_ns()
        ids = self.embed_ids(h, raw, window, truncate, "input")
        vectors = await embed_inputs(h, ids)
        return JSONResponse(
            {
                "model": name,
                "embeddings": vectors,
                "total_duration": time.perf_counter_ns() - start,
                "load_duration": 0,
                "prompt_eval_count": sum(map(len, ids)),
            }
        )

    async def embeddings(self, body: dict) -> Response:
        """The older endpoint: one prompt, one ``embedding`` (empty for an empty prompt, as Ollama's)."""
        name, h = self.model(body)
        prompt = field(body, "prompt", str, "")
        _, _, window = sampling_from_options(body.get("options"), h.context_length)
        if not prompt:
            return JSONResponse({"embedding": []})
        vectors = await embed_inputs(h, self.embed_ids(h, [prompt], window, True, "prompt"))
        return JSONResponse({"embedding": vectors[0]})
