"""The DVC pipeline from a clean copy of the repository, with the mirror served over loopback HTTP.

These run real ``dvc repro`` subprocesses: the repository's tracked files are copied to a temp folder
(a stand-in for a fresh clone), so nothing here touches the working tree's data/ or reports/.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from llmcore.training.state import checkpoints
from tests import stage_io
from tests.conftest import REPO_ROOT
from tools import deps

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
    assert ran_stages(first.stdout) == ["check-params", "download", "tokenize"]
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
    assert ran_stages(changed.stdout) == ["check-params", "tokenize"]  # params.yaml is check-params' dep
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
    paths = ["--raw-dir", out / "raw", "--reports", out / "reports"]
    paths += ["--out", out / "tokens", "--work", out / "work"] if stage == "tokenize" else []
    proc = run(
        [sys.executable, "-m", f"stages.{stage}", "--params", str(bad), *map(str, paths)], repo, env, check=False
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not out.exists()  # nothing written


# Small enough for CI: every stage runs for real, on tiny settings (a couple of minutes in all).
TINY = {
    "tokenize": {"vocab_size": 512},
    "model": {"preset": "llama3-tiny", "context_length": 128, "n_layers": 2, "emb_dim": 64, "hidden_dim": 160},
    "hardware": {"threads": 1},
    "pretrain": {
        "train": {"max_steps": 30, "eval_every": 15, "eval_batches": 2, "checkpoint_every": 15},
        "sample": {"max_new_tokens": 20},
    },
    "classify": {"train": {"epochs": 1, "max_steps": 20, "eval_every": 20, "eval_batches": 2, "checkpoint_every": 20}},
    "instruct": {
        "train": {"epochs": 1, "max_steps": 20, "eval_every": 20, "eval_batches": 2},
        "generate": {"max_new_tokens": 12},
    },
    "align": {
        "train": {"epochs": None, "max_steps": 10, "eval_every": 10, "eval_batches": 2},
        "generate": {"max_new_tokens": 12},
    },
    "evaluate": {"judge_mode": "required", "judge": {"model": "judge", "timeout": 60, "retries": 1}, "n_boot": 200},
}


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(base.get(k, {}), v) if isinstance(v, dict) else v
    return out


@pytest.fixture(scope="module")
def judge_server(tmp_path_factory):
    """`llmcore serve` as the judge, on loopback: a model whose answer to any prompt is "85" (fast, parsable)."""
    import threading

    from llmcore.serve.app import make_server
    from llmcore.serve.models import ModelHandle
    from tests.fixed_reply import save_fixed_reply_model

    folder = save_fixed_reply_model(tmp_path_factory.mktemp("judge"), "85")
    server = make_server({"judge:latest": ModelHandle.load(folder, template="raw")}, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.url
    server.shutdown()


@dataclass
class Tiny:
    repo: Path
    env: dict[str, str]
    first: str  # `dvc repro`'s output
    outs: dict[str, str]  # dvc.lock after it: out path -> md5
    io_logs: Path  # what each stage process read and wrote during `dvc repro` (tests/stage_io.py)
    sweep: dict = field(default_factory=dict)  # (preset, lr) -> (experiment name, rev, val loss)


def lock_outs(repo: Path) -> dict[str, str]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for stage in lock["stages"].values() for o in stage.get("outs", [])}


def commit(repo: Path, message: str) -> None:
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", message], cwd=repo, check=True)


def dvc(repo: Path, env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "dvc", *args], repo, env, check=check)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, mirror_url, judge_server) -> Tiny:
    """The whole pipeline on TINY params from a clean copy, run once (`dvc repro`) and committed; the tests below
    share it, in file order (a forced rerun, touched files, a queued sweep, the run cache)."""
    repo = clean_copy(tmp_path_factory.mktemp("e2e"))
    params = merge(yaml.safe_load((repo / "params.yaml").read_text()), TINY)
    params["evaluate"]["judge"]["host"] = judge_server
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commit(repo, "tiny params")
    env = dict(os.environ, LLMCORE_MIRROR=mirror_url, DVC_NO_ANALYTICS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    io_logs = tmp_path_factory.mktemp("stage-io")
    traced = dict(env, STAGE_IO_LOG=str(io_logs))  # the first run only: the tracer in every stage process
    traced["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO_ROOT / "tests" / "stage_io_site"), env.get("PYTHONPATH")])
    )
    first = dvc(repo, traced, "repro")
    assert "is empty" not in first.stderr  # DVC warns about every empty output, on every command
    outs = lock_outs(repo)
    commit(repo, "first run")  # dvc.lock and the metrics: experiments start from here
    return Tiny(repo, env, first.stdout, outs, io_logs)


def test_full_pipeline_end_to_end_with_llmcore_serve_as_judge(tiny):
    repo, env = tiny.repo, tiny.env
    assert ran_stages(tiny.first) == [
        "check-params",
        "download",
        "tokenize",
        "pretrain",
        "classify",
        "instruct",
        "preferences",
        "align",
        "evaluate",
        "report",
    ]
    for stage in ("tokenize", "pretrain", "classify", "instruct", "align", "evaluate"):
        assert (repo / f"reports/{stage}/metrics.json").is_file(), stage
    evaluate = json.loads((repo / "reports/evaluate/metrics.json").read_text())
    facts = json.loads((repo / "reports/evaluate/facts.json").read_text())
    assert facts["judge_status"] == "scored" and facts["judge_format"] == "schema"  # {"score": N} by JSON schema
    assert evaluate["n_items"] == 110
    assert evaluate["n_scored"] == 110 and evaluate["n_error"] == 0  # the fixed-reply judge always says 85
    assert len((repo / "reports/evaluate/scores.jsonl").read_text().splitlines()) == 110
    align = json.loads((repo / "reports/align/metrics.json").read_text())
    assert align["steps"] == 10 and align["test_responses"] == 110
    # the book's 985 usable pairs; at context 128 the longer ones are dropped and counted
    assert align["train_pairs"] + align["val_pairs"] + align["dropped_too_long"] == 930 + 55
    compare = evaluate["compare"]
    assert compare["rouge_l"]["n"] == 110 and compare["head_to_head"]["n"] == 110
    base = evaluate["compare_base"]  # the model instruct tuned from, answering the same prompts, judged the same way
    assert base["rouge_l"]["n"] == 110 and base["judge"]["n"] == 110 and base["judge"]["instruct_mean"] == 85.0
    assert len(json.loads((repo / "reports/instruct/base_responses.json").read_text())) == 110
    report = (repo / "reports/report.md").read_text()
    card = report.split("### Run facts")[0]
    assert re.search(r"\| classify \| test accuracy \| [\d.]+% \|", card), card
    assert re.search(r"\| evaluate \| judge mean score \(0-100\) \| [\d.]+ \|", card), card
    assert re.search(r"\| evaluate \| judge mean score \(0-100\), base model \| [\d.]+ \|", card), card
    assert "| align | val DPO loss (nats/pair) | " in card and "skipped" not in card, card
    assert "data:image/svg+xml;base64," in (repo / "reports/report.html").read_text()

    # DVC metrics are numbers: no digests, paths or messages in `dvc metrics show`
    shown = json.loads(dvc(repo, env, "metrics", "show", "--json").stdout)
    leaves = [v for f in shown[""]["data"].values() for v in flatten(f["data"]).values()]
    assert leaves and all(isinstance(v, (int, float)) or v is None for v in leaves)

    again = dvc(repo, env, "repro")
    assert ran_stages(again.stdout) == [], again.stdout


def test_every_stage_reads_its_deps_and_writes_its_outs_and_nothing_else(tiny):
    """The first run, traced (tests/stage_io.py): each stage process's file opens, renames and removals, mapped to
    dvc.yaml's deps and outs of the stage it ran. A read of an undeclared file (DVC would not rerun the stage when it
    changes), a write outside the declared outs (DVC would neither cache nor restore it), or a declared dep or out the
    stage never touches (a stale declaration) fails here, naming the stage and the path."""
    spec = yaml.safe_load((tiny.repo / "dvc.yaml").read_text())
    params = yaml.safe_load((tiny.repo / "params.yaml").read_text())
    logs = stage_io.read_logs(tiny.io_logs)
    traced = {p["argv"][p["argv"].index("-m") + 1] for p in logs}
    assert {f"stages.{s.replace('-', '_')}" for s in ran_stages(tiny.first)} == traced  # every stage that ran, traced
    problems = stage_io.problems(spec, logs, params)
    assert not problems, "\n".join(problems)


def cached_artifacts(repo: Path) -> list[str]:
    """Every stage output but metrics, curves and the report (which show timings): the artifacts that must come
    out byte-identical. Plots that are single tables (the confusion matrix, the score histogram) count."""
    spec = yaml.safe_load((repo / "dvc.yaml").read_text())
    paths = []
    for name, body in spec["stages"].items():
        if name != "report":
            outs = [next(iter(o)) if isinstance(o, dict) else o for o in body.get("outs", [])]
            outs = [o for o in outs if not o.endswith("facts.json")]  # what ran where and when: a date, a host
            plots = [next(iter(o)) if isinstance(o, dict) else o for o in body.get("plots", [])]
            paths += outs + [p for p in plots if p.endswith(".csv")]
    return paths


def test_forced_rerun_gives_identical_bytes(tiny):
    """`dvc repro -f` from scratch (no resumable checkpoints, no judge cache): every artifact's hash in dvc.lock is
    the first run's (token files, tokenizer, the four models, samples, predictions, pairs, responses, scores)."""
    repo = tiny.repo
    shutil.rmtree(repo / ".cache")  # else the trainers resume from their final checkpoints instead of training
    shutil.rmtree(repo / "data" / "cache")  # the judge's answers
    forced = dvc(repo, tiny.env, "repro", "-f")
    assert ran_stages(forced.stdout) == ran_stages(tiny.first)
    artifacts = cached_artifacts(repo)
    assert {
        "data/tokens",
        "data/models/pretrain",
        "data/models/classify",
        "data/models/instruct",
        "data/models/align",
        "data/align/pairs.json",
        "reports/align/responses.json",
        "reports/evaluate/head_to_head.jsonl",
        "reports/instruct/responses.json",
        "reports/evaluate/scores.jsonl",
        "reports/classify/confusion.csv",
        "reports/instruct/base_responses.json",
        "reports/evaluate/base_scores.jsonl",
        "reports/pretrain/samples.md",
        "reports/classify/predictions.csv",
    } <= set(artifacts)
    second = lock_outs(repo)
    differ = [p for p in artifacts if second[p] != tiny.outs[p]]
    assert not differ, f"not byte-identical across two forced runs: {differ}"
    commit(repo, "forced rerun")


