"""The `instruct` stage end to end on a tiny model: outputs, LoRA, bad input, `ask`, and the reference loss.

The base model is a 2-layer GPT over raw bytes (257 ids), built here; the data is a small synthetic
Alpaca-format set whose outputs are all "OK.", so a few dozen steps teach the model to answer and stop,
and the test can check the answers themselves rather than just their presence.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from llmcore.cli import app as cli
from llmcore.data.instruct import encode_entries, eval_batches
from llmcore.eval.instruct import evaluate_loss, reference_loss
from llmcore.models.config import ModelConfig
from llmcore.models.gpt import GPT
from llmcore.models.responses import generate_responses
from llmcore.text.bpe import ENDOFTEXT, GPT2_PATTERN
from llmcore.text.prompts import format_prompt
from llmcore.text.tokenizer import Tokenizer
from llmcore.weights.model_dir import load_model_dir, save_model_dir
from llmcore.weights.weight_file import read_metadata
from stages.instruct import GenerateParams, app
from tests.resume import curves, kill_after_first_checkpoint, without_timings

N_ENTRIES = 60  # 51 train / 6 test / 3 validation with the book's fractions


def byte_tokenizer() -> Tokenizer:
    return Tokenizer("bpe", "bytes", {ENDOFTEXT: 256}, ranks={bytes([b]): b for b in range(256)}, pattern=GPT2_PATTERN)


def make_entries(n: int = N_ENTRIES) -> list[dict]:
    return [{"instruction": f"Say {i}.", "input": "loud" if i % 3 == 0 else "", "output": "OK."} for i in range(n)]


def write_params(path: Path, **instruct) -> Path:
    params = {
        "base_model": "base",
        "hardware": {"device": "cpu", "threads": 1},  # tiny matmuls: one thread beats two
        "instruct": {
            "dataset": "toy",
            "train": {
                "batch_size": 8,
                "lr": 0.01,
                "min_lr": 0.001,
                "warmup_steps": 5,
                "max_steps": 60,
                "eval_every": 30,
                "eval_batches": None,
                "checkpoint_every": 60,
                "log_every": 10,
                "seed": 1,
            },
            "generate": {"max_new_tokens": 12, "batch_size": 4},
            **instruct,
        },
    }
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module", autouse=True)
def restore_threads():
    """The stage sets torch's thread count from ``hardware.threads``: give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """raw/toy/data.json and models/base/ (a random 2-layer byte-level GPT)."""
    root = tmp_path_factory.mktemp("instruct")
    (root / "raw" / "toy").mkdir(parents=True)
    (root / "raw" / "toy" / "data.json").write_text(json.dumps(make_entries()), encoding="utf-8")
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("gpt2-tiny", vocab_size=257, context_length=192, emb_dim=32, n_layers=2, n_heads=2)
    save_model_dir(root / "models" / "base", GPT(cfg), byte_tokenizer())
    return root


def stage_args(root: Path, params: Path, *extra: str, out: str = "instruct", reports: str = "reports"):
    return [
        "--params",
        str(params),
        "--raw-dir",
        str(root / "raw"),
        "--models-dir",
        str(root / "models"),
        "--out",
        str(root / "models" / out),
        "--reports",
        str(root / reports),
        "--work-dir",
        str(root / f"work-{out}"),
        *extra,
    ]


def invoke(root: Path, params: Path, *extra: str, out: str = "instruct", reports: str = "reports"):
    return CliRunner().invoke(app, stage_args(root, params, *extra, out=out, reports=reports))


@pytest.fixture(scope="module")
def trained(workspace: Path) -> Path:
    result = invoke(workspace, write_params(workspace / "params.yaml"))
    assert result.exit_code == 0, result.output
    return workspace


def test_stage_outputs(trained: Path) -> None:
    responses = json.loads((trained / "reports" / "responses.json").read_text())
    assert len(responses) == 6  # every test entry
    assert [set(r) for r in responses] == [{"id", "instruction", "input", "output", "model_response"}] * 6
    instructions = {e["instruction"] for e in make_entries()}
    assert all(r["instruction"] in instructions and r["output"] == "OK." for r in responses)
    # the model learned to answer and to stop: exactly the answer, no prompt and no new section
    assert [r["model_response"] for r in responses] == ["OK."] * 6

    model_dir = trained / "models" / "instruct"
    meta = read_metadata(model_dir / "model.safetensors")
    assert meta["template"] == "alpaca" and meta["base_model"] == "base" and meta["finetune"] == "full"
    model, tok = load_model_dir(model_dir)
    assert tok.vocab_size == 257 and model.cfg.n_layers == 2

    metrics = json.loads((trained / "reports" / "metrics.json").read_text())
    assert (metrics["train_entries"], metrics["val_entries"], metrics["test_entries"]) == (51, 3, 6)
    assert metrics["steps"] == 60 and metrics["empty_responses"] == 0
    assert metrics["test_loss"] < 1.0 < 5.5  # from ln(257) = 5.55 at random init
    for curve in ("train/loss", "val/loss", "val/ppl"):
        rows = (trained / "reports" / "live" / "plots" / "metrics" / f"{curve}.tsv").read_text().splitlines()
        assert rows[0].split("\t")[:2] == ["step", curve.split("/")[1]] and len(rows) > 2


