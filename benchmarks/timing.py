"""Timing and its statistics, one way for every benchmark: warm-up, repetitions, median, spread, percentiles.

Every benchmark times with ``time.perf_counter`` (wall clock) beside ``time.process_time`` (this process's CPU),
runs untimed warm-up calls first (allocator, BLAS threads, compiled kernels, caches), and reports the median of
its repetitions: the figure least moved by one slow repetition on a shared machine. The spread (fastest and
slowest) goes with it, so a reader sees how noisy the machine was::

    t = repeat(step, reps=5, warmup=2)
    t.median, t.best, t.spread        # seconds; spread: (max - min) / median
    with stopwatch() as clock:        # one timed region that is no function call
        run()
    clock.seconds
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any


def median(values: Sequence[float]) -> float:
    """The median; a ValueError naming the problem for no values."""
    if not values:
        raise ValueError("median of no timings: nothing was timed")
    return statistics.median(values)


def spread(values: Sequence[float]) -> float:
    """(slowest - fastest) / median: 0 for a quiet machine, 0.5 when repetitions differ by half the median."""
    return (max(values) - min(values)) / median(values) if len(values) > 1 else 0.0


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) with linear interpolation between the closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no timings: nothing was timed")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


@dataclass
class Timings:
    """Wall and process-CPU seconds of each timed repetition."""

    wall_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return median(self.wall_s)

    @property
    def best(self) -> float:
        return min(self.wall_s)

    @property
    def spread(self) -> float:
        return spread(self.wall_s)

    def as_dict(self) -> dict[str, list[float]]:
        return {"wall_s": self.wall_s, "cpu_s": self.cpu_s}


def repeat(fn: Callable[[], Any], reps: int, warmup: int = 1, budget_s: float | None = None) -> Timings:
    """Time ``reps`` calls of ``fn`` after ``warmup`` untimed ones.

    Args:
        fn: what to time, called without arguments.
        reps: timed calls (at least one).
        warmup: untimed calls first.
        budget_s: stop early, after at least one timed call, once this much wall time has gone to the timed
            calls, so that a peer running at a twentieth of its usual speed cannot take the whole run.
    """
    for _ in range(warmup):
        fn()
    out = Timings()
    start = time.perf_counter()
    while len(out.wall_s) < max(reps, 1):
        if out.wall_s and budget_s is not None and time.perf_counter() - start >= budget_s:
            break
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        out.wall_s.append(time.perf_counter() - wall)
        out.cpu_s.append(time.process_time() - cpu)
    return out


@dataclass
class Clock:
    seconds: float = 0.0
    cpu_seconds: float = 0.0


@contextmanager
def stopwatch() -> Iterator[Clock]:
    """Times the ``with`` block: ``clock.seconds`` (wall) and ``clock.cpu_seconds`` once it ends."""
    clock = Clock()
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield clock
    finally:
        clock.seconds = time.perf_counter() - wall
        clock.cpu_seconds = time.process_time() - cpu