# one stage, most stages, the last stage alone
@pytest.mark.parametrize("touched", ["llmcore/data/spam.py", "llmcore/text/bpe.py", "llmcore/report/card.py"])
def test_touching_a_library_file_changes_exactly_the_stages_that_run_it(tiny, touched):
    repo = tiny.repo
    spec = yaml.safe_load((repo / "dvc.yaml").read_text())
    expected = sorted(
        stage.name
        for stage in deps.load_stages(spec)
        if stage.name in spec["stages"]
        and "foreach" not in spec["stages"][stage.name]  # import@: none by default
        and (REPO_ROOT / touched).resolve() in deps.import_closure(stage.script)
    )
    assert expected  # every file here is some stage's code
    if touched == "llmcore/data/spam.py":
        # classify, and check-params, which loads every stage's params (its output never changes: nothing else reruns)
        assert expected == ["check-params", "classify"]
    path = repo / touched
    original = path.read_bytes()
    try:
        path.write_bytes(original + b"\n# touched\n")
        status = json.loads(dvc(repo, tiny.env, "status", "--json").stdout)
    finally:
        path.write_bytes(original)
    assert sorted(status) == expected, status
    for name in expected:
        assert {"changed deps": {touched: "modified"}} in status[name], status[name]
    assert json.loads(dvc(repo, tiny.env, "status", "--json").stdout) == {}


