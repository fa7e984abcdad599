"""Small shared helpers: atomic file writes, errors, seeding, device and dtype selection, rank-0 printing."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class LLMCoreError(Exception):
    """An error with a one-line message meant for the user (bad input, bad file, bad param).

    Stage scripts catch it, print ``error: <message>`` and exit non-zero without a traceback.
    """


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on success rename it onto ``dest``, on error remove it.

    The temporary file lives in the same directory so the final ``os.replace`` is atomic: readers see
    either the old file or the complete new one, never a partial write.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix + ".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes the file private (and some writers replace it): give it the mode open() would
        os.chmod(tmp_path, 0o666 & ~current_umask())
        os.replace(tmp_path, dest)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def current_umask() -> int:
    """The process umask (reading it means setting it; set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(dest: str | os.PathLike, text: str) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(dest: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(dest, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks so large checkpoints do not load into memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_json(path: str | os.PathLike, missing_hint: str = "") -> Any:
    """Parse a JSON file; a missing, unreadable or malformed file is a one-line ``LLMCoreError``."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        if missing_hint:  # say which stage should have written it
            raise LLMCoreError(f"{path}: not found ({missing_hint})") from None
        raise LLMCoreError(f"cannot read {path}: {e.strerror or e}") from None
    except OSError as e:
        raise LLMCoreError(f"cannot read {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LLMCoreError(f"{path}: not valid JSON ({e})") from None










def is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def print0(*args, **kwargs) -> None:
    if is_rank0():
        print(*args, **kwargs)


@contextlib.contextmanager
def stage_errors() -> Iterator[None]:
    """Turn an ``LLMCoreError`` into ``error: <one line>`` on stderr and exit status 1 (no traceback).

    Stage scripts wrap their body in it; outputs are written atomically, so nothing half-written stays.
    """
    import sys

    try:
        yield
    except LLMCoreError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
