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


def llama3_style(tmp_path) -> Tokenizer:
    """A Llama-3-style tokenizer as `import --from-dir` reads one: tiktoken ranks plus Meta's 256 specials."""
    import base64

    from llmcore.text.bpe import train_bpe
    from llmcore.text.llama3 import LLAMA3_PATTERN, llama3_tokenizer

    ranks = train_bpe(CORPUS * 20, 360, pattern=LLAMA3_PATTERN, special_tokens=[])
    lines = [f"{base64.b64encode(t).decode()} {r}" for t, r in sorted(ranks.items(), key=lambda kv: kv[1])]
    (tmp_path / "tokenizer.model").write_text("\n".join(lines) + "\n")
    return llama3_tokenizer(tmp_path / "tokenizer.model")


def test_llama3_export_round_trips_tokenization_with_bos(tmp_path):
    """The HF export of a Llama-3-style model encodes as llmcore does, <|begin_of_text|> in front (bos), special
    tokens inside the text included; lm-eval's `hf` backend on it sees the ids llmcore's adapter sees."""
    transformers = require_module("transformers")
    from llmcore.eval.harness import LLMCoreLM

    tok = llama3_style(tmp_path)
    bos = tok.special_tokens["<|begin_of_text|>"]
    model = random_model("llama", tok.vocab_size)
    out = export_hf(tmp_path, model, tok)
    hf = transformers.AutoTokenizer.from_pretrained(out)
    ours = LLMCoreLM(model=(model, tok), device="cpu")
    assert hf.bos_token == "<|begin_of_text|>" and hf.bos_token_id == bos and hf.eos_token_id == tok.eot_id
    for name in ("config.json", "generation_config.json"):
        assert json.loads((out / name).read_text())["bos_token_id"] == bos, name
    texts = (
        MIXED,
        CORPUS,
        "  two leading spaces",
        "<|eot_id|>x<|start_header_id|>user<|end_header_id|>",
        "<|begin_of_text|>already there",
    )
    for text in texts:
        ids = tok.encode(text)
        assert hf(text, add_special_tokens=False)["input_ids"] == ids, text
        assert hf(text)["input_ids"] == [bos, *ids], text  # Meta's files too: a leading bos in the text doubles
        assert hf.decode(ids) == text
    for text in texts[:4]:
        assert hf(text)["input_ids"] == ours.tok_encode(text), text

    # lm-eval's own hf backend over the export: the same prefix token and encodings as llmcore's adapter
    require_module("accelerate")
    from lm_eval.models.huggingface import HFLM

    theirs = HFLM(pretrained=str(out), device="cpu", batch_size=1)
    assert theirs.prefix_token_id == ours.prefix_token_id == bos
    for text in texts:
        assert theirs.tok_encode(text) == ours.tok_encode(text), text