def test_the_base_model_answers_the_same_test_prompts(trained: Path) -> None:
    """base_responses.json: the model instruct tuned from answers the same formatted test prompts with the same
    generation params (the evaluate stage judges both, so the report says what tuning bought)."""
    responses = json.loads((trained / "reports" / "responses.json").read_text())
    base_responses = json.loads((trained / "reports" / "base_responses.json").read_text())
    prompts_of = lambda rows: [{k: r[k] for k in ("id", "instruction", "input", "output")} for r in rows]  # noqa: E731
    assert prompts_of(base_responses) == prompts_of(responses)
    model, tok = load_model_dir(trained / "models" / "base")
    gen = GenerateParams(max_new_tokens=12, batch_size=4)  # write_params' instruct.generate
    prompts = [format_prompt("alpaca", r["instruction"], r["input"]) for r in responses]
    expected = generate_responses(model, tok, prompts, gen.sampling(), gen.batch_size, gen.stop_at_section)
    assert [r["model_response"] for r in base_responses] == expected
    assert expected != ["OK."] * 6  # the untuned model does not answer like the tuned one
    timing = json.loads((trained / "reports" / "timing.json").read_text())["timing"]
    assert timing["base_generate_seconds"] >= 0


def test_ask_streams_the_answer(trained: Path) -> None:
    model = str(trained / "models" / "instruct")
    result = CliRunner().invoke(cli, ["ask", "--model", model, "Say 7."])
    assert result.exit_code == 0, result.output
    assert result.output == "OK.\n"
    from_stdin = CliRunner().invoke(cli, ["ask", "--model", model, "--input", "loud"], input="Say 9.\n")
    assert from_stdin.exit_code == 0 and from_stdin.output == "OK.\n"
    empty = CliRunner().invoke(cli, ["ask", "--model", model], input="  \n")
    assert empty.exit_code == 1 and "error: ask: empty instruction" in empty.output
    missing = CliRunner().invoke(cli, ["ask", "--model", str(trained / "nowhere"), "Hi"])
    assert missing.exit_code == 1 and "nowhere: no such model folder" in missing.output
    eager = CliRunner().invoke(cli, ["ask", "--model", model, "--compiled-decode", "never", "Say 7."])
    assert eager.exit_code == 0 and eager.output == "OK.\n"
    odd = CliRunner().invoke(cli, ["ask", "--model", model, "--compiled-decode", "sometimes", "Say 7."])
    assert odd.exit_code == 1 and "--compiled-decode must be one of auto|always|never" in odd.output
    for threads in ("1", "2", "auto"):  # the same greedy answer at any thread count
        run = CliRunner().invoke(cli, ["ask", "--model", model, "--threads", threads, "Say 7."])
        assert run.exit_code == 0 and run.output == "OK.\n", (threads, run.output)
    zero = CliRunner().invoke(cli, ["ask", "--model", model, "--threads", "0", "Say 7."])
    assert zero.exit_code == 1 and "ask: --threads: expected auto or a positive int, got 0" in zero.output


def test_reference_loss_scores_only_the_response(trained: Path) -> None:
    model_dir, responses = trained / "models" / "instruct", trained / "reports" / "responses.json"
    got = reference_loss(model_dir, responses, batch_size=4)
    model, tok = load_model_dir(model_dir)
    entries = json.loads(responses.read_text())
    examples = encode_entries(entries, tok, "alpaca")
    expected = evaluate_loss(model, eval_batches(examples, 2, tok.eot_id, mask_prompt=True))
    assert got["reference_loss"] == pytest.approx(expected, abs=1e-4)
    assert got["reference_tokens"] == 6 * len(b"OK.") + 6  # response bytes + one end-of-text each
    assert got["reference_perplexity"] > 1.0


