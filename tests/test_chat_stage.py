"""Chat fine-tuning (``instruct.format: chat``) end to end on a tiny byte-level model: conversations in SmolTalk's
parquet layout fetched through the downloader and a temporary mirror, JSONL conversations, the book's Alpaca data
converted to chat, turn-boundary cuts, and malformed rows refused with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from llmcore.cli import app as cli
from llmcore.data.instruct import encode_conversations
from llmcore.download import MIRROR_ENV
from llmcore.models.config import ModelConfig
from llmcore.models.gpt import GPT
from llmcore.text.chat import CHAT_TOKENS, IM_END, render_chat
from llmcore.text.tokenizer import Tokenizer
from llmcore.weights.model_dir import open_model_dir, save_model_dir
from stages.download import app as download_app
from stages.instruct import app
from tests.test_instruct_stage import byte_tokenizer, make_entries, stage_args, workspace  # noqa: F401

N = 40  # 34 train / 4 test / 2 validation
SYSTEM = {"role": "system", "content": "Answer OK."}


def conversation(i: int) -> dict:
    ok = {"role": "assistant", "content": "OK."}
    return {
        "messages": [
            SYSTEM,
            {"role": "user", "content": f"Say {i}."},
            ok,
            {"role": "user", "content": f"Again {i}?"},
            ok,
        ]
    }


def params(path: Path, dataset: str, base_model: str = "base", **instruct) -> Path:
    p = {
        "base_model": base_model,
        "hardware": {"device": "cpu", "threads": 1},
        "instruct": {
            "dataset": dataset,
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
            **instruct,
        },
    }
    path.write_text(yaml.safe_dump(p, sort_keys=False), encoding="utf-8")
    return path


def run_stage(root: Path, params_path: Path, out: str):
    return CliRunner().invoke(app, stage_args(root, params_path, out=out, reports=f"reports-{out}"))


@pytest.fixture(scope="module")
def chat_trained(workspace: Path) -> Path:  # noqa: F811
    """A chat model trained on JSONL conversations from a base with a small BPE tokenizer (llama.cpp needs merges),
    kept for the export and serving tests."""
    (workspace / "raw" / "chat").mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(conversation(i)) for i in range(N)]
    (workspace / "raw" / "chat" / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tok = Tokenizer.train("\n".join(lines) * 3, 300, pattern="gpt2")
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("gpt2-tiny", vocab_size=300, context_length=192, emb_dim=32, n_layers=2, n_heads=2)
    save_model_dir(workspace / "models" / "bpe-base", GPT(cfg), tok)
    result = run_stage(workspace, params(workspace / "chat.yaml", "chat", base_model="bpe-base"), "chat")
    assert result.exit_code == 0, result.output
    return workspace


def test_chat_stage_trains_a_chat_model(chat_trained: Path) -> None:
    folder = open_model_dir(chat_trained / "models" / "chat")
    assert folder.template == "chatml" and all(t in folder.tokenizer.special_tokens for t in CHAT_TOKENS)
    assert folder.config.vocab_size == 302  # the base tokenizer's 300 ids + the two chat tokens, rows added
    metrics = json.loads((chat_trained / "reports-chat" / "metrics.json").read_text())
    assert metrics["added_tokens"] == 2 and metrics["cut_conversations"] == 0
    responses = json.loads((chat_trained / "reports-chat" / "responses.json").read_text())
    assert len(responses) == 4 and all(r["output"] == "OK." for r in responses)
    assert responses[0]["input"].startswith("System: Answer OK.\nUser: Say ")
    assert [r["model_response"] for r in responses] == ["OK."] * 4  # answered, and stopped at <|im_end|>


def test_ask_a_chat_model(chat_trained: Path) -> None:
    result = CliRunner().invoke(cli, ["ask", "--model", str(chat_trained / "models" / "chat"), "Say 3."])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "OK."


def test_chat_with_a_chat_model_keeps_the_conversation(chat_trained: Path, monkeypatch) -> None:
    """`llmcore chat` renders the whole conversation (system message, earlier turns) before each answer."""
    import llmcore.models.responses as responses

    prompts = []
    real = responses.stream_response

    def recording(model, tok, ids, *args, **kwargs):
        prompts.append(ids)
        return real(model, tok, ids, *args, **kwargs)

    monkeypatch.setattr(responses, "stream_response", recording)
    folder = chat_trained / "models" / "chat"
    args = ["chat", "--model", str(folder), "--system", "Answer OK."]
    result = CliRunner().invoke(cli, args, input="Say 3.\nSay 4.\n")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == ["OK.", "OK."]
    tok = open_model_dir(folder).tokenizer
    history = [
        {"role": "system", "content": "Answer OK."},
        {"role": "user", "content": "Say 3."},
        {"role": "assistant", "content": "OK."},
        {"role": "user", "content": "Say 4."},
    ]
    assert prompts == [
        render_chat(tok, history[:2], add_generation_prompt=True).ids,
        render_chat(tok, history, add_generation_prompt=True).ids,
    ]


def test_smoltalk_parquet_through_the_mirror(workspace: Path, tmp_path: Path, http_dir, monkeypatch) -> None:  # noqa: F811
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    mirror = tmp_path / "mirror" / "huggingface.co" / "datasets" / "toy" / "smoltalk" / "resolve" / "main"
    mirror.mkdir(parents=True)
    rows = [conversation(i)["messages"] for i in range(N)]
    pq.write_table(pa.table({"messages": rows, "source": ["toy"] * N}), mirror / "train-00000.parquet")
    monkeypatch.setenv(MIRROR_ENV, http_dir(tmp_path / "mirror"))
    url = "https://huggingface.co/datasets/toy/smoltalk/resolve/main/train-00000.parquet"
    dl = tmp_path / "download.yaml"
    dl.write_text(yaml.safe_dump({"download": {"sources": {"smoltalk": {"url": url, "check": "conversations"}}}}))
    raw = workspace / "raw"
    result = CliRunner().invoke(
        download_app, ["--params", str(dl), "--raw-dir", str(raw), "--reports", str(tmp_path / "dl-reports")]
    )
    assert result.exit_code == 0, result.output
    assert (raw / "smoltalk" / "train-00000.parquet").is_file()
    short = {"max_steps": 2, "eval_every": 2, "checkpoint_every": 2}
    result = run_stage(workspace, params(tmp_path / "p.yaml", "smoltalk", max_length=64, train=short), "smol")
    assert result.exit_code == 0, result.output
    metrics = json.loads((workspace / "reports-smol" / "metrics.json").read_text())
    # every conversation is ~82 tokens: cut after its first answer (a turn boundary), none dropped
    assert metrics["cut_conversations"] == N and metrics["dropped_conversations"] == 0


def test_alpaca_data_converted_to_chat(workspace: Path, tmp_path: Path) -> None:  # noqa: F811
    p = params(tmp_path / "p.yaml", "toy", train={"max_steps": 2, "eval_every": 2, "checkpoint_every": 2})
    result = run_stage(workspace, p, "alpaca-chat")
    assert result.exit_code == 0, result.output
    responses = json.loads((workspace / "reports-alpaca-chat" / "responses.json").read_text())
    entries = {e["instruction"]: e for e in make_entries()}
    assert all(entries[r["instruction"]]["input"] == r["input"] for r in responses)
    assert open_model_dir(workspace / "models" / "alpaca-chat").template == "chatml"


@pytest.mark.parametrize(
    ("row", "error"),
    [
        ({"messages": [{"role": "robot", "content": "x"}]}, "row 2: message 0: unknown role 'robot'"),
        (
            {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]},
            "row 2: message 0: empty content",
        ),
        ({"messages": [{"role": "user", "content": "hi"}]}, "row 2: no assistant turn"),
        ({"messages": {"role": "user"}}, "row 2: 'messages' must be a list of role/content records, got dict"),
        ({"messages": [{"role": "user", "content": ["a"]}]}, "row 2: message 0: content must be a string, got list"),
    ],
)
def test_malformed_conversation_stops_the_stage_with_one_line(workspace: Path, tmp_path: Path, row, error) -> None:  # noqa: F811
    folder = workspace / "raw" / "bad"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "bad.jsonl"
    path.write_text(json.dumps(conversation(0)) + "\n" + json.dumps(row) + "\n", encoding="utf-8")
    result = run_stage(workspace, params(tmp_path / "p.yaml", "bad"), "bad")
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and f"{path}: {error}" in lines[0], result.output
    assert not (workspace / "models" / "bad").exists()


def test_long_conversations_are_cut_at_turn_boundaries_and_counted() -> None:
    tok = byte_tokenizer().with_special_tokens(CHAT_TOKENS)
    conv = conversation(1)
    full = render_chat(tok, conv["messages"])
    first_answer_end = full.turn_ends[2]
    examples, cut, dropped = encode_conversations([conv, conv], tok, max_length=first_answer_end + 5)
    assert (cut, dropped) == (2, 0)
    assert examples[0].ids == full.ids[:first_answer_end]
    assert tok.decode(examples[0].ids).endswith(f"OK.{IM_END}\n")
    # the next user turn fits, its answer does not: the cut still ends at the answer (a trailing question is wasted)
    examples, cut, dropped = encode_conversations([conv], tok, max_length=full.turn_ends[3] + 1)
    assert (cut, dropped) == (1, 0) and examples[0].ids == full.ids[:first_answer_end]
    examples, cut, dropped = encode_conversations([conv], tok, max_length=first_answer_end - 3)
    assert (examples, cut, dropped) == ([], 0, 1)
    examples, cut, dropped = encode_conversations([conv], tok, max_length=len(full.ids))
    assert (cut, dropped) == (0, 0) and examples[0].mask == full.mask
    torch.testing.assert_close(torch.tensor(examples[0].ids), torch.tensor(full.ids))


def test_reference_loss_of_a_chat_model_scores_its_answers(chat_trained: Path) -> None:
    """The evaluate stage's loss on the reference answers renders the test conversations in ChatML too."""
    from llmcore.eval.instruct import reference_loss

    responses = chat_trained / "reports-chat" / "responses.json"
    assert json.loads(responses.read_text())[0]["messages"][0] == SYSTEM  # the prompt turns, kept for this
    scores = reference_loss(chat_trained / "models" / "chat", responses)
    tok = open_model_dir(chat_trained / "models" / "chat").tokenizer
    assert scores["reference_tokens"] == 4 * (len(tok.encode("OK.")) + 1)  # each last answer and its <|im_end|>
    assert scores["reference_loss"] < 0.5


