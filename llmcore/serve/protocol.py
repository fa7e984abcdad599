"""What both APIs share: reading a capped JSON body, typed fields, chat messages, JSON-schema constraints, and running
a request on the engine from the event loop (pieces arrive on an asyncio queue; a client that goes away cancels its
sequence)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse

from llmcore.models.generate import SamplingConfig
from llmcore.serve.engine import Finished
from llmcore.serve.engine import Request as Generation
from llmcore.serve.models import ModelHandle, RequestError
from llmcore.serve.structured import Constraint, SchemaError, compile_schema

log = logging.getLogger("llmcore.serve")

MAX_BODY_BYTES = 2**20  # 1 MiB: a request body over this is answered 413
DISCARD_BYTES = 16 * 2**20  # an over-limit body is read and dropped up to here, so the client sees the 413
MAX_DEPTH = 32  # arrays and objects nested deeper than this are refused (400); the APIs need 4 levels
MAX_STOPS = 16  # stop strings per request (the OpenAI API: 4, as OpenAI's)
MAX_STOP_CHARS = 1000  # characters per stop string


async def read_json(request: Request, limit: int) -> dict:
    """The request body as a JSON object; 413 over ``limit`` bytes, 400 for anything that is not a JSON object."""
    body, seen = bytearray(), 0
    try:
        async for chunk in request.stream():
            seen += len(chunk)
            if seen <= limit:
                body += chunk
            elif seen > DISCARD_BYTES:
                break
    except ClientDisconnect:
        raise RequestError(400, "the client closed the request body early") from None
    if seen > limit:
        raise RequestError(413, f"request body over {limit} bytes", code="request_too_large")
    if not body.strip():
        raise RequestError(400, "missing request body")
    try:
        obj = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(400, f"invalid JSON in request body: {e}") from None
    except RecursionError:  # the parser recurses per level: 100,000 '[' exhaust the stack
        obj = _DEEP
    if obj is _DEEP or _too_deep(obj):
        raise RequestError(400, f"request body nested deeper than {MAX_DEPTH} levels")
    if not isinstance(obj, dict):
        raise RequestError(400, f"request body must be a JSON object, got {json_type(obj)}")
    return obj


_DEEP = object()


def _too_deep(value: Any) -> bool:
    """Whether ``value`` nests arrays/objects deeper than :data:`MAX_DEPTH` (walked without recursion)."""
    level = [value]
    for _ in range(MAX_DEPTH + 1):
        level = [v for x in level if isinstance(x, (list, dict)) for v in (x.values() if isinstance(x, dict) else x)]
        if not level:
            return False
    return True


def shown(value: Any, limit: int = 60) -> str:
    """``value`` as JSON for an error message, cut to ``limit`` characters (an error stays one short line)."""
    text = json.dumps(value)  # ASCII: a lone surrogate from a \\ud800 escape stays printable
    return text if len(text) <= limit else text[: limit - 3] + "..."


def named(value: str, limit: int = 60) -> str:
    """A name from a request as an error message quotes it: as given when printable and short, else as
    :func:`shown` writes it (escaped, cut), so the message stays one line."""
    return value if value.isprintable() and len(value) <= limit else shown(value, limit)


def json_endpoint(
    handler: Callable[[dict], Awaitable[Response]], max_body: int, render: Callable[[RequestError], Response]
) -> Callable[[Request], Awaitable[Response]]:
    """A route that reads a JSON body, runs ``handler`` on it and renders a :class:`RequestError` in the API's
    shape. A client that hangs up before a (non-streamed) answer is ready cancels the work, and its sequence."""

    async def route(request: Request) -> Response:
        try:
            body = await read_json(request, max_body)
        except RequestError as e:
            return render(e)
        work = asyncio.ensure_future(handler(body))
        gone = asyncio.ensure_future(_disconnected(request))
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            work.cancel()
            log.info("%s %s: the client hung up before the answer", request.method, request.url.path)
            return Response(status_code=499)  # nobody reads it
        gone.cancel()
        try:
            return work.result()
        except RequestError as e:
            return render(e)

    return route


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")  # Python's json would accept NaN and Infinity


def json_type(value: Any) -> str:
    names = {str: "a string", bool: "a boolean", int: "a number", float: "a number", list: "an array"}
    return "null" if value is None else names.get(type(value), "an object")


def field(
    body: dict, name: str, kind: type | tuple[type, ...], default: Any = None, required: bool = False, where: str = ""
) -> Any:
    """``body[name]`` if it has type ``kind``; missing/null -> ``default``; else a 400 naming the field."""
    value = body.get(name)
    label = where + name
    if value is None:
        if required:
            raise RequestError(400, f"{label} is required", param=label)
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = any(isinstance(value, k) and not (k in (int, float) and isinstance(value, bool)) for k in kinds)
    if ok and isinstance(value, float) and not math.isfinite(value):
        ok = False
    if not ok:
        expected = {
            str: "a string",
            bool: "a boolean",
            list: "an array",
            dict: "an object",
            int: "an integer",
            float: "a number",
        }
        raise RequestError(
            400, f"{label} must be {' or '.join(expected[k] for k in kinds)}, got {json_type(value)}", param=label
        )
    return value


def number(body: dict, name: str, where: str = "", integer: bool = False) -> float | int | None:
    """A finite number (an integer when ``integer``) or None; a 400 naming the field otherwise."""
    value = body.get(name)
    label = where + name
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(400, f"{label} must be a number, got {shown(value)}", param=label)
    if integer:
        if value != int(value):
            raise RequestError(400, f"{label} must be an integer, got {value!r}", param=label)
        if not -(2**64) < value < 2**64:  # (1e300 is an integer of 300 digits)
            raise RequestError(
                400, f"{label} must be an integer of at most 64 bits, got {shown(value, 30)}", param=label
            )
        return int(value)
    return float(value)


def stop_strings(value: Any, label: str, most: int = MAX_STOPS) -> list[str]:
    """Stop strings: a string or a list of strings, at most ``most`` of at most :data:`MAX_STOP_CHARS`
    characters each (400 naming the limit)."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise RequestError(400, f"{label} must be a string or a list of strings, got {shown(value)}", param=label)
    if len(value) > most:
        raise RequestError(400, f"{label} takes at most {most} strings, got {len(value)}", param=label)
    longest = max(value, key=len, default="")
    if len(longest) > MAX_STOP_CHARS:
        raise RequestError(
            400,
            f"{label}: a stop string has at most {MAX_STOP_CHARS} characters, got one of {len(longest)}",
            param=label,
        )
    return [s for s in value if s]


