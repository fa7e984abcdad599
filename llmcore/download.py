"""The project's only door to the network: verified, atomic, resumable downloads and safe zip extraction.

Every file the pipeline fetches goes through :func:`download`, which promises one thing: when it returns,
``dest`` holds the complete file (and its sha256 matches, when a digest is given); when it raises, ``dest``
is untouched. Bytes are written to a temporary file beside ``dest`` and renamed into place only after they
verify, so a dropped connection, a truncated body or a wrong digest can never leave a partial file where
the next stage (or DVC's cache) would pick it up.

Hostile servers and files (README "Hostile input"): a body is complete only when its length is known and
reached (Content-Length, Content-Range, or a ``Range`` probe past the end answered 416); a transfer that
stalls or drips (fewer than ``STALL_BYTES`` in a stall timeout) is cut and retried with backoff, within a
deadline per file; a file without a pinned digest is trusted on a rerun only if the record written beside it
(``.<name>.download.json``: URL, size, ETag) still matches; an interrupted body with a strong ETag is kept
under its temporary name and resumed by the next run (``If-Range``). Archives are capped in total size and
compression ratio and unpack all or nothing.

Offline runs set ``LLMCORE_MIRROR`` to a copy of the files laid out as ``HOST/PATH`` (see
``../shared/README.md``); :func:`resolve_url` maps each real URL onto it.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import secrets
import shutil
import stat
import sys
import threading
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

import requests
import urllib3
from requests.exceptions import ChunkedEncodingError
from tqdm import tqdm

from llmcore.common import (
    LLMCoreError,
    current_umask,
    is_stale_temp,
    new_temp,
    remove_stale_temps,
    sha256_file,
    temp_owner,
    temp_owner_tag,
    write_json_atomic,
)

MIRROR_ENV = "LLMCORE_MIRROR"
CHUNK_SIZE = 1 << 16
RETRY_STATUS = {429, 500, 502, 503, 504}
MAX_RETRY_AFTER = 30.0  # seconds; a server asking for a longer pause gets our own backoff instead
MAX_BACKOFF = 30.0
STALL_TIMEOUT = 30.0  # seconds: a transfer that receives (almost) nothing for this long is cut and retried
STALL_BYTES = 1024  # "almost nothing": fewer bytes than this in a stall timeout (a server dripping bytes)
DEADLINE = 6 * 3600.0  # seconds one file may take, retries included (GPT-2 XL's 6.4 GB at 0.3 MB/s)
MAX_UNZIP_BYTES = 2 << 30  # an archive may unpack to at most this many bytes ...
MAX_UNZIP_RATIO = 100.0  # ... nor expand more than this many times (deflate's best is ~1030:1: a zip bomb)
RATIO_FLOOR = 1 << 20  # archives unpacking to less than this are not held to the ratio
RECORD_SUFFIX = ".download.json"


class _Retryable(Exception):
    """A transient failure worth another attempt (5xx, 429, truncated body, stall); carries Retry-After."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


# Exceptions of one attempt that another attempt may not repeat (the socket-level ones come straight from
# urllib3 and http.client, since the body is read with ``read1``).
_TRANSIENT = (
    requests.ConnectionError,
    requests.Timeout,
    ChunkedEncodingError,
    _Retryable,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    ConnectionError,
    TimeoutError,
)


def resolve_url(url: str) -> str:
    """Return where ``url`` is really fetched from: the mirror copy when ``LLMCORE_MIRROR`` is set.

    ``https://HOST/PATH`` maps to ``$LLMCORE_MIRROR/HOST/PATH``. The mirror may be a local directory
    (returned as a ``file://`` URL), a ``file://`` base or an ``http(s)://`` base. Without the variable,
    ``url`` is returned unchanged. A path with a ``..`` component, encoded (``%2e%2e``, ``..%2F``) or not,
    is refused: it would read outside the mirror.
    """
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    if not mirror:
        return url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise LLMCoreError(f"cannot map '{url}' onto the mirror: not an http(s) URL")
    decoded = unquote(parts.path)  # what a file mirror (url2pathname) and most HTTP servers see
    if ".." in re.split(r"[/\\]", decoded) or "\0" in decoded:
        raise LLMCoreError(f"cannot map '{url}' onto the mirror: '..' or NUL in its path")
    rel = f"{parts.netloc}{parts.path}"
    if mirror.startswith(("http://", "https://", "file://")):
        return f"{mirror.rstrip('/')}/{rel}"
    return f"{Path(mirror).resolve().as_uri()}/{rel}"