def test_dpo_pairs_of_a_chat_model_are_chatml() -> None:
    """The align stage's pairs for a chat model: the prompt as a user turn, each answer ending in <|im_end|>."""
    from llmcore.data.preferences import encode_pairs
    from llmcore.text.chat import chatml_text

    tok = byte_tokenizer().with_special_tokens(CHAT_TOKENS)
    entry = {"instruction": "Say 1.", "input": "", "chosen": "OK.", "rejected": "No."}
    (pair,), dropped = encode_pairs([entry], tok, "chatml", max_length=128)
    assert dropped == []
    user = [{"role": "user", "content": "Say 1."}]
    assert tok.decode(pair.chosen.ids[: pair.chosen.prompt_len]) == chatml_text(user, add_generation_prompt=True)
    assert pair.chosen.ids[-1] == pair.rejected.ids[-1] == tok.special_tokens[IM_END]
    assert tok.decode(pair.rejected.ids[pair.rejected.prompt_len :]) == "No." + IM_END


def test_report_card_names_the_chat_format(tmp_path: Path) -> None:
    from llmcore.report.card import Context, StageData, card_instruct

    metrics = {"test_loss": 1.0, "epochs": 4, "test_response_loss": 2.0, "test_entries": 110}
    facts = {"finetune": "full", "base_model": "pretrain"}
    chat = StageData("instruct", tmp_path, metrics, facts={**facts, "format": "chat"})
    alpaca = StageData("instruct", tmp_path, metrics, facts={**facts, "format": "alpaca"})
    unknown = StageData("instruct", tmp_path, metrics, facts=facts)  # a run from before the format was recorded
    ctx = Context({})
    assert card_instruct(chat, ctx)[0].detail.startswith("chat (ChatML) full fine-tune of pretrain")
    assert card_instruct(alpaca, ctx)[0].detail.startswith("Alpaca full fine-tune of pretrain")
    assert card_instruct(unknown, ctx)[0].detail.startswith("full fine-tune of pretrain")
