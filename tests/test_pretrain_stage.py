"""The pretrain stage end to end on a tiny model and a small repetitive corpus: outputs, kill -9 and resume
(bitwise), and a 2-process DDP run (torchrun, gloo) against a 1-process run with the same global batch."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from llmcore.text.tokenizer import Tokenizer
from llmcore.training.state import checkpoints
from llmcore.weights.model_dir import load_model_dir
from llmcore.weights.weight_file import read_metadata
from stages.pretrain import app

REPO = Path(__file__).resolve().parents[1]
LINES = [
    "To be, or not to be, that is the question.",
    "Whether 'tis nobler in the mind to suffer",
    "The slings and arrows of outrageous fortune,",
    "Or to take arms against a sea of troubles.",
]
SPEAKERS = ["HAMLET", "OPHELIA", "HORATIO"]


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    """A tokens folder as the tokenize stage writes it, from a small repetitive corpus (char tokenizer)."""
    rng = np.random.default_rng(0)
    text = "".join(f"{SPEAKERS[rng.integers(3)]}:\n{LINES[rng.integers(4)]}\n\n" for _ in range(400))
    tok = Tokenizer.char(text)
    split = int(len(text) * 0.9)
    out = tmp_path_factory.mktemp("tokens")
    tok.save(out / "tokenizer.json")
    for name, part in (("train", text[:split]), ("val", text[split:])):
        np.asarray(tok.encode(part, allow_special=False), dtype=np.uint16).tofile(out / f"{name}.bin")
    meta = {"dtype": "uint16", "vocab_size": tok.vocab_size, "eot_id": tok.eot_id, "tokenizer": "char"}
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def write_params(path: Path, hardware: dict | None = None, **train) -> Path:
    params = {
        "model": {
            "preset": "llama3-tiny",
            "context_length": 32,
            "emb_dim": 32,
            "n_layers": 2,
            "n_heads": 4,
            "n_kv_heads": 2,
            "hidden_dim": 64,
        },
        "hardware": {"device": "cpu", "peak_tflops": 1.0, **(hardware or {})},
        "pretrain": {
            "train": {
                "batch_size": 8,
                "lr": 1e-2,
                "min_lr": 1e-3,
                "warmup_steps": 5,
                "max_steps": 30,
                "eval_every": 10,
                "eval_batches": 4,
                "checkpoint_every": 10,
                "log_every": 1,
                **train,
            },
            "prompts": ["HAMLET:\n", ""],
            "sample": {"max_new_tokens": 40, "temperature": 0.5, "seed": 1},
        },
    }
    path.mkdir(parents=True, exist_ok=True)
    (path / "params.yaml").write_text(yaml.safe_dump(params))
    return path / "params.yaml"


def stage_args(run: Path, tokens: Path) -> list[str]:
    return [
        "--params",
        str(run / "params.yaml"),
        "--tokens",
        str(tokens),
        "--out",
        str(run / "model"),
        "--reports",
        str(run / "reports"),
        "--ckpt",
        str(run / "ckpt"),
    ]


def stage_cmd(run: Path, tokens: Path) -> list[str]:
    return [sys.executable, "-m", "stages.pretrain", *stage_args(run, tokens)]


def curve(run: Path, name: str) -> list[tuple[int, float]]:
    with (run / "reports" / "live" / "plots" / "metrics" / f"{name}.tsv").open() as f:
        return [(int(r["step"]), float(r[name.split("/")[-1]])) for r in csv.DictReader(f, delimiter="\t")]


def assert_same_weights(a: Path, b: Path) -> None:
    """Bitwise-equal tensors and equal metadata (safetensors writes its metadata map in a per-process
    random order, so the files' bytes may differ even when every tensor is identical)."""
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta), [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert read_metadata(a) == read_metadata(b)


def run_stage(run: Path, tokens: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(stage_cmd(run, tokens), cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_stage_end_to_end(tmp_path, tokens):
    write_params(tmp_path)
    result = CliRunner().invoke(app, stage_args(tmp_path, tokens))
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    timing = json.loads((tmp_path / "reports" / "timing.json").read_text())["timing"]
    facts = json.loads((tmp_path / "reports" / "facts.json").read_text())
    for key in (
        "train_loss",
        "val_loss",
        "val_ppl",
        "tokens_seen",
        "unigram_val_loss",
        "bigram_val_loss",
        "train_unigram_entropy",
        "step",
    ):
        assert key in metrics, key
    assert set(timing) == {"tokens_per_s", "mfu", "peak_tflops", "train_time_s", "wall_time_s"}
    assert facts["stop_reason"] == "max_steps" and facts["device"] == "cpu" and facts["baseline_k"] > 0
    assert facts["environment"]["torch"] == torch.__version__ and facts["environment"]["threads"] >= 1
    assert metrics["step"] == 30 and metrics["tokens_seen"] == 30 * 8 * 32 and timing["mfu"] > 0
    assert metrics["val_loss"] < metrics["unigram_val_loss"], metrics  # it learned to use context
    samples = (tmp_path / "reports" / "samples.md").read_text()
    assert "HAMLET:" in samples and "(start of text)" in samples
    model, tok = load_model_dir(tmp_path / "model")
    assert tok.to_dict() == Tokenizer.load(tokens / "tokenizer.json").to_dict()
    assert model.cfg.vocab_size == tok.vocab_size and model.cfg.context_length == 32
    assert [s for s, _ in curve(tmp_path, "val/loss")] == [0, 10, 20, 30]
    assert [s for s, _ in curve(tmp_path, "train/loss")] == list(range(1, 31))
    assert (tmp_path / "reports" / "live" / "plots" / "metrics" / "train" / "tokens_per_s.tsv").is_file()

    # Running it again finds the final checkpoint: nothing to train, the same weights.
    shutil.copy(tmp_path / "model" / "model.safetensors", tmp_path / "first.safetensors")
    result = CliRunner().invoke(app, stage_args(tmp_path, tokens))
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "reports" / "facts.json").read_text())["resumed_from"] == 30
    assert_same_weights(tmp_path / "model" / "model.safetensors", tmp_path / "first.safetensors")
    assert [s for s, _ in curve(tmp_path, "val/loss")] == [0, 10, 20, 30]  # restored, not duplicated


class FakeClock:
    """``time`` for llmcore.training.loop: every ``perf_counter()`` call advances by ``tick`` seconds, so each
    optimizer step takes exactly ``tick``."""

    def __init__(self, tick: float):
        self.now, self.tick = 0.0, tick

    def perf_counter(self) -> float:
        self.now += self.tick
        return self.now


def test_a_resumed_run_reports_one_consistent_mfu(tmp_path, tokens, monkeypatch):
    """Segment 1 (10 steps) runs 4x faster than segment 2 (20 steps) on a machine whose measured peak is 4x
    higher; each segment is at 90% MFU, so the whole run is too, and tokens/s, peak and MFU agree."""
    from llmcore.models.config import model_config_from_params
    from llmcore.training import loop

    params = write_params(tmp_path, {"peak_tflops": None}, max_steps=30, time_budget_s=9.5)
    raw = yaml.safe_load(params.read_text())
    vocab = Tokenizer.load(tokens / "tokenizer.json").vocab_size
    fpt = model_config_from_params(raw["model"], vocab_size=vocab).flops_per_token()
    step_tokens = 8 * 32
    peak = fpt * step_tokens / 1.0 / 0.9  # FLOP/s at which a 1 s step is 90% MFU
    peaks = iter([peak, peak / 4])  # the matmul peak of each segment: the second one shares the machine
    monkeypatch.setattr("stages.pretrain.measure_matmul_peak", lambda *a, **k: next(peaks))

    monkeypatch.setattr(loop, "time", FakeClock(1.0))
    result = CliRunner().invoke(app, stage_args(tmp_path, tokens))
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "reports" / "metrics.json").read_text())["step"] == 10

    raw["pretrain"]["train"]["time_budget_s"] = None
    params.write_text(yaml.safe_dump(raw))
    monkeypatch.setattr(loop, "time", FakeClock(4.0))
    result = CliRunner().invoke(app, stage_args(tmp_path, tokens))
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "reports" / "facts.json").read_text())["resumed_from"] == 10
    timing = json.loads((tmp_path / "reports" / "timing.json").read_text())["timing"]
    assert timing["train_time_s"] == 10 * 1.0 + 20 * 4.0
    assert timing["tokens_per_s"] == pytest.approx(30 * step_tokens / 90, abs=0.05)
    assert timing["mfu"] <= 1.0
    assert timing["mfu"] == pytest.approx(0.9)
    # one measurement: tokens/s x FLOPs per token / peak is the MFU, over the same tokens and time
    assert timing["tokens_per_s"] * fpt / (timing["peak_tflops"] * 1e12) == pytest.approx(timing["mfu"], rel=1e-3)


