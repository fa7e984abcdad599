"""OpenAI's API (platform.openai.com/docs/api-reference), checked against the official ``openai`` client.

    GET  /v1/models              the served models
    GET  /v1/models/{model}      one of them
    POST /v1/chat/completions    {"model", "messages", ...}: the conversation through the model's prompt template
    POST /v1/completions         {"model", "prompt", ...}: the prompt as given (no template)

Parameters honoured: ``temperature`` (default 1), ``top_p`` (1), ``max_tokens`` (or ``max_completion_tokens``;
chat default: the rest of the context, completions default: 16, as OpenAI's), ``stop`` (up to 4 strings), ``seed``,
``n`` (1 only), ``stream`` with ``stream_options.include_usage``. Streams are server-sent events: one
``chat.completion.chunk`` (or ``text_completion``) per piece, a last chunk with ``finish_reason`` (``stop`` or
``length``), then ``data: [DONE]``. Answers carry ``usage`` token counts.

What this server cannot do is refused with 400 naming the field, never ignored: ``n`` > 1, JSON modes of
``response_format``, ``tools``, ``logprobs``, non-zero ``frequency_penalty``/``presence_penalty``, ``suffix``,
``echo``. A prompt whose tokens plus ``max_tokens`` exceed the context is refused with 400 and code
``context_length_exceeded``, as OpenAI does (the Ollama API truncates instead).
"""

from __future__ import annotations

import json
import secrets
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
    field,
    generate,
    json_endpoint,
    number,
    parse_messages,
    shown,
    stop_strings,
)

ERROR_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error",
               413: "invalid_request_error", 500: "server_error"}  # fmt: skip


def error_response(e: RequestError) -> JSONResponse:
    error = {"message": str(e), "type": ERROR_TYPES.get(e.status, "invalid_request_error"), "param": e.param,
             "code": e.code}  # fmt: skip
    return JSONResponse({"error": error}, status_code=e.status)


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
        ]

    def endpoint(self, handler: Callable) -> Callable:
        return json_endpoint(handler, self.max_body, error_response)

    def lookup(self, name: str) -> tuple[str, ModelHandle]:
        for candidate in (name, qualify(name)):
            if candidate in self.models:
                return candidate, self.models[candidate]
        raise RequestError(404, f"The model `{name}` does not exist", param="model", code="model_not_found")

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
        fmt = field(body, "response_format", dict)
        if fmt is not None and fmt.get("type") not in (None, "text"):
            raise RequestError(400, f"response_format {shown(fmt.get('type'))} is not supported: llmcore "
                               "does not constrain sampling to JSON", param="response_format")  # fmt: skip
        for name in ("tools", "functions", "logprobs", "top_logprobs", "echo", "suffix", "logit_bias"):
            if body.get(name) not in (None, False, [], {}, ""):
                raise RequestError(400, f"{name} is not supported by this server", param=name)
        for name in ("frequency_penalty", "presence_penalty"):
            if number(body, name) not in (None, 0.0):
                raise RequestError(400, f"{name} is not supported by this server (only 0)", param=name)

    def sampling(self, body: dict, prompt_tokens: int, context_length: int, default_max: int | None,
                 where: str) -> SamplingConfig:  # fmt: skip
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
        ids = h.chat_ids(messages)
        sampling = self.sampling(body, len(ids), h.context_length, None, "messages")
        return await self.respond(body, name, h, ids, sampling, stop, stream, chat=True)

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
        ids = h.encode(prompt)
        if not ids:
            raise RequestError(400, "prompt must not be empty", param="prompt")
        sampling = self.sampling(body, len(ids), h.context_length, 16, "prompt")
        return await self.respond(body, name, h, ids, sampling, stop, stream, chat=False)

    async def respond(self, body: dict, name: str, h: ModelHandle, ids: list[int], sampling: SamplingConfig,
                      stop: list[str], stream: bool, chat: bool) -> Response:  # fmt: skip
        events = generate(h, ids, sampling, stop, what=name)
        head = {"id": _id("chatcmpl" if chat else "cmpl"), "created": int(time.time()), "model": name,
                "system_fingerprint": f"llmcore-{h.digest[:12]}"}  # fmt: skip
        finish = {"stop": "stop", "length": "length"}

        def usage(done: Finished) -> dict[str, int]:
            return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                    "total_tokens": done.prompt_tokens + done.completion_tokens}  # fmt: skip

        if not stream:
            text, done = await collect(events)
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                          "finish_reason": finish.get(done.reason, "stop")}  # fmt: skip
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
                async for event in events:
                    if isinstance(event, Finished):
                        yield chunk(None, finish.get(event.reason, "stop"))
                        if include_usage:
                            obj = {**head, "object": kind, "choices": [], "usage": usage(event)}
                            yield f"data: {json.dumps(obj)}\n\n"
                    else:
                        yield chunk(event, None)
            except RuntimeError as e:  # headers are out: an error event, as OpenAI streams do
                yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error'}})}\n\n"
            finally:
                await events.aclose()
            yield "data: [DONE]\n\n"

        return Stream(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
