"""Hostile input to the downloader (issue #32, cases 7-11): names that escape, bodies cut short, servers that
stall or drip, archives that explode or are corrupt, and leftovers of killed runs.

Each case ends in a verified file or in one line naming the URL / archive / file, and never writes outside the
stage's folder nor leaves a half-written result. Servers run on loopback; timeouts are tenths of a second.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import random
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from llmcore.common import LLMCoreError, atomic_path
from llmcore.download import MIRROR_ENV, download, extract_zip
from stages import download as download_stage

BODY = random.Random(1).randbytes(100_000)
BODY_SHA = hashlib.sha256(BODY).hexdigest()
FAST = dict(backoff=0.01, progress=False)


# --- a server that misbehaves on purpose -----------------------------------------------------------------


@dataclass
class Plan:
    """``actions[i]`` answers request ``i`` (the last one repeats):

    - ``ok``: the body (or the asked range: 206, ``If-Range`` honoured; 416 past the end), with Content-Length;
    - ``nolen``: the body with neither Content-Length nor chunking, then close (the end cannot be seen);
    - ``nolen_short``: the same, but only half of the body;
    - ``short``: Content-Length of the whole body, half of it, then close;
    - ``drip``: Content-Length of the whole body, then one byte every 10 ms for ``drip_s`` seconds;
    - ``trickle``: Content-Length of the whole body, then 4 KiB every 20 ms (never stalls, just slow).
    """

    actions: list[str]
    body: bytes = BODY
    etag: str | None = None
    drip_s: float = 3.0
    seen: list[dict[str, str]] = field(default_factory=list)

    def header(self, i: int, name: str) -> str | None:
        return self.seen[i].get(name)


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        plan: Plan = self.server.plan
        plan.seen.append(dict(self.headers))
        action = plan.actions[min(len(plan.seen), len(plan.actions)) - 1]
        body, start, status = plan.body, 0, 200
        wanted = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if wanted and (if_range is None or if_range == plan.etag):
            start, status = int(wanted.removeprefix("bytes=").split("-")[0]), 206
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        part = body[start:]
        self.send_response(status)
        if plan.etag:
            self.send_header("ETag", plan.etag)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        if not action.startswith("nolen"):
            self.send_header("Content-Length", str(len(part)))
        self.end_headers()
        if action in ("ok", "nolen"):
            self.wfile.write(part)
        elif action in ("nolen_short", "short"):
            self.wfile.write(part[: len(part) // 2])
        elif action == "drip":
            end = time.monotonic() + plan.drip_s
            for i in range(len(part)):
                if time.monotonic() > end:
                    break
                self.wfile.write(part[i : i + 1])
                self.wfile.flush()
                time.sleep(0.01)
        elif action == "trickle":
            for i in range(0, len(part), 4096):
                self.wfile.write(part[i : i + 4096])
                self.wfile.flush()
                time.sleep(0.02)
        self.close_connection = True


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass  # a client that gave up breaks the pipe: expected here


@pytest.fixture
def hostile() -> Iterator:
    """Factory: ``hostile(Plan(...), path)`` serves the plan on 127.0.0.1; returns the URL of ``path``."""
    servers = []

    def start(plan: Plan, path: str = "/data.bin") -> str:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.plan = plan
        threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}{path}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def no_mirror(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MIRROR_ENV, raising=False)


def one_line(err: pytest.ExceptionInfo, *fragments: str) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# --- 7: a file name that escapes the stage's folder ----------------------------------------------------------


@pytest.mark.parametrize("name", ["..%2F..%2Fevil.txt", "..%2fevil.txt", "%2e%2e%2F%2e%2e%2Fevil.txt", "%2e%2e"])
def test_encoded_dotdot_in_the_file_name_is_refused(hostile, tmp_path: Path, name: str) -> None:
    url = hostile(Plan(["ok"]), f"/a/{name}")
    raw = tmp_path / "data" / "raw"
    with pytest.raises(LLMCoreError) as err:
        download_stage.fetch_source("s", download_stage.Source(url=url), raw)
    one_line(err, "download.sources.s.url", "file name")
    assert files_under(tmp_path) == []  # nothing written, inside data/raw or outside it


@pytest.mark.parametrize("folder", ["../../outside", "/abs/olute", "link"])
def test_folder_param_cannot_leave_data_raw(hostile, tmp_path: Path, folder: str) -> None:
    url = hostile(Plan(["ok"]), "/a/x.bin")
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (raw / "link").symlink_to(tmp_path / "outside")  # a folder of data/raw that leads out of it
    with pytest.raises(LLMCoreError) as err:
        download_stage.fetch_source("s", download_stage.Source(url=url, folder=folder), raw)
    one_line(err, "download.sources.s.folder")
    assert files_under(tmp_path) == []


@pytest.mark.parametrize("repo", ["/abs/olute", "../../up", "a/%2e%2e/../b"])
def test_import_cache_path_stays_under_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, repo: str) -> None:
    from typer.testing import CliRunner

    from stages.import_weights import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(MIRROR_ENV, str(tmp_path / "empty-mirror"))
    Path("params.yaml").write_text(f"import:\n  sources:\n    x: {{repo: '{repo}', revision: main}}\n")
    paths = ["--params", "params.yaml", "--raw-dir", "data/raw", "--cache-dir", "data/hub"]
    result = CliRunner().invoke(app, ["--name", "x", *paths, "--out", "data/models/x", "--reports", "reports/import/x"])
    line = result.stderr.strip()
    assert result.exit_code == 1 and line.startswith("error: import.sources.x.repo/revision: ") and "\n" not in line
    assert files_under(tmp_path) == ["params.yaml"]


def test_file_mirror_refuses_encoded_dotdot(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    (mirror / "example.org" / "a").mkdir(parents=True)
    (tmp_path / "secret.txt").write_text("not the mirror's")
    url = "https://example.org/a/%2e%2e/%2e%2e/%2E%2E/secret.txt"
    for base in (str(mirror), mirror.as_uri()):
        monkeypatch.setenv(MIRROR_ENV, base)
        with pytest.raises(LLMCoreError) as err:
            download(url, tmp_path / "out" / "secret.txt", **FAST)
        one_line(err, "'..'")
    assert not (tmp_path / "out" / "secret.txt").exists()


# --- 8: a body cut short is never kept as complete -------------------------------------------------------------


def test_body_without_length_cut_short_is_completed_with_range(hostile, tmp_path: Path) -> None:
    plan = Plan(["nolen_short", "ok"])  # the first body ends early and says nothing of its size
    out = download(hostile(plan), tmp_path / "data.bin", **FAST)
    assert out.read_bytes() == BODY  # the missing half was asked for (Range) instead of trusting the short body
    assert plan.header(1, "Range") == f"bytes={len(BODY) // 2}-"


def test_body_without_length_is_confirmed_complete(hostile, tmp_path: Path) -> None:
    plan = Plan(["nolen", "ok"])
    out = download(hostile(plan), tmp_path / "data.bin", **FAST)
    assert out.read_bytes() == BODY
    assert len(plan.seen) == 2 and plan.header(1, "Range") == f"bytes={len(BODY)}-"  # answered 416: that was all


def test_rerun_refetches_a_file_that_no_longer_matches_its_record(hostile, tmp_path: Path) -> None:
    plan = Plan(["ok"], etag='"v1"')
    url, dest = hostile(plan), tmp_path / "data.bin"
    download(url, dest, **FAST)
    download(url, dest, **FAST)
    assert len(plan.seen) == 1  # complete, as recorded: trusted without a request
    dest.write_bytes(BODY[:1000])  # cut short behind our back (or by a crash of an older version)
    download(url, dest, **FAST)
    assert len(plan.seen) == 2 and dest.read_bytes() == BODY


def test_rerun_refetches_an_unrecorded_file_without_digest(hostile, tmp_path: Path) -> None:
    plan = Plan(["ok"])
    dest = tmp_path / "data.bin"
    dest.write_bytes(BODY[:1000])  # no record says it is complete: it may be a cut-short body
    download(hostile(plan), dest, **FAST)
    assert len(plan.seen) == 1 and dest.read_bytes() == BODY


def test_partial_is_kept_and_resumed_by_the_next_run(hostile, tmp_path: Path) -> None:
    plan = Plan(["short"], etag='"v1"')
    url, dest = hostile(plan), tmp_path / "data.bin"
    with pytest.raises(LLMCoreError) as err:
        download(url, dest, retries=1, **FAST)
    one_line(err, url, "failed after 1 retries")
    assert not dest.exists()
    partials = [p for p in tmp_path.iterdir() if p.name.endswith(".part.tmp")]
    assert len(partials) == 1 and 0 < partials[0].stat().st_size < len(BODY)  # kept under a temporary name
    have = partials[0].stat().st_size
    plan.actions = ["ok"]
    first_new = len(plan.seen)
    out = download(url, dest, **FAST)  # a new run (the partial's owner counts as gone: see test below)
    assert out.read_bytes() == BODY
    assert plan.header(first_new, "Range") == f"bytes={have}-" and plan.header(first_new, "If-Range") == '"v1"'
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".data.bin.download")) == ["data.bin"]


def test_partial_of_a_changed_file_is_restarted(hostile, tmp_path: Path) -> None:
    plan = Plan(["short"], etag='"v1"')
    url, dest = hostile(plan), tmp_path / "data.bin"
    with pytest.raises(LLMCoreError):
        download(url, dest, retries=0, **FAST)
    new_body = BODY[::-1]
    plan.actions, plan.body, plan.etag = ["ok"], new_body, '"v2"'  # the file changed on the server
    assert download(url, dest, **FAST).read_bytes() == new_body  # If-Range missed: 200, started over


# --- 9: stalls, drips and deadlines ---------------------------------------------------------------------------


def test_drip_server_is_a_stall(hostile, tmp_path: Path) -> None:
    url = hostile(Plan(["drip"], drip_s=4.0))  # one byte every 10 ms: never silent, never done
    start = time.monotonic()
    with pytest.raises(LLMCoreError) as err:
        download(url, tmp_path / "data.bin", timeout=(2, 0.3), retries=1, **FAST)
    one_line(err, url, "failed after 1 retries", "stalled")
    assert time.monotonic() - start < 2.0
    assert [p.name for p in tmp_path.iterdir()] == []


def test_deadline_bounds_a_slow_transfer(hostile, tmp_path: Path) -> None:
    url = hostile(Plan(["trickle"], body=random.Random(2).randbytes(2_000_000)))  # 200 KB/s: ~10 s for the file
    start = time.monotonic()
    with pytest.raises(LLMCoreError) as err:
        download(url, tmp_path / "data.bin", timeout=(2, 0.3), deadline=0.8, retries=3, **FAST)
    one_line(err, url, "deadline")
    assert time.monotonic() - start < 2.0


def test_stall_params_reach_the_downloader(hostile, tmp_path: Path) -> None:
    defaults = download_stage.DownloadParams()
    assert 10 <= defaults.stall_timeout_s <= 60 and defaults.retries >= 1 and defaults.file_deadline_s > 0
    url = hostile(Plan(["drip"], drip_s=4.0))
    cfg = download_stage.DownloadParams(stall_timeout_s=0.3, retries=0, backoff_s=0.01)
    start = time.monotonic()
    with pytest.raises(LLMCoreError) as err:
        download_stage.fetch_source("s", download_stage.Source(url=url), tmp_path, cfg)
    one_line(err, url, "stalled")
    assert time.monotonic() - start < 1.5


# --- 10: archives that explode or are corrupt ----------------------------------------------------------------


def test_zip_bomb_ratio_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.bin", bytes(20_000_000))  # ~1000:1
    out = tmp_path / "out"
    with pytest.raises(LLMCoreError) as err:
        extract_zip(archive, out)
    one_line(err, "bomb.zip", "ratio")
    assert not out.exists() or files_under(out) == []


def test_zip_total_size_is_capped(tmp_path: Path) -> None:
    archive = tmp_path / "big.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.bin", random.Random(3).randbytes(3000))
    out = tmp_path / "out"
    with pytest.raises(LLMCoreError) as err:
        extract_zip(archive, out, max_bytes=2000)
    one_line(err, "big.zip", "2000")
    assert not out.exists() or files_under(out) == []


def corrupt_second_member(path: Path) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("first.txt", b"fine " * 2000)
        zf.writestr("second.txt", random.Random(4).randbytes(5000) + b"x" * 20000)
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("second.txt")
    data = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)  # past the local header
    for i in range(start + 100, start + 200):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    return path


def test_corrupt_deflate_stream_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    archive = corrupt_second_member(tmp_path / "broken.zip")
    out = tmp_path / "out"
    with pytest.raises(LLMCoreError) as err:
        extract_zip(archive, out)
    one_line(err, "broken.zip", "corrupt")
    assert not out.exists() or [p.name for p in out.iterdir()] == []  # not even the good first member


def test_unzip_caps_come_from_params(tmp_path: Path) -> None:
    defaults = download_stage.DownloadParams()
    assert 10 <= defaults.max_unzip_ratio <= 1000 and defaults.max_unzip_mb >= 100
    archive = tmp_path / "raw" / "s" / "a.zip"
    archive.parent.mkdir(parents=True)
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("member.txt", bytes(random.Random(5).choices(b"ab", k=2_000_000)))  # ~6:1: passes 100, not 5
    cfg = download_stage.DownloadParams(max_unzip_ratio=5)
    with pytest.raises(LLMCoreError, match="ratio"):
        download_stage.unpack("s", download_stage.Source(url="https://x/a.zip", extract=["member.txt"]), archive, cfg)


# --- 11: leftovers of a killed run are cleaned, only by their owner's successors ------------------------------


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_killed_download_leaves_a_partial_the_next_run_takes_over(hostile, tmp_path: Path) -> None:
    body = random.Random(6).randbytes(2_000_000)
    plan = Plan(["trickle"], body=body, etag='"v1"')  # ~10 s for the whole file: killed well before
    url, dest = hostile(plan), tmp_path / "data.bin"
    code = f"from llmcore.download import download; download({url!r}, {str(dest)!r}, progress=False)"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not any(p.stat().st_size > 100_000 for p in tmp_path.glob("*.part.tmp")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    [partial] = tmp_path.glob("*.part.tmp")  # what the killed run left behind
    have = partial.stat().st_size
    assert have > 100_000
    plan.actions = ["ok"]
    first_new = len(plan.seen)
    assert download(url, dest, **FAST).read_bytes() == body
    assert plan.header(first_new, "Range") == f"bytes={have}-"  # resumed where the killed run stopped
    assert list(tmp_path.glob("*.tmp")) == []  # taken over and finished: nothing left behind


def test_stale_temp_files_of_dead_owners_are_removed(tmp_path: Path) -> None:
    from llmcore.common import temp_owner_tag

    dead, live = dead_pid(), os.getppid()  # our parent outlives this test
    host = temp_owner_tag().split("-", 1)[1]
    stale = tmp_path / f".data.bin.{dead}-{host}.abcd1234.part.tmp"
    alive = tmp_path / f".data.bin.{live}-{host}.efgh5678.part.tmp"
    other_host = tmp_path / f".data.bin.{dead}-00000000.ijkl9012.part.tmp"
    other_file = tmp_path / f".other.bin.{dead}-{host}.mnop3456.part.tmp"
    for p in (stale, alive, other_host, other_file):
        p.write_bytes(b"x")
    with atomic_path(tmp_path / "data.bin") as tmp:
        tmp.write_bytes(b"new")
    assert not stale.exists()  # its owner is dead: a leftover of a killed run
    assert alive.exists() and other_host.exists() and other_file.exists()  # a live writer's; not ours to judge


def test_stale_model_folders_of_dead_owners_are_removed(tmp_path: Path) -> None:
    from llmcore.common import temp_owner_tag
    from llmcore.weights.model_dir import staged_dir

    dead, host = dead_pid(), temp_owner_tag().split("-", 1)[1]
    models = tmp_path / "models"
    stale = models / f".pretrain.{dead}-{host}.x1y2z3.tmp"
    other_stage = models / f".classify.{dead}-{host}.a1b2c3.tmp"
    live = models / f".pretrain.{os.getppid()}-{host}.d4e5f6.tmp"
    for p in (stale, other_stage, live):
        (p / "partial").mkdir(parents=True)
    with staged_dir(models / "pretrain") as tmp:
        (tmp / "model.safetensors").write_bytes(b"w")
    assert not stale.exists()
    assert other_stage.exists() and live.exists()  # another stage's, and a live run's: left alone
    assert (models / "pretrain" / "model.safetensors").read_bytes() == b"w"


def test_a_record_cannot_point_the_resume_outside(hostile, tmp_path: Path) -> None:
    import json

    from llmcore.common import temp_owner_tag

    outside = tmp_path / "outside"
    outside.mkdir()
    host = temp_owner_tag().split("-", 1)[1]
    victim = outside / f".data.bin.{dead_pid()}-{host}.abcd1234.part.tmp"
    victim.write_bytes(b"someone else's")
    out = tmp_path / "out"
    out.mkdir()
    record = {"url": "u", "partial": f"../outside/{victim.name}", "etag": '"v1"', "bytes": 10, "complete": False}
    plan = Plan(["ok"], etag='"v1"')
    url = hostile(plan)
    (out / ".data.bin.download.json").write_text(json.dumps({**record, "url": url}))
    assert download(url, out / "data.bin", **FAST).read_bytes() == BODY
    assert victim.read_bytes() == b"someone else's" and plan.header(0, "Range") is None
