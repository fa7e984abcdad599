"""benchmarks/busy.py: the --quick run end to end (figures, the busy process cleaned up, each side's environment),
and the busy process killed when the bench is stopped by a signal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmcore.threads import limit_spinning

REPO_ROOT = Path(__file__).resolve().parents[1]
# The environment a user would run the bench in: this test process imported llmcore, which set GOMP_SPINCOUNT
# in os.environ, so it is taken out again (unless it was there before, which llmcore cannot tell us: it never
# overwrites it, so the value would then differ from llmcore's).
OUTER_ENV = {k: v for k, v in os.environ.items() if not (k == "GOMP_SPINCOUNT" and v == "1000")}


def bench_cmd(out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "benchmarks.busy", "--quick", "--out", str(out), *args]


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("busy") / "busy.json"
    proc = subprocess.run(bench_cmd(out), cwd=REPO_ROOT, env=OUTER_ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def measured(report: dict) -> list[tuple[str, str, dict]]:
    return [
        (key, impl, r)
        for key, row in report["workloads"].items()
        for impl, r in row["impls"].items()
        if "skipped" not in r
    ]


def test_every_measurement_has_idle_and_busy_figures(quick):
    report, stdout = quick
    rows = measured(report)
    assert {key.split()[0] for key, impl, _ in rows if impl == "llmcore"} == {"train", "generate", "serve"}
    for key, impl, r in rows:
        for state in ("idle", "busy", "busy_over_idle"):
            assert isinstance(r[state], float) and r[state] > 0, (key, impl, state, r[state])
        assert r["runs"]["idle"]["pid"] != r["runs"]["busy"]["pid"]  # a fresh process for each measurement
    for key, ratios in report["ratios"].items():  # llmcore / peer, idle and busy
        assert all(v > 0 for peer in ratios.values() for v in peer.values()), key
    assert report["targets"] and all("goal" in t and "met" in t for t in report["targets"])
    # serving's ratios come with the same clients' figures against the HTTP server with no model behind it
    served = {k for k, i, _ in rows if k.startswith("serve") and "engine alone" not in k}
    assert {key for key, impl, _ in rows if impl == "http-floor"} == served
    assert sum("HTTP floor" in t["what"] for t in report["targets"]) == 4  # 2 ratios x idle, busy
    # and the TTFT ratio with the engine's own, the same model with no HTTP (one request; 8 at once)
    alone = {k for k, i, _ in rows if "engine alone" in k and i == "llmcore"}
    assert len(alone) == 2 and all(k.startswith("serve") for k in alone)
    assert sum("engine alone" in t["what"] and "TTFT" in t["what"] for t in report["targets"]) == 2
    assert "| workload | unit | llmcore idle | busy | busy/idle |" in stdout
    assert report["table"] in stdout


def test_the_busy_process_is_gone(quick):
    report, _ = quick
    pids = report["meta"]["hog_pids"]
    busy_runs = {r["runs"]["busy"]["pid"] for _, _, r in measured(report)}  # serving's rows share one run
    assert len(pids) == len(set(pids)) >= len(busy_runs) > 0  # one per busy measurement
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert not Path(f"/proc/{pid}").exists()


def test_peers_run_in_the_users_environment_and_llmcore_in_its_own(quick):
    report, _ = quick
    outer = OUTER_ENV.get("GOMP_SPINCOUNT")
    assert report["meta"]["outer_env"]["GOMP_SPINCOUNT"] == outer
    ours = dict(OUTER_ENV)
    limit_spinning(ours)  # what importing llmcore does to this environment
    peers = 0
    for key, impl, r in measured(report):
        for run in r["runs"].values():
            want = ours.get("GOMP_SPINCOUNT") if impl in ("llmcore", "http-floor") else outer  # the floor: our server
            assert run["env_at_load"]["GOMP_SPINCOUNT"] == want, (key, impl)
            assert run["env"]["GOMP_SPINCOUNT"] == want, (key, impl)
            assert run["threads"] >= 1
            peers += impl not in ("llmcore", "http-floor")
    if "OMP_WAIT_POLICY" not in OUTER_ENV:
        assert ours["GOMP_SPINCOUNT"] is not None  # the two sides really differ
    if not peers:
        pytest.skip("no peer installed (llama-cpp-python): only llmcore's side checked")


def _children_running(pid: int, marker: str) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes().decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and marker in cmdline:
            found.append(int(stat.parent.name))
    return found


def test_a_signal_stops_the_bench_and_its_busy_process(tmp_path):
    bench = subprocess.Popen(
        bench_cmd(tmp_path / "busy.json", "--only", "train"),
        cwd=REPO_ROOT,
        env=OUTER_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline, hogs = time.monotonic() + 60, []
        while not hogs and bench.poll() is None and time.monotonic() < deadline:
            hogs = _children_running(bench.pid, "while True")
            time.sleep(0.05)
        assert hogs, "the busy process never started"
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=30) == 128 + signal.SIGTERM
        for pid in hogs:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
