"""The project's only door to the network: verified, atomic, resumable downloads and safe zip extraction.

Every file the pipeline fetches goes through :func:`download`, which promises one thing: when it returns,
``dest`` holds the complete file (and its sha256 matches, when a digest is given); when it raises, ``dest``
is untouched. Bytes are written to a temporary file beside ``dest`` and renamed into place only after they
verify, so a dropped connection, a truncated body or a wrong digest can never leave a partial file where
the next stage (or DVC's cache) would pick it up.

Offline runs set ``LLMCORE_MIRROR`` to a copy of the files laid out as ``HOST/PATH`` (see
``../shared/README.md``); :func:`resolve_url` maps each real URL onto it.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import time
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath
from urllib.parse import urlsplit
from urllib.request import url2pathname

import requests
from requests.exceptions import ChunkedEncodingError
from tqdm import tqdm

from llmcore.common import LLMCoreError, atomic_path, sha256_file

MIRROR_ENV = "LLMCORE_MIRROR"
CHUNK_SIZE = 1 << 16
RETRY_STATUS = {429, 500, 502, 503, 504}
MAX_RETRY_AFTER = 30.0  # seconds; a server asking for a longer pause gets our own backoff instead
MAX_BACKOFF = 30.0


class _Retryable(Exception):
    """A transient failure worth another attempt (5xx, 429, truncated body); carries Retry-After."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def resolve_url(url: str) -> str:
    """Return where ``url`` is really fetched from: the mirror copy when ``LLMCORE_MIRROR`` is set.

    ``https://HOST/PATH`` maps to ``$LLMCORE_MIRROR/HOST/PATH``. The mirror may be a local directory
    (returned as a ``file://`` URL), a ``file://`` base or an ``http(s)://`` base. Without the variable,
    ``url`` is returned unchanged.
    """
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    if not mirror:
        return url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise LLMCoreError(f"cannot map '{url}' onto the mirror: not an http(s) URL")
    if ".." in parts.path.split("/"):
        raise LLMCoreError(f"cannot map '{url}' onto the mirror: '..' in its path")
    rel = f"{parts.netloc}{parts.path}"
    if mirror.startswith(("http://", "https://", "file://")):
        return f"{mirror.rstrip('/')}/{rel}"
    return f"{Path(mirror).resolve().as_uri()}/{rel}"


def download(
    url: str,
    dest: str | os.PathLike,
    *,
    sha256: str | None = None,
    timeout: tuple[float, float] = (10.0, 60.0),
    retries: int = 5,
    backoff: float = 0.5,
    progress: bool = True,
) -> Path:
    """Fetch ``url`` (through the mirror, if set) to ``dest`` and verify it; skip when already there.

    Args:
        url: the real source URL; :func:`resolve_url` decides where it is read from.
        dest: final path. It only ever appears complete and verified.
        sha256: expected hex digest. Without one, an existing ``dest`` is trusted as is.
        timeout: ``(connect, read)`` seconds; the read timeout bounds each wait for bytes, not the whole body.
        retries: extra attempts after connection errors, timeouts, truncated bodies, 5xx and 429.
        backoff: first retry delay in seconds, doubled on every further retry.
        progress: show a tqdm bar (only when stderr is a terminal).

    Returns:
        ``dest`` as a Path.

    Raises:
        LLMCoreError: a permanent HTTP error (e.g. 404), retries exhausted, a missing mirror file or a
            digest mismatch. ``dest`` is left as it was and no temporary file remains.
    """
    dest = Path(dest)
    expected = _normalise_digest(sha256)
    if dest.is_file() and (expected is None or sha256_file(dest) == expected):
        return dest
    source = resolve_url(url)
    # A unique temp name (not a fixed ``.part``) so two processes fetching the same file cannot interleave;
    # resume therefore works within one call, which is where the retries happen.
    with atomic_path(dest, suffix=".part") as tmp:
        if source.startswith("file://"):
            _copy_local(source, tmp)
        else:
            _fetch_http(source, tmp, timeout, retries, backoff, progress, desc=dest.name)
        if expected is not None:
            actual = sha256_file(tmp)
            if actual != expected:
                raise LLMCoreError(f"{dest}: sha256 mismatch for {source}: expected {expected}, got {actual}")
    return dest


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
    shutil.copyfile(path, tmp)


