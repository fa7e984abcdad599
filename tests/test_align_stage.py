"""The `preferences` and `align` stages end to end on a tiny model, in both preference modes, and the
evaluate stage's instruct-vs-align comparison (judge: `llmcore serve` on loopback).

The instruction model is a random 2-layer GPT over raw bytes; the preference data asks for "OK." over a
rude answer, which a few dozen DPO steps learn. The judge is a hand-built byte "bigram" model served by
llmcore's Ollama-compatible server: with the judge prompt set to ``{input}{reference}{response}`` it answers
one digit that depends on the last byte of the response, then stops — so some answer pairs get different
scores (a preference), some the same (a tie).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from llmcore.data.instruct import split_entries
from llmcore.models.config import ModelConfig
from llmcore.models.gpt import GPT
from llmcore.serve.app import make_server
from llmcore.serve.models import ModelHandle
from llmcore.text.bpe import ENDOFTEXT, GPT2_PATTERN
from llmcore.text.tokenizer import Tokenizer
from llmcore.weights.model_dir import save_model_dir
from llmcore.weights.weight_file import read_metadata
from stages import align, evaluate, preferences

N = 60  # 51 train / 6 test / 3 validation with the book's fractions
JUDGE_TEMPLATE = "{input}{reference}{response}"


def byte_tokenizer() -> Tokenizer:
    return Tokenizer("bpe", "bytes", {ENDOFTEXT: 256}, ranks={bytes([b]): b for b in range(256)}, pattern=GPT2_PATTERN)


def make_entries(n: int = N) -> list[dict]:
    out = [
        {
            "instruction": f"Say {i}.",
            "input": "loud" if i % 3 == 0 else "",
            "output": "OK.",
            "chosen": "OK.",
            "rejected": f"No way, {i}!",
        }
        for i in range(n)
    ]
    out[5]["rejected"] = out[5]["chosen"]  # identical answers: dropped and counted
    return out


def bigram_judge(path: Path) -> None:
    """A GPT whose blocks are identities and whose head reads only the current byte: after a digit it ends
    the text, after any other byte b it writes the digit b % 10."""
    V, D = 257, 264
    cfg = ModelConfig.from_preset(
        "gpt2-tiny", vocab_size=V, context_length=1024, emb_dim=D, n_layers=1, n_heads=2, tie_embeddings=False
    )
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
        model.tok_emb.weight[:, :V] = torch.eye(V)  # one-hot embeddings, no positions
        for b in range(V):
            nxt = 256 if (ord("0") <= b <= ord("9") or b == 256) else ord("0") + b % 10
            model.out_head.weight[nxt, b] = 1.0
    save_model_dir(path, model, byte_tokenizer())


@pytest.fixture(scope="module", autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """raw/prefs/data.json, models/instruct (random byte GPT), instruct_responses.json (its test split)."""
    root = tmp_path_factory.mktemp("align")
    (root / "raw" / "prefs").mkdir(parents=True)
    entries = make_entries()
    (root / "raw" / "prefs" / "data.json").write_text(json.dumps(entries), encoding="utf-8")
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("gpt2-tiny", vocab_size=257, context_length=192, emb_dim=32, n_layers=2, n_heads=2)
    save_model_dir(root / "models" / "instruct", GPT(cfg), byte_tokenizer(), {"template": "alpaca"})
    test = split_entries(entries, 0.85, 0.10, 123)[2]
    responses = [
        {
            "id": str(i),
            "instruction": e["instruction"],
            "input": e["input"],
            "output": e["output"],
            "model_response": "Nope.",
        }
        for i, e in enumerate(test)
    ]
    (root / "instruct_responses.json").write_text(json.dumps(responses), encoding="utf-8")
    bigram_judge(root / "models" / "judge")
    return root


@pytest.fixture(scope="module")
def judge_url(workspace):
    server = make_server({"judge:latest": ModelHandle.load(workspace / "models" / "judge", template="raw")}, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.url
    server.shutdown()


def write_params(root: Path, name: str, judge_host: str | None = None, **align) -> Path:
    params = {
        "hardware": {"device": "cpu", "threads": 1},
        "align": {
            "dataset": "prefs",
            "train": {
                "batch_size": 8,
                "lr": 3e-3,
                "min_lr": 3e-4,
                "warmup_steps": 2,
                "epochs": 3,
                "eval_every": 6,
                "eval_batches": None,
                "checkpoint_every": 100,
                "log_every": 2,
                "seed": 1,
            },
            "pairs": {"max_new_tokens": 8, "batch_size": 32},
            "generate": {"max_new_tokens": 8, "batch_size": 8},
            **align,
        },
        "evaluate": {
            "judge_mode": "required",
            "n_boot": 200,
            # the bigram judge answers in prose (one digit): asked by JSON schema it could only tie
            "judge": {
                "model": "judge",
                "host": judge_host,
                "timeout": 20,
                "retries": 0,
                "schema": False,
                "prompt_template": JUDGE_TEMPLATE,
                "strict_prompt_template": JUDGE_TEMPLATE,
            },
        },
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return path


def run_stages(root: Path, params: Path, tag: str):
    common = ["--params", str(params), "--models-dir", str(root / "models")]
    pairs_args = [
        *common,
        "--raw-dir",
        str(root / "raw"),
        "--out",
        str(root / tag / "pairs.json"),
        "--reports",
        str(root / tag / "reports"),
        "--cache",
        str(root / "judge.jsonl"),
    ]
    result = CliRunner().invoke(preferences.app, pairs_args)
    if result.exit_code != 0:
        return result
    train_args = [
        *common,
        "--pairs",
        str(root / tag / "pairs.json"),
        "--test-prompts",
        str(root / "instruct_responses.json"),
        "--out",
        str(root / "models" / f"align-{tag}"),
        "--reports",
        str(root / tag / "reports"),
        "--work-dir",
        str(root / tag / "work"),
    ]
    return CliRunner().invoke(align.app, train_args)


@pytest.fixture(scope="module")
def aligned(workspace: Path) -> Path:
    result = run_stages(workspace, write_params(workspace, "dataset"), "dataset")
    assert result.exit_code == 0, result.output
    return workspace


def test_dataset_mode_outputs_and_reward_accuracy(aligned: Path) -> None:
    reports = aligned / "dataset" / "reports"
    counts = json.loads((reports / "pairs.json").read_text())
    assert counts == {"entries": 60, "dropped_identical": 1, "test_entries": 6, "train_pairs": 51, "val_pairs": 2}
    pairs = json.loads((aligned / "dataset" / "pairs.json").read_text())
    test_prompts = {r["instruction"] for r in json.loads((aligned / "instruct_responses.json").read_text())}
    assert len(pairs) == 53 and not test_prompts & {p["instruction"] for p in pairs}  # no test prompt trained on

    metrics = json.loads((reports / "metrics.json").read_text())
    assert all(isinstance(v, (int, float)) for v in metrics.values()), "DVC metrics: numbers only"
    assert metrics["val_loss_start"] == pytest.approx(0.6931, abs=1e-3)  # policy = reference at step 0
    assert metrics["val_loss"] < 0.6 and metrics["val_reward_accuracy"] > 0.5
    assert metrics["val_reward_margin"] > 0 and metrics["val_chosen_reward"] > metrics["val_rejected_reward"]
    assert (metrics["train_pairs"], metrics["val_pairs"], metrics["test_prompts_in_train"]) == (51, 2, 0)
    assert metrics["steps"] == 18 and metrics["test_responses"] == 6  # 3 epochs of 6 batches
    info = json.loads((reports / "facts.json").read_text())
    assert info.pop("environment")["cpu_count"] >= 1  # where it ran
    assert info == {"base_model": "instruct", "preferences": "dataset", "finetune": "full", "dataset": "prefs"}

    responses = json.loads((reports / "responses.json").read_text())
    instruct = json.loads((aligned / "instruct_responses.json").read_text())
    assert [(r["id"], r["instruction"]) for r in responses] == [(r["id"], r["instruction"]) for r in instruct]
    meta = read_metadata(aligned / "models" / "align-dataset" / "model.safetensors")
    assert meta["template"] == "alpaca" and meta["stage"] == "align" and meta["base_model"] == "instruct"
    curves = reports / "live" / "plots" / "metrics"
    for curve in (
        "train/loss",
        "train/reward_accuracy",
        "val/loss",
        "val/reward_accuracy",
        "val/reward_margin",
        "val/chosen_reward",
        "val/rejected_reward",
    ):
        assert len((curves / f"{curve}.tsv").read_text().splitlines()) > 2, curve


def test_bad_preference_files_stop_before_training(workspace: Path, tmp_path: Path) -> None:
    entries = make_entries()
    del entries[7]["rejected"]
    (tmp_path / "raw" / "bad").mkdir(parents=True)
    (tmp_path / "raw" / "bad" / "data.json").write_text(json.dumps(entries), encoding="utf-8")
    params = write_params(tmp_path, "bad", dataset="bad")
    result = CliRunner().invoke(
        preferences.app,
        [
            "--params",
            str(params),
            "--raw-dir",
            str(tmp_path / "raw"),
            "--out",
            str(tmp_path / "pairs.json"),
            "--reports",
            str(tmp_path / "r"),
            "--models-dir",
            str(tmp_path / "models"),
            "--cache",
            str(tmp_path / "judge.jsonl"),
        ],
    )
    assert result.exit_code == 1 and result.output.strip().endswith("data.json: entry 7: missing key 'rejected'")
    assert not (tmp_path / "pairs.json").exists()
    params = write_params(tmp_path, "strict", identical="error")
    result = CliRunner().invoke(
        preferences.app,
        [
            "--params",
            str(params),
            "--raw-dir",
            str(workspace / "raw"),
            "--out",
            str(tmp_path / "pairs.json"),
            "--reports",
            str(tmp_path / "r"),
            "--models-dir",
            str(tmp_path / "models"),
            "--cache",
            str(tmp_path / "judge.jsonl"),
        ],
    )
    assert result.exit_code == 1 and "entry 5: 'chosen' and 'rejected' are the same text" in result.output
    params = write_params(tmp_path, "beta", beta=0)
    paths = ["--pairs", "--test-prompts", "--models-dir", "--out", "--reports", "--work-dir"]
    args = ["--params", str(params), *(w for p in paths for w in (p, str(tmp_path / "never" / p[2:])))]
    result = CliRunner().invoke(align.app, args)
    assert result.exit_code == 1 and "align.beta: expected > 0, got 0" in result.output
    assert not (tmp_path / "never").exists()


def test_judge_mode_builds_pairs_from_judged_samples_and_caches_them(workspace: Path, judge_url: str) -> None:
    params = write_params(
        workspace,
        "judge",
        judge_url,
        preferences="judge",
        finetune="lora",
        train={
            "batch_size": 4,
            "lr": 3e-3,
            "min_lr": 3e-4,
            "warmup_steps": 1,
            "max_steps": 4,
            "eval_every": 4,
            "eval_batches": None,
            "checkpoint_every": 4,
            "seed": 1,
        },
    )
    result = run_stages(workspace, params, "judge")
    assert result.exit_code == 0, result.output
    counts = json.loads((workspace / "judge" / "reports" / "pairs.json").read_text())
    not_asked = counts["empty_answers"] + counts["identical_answers"]  # no pair possible: the judge is not asked
    assert counts["prompts"] == 51 + 3 and counts["judged_answers"] == 2 * (54 - not_asked) > 0
    assert counts["judge_requests"] >= counts["judged_answers"] and counts["judge_cached"] == 0  # + strict re-asks
    dropped = not_asked + counts["ties"] + counts["unparsable"] + counts["errors"]
    assert counts["train_pairs"] + counts["val_pairs"] + dropped == 54 and counts["ties"] > 0
    for pair in json.loads((workspace / "judge" / "pairs.json").read_text()):
        assert pair["chosen_score"] > pair["rejected_score"]
        # the bigram judge's verdict: the digit of the answer's last byte (of the whole prompt when empty)
        for side in ("chosen", "rejected"):
            text = (pair["output"] + pair[side]).encode()
            assert pair[f"{side}_score"] == text[-1] % 10
    metrics = json.loads((workspace / "judge" / "reports" / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["train_pairs"] == counts["train_pairs"]
    info = json.loads((workspace / "judge" / "reports" / "pairs_info.json").read_text())
    assert info["preferences"] == "judge" and info["judge_model"] == "judge:latest"

    again = run_stages(workspace, params, "judge")  # a rerun asks the judge nothing
    assert again.exit_code == 0, again.output
    counts2 = json.loads((workspace / "judge" / "reports" / "pairs.json").read_text())
    assert counts2["judge_requests"] == 0 and counts2["judge_cached"] == counts["judged_answers"]
    assert {k: v for k, v in counts2.items() if not k.startswith("judge_")} == {
        k: v for k, v in counts.items() if not k.startswith("judge_")
    }


def test_evaluate_compares_base_instruct_and_align(aligned: Path, judge_url: str, tmp_path: Path) -> None:
    params = write_params(tmp_path, "eval", judge_url)
    instruct = json.loads((aligned / "instruct_responses.json").read_text())
    # the base model's answers: half the instruct model's own ("Nope.", judged 6), half "Hm" (judged 9)
    base = [dict(r, model_response="Nope." if i % 2 else "Hm") for i, r in enumerate(instruct)]
    (tmp_path / "base_responses.json").write_text(json.dumps(base))
    args = [
        "--params",
        str(params),
        "--responses",
        str(aligned / "instruct_responses.json"),
        "--model-dir",
        str(aligned / "models" / "instruct"),
        "--cache",
        str(tmp_path / "cache.jsonl"),
        "--reports",
        str(tmp_path / "reports"),
        "--base-responses",
        str(tmp_path / "base_responses.json"),
        "--align-responses",
        str(aligned / "dataset" / "reports" / "responses.json"),
    ]
    result = CliRunner().invoke(evaluate.app, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    compare = metrics["compare"]
    rouge = compare["rouge_l"]
    assert rouge["n"] == 6 and rouge["instruct_mean"] == 0.0  # "Nope." shares no word with "OK."
    assert rouge["diff_mean"] == pytest.approx(rouge["align_mean"] - rouge["instruct_mean"], abs=1e-4)
    assert rouge["diff_ci95_low"] <= rouge["diff_mean"] <= rouge["diff_ci95_high"]
    judge = compare["judge"]  # the bigram judge scores every answer
    assert judge["n"] == 6 and judge["instruct_ci95_low"] <= judge["instruct_mean"] <= judge["instruct_ci95_high"]
    h2h = compare["head_to_head"]
    assert h2h["n"] == 6 and h2h["align_wins"] + h2h["instruct_wins"] + h2h["ties"] + h2h["undecided"] == 6
    records = [json.loads(x) for x in (tmp_path / "reports" / "head_to_head.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [str(i) for i in range(6)]
    assert h2h["align_shown_first"] == sum(r["b_first"] for r in records)

    # base vs instruct: the same judge, prompt template and seed (an answer both gave is one cached request),
    # paired statistics of instruct - base
    base_vs = metrics["compare_base"]
    assert base_vs["n_items"] == 6 and base_vs["base_rouge_l"] == 0.0 and base_vs["judge_unscored_pairs"] == 0
    assert base_vs["judge"] == pytest.approx(
        {
            "n": 6,
            "base_mean": 7.5,
            "instruct_mean": 6.0,
            "diff_mean": -1.5,
            "instruct_ci95_low": 6.0,
            "instruct_ci95_high": 6.0,
            "base_ci95_low": base_vs["judge"]["base_ci95_low"],
            "base_ci95_high": base_vs["judge"]["base_ci95_high"],
            "diff_ci95_low": base_vs["judge"]["diff_ci95_low"],
            "diff_ci95_high": base_vs["judge"]["diff_ci95_high"],
        }
    )
    assert 6.0 <= base_vs["judge"]["base_ci95_low"] <= 7.5 <= base_vs["judge"]["base_ci95_high"] <= 9.0
    assert base_vs["judge"]["diff_ci95_low"] <= -1.5 <= base_vs["judge"]["diff_ci95_high"] <= 0.0
    scored = [json.loads(x) for x in (tmp_path / "reports" / "base_scores.jsonl").read_text().splitlines()]
    assert [(r["id"], r["score"], r["cached"]) for r in scored] == [
        (str(i), 6 if i % 2 else 9, bool(i % 2)) for i in range(6)
    ]


def test_head_to_head_reads_the_choice_and_undoes_the_order() -> None:
    from llmcore.eval.paired import _order, _record, paired_stats, parse_choice

    assert [parse_choice(t) for t in ("1", "**2**", "Tie.", "Response 2 is better.", "1 or 2", "", None)] == [
        "1",
        "2",
        "tie",
        "2",
        None,
        None,
        None,
    ]
    assert _record("x", b_first=True, raw="1").winner == "b" and _record("x", b_first=False, raw="1").winner == "a"
    assert _record("x", b_first=True, raw="2").winner == "a" and _record("x", b_first=False, raw="tie").winner == "tie"
    orders = [_order(123, str(i)) for i in range(200)]
    assert orders == [_order(123, str(i)) for i in range(200)] and 70 < sum(orders) < 130  # fixed, about half
    stats = paired_stats([1.0, 2.0, 3.0], [2.0, 2.0, 5.0], n_boot=200)
    assert stats["diff_mean"] == pytest.approx(1.0) and stats["diff_ci95_low"] >= 0.0