def parse_messages(raw: list) -> list[dict[str, str]]:
    """Chat messages as ``{"role", "content"}`` dicts. OpenAI's content parts are joined when all are text."""
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"]:
            raise RequestError(400, f"messages[{i}] must be an object with a string 'role'", param=f"messages[{i}]")
        content = m.get("content")
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            content = "".join(str(p.get("text", "")) for p in content)
        if content is not None and not isinstance(content, str):
            raise RequestError(
                400, f"messages[{i}].content must be a string, got {json_type(content)}", param=f"messages[{i}].content"
            )
        messages.append({"role": m["role"], "content": content or ""})
    return messages


async def embed_inputs(handle: ModelHandle, inputs: list[list[int]]) -> list[list[float]]:
    """Embeddings of token-id inputs (:meth:`ModelHandle.embed`), computed off the event loop."""
    if not inputs:
        return []
    vectors = await asyncio.to_thread(handle.embed, inputs)
    return vectors.tolist()


class Stream(StreamingResponse):
    """A streamed response whose generator is always closed (its ``finally`` cancels the sequence), and a client
    that hangs up is not an error."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except (ClientDisconnect, OSError):
            pass
        finally:
            await self.body_iterator.aclose()


async def collect(events: AsyncIterator[list[str | Finished]]) -> tuple[str, Finished | None]:
    """A non-streamed answer: the whole text and the final event (None if the stream ended without one)."""
    pieces, done = [], None
    try:
        async for batch in events:
            for event in batch:
                if isinstance(event, Finished):
                    done = event
                else:
                    pieces.append(event)
    finally:
        await events.aclose()
    return "".join(pieces), done


async def json_constraint(handle: ModelHandle, schema: dict | None, label: str) -> Constraint | None:
    """A fresh grammar state for ``schema`` on this model (None: no schema); a 400 naming ``label`` and what the
    grammar engine cannot do. Compiling runs off the event loop (a large schema takes a while; it is cached)."""
    if schema is None:
        return None
    vocab = max(handle.model.cfg.vocab_size, handle.tokenizer.vocab_size)
    try:
        grammar = await asyncio.to_thread(compile_schema, schema, handle.tokenizer, vocab, handle.stop_ids)
    except SchemaError as e:
        raise RequestError(400, f"{label}: unsupported JSON schema: {e}", param=label) from None
    return grammar.constraint()


class _Inbox:
    """Wake-ups from the engine thread to one event loop, with one in flight at a time.

    Waking the loop (``call_soon_threadsafe``) writes to its self-pipe: one write per token per stream cost the engine
    thread about a tenth of its time serving 8 streams of a small model. Wake-ups queue here instead, and the loop
    runs them all at its next turn."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.lock = loop, threading.Lock()
        self.waiters: list[asyncio.Future] = []
        self.scheduled = False

    def wake(self, waiter: asyncio.Future) -> None:
        with self.lock:
            self.waiters.append(waiter)
            if self.scheduled:
                return
            self.scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed (the server stopped): nobody is left to read
            with self.lock:
                self.scheduled = False
            raise

    def _drain(self) -> None:
        with self.lock:
            waiters, self.waiters, self.scheduled = self.waiters, [], False
        for waiter in waiters:
            _settle(waiter)  # (one already done: its pause's timer came first, or its stream went away)


