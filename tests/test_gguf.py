"""GGUF export checked by llama.cpp itself (llama-cpp-python): tokenization, logits and greedy continuations of
both families at every precision; the file's metadata; refusals before anything is written; the CLI.

Models are tiny and random (weights N(0, 0.05): logits spread over a few units, so greedy choices are not
near-ties). llama.cpp keeps its KV cache in f16 unless told otherwise: the f32 comparisons use an f32 cache
(``type_k``/``type_v`` = 0).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from llmcore.common import LLMCoreError
from llmcore.models.config import ModelConfig
from llmcore.models.generate import SamplingConfig, generate
from llmcore.models.gpt import GPT
from llmcore.text.tokenizer import Tokenizer
from llmcore.weights.gguf import PRECISIONS, write_gguf
from llmcore.weights.model_dir import save_model_dir
from llmcore.weights.weight_file import save_checkpoint
from tests.conftest import MIRROR_DIR, require_module, require_shared

GGML_F32 = 0  # ggml_type of an f32 KV cache
CORPUS = (
    "First Citizen: Before we proceed any further, hear me speak. It's 12:30 and we'll count 1234567 coins.\n"
    "All: Speak, speak!  Ünïcödé naïve café 日本語のテキスト, emoji 😀🎉 and    spaces\t\ttabs.\r\n"
    "You are all resolved rather to die than to famish? We've 3.14159 reasons; THEY'LL say 'no'.\n\n"
)
MIXED = (
    "Hello  world!\n\n  Ünïcödé 日本語 12345 6789\t\ttabs   trailing   \r\n<|endoftext|>It's we'LL've ç😀 end  \n\n\n x"
)
PROMPT = "First Citizen: Before we proceed"
# max |logit difference| allowed per precision (logits within about ±2 here); f32 is the 1e-3
TOLERANCE = {"f32": 1e-3, "f16": 0.02, "bf16": 0.1, "q8_0": 0.1}


def tokenizer(pattern: str) -> Tokenizer:
    return Tokenizer.train(CORPUS * 20, 360, pattern=pattern)


def random_model(family: str, vocab_size: int, seed: int = 0, std: float = 0.05, **overrides) -> GPT:
    shape = dict(vocab_size=vocab_size, context_length=64, emb_dim=64, n_layers=2, n_heads=4, hidden_dim=128)
    if family == "llama":
        shape["n_kv_heads"] = 2
    cfg = ModelConfig.from_preset("llama3-tiny" if family == "llama" else "gpt2-tiny", **{**shape, **overrides})
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, std)
    return model


def llama_cpp_model(path, n_ctx: int = 64, f32_cache: bool = True):
    llama_cpp = require_module("llama_cpp")
    cache = {"type_k": GGML_F32, "type_v": GGML_F32} if f32_cache else {}
    return llama_cpp.Llama(
        model_path=str(path), n_ctx=n_ctx, n_threads=2, logits_all=True, verbose=False, seed=0, **cache
    )


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return out


FAMILIES = [("gpt2", "gpt2"), ("llama", "gpt4")]  # (architecture, split regex)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(family, precision) -> (gguf path, model, tokenizer); the models have 3 padding rows past the tokenizer."""
    out = {}
    root = tmp_path_factory.mktemp("gguf")
    for family, pattern in FAMILIES:
        tok = tokenizer(pattern)
        model = random_model(family, tok.vocab_size + 3)
        for precision in PRECISIONS:
            path = root / f"{family}-{precision}.gguf"
            write_gguf(path, model, tok, precision=precision, name=f"tiny-{family}", template="alpaca")
            out[family, precision] = (path, model, tok)
    return out


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_llama_cpp_tokenizes_like_llmcore(exported, family):
    path, _, tok = exported[family, "f32"]
    llm = llama_cpp_model(path)
    for text in (MIXED, CORPUS, " leading space", "x"):
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text), text
    assert llm.detokenize(tok.encode(MIXED), special=True).decode() == MIXED
    assert llm.token_eos() == tok.eot_id


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_llama_cpp_logits_match(exported, family, precision):
    path, model, tok = exported[family, precision]
    ids = tok.encode(CORPUS)[:48]
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    theirs = llama_logits(llama_cpp_model(path), ids)
    assert theirs.shape == ours.shape
    diff = np.abs(theirs - ours).max()
    assert diff <= TOLERANCE[precision], f"{family} {precision}: max |logit diff| {diff:.2e}"
    assert ours.std() > 0.3  # the comparison is not between near-constant logits
    print(f"{family} {precision}: max |logit diff| {diff:.2e} (logit std {ours.std():.2f})")
    if precision == "f32":
        prompt = tok.encode(PROMPT)
        ours_greedy = generate(model, [prompt], SamplingConfig(max_new_tokens=20))[0]
        assert llama_greedy(llama_cpp_model(path), prompt, 20) == ours_greedy
        with torch.no_grad():  # no step is a near-tie that the measured difference could flip on another CPU
            top2 = model(torch.tensor([prompt + ours_greedy[:-1]])).logits[0, len(prompt) - 1 :].topk(2).values
        assert (top2[:, 0] - top2[:, 1]).min().item() > 10 * diff