def unreachable(url: str, timeout: float = 10.0) -> str | None:
    """Why ``url``'s server cannot be reached (one attempt, no retries), or None when it answers at all (any
    HTTP status): the quick check before a library that retries for a minute asks it for something."""
    try:
        requests.head(url, timeout=timeout, allow_redirects=False).close()
    except requests.RequestException as e:  # requests nests urllib3's reason in a long message: keep the errno
        errno = re.search(r"\[Errno [^\]]+\] [^'\"()]+", str(e))
        return errno.group(0).strip() if errno else type(e).__name__
    return None


def safe_path(root: str | os.PathLike, relative: str, where: str) -> Path:
    """``root / relative``, refused (one line naming ``where``) unless it stays inside ``root``.

    ``relative`` must already be decoded (``unquote``): checking an encoded name and decoding it afterwards
    is how ``..%2F`` gets through. Absolute paths, ``..`` components, backslashes and NUL are refused, and
    the resolved path (symlinks followed) must lie under the resolved ``root``.
    """
    root = Path(root)
    parts = relative.split("/")
    if (
        not relative
        or relative.startswith("/")
        or PureWindowsPath(relative).is_absolute()
        or "\\" in relative
        or "\0" in relative
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise LLMCoreError(f"{where}: {relative!r} is not a plain relative path (it would leave {root})")
    target = root.joinpath(*parts)
    if not target.resolve().is_relative_to(root.resolve()):
        raise LLMCoreError(f"{where}: {relative!r} leads outside {root} (through a symlink)")
    return target


# --------------------------------------------------------------------------------------------------
# download


@dataclass
class _Transfer:
    """One file being fetched: where from, into which temporary file, and what the server said about it."""

    url: str  # the real source URL (recorded; the mirror may change)
    source: str  # where it is fetched from (resolve_url)
    tmp: Path
    deadline_at: float  # time.monotonic() by which the file must be complete
    connect_timeout: float
    stall_timeout: float
    etag: str | None = None  # strong ETag of the bytes in tmp: resume with If-Range
    total: int | None = None  # the file's full size, once a response said it
    encoded: bool = False  # the server applied a Content-Encoding: stored bytes != offsets, no resume
    recorded: tuple | None = None  # what the record beside dest last said (not rewritten when unchanged)


_IN_USE: set[str] = set()  # partial files a download of this process is writing (not to be adopted)
_IN_USE_LOCK = threading.Lock()


def download(
    url: str,
    dest: str | os.PathLike,
    *,
    sha256: str | None = None,
    timeout: tuple[float, float] = (10.0, STALL_TIMEOUT),
    deadline: float = DEADLINE,
    retries: int = 5,
    backoff: float = 0.5,
    progress: bool = True,
) -> Path:
    """Fetch ``url`` (through the mirror, if set) to ``dest`` and verify it; skip when already there.

    Args:
        url: the real source URL; :func:`resolve_url` decides where it is read from.
        dest: final path. It only ever appears complete and verified.
        sha256: expected hex digest. Without one, an existing ``dest`` is trusted only if the record a
            completed download wrote beside it (``.<name>.download.json``) names the same URL and size.
        timeout: ``(connect, stall)`` seconds; a transfer stalls when fewer than ``STALL_BYTES`` arrive in a
            stall timeout (a silent server or one that drips bytes); the attempt is then cut and retried.
        deadline: seconds the whole file may take, every attempt and wait included.
        retries: extra attempts after connection errors, stalls, truncated bodies, 5xx and 429.
        backoff: first retry delay in seconds, doubled on every further retry.
        progress: show a tqdm bar (only when stderr is a terminal).

    Returns:
        ``dest`` as a Path.

    Raises:
        LLMCoreError: one line naming the URL: a permanent HTTP error (e.g. 404), retries or the deadline
            exhausted, a missing mirror file or a digest mismatch. ``dest`` is left as it was. An interrupted
            body the server gave a strong ETag stays under its temporary name for the next run to resume;
            anything else is removed.
    """
    dest = Path(dest)
    expected = _normalise_digest(sha256)
    record_path = dest.parent / f".{dest.name}{RECORD_SUFFIX}"
    record = _read_record(record_path)
    if dest.is_file():
        if expected is not None and sha256_file(dest) == expected:
            return dest
        if (
            expected is None
            and record.get("complete")
            and record.get("url") == url
            and record.get("bytes") == dest.stat().st_size
        ):
            return dest
    source = resolve_url(url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    t = _Transfer(url, source, Path(), time.monotonic() + deadline, min(timeout[0], timeout[1]), timeout[1])
    t.tmp = _adopt_partial(dest, record, record_path, t) or new_temp(dest, ".part")
    with _IN_USE_LOCK:
        _IN_USE.add(str(t.tmp))
    keep_partial = False
    try:
        if source.startswith("file://"):
            _copy_local(source, t.tmp)
        else:
            try:
                _fetch_http(t, record_path, retries, backoff, progress, desc=dest.name)
            except BaseException:
                keep_partial = t.etag is not None and not t.encoded and t.tmp.is_file() and t.tmp.stat().st_size > 0
                raise
        if expected is not None:
            actual = sha256_file(t.tmp)
            if actual != expected:
                raise LLMCoreError(f"{dest}: sha256 mismatch for {source}: expected {expected}, got {actual}")
        os.chmod(t.tmp, 0o666 & ~current_umask())
        os.replace(t.tmp, dest)
        if expected is None:  # what lets a rerun tell this file is complete
            write_json_atomic(record_path, {"url": url, "bytes": dest.stat().st_size, "etag": t.etag, "complete": True})
        else:  # the digest says it all
            record_path.unlink(missing_ok=True)
    except BaseException:
        if not keep_partial:
            t.tmp.unlink(missing_ok=True)
            if _read_record(record_path).get("partial") == t.tmp.name:
                record_path.unlink(missing_ok=True)
        raise
    finally:
        with _IN_USE_LOCK:
            _IN_USE.discard(str(t.tmp))
    return dest


def _read_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _adopt_partial(dest: Path, record: dict, record_path: Path, t: _Transfer) -> Path | None:
    """Take over the partial body an interrupted run left for the same URL, when it can be resumed safely.

    Only the partial named by the record, only with a strong ETag (sent as If-Range: a changed file restarts),
    and only when its writer is gone (a dead process, or this process's own failed call). It is renamed to a
    name of ours (an atomic claim: a second claimant finds it gone), and the record then names that.
    """
    name, etag = record.get("partial"), record.get("etag")
    if record.get("complete") or record.get("url") != t.url or not isinstance(name, str) or not isinstance(etag, str):
        return None
    partial = dest.parent / name
    if partial.name != name or not name.endswith(".part.tmp"):  # a name beside dest, nothing else
        return None
    owner = temp_owner(partial, dest.name)
    with _IN_USE_LOCK:
        mine = owner is not None and f"{owner[0]}-{owner[1]}" == temp_owner_tag() and str(partial) not in _IN_USE
    if not (mine or is_stale_temp(partial, dest.name)):
        return None
    claimed = dest.parent / f".{dest.name}.{temp_owner_tag()}.{secrets.token_hex(4)}.part.tmp"
    try:
        os.rename(partial, claimed)
    except OSError:
        return None
    remove_stale_temps(dest)  # any other leftovers
    t.tmp, t.etag = claimed, etag
    t.total = record.get("bytes") if isinstance(record.get("bytes"), int) else None
    _record_partial(t, record_path)
    return claimed


def _normalise_digest(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    digest = sha256.strip().lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise LLMCoreError(f"not a sha256 hex digest: '{sha256}'")
    return digest


def _copy_local(source: str, tmp: Path) -> None:
    path = Path(url2pathname(urlsplit(source).path))
    if not path.is_file():
        raise LLMCoreError(f"{source}: not found in the mirror ({path})")
    try:
        shutil.copyfile(path, tmp)
    except OSError as e:
        raise LLMCoreError(f"{source}: cannot copy from the mirror: {e.strerror or e}") from None
    if tmp.stat().st_size != path.stat().st_size:  # the mirror file changed while we read it
        raise LLMCoreError(f"{source}: changed while being copied; try again")


def _fetch_http(t: _Transfer, record_path: Path, retries: int, backoff: float, progress: bool, desc: str) -> None:
    """Stream ``t.source`` into ``t.tmp`` (appending to an adopted partial), retrying and resuming with Range."""
    show = progress and sys.stderr.isatty()
    attempt, probe = 0, False
    with t.tmp.open("r+b") as f, tqdm(unit="B", unit_scale=True, desc=desc, disable=not show, leave=False) as bar:
        f.seek(0, os.SEEK_END)
        bar.update(f.tell())
        while True:
            _check_deadline(t, f, "")
            try:
                if _fetch_once(t, f, bar, record_path, probe):
                    return
                probe = True  # the body ended and nothing said where the file ends: ask for what follows
            except requests.exceptions.SSLError as e:  # a certificate problem will not fix itself
                raise LLMCoreError(f"{t.source}: TLS error: {e}") from e
            except urllib3.exceptions.SSLError as e:
                raise LLMCoreError(f"{t.source}: TLS error: {e}") from e
            except _TRANSIENT as e:
                reason = _reason(e, t)
                attempt += 1
                if attempt > retries:
                    raise LLMCoreError(f"{t.source}: failed after {retries} retries: {reason}") from None
                if t.encoded:  # bytes stored decoded: Range offsets would not match them
                    _restart(f, bar, t)
                delay = min(backoff * 2 ** (attempt - 1), MAX_BACKOFF)
                retry_after = getattr(e, "retry_after", None)
                if retry_after is not None and retry_after <= MAX_RETRY_AFTER:
                    delay = max(delay, retry_after)
                _check_deadline(t, f, reason)
                time.sleep(max(0.0, min(delay, t.deadline_at - time.monotonic())))
                _check_deadline(t, f, reason)
            except requests.RequestException as e:  # bad URL, too many redirects, ...
                raise LLMCoreError(f"{t.source}: {_first_line(e)}") from None


def _check_deadline(t: _Transfer, f, reason: str) -> None:
    if time.monotonic() >= t.deadline_at:
        got = f"{f.tell()} of {t.total if t.total is not None else '?'} bytes"
        raise LLMCoreError(f"{t.source}: gave up at the per-file deadline ({got}){': ' + reason if reason else ''}")


def _reason(e: BaseException, t: _Transfer) -> str:
    if isinstance(e, (requests.ConnectTimeout, urllib3.exceptions.ConnectTimeoutError)):
        return f"no connection within {t.connect_timeout:g} s"
    if isinstance(e, (requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError)):
        return f"stalled: no data for {t.stall_timeout:g} s"
    return _first_line(e) or type(e).__name__


def _first_line(e: BaseException) -> str:
    text = str(e)
    return text.splitlines()[0] if text else type(e).__name__


def _fetch_once(t: _Transfer, f, bar: tqdm, record_path: Path, probe: bool) -> bool:
    """One HTTP request, appending to ``f`` from its current size. True: the file is complete. False: the body
    ended without a length to check it against (the caller probes with Range). Raises on anything else."""
    have = f.tell()
    # identity: Content-Length and Range then count the bytes we store, not a gzip stream.
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
        if t.etag:
            headers["If-Range"] = t.etag  # changed since: the server sends the whole new file (200)
    remaining = t.deadline_at - time.monotonic()
    timeout = (max(0.01, min(t.connect_timeout, remaining)), max(0.01, min(t.stall_timeout, remaining)))
    with requests.get(t.source, headers=headers, stream=True, timeout=timeout) as r:
        if r.status_code in RETRY_STATUS:
            raise _Retryable(f"HTTP {r.status_code} {r.reason}", _parse_retry_after(r))
        if r.status_code == 416 and have:
            if _range_total(r) == have or (probe and _range_total(r) is None):
                return True  # nothing past what we have: it was the whole file
            _restart(f, bar, t)  # our partial file no longer fits the remote one: start over
            raise _Retryable("HTTP 416 on resume")
        if r.status_code not in (200, 206):
            raise LLMCoreError(f"{t.source}: HTTP {r.status_code} {r.reason}")
        length = _content_length(r)
        if r.status_code == 206:
            if _range_start(r) != have or (t.total is not None and _range_total(r) not in (None, t.total)):
                _restart(f, bar, t)
                raise _Retryable(f"bad Content-Range {r.headers.get('Content-Range')!r} for offset {have}")
            t.total = _range_total(r) or t.total
        elif have:  # 200: the server ignored Range (or the file changed): it is sending the whole file again
            if probe and (length is None or length == have):  # cannot say more than we know; or it was all
                return True
            _restart(f, bar, t)
        if r.status_code == 200:
            t.total, t.etag = length, _strong_etag(r)
            t.encoded = bool(r.headers.get("Content-Encoding", "identity") != "identity")
        if t.etag and not t.encoded:
            _record_partial(t, record_path)
        bar.total = t.total
        bar.refresh()
        _read_body(t, r, f, bar)
        if t.encoded:  # urllib3 counts the raw (encoded) bytes: check those against Content-Length
            if length is not None and r.raw.tell() != length:
                raise _Retryable(f"truncated body: got {r.raw.tell()} of {length} encoded bytes")
            return True
        if t.total is not None:
            if f.tell() != t.total:
                raise _Retryable(f"truncated body: got {f.tell()} of {t.total} bytes")
            return True
        return False


def _read_body(t: _Transfer, r: requests.Response, f, bar: tqdm) -> None:
    """Copy the body as it arrives (``read1``: whatever one socket read gives), cutting it off on a stall."""
    window_start, window_bytes = time.monotonic(), 0
    read1 = getattr(r.raw, "read1", None)  # urllib3 >= 2.3; before it, small reads (which wait until they fill)
    while True:
        chunk = read1(CHUNK_SIZE, decode_content=True) if read1 else r.raw.read(STALL_BYTES, decode_content=True)
        if not chunk:
            return
        f.write(chunk)
        bar.update(len(chunk))
        now = time.monotonic()
        window_bytes += len(chunk)
        if now >= t.deadline_at:
            _check_deadline(t, f, "")
        if now - window_start >= t.stall_timeout:
            if window_bytes < STALL_BYTES:
                raise _Retryable(f"stalled: {window_bytes} bytes in {now - window_start:.1f} s")
            window_start, window_bytes = now, 0


def _record_partial(t: _Transfer, record_path: Path) -> None:
    """Say which partial file holds which version of the URL, so an interrupted run's successor can resume."""
    state = (t.tmp.name, t.etag, t.total)
    if state != t.recorded:
        write_json_atomic(
            record_path, {"url": t.url, "partial": t.tmp.name, "etag": t.etag, "bytes": t.total, "complete": False}
        )
        t.recorded = state


def _restart(f, bar: tqdm, t: _Transfer) -> None:
    f.seek(0)
    f.truncate()
    bar.reset()
    t.etag = t.total = None


def _content_length(r: requests.Response) -> int | None:
    value = r.headers.get("Content-Length", "")
    return int(value) if value.isdigit() else None


def _strong_etag(r: requests.Response) -> str | None:
    etag = r.headers.get("ETag")
    return etag if etag and not etag.startswith("W/") and len(etag) < 200 else None  # If-Range needs a strong one


def _range_start(r: requests.Response) -> int | None:
    # "bytes START-END/TOTAL"
    value = r.headers.get("Content-Range", "")
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _range_total(r: requests.Response) -> int | None:
    # "bytes START-END/TOTAL" or "bytes */TOTAL"
    value = r.headers.get("Content-Range", "").rsplit("/", 1)
    return int(value[1]) if len(value) == 2 and value[1].isdigit() else None


def _parse_retry_after(r: requests.Response) -> float | None:
    # Only the delta-seconds form; an HTTP-date falls back to our own backoff.
    try:
        return max(0.0, float(r.headers.get("Retry-After", "")))
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------------
# zip archives


def extract_zip(
    zip_path: str | os.PathLike,
    dest_dir: str | os.PathLike,
    members: list[str] | None = None,
    *,
    max_bytes: int = MAX_UNZIP_BYTES,
    max_ratio: float = MAX_UNZIP_RATIO,
) -> list[Path]:
    """Extract ``members`` (default: every file) of a zip into ``dest_dir``; return the files written.

    Every entry is checked before anything is written: absolute paths, ``..`` components and symlinks
    are refused (a hostile archive could otherwise write outside ``dest_dir``), and so is an archive whose
    members would unpack to more than ``max_bytes`` or expand more than ``max_ratio`` times (a zip bomb;
    archives under ``RATIO_FLOOR`` are exempt from the ratio). The members are unpacked into a temporary
    folder and moved into place only when all of them have verified (CRC), so a corrupt archive leaves
    nothing half-unpacked; the bytes are counted as they come, in case a header lies about its size.
    """
    zip_path, dest_dir = Path(zip_path), Path(dest_dir)
    try:
        zf = zipfile.ZipFile(zip_path)
    except FileNotFoundError:
        raise LLMCoreError(f"{zip_path}: no such file") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError):
        raise LLMCoreError(f"{zip_path}: not a zip archive") from None
    except OSError as e:
        raise LLMCoreError(f"cannot read {zip_path}: {e.strerror or e}") from None
    with zf:
        infos = zf.infolist()
        for info in infos:
            _check_member(zip_path, dest_dir, info)
        if members is not None:
            by_name = {info.filename: info for info in infos}
            missing = [m for m in members if m not in by_name]
            if missing:
                raise LLMCoreError(f"{zip_path}: no member(s) {', '.join(map(repr, missing))}")
            infos = [by_name[m] for m in members]
        infos = list({info.filename: info for info in infos}.values())  # a name twice: the last wins, as in zipfile
        files = [info for info in infos if not info.is_dir()]
        unpacked, packed = sum(i.file_size for i in files), sum(i.compress_size for i in files)
        if unpacked > max_bytes:
            raise LLMCoreError(f"{zip_path}: would unpack to {unpacked} bytes, over the cap of {max_bytes}")
        if unpacked > RATIO_FLOOR and unpacked > max_ratio * max(packed, 1):
            raise LLMCoreError(
                f"{zip_path}: compression ratio {unpacked / max(packed, 1):.0f}:1 is over the cap of "
                f"{max_ratio:g}:1 (a zip bomb?)"
            )
        staging = new_temp(dest_dir / zip_path.name, ".unzip", directory=True)
        try:
            written = 0
            for info in files:
                written += _unpack_member(zf, info, staging / info.filename, zip_path, max_bytes - written)
            out = []
            for info in infos:
                target = dest_dir / info.filename
                target.parent.mkdir(parents=True, exist_ok=True)
                if info.is_dir():
                    target.mkdir(exist_ok=True)
                    continue
                os.replace(staging / info.filename, target)
                out.append(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return out


def _unpack_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, zip_path: Path, budget: int) -> int:
    """Write one member to ``target``; the bytes written. A corrupt stream or a CRC mismatch is one line."""
    target.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    try:
        with zf.open(info) as src, target.open("wb") as out:
            while chunk := src.read(CHUNK_SIZE):
                n += len(chunk)
                if n > budget:
                    raise LLMCoreError(f"{zip_path}: member '{info.filename}' unpacks past the size cap")
                out.write(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, ValueError) as e:
        # CRC mismatch, a broken deflate stream, a truncated one, an unknown method, an encrypted member
        raise LLMCoreError(f"{zip_path}: corrupt member '{info.filename}': {_first_line(e)}") from None
    return n


def _check_member(zip_path: Path, dest_dir: Path, info: zipfile.ZipInfo) -> None:
    name = info.filename
    # Check both flavours: a Windows-style "C:\\x" or "..\\x" is just as hostile to a Windows user.
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or name.startswith("\\"):
        raise LLMCoreError(f"{zip_path}: refusing absolute path entry '{name}'")
    if ".." in name.replace("\\", "/").split("/"):
        raise LLMCoreError(f"{zip_path}: refusing entry with '..' in its path '{name}'")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise LLMCoreError(f"{zip_path}: refusing symlink entry '{name}'")
    root = dest_dir.resolve()
    if not (root / name).resolve().is_relative_to(root):  # e.g. through a symlink already in dest_dir
        raise LLMCoreError(f"{zip_path}: entry '{name}' would land outside {dest_dir}")
