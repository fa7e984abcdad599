"""Structured outputs and embeddings of `llmcore serve`, through the official `ollama` and `openai` clients.

A tiny random-weight model writes junk, so a reply that validates against a schema shows the grammar at work:
every sample is masked to the tokens the schema allows next (llmcore.serve.structured), row by row inside the
engine's continuous batching. The schemas bound their strings, so a complete object fits the token budget.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import ollama
import openai
import pytest
import torch
from pydantic import BaseModel, Field

from llmcore.models.config import ModelConfig
from llmcore.models.generate import SamplingConfig
from llmcore.models.gpt import GPT
from llmcore.serve import structured
from llmcore.serve.app import make_server
from llmcore.serve.engine import Engine, Finished, Request
from llmcore.serve.models import ModelHandle
from llmcore.text.chat import CHAT_TOKENS
from llmcore.text.tokenizer import Tokenizer
from llmcore.weights.weight_file import save_checkpoint

pytestmark = pytest.mark.timeout(120)

TEXT = '{"name": "Rex", "kind": "dog", "age": 3, "vaccinated": true} Name a pet, please. Score: 85. ' * 40


class Pet(BaseModel):
    name: str = Field(max_length=12)
    kind: Literal["cat", "dog", "fish"]
    age: int = Field(ge=0, le=30)
    vaccinated: bool
    tags: list[Literal["small", "big", "old"]] = Field(max_length=3)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    tok = Tokenizer.train(TEXT, 290).with_special_tokens(CHAT_TOKENS)
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("llama3-tiny", vocab_size=tok.vocab_size + 6, context_length=512))  # padded
    path = tmp_path_factory.mktemp("models") / "tiny"
    save_checkpoint(path / "model.safetensors", model)
    tok.save(path / "tokenizer.json")
    return path


@pytest.fixture(scope="module")
def handles(model_dir: Path) -> dict[str, ModelHandle]:
    return {
        "tiny": ModelHandle.load(model_dir, template="alpaca"),
        "tiny-chat": ModelHandle.load(model_dir, template="chatml"),
    }


@pytest.fixture(scope="module")
def url(handles):
    server = make_server(handles, port=0).start()
    yield server.url
    server.shutdown()
    server.server_close()


@pytest.fixture
def client(url: str) -> ollama.Client:
    return ollama.Client(host=url, timeout=60)


@pytest.fixture
def oai(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def ask(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Name pet number {i}, please."}]


# --------------------------------------------------------------------------------------------------
# Structured outputs


@pytest.mark.parametrize("model", ["tiny", "tiny-chat"])
def test_ollama_format_schema_validates_for_20_prompts(client: ollama.Client, model: str) -> None:
    schema = Pet.model_json_schema()

    def chat(i: int) -> ollama.ChatResponse:  # sampled (temperature 1), 8 at a time: rows share decode steps
        return client.chat(
            model, messages=ask(i), format=schema, options={"seed": i, "temperature": 1.0, "num_predict": 200}
        )

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(chat, range(20)))
    pets = [Pet.model_validate_json(r.message.content) for r in replies]
    assert all(r.done_reason == "stop" for r in replies)
    assert len({p.model_dump_json() for p in pets}) > 10  # the model's own choices, not one forced answer
    assert len({p.kind for p in pets}) > 1


def test_openai_parse_validates_for_20_prompts(oai: openai.OpenAI) -> None:
    def parse(i: int):
        return oai.chat.completions.parse(
            model="tiny", messages=ask(i), response_format=Pet, seed=i, temperature=1.0, max_tokens=200
        )

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(parse, range(20)))
    assert all(r.choices[0].finish_reason == "stop" for r in replies)
    pets = [r.choices[0].message.parsed for r in replies]
    assert all(isinstance(p, Pet) for p in pets)
    assert [Pet.model_validate_json(r.choices[0].message.content) for r in replies] == pets
    assert len({p.model_dump_json() for p in pets}) > 10


def test_json_modes_give_one_object(client: ollama.Client, oai: openai.OpenAI) -> None:
    for i in range(2):  # format "json" / json_object: any object; the budget may end it (length), else it parses
        r = client.generate("tiny", f"Say {i}", format="json", options={"seed": i, "num_predict": 150})
        if r.done_reason == "stop":
            assert isinstance(json.loads(r.response), dict)
        assert r.response.startswith("{")
        c = oai.chat.completions.create(
            model="tiny-chat", messages=ask(i), seed=i, max_tokens=150, response_format={"type": "json_object"}
        )
        if c.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(c.choices[0].message.content), dict)
        assert c.choices[0].message.content.startswith("{")


def test_streaming_with_a_schema(client: ollama.Client, oai: openai.OpenAI) -> None:
    parts = list(
        client.chat(
            "tiny",
            messages=ask(1),
            format=Pet.model_json_schema(),
            stream=True,
            options={"seed": 3, "num_predict": 200},
        )
    )
    assert parts[-1].done and parts[-1].done_reason == "stop" and len(parts) > 5
    Pet.model_validate_json("".join(p.message.content for p in parts))

    fmt = {"type": "json_schema", "json_schema": {"name": "Pet", "schema": Pet.model_json_schema(), "strict": True}}
    chunks = list(
        oai.chat.completions.create(
            model="tiny-chat", messages=ask(2), seed=4, max_tokens=200, response_format=fmt, stream=True
        )
    )
    assert chunks[-1].choices[0].finish_reason == "stop"
    Pet.model_validate_json("".join(c.choices[0].delta.content or "" for c in chunks))


def test_a_budget_that_ends_mid_object_says_length(client: ollama.Client, oai: openai.OpenAI) -> None:
    r = client.chat("tiny", messages=ask(0), format=Pet.model_json_schema(), options={"num_predict": 4})
    assert r.done_reason == "length" and r.eval_count == 4 and r.message.content.startswith('{"')
    with pytest.raises(openai.LengthFinishReasonError):
        oai.chat.completions.parse(model="tiny", messages=ask(0), response_format=Pet, max_tokens=4)
    c = oai.completions.create(
        model="tiny",
        prompt="Pet:",
        max_tokens=4,
        extra_body={
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "Pet", "schema": Pet.model_json_schema()},
            }
        },
    )
    assert c.choices[0].finish_reason == "length" and c.choices[0].text.startswith('{"')


def test_unsupported_schema_features_are_a_400_naming_them(client: ollama.Client, oai: openai.OpenAI) -> None:
    with pytest.raises(ollama.ResponseError) as e:
        client.chat("tiny", messages=ask(0), format={"type": "object", "properties": {"a": {"not": {"type": "null"}}}})
    assert e.value.status_code == 400
    assert e.value.error == 'format: unsupported JSON schema: Unimplemented keys: ["not"]'
    with pytest.raises(ollama.ResponseError) as e:
        client.generate("tiny", "x", format={"type": "string", "pattern": "(?<=a)b"})
    assert e.value.status_code == 400 and "look-around" in e.value.error and "\n" not in e.value.error

    schema = {"type": "object", "properties": {"ids": {"type": "array", "uniqueItems": True}}}
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(
            model="tiny",
            messages=ask(0),
            response_format={"type": "json_schema", "json_schema": {"name": "ids", "schema": schema, "strict": True}},
        )
    assert e.value.param == "response_format" and 'Unimplemented keys: ["uniqueItems"]' in e.value.message
    with pytest.raises(openai.BadRequestError) as e:  # strict is a boolean
        oai.chat.completions.create(
            model="tiny",
            messages=ask(0),
            response_format={"type": "json_schema", "json_schema": {"name": "ids", "schema": {}, "strict": "yes"}},
        )
    assert e.value.param == "response_format.json_schema.strict"


def test_each_row_has_its_own_mask(handles) -> None:
    """A greedy constrained request gives the same reply alone and among 7 others, constrained (each by its own
    schema) or not; the unconstrained rows' replies are the same as without any constrained row beside them."""
    h = handles["tiny"]
    tok = h.tokenizer
    engine = Engine(h.model, tok, max_batch=8, compiled_decode=False).start()
    pet = structured.compile_schema(Pet.model_json_schema(), tok, h.model.cfg.vocab_size, h.stop_ids)
    number = structured.compile_schema({"type": "integer"}, tok, h.model.cfg.vocab_size, h.stop_ids)

    def run(jobs: list[tuple[str, structured.Grammar | None]]) -> list[str]:
        out: list[list] = [[] for _ in jobs]
        finished = threading.Semaphore(0)
        with engine._cv:  # all wait before the loop takes any: they are admitted together, one batch
            for i, (prompt, grammar) in enumerate(jobs):
                sampling = SamplingConfig(150, temperature=0.0, stop_ids=h.stop_ids)
                constraint = grammar.constraint() if grammar is not None else None
                engine.submit(Request(tok.encode(prompt), sampling, sink(out[i], finished), constraint=constraint))
        for _ in jobs:
            assert finished.acquire(timeout=60)
        return ["".join(e for e in events if isinstance(e, str)) for events in out]

    try:
        alone = run([("Pet:", pet)])
        plain = run([(f"Say {i}", None) for i in range(4)])
        mixed = run(
            [("Pet:", pet), *[(f"Say {i}", None) for i in range(4)], ("Num:", number), ("Pet:", pet), ("Say 0", None)]
        )
    finally:
        engine.stop()
    Pet.model_validate_json(alone[0])
    assert mixed[0] == mixed[6] == alone[0]
    assert mixed[1:5] == plain and mixed[7] == plain[0]
    assert mixed[5].lstrip("-").isdigit()
    assert engine.max_live == 8


