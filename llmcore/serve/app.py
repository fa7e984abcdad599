"""`llmcore serve`: one ASGI app (Starlette on uvicorn) with the Ollama API, the OpenAI API and a chat page.

    llmcore serve --model data/models/instruct          # http://127.0.0.1:11434: /api/*, /v1/*, and a chat page at /

    curl http://127.0.0.1:11434/api/generate -d '{"model": "instruct", "prompt": "Name a primary color."}'
    openai.OpenAI(base_url="http://127.0.0.1:11434/v1", api_key="unused").chat.completions.create(...)

Each model has a continuous-batching engine (:mod:`llmcore.serve.engine`): concurrent requests share its forward
passes. The APIs are in :mod:`llmcore.serve.ollama_api` and :mod:`llmcore.serve.openai_api`; bad input gets the
API's own error shape and status (malformed JSON 400, a wrong-typed field 400 naming it, unknown model 404, a body
over ``max_body`` bytes 413), and the server keeps serving. Every request is logged with its status and time. The
server binds 127.0.0.1 unless told otherwise; SIGINT/SIGTERM stop it gracefully (open streams get a few seconds).
:mod:`llmcore.serve.guard` checks Host and Origin (DNS rebinding), gives each request a deadline and caps the open
connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Sequence
from importlib import resources

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from llmcore.common import LLMCoreError
from llmcore.serve import ollama_api, openai_api
from llmcore.serve.guard import (
    HOSTS_ENV,
    MAX_CONNECTIONS,
    MAX_HEADER_BYTES,
    ORIGINS_ENV,
    REQUEST_TIMEOUT,
    HostGuard,
    guarded_protocol,
    split_list,
)
from llmcore.serve.models import ModelHandle, RequestError, qualify
from llmcore.serve.protocol import MAX_BODY_BYTES

log = logging.getLogger("llmcore.serve")

DEFAULT_HOST = "127.0.0.1"  # loopback only: exposing the server is an explicit choice (--host 0.0.0.0)
DEFAULT_PORT = 11434  # Ollama's port, so clients find it without configuration


def chat_page() -> str:
    return resources.files("llmcore.serve").joinpath("static/chat.html").read_text(encoding="utf-8")


def favicon() -> bytes:
    """The chat page's icon (an SVG): served at /favicon.svg, which the page links, and at /favicon.ico, which
    browsers and other clients ask for without a link."""
    return resources.files("llmcore.serve").joinpath("static/favicon.svg").read_bytes()


class RequestLog:
    """ASGI middleware: one log line per request with its status and wall time (to the end of a stream)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [0]

        async def logged_send(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, logged_send)
        finally:
            client = scope.get("client") or ("-", 0)
            log.info(
                "%s %s %s %d %.1f ms",
                client[0],
                scope["method"],
                scope["path"],
                status[0],
                (time.perf_counter() - start) * 1000,
            )


