"""download() and extract_zip() against servers and archives that misbehave on purpose.

Every case must end with a verified file or a one-line LLMCoreError, and never with a partial or corrupt
file at the destination (nor a temporary file left beside it).
"""

from __future__ import annotations

import hashlib
import http.server
import random
import socket
import stat
import struct
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from llmcore.common import LLMCoreError, sha256_file
from llmcore.download import MIRROR_ENV, download, extract_zip, resolve_url

BODY = random.Random(0).randbytes(200_000)
BODY_SHA = hashlib.sha256(BODY).hexdigest()
HALF = len(BODY) // 2
STALL_S = 1.0  # how long a "slow" server sits silent; tests use a 0.2 s read timeout
FAST = dict(backoff=0.01, progress=False)  # keep retries quick

VERDICT_URL = "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/01_main-chapter-code/the-verdict.txt"
VERDICT_SHA = "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f"


# --- a deliberately unreliable HTTP server -----------------------------------------------------------


@dataclass
class Script:
    """What the server does: ``actions[i]`` answers request ``i`` (the last one repeats).

    Actions: ``ok``; ``404``/``500``/``502``/``503``/``429`` (empty body); ``drop`` (half the body, then a
    clean close); ``reset`` (half the body, then a TCP reset); ``slow_headers`` / ``stall`` (silent for
    STALL_S before the headers / after half the body).
    """

    actions: list[str]
    body: bytes = BODY
    ranges: bool = True  # honour Range with 206, or ignore it and send 200 + the whole body
    retry_after: str = "0"
    seen: list[dict[str, str]] = field(default_factory=list)  # request headers, in order

    @property
    def ranges_sent(self) -> list[str | None]:
        return [h.get("Range") for h in self.seen]


