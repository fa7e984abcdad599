"""The judge over either API (evaluate.judge.api: ollama | openai), with `llmcore serve` standing in for the
judge server; the tiny random model's replies are junk, so what is checked is the plumbing, not the scores."""

from __future__ import annotations

import pytest
import torch

from llmcore.common import LLMCoreError
from llmcore.eval.judge import JudgeConfig, cache_key, check_judge, score_items
from llmcore.models.config import ModelConfig
from llmcore.models.gpt import GPT
from llmcore.serve.app import make_server
from llmcore.serve.models import ModelHandle
from llmcore.text.tokenizer import Tokenizer
from llmcore.weights.weight_file import save_checkpoint

pytestmark = pytest.mark.timeout(60)

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
    records = score_items(ITEMS, config, cache_path=tmp_path / "cache.jsonl", progress=False, judge=judge)
    assert [r.id for r in records] == ["0", "1"]
    assert all(r.status in ("scored", "refused") and r.raw for r in records), records  # every item answered
    again = score_items(ITEMS, config, cache_path=tmp_path / "cache.jsonl", progress=False, judge=judge)
    assert all(r.cached for r in again) and [r.raw for r in again] == [r.raw for r in records]


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


def test_openai_base_url_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "http://judge:8000/v1")
    assert JudgeConfig(api="openai").resolved_host == "http://judge:8000/v1"
    monkeypatch.delenv("OPENAI_BASE_URL")
    assert JudgeConfig(api="openai").resolved_host == "http://127.0.0.1:11434/v1"
