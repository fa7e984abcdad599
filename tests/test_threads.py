"""The CPU thread policy (llmcore/threads.py): CPUs counted from affinity and cgroup quotas, per-workload counts,
the OpenMP spin limit set before torch loads, and what does and does not depend on the thread count."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import llmcore.threads as threads
from llmcore.models.config import ModelConfig
from llmcore.models.generate import SamplingConfig, generate
from llmcore.models.gpt import GPT
from llmcore.params import ParamsError, load_section
from llmcore.training.config import HardwareConfig
from llmcore.training.runtime import init_runtime

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def fake_root(tmp_path: Path, cgroup: str, files: dict[str, str]) -> Path:
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/cgroup").write_text(cgroup)
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_cgroup_v2_quota_caps_the_cpu_count(tmp_path):
    root = fake_root(tmp_path, "0::/user.slice/job\n", {"sys/fs/cgroup/user.slice/job/cpu.max": "150000 100000\n"})
    assert threads.cgroup_cpu_limit(root) == 1.5
    assert threads.available_cpus(root) == 1  # 1.5 CPUs of quota: one thread is never throttled mid-op


def test_cgroup_v2_quota_of_an_ancestor_applies(tmp_path):
    root = fake_root(
        tmp_path,
        "0::/a/b\n",
        {
            "sys/fs/cgroup/a/b/cpu.max": "max 100000\n",
            "sys/fs/cgroup/a/cpu.max": "200000 100000\n",
            "sys/fs/cgroup/cpu.max": "max 100000\n",
        },
    )
    assert threads.cgroup_cpu_limit(root) == 2.0


def test_cgroup_v1_quota(tmp_path):
    root = fake_root(
        tmp_path,
        "5:memory:/docker/x\n4:cpu,cpuacct:/docker/x\n0::/\n",
        {
            "sys/fs/cgroup/cpu,cpuacct/docker/x/cpu.cfs_quota_us": "300000\n",
            "sys/fs/cgroup/cpu,cpuacct/docker/x/cpu.cfs_period_us": "100000\n",
            "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
            "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n",
        },
    )
    assert threads.cgroup_cpu_limit(root) == 3.0


def test_no_quota_means_the_affinity_mask(tmp_path):
    root = fake_root(tmp_path, "0::/\n", {"sys/fs/cgroup/cpu.max": "max 100000\n"})
    assert threads.cgroup_cpu_limit(root) is None
    assert threads.available_cpus(root) == len(os.sched_getaffinity(0))
    assert threads.cgroup_cpu_limit(tmp_path / "nowhere") is None  # no /proc: unknown, not an error


@pytest.mark.parametrize("value, expected", [("auto", None), (None, None), (2, 2), ("3", 3)])
def test_parse_threads(value, expected):
    assert threads.parse_threads(value) == expected


@pytest.mark.parametrize("value", [0, -1, "many", 1.5, True])
def test_parse_threads_refuses(value):
    with pytest.raises(ValueError, match=r"^--threads: expected auto or a positive int, got"):
        threads.parse_threads(value, "--threads")


def test_bad_hardware_threads_names_the_key(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("hardware:\n  threads: lots\n")
    with pytest.raises(ParamsError, match=r"^hardware\.threads: expected auto or a positive int, got 'lots'$"):
        load_section("hardware", HardwareConfig, params)
    params.write_text("hardware:\n  threads: 3\n")
    assert load_section("hardware", HardwareConfig, params).threads == 3
    assert HardwareConfig().threads == "auto"


def test_training_and_inference_counts(monkeypatch):
    monkeypatch.setattr(threads, "available_cpus", lambda root=None: 4)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    narrow = ModelConfig.from_preset("llama3-tiny")
    wide = ModelConfig.from_preset("gpt2-124m")
    assert threads.training_threads("auto") == 4
    assert threads.training_threads("auto", processes=2) == 2  # torchrun's local processes share the CPUs
    assert threads.training_threads(3) == 3  # explicit wins
    assert threads.inference_threads("auto", narrow) == 1
    assert threads.inference_threads("auto", wide) == 4
    assert threads.inference_threads(2, narrow) == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's own setting wins over auto...
    assert threads.training_threads("auto") == 3
    assert threads.inference_threads("auto", narrow) == 3
    assert threads.training_threads("auto", processes=2) == 2  # ...except torchrun's blanket 1-per-worker default
    assert threads.training_threads(1) == 1


def test_init_runtime_applies_auto(monkeypatch):
    monkeypatch.setattr(threads, "available_cpus", lambda root=None: 1)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    init_runtime(HardwareConfig(device="cpu"))
    assert torch.get_num_threads() == 1
    init_runtime(HardwareConfig(device="cpu", threads=2))
    assert torch.get_num_threads() == 2


def test_threads_for_inference_restores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    with threads.threads_for_inference("auto", ModelConfig.from_preset("llama3-tiny")) as n:
        assert n == torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_limit_spinning_leaves_explicit_settings():
    env: dict[str, str] = {}
    threads.limit_spinning(env)
    assert env == {"GOMP_SPINCOUNT": threads.SPIN_COUNT}
    env = {"GOMP_SPINCOUNT": "50000"}
    threads.limit_spinning(env)
    assert env == {"GOMP_SPINCOUNT": "50000"}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    threads.limit_spinning(env)
    assert env == {"OMP_WAIT_POLICY": "ACTIVE"}


@pytest.mark.parametrize("first_import", ["llmcore", "stages", "llmcore.cli"])
def test_spin_limit_is_set_before_torch_loads(first_import):
    """libgomp reads GOMP_SPINCOUNT once, when torch loads it: every entry point must set it before that."""
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    code = f"import sys, os; import {first_import}; print(os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    spin, torch_loaded_before = out.stdout.split()
    assert spin == threads.SPIN_COUNT
    if first_import == "llmcore":
        assert torch_loaded_before == "False"  # the package itself does not load torch


@pytest.mark.parametrize("preset", ["llama3-tiny", "gpt2-tiny"])
def test_inference_does_not_depend_on_the_thread_count(preset):
    """What the README promises: 1 and 2 threads give the same logits and the same tokens (so serving and the
    stages' generation may pick their own count); training gradients are allowed to differ."""
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset(preset, dropout=0.0)).eval()
    prompts = [torch.randint(0, 1024, (n,)).tolist() for n in (5, 17, 40)]
    idx = torch.randint(0, 1024, (4, 64))
    results = []
    for n in (1, 2):
        torch.set_num_threads(n)
        with torch.no_grad():
            logits = model(idx).logits
        results.append(
            (
                logits,
                generate(model, prompts, SamplingConfig(24)),
                generate(model, prompts[:1], SamplingConfig(24, temperature=1.0, seed=3)),
            )
        )
    assert torch.equal(results[0][0], results[1][0])
    assert results[0][1:] == results[1][1:]


def test_serve_refuses_bad_threads(tmp_path):
    from llmcore.cli import app

    result = CliRunner().invoke(app, ["serve", "--model", str(tmp_path), "--threads", "many"])
    assert result.exit_code != 0
    assert "--threads: expected auto or a positive int, got 'many'" in result.output


def test_engine_runs_with_its_thread_count():
    from llmcore.serve.engine import Engine, Finished, Request
    from llmcore.text.tokenizer import Tokenizer

    torch.set_num_threads(2)
    tok = Tokenizer.train("the quick brown fox jumps over the lazy dog. " * 20, vocab_size=270)
    model = GPT(ModelConfig.from_preset("llama3-tiny", vocab_size=tok.vocab_size, dropout=0.0))
    engine = Engine(model, tok, threads=1)
    seen, done = [], threading.Event()

    def sink(event):  # called in the engine's thread
        seen.append(torch.get_num_threads())
        if isinstance(event, Finished):
            done.set()

    try:
        engine.submit(Request([1, 2, 3], SamplingConfig(4), sink))
        assert done.wait(30)
    finally:
        engine.stop()
    assert seen and set(seen) == {1}