class _Pieces:
    """One request's events, from the engine thread to its stream. They collect here, and the event loop is woken
    only when the stream waits for them: a stream pausing between writes (:meth:`take` with ``until``) takes what
    came meanwhile in one go, without a wake-up per token taking the interpreter from the engine."""

    def __init__(self, inbox: _Inbox):
        self.inbox, self.lock = inbox, threading.Lock()
        self.items: list[str | Finished] = []
        self.waiter: asyncio.Future | None = None
        self.wake_on_any = True  # False while pausing: only the answer's end wakes the stream early

    def put(self, event: str | Finished) -> None:
        """(engine thread)"""
        with self.lock:
            self.items.append(event)
            waiter = self.waiter
            if waiter is None or not (self.wake_on_any or isinstance(event, Finished)):
                return
            self.waiter = None
        self.inbox.wake(waiter)

    async def take(self, until: float | None = None) -> list[str | Finished]:
        """The events that came, at least one: at once (``until`` None), or once ``time.perf_counter()`` reaches
        ``until``, or sooner when the answer ends (its last event is never held back)."""
        loop = self.inbox.loop
        while True:
            with self.lock:
                late = until is None or time.perf_counter() >= until
                if self.items and (late or isinstance(self.items[-1], Finished)):
                    items, self.items = self.items, []
                    return items
                self.waiter = waiter = loop.create_future()
                self.wake_on_any = late
            timer = None if late else loop.call_later(until - time.perf_counter(), _settle, waiter)
            try:
                await waiter
            finally:
                if timer is not None:
                    timer.cancel()
                with self.lock:
                    if self.waiter is waiter:
                        self.waiter = None


def _settle(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


_inboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Inbox] = weakref.WeakKeyDictionary()


def _inbox(loop: asyncio.AbstractEventLoop) -> _Inbox:
    inbox = _inboxes.get(loop)
    if inbox is None:
        inbox = _inboxes[loop] = _Inbox(loop)  # (on the loop's own thread: no race to create it)
    return inbox


async def generate(
    handle: ModelHandle,
    prompt_ids: list[int],
    sampling: SamplingConfig,
    stop: list[str],
    what: str,
    constraint: Constraint | None = None,
) -> AsyncIterator[list[str | Finished]]:
    """Run one request on the model's engine; yield its events in batches: text pieces, the last batch ending with
    the :class:`Finished` event.

    The first batch goes out as soon as there is one (time to first token); after that a batch is every event that
    came within ``handle.stream_interval`` of the last batch, or at once when the answer ends (its last batch is
    never held back), or the next event when the interval passed with none. A streaming response writes a batch at
    once, so a stream makes at most one socket write per interval, not one per token: each write lets go of the
    interpreter lock, and getting it back from the engine's thread can cost a thread switch interval. Interval 0:
    every event that had come when the consumer asked for more (one piece while the loop keeps up).

    Leaving early (the client went away, the response task was cancelled) cancels the sequence, so its batch
    slot frees at the next decode step. ``constraint``: sampling limited to a JSON schema (:func:`json_constraint`).
    """
    pieces = _Pieces(_inbox(asyncio.get_running_loop()))
    sampling.stop_ids = (*sampling.stop_ids, *handle.stop_ids)
    job = Generation(prompt_ids, sampling, pieces.put, stop=stop, sections=handle.sections, constraint=constraint)
    handle.engine.submit(job)
    done, written = False, None
    try:
        while not done:
            # the first piece at once, then at most one write per interval (ModelHandle.stream_interval)
            batch = await pieces.take(None if written is None else written + handle.stream_interval)
            end = batch[-1]  # the engine sends nothing after Finished
            if isinstance(end, Finished):
                done = True
                if end.reason == "error":
                    if len(batch) > 1:
                        yield batch[:-1]
                    raise RuntimeError(end.error)
            yield batch
            written = time.perf_counter()
    finally:
        if not done:
            job.cancel()
            log.info("%s: the client hung up; its sequence was cancelled", what)