def test_lora_with_custom_template(workspace: Path) -> None:
    template = "Q: {instruction} {input}\nA: "
    params = write_params(
        workspace / "lora.yaml",
        finetune="lora",
        template=template,
        mask_prompt=True,
        lora={"rank": 4, "alpha": 8.0, "dropout": 0.0},
    )
    result = invoke(workspace, params, out="lora", reports="reports-lora")
    assert result.exit_code == 0, result.output
    base, _ = load_model_dir(workspace / "models" / "base")
    tuned, _ = load_model_dir(workspace / "models" / "lora")
    base_state, tuned_state = base.state_dict(), tuned.state_dict()
    assert base_state.keys() == tuned_state.keys()  # merged: plain nn.Linear, the base architecture
    changed = [k for k in base_state if not torch.equal(base_state[k], tuned_state[k])]
    assert changed and all(
        k.endswith(("qkv.weight", "attn.proj.weight", "fc.weight", "mlp.proj.weight")) for k in changed
    )  # only the adapted layers moved
    assert read_metadata(workspace / "models" / "lora" / "model.safetensors")["template"] == template
    metrics = json.loads((workspace / "reports-lora" / "metrics.json").read_text())
    facts = json.loads((workspace / "reports-lora" / "facts.json").read_text())
    assert facts["finetune"] == "lora" and metrics["trainable_params"] < base.num_params() / 4
    ask = CliRunner().invoke(cli, ["ask", "--model", str(workspace / "models" / "lora"), "Say 3."])
    assert ask.exit_code == 0, ask.output


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"data": [*make_entries(10), {"instruction": "x", "input": ""}]}, "data.json: entry 10: missing key 'output'"),
        ({"data": "not json"}, "data.json: invalid JSON at line 1"),
        ({"instruct": {"template": "{instruction} {output}"}}, "instruct.template: unknown placeholder {output}"),
        ({"instruct": {"finetune": "qlora"}}, "instruct.finetune: expected one of full|lora, got 'qlora'"),
        ({"instruct": {"test_fraction": 0.2}}, "instruct.test_fraction: train_fraction + test_fraction must leave"),
        ({"instruct": {"train": {"batch_size": 0}}}, "batch_size: expected a positive int, got 0"),
        ({"instruct": {"max_length": 4096}}, "instruct.max_length: 4096 exceeds the context length 192 of base"),
        ({"base_model": "missing"}, "models/missing: no such model folder"),
        ({"base_model": "../base"}, "base_model: expected a model folder name"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(workspace: Path, tmp_path: Path, change: dict, message: str):
    raw = tmp_path / "raw"
    (raw / "toy").mkdir(parents=True)
    data = change.get("data", make_entries())
    (raw / "toy" / "data.json").write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    params = yaml.safe_load(write_params(tmp_path / "params.yaml").read_text())
    if "instruct" in change:
        key, value = next(iter(change["instruct"].items()))
        params["instruct"][key] = {**params["instruct"][key], **value} if isinstance(value, dict) else value
    if "base_model" in change:
        params["base_model"] = change["base_model"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    args = [
        "--params",
        str(tmp_path / "params.yaml"),
        "--raw-dir",
        str(raw),
        "--models-dir",
        str(workspace / "models"),
        "--out",
        str(tmp_path / "out"),
        "--reports",
        str(tmp_path / "reports"),
        "--work-dir",
        str(tmp_path / "work"),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "reports").exists()


def test_kill_9_then_rerun_writes_the_bytes_of_an_uninterrupted_run(workspace: Path, tmp_path: Path) -> None:
    """SIGKILL mid-training, then the same command again: it resumes from the last checkpoint and every output
    (weights, tokenizer, responses.json, metrics but timings, curves) equals a run never killed."""
    train = {
        "batch_size": 8,
        "lr": 0.01,
        "min_lr": 0.001,
        "warmup_steps": 5,
        "max_steps": 50,
        "eval_every": 25,
        "eval_batches": None,
        "checkpoint_every": 10,
        "log_every": 10,
        "seed": 1,
    }
    params = write_params(tmp_path / "params.yaml", train=train)
    result = invoke(workspace, params, out="ref", reports="ref-reports")
    assert result.exit_code == 0, result.output
    args = stage_args(workspace, params, out="killed", reports="killed-reports")
    cmd = [sys.executable, "-m", "stages.instruct", *args]
    saved = kill_after_first_checkpoint(cmd, workspace / "work-killed", tmp_path / "killed.log")
    assert saved[-1].name < "step_00000050" and not (workspace / "models" / "killed").exists()

    result = invoke(workspace, params, out="killed", reports="killed-reports")
    assert result.exit_code == 0, result.output
    assert f"resuming from {saved[-1]}" in result.output
    ref, run = workspace / "models" / "ref", workspace / "models" / "killed"
    for name in ("model.safetensors", "tokenizer.json"):
        assert (run / name).read_bytes() == (ref / name).read_bytes(), name
    for name in ("responses.json", "base_responses.json"):
        assert (workspace / "killed-reports" / name).read_bytes() == (workspace / "ref-reports" / name).read_bytes()
    metrics = [json.loads((workspace / d / "metrics.json").read_text()) for d in ("ref-reports", "killed-reports")]
    assert without_timings(metrics[1]) == without_timings(metrics[0])
    assert curves(workspace / "killed-reports") == curves(workspace / "ref-reports")
