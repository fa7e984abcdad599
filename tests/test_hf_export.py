"""`llmcore export --format hf` gives a folder transformers uses without llmcore: tokenizer ids, chat template,
generation stopping at end-of-text."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from llmcore.models.config import ModelConfig
from llmcore.models.gpt import GPT
from llmcore.serve.models import chat_prompt
from llmcore.text.tokenizer import Tokenizer
from llmcore.weights.model_dir import save_model_dir
from tests.conftest import MIRROR_DIR, require_module, require_shared
from tests.test_gguf import CORPUS, MIXED, random_model, tokenizer


def export_hf(tmp_path, model, tok, metadata=None):
    from llmcore.cli import app as cli

    save_model_dir(tmp_path / "model", model, tok, metadata)
    result = CliRunner().invoke(cli, ["export", str(tmp_path / "model"), "--out", str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    return tmp_path / "hf"


@pytest.mark.parametrize("family,pattern", [("gpt2", "gpt2"), ("llama", "gpt4")])
def test_transformers_tokenizer_gives_llmcore_ids(tmp_path, family, pattern):
    transformers = require_module("transformers")
    tok = tokenizer(pattern)
    out = export_hf(tmp_path, random_model(family, tok.vocab_size), tok, {"template": "alpaca"})
    hf = transformers.AutoTokenizer.from_pretrained(out)
    for text in (MIXED, CORPUS, "  two leading spaces", "<|endoftext|><|endoftext|>"):
        assert hf(text)["input_ids"] == tok.encode(text), text
        assert hf.decode(tok.encode(text)) == text
    assert hf.eos_token_id == hf.bos_token_id == tok.eot_id
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}]
    assert hf.apply_chat_template(messages, tokenize=False) == chat_prompt(messages, "alpaca")


def test_gpt2_released_tokenizer_exports(tmp_path):
    transformers = require_module("transformers")
    bpe = require_shared(MIRROR_DIR / "openaipublic.blob.core.windows.net/gpt-2/encodings/main")
    tok = Tokenizer.gpt2(bpe / "encoder.json", bpe / "vocab.bpe")
    out = export_hf(tmp_path, random_model("gpt2", tok.vocab_size, emb_dim=32, n_layers=1), tok)
    hf = transformers.AutoTokenizer.from_pretrained(out)
    for text in (MIXED, CORPUS):
        assert hf(text)["input_ids"] == tok.encode(text)
    # per token, the first merge listed is the one tiktoken's BPE reaches: exactly GPT-2's own vocab.bpe, in order
    merges = json.loads((out / "tokenizer.json").read_text())["model"]["merges"]
    firsts, seen = [], set()
    for left, right in merges:
        if left + right not in seen:
            seen.add(left + right)
            firsts.append(f"{left} {right}")
    released = [m for m in (bpe / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:] if m]
    assert firsts == released
    assert len(merges) > len(released)  # the other ways to build a token follow, so merges act as tiktoken's ranks


def test_generate_stops_at_end_of_text(tmp_path):
    """generation_config.json names eos: transformers stops there instead of running to max_new_tokens."""
    transformers = require_module("transformers")
    tok = tokenizer("gpt2")
    model = random_model("gpt2", tok.vocab_size)
    with torch.no_grad():  # make <|endoftext|> the argmax everywhere: the final norm outputs u, eot's row is u
        u = torch.zeros(model.cfg.emb_dim)
        u[0] = 5.0
        model.final_norm.weight.zero_()
        model.final_norm.bias.copy_(u)
        model.tok_emb.weight[tok.eot_id] = u
    out = export_hf(tmp_path, model, tok)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == tok.eot_id
    prompt = torch.tensor([tok.encode("First Citizen:")])
    generated = hf_model.generate(prompt, max_new_tokens=10, do_sample=False)
    assert generated[0, prompt.shape[1] :].tolist() == [tok.eot_id]


def test_char_model_exports_weights_only(tmp_path):
    transformers = require_module("transformers")
    tok = Tokenizer.char(CORPUS)
    cfg = ModelConfig.from_preset("gpt2-tiny", vocab_size=tok.vocab_size, n_layers=1)
    out = export_hf(tmp_path, GPT(cfg), tok)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    transformers.AutoModelForCausalLM.from_pretrained(out)
