"""OpenAI's API (platform.openai.com/docs/api-reference), checked against the official ``openai`` client.

    GET  /v1/models              the served models
    GET  /v1/models/{model}      one of them
    POST /v1/chat/completions    {"model", "messages", ...}: the conversation through the model's prompt template
    POST /v1/completions         {"model", "prompt", ...}: the prompt as given (no template)
    POST /v1/embeddings          {"model", "input", "encoding_format"?}: one normalised vector per input

Parameters honoured: ``temperature`` (default 1), ``top_p`` (1), ``max_tokens`` (or ``max_completion_tokens``;
chat default: the rest of the context, completions default: 16, as OpenAI's), ``stop`` (up to 4 strings), ``seed``,
``n`` (1 only), ``stream`` with ``stream_options.include_usage``. Streams are server-sent events: one
``chat.completion.chunk`` (or ``text_completion``) per piece, a last chunk with ``finish_reason`` (``stop`` or
``length``), then ``data: [DONE]``. Answers carry ``usage`` token counts.

``response_format``: ``{"type": "json_object"}`` (one JSON object) or ``{"type": "json_schema", "json_schema":
{"name", "schema", "strict"?}}`` constrains sampling (:mod:`llmcore.serve.structured`), so the openai SDK's
``chat.completions.parse(response_format=PydanticModel)`` gets output that validates. The schema is enforced
whether ``strict`` is true or not (a boolean), read as strict mode reads it: an object that lists ``properties``
takes no others unless it says so. A schema feature the grammar engine lacks is a 400 naming it; a reply whose
``max_tokens`` ends mid-object has ``finish_reason: "length"``.

Embeddings: the final hidden states mean-pooled over each input's tokens, L2-normalised; ``input`` is a string,
a list of strings, a list of token ids or a list of those; ``encoding_format`` ``float`` or ``base64`` (the
openai SDK's default: little-endian float32); ``usage`` counts the input tokens. An input over the context is a
400, as OpenAI's.

What this server cannot do is refused with 400 naming the field, never ignored: ``n`` > 1, ``tools``,
``logprobs``, non-zero ``frequency_penalty``/``presence_penalty``, ``suffix``, ``echo``. A prompt whose tokens plus
``max_tokens`` exceed the context is refused with 400 and code ``context_length_exceeded``, as OpenAI does (the
Ollama API truncates instead).
"""

from __future__ import annotations

import base64
import json
import secrets
import struct
import time
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from llmcore.models.generate import SamplingConfig
from llmcore.serve.engine import Finished
from llmcore.serve.models import ModelHandle, RequestError, qualify
from llmcore.serve.protocol import (
    Stream,
    collect,
    embed_inputs,
    field,
    generate,
    json_constraint,
    json_endpoint,
    named,
    number,
    parse_messages,
    shown,
    stop_strings,
)
from llmcore.serve.structured import ANY_OBJECT

ERROR_TYPES = {
    400: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "server_error",
}


def error_response(e: RequestError) -> JSONResponse:
    error = {
        "message": str(e),
        "type": ERROR_TYPES.get(e.status, "invalid_request_error"),
        "param": e.param,
        "code": e.code,
    }
    return JSONResponse({"error": error}, status_code=e.status)


MAX_EMBEDDING_INPUTS = 2048  # inputs per embeddings request, as OpenAI's


def _id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


