"""What stands between the network and the APIs: which hosts and web pages may talk to the server, how long a
request may take to arrive, how many connections are open at once, and errors below the app in the API's shape.

Host and Origin (:class:`HostGuard`, ASGI middleware). A web page the user visits can point a DNS name of its own
at 127.0.0.1 (DNS rebinding) and script the server as if it were the same site; it cannot change the ``Host``
header, which names its own domain. So a server bound to loopback serves a request only when its ``Host`` is an
IP address (a typed address is never rebound), ``localhost`` or a name under it, the machine's name, or a name
in the allow-list (``--allow-host``, ``LLMCORE_ALLOWED_HOSTS``; ``*`` allows any). A server bound beyond loopback
(``--host 0.0.0.0``) was exposed on purpose and serves any ``Host``, as Ollama does. A browser also says which page
sent a request (``Origin``): pages on loopback, on the bound address and the server's own (the chat page) are
served, others only when allowed (``--allow-origin``, ``LLMCORE_ORIGINS``, like Ollama's ``OLLAMA_ORIGINS``:
origins with ``*`` wildcards), and those get the CORS headers a browser needs. Refusals are 403 in the API's
error shape.

Slow and many connections (:func:`guarded_protocol`, uvicorn's h11 protocol with a deadline and a cap). A request
must arrive whole, headers and body, within ``request_timeout`` seconds of its connection (or of its first byte,
on a kept-alive connection), else 408 and the connection closes: a client dripping bytes (slowloris) holds a
connection that long and no longer. Idle kept-alive connections close after uvicorn's ``timeout_keep_alive``.
Beyond ``max_connections`` open connections a new one is answered 503 at once and closed. Headers over 16 KiB
are 431, broken HTTP 400; all in the API's error shape.

uvicorn's own settings do not do this: ``timeout_keep_alive`` times only the wait between requests (the first byte
of the next one stops it), ``limit_concurrency`` is checked once a request's headers are in (a dripping client
never gets there, yet counts against it, so N of them turn every real request into a 503), and h11's
``max_incomplete_event_size`` caps the bytes of headers still arriving, not the time they take.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import logging
import os
import socket
from collections.abc import Sequence
from http import HTTPStatus

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from llmcore.serve import ollama_api, openai_api
from llmcore.serve.models import RequestError

log = logging.getLogger("llmcore.serve")

REQUEST_TIMEOUT = 30.0  # seconds for a request's headers and body to arrive (408 after)
MAX_CONNECTIONS = 256  # open connections at once (503 beyond)
LINGER = 1.0  # seconds a refused connection stays open to read what the client still sends
MAX_HEADER_BYTES = 16 * 1024  # a request line and headers over this are refused (431), as h11 does while they arrive
HOSTS_ENV = "LLMCORE_ALLOWED_HOSTS"  # more Host names to serve, comma-separated (``*``: any)
ORIGINS_ENV = "LLMCORE_ORIGINS"  # more browser origins to serve, comma-separated, with ``*`` wildcards


def error_response(path: str, status: int, message: str):
    """A :class:`~starlette.responses.JSONResponse` in the shape of the API that ``path`` belongs to."""
    api = openai_api if path.startswith("/v1/") else ollama_api
    return api.error_response(RequestError(status, message))


def split_list(values: Sequence[str] | None, env: str) -> list[str]:
    """Comma- or space-separated entries of ``values`` (a CLI option, repeatable) or else of ``$env``."""
    raw = list(values or []) or [os.environ.get(env, "")]
    return [item for value in raw for item in value.replace(",", " ").split()]


def _hostname(authority: str) -> tuple[str, str]:
    """``(name, port)`` of ``host[:port]`` or ``[v6]:port``, the name lower-cased without a trailing dot."""
    authority = authority.strip().lower()
    if authority.startswith("["):
        name, _, rest = authority[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        name, _, port = authority.rpartition(":") if authority.count(":") == 1 else (authority, "", "")
    return name.rstrip("."), port


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _is_loopback(name: str) -> bool:
    if name == "localhost" or name.endswith(".localhost"):  # RFC 6761: always loopback, never looked up
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class HostGuard:
    """ASGI middleware: serve only the hosts and browser origins described in the module docstring."""

    def __init__(self, app, bound: str = "127.0.0.1", hosts: Sequence[str] = (), origins: Sequence[str] = ()):
        self.app = app
        self.bound = _hostname(bound if not (":" in bound and not bound.startswith("[")) else f"[{bound}]")[0]
        # Bound beyond loopback (0.0.0.0, a LAN address), the server is exposed on purpose: whoever reaches it can
        # call it directly, and proxies or containers name it as they like, so any Host is served (as Ollama does).
        self.any_host = not _is_loopback(self.bound)
        self.names = {self.bound, socket.gethostname().lower()}
        self.hosts = [h.lower().rstrip(".") for h in hosts]
        self.origins = [o.lower().rstrip("/") for o in origins]

    def host_allowed(self, host: str) -> bool:
        name = _hostname(host)[0]
        if self.any_host or _is_address(name) or _is_loopback(name) or name in self.names:
            return True
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.hosts)

    def origin_allowed(self, origin: str, host: str) -> tuple[bool, bool]:
        """``(allowed, listed)``: whether a page at ``origin`` may call, and whether only the allow-list says so
        (then it gets CORS headers)."""
        origin = origin.strip().lower().rstrip("/")
        scheme, sep, authority = origin.partition("://")
        if sep and scheme in ("http", "https"):
            name = _hostname(authority)[0]
            if _is_loopback(name) or name == self.bound or authority == host.strip().lower():
                return True, False
        listed = any(fnmatch.fnmatchcase(origin, pattern) for pattern in self.origins)
        return listed, listed

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"] if k in (b"host", b"origin")}
        host, origin = headers.get("host"), headers.get("origin")
        path = scope["path"]
        if host is not None and not self.host_allowed(host):
            log.warning("refused Host %r on %s (DNS rebinding?)", host[:100], path)
            message = (
                f"host {host[:100]!r} is not allowed: use an address or localhost, or allow the name with "
                f"--allow-host or {HOSTS_ENV}"
            )
            return await error_response(path, 403, message)(scope, receive, send)
        if origin is None:
            return await self.app(scope, receive, send)
        allowed, listed = self.origin_allowed(origin, host or "")
        if not allowed:
            log.warning("refused Origin %r on %s", origin[:100], path)
            message = f"origin {origin[:100]!r} is not allowed: allow it with --allow-origin or {ORIGINS_ENV}"
            return await error_response(path, 403, message)(scope, receive, send)
        if not listed:
            return await self.app(scope, receive, send)
        cors = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]
        if scope["method"] == "OPTIONS":  # a preflight: what the browser may send next
            await send(
                {
                    "type": "http.response.start",
                    "status": 204,
                    "headers": [
                        *cors,
                        (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
                        (b"access-control-allow-headers", b"authorization, content-type"),
                        (b"access-control-max-age", b"600"),
                    ],
                }
            )
            return await send({"type": "http.response.body", "body": b""})

        async def with_cors(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *cors]}
            await send(message)

        await self.app(scope, receive, with_cors)


def _raw_response(path: str, status: int, message: str) -> bytes:
    """A whole HTTP/1.1 response that closes the connection, written below h11 (the request may be half in)."""
    response = error_response(path, status, message)
    reason = HTTPStatus(status).phrase.encode()
    head = [
        b"HTTP/1.1 %d %s" % (status, reason),
        b"content-type: " + response.media_type.encode(),
        b"content-length: %d" % len(response.body),
        b"connection: close",
    ]
    return b"\r\n".join(head) + b"\r\n\r\n" + response.body


def _head_size(request: h11.Request) -> int:
    return len(request.target) + sum(len(name) + len(value) + 4 for name, value in request.headers)


class _GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a request deadline, a connection cap and errors in the API's shape."""

    request_timeout: float = REQUEST_TIMEOUT
    max_connections: int = MAX_CONNECTIONS

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._deadline = None
        self._refused = False
        self._h11_error: h11.RemoteProtocolError | None = None
        next_event = self.conn.next_event

        def recorded_next_event():  # keep h11's reason (431: headers too large) for send_400_response
            try:
                event = next_event()
                if isinstance(event, h11.Request) and _head_size(event) > MAX_HEADER_BYTES:  # h11 counts only the
                    raise h11.RemoteProtocolError("headers too large", error_status_hint=431)  # part not yet in
                return event
            except h11.RemoteProtocolError as e:
                self._h11_error = e
                raise

        self.conn.next_event = recorded_next_event

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            log.warning("refused a connection: %d open (at most %d)", len(self.connections) - 1, self.max_connections)
            return self._refuse(503, f"too many connections (at most {self.max_connections}); try again later")
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._deadline is None and self.conn.their_state is h11.IDLE:  # a new request on a kept-alive connection
            self._arm()
        super().data_received(data)
        if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):  # the request is in (or the connection done)
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start the next request, from bytes that came with this one
        state = self.conn.their_state
        if state is h11.SEND_BODY or (state is h11.IDLE and self.conn.trailing_data[0]):
            self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        e, status, reason = self._h11_error, 400, "invalid HTTP request"
        if e is not None and e.error_status_hint == 431:
            status, reason = 431, f"request headers too large (at most {MAX_HEADER_BYTES // 1024} KiB)"
        elif e is not None:  # h11's reason, without the bytes it quotes
            reason = f"invalid HTTP request: {str(e).split(': bytearray(')[0][:100]}"
        self._refuse(status, reason)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.request_timeout, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self._refused or self.transport.is_closing() or self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            return
        started = self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE) or (
            self.cycle is not None and self.cycle.response_started and not self.cycle.response_complete
        )
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "-"
        log.warning("%s: request not complete after %g s; closing the connection", client, self.request_timeout)
        if started:  # an answer is on its way (a GET whose body never ends): just close
            self.transport.close()
        else:
            self._refuse(408, f"request not complete within {self.request_timeout:g} s")

    def _refuse(self, status: int, message: str) -> None:
        path = self.scope["path"] if self.scope is not None and self.conn.their_state is h11.SEND_BODY else "/"
        if self.cycle is not None:
            self.cycle.disconnected = True  # the app's answer to a half-read request goes nowhere
        self._disarm()
        self.transport.write(_raw_response(path, status, message))
        # A lingering close: what the client still sends is read and dropped for a moment, since closing with
        # unread bytes resets the connection, and a reset can destroy the answer before the client reads it.
        # (Not in a flood: twice the cap of connections open, and a refused one closes at once.)
        self._refused = True
        if len(self.connections) > 2 * self.max_connections or not self.transport.can_write_eof():
            return self.transport.close()
        self.transport.write_eof()
        self.loop.call_later(LINGER, self.transport.close)


def guarded_protocol(request_timeout: float = REQUEST_TIMEOUT, max_connections: int = MAX_CONNECTIONS) -> type:
    """The HTTP protocol class for uvicorn's ``http`` setting, with these limits."""
    if not request_timeout > 0 or max_connections < 1:
        raise ValueError(
            f"request_timeout must be > 0 and max_connections >= 1, got {request_timeout}, {max_connections}"
        )
    return type(
        "GuardedH11Protocol",
        (_GuardedH11Protocol,),
        {"request_timeout": request_timeout, "max_connections": max_connections},
    )