def test_bad_params_stop_with_one_line(tmp_path, tokens):
    write_params(tmp_path, batch_size="eight")
    result = CliRunner().invoke(app, stage_args(tmp_path, tokens))
    assert result.exit_code == 1
    assert "pretrain.train.batch_size: expected int, got 'eight'" in result.output
    assert not (tmp_path / "reports").exists()


def test_kill_9_then_rerun_resumes_bitwise(tmp_path, tokens):
    train = dict(max_steps=100, checkpoint_every=20, eval_every=50, eval_batches=2)
    hw = {"threads": 1}
    ref, run = tmp_path / "ref", tmp_path / "run"
    write_params(ref, hw, **train)
    write_params(run, hw, **train)
    run_stage(ref, tokens)

    with (tmp_path / "killed.log").open("w") as log:
        proc = subprocess.Popen(stage_cmd(run, tokens), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while proc.poll() is None and not checkpoints(run / "ckpt") and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    saved = checkpoints(run / "ckpt")
    assert saved and saved[-1].name < "step_00000100" and not (run / "model").exists()

    out = run_stage(run, tokens)
    assert f"resuming from {saved[-1]}" in out.stdout
    assert_same_weights(run / "model" / "model.safetensors", ref / "model" / "model.safetensors")
    assert curve(run, "train/loss") == curve(ref, "train/loss")  # one row per step, no gap, no duplicate
    assert curve(run, "val/loss") == curve(ref, "val/loss")
    assert json.loads((run / "reports" / "facts.json").read_text())["resumed_from"] == int(saved[-1].name[5:])


def test_two_processes_match_one_with_the_same_global_batch(tmp_path, tokens):
    one, two = tmp_path / "one", tmp_path / "two"
    train = dict(max_steps=8, eval_every=4, checkpoint_every=4)
    write_params(one, {"threads": 1}, batch_size=8, **train)
    write_params(two, {"threads": 1, "nproc": 2}, batch_size=4, **train)
    run_stage(one, tokens)
    out = run_stage(two, tokens, timeout=180)
    assert "launching 2 processes" in out.stdout and "rank 1/2" in out.stdout
    assert json.loads((two / "reports" / "facts.json").read_text())["processes"] == 2
    for name in ("train/loss", "val/loss"):
        a, b = curve(one, name), curve(two, name)
        assert [s for s, _ in a] == [s for s, _ in b]
        assert [v for _, v in b] == pytest.approx([v for _, v in a], rel=1e-4), name
    assert not any(p.name.startswith(".tmp") for p in (two / "ckpt").iterdir())
    assert os.listdir(two / "model") == os.listdir(one / "model")