def create_app(
    models: dict[str, ModelHandle],
    max_body: int = MAX_BODY_BYTES,
    bound: str = DEFAULT_HOST,
    allowed_hosts: Sequence[str] | None = None,
    allowed_origins: Sequence[str] | None = None,
) -> Starlette:
    """The ASGI app serving ``models`` (name -> handle; ``:latest`` is added to untagged names).

    Requests are served for the Host names and browser origins :class:`~llmcore.serve.guard.HostGuard` accepts:
    addresses, localhost, ``bound`` (the address the server listens on) and the allow-lists (None: from
    ``$LLMCORE_ALLOWED_HOSTS`` and ``$LLMCORE_ORIGINS``)."""
    if not models:
        raise LLMCoreError("no models to serve")
    named = {qualify(name): handle for name, handle in models.items()}
    if len(named) != len(models):
        raise LLMCoreError(f"two models share a name: {sorted(models)}")
    ollama, openai = ollama_api.OllamaAPI(named, max_body), openai_api.OpenAIAPI(named, max_body)
    page, icon = chat_page(), favicon()

    async def index(request: Request) -> Response:
        return HTMLResponse(page)

    async def icon_file(request: Request) -> Response:
        return Response(icon, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})

    def render(request: Request, e: RequestError) -> Response:
        api = openai_api if request.url.path.startswith("/v1/") else ollama_api
        return api.error_response(e)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        message = {
            404: f"not found: {request.url.path}",
            405: f"method {request.method} not allowed on {request.url.path}",
        }.get(exc.status_code, str(exc.detail))
        return render(request, RequestError(exc.status_code, message))

    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("error on %s %s", request.method, request.url.path)
        return render(request, RequestError(500, f"{type(exc).__name__}: {exc}"))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        for handle in named.values():
            handle.engine.start()
        yield
        for handle in named.values():  # requests still running end as cancelled
            await asyncio.to_thread(handle.engine.stop)

    app = Starlette(
        routes=[
            Route("/", index, methods=["GET"]),
            Route("/favicon.svg", icon_file, methods=["GET"]),
            Route("/favicon.ico", icon_file, methods=["GET"]),
            *ollama.routes(),
            *openai.routes(),
        ],
        exception_handlers={HTTPException: http_error, Exception: server_error},
        lifespan=lifespan,
    )
    app.state.models = named
    app.add_middleware(
        HostGuard,
        bound=bound,
        hosts=split_list(allowed_hosts, HOSTS_ENV),
        origins=split_list(allowed_origins, ORIGINS_ENV),
    )
    app.add_middleware(RequestLog)  # outermost: refusals are logged too
    return app


class Server:
    """A bound uvicorn server for ``app``: :meth:`serve_forever` runs it (in a thread for tests and benchmarks)."""

    def __init__(
        self,
        app: Starlette,
        host: str,
        port: int,
        request_timeout: float = REQUEST_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
    ):
        import uvicorn

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((host, port))
        except OSError:
            self.socket.close()
            raise
        self.socket.listen(128)
        self.socket.set_inheritable(True)
        self.host, self.port = host, self.socket.getsockname()[1]
        # h11 with a deadline per request and a cap on connections (llmcore.serve.guard), whatever else is installed
        config = uvicorn.Config(
            app,
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=5,
            lifespan="on",
            ws="none",
            http=guarded_protocol(request_timeout, max_connections),
            h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        )
        self.uvicorn = uvicorn.Server(config)
        self._thread: threading.Thread | None = None
        self._running = threading.Event()
        self._stopped = threading.Event()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def serve_forever(self) -> None:
        """Run until SIGINT/SIGTERM (in the main thread) or :meth:`shutdown`."""
        self._running.set()
        try:
            self.uvicorn.run(sockets=[self.socket])
        finally:
            self._stopped.set()

    def start(self) -> Server:
        """Serve from a background thread; returns once the server accepts connections."""
        self._thread = threading.Thread(target=self.serve_forever, name="llmcore-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def shutdown(self) -> None:
        """Stop a running :meth:`serve_forever` and wait for it (open streams get a few seconds)."""
        self.uvicorn.should_exit = True
        if self._running.is_set():
            self._stopped.wait(15)

    def server_close(self) -> None:
        self.socket.close()


def make_server(
    models: dict[str, ModelHandle],
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    max_body: int = MAX_BODY_BYTES,
    allowed_hosts: Sequence[str] | None = None,
    allowed_origins: Sequence[str] | None = None,
    request_timeout: float = REQUEST_TIMEOUT,
    max_connections: int = MAX_CONNECTIONS,
) -> Server:
    """Bind a server for ``models``; port 0 picks a free port (see ``server.url``). An address in use raises
    ``OSError`` here, before anything runs. ``allowed_hosts``/``allowed_origins``: more Host names and browser
    origins to serve (see :mod:`llmcore.serve.guard`); a request must arrive within ``request_timeout`` seconds,
    and at most ``max_connections`` are open at once."""
    app = create_app(models, max_body, host, allowed_hosts, allowed_origins)
    return Server(app, host, port, request_timeout, max_connections)
