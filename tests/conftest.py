"""Shared fixtures: the offline mirror (../shared/data/mirror) served over loopback HTTP.

Data the tests need comes from ``../shared/data`` beside the repository root. Locally a missing
folder skips those tests; in CI (``CI=true``) it fails them, so a broken checkout cannot pass.
"""

from __future__ import annotations

import atexit
import functools
import http.server
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Compiled decoding (llmcore.models.static_decode) costs seconds of compile per model, and every server a test starts
# would compile in the background: the suite decodes eagerly, except the tests that ask for it
# (test_static_decode.py). LLMCORE_COMPILED_DECODE=auto runs the whole suite the way a user's process would.
os.environ.setdefault("LLMCORE_COMPILED_DECODE", "never")
# ... and keeps the steps it compiles in a folder of its own, not the user's cache (a fresh one per run, removed after)
if "LLMCORE_DECODE_CACHE" not in os.environ:
    os.environ["LLMCORE_DECODE_CACHE"] = tempfile.mkdtemp(prefix="llmcore-decode-")
    atexit.register(shutil.rmtree, os.environ["LLMCORE_DECODE_CACHE"], ignore_errors=True)
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
MIRROR_DIR = SHARED_DATA / "mirror"


def require_shared(path: Path) -> Path:
    """Return ``path`` if it exists; otherwise fail in CI and skip elsewhere."""
    if path.exists():
        return path
    msg = f"test data missing: {path} (expected ../shared beside the checkout)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(msg)
    pytest.skip(msg)


def require_module(name: str):
    """Import and return module ``name``; if it is not installed, fail in CI and skip elsewhere."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as e:
        msg = f"{name} is not installed ({e}); `make venv` installs it"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg)
        pytest.skip(msg)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest output clean
        pass


def serve_directory(root: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """Serve ``root`` read-only on 127.0.0.1 at an ephemeral port; returns (server, base_url)."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(scope="session")
def mirror_dir() -> Path:
    return require_shared(MIRROR_DIR)


@pytest.fixture(scope="session")
def mirror_url(mirror_dir: Path) -> Iterator[str]:
    """A loopback HTTP base URL serving ../shared/data/mirror (use as LLMCORE_MIRROR)."""
    server, url = serve_directory(mirror_dir)
    yield url
    server.shutdown()


@pytest.fixture
def http_dir() -> Iterator:
    """Factory: serve any directory over loopback HTTP for the duration of a test."""
    servers = []

    def start(root: Path) -> str:
        server, url = serve_directory(root)
        servers.append(server)
        return url

    yield start
    for server in servers:
        server.shutdown()