def test_f16_cache_is_what_loosens_f32_agreement(exported):
    """With llama.cpp's default f16 KV cache the f32 file agrees less closely: why the tests ask for f32."""
    path, model, tok = exported["llama", "f32"]
    ids = tok.encode(CORPUS)[:48]
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    default = np.abs(llama_logits(llama_cpp_model(path, f32_cache=False), ids) - ours).max()
    exact = np.abs(llama_logits(llama_cpp_model(path), ids) - ours).max()
    print(f"llama f32 file: max |logit diff| {exact:.2e} with an f32 KV cache, {default:.2e} with the default f16")
    assert exact < default / 10


def test_llama_variants_rope_scaling_bias_and_tied_head(tmp_path):
    """Llama-3.1 frequency scaling (rope_freqs), biases on every projection, and a tied head (no output tensor)."""
    tok = tokenizer("gpt4")
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_context_length": 16}
    model = random_model(
        "llama",
        tok.vocab_size,
        seed=1,
        rope_scaling=scaling,
        rope_theta=500.0,
        qkv_bias=True,
        bias=True,
        tie_embeddings=True,
    )
    path = tmp_path / "m.gguf"
    write_gguf(path, model, tok, precision="f32")
    ids = tok.encode(CORPUS)[:60]
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(llama_logits(llama_cpp_model(path), ids) - ours).max() <= 1e-3
    gguf = require_module("gguf")
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert "rope_freqs.weight" in names and "output.weight" not in names and "blk.0.attn_q.bias" in names


def test_gpt2_released_tokenizer_in_llama_cpp(tmp_path):
    """GPT-2's own BPE (50,257 tokens) inside a GGUF file tokenizes as tiktoken does."""
    bpe = require_shared(MIRROR_DIR / "openaipublic.blob.core.windows.net/gpt-2/encodings/main")
    tok = Tokenizer.gpt2(bpe / "encoder.json", bpe / "vocab.bpe")
    model = random_model("gpt2", tok.vocab_size, emb_dim=32, n_layers=1)
    path = tmp_path / "gpt2.gguf"
    write_gguf(path, model, tok, precision="q8_0")
    llm = llama_cpp_model(path)
    for text in (MIXED, CORPUS):
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text)


