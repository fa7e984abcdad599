"""Helpers for the kill-and-rerun tests of the training stages: SIGKILL a stage once it has saved a checkpoint,
then compare what the rerun writes with an uninterrupted run's files."""

from __future__ import annotations

import csv
import re
import signal
import subprocess
import time
from pathlib import Path

from llmcore.training.state import checkpoints
from tests.conftest import REPO_ROOT

TIMING = re.compile(r"seconds|_per_s$|time_s$|^mfu$|peak_tflops")  # metrics that measure the clock, not the run


def kill_after_first_checkpoint(cmd: list[str], work_dir: Path, log: Path, timeout: float = 120) -> list[Path]:
    """Run ``cmd`` (a stage), SIGKILL it as soon as ``work_dir`` holds a checkpoint; returns the checkpoints."""
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while proc.poll() is None and not checkpoints(work_dir) and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed:\n{log.read_text()}"
    saved = checkpoints(work_dir)
    assert saved, "killed before its first checkpoint"
    return saved


def without_timings(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not TIMING.search(k)}


def curves(reports: Path) -> dict[str, list[tuple[str, str]]]:
    """Every dvclive curve under ``reports/live`` as (step, value) rows, wall-clock columns and curves left out."""
    out = {}
    for path in sorted((reports / "live" / "plots" / "metrics").rglob("*.tsv")):
        if TIMING.search(path.stem):
            continue
        with path.open() as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        out[path.relative_to(reports).as_posix()] = [(r["step"], r[path.stem]) for r in rows]
    return out