def sink(events: list, finished: threading.Semaphore):
    def put(event) -> None:
        events.append(event)
        if isinstance(event, Finished):
            finished.release()

    return put


def test_closed_objects_reads_schemas_as_ollama_and_strict_mode_do() -> None:
    schema = {
        "type": "object",
        "properties": {"a": {"type": "object", "properties": {"b": {}}}, "c": {"type": "object"}},
        "$defs": {"D": {"properties": {"x": {}}, "additionalProperties": True}},
    }
    closed = structured.closed_objects(schema)
    assert closed["additionalProperties"] is False and closed["properties"]["a"]["additionalProperties"] is False
    assert "additionalProperties" not in closed["properties"]["c"]  # {"type": "object"} alone: any object
    assert closed["$defs"]["D"]["additionalProperties"] is True and "additionalProperties" not in schema


# --------------------------------------------------------------------------------------------------
# Embeddings and capabilities


def reference_embedding(h: ModelHandle, text: str) -> torch.Tensor:
    """One input alone, no padding: the mean of its final hidden states, normalised."""
    ids = torch.tensor([h.encode(text)])
    with torch.no_grad():
        hidden = h.model(ids, return_logits=False, return_hidden=True).hidden[0]
    return torch.nn.functional.normalize(hidden.mean(0), dim=0)


