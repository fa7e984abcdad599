"""The judge over either API (evaluate.judge.api: ollama | openai), with `llmcore serve` standing in for the
judge server; the tiny random model's replies are junk, so what is checked is the plumbing, not the scores."""

from __future__ import annotations

import json

import pytest
import torch

from llmcore.common import LLMCoreError
from llmcore.eval.judge import JudgeConfig, cache_key, check_judge, score_items, summarize
from llmcore.models.config import ModelConfig
from llmcore.models.gpt import GPT
from llmcore.serve.app import make_server
from llmcore.serve.models import ModelHandle
from llmcore.text.tokenizer import Tokenizer
from llmcore.weights.weight_file import save_checkpoint

pytestmark = pytest.mark.timeout(300)

ITEMS = [
    {"instruction": "Add 2 and 3.", "input": "", "output": "5", "response": "5"},
    {"instruction": "Name a color.", "input": "", "output": "Red", "response": "Blue"},
]


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    """`llmcore serve` with a tiny random judge whose context holds the judge prompt."""
    path = tmp_path_factory.mktemp("judge")
    tok = Tokenizer.train("Score: 85 out of 100. The response is good. " * 50, 270)  # byte-level: any text
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("llama3-tiny", vocab_size=tok.vocab_size, context_length=512)
    save_checkpoint(path / "model.safetensors", GPT(cfg))
    tok.save(path / "tokenizer.json")
    server = make_server({"tiny-raw": ModelHandle.load(path, template="raw")}, port=0).start()
    yield server.url
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("api", ["ollama", "openai"])
def test_judge_through_llmcore_serve(url: str, api: str, tmp_path) -> None:
    host = url if api == "ollama" else f"{url}/v1"
    config = JudgeConfig(api=api, host=host, model="tiny-raw", retries=0, max_concurrency=2)
    judge = check_judge(config)
    assert judge["model"] == "tiny-raw:latest" and judge["host"] == host
    assert judge["schema"] is True  # llmcore serve takes a JSON schema over both APIs
    records = score_items(ITEMS, config, cache_path=tmp_path / "cache.jsonl", progress=False, judge=judge)
    assert [r.id for r in records] == ["0", "1"]
    # a random model writes junk, but under the schema its junk is {"score": N}: scored at the first ask
    assert all(r.status == "scored" and r.raw_strict is None for r in records), records
    assert [json.loads(r.raw) for r in records] == [{"score": r.score} for r in records]
    again = score_items(ITEMS, config, cache_path=tmp_path / "cache.jsonl", progress=False, judge=judge)
    assert all(r.cached for r in again) and [r.raw for r in again] == [r.raw for r in records]


def test_every_response_is_scored_through_the_schema(url: str, tmp_path) -> None:
    """The default pipeline's 110 test responses, judged by `llmcore serve` over the Ollama API: all scored."""
    items = [
        {
            "instruction": f"Rewrite sentence {i}.",
            "input": "",
            "output": "It is fast.",
            "response": f"It is quick, {i}.",
        }
        for i in range(110)
    ]
    config = JudgeConfig(host=url, model="tiny-raw", retries=0, max_concurrency=8, timeout=60)
    judge = check_judge(config)
    records = score_items(items, config, progress=False, judge=judge)
    summary = summarize(records)
    assert (summary["n_scored"], summary["n_refused"], summary["n_error"]) == (110, 0, 0)
    assert all(0 <= r.score <= 100 and json.loads(r.raw) == {"score": r.score} for r in records)

    prose = score_items(items[:2], JudgeConfig(host=url, model="tiny-raw", retries=0, schema=False), progress=False)
    assert all(r.raw and not r.raw.startswith('{"score"') for r in prose)  # schema: false asks in prose


def test_openai_judge_errors_are_one_line(url: str) -> None:
    with pytest.raises(LLMCoreError, match="is not on the OpenAI-compatible server") as e:
        check_judge(JudgeConfig(api="openai", host=f"{url}/v1", model="llama3"))
    assert "tiny-raw:latest" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(LLMCoreError, match="cannot reach the OpenAI-compatible server"):
        check_judge(JudgeConfig(api="openai", host="http://127.0.0.1:9/v1", model="x", timeout=2))
    with pytest.raises(LLMCoreError, match="api: expected"):
        JudgeConfig(api="anthropic")


def test_api_is_part_of_the_cache_key_only_when_not_ollama() -> None:
    from llmcore.eval.judge import JudgeItem

    item = JudgeItem.from_dict(ITEMS[0])
    ollama_key = cache_key(JudgeConfig(), "d", item)
    assert cache_key(JudgeConfig(api="openai"), "d", item) != ollama_key
    assert cache_key(JudgeConfig(api="ollama"), "d", item) == ollama_key
    assert cache_key(JudgeConfig(), "d", item, schema=True) != ollama_key  # a schema changes the answer


def test_openai_base_url_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "http://judge:8000/v1")
    assert JudgeConfig(api="openai").resolved_host == "http://judge:8000/v1"
    monkeypatch.delenv("OPENAI_BASE_URL")
    assert JudgeConfig(api="openai").resolved_host == "http://127.0.0.1:11434/v1"
