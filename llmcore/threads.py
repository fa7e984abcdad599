"""CPU threads: how many this process may use, how many each workload gets, and workers that do not spin.

Three decisions, each from measurements on a 2-core machine with and without one other CPU-bound process
(``python -m benchmarks.busy`` repeats them):

spinning   OpenMP worker threads that finish a parallel region spin, waiting for the next one (libgomp: about
           300,000 iterations, milliseconds). On a machine where another process wants the CPU those spinning
           workers take its time slices, and the thread holding the real work waits for a core: with one other
           busy process, two-thread training ran at 0.1x its idle speed and two-thread decoding at 0.05x.
           ``limit_spinning`` sets ``GOMP_SPINCOUNT`` (unless the environment already has it) before torch
           loads libgomp, so a worker waits briefly and then sleeps: busy training keeps 0.57x of idle, at a
           cost of about 15% idle speed. It runs when ``llmcore`` is imported, so import llmcore (or run
           ``llmcore``, ``python -m stages...``) before torch; the variable is read once, when libgomp loads.
available  ``available_cpus`` counts the CPUs this process may run on (its affinity mask) capped by its cgroup
           CPU quota (containers, CI runners, ``docker --cpus``), not the host's core count.
per work   training uses every available CPU (its matmuls are large); inference (decoding, serving) uses one
           thread for small models, where every op is too small to split and a second thread only adds
           wake-ups (llama3-tiny decodes 2-3x faster on one), and every available CPU for models whose
           matmuls are wide enough to pay (``emb_dim >= PARALLEL_EMB_DIM``: GPT-2 124M decodes 1.5x faster
           on two threads than on one).

``auto`` for training is a function of the machine (its available CPUs), never of the load at the moment, so
rerunning a stage on the same machine gives the same thread count and the same bytes. A different thread count
is a different run: CPU kernels split reductions by thread, so gradients (and the trained weights) differ in the
last bits. Pin ``hardware.threads`` to an integer where runs on different machines must match bit for bit.
Inference outputs (logits, greedy tokens) do not depend on the thread count here.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# libgomp spin iterations before a waiting worker sleeps (default 300,000). 1000 measured best for the ratio
# busy/idle in training (1000: 0.57, 3000: 0.46, 10000: 0.35, default: 0.10) at 85% of the idle speed.
SPIN_COUNT = "1000"
# Inference goes parallel from this model width up (llama3-small-cpu, 256 wide: one thread faster even at 8 rows
# or 64 prompt tokens; gpt2-124m, 768 wide: two threads 1.5x faster at one row).
PARALLEL_EMB_DIM = 512


def limit_spinning(environ: dict[str, str] | None = None) -> None:
    """Cap how long idle OpenMP workers spin (see the module docstring); an explicit setting in the environment wins.

    Only takes effect before torch (libgomp) is loaded; ``OMP_WAIT_POLICY`` set by the user is left to rule."""
    environ = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" not in environ:
        environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)


def available_cpus(root: Path = Path("/")) -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup (v2 or v1) CPU quota, at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_limit(root)
    if quota is not None:
        cpus = min(cpus, max(1, math.floor(quota)))  # 1.5 CPUs of quota: one thread never throttled mid-op
    return max(1, cpus)


def cgroup_cpu_limit(root: Path = Path("/")) -> float | None:
    """The CPU quota (in CPUs) of this process's cgroup or its ancestors, or None when unlimited or unknown."""
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: "0::/path"
            base = root / "sys/fs/cgroup"
            for folder in _ancestors(base, path):
                limits.append(_read_v2(folder / "cpu.max"))
        elif "cpu" in controllers.split(","):  # v1: "4:cpu,cpuacct:/path"
            for mount in ("cpu,cpuacct", "cpu", "cpuacct,cpu"):
                base = root / "sys/fs/cgroup" / mount
                if base.is_dir():
                    for folder in _ancestors(base, path):
                        limits.append(_read_v1(folder))
                    break
    limits = [q for q in limits if q is not None]
    return min(limits) if limits else None


def _ancestors(base: Path, path: str) -> list[Path]:
    """``base/path`` and each parent folder up to ``base`` (a quota set higher up limits this cgroup too)."""
    parts = [p for p in path.strip("/").split("/") if p]
    return [base.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def _read_v2(file: Path) -> float | None:
    try:
        quota, period = file.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _read_v1(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 else quota / period


def parse_threads(value: int | str | None, what: str = "threads") -> int | None:
    """``auto`` (or None, the old spelling) -> None; a positive int (or its digits) -> the int; anything else: a
    ValueError naming ``what``."""
    if value is None or value == "auto":
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what}: expected auto or a positive int, got {value!r}")
    return value


def training_threads(setting: int | str | None = "auto", processes: int = 1) -> int:
    """Threads for a training process: the explicit setting, else ``OMP_NUM_THREADS`` when the user set it, else
    the available CPUs shared by ``processes`` (torchrun's local workers; torchrun's own blanket
    ``OMP_NUM_THREADS=1`` for them is not the user's choice, so it is not read there)."""
    explicit = parse_threads(setting)
    if explicit is not None:
        return explicit
    env = _env_threads() if processes <= 1 else None
    return env or max(1, available_cpus() // max(1, processes))


def inference_threads(setting: int | str | None, cfg: Any) -> int:
    """Threads for decoding / serving the model of ``cfg`` (a ``ModelConfig``; this module sits below models/):
    the explicit setting, else ``OMP_NUM_THREADS`` when set, else one for narrow models and the available CPUs for
    wide ones (see the module docstring)."""
    explicit = parse_threads(setting) or _env_threads()
    if explicit is not None:
        return explicit
    return available_cpus() if cfg.emb_dim >= PARALLEL_EMB_DIM else 1


def _env_threads() -> int | None:
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


@contextlib.contextmanager
def threads_for_inference(setting: int | str | None, cfg: Any) -> Iterator[int]:
    """Run the block with :func:`inference_threads` torch threads (CPU), then restore the previous count.

    For a stage that trained with all CPUs and then decodes samples with a narrow model. The count may be
    shared by every thread of the process (torch with libgomp), so do not overlap it with work in other threads."""
    import torch

    n, previous = inference_threads(setting, cfg), torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(previous)
