"""A chat model outside llmcore: one 3-turn conversation with a system prompt gives the same token ids from llmcore,
transformers' ``apply_chat_template`` on the HF export and llama.cpp's chat handler on the GGUF; the Modelfile's
TEMPLATE renders the same text; exported chat models stop at ``<|im_end|>``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

from llmcore.models.config import ModelConfig
from llmcore.models.gpt import GPT
from llmcore.models.vocab import add_special_tokens
from llmcore.text.chat import CHAT_TOKENS, IM_END, chatml_text, render_chat
from llmcore.weights.export import export_model
from llmcore.weights.model_dir import save_model_dir
from tests.conftest import require_module
from tests.gotemplate import render
from tests.test_chat import CORPUS
from tests.test_chat_stage import chat_trained, workspace  # noqa: F401

CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Name a primary color."},
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": "And another, please?"},
    {"role": "assistant", "content": "Blue. Green is a secondary color of paint, by the way!"},
    {"role": "user", "content": "Thanks. Is ### Response: just text here?"},
]


@pytest.fixture(scope="module", params=["llama3-tiny", "gpt2-tiny"])
def chat_model_dir(request, tmp_path_factory) -> Path:
    """A tiny untrained model of each family with a BPE tokenizer, the chat tokens added as an import would."""
    from llmcore.text.tokenizer import Tokenizer

    tok = Tokenizer.train(CORPUS, 300, pattern="gpt4" if request.param.startswith("llama") else "gpt2")
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(
        request.param, vocab_size=tok.vocab_size, context_length=512, emb_dim=32, n_layers=1, n_heads=2
    )
    model, tok = add_special_tokens(GPT(cfg), tok, CHAT_TOKENS)
    return save_model_dir(tmp_path_factory.mktemp("chatmodel") / "chat", model, tok, {"template": "chatml"})


def llama_chat_prompt_ids(gguf: Path, messages: list[dict], max_tokens: int = 1) -> tuple[list[int], dict]:
    """The prompt tokens llama-cpp-python's chat handler (the GGUF's own chat template) builds, and its reply."""
    llama_cpp = require_module("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=512, n_threads=1, verbose=False, seed=0)
    seen, tokenize = [], llm.tokenize

    def recording(text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        ids = tokenize(text, add_bos=add_bos, special=special)
        seen.append(ids)
        return ids

    llm.tokenize = recording
    reply = llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=0.0)
    return seen[0], reply


def test_one_conversation_same_ids_in_llmcore_transformers_and_llama_cpp(chat_model_dir: Path, tmp_path: Path):
    transformers = require_module("transformers")
    from llmcore.weights.model_dir import open_model_dir

    tok = open_model_dir(chat_model_dir).tokenizer
    ours = render_chat(tok, CONVERSATION, add_generation_prompt=True).ids
    assert ours.count(tok.special_tokens[IM_END]) == len(CONVERSATION)

    export_model(chat_model_dir, tmp_path / "hf", fmt="hf")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    out = hf.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True)
    assert list(out["input_ids"] if isinstance(out, Mapping) else out) == ours
    assert hf.apply_chat_template(CONVERSATION, tokenize=False) == chatml_text(CONVERSATION)
    assert hf.eos_token == IM_END

    export_model(chat_model_dir, tmp_path / "gguf", fmt="gguf", precision="f32")
    theirs, _ = llama_chat_prompt_ids(tmp_path / "gguf" / "model.gguf", CONVERSATION)
    assert theirs == ours

    modelfile = (tmp_path / "gguf" / "Modelfile").read_text()
    template = modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    data = {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in CONVERSATION]}
    assert render(template, data) == chatml_text(CONVERSATION, add_generation_prompt=True)
    assert 'PARAMETER stop "<|im_end|>"' in modelfile


def test_exported_chat_model_answers_and_stops_at_end_of_turn(chat_trained: Path, tmp_path: Path):  # noqa: F811
    """The tiny chat model trained by test_chat_stage answers "OK." through llama.cpp's chat handler and through
    transformers' generate, and both stop at <|im_end|>."""
    transformers = require_module("transformers")
    model_dir = chat_trained / "models" / "chat"
    messages = [{"role": "system", "content": "Answer OK."}, {"role": "user", "content": "Say 5."}]
    export_model(model_dir, tmp_path / "gguf", fmt="gguf", precision="f32")
    _, reply = llama_chat_prompt_ids(tmp_path / "gguf" / "model.gguf", messages, max_tokens=8)
    assert reply["choices"][0]["message"]["content"].strip() == "OK."
    assert reply["choices"][0]["finish_reason"] == "stop"

    export_model(model_dir, tmp_path / "hf", fmt="hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    out = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = torch.tensor([list(out["input_ids"] if isinstance(out, Mapping) else out)])
    gen = hf_model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :].tolist()
    assert hf_tok.decode(gen) == "OK." + IM_END  # stopped at the end of turn
