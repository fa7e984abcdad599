"""Small shared helpers: atomic file writes, errors, seeding, device and dtype selection, rank-0 printing."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import socket
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
    either the old file or the complete new one, never a partial write. Its name carries its owner
    (:func:`new_temp`), so the next writer of ``dest`` removes it if a kill left it behind.
    """
    tmp_path = new_temp(dest, suffix)
    try:
        yield tmp_path
        # mkstemp makes the file private (and some writers replace it): give it the mode open() would
        os.chmod(tmp_path, 0o666 & ~current_umask())
        os.replace(tmp_path, dest)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


# Temporary names: ``.<dest name>.<pid>-<host>.<random><suffix>.tmp`` (or ``.old`` for a folder moved aside).
# A kill (SIGKILL, OOM, power) leaves one behind; the next writer of the same ``dest`` removes those whose owner
# is a dead process of this host. Another writer's live file, another destination's, and files from other
# hosts are never touched; "host" is the host name and the pid namespace (a container sharing the disk has its
# own pids, which this process cannot see).
def _host_id() -> str:
    try:
        pid_namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_namespace = ""
    return hashlib.sha1(f"{socket.gethostname()}\0{pid_namespace}".encode()).hexdigest()[:8]


_HOST = _host_id()


def temp_owner_tag() -> str:
    """``<pid>-<host hash>``: who owns a temporary name (read at call time: a forked child is a new owner)."""
    return f"{os.getpid()}-{_HOST}"


def new_temp(dest: str | os.PathLike, suffix: str = "", directory: bool = False) -> Path:
    """Create an empty temporary file (or folder) beside ``dest``, named for its owner; stale ones go first."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(dest)
    prefix = f".{dest.name}.{temp_owner_tag()}."
    if directory:
        return Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix + ".tmp", dir=dest.parent))
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix + ".tmp", dir=dest.parent)
    os.close(fd)
    return Path(tmp)


def temp_owner(path: Path, dest_name: str) -> tuple[int, str] | None:
    """``(pid, host hash)`` if ``path`` is a temporary name of ``dest_name`` (see :func:`new_temp`), else None."""
    m = re.fullmatch(rf"\.{re.escape(dest_name)}\.(\d+)-([0-9a-f]{{8}})\.[^.]+(\..*)?\.(tmp|old)", path.name)
    return (int(m.group(1)), m.group(2)) if m else None


def is_stale_temp(path: Path, dest_name: str) -> bool:
    """True for a temporary name of ``dest_name`` whose owner is a process of this host that no longer runs."""
    owner = temp_owner(path, dest_name)
    return owner is not None and owner[1] == _HOST and not pid_alive(owner[0])


def pid_alive(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":  # on Windows os.kill(pid, 0) would end the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def remove_stale_temps(dest: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and folders of ``dest`` that a killed process left; returns them."""
    dest = Path(dest)
    removed = []
    try:
        entries = list(os.scandir(dest.parent))
    except OSError:
        return removed
    for entry in entries:
        path = Path(entry.path)
        if entry.name.startswith(f".{dest.name}.") and is_stale_temp(path, dest.name):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            removed.append(path)
    return removed


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


def _numbers_only(obj: Any, where: str) -> Any:
    """``obj`` with non-finite floats as None (JSON has no NaN); raises on anything that is not a number."""
    if isinstance(obj, dict):
        return {k: _numbers_only(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, bool) or obj is None or isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    raise TypeError(f"{where}: DVC metrics hold numbers, got {type(obj).__name__} {obj!r}; put it in the run facts")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)  # paths, devices, dtypes


def run_environment() -> dict[str, Any]:
    """Where a stage ran: date, host platform, CPU, Python and (when loaded) torch with its thread count."""
    import datetime
    import platform
    import sys

    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
    }
    torch = sys.modules.get("torch")  # never imported here: torch-free stages stay torch-free
    if torch is not None:
        env["torch"] = torch.__version__
        env["threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
    return env


def _cpu_name() -> str:
    import platform

    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def write_stage_reports(
    folder: str | os.PathLike,
    metrics: dict[str, Any],
    timing: dict[str, Any] | None = None,
    facts: dict[str, Any] | None = None,
) -> None:
    r"""A stage's three report files, each written atomically:

    - ``metrics.json``: the headline numbers a user compares across runs (DVC metrics; numbers only);
    - ``timing.json``: run-time figures that differ on every run and machine (seconds, throughput, MFU;
      also DVC metrics, nested under ``"timing"`` so ``dvc exp show --drop '(.*:)?timing\.'`` hides them);
    - ``facts.json``: what ran and where (names, paths, digests, messages, the environment): read by the
      report, not a DVC metric.

    NaN and infinities become null (JSON has no NaN); a string in ``metrics`` or ``timing`` is a bug.
    """
    folder = Path(folder)
    write_json_atomic(folder / "metrics.json", _numbers_only(metrics, "metrics"))
    # nested under "timing": DVC names the columns timing.<key>, which `--drop '(.*:)?timing\.'` hides
    write_json_atomic(folder / "timing.json", {"timing": _numbers_only(timing or {}, "timing")})
    write_json_atomic(folder / "facts.json", _jsonable({**(facts or {}), "environment": run_environment()}))


def is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def print0(*args, **kwargs) -> None:
    if is_rank0():
        print(*args, **kwargs)


def require_options(ctx: Any) -> None:
    """The options of a Typer callback that also has subcommands (``classify predict``): all required to run the
    stage, none to reach a subcommand, so Click cannot mark them required itself. ``ctx`` is the callback's context;
    the first option left out (None) stops with Click's "Missing option" usage error (exit status 2, as for any
    required option)."""
    import importlib

    import typer

    # the Click that Typer's apps catch and print: click itself, or (newer Typer) its own copy of it
    click_exceptions = importlib.import_module(typer.BadParameter.__module__)
    for param in ctx.command.params:
        if ctx.params.get(param.name) is None:
            raise click_exceptions.MissingParameter(ctx=ctx, param=param)


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