class _FlakyHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        script: Script = self.server.script
        script.seen.append(dict(self.headers))
        action = script.actions[min(len(script.seen), len(script.actions)) - 1]
        if action.isdigit():
            self.send_response(int(action))
            if action == "429":
                self.send_header("Retry-After", script.retry_after)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if action == "slow_headers":
            time.sleep(STALL_S)
            return
        start, status = 0, 200
        if self.headers.get("Range") and script.ranges:
            start, status = int(self.headers["Range"].removeprefix("bytes=").split("-")[0]), 206
        part = script.body[start:]
        self.send_response(status)
        self.send_header("Content-Length", str(len(part)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(script.body) - 1}/{len(script.body)}")
        self.end_headers()
        if action == "ok":
            self.wfile.write(part)
            return
        # drop / reset / stall: send half of what was promised, then misbehave
        self.wfile.write(part[: len(part) // 2])
        self.wfile.flush()
        if action == "stall":
            time.sleep(STALL_S)
        elif action == "reset":
            time.sleep(0.05)
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True  # HTTP/1.0 anyway: the server closes, the body is short


class _FlakyServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        pass  # broken pipes after a client gave up are expected here


@pytest.fixture
def flaky() -> Iterator:
    """Factory: ``flaky(Script(...))`` starts a server on 127.0.0.1 and returns the file URL."""
    servers = []

    def start(script: Script) -> str:
        server = _FlakyServer(("127.0.0.1", 0), _FlakyHandler)
        server.script = script
        # a short poll interval: shutdown() waits for it, and the default 0.5 s adds up over the file
        threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/data.bin"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def no_mirror(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MIRROR_ENV, raising=False)


def resume_offset(range_header: str | None) -> int:
    assert range_header is not None and range_header.startswith("bytes=") and range_header.endswith("-")
    return int(range_header.removeprefix("bytes=").removesuffix("-"))


def assert_only(directory: Path, *names: str) -> None:
    """Nothing in ``directory`` but ``names``: no partial destination, no leftover temp file."""
    assert sorted(p.name for p in directory.iterdir()) == sorted(names)


# --- download: recoverable failures end in a verified file -------------------------------------------


def test_dropped_connection_resumes_with_range(flaky, tmp_path: Path) -> None:
    script = Script(["drop", "ok"])
    out = download(flaky(script), tmp_path / "data.bin", sha256=BODY_SHA, **FAST)
    assert out.read_bytes() == BODY
    assert script.ranges_sent[0] is None
    assert 0 < resume_offset(script.ranges_sent[1]) <= HALF  # what arrived before the drop was kept
    assert_only(tmp_path, "data.bin")


def test_range_ignored_restarts_from_scratch(flaky, tmp_path: Path) -> None:
    script = Script(["drop", "ok"], ranges=False)  # answers the resume with 200 and the full body
    out = download(flaky(script), tmp_path / "data.bin", sha256=BODY_SHA, **FAST)
    assert out.read_bytes() == BODY  # not the kept half plus the whole body
    assert resume_offset(script.ranges_sent[1]) > 0


def test_connection_reset_then_ok(flaky, tmp_path: Path) -> None:
    script = Script(["reset", "ok"])
    out = download(flaky(script), tmp_path / "data.bin", sha256=BODY_SHA, **FAST)
    assert sha256_file(out) == BODY_SHA
    assert len(script.seen) == 2


@pytest.mark.parametrize("status", ["500", "502", "503"])
def test_server_error_is_retried(flaky, tmp_path: Path, status: str) -> None:
    script = Script([status, "ok"])
    download(flaky(script), tmp_path / "data.bin", sha256=BODY_SHA, **FAST)
    assert len(script.seen) == 2
    assert_only(tmp_path, "data.bin")


def test_429_is_retried_after_retry_after(flaky, tmp_path: Path) -> None:
    script = Script(["429", "ok"], retry_after="1")
    start = time.monotonic()
    download(flaky(script), tmp_path / "data.bin", sha256=BODY_SHA, **FAST)
    assert time.monotonic() - start >= 0.9  # waited for Retry-After, not just the 0.01 s backoff
    assert len(script.seen) == 2


def test_no_digest_still_checks_length(flaky, tmp_path: Path) -> None:
    script = Script(["drop", "ok"])
    out = download(flaky(script), tmp_path / "data.bin", **FAST)
    assert out.read_bytes() == BODY


# --- download: permanent failures end in a clear error and an untouched destination ------------------


def test_404_fails_at_once(flaky, tmp_path: Path) -> None:
    script = Script(["404"])
    url = flaky(script)
    with pytest.raises(LLMCoreError, match="404") as err:
        download(url, tmp_path / "data.bin", **FAST)
    assert url in str(err.value) and "\n" not in str(err.value)
    assert len(script.seen) == 1  # no retries
    assert_only(tmp_path)


def test_wrong_digest(flaky, tmp_path: Path) -> None:
    wrong = "0" * 64
    with pytest.raises(LLMCoreError, match="sha256 mismatch") as err:
        download(flaky(Script(["ok"])), tmp_path / "data.bin", sha256=wrong, **FAST)
    msg = str(err.value)
    assert "data.bin" in msg and wrong in msg and BODY_SHA in msg
    assert_only(tmp_path)


def test_wrong_digest_keeps_previous_file(flaky, tmp_path: Path) -> None:
    dest = tmp_path / "data.bin"
    dest.write_bytes(b"old")
    with pytest.raises(LLMCoreError, match="sha256 mismatch"):
        download(flaky(Script(["ok"])), dest, sha256="0" * 64, **FAST)
    assert dest.read_bytes() == b"old"
    assert_only(tmp_path, "data.bin")


@pytest.mark.parametrize("ranges", [False, True])
def test_body_always_shorter_than_content_length(flaky, tmp_path: Path, ranges: bool) -> None:
    script = Script(["drop"], ranges=ranges)  # every response stops halfway
    with pytest.raises(LLMCoreError, match="failed after 2 retries"):
        download(flaky(script), tmp_path / "data.bin", retries=2, **FAST)
    assert len(script.seen) == 3
    assert_only(tmp_path)


@pytest.mark.parametrize("action", ["slow_headers", "stall"])
def test_read_timeout(flaky, tmp_path: Path, action: str) -> None:
    script = Script([action])
    start = time.monotonic()
    with pytest.raises(LLMCoreError, match="failed after 2 retries"):
        download(flaky(script), tmp_path / "data.bin", timeout=(2, 0.2), retries=2, **FAST)
    assert time.monotonic() - start < 2.5  # gave up on read timeouts, did not wait the server out
    assert len(script.seen) == 3
    assert_only(tmp_path)


def test_connection_refused(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(LLMCoreError, match="failed after 1 retries"):
        download(f"http://127.0.0.1:{port}/x", tmp_path / "x", retries=1, **FAST)
    assert_only(tmp_path)


def test_malformed_digest_is_refused(tmp_path: Path) -> None:
    with pytest.raises(LLMCoreError, match="not a sha256"):
        download("http://127.0.0.1:1/x", tmp_path / "x", sha256="abc", **FAST)


# --- download: an existing, verified destination is not fetched again --------------------------------


def test_existing_verified_dest_is_kept(flaky, tmp_path: Path) -> None:
    script = Script(["ok"])
    url, dest = flaky(script), tmp_path / "data.bin"
    download(url, dest, sha256=BODY_SHA, **FAST)
    download(url, dest, sha256=BODY_SHA, **FAST)
    assert len(script.seen) == 1


def test_existing_dest_without_digest_is_kept_while_it_matches_its_record(flaky, tmp_path: Path) -> None:
    script = Script(["ok"])
    url, dest = flaky(script), tmp_path / "data.bin"
    download(url, dest, **FAST)  # writes .data.bin.download.json: URL and size
    download(url, dest, **FAST)
    assert len(script.seen) == 1
    dest.write_bytes(b"anything")  # no longer what was downloaded (tests/test_hostile_downloads.py: more cases)
    download(url, dest, **FAST)
    assert len(script.seen) == 2 and dest.read_bytes() == BODY


def test_existing_corrupt_dest_is_replaced(flaky, tmp_path: Path) -> None:
    script = Script(["ok"])
    dest = tmp_path / "data.bin"
    dest.write_bytes(BODY[:-1])
    download(flaky(script), dest, sha256=BODY_SHA, **FAST)
    assert len(script.seen) == 1 and dest.read_bytes() == BODY


# --- the mirror ---------------------------------------------------------------------------------------

SRC = "https://example.org/a/b+c.txt"


def test_resolve_url_without_mirror() -> None:
    assert resolve_url(SRC) == SRC


@pytest.mark.parametrize(
    "base, expected",
    [
        ("http://127.0.0.1:8000/m/", "http://127.0.0.1:8000/m/example.org/a/b+c.txt"),
        ("https://mirror.test", "https://mirror.test/example.org/a/b+c.txt"),
        ("file:///srv/mirror", "file:///srv/mirror/example.org/a/b+c.txt"),
    ],
)
def test_resolve_url_with_url_mirror(monkeypatch: pytest.MonkeyPatch, base: str, expected: str) -> None:
    monkeypatch.setenv(MIRROR_ENV, base)
    assert resolve_url(SRC) == expected


def test_resolve_url_with_directory_mirror(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(MIRROR_ENV, str(tmp_path))
    assert resolve_url(SRC) == f"{tmp_path.resolve().as_uri()}/example.org/a/b+c.txt"


def test_resolve_url_refuses_dotdot(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(MIRROR_ENV, str(tmp_path))
    with pytest.raises(LLMCoreError, match=r"'\.\.'"):
        resolve_url("https://example.org/../../etc/passwd")


@pytest.fixture
def local_mirror(tmp_path: Path) -> Path:
    root = tmp_path / "mirror"
    (root / "example.org" / "a").mkdir(parents=True)
    (root / "example.org" / "a" / "b+c.txt").write_bytes(BODY)
    return root


@pytest.mark.parametrize("as_uri", [False, True])
def test_download_from_local_mirror(monkeypatch, tmp_path: Path, local_mirror: Path, as_uri: bool) -> None:
    monkeypatch.setenv(MIRROR_ENV, local_mirror.as_uri() if as_uri else str(local_mirror))
    out = download(SRC, tmp_path / "out" / "b.txt", sha256=BODY_SHA, **FAST)
    assert out.read_bytes() == BODY
    assert_only(out.parent, "b.txt")


def test_local_mirror_wrong_digest(monkeypatch, tmp_path: Path, local_mirror: Path) -> None:
    monkeypatch.setenv(MIRROR_ENV, str(local_mirror))
    with pytest.raises(LLMCoreError, match="sha256 mismatch"):
        download(SRC, tmp_path / "out" / "b.txt", sha256="1" * 64, **FAST)
    assert_only(tmp_path / "out")


def test_local_mirror_missing_file(monkeypatch, tmp_path: Path, local_mirror: Path) -> None:
    monkeypatch.setenv(MIRROR_ENV, str(local_mirror))
    with pytest.raises(LLMCoreError, match="not found in the mirror"):
        download("https://example.org/missing.txt", tmp_path / "out" / "m.txt", **FAST)
    assert_only(tmp_path / "out")


def test_http_mirror_real_file(monkeypatch, tmp_path: Path, mirror_url: str) -> None:
    monkeypatch.setenv(MIRROR_ENV, mirror_url)
    out = download(VERDICT_URL, tmp_path / "the-verdict.txt", sha256=VERDICT_SHA, **FAST)
    assert out.stat().st_size == 20479
    assert_only(tmp_path, "the-verdict.txt")


def test_http_mirror_missing_file(monkeypatch, tmp_path: Path, mirror_url: str) -> None:
    monkeypatch.setenv(MIRROR_ENV, mirror_url)
    with pytest.raises(LLMCoreError, match="HTTP 404"):
        download("https://example.org/missing.txt", tmp_path / "m.txt", **FAST)
    assert_only(tmp_path)


# --- extract_zip --------------------------------------------------------------------------------------


def make_zip(path: Path, entries: dict[str, bytes], symlinks: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


def test_extract_zip(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "ok.zip", {"top.txt": b"1", "sub/dir/deep.txt": b"2"})
    out = tmp_path / "out"
    assert extract_zip(archive, out) == [out / "top.txt", out / "sub/dir/deep.txt"]
    assert (out / "sub/dir/deep.txt").read_bytes() == b"2"
    assert_only(out, "top.txt", "sub")


def test_extract_zip_members(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "ok.zip", {"a.txt": b"a", "b.txt": b"b"})
    out = tmp_path / "out"
    assert extract_zip(archive, out, members=["b.txt"]) == [out / "b.txt"]
    assert_only(out, "b.txt")
    with pytest.raises(LLMCoreError, match="no member"):
        extract_zip(archive, out, members=["c.txt"])


@pytest.mark.parametrize(
    "entries, symlinks, match",
    [
        ({"ok.txt": b"x", "../evil.txt": b"x"}, None, r"'\.\.'"),
        ({"a/../../evil.txt": b"x"}, None, r"'\.\.'"),
        ({"/tmp/evil.txt": b"x"}, None, "absolute"),
        ({"ok.txt": b"x"}, {"link": "/etc/passwd"}, "symlink"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink"],
)
def test_extract_zip_refuses_hostile_entries(tmp_path: Path, entries, symlinks, match: str) -> None:
    archive = make_zip(tmp_path / "bad.zip", entries, symlinks)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(LLMCoreError, match=match) as err:
        extract_zip(archive, out)
    assert "bad.zip" in str(err.value)
    assert_only(out)  # refused before anything was written
    assert not (tmp_path / "evil.txt").exists()


def test_extract_zip_refuses_path_through_symlinked_dir(tmp_path: Path) -> None:
    outside, out = tmp_path / "outside", tmp_path / "out"
    outside.mkdir()
    out.mkdir()
    (out / "escape").symlink_to(outside)
    archive = make_zip(tmp_path / "bad.zip", {"escape/evil.txt": b"x"})
    with pytest.raises(LLMCoreError, match="outside"):
        extract_zip(archive, out)
    assert_only(outside)


def test_downloaded_body_not_a_zip(flaky, tmp_path: Path) -> None:
    body = b"<html>Service temporarily unavailable</html>"
    archive = download(flaky(Script(["ok"], body=body)), tmp_path / "data.zip", **FAST)
    with pytest.raises(LLMCoreError, match="data.zip: not a zip archive"):
        extract_zip(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_extract_zip_missing_file(tmp_path: Path) -> None:
    with pytest.raises(LLMCoreError, match="no such file"):
        extract_zip(tmp_path / "nope.zip", tmp_path / "out")