def test_dvc_repro_killed_mid_stage_then_rerun_gives_identical_bytes(tiny):
    """SIGKILL to `dvc repro` and the stage under it after pretrain's first checkpoint; the rerun resumes there
    (DVC clears the dead process's lock) and writes the first run's artifacts."""
    repo = tiny.repo
    shutil.rmtree(repo / ".cache")
    with (repo.parent / "killed.log").open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dvc", "repro", "-f", "-s", "pretrain"],
            cwd=repo,
            env=tiny.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 300
        while proc.poll() is None and not checkpoints(repo / ".cache/pretrain") and time.monotonic() < deadline:
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    saved = checkpoints(repo / ".cache/pretrain")
    assert proc.returncode == -signal.SIGKILL and saved, (repo.parent / "killed.log").read_text()
    assert not (repo / "data/models/pretrain").exists()  # DVC removed the out before running the stage

    again = dvc(repo, tiny.env, "repro", "-f", "-s", "pretrain")
    assert f"resuming from {saved[-1].relative_to(repo)}" in again.stdout, again.stdout
    after = lock_outs(repo)
    for path in ("data/models/pretrain", "reports/pretrain/samples.md"):
        assert after[path] == tiny.outs[path], path
    commit(repo, "killed and resumed")  # (the report is now stale: pretrain's metrics hold new timings)