class OpenAIAPI:
    def __init__(self, models: dict[str, ModelHandle], max_body: int):
        self.models, self.max_body = models, max_body

    def routes(self) -> list[Route]:
        return [
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.get_model, methods=["GET"]),
            Route("/v1/chat/completions", self.endpoint(self.chat), methods=["POST"]),
            Route("/v1/completions", self.endpoint(self.completions), methods=["POST"]),
            Route("/v1/embeddings", self.endpoint(self.embeddings), methods=["POST"]),
        ]

    def endpoint(self, handler: Callable) -> Callable:
        return json_endpoint(handler, self.max_body, error_response)

    def lookup(self, name: str) -> tuple[str, ModelHandle]:
        for candidate in (name, qualify(name)):
            if candidate in self.models:
                return candidate, self.models[candidate]
        raise RequestError(404, f"The model `{named(name)}` does not exist", param="model", code="model_not_found")

    @staticmethod
    def card(name: str, h: ModelHandle) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": h.created, "owned_by": "llmcore"}

    async def list_models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self.card(n, h) for n, h in sorted(self.models.items())]})

    async def get_model(self, request: Request) -> Response:
        try:
            name, h = self.lookup(request.path_params["model"])
        except RequestError as e:
            return error_response(e)
        return JSONResponse(self.card(name, h))

    # -- requests -----------------------------------------------------------------------------------

    @staticmethod
    def stop(body: dict) -> list[str]:
        return stop_strings(body.get("stop"), "stop", most=4)

    @staticmethod
    def refuse_unsupported(body: dict) -> None:
        n = number(body, "n", integer=True)
        if n is not None and n != 1:
            raise RequestError(400, f"n={n} is not supported: one choice per request", param="n")
        for name in ("tools", "functions", "logprobs", "top_logprobs", "echo", "suffix", "logit_bias"):
            if body.get(name) not in (None, False, [], {}, ""):
                raise RequestError(400, f"{name} is not supported by this server", param=name)
        for name in ("frequency_penalty", "presence_penalty"):
            if number(body, name) not in (None, 0.0):
                raise RequestError(400, f"{name} is not supported by this server (only 0)", param=name)

    @staticmethod
    def response_schema(body: dict) -> dict | None:
        """The JSON schema ``response_format`` asks for (None: plain text); a 400 naming the field otherwise."""
        fmt = field(body, "response_format", dict)
        kind = None if fmt is None else fmt.get("type")
        if kind in (None, "text"):
            return None
        if kind == "json_object":
            return ANY_OBJECT
        if kind != "json_schema":
            raise RequestError(
                400,
                f"response_format.type must be 'text', 'json_object' or 'json_schema', got {shown(kind)}",
                param="response_format.type",
            )
        spec = field(fmt, "json_schema", dict, required=True, where="response_format.")
        field(spec, "name", str, required=True, where="response_format.json_schema.")
        schema = field(spec, "schema", dict, ANY_OBJECT, where="response_format.json_schema.")
        field(spec, "strict", bool, where="response_format.json_schema.")  # enforced either way: checked, not used
        return schema

    def sampling(
        self, body: dict, prompt_tokens: int, context_length: int, default_max: int | None, where: str
    ) -> SamplingConfig:
        temperature = number(body, "temperature")
        top_p = number(body, "top_p")
        seed = number(body, "seed", integer=True)
        max_tokens = number(body, "max_completion_tokens", integer=True)
        if max_tokens is None:
            max_tokens = number(body, "max_tokens", integer=True)
        for name, value, low, high in (("temperature", temperature, 0, 2), ("top_p", top_p, 0, 1)):
            if value is not None and not low <= value <= high:
                raise RequestError(400, f"{name} must be between {low} and {high}, got {value}", param=name)
        if max_tokens is not None and max_tokens < 1:
            raise RequestError(400, f"max_tokens must be >= 1, got {max_tokens}", param="max_tokens")
        room = context_length - prompt_tokens
        wanted = max_tokens if max_tokens is not None else (default_max or 1)
        if prompt_tokens >= context_length or wanted > room:
            raise RequestError(
                400,
                f"This model's maximum context length is {context_length} tokens. However, you requested "
                f"{prompt_tokens + wanted} tokens ({prompt_tokens} in the {where}, {wanted} in the completion). "
                f"Please reduce the length of the {where} or completion.",
                param=where,
                code="context_length_exceeded",
            )
        if max_tokens is None:
            max_tokens = default_max or room
        temperature = 1.0 if temperature is None else temperature
        top_p = None if top_p is None or top_p >= 1 else top_p
        if top_p is not None and top_p <= 0:
            top_p, top_k = None, 1
        else:
            top_k = None
        seed = secrets.randbits(63) if seed is None else seed % 2**64
        return SamplingConfig(max_tokens, temperature, top_k, top_p, seed=seed)

    async def chat(self, body: dict) -> Response:
        name, h = self.lookup(field(body, "model", str, required=True))
        messages = parse_messages(field(body, "messages", list, required=True))
        if not messages:
            raise RequestError(400, "messages must not be empty", param="messages")
        stream = field(body, "stream", bool, False)
        stop = self.stop(body)
        self.refuse_unsupported(body)
        schema = self.response_schema(body)
        ids = h.chat_ids(messages)
        sampling = self.sampling(body, len(ids), h.context_length, None, "messages")
        return await self.respond(body, name, h, ids, sampling, stop, stream, chat=True, schema=schema)

    async def completions(self, body: dict) -> Response:
        name, h = self.lookup(field(body, "model", str, required=True))
        prompt = field(body, "prompt", (str, list), required=True)
        if isinstance(prompt, list):
            if len(prompt) != 1 or not isinstance(prompt[0], str):
                raise RequestError(400, "prompt must be a string (or a list of one string)", param="prompt")
            prompt = prompt[0]
        stream = field(body, "stream", bool, False)
        stop = self.stop(body)
        self.refuse_unsupported(body)
        schema = self.response_schema(body)
        ids = h.encode(prompt)
        if not ids:
            raise RequestError(400, "prompt must not be empty", param="prompt")
        sampling = self.sampling(body, len(ids), h.context_length, 16, "prompt")
        return await self.respond(body, name, h, ids, sampling, stop, stream, chat=False, schema=schema)

    async def respond(
        self,
        body: dict,
        name: str,
        h: ModelHandle,
        ids: list[int],
        sampling: SamplingConfig,
        stop: list[str],
        stream: bool,
        chat: bool,
        schema: dict | None = None,
    ) -> Response:
        constraint = await json_constraint(h, schema, "response_format")
        events = generate(h, ids, sampling, stop, what=name, constraint=constraint)
        head = {
            "id": _id("chatcmpl" if chat else "cmpl"),
            "created": int(time.time()),
            "model": name,
            "system_fingerprint": f"llmcore-{h.digest[:12]}",
        }
        finish = {"stop": "stop", "length": "length"}

        def usage(done: Finished) -> dict[str, int]:
            return {
                "prompt_tokens": done.prompt_tokens,
                "completion_tokens": done.completion_tokens,
                "total_tokens": done.prompt_tokens + done.completion_tokens,
            }

        if not stream:
            text, done = await collect(events)
            if chat:
                choice = {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": finish.get(done.reason, "stop"),
                }
                kind = "chat.completion"
            else:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish.get(done.reason, "stop")}
                kind = "text_completion"
            return JSONResponse({**head, "object": kind, "choices": [choice], "usage": usage(done)})

        options = field(body, "stream_options", dict, {})
        include_usage = bool(options.get("include_usage"))
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, reason: str | None, first: bool = False) -> str:
            if chat:
                d = {"role": "assistant", "content": ""} if first else ({} if delta is None else {"content": delta})
                choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": reason}
            obj = {**head, "object": kind, "choices": [choice]}
            if include_usage:
                obj["usage"] = None
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        async def sse():
            try:
                if chat:
                    yield chunk(None, None, first=True)
                async for batch in events:  # one write per batch (see protocol.generate)
                    out = []
                    for event in batch:
                        if isinstance(event, Finished):
                            out.append(chunk(None, finish.get(event.reason, "stop")))
                            if include_usage:
                                obj = {**head, "object": kind, "choices": [], "usage": usage(event)}
                                out.append(f"data: {json.dumps(obj)}\n\n")
                        else:
                            out.append(chunk(event, None))
                    yield "".join(out)
            except RuntimeError as e:  # headers are out: an error event, as OpenAI streams do
                yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error'}})}\n\n"
            finally:
                await events.aclose()
            yield "data: [DONE]\n\n"

        return Stream(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # -- embeddings ---------------------------------------------------------------------------------

    @staticmethod
    def embedding_inputs(h: ModelHandle, raw: Any) -> list[list[int]]:
        """Token ids of each input: a string, a list of strings, a list of ids, or a list of lists of ids."""
        if isinstance(raw, str) or (isinstance(raw, list) and raw and all(_is_id(t) for t in raw)):
            raw = [raw]
        if not isinstance(raw, list) or not raw:
            raise RequestError(400, f"input must be a string or a non-empty array, got {shown(raw)}", param="input")
        if len(raw) > MAX_EMBEDDING_INPUTS:
            raise RequestError(400, f"input takes at most {MAX_EMBEDDING_INPUTS} items, got {len(raw)}", param="input")
        out = []
        for i, item in enumerate(raw):
            if isinstance(item, str):
                ids = h.encode(item)
            elif isinstance(item, list) and all(_is_id(t) for t in item):
                ids = item
                bad = next((t for t in ids if t >= h.tokenizer.vocab_size), None)
                if bad is not None:
                    raise RequestError(
                        400,
                        f"input[{i}]: token id {bad} is out of range (vocabulary of {h.tokenizer.vocab_size})",
                        param="input",
                    )
            else:
                raise RequestError(
                    400, f"input[{i}] must be a string or an array of token ids, got {shown(item)}", param="input"
                )
            if not ids:
                raise RequestError(400, f"input[{i}] is empty", param="input")
            if len(ids) > h.context_length:
                raise RequestError(
                    400,
                    f"This model's maximum context length is {h.context_length} tokens, however "
                    f"input[{i}] has {len(ids)} tokens. Please reduce the length of the input.",
                    param="input",
                    code="context_length_exceeded",
                )
            out.append(ids)
        return out

    async def embeddings(self, body: dict) -> Response:
        name, h = self.lookup(field(body, "model", str, required=True))
        if body.get("input") is None:
            raise RequestError(400, "input is required", param="input")
        encoding = field(body, "encoding_format", str, "float")
        if encoding not in ("float", "base64"):
            raise RequestError(
                400, f"encoding_format must be 'float' or 'base64', got {shown(encoding)}", param="encoding_format"
            )
        dimensions = number(body, "dimensions", integer=True)
        if dimensions not in (None, h.model.cfg.emb_dim):
            raise RequestError(
                400,
                f"dimensions={dimensions} is not supported: {name} embeds in {h.model.cfg.emb_dim} dimensions",
                param="dimensions",
            )
        ids = self.embedding_inputs(h, body["input"])
        vectors = await embed_inputs(h, ids)
        if encoding == "base64":  # little-endian float32, as OpenAI sends it
            vectors = [base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode("ascii") for v in vectors]
        data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
        tokens = sum(map(len, ids))
        return JSONResponse(
            {"object": "list", "data": data, "model": name, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        )


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
