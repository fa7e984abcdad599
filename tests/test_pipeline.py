"""The DVC pipeline from a clean copy of the repository, with the mirror served over loopback HTTP.

These run real ``dvc repro`` subprocesses: the repository's tracked files are copied to a temp folder
(a stand-in for a fresh clone), so nothing here touches the working tree's data/ or reports/.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def clean_copy(dest: Path) -> Path:
    """Copy what a clone would hold (tracked + untracked-not-ignored files) and commit it there."""
    files = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO_ROOT, check=True, capture_output=True
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, files):
        src = REPO_ROOT / name
        if src.is_file() and not name.startswith(("data/", "reports/")) or name.endswith(".gitignore"):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    (dest / "dvc.lock").unlink(missing_ok=True)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "clean copy"], cwd=dest, check=True)
    return dest


def run(cmd: list[str], repo: Path, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def repo_env(tmp_path_factory, mirror_url):
    repo = clean_copy(tmp_path_factory.mktemp("clone"))
    env = dict(os.environ, LLMCORE_MIRROR=mirror_url, DVC_NO_ANALYTICS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # `python` = this venv
    return repo, env


def ran_stages(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]


def test_repro_tokenize_is_cached_and_reruns_only_what_changed(repo_env):
    repo, env = repo_env
    first = run([sys.executable, "-m", "dvc", "repro", "tokenize"], repo, env)
    assert ran_stages(first.stdout) == ["download", "tokenize"]
    meta = json.loads((repo / "data/tokens/meta.json").read_text())
    assert meta["vocab_size"] == 1024 and meta["train_tokens"] > 100_000
    metrics = json.loads((repo / "reports/tokenize/metrics.json").read_text())
    assert 2.0 < metrics["bytes_per_token"] < 4.0

    again = run([sys.executable, "-m", "dvc", "repro", "tokenize"], repo, env)
    assert ran_stages(again.stdout) == []

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["tokenize"]["vocab_size"] = 512
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = run([sys.executable, "-m", "dvc", "repro", "tokenize"], repo, env)
    assert ran_stages(changed.stdout) == ["tokenize"]
    assert json.loads((repo / "data/tokens/meta.json").read_text())["vocab_size"] == 512


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda p: p["tokenize"].update(vocab_size="big"), "tokenize.vocab_size: expected int, got 'big'"),
        (lambda p: p["tokenize"].update(vocab_sise=512), "tokenize.vocab_sise: unknown key"),
        (lambda p: p["tokenize"].update(kind="wordpiece"), "tokenize.kind: expected one of bpe|gpt2|char"),
        (lambda p: p.pop("tokenize"), "tokenize: missing section"),
        (lambda p: p["download"]["sources"]["the-verdict"].update(check="md5"), "the-verdict.check"),
    ],
)
def test_malformed_params_exit_nonzero_with_one_line(repo_env, tmp_path, edit, message):
    repo, env = repo_env
    params = yaml.safe_load((repo / "params.yaml").read_text())
    edit(params)
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(params))
    stage = "download" if "sources" in message or "check" in message else "tokenize"
    out = tmp_path / "out"
    proc = run(
        [sys.executable, "-m", f"stages.{stage}", "--params", str(bad), "--reports", str(out / "reports")],
        repo, env, check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not out.exists()  # nothing written


# Small enough for CI: every stage runs for real, on tiny settings (a couple of minutes in all).
TINY = {
    "tokenize": {"vocab_size": 512},
    "model": {"preset": "llama3-tiny", "context_length": 128, "n_layers": 2, "emb_dim": 64, "hidden_dim": 160},
    "hardware": {"threads": 1},
    "pretrain": {"train": {"max_steps": 30, "eval_every": 15, "eval_batches": 2, "checkpoint_every": 15},
                 "sample": {"max_new_tokens": 20}},
    "classify": {"train": {"epochs": 1, "eval_every": 65, "checkpoint_every": 65}},
    "instruct": {"train": {"epochs": 1, "eval_every": 100, "eval_batches": 2}, "generate": {"max_new_tokens": 12}},
    "align": {"train": {"epochs": None, "max_steps": 10, "eval_every": 10, "eval_batches": 2},
              "generate": {"max_new_tokens": 12}},
    "evaluate": {"judge_mode": "required", "judge": {"model": "judge", "timeout": 60, "retries": 1},
                 "n_boot": 200},
}  # fmt: skip


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(base.get(k, {}), v) if isinstance(v, dict) else v
    return out


@pytest.fixture(scope="module")
def judge_server(tmp_path_factory):
    """`llmcore serve` as the judge, on loopback: a tiny model whose every answer is "85" (a usable score)."""
    import threading

    from llmcore.serve.app import make_server
    from llmcore.serve.models import ModelHandle
    from tests.fixed_reply import save_fixed_reply_model

    path = save_fixed_reply_model(tmp_path_factory.mktemp("judge"), "85")
    server = make_server({"judge:latest": ModelHandle.load(path, template="raw")}, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.url
    server.shutdown()


def test_full_pipeline_end_to_end_with_llmcore_serve_as_judge(tmp_path_factory, mirror_url, judge_server):
    repo = clean_copy(tmp_path_factory.mktemp("e2e"))
    params = merge(yaml.safe_load((repo / "params.yaml").read_text()), TINY)
    params["evaluate"]["judge"]["host"] = judge_server
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "commit", "-qam", "tiny params"], cwd=repo, check=True)
    env = dict(os.environ, LLMCORE_MIRROR=mirror_url, DVC_NO_ANALYTICS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"

    first = run([sys.executable, "-m", "dvc", "repro"], repo, env)
    assert ran_stages(first.stdout) == [
        "download", "tokenize", "pretrain", "classify", "instruct", "preferences", "align", "evaluate", "report",
    ]  # fmt: skip
    for stage in ("tokenize", "pretrain", "classify", "instruct", "align", "evaluate"):
        assert (repo / f"reports/{stage}/metrics.json").is_file(), stage
    evaluate = json.loads((repo / "reports/evaluate/metrics.json").read_text())
    assert evaluate["judge_status"] == "scored" and evaluate["n_items"] == 110
    assert evaluate["n_scored"] == 110 and evaluate["n_error"] == 0  # the fixed-reply judge always says 85
    assert len((repo / "reports/evaluate/scores.jsonl").read_text().splitlines()) == 110
    align = json.loads((repo / "reports/align/metrics.json").read_text())
    assert align["steps"] == 10 and align["test_responses"] == 110
    # the book's 985 usable pairs; at context 128 the longer ones are dropped and counted
    assert align["train_pairs"] + align["val_pairs"] + align["dropped_too_long"] == 930 + 55
    compare = evaluate["compare"]
    assert compare["rouge_l"]["n"] == 110 and compare["head_to_head"]["n"] == 110
    report = (repo / "reports/report.md").read_text()
    assert "## classify" in report and "## evaluate" in report and "Judge skipped" not in report
    assert "<svg" in (repo / "reports/report.html").read_text()

    again = run([sys.executable, "-m", "dvc", "repro"], repo, env)
    assert ran_stages(again.stdout) == [], again.stdout

    # two architectures as experiments, side by side in `dvc exp show`
    for name, preset in (("llama", "llama3-tiny"), ("gpt2", "gpt2-tiny")):
        run([sys.executable, "-m", "dvc", "exp", "run", "-n", name, "-S", f"model.preset={preset}", "pretrain"],
            repo, env)  # fmt: skip
    shown = json.loads(run([sys.executable, "-m", "dvc", "exp", "show", "--json"], repo, env).stdout)
    exps = {e["name"]: e for commit in shown for e in commit.get("experiments") or [] for e in e["revs"]}
    assert {"llama", "gpt2"} <= set(exps)
    for name, preset in (("llama", "llama3-tiny"), ("gpt2", "gpt2-tiny")):
        data = exps[name]["data"]
        assert data["params"]["params.yaml"]["data"]["model"]["preset"] == preset
        assert data["metrics"]["reports/pretrain/metrics.json"]["data"]["val_loss"] > 0
