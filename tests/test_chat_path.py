"""The chat path end to end: the FineWeb profile continuing from pretraining into chat fine-tuning on SmolTalk's
layout (through a temporary mirror, on a tiny shape), then DPO and the evaluate stage on a chat model, and the
report card naming the format.

The profile test runs the profile's own stages (download, tokenize, pretrain, instruct) on the merged params with
only sizes overridden: model shape, vocabulary, steps, batch sizes, split fractions, device. The chat model of the
DPO tests is trained by the instruct stage on two-turn conversations with a system prompt that always answer
"OK."; its judge is the byte "bigram" model of ``tests/test_align_stage.py`` served by ``llmcore serve``.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from typer.testing import CliRunner

from llmcore.cli import app as cli
from llmcore.data.preferences import collate_pairs, encode_pairs
from llmcore.download import MIRROR_ENV
from llmcore.models.config import ModelConfig
from llmcore.models.gpt import GPT
from llmcore.params import merge_params, read_params
from llmcore.report.card import build_report
from llmcore.report.render import to_markdown
from llmcore.serve.app import make_server
from llmcore.serve.models import ModelHandle
from llmcore.text.chat import CHAT_TOKENS, CHATML, IM_END, IM_START, render_chat
from llmcore.text.prompts import entry_prompt_ids
from llmcore.text.tokenizer import Tokenizer
from llmcore.training.dpo import sequence_logps
from llmcore.weights.model_dir import open_model_dir, save_model_dir
from stages import evaluate
from stages.align import app as align_app
from stages.download import app as download_app
from stages.instruct import app as instruct_app
from stages.preferences import app as preferences_app
from stages.pretrain import app as pretrain_app
from stages.tokenize import app as tokenize_app
from tests.test_align_stage import JUDGE_TEMPLATE, bigram_judge
from tests.test_align_stage import make_entries as make_preferences
from tests.test_chat_stage import conversation
from tests.test_shards import make_docs, write_parquet

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "params" / "fineweb-d12.yaml"


def ok(result) -> None:
    assert result.exit_code == 0, result.output


def no_special_text(text: str) -> bool:
    return all(t not in text for t in (*CHAT_TOKENS, "<|endoftext|>"))


# --- the FineWeb profile: pretraining, then chat fine-tuning -------------------------------------------------

# Sizes only: the profile's sources, tokenizer (kind, pattern, reserved tokens), formats and stages stay as it sets
# them. 40 conversations need larger test and validation fractions than 460k do.
TINY = {
    "tokenize": {"vocab_size": 320, "train_chars": 30000, "shard_tokens": 3000, "workers": 1},
    "model": {"context_length": 256, "emb_dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "hidden_dim": 64},
    "hardware": {"device": "cpu", "precision": "fp32", "compile": False, "threads": 1, "peak_tflops": 1.0},
    "pretrain": {
        "train": {
            "batch_size": 8,
            "grad_accum": 1,
            "lr": 1e-2,
            "min_lr": 1e-3,
            "warmup_steps": 2,
            "max_steps": 10,
            "eval_every": 5,
            "eval_batches": 2,
            "checkpoint_every": 10,
            "log_every": 5,
        },
        "sample": {"max_new_tokens": 8},
    },
    "instruct": {
        "train_fraction": 0.8,
        "test_fraction": 0.1,
        "train": {
            "batch_size": 8,
            "grad_accum": 1,
            "lr": 1e-2,
            "min_lr": 1e-3,
            "warmup_steps": 2,
            "epochs": None,
            "max_steps": 8,
            "eval_every": 8,
            "eval_batches": 2,
            "checkpoint_every": 8,
            "log_every": 4,
        },
        "generate": {"max_new_tokens": 8, "batch_size": 8},
    },
}
N_CONVERSATIONS = 40  # 10 per file of the profile's 4


def smoltalk_rows(n: int) -> list[list[dict]]:
    """Conversations as SmolTalk writes them: a system prompt on every other one, one to three exchanges; every
    fifth one has long answers, so that with more than one exchange it outgrows the tiny context after its first
    (cut at that turn boundary)."""
    rows = []
    for i in range(n):
        messages = [{"role": "system", "content": "You are a helpful assistant."}] if i % 2 else []
        for turn in range(1 + i % 3):
            answer = "The river flows into the sea." if i % 5 else " ".join(["Plants grow in the light."] * 10)
            messages += [
                {"role": "user", "content": f"Question {i}.{turn}: where does the river go?"},
                {"role": "assistant", "content": answer},
            ]
        rows.append(messages)
    return rows


def mirror_file(mirror: Path, url: str) -> Path:
    parts = urlsplit(url)
    path = mirror / parts.netloc / parts.path.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_fineweb_profile_continues_from_pretraining_into_chat_fine_tuning(tmp_path, http_dir, monkeypatch) -> None:
    merged_path = tmp_path / "merged.yaml"
    ok(
        CliRunner().invoke(
            cli, ["profile", str(PROFILE), "--params", str(REPO / "params.yaml"), "--write", str(merged_path)]
        )
    )
    merged = read_params(merged_path)
    sources = merged["download"]["sources"]
    smoltalk = sources[merged["instruct"]["dataset"]]
    # what the profile sets: chat over SmolTalk-layout conversations, the ChatML tokens reserved from pretraining on
    assert merged["instruct"]["format"] == "chat" and smoltalk["check"] == "conversations"
    assert set(CHAT_TOKENS) <= set(merged["tokenize"]["special_tokens"])
    assert merged["base_model"] == "pretrain" and merged["align"]["base_model"] == "instruct"

    # The mirror holds the files at the profile's own URLs: FineWeb-Edu-style text shards, SmolTalk-style chats.
    mirror = tmp_path / "mirror"
    fineweb = sources[merged["tokenize"]["corpus"]]
    for shard in range(fineweb["shards"]):
        write_parquet(mirror_file(mirror, fineweb["url"].format(shard=shard)), make_docs(60, shard))
    rows = smoltalk_rows(N_CONVERSATIONS)
    per_file = N_CONVERSATIONS // smoltalk["shards"]
    for shard in range(smoltalk["shards"]):
        part = rows[shard * per_file : (shard + 1) * per_file]
        pq.write_table(
            pa.table({"messages": part, "source": ["toy"] * len(part)}),
            mirror_file(mirror, smoltalk["url"].format(shard=shard)),
        )
    monkeypatch.setenv(MIRROR_ENV, http_dir(mirror))

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(merge_params(merged, TINY), sort_keys=False), encoding="utf-8")
    p, raw, reports, models = ["--params", str(params)], tmp_path / "raw", tmp_path / "reports", tmp_path / "models"
    ok(
        CliRunner().invoke(
            download_app,
            [
                *p,
                "--raw-dir",
                str(raw),
                "--reports",
                str(reports / "download"),
                "--only",
                merged["tokenize"]["corpus"],
                "--only",
                merged["instruct"]["dataset"],
            ],
        )
    )
    files = json.loads((reports / "download" / "facts.json").read_text())["files"]
    assert files[merged["instruct"]["dataset"]]["conversations"] == N_CONVERSATIONS
    tokens = tmp_path / "tokens"
    tok_args = [
        "--raw-dir",
        str(raw),
        "--out",
        str(tokens),
        "--work",
        str(tmp_path / "w"),
        "--reports",
        str(reports / "tokenize"),
    ]
    ok(CliRunner().invoke(tokenize_app, [*p, *tok_args]))
    pre_args = [
        "--tokens",
        str(tokens),
        "--out",
        str(models / "pretrain"),
        "--reports",
        str(reports / "pretrain"),
        "--ckpt",
        str(tmp_path / "ck"),
    ]
    ok(CliRunner().invoke(pretrain_app, [*p, *pre_args]))
    base = open_model_dir(models / "pretrain")
    assert all(t in base.tokenizer.special_tokens for t in CHAT_TOKENS)  # reserved by the tokenize stage
    ok(
        CliRunner().invoke(
            instruct_app,
            [
                *p,
                "--raw-dir",
                str(raw),
                "--models-dir",
                str(models),
                "--out",
                str(models / "instruct"),
                "--reports",
                str(reports / "instruct"),
                "--work-dir",
                str(tmp_path / "work-instruct"),
            ],
        )
    )

    metrics = json.loads((reports / "instruct" / "metrics.json").read_text())
    facts = json.loads((reports / "instruct" / "facts.json").read_text())
    assert facts["format"] == "chat" and facts["base_model"] == "pretrain"
    assert metrics["added_tokens"] == 0  # nothing to add: pretraining had them
    assert metrics["steps"] == 8 and metrics["val_loss"] is not None
    # every conversation is accounted for; the long ones are cut after their first exchange, none dropped
    kept = metrics["train_entries"] + metrics["val_entries"] + metrics["test_entries"]
    assert kept + metrics["dropped_conversations"] == N_CONVERSATIONS
    long = sum(1 for i in range(N_CONVERSATIONS) if i % 5 == 0 and 1 + i % 3 > 1)
    assert (metrics["cut_conversations"], metrics["dropped_conversations"]) == (long, 0)
    tuned = open_model_dir(models / "instruct")
    assert tuned.template == CHATML and tuned.config.vocab_size == base.config.vocab_size == 320
    responses = json.loads((reports / "instruct" / "responses.json").read_text())
    assert len(responses) == 4 and all(r["messages"][-1]["role"] == "user" for r in responses)
    assert all(no_special_text(r["model_response"]) for r in responses)

    # the report card names the format
    card = to_markdown(build_report(reports, merged))
    assert "chat (ChatML) full fine-tune of pretrain" in card


# --- DPO and the evaluate stage on a chat model ------------------------------------------------------------------

N_CHATS = 40  # 34 train / 4 test / 2 validation


@pytest.fixture(scope="module", autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory) -> Path:
    """root/models/instruct: a chat model the instruct stage trained on raw/chat (JSONL) from root/models/base;
    root/reports/instruct: its answers to 4 test conversations; raw/prefs: the preference entries of
    tests/test_align_stage.py ("OK." chosen); models/judge: the bigram judge."""
    root = tmp_path_factory.mktemp("chatpath")
    (root / "raw" / "chat").mkdir(parents=True)
    lines = [json.dumps(conversation(i)) for i in range(N_CHATS)]
    (root / "raw" / "chat" / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "raw" / "prefs").mkdir(parents=True)
    (root / "raw" / "prefs" / "data.json").write_text(json.dumps(make_preferences()), encoding="utf-8")
    tok = Tokenizer.train("\n".join(lines) * 3, 300, pattern="gpt2")
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("gpt2-tiny", vocab_size=300, context_length=192, emb_dim=32, n_layers=2, n_heads=2)
    save_model_dir(root / "models" / "base", GPT(cfg), tok)
    bigram_judge(root / "models" / "judge")
    params = {
        "base_model": "base",
        "hardware": {"device": "cpu", "threads": 1},
        "instruct": {
            "dataset": "chat",
            "format": "chat",
            "train": {
                "batch_size": 8,
                "lr": 0.01,
                "min_lr": 0.001,
                "warmup_steps": 5,
                "max_steps": 50,
                "eval_every": 50,
                "eval_batches": None,
                "checkpoint_every": 50,
                "log_every": 10,
                "seed": 1,
            },
            "generate": {"max_new_tokens": 8, "batch_size": 4},
        },
    }
    (root / "instruct.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    ok(
        CliRunner().invoke(
            instruct_app,
            [
                "--params",
                str(root / "instruct.yaml"),
                "--raw-dir",
                str(root / "raw"),
                "--models-dir",
                str(root / "models"),
                "--out",
                str(root / "models" / "instruct"),
                "--reports",
                str(root / "reports" / "instruct"),
                "--work-dir",
                str(root / "work-instruct"),
            ],
        )
    )
    return root


@pytest.fixture(scope="module")
def judge_url(chat_run):
    server = make_server({"judge:latest": ModelHandle.load(chat_run / "models" / "judge", template="raw")}, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.url
    server.shutdown()


def align_params(root: Path, name: str, judge_host: str | None = None, **align) -> Path:
    params = {
        "hardware": {"device": "cpu", "threads": 1},
        "align": {
            "dataset": "prefs",
            "base_model": "instruct",
            "train": {
                "batch_size": 8,
                "lr": 3e-3,
                "min_lr": 3e-4,
                "warmup_steps": 2,
                "epochs": 2,
                "eval_every": 6,
                "eval_batches": None,
                "checkpoint_every": 100,
                "log_every": 2,
                "seed": 1,
            },
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


def run_align(root: Path, params: Path, tag: str) -> Path:
    """Stages preferences and align; returns the reports folder."""
    common = ["--params", str(params), "--models-dir", str(root / "models")]
    reports = root / tag / "reports" / "align"
    ok(
        CliRunner().invoke(
            preferences_app,
            [
                *common,
                "--raw-dir",
                str(root / "raw"),
                "--out",
                str(root / tag / "pairs.json"),
                "--reports",
                str(reports),
                "--cache",
                str(root / tag / "judge.jsonl"),
            ],
        )
    )
    ok(
        CliRunner().invoke(
            align_app,
            [
                *common,
                "--pairs",
                str(root / tag / "pairs.json"),
                "--test-prompts",
                str(root / "reports" / "instruct" / "responses.json"),
                "--out",
                str(root / "models" / f"align-{tag}"),
                "--reports",
                str(reports),
                "--work-dir",
                str(root / tag / "work"),
            ],
        )
    )
    return reports


@pytest.fixture(scope="module")
def aligned(chat_run: Path) -> Path:
    return run_align(chat_run, align_params(chat_run, "dataset"), "dataset")


def test_dpo_scores_the_assistant_answer_and_its_end_of_turn_only(chat_run: Path) -> None:
    """A preference pair of a chat model is the conversation chat fine-tuning renders (same ids), and its
    log-probability sums exactly the assistant tokens and <|im_end|>, the tokens the chat loss trains."""
    folder = open_model_dir(chat_run / "models" / "instruct")
    model, tok = folder.load_lm().eval(), folder.tokenizer
    entry = {"instruction": "Say 7.", "input": "", "chosen": "OK.", "rejected": "No way, 7!"}
    (pair,), too_long = encode_pairs([entry], tok, folder.template, max_length=128)
    assert too_long == []
    inputs, targets = collate_pairs([pair], tok.eot_id)
    with torch.no_grad():
        logps, counts = sequence_logps(model, inputs, targets)
    for row, (side, answer) in enumerate(((pair.chosen, "OK."), (pair.rejected, "No way, 7!"))):
        conv = render_chat(tok, [{"role": "user", "content": "Say 7."}, {"role": "assistant", "content": answer}])
        n = len(side.ids)
        assert side.ids == conv.ids[:n] and side.ids[-1] == tok.special_tokens[IM_END]  # up to the end of turn
        scored = conv.mask[1:n]  # target j is token j + 1
        assert int(counts[row]) == sum(scored) == len(tok.encode(answer)) + 1
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([side.ids[:-1]])).logits[0].float(), -1)
        expected = lp[torch.arange(n - 1), torch.tensor(side.ids[1:])][torch.tensor(scored)].sum()
        torch.testing.assert_close(logps[row], expected)


def test_a_chat_test_prompt_is_rendered_turn_by_turn() -> None:
    from tests.test_instruct_stage import byte_tokenizer

    tok = byte_tokenizer().with_special_tokens(CHAT_TOKENS)
    messages = conversation(3)["messages"][:-1]  # system, user, assistant, user
    entry = {
        "instruction": "Again 3?",
        "input": "System: Answer OK.\nUser: Say 3.\nAssistant: OK.",
        "output": "OK.",
        "messages": messages,
    }
    ids = entry_prompt_ids(tok, CHATML, entry, "responses.json: entry 0")
    assert ids == render_chat(tok, messages, add_generation_prompt=True).ids
    assert tok.decode(ids).count(IM_START) == 5  # four turns and the assistant's header
    alpaca = {k: v for k, v in entry.items() if k != "messages"}  # no turns kept: instruction and input, one turn
    assert tok.decode(entry_prompt_ids(tok, CHATML, alpaca, "x")).count(IM_START) == 2
    bad = {**entry, "messages": [{"role": "robot", "content": "hi"}]}
    with pytest.raises(Exception, match=r"responses.json: entry 0: message 0: unknown role 'robot'"):
        entry_prompt_ids(tok, CHATML, bad, "responses.json: entry 0")


def test_align_of_a_chat_model_learns_the_preference_and_answers_in_chat(chat_run: Path, aligned: Path) -> None:
    metrics = json.loads((aligned / "metrics.json").read_text())
    assert metrics["val_loss_start"] == pytest.approx(0.6931, abs=1e-3)  # policy = reference at step 0
    assert metrics["val_reward_accuracy"] > 0.5 and metrics["val_chosen_reward"] > metrics["val_rejected_reward"]
    assert open_model_dir(chat_run / "models" / "align-dataset").template == CHATML
    responses = json.loads((aligned / "responses.json").read_text())
    instruct = json.loads((chat_run / "reports" / "instruct" / "responses.json").read_text())
    assert [r["messages"] for r in responses] == [r["messages"] for r in instruct]  # the whole test conversations
    # greedy answers that end at <|im_end|>: the answer alone, no turn markers, no next turn
    assert [r["model_response"] for r in responses] == ["OK."] * len(instruct)


def test_judged_pairs_of_a_chat_model_are_sampled_in_chat_and_end_their_turn(chat_run: Path, judge_url: str) -> None:
    # 30 train / 24 validation prompts, sampled hot: the chat model says "OK." almost always at temperature 1
    params = align_params(
        chat_run,
        "judge",
        judge_url,
        preferences="judge",
        train_fraction=0.5,
        pairs={"temperature": 1.5, "top_k": None, "max_new_tokens": 24, "batch_size": 64},
        train={
            "batch_size": 4,
            "lr": 3e-3,
            "min_lr": 3e-4,
            "warmup_steps": 1,
            "max_steps": 2,
            "eval_every": 2,
            "eval_batches": None,
            "checkpoint_every": 2,
            "seed": 1,
        },
    )
    reports = run_align(chat_run, params, "judge")
    counts = json.loads((reports / "pairs.json").read_text())
    assert counts["prompts"] == 30 + 24 and counts["train_pairs"] > 0 and counts["val_pairs"] > 0
    answers = [
        p[side] for p in json.loads((chat_run / "judge" / "pairs.json").read_text()) for side in ("chosen", "rejected")
    ]
    # each answer stops at its <|im_end|> (never in the text); the trained answer is among them, whole
    assert all(IM_END not in a for a in answers) and "OK." in answers
    for pair in json.loads((chat_run / "judge" / "pairs.json").read_text()):
        for side in ("chosen", "rejected"):  # what the judge scored: the answer as written
            assert pair[f"{side}_score"] == (pair["output"] + pair[side]).encode()[-1] % 10


def test_evaluate_and_report_card_of_a_chat_run(chat_run: Path, aligned: Path, judge_url: str) -> None:
    reports = chat_run / "reports"
    out = chat_run / "dataset" / "reports"  # beside align's reports: one reports/ folder for the card
    (out / "instruct").mkdir(parents=True, exist_ok=True)
    for f in (reports / "instruct").glob("*.json"):
        (out / "instruct" / f.name).write_bytes(f.read_bytes())
    params = align_params(chat_run, "eval", judge_url)
    result = CliRunner().invoke(
        evaluate.app,
        [
            "--params",
            str(params),
            "--responses",
            str(reports / "instruct" / "responses.json"),
            "--model-dir",
            str(chat_run / "models" / "instruct"),
            "--cache",
            str(chat_run / "eval-cache.jsonl"),
            "--reports",
            str(out / "evaluate"),
            "--base-responses",
            str(reports / "instruct" / "base_responses.json"),
            "--align-responses",
            str(aligned / "responses.json"),
        ],
    )
    ok(result)
    metrics = json.loads((out / "evaluate" / "metrics.json").read_text())
    tok = open_model_dir(chat_run / "models" / "instruct").tokenizer
    # the reference loss scores each last assistant answer and its <|im_end|>, nothing of the prompt turns
    assert metrics["reference_tokens"] == 4 * (len(tok.encode("OK.")) + 1)
    assert metrics["rouge_l"] == 1.0 and metrics["empty_responses"] == 0  # every answer is the reference "OK."
    # the bigram judge scored each answer as it reads its last byte: "OK." ends in "." (46), so 6
    assert metrics["n_scored"] == 4 and metrics["mean"] == 6.0
    assert metrics["compare"]["judge"]["align_mean"] == 6.0 and metrics["compare"]["rouge_l"]["align_mean"] == 1.0
    card = to_markdown(build_report(out, read_params(params)))
    assert "chat (ChatML) full fine-tune of base" in card