TEXTS = ["A dog named Rex.", "Name a pet", "Score: 85", "x"]


def test_ollama_embeddings(client: ollama.Client, handles) -> None:
    h = handles["tiny"]
    r = client.embed("tiny", input=TEXTS)
    vectors = torch.tensor(r.embeddings)
    assert vectors.shape == (len(TEXTS), h.model.cfg.emb_dim)
    assert torch.allclose(vectors.norm(dim=1), torch.ones(len(TEXTS)), atol=1e-5)
    for text, v in zip(TEXTS, vectors, strict=True):  # batched with padding == alone
        assert torch.allclose(v, reference_embedding(h, text), atol=1e-5)
    assert r.prompt_eval_count == sum(len(h.encode(t)) for t in TEXTS)
    assert (vectors @ vectors.T).fill_diagonal_(0).max() < 0.9999  # different texts, different vectors
    one = client.embed("tiny", input=TEXTS[0]).embeddings
    assert len(one) == 1 and torch.allclose(torch.tensor(one[0]), vectors[0], atol=1e-5)
    old = client.embeddings("tiny", prompt=TEXTS[1]).embedding  # the older endpoint
    assert torch.allclose(torch.tensor(old), vectors[1], atol=1e-5)

    long = "pet " * 600
    cut = client.embed("tiny", input=long).embeddings[0]  # truncated to the context
    assert torch.allclose(torch.tensor(cut), reference_embedding_ids(h, h.encode(long)[:512]), atol=1e-5)
    with pytest.raises(ollama.ResponseError) as e:
        client.embed("tiny", input=long, truncate=False)
    assert e.value.status_code == 400 and "exceeds maximum context length 512" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.embed("tiny", input=["a", ""])
    assert e.value.status_code == 400 and e.value.error == "input[1] is empty"
    assert client.show("tiny").capabilities == ["completion", "embedding"]


def reference_embedding_ids(h: ModelHandle, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        hidden = h.model(torch.tensor([ids]), return_logits=False, return_hidden=True).hidden[0]
    return torch.nn.functional.normalize(hidden.mean(0), dim=0)


def test_openai_embeddings(oai: openai.OpenAI, client: ollama.Client, handles) -> None:
    h = handles["tiny"]
    expected = torch.tensor(client.embed("tiny", input=TEXTS).embeddings)
    r = oai.embeddings.create(model="tiny", input=TEXTS)  # the SDK asks for base64 and decodes it
    assert r.model == "tiny:latest" and [d.index for d in r.data] == [0, 1, 2, 3]
    assert torch.allclose(torch.tensor([d.embedding for d in r.data]), expected, atol=1e-6)
    tokens = sum(len(h.encode(t)) for t in TEXTS)
    assert r.usage.prompt_tokens == r.usage.total_tokens == tokens
    floats = oai.embeddings.create(model="tiny", input=TEXTS[0], encoding_format="float")
    assert torch.allclose(torch.tensor(floats.data[0].embedding), expected[0], atol=1e-6)
    ids = oai.embeddings.create(model="tiny", input=[h.encode(TEXTS[2]), h.encode(TEXTS[3])])  # token ids
    assert torch.allclose(torch.tensor([d.embedding for d in ids.data]), expected[2:], atol=1e-6)

    with pytest.raises(openai.BadRequestError) as e:
        oai.embeddings.create(model="tiny", input="pet " * 600)
    assert e.value.code == "context_length_exceeded" and e.value.param == "input"
    with pytest.raises(openai.BadRequestError) as e:
        oai.embeddings.create(model="tiny", input=[[1, 10**6]])
    assert "out of range" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        oai.embeddings.create(model="tiny", input="a", dimensions=8)
    assert e.value.param == "dimensions"
    with pytest.raises(openai.NotFoundError):
        oai.embeddings.create(model="nope", input="a")