SWEEP = [("llama3-tiny", 0.002), ("gpt2-tiny", 0.002)]  # a grid of 2 x 1: neither point is the committed run


def test_queued_sweep_runs_and_reads_back(tiny):
    """The README's sweep: `dvc exp run --queue` over a grid, `dvc queue start`, `dvc exp show --json`."""
    repo, env = tiny.repo, tiny.env
    start = time.monotonic()
    dvc(
        repo,
        env,
        "exp",
        "run",
        "--queue",
        "-S",
        "model.preset=llama3-tiny,gpt2-tiny",
        "-S",
        "pretrain.train.lr=0.002",
        "pretrain",
    )
    dvc(repo, env, "queue", "start")
    deadline = time.monotonic() + 480
    while time.monotonic() < deadline:
        status = dvc(repo, env, "queue", "status").stdout
        if not any(word in status for word in ("Queued", "Running")):
            break
        time.sleep(3)
    print(f"2-point sweep: {time.monotonic() - start:.0f} s")
    assert status.count("Success") == 2, status

    shown = json.loads(dvc(repo, env, "exp", "show", "--json").stdout)
    exps = [e for commit in shown for exp in commit.get("experiments") or [] for e in exp["revs"]]
    points = {}
    for exp in exps:
        params = exp["data"]["params"]["params.yaml"]["data"]
        val_loss = exp["data"]["metrics"]["reports/pretrain/metrics.json"]["data"]["val_loss"]
        points[(params["model"]["preset"], params["pretrain"]["train"]["lr"])] = (exp["name"], exp["rev"], val_loss)
    assert set(points) == set(SWEEP), points
    (a, _, loss_a), (b, _, loss_b) = points[SWEEP[0]], points[SWEEP[1]]
    assert loss_a > 0 and loss_b > 0 and loss_a != loss_b
    diff = json.loads(dvc(repo, env, "exp", "diff", a, b, "--json").stdout)
    assert "model.preset" in diff["params"]["params.yaml"]
    plots = dvc(repo, env, "plots", "diff", a, b, "--json").stdout
    assert a in plots and b in plots and "reports/pretrain/live/plots/metrics" in plots
    tiny.sweep = points

    # the README's way to hide the run-time figures from DVC's table
    def timing_cols(args: list[str]) -> list[str]:
        table = dvc(repo, env, "exp", "show", "--csv", *args).stdout
        return [h for h in table.splitlines()[0].split(",") if h.split(":")[-1].startswith("timing.")]

    assert "timing.mfu" in timing_cols([])
    assert timing_cols(["--drop", "(.*:)?timing\\."]) == []

    # and `llmcore compare` on the sweep: the baseline and the two points, side by side
    out = run([sys.executable, "-m", "llmcore.cli", "compare", a, b], repo, env)
    assert "3 runs compared" in out.stdout, out.stdout
    md = (repo / "reports/compare.md").read_text()
    presets = {name: preset for (preset, _), (name, _, _) in points.items()}
    assert f"| model.preset | llama3-tiny | {presets[a]} | {presets[b]} |" in md, md
    assert re.search(r"\| pretrain: val_loss \|.*\*\*", md)  # the best marked
    assert (repo / "reports/compare_figures/pretrain_val_loss.svg").is_file()


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_a_seen_param_set_is_restored_from_the_run_cache(tiny):
    """Rerunning a point of the sweep checks its outputs out of DVC's run cache: the stage does not run."""
    repo, env = tiny.repo, tiny.env
    preset, lr = SWEEP[1]
    name, rev, _ = tiny.sweep[SWEEP[1]]
    again = dvc(repo, env, "exp", "run", "-S", f"model.preset={preset}", "-S", f"pretrain.train.lr={lr}", "pretrain")
    assert "Stage 'pretrain' is cached - skipping run, checking out outputs" in again.stdout, again.stdout
    assert ran_stages(again.stdout) == [] and "rank 0/1" not in again.stdout + again.stderr  # no training
    swept = yaml.safe_load(
        subprocess.run(["git", "show", f"{rev}:dvc.lock"], cwd=repo, check=True, capture_output=True, text=True).stdout
    )
    restored = yaml.safe_load((repo / "dvc.lock").read_text())
    assert restored["stages"]["pretrain"]["outs"] == swept["stages"]["pretrain"]["outs"]