def test_metadata(exported):
    gguf = require_module("gguf")
    path, model, tok = exported["llama", "q8_0"]
    reader = gguf.GGUFReader(path)

    def value(key):
        return reader.fields[key].contents()

    cfg = model.cfg
    assert value("general.architecture") == "llama"
    assert value("general.name") == "tiny-llama"
    assert value("general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    assert value("llama.context_length") == cfg.context_length
    assert value("llama.embedding_length") == cfg.emb_dim
    assert value("llama.block_count") == cfg.n_layers
    assert value("llama.feed_forward_length") == cfg.hidden_dim
    assert (value("llama.attention.head_count"), value("llama.attention.head_count_kv")) == (4, 2)
    assert value("llama.rope.freq_base") == pytest.approx(cfg.rope_theta)
    assert value("llama.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.norm_eps)
    assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "llama-bpe"
    tokens, types = value("tokenizer.ggml.tokens"), value("tokenizer.ggml.token_type")
    assert len(tokens) == cfg.vocab_size == tok.vocab_size + 3
    assert tokens[tok.eot_id] == "<|endoftext|>" and types[tok.eot_id] == gguf.TokenType.CONTROL
    assert types[-1] == gguf.TokenType.UNUSED and types[300] == gguf.TokenType.NORMAL
    assert value("tokenizer.ggml.eos_token_id") == tok.eot_id
    assert value("tokenizer.ggml.add_bos_token") is False
    assert "### Instruction:" in value("tokenizer.chat_template")
    kinds = {t.name: t.tensor_type for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert kinds["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    gpt2 = gguf.GGUFReader(exported["gpt2", "bf16"][0])
    assert gpt2.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_BF16
    assert gpt2.fields["gpt2.attention.layer_norm_epsilon"].contents() == pytest.approx(1e-5)
    gpt2_kinds = {t.name: t.tensor_type for t in gpt2.tensors}
    assert gpt2_kinds["blk.1.attn_qkv.weight"] == gguf.GGMLQuantizationType.BF16
    assert "output.weight" not in gpt2_kinds and "position_embd.weight" in gpt2_kinds  # tied head: not duplicated


def test_sizes_shrink_with_precision(exported):
    sizes = {p: exported["llama", p][0].stat().st_size for p in PRECISIONS}
    assert sizes["f32"] > sizes["f16"] == sizes["bf16"] > sizes["q8_0"]


# --- refusals: nothing is written ---------------------------------------------------------------------------


def test_refuses_char_tokenizer_custom_pattern_and_precision(tmp_path):
    model = random_model("gpt2", 400)
    cases = [
        (Tokenizer.char(CORPUS), "f16", "is character-level; GGUF export needs a byte-level BPE tokenizer"),
        (Tokenizer.train(CORPUS * 5, 300, pattern=r"\S+|\s+"), "f16", "llama.cpp has no pre-tokenizer for"),
        (tokenizer("gpt2"), "q4_k", "GGUF precision must be one of f32, f16, bf16, q8_0"),
    ]
    for tok, precision, message in cases:
        with pytest.raises(LLMCoreError, match=message):
            write_gguf(tmp_path / "m.gguf", model, tok, precision=precision)
    assert not list(tmp_path.iterdir())


def test_refuses_an_architecture_llama_cpp_lacks(tmp_path):
    tok = tokenizer("gpt4")
    model = random_model("llama", tok.vocab_size, qk_norm=True)
    with pytest.raises(LLMCoreError, match="matches neither the HF GPT-2 nor the HF Llama architecture"):
        write_gguf(tmp_path / "m.gguf", model, tok)
    assert not list(tmp_path.iterdir())


# --- the CLI --------------------------------------------------------------------------------------------------


def test_cli_exports_gguf_and_modelfile(tmp_path):
    from llmcore.cli import app as cli

    tok = tokenizer("gpt4")
    model = random_model("llama", tok.vocab_size)
    save_model_dir(tmp_path / "instruct", model, tok, {"template": "alpaca"})
    out = tmp_path / "export"
    result = CliRunner().invoke(
        cli, ["export", str(tmp_path / "instruct"), "-f", "gguf", "--precision", "q8_0", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model.gguf"]
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./model.gguf\n" in modelfile and 'PARAMETER stop "###"' in modelfile
    assert "PARAMETER num_ctx 64" in modelfile
    llm = llama_cpp_model(out / "model.gguf")
    assert llm.tokenize(MIXED.encode(), add_bos=False, special=True) == tok.encode(MIXED)


def test_cli_refuses_classifier_and_char_model_before_writing(tmp_path):
    from llmcore.cli import app as cli

    save_checkpoint(tmp_path / "cls" / "model.safetensors", random_model("gpt2", 400), {"task": "classify"})
    tokenizer("gpt2").save(tmp_path / "cls" / "tokenizer.json")
    char = Tokenizer.char(CORPUS)
    save_model_dir(tmp_path / "char", random_model("gpt2", char.vocab_size), char)
    for folder, message in (
        ("cls", "a 'classify' checkpoint, not a causal language model"),
        ("char", "is character-level; GGUF export needs a byte-level BPE tokenizer"),
    ):
        out = tmp_path / f"out-{folder}"
        result = CliRunner().invoke(cli, ["export", str(tmp_path / folder), "--format", "gguf", "--out", str(out)])
        assert result.exit_code == 1 and message in result.output, result.output
        assert not out.exists()


def test_export_stage_writes_gguf_and_modelfile(tmp_path):
    from stages.export import app as stage

    tok = tokenizer("gpt2")
    save_model_dir(tmp_path / "models" / "base", random_model("gpt2", tok.vocab_size), tok)
    params = tmp_path / "params.yaml"
    params.write_text("export:\n  models: [base]\n  precision: f16\n  template: null\n")
    args = ["--name", "base", "--params", str(params), "--models-dir", str(tmp_path / "models")]
    result = CliRunner().invoke(stage, [*args, "--out", str(tmp_path / "export" / "base")])
    assert result.exit_code == 0, result.output
    modelfile = (tmp_path / "export" / "base" / "Modelfile").read_text()
    assert "prompt template: raw" in modelfile and "PARAMETER stop" not in modelfile  # a base model: raw text
    gguf = require_module("gguf")
    reader = gguf.GGUFReader(tmp_path / "export" / "base" / "model.gguf")
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_F16
    params.write_text("export:\n  models: [base]\n  precision: q4\n")
    result = CliRunner().invoke(stage, [*args, "--out", str(tmp_path / "other")])
    assert result.exit_code == 1 and "export.precision: expected one of f32|f16|bf16|q8_0" in result.output


def test_gpt2_f32_gap_is_llama_cpp_gelu_table(exported, monkeypatch):
    """GPT-2 models agree less closely than Llama ones in f32 because ggml's CPU GELU rounds its input to f16 and
    reads the result from an f16 table; llmcore with that GELU is about three times closer to llama.cpp."""
    import llmcore.models.gpt as gpt

    path, model, tok = exported["gpt2", "f32"]
    ids = tok.encode(CORPUS)[:48]
    theirs = llama_logits(llama_cpp_model(path), ids)
    exact_gelu = torch.nn.functional.gelu

    def ggml_gelu(x, approximate="none"):
        table = exact_gelu(x.half().float(), approximate=approximate).half().float()
        return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, table))

    with torch.no_grad():
        plain = np.abs(model(torch.tensor([ids])).logits[0].numpy() - theirs).max()
        monkeypatch.setattr(gpt.F, "gelu", ggml_gelu)
        emulated = np.abs(model(torch.tensor([ids])).logits[0].numpy() - theirs).max()
    print(f"gpt2 f32: {plain:.2e} with torch's GELU, {emulated:.2e} with ggml's f16-table GELU")
    assert emulated < plain / 2


def test_readme_export_command_runs_as_written(tmp_path, monkeypatch):
    """docs/export.md, "Run your model in Ollama / llama.cpp / LM Studio": the `llmcore export` command, as written."""
    import re
    import shlex

    from llmcore.cli import app as cli
    from tests.docs import doc_section

    text = doc_section("Run your model in Ollama / llama.cpp / LM Studio")
    lines = [
        shlex.split(line, comments=True)
        for block in re.findall(r"```bash\n(.*?)```", text, re.S)
        for line in block.splitlines()
    ]
    (words,) = [w for w in lines if w[:2] == ["llmcore", "export"]]
    monkeypatch.chdir(tmp_path)
    tok = tokenizer("gpt4")
    save_model_dir(Path(words[2]), random_model("llama", tok.vocab_size), tok, {"template": "alpaca"})
    result = CliRunner().invoke(cli, words[1:])
    assert result.exit_code == 0, result.output
    out = Path(words[words.index("--out") + 1])
    modelfile = (out / "Modelfile").read_text()
    (create,) = [w for w in lines if w[:2] == ["ollama", "create"]]
    assert Path(create[create.index("-f") + 1]) == out / "Modelfile" and "FROM ./model.gguf" in modelfile
    llama_cpp_model(out / "model.gguf")  # llama.cpp loads it


def test_q8_0_keeps_rows_that_are_not_whole_blocks_in_f16(tmp_path):
    gguf = require_module("gguf")
    tok = tokenizer("gpt2")
    model = random_model("gpt2", tok.vocab_size, emb_dim=48, hidden_dim=96)  # rows of 48 values: not 32-blocks
    path = tmp_path / "m.gguf"
    write_gguf(path, model, tok, precision="q8_0")
    kinds = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert kinds["blk.0.attn_qkv.weight"] == gguf.GGMLQuantizationType.F16  # rows of 48
    assert kinds["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.Q8_0  # rows of 96
    ids = tok.encode(CORPUS)[:48]
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(llama_logits(llama_cpp_model(path), ids) - ours).max() <= TOLERANCE["q8_0"]


def test_f16_overflow_is_refused(tmp_path):
    tok = tokenizer("gpt2")
    model = random_model("gpt2", tok.vocab_size)
    with torch.no_grad():
        model.blocks[0].mlp.fc.weight[0, 0] = 1e6
    with pytest.raises(LLMCoreError, match=r"blk\.0\.ffn_up\.weight: values beyond the f16 range"):
        write_gguf(tmp_path / "m.gguf", model, tok, precision="f16")
    assert not list(tmp_path.iterdir())


def test_benchmark_quick_runs_every_path(tmp_path):
    """benchmarks.gguf_export at tiny shapes: every precision exported, both generators timed (no speed asserted)."""
    require_module("llama_cpp")
    from benchmarks import gguf_export

    assert gguf_export.main(["--quick", "--threads", "1", "--new-tokens", "3", "--out", str(tmp_path / "b.json")]) == 0
    report = json.loads((tmp_path / "b.json").read_text())
    assert list(report["export"]) == list(PRECISIONS)
    assert report["generate"]["new_tokens"] == 3 and report["generate"]["ratio"] > 0


def test_cli_template_override_and_hf_precision_refused(tmp_path):
    from llmcore.cli import app as cli
    from tests.gotemplate import render

    tok = tokenizer("gpt2")
    save_model_dir(tmp_path / "base", random_model("gpt2", tok.vocab_size), tok)
    args = ["export", str(tmp_path / "base"), "--format", "gguf", "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(cli, [*args, "--template", "Q: {instruction}\nA:"])
    assert result.exit_code == 0, result.output
    modelfile = (tmp_path / "out" / "Modelfile").read_text()
    template = modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert render(template, {"Messages": [{"Role": "user", "Content": "Hi"}]}) == "Q: Hi\nA:"
    result = CliRunner().invoke(
        cli, ["export", str(tmp_path / "base"), "--out", str(tmp_path / "hf"), "--precision", "q8_0"]
    )
    assert result.exit_code == 1 and "precision applies to GGUF export" in result.output
    assert not (tmp_path / "hf").exists()
