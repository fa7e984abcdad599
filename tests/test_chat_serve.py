"""A chat model behind ``llmcore serve``: the tiny chat model test_chat_stage trains answers two turns through the
official openai and ollama clients on loopback, each reply stopping at ``<|im_end|>``; the server renders the whole
conversation with the model's chat template, and /api/show returns that template."""

from __future__ import annotations

import threading
from pathlib import Path

import ollama
import openai
import pytest

from llmcore.serve.app import make_server
from llmcore.serve.models import ModelHandle, RequestError
from llmcore.text.chat import render_chat
from tests.test_chat_stage import chat_trained, workspace  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(120)
SYSTEM = {"role": "system", "content": "Answer OK."}


@pytest.fixture(scope="module")
def handle(chat_trained: Path) -> ModelHandle:  # noqa: F811
    return ModelHandle.load(chat_trained / "models" / "chat", max_batch=2, threads=1)


@pytest.fixture(scope="module")
def url(handle: ModelHandle):
    server = make_server({"chat": handle}, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.url
    server.shutdown()
    server.server_close()


def test_openai_client_two_turns(url: str, handle: ModelHandle) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
    messages = [SYSTEM, {"role": "user", "content": "Say 3."}]
    first = client.chat.completions.create(model="chat", messages=messages, temperature=0, max_tokens=16)
    assert first.choices[0].message.content == "OK." and first.choices[0].finish_reason == "stop"
    assert first.usage.prompt_tokens == len(render_chat(handle.tokenizer, messages, add_generation_prompt=True).ids)
    messages += [{"role": "assistant", "content": "OK."}, {"role": "user", "content": "Again 3?"}]
    second = client.chat.completions.create(model="chat", messages=messages, temperature=0, max_tokens=16)
    assert second.choices[0].message.content == "OK." and second.choices[0].finish_reason == "stop"
    assert second.usage.prompt_tokens > first.usage.prompt_tokens  # the whole history went in
    streamed = client.chat.completions.create(
        model="chat", messages=messages, temperature=0, max_tokens=16, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == "OK."


def test_ollama_client_two_turns_and_show(url: str) -> None:
    client = ollama.Client(host=url, timeout=30)
    greedy = {"temperature": 0, "num_predict": 16}
    messages = [SYSTEM, {"role": "user", "content": "Say 8."}]
    first = client.chat("chat", messages=messages, options=greedy)
    assert first.message.content == "OK." and first.done_reason == "stop"
    messages += [first.message.model_dump(include={"role", "content"}), {"role": "user", "content": "Again 8?"}]
    second = client.chat("chat", messages=messages, options=greedy)
    assert second.message.content == "OK." and second.done_reason == "stop"
    assert second.prompt_eval_count > first.prompt_eval_count
    assert client.generate("chat", "Say 2.", system="Answer OK.", options=greedy).response == "OK."
    shown = client.show("chat")
    assert "range .Messages" in shown.template and "<|im_start|>" in shown.template
    assert shown.modelinfo["llmcore.template"] == "chatml" and 'stop "<|im_end|>"' in shown.parameters


def test_unknown_role_is_refused(handle: ModelHandle) -> None:
    with pytest.raises(RequestError, match="role 'tool'"):
        handle.chat_ids([{"role": "tool", "content": "x"}])


def test_chatml_needs_the_chat_tokens(workspace: Path, tmp_path: Path) -> None:  # noqa: F811
    """Serving or exporting a model as a chat model when its tokenizer lacks the chat tokens: one line, nothing
    written."""
    from llmcore.common import LLMCoreError
    from llmcore.weights.export import export_model

    base = workspace / "models" / "base"  # the byte-level base of test_instruct_stage: no chat tokens
    with pytest.raises(LLMCoreError, match=r"no <\|im_start\|>/<\|im_end\|> special tokens"):
        ModelHandle.load(base, template="chatml")
    with pytest.raises(LLMCoreError, match="instruct.format: chat"):
        export_model(base, tmp_path / "out", fmt="hf", template="chatml")
    assert not (tmp_path / "out").exists()