def _fetch_http(
    url: str,
    tmp: Path,
    timeout: tuple[float, float],
    retries: int,
    backoff: float,
    progress: bool,
    desc: str,
) -> None:
    """Stream ``url`` into ``tmp``, resuming with ``Range`` after transient failures."""
    show = progress and sys.stderr.isatty()
    attempt = 0
    with (
        tmp.open("wb") as f,
        tqdm(unit="B", unit_scale=True, desc=desc, disable=not show, leave=False) as bar,
    ):
        while True:
            try:
                _fetch_once(url, f, bar, timeout)
                return
            except requests.exceptions.SSLError as e:  # a certificate problem will not fix itself
                raise LLMCoreError(f"{url}: TLS error: {e}") from e
            except (requests.ConnectionError, requests.Timeout, ChunkedEncodingError, _Retryable) as e:
                attempt += 1
                if attempt > retries:
                    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                    raise LLMCoreError(f"{url}: failed after {retries} retries: {reason}") from e
                delay = min(backoff * 2 ** (attempt - 1), MAX_BACKOFF)
                retry_after = getattr(e, "retry_after", None)
                if retry_after is not None and retry_after <= MAX_RETRY_AFTER:
                    delay = max(delay, retry_after)
                time.sleep(delay)
            except requests.RequestException as e:  # bad URL, too many redirects, ...
                raise LLMCoreError(f"{url}: {e}") from e


def _fetch_once(url: str, f, bar: tqdm, timeout: tuple[float, float]) -> None:
    """One HTTP attempt, appending to ``f`` from its current size; raises on anything incomplete."""
    have = f.tell()
    # identity: Content-Length and Range then count the bytes we store, not a gzip stream.
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    with requests.get(url, headers=headers, stream=True, timeout=timeout) as r:
        if r.status_code in RETRY_STATUS:
            raise _Retryable(f"HTTP {r.status_code} {r.reason}", _parse_retry_after(r))
        if r.status_code == 416 and have:  # our partial file no longer fits the remote one: start over
            _restart(f, bar)
            raise _Retryable("HTTP 416 on resume")
        if r.status_code not in (200, 206):
            raise LLMCoreError(f"{url}: HTTP {r.status_code} {r.reason}")
        if r.status_code == 206 and _range_start(r) != have:
            _restart(f, bar)
            raise _Retryable(f"bad Content-Range {r.headers.get('Content-Range')!r} for offset {have}")
        if have and r.status_code == 200:  # server ignored Range: it is sending the whole file again
            _restart(f, bar)
        length = r.headers.get("Content-Length")
        total = f.tell() + int(length) if length and length.isdigit() else None
        bar.total = total
        bar.refresh()
        for chunk in r.iter_content(CHUNK_SIZE):
            f.write(chunk)
            bar.update(len(chunk))
        # urllib3 usually catches a short body itself; this check does not depend on that.
        if total is not None and f.tell() != total and not r.headers.get("Content-Encoding"):
            raise _Retryable(f"truncated body: got {f.tell()} of {total} bytes")


def _restart(f, bar: tqdm) -> None:
    f.seek(0)
    f.truncate()
    bar.reset()


def _range_start(r: requests.Response) -> int | None:
    # "bytes START-END/TOTAL"
    value = r.headers.get("Content-Range", "")
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _parse_retry_after(r: requests.Response) -> float | None:
    # Only the delta-seconds form; an HTTP-date falls back to our own backoff.
    try:
        return max(0.0, float(r.headers.get("Retry-After", "")))
    except ValueError:
        return None


def extract_zip(
    zip_path: str | os.PathLike, dest_dir: str | os.PathLike, members: list[str] | None = None
) -> list[Path]:
    """Extract ``members`` (default: every file) of a zip into ``dest_dir``; return the files written.

    Every entry is checked before anything is written: absolute paths, ``..`` components and symlinks
    are refused (a hostile archive could otherwise write outside ``dest_dir``). Each file is written to a
    temporary name and renamed, so an interrupted extraction leaves no half-written member.
    """
    zip_path, dest_dir = Path(zip_path), Path(dest_dir)
    try:
        zf = zipfile.ZipFile(zip_path)
    except FileNotFoundError:
        raise LLMCoreError(f"{zip_path}: no such file") from None
    except zipfile.BadZipFile:
        raise LLMCoreError(f"{zip_path}: not a zip archive") from None
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
        written = []
        for info in infos:
            target = dest_dir / info.filename
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            try:
                with atomic_path(target) as tmp, zf.open(info) as src, tmp.open("wb") as out:
                    shutil.copyfileobj(src, out, CHUNK_SIZE)
            except zipfile.BadZipFile as e:  # e.g. a CRC mismatch, detected while reading
                raise LLMCoreError(f"{zip_path}: corrupt member '{info.filename}': {e}") from None
            written.append(target)
    return written


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
