"""benchmarks/timing.py: the one timing and statistics helper of every benchmark."""

from __future__ import annotations

import time

import numpy as np
import pytest

from benchmarks.timing import median, percentile, repeat, spread, stopwatch


def test_repeat_warms_up_then_times_each_call():
    calls = []
    t = repeat(lambda: calls.append(time.sleep(0.01)), reps=3, warmup=2)
    assert len(calls) == 5 and len(t.wall_s) == len(t.cpu_s) == 3
    assert all(0.009 < w < 1.0 for w in t.wall_s)
    assert t.best <= t.median and t.spread >= 0 and t.as_dict() == {"wall_s": t.wall_s, "cpu_s": t.cpu_s}
    assert max(t.cpu_s) < 0.009  # sleeping costs wall time, not this process's CPU


def test_a_time_budget_stops_early_after_at_least_one_call():
    calls = []
    t = repeat(lambda: calls.append(time.sleep(0.05)), reps=100, warmup=0, budget_s=0.12)
    assert 2 <= len(t.wall_s) <= 4 and len(calls) == len(t.wall_s)
    assert len(repeat(lambda: time.sleep(0.02), reps=5, warmup=0, budget_s=0.0).wall_s) == 1


def test_statistics_agree_with_numpy():
    values = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6]
    assert median(values) == np.median(values)
    for q in (0.0, 0.5, 0.95, 1.0):
        assert percentile(values, q) == pytest.approx(np.percentile(values, 100 * q))
    assert spread(values) == pytest.approx((9.0 - 1.0) / np.median(values)) and spread([2.0]) == 0.0
    with pytest.raises(ValueError, match="nothing was timed"):
        median([])


def test_stopwatch_times_a_block():
    with stopwatch() as clock:
        time.sleep(0.02)
    assert 0.019 < clock.seconds < 1.0 and clock.cpu_seconds < 0.019
