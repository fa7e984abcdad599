"""GGUF export: one file that llama.cpp, Ollama and LM Studio run, written with the ``gguf`` package (the llama.cpp
project's own writer).

    write_gguf("model.gguf", model, tokenizer, precision="q8_0", name="instruct", template="alpaca")

Architectures (llama.cpp's names):

- ``gpt2`` (LayerNorm, learned positions, GELU, tied head): ``token_embd``, ``position_embd``, per block
  ``attn_norm``, ``attn_qkv`` (llmcore's fused q|k|v as it is), ``attn_output``, ``ffn_norm``, ``ffn_up``,
  ``ffn_down``, all with biases, then ``output_norm``; the head is tied, so no ``output`` (llama.cpp reuses
  ``token_embd``, as for a tied Llama; the file is one embedding matrix smaller).
- ``llama`` (RMSNorm, RoPE, SwiGLU, GQA): ``attn_q``/``attn_k``/``attn_v`` split from the fused projection,
  ``ffn_gate``/``ffn_up`` split from the fused ``fc``; a tied head is left out (llama.cpp reuses
  ``token_embd``). llmcore rotates the two halves of each head ("rotate half", as HF Llama); llama.cpp's
  ``llama`` rotates adjacent pairs, so the rows of Q and K (and their biases) are reordered per head, half
  ``i`` -> pair ``i``, which gives the same attention scores. Llama-3.1 frequency scaling goes in as
  ``rope_freqs`` (the divisor of each rotary frequency), as llama.cpp expects.

The tokenizer goes inside the file: ``tokenizer.ggml.model`` ``gpt2`` (byte-level BPE), the tokens in GPT-2's
byte spelling, their types (normal; control for special tokens; unused for padding rows of a model whose
vocabulary is wider than its tokenizer), the merges (:mod:`llmcore.text.bpe_export`), ``<|endoftext|>`` as bos,
eos and padding (a chat model's eos and end-of-turn: ``<|im_end|>``), no bos added, and the pre-tokenizer of the
split regex (``gpt-2`` or ``llama-bpe``). The chat template (Jinja) reproduces the model's prompt template.
Everything is checked before the file is opened: a char tokenizer, a split regex llama.cpp has no pre-tokenizer
for, or an architecture neither family matches is a one-line error and nothing is written.

Precisions: ``f32``; ``f16`` and ``bf16`` (matrices; 1-D norms and biases stay f32, as llama.cpp's converter
does); ``q8_0`` (matrices whose rows are a multiple of 32 values, quantized by the ``gguf`` package; other
matrices f16).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmcore.common import LLMCoreError, atomic_path
from llmcore.models.config import ModelConfig
from llmcore.models.gpt import GPT, rope_frequencies
from llmcore.text.bpe import GPT2_PATTERN, GPT4_PATTERN
from llmcore.text.bpe_export import bpe_merges, byte_level, regular_tokens, require_bpe
from llmcore.text.chat import CHATML, chat_token_ids
from llmcore.text.chat_templates import jinja_chat_template
from llmcore.text.llama3 import LLAMA3_PATTERN
from llmcore.text.tokenizer import Tokenizer, gpt2_byte_encoder
from llmcore.weights.hf_convert import family
from llmcore.weights.weight_file import model_state

PRECISIONS = ("f32", "f16", "bf16", "q8_0")
# llama.cpp's pre-tokenizer for each split regex llmcore uses (llama-vocab.cpp: LLAMA_VOCAB_PRE_TYPE_*)
PRE_TOKENIZERS = {GPT2_PATTERN: "gpt-2", GPT4_PATTERN: "llama-bpe", LLAMA3_PATTERN: "llama-bpe"}
INSTALL_HINT = "install the export extra: pip install 'llmcore[export]'"


def _gguf():
    try:
        import gguf
    except ImportError:
        raise LLMCoreError(f"GGUF export needs the gguf package; {INSTALL_HINT}") from None
    return gguf


@dataclass(frozen=True)
class GGUFInfo:
    """What :func:`write_gguf` wrote."""

    path: Path
    arch: str  # gpt2 | llama
    precision: str
    n_tensors: int
    bytes: int
    pre_tokenizer: str


def check_exportable(cfg: ModelConfig, tok: Tokenizer, precision: str) -> tuple[str, str]:
    """``(arch, pre_tokenizer)`` if the model, tokenizer and precision can be written; else a one-line error."""
    if precision not in PRECISIONS:
        raise LLMCoreError(f"GGUF precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    require_bpe(tok, "GGUF export")
    pre = PRE_TOKENIZERS.get(tok.pattern)
    if pre is None:
        raise LLMCoreError(
            f"tokenizer {tok.name!r} splits text with a custom regex that llama.cpp has no pre-tokenizer for "
            "(GGUF export supports the gpt2 and gpt4 patterns and Llama-3's)"
        )
    if tok.vocab_size > cfg.vocab_size:
        raise LLMCoreError(f"tokenizer has {tok.vocab_size} ids, the model only {cfg.vocab_size} rows")
    try:
        arch = family(cfg)
    except LLMCoreError as e:
        raise LLMCoreError(f"GGUF export: {e} (llama.cpp's gpt2 and llama)") from None
    return arch, pre


# --- tensors ---------------------------------------------------------------------------------------------


def rope_interleave(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a Q or K projection (or bias) from "rotate half" to adjacent-pair rotation:
    per head, rows ``[x_0 .. x_{h/2-1}, y_0 .. y_{h/2-1}]`` become ``[x_0, y_0, x_1, y_1, ...]``."""
    head = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(GGUF name, fp32 tensor)`` in file order for a gpt2- or llama-family state dict."""
    arch = family(cfg)
    yield "token_embd.weight", state["tok_emb.weight"]
    if arch == "gpt2":
        yield "position_embd.weight", state["pos_emb.weight"]
    elif cfg.rope_scaling:
        base = rope_frequencies(cfg.head_dim, cfg.rope_theta)
        yield "rope_freqs.weight", base / rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    for i in range(cfg.n_layers):
        p, b = f"blocks.{i}.", f"blk.{i}."
        for kind in ("weight", "bias"):
            if p + f"norm1.{kind}" in state:
                yield b + f"attn_norm.{kind}", state[p + f"norm1.{kind}"]
        for kind in ("weight", "bias"):
            qkv = state.get(p + f"attn.qkv.{kind}")
            if qkv is None:
                continue
            if arch == "gpt2":
                yield b + f"attn_qkv.{kind}", qkv
            else:
                q, k, v = qkv.split([q_dim, kv_dim, kv_dim], dim=0)
                yield b + f"attn_q.{kind}", rope_interleave(q, cfg.n_heads)
                yield b + f"attn_k.{kind}", rope_interleave(k, cfg.n_kv_heads)
                yield b + f"attn_v.{kind}", v
        for kind in ("weight", "bias"):
            if p + f"attn.proj.{kind}" in state:
                yield b + f"attn_output.{kind}", state[p + f"attn.proj.{kind}"]
        for kind in ("weight", "bias"):
            if p + f"norm2.{kind}" in state:
                yield b + f"ffn_norm.{kind}", state[p + f"norm2.{kind}"]
        for kind in ("weight", "bias"):
            fc = state.get(p + f"mlp.fc.{kind}")
            if fc is None:
                continue
            if arch == "gpt2":
                yield b + f"ffn_up.{kind}", fc
            else:
                gate, up = fc.split([cfg.hidden_dim, cfg.hidden_dim], dim=0)
                yield b + f"ffn_gate.{kind}", gate
                yield b + f"ffn_up.{kind}", up
        for kind in ("weight", "bias"):
            if p + f"mlp.proj.{kind}" in state:
                yield b + f"ffn_down.{kind}", state[p + f"mlp.proj.{kind}"]
    for kind in ("weight", "bias"):
        if f"final_norm.{kind}" in state:
            yield f"output_norm.{kind}", state[f"final_norm.{kind}"]
    if not cfg.tie_embeddings:
        yield "output.weight", state["out_head.weight"]


def _encode(gguf, name: str, t: torch.Tensor, precision: str) -> tuple[np.ndarray, Any]:
    """``(data, raw_dtype)`` for ``GGUFWriter.add_tensor``: 1-D tensors stay f32 (as llama.cpp's converter)."""
    Q = gguf.GGMLQuantizationType
    x = t.detach().to(torch.float32).cpu().numpy()
    if x.ndim == 1 or precision == "f32" or name == "rope_freqs.weight":
        return x, None
    if precision == "q8_0" and x.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0:
        return gguf.quants.quantize(x, Q.Q8_0), Q.Q8_0
    if precision == "bf16":
        return gguf.quants.quantize(x, Q.BF16), Q.BF16
    with np.errstate(over="ignore"):
        half = x.astype(np.float16)
    if not np.isfinite(half).all() and np.isfinite(x).all():
        raise LLMCoreError(f"{name}: values beyond the f16 range (±65504); export as bf16 or f32")
    return half, None


# --- the file --------------------------------------------------------------------------------------------


def write_gguf(
    path: str | os.PathLike,
    model: GPT,
    tok: Tokenizer,
    *,
    precision: str = "f16",
    name: str = "llmcore",
    template: str | None = None,
) -> GGUFInfo:
    """Write ``model`` and ``tok`` as one GGUF file, atomically (see the module docstring).

    Args:
        precision: f32 | f16 | bf16 | q8_0.
        name: ``general.name``.
        template: the prompt template (``alpaca``, ``raw`` or a custom format string) the chat template reproduces;
            None writes none.
    """
    cfg = model.cfg
    arch, pre = check_exportable(cfg, tok, precision)
    gguf = _gguf()
    chat_template = jinja_chat_template(template) if template else None
    state = model_state(model)

    tokens = regular_tokens(tok)
    table = gpt2_byte_encoder()
    T = gguf.TokenType
    names = [byte_level(t, table) for t in tokens]
    types = [T.NORMAL] * len(tokens)
    for special, _ in sorted(tok.special_tokens.items(), key=lambda kv: kv[1]):
        names.append(special)
        types.append(T.CONTROL)
    for i in range(tok.vocab_size, cfg.vocab_size):  # embedding rows no token uses (a padded vocabulary)
        names.append(f"<|unused_{i}|>")
        types.append(T.UNUSED)
    merges = [f"{byte_level(a, table)} {byte_level(b, table)}" for a, b in bpe_merges(tokens)]

    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[precision]
    path = Path(path)
    with atomic_path(path, suffix=".gguf") as tmp:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_name(name)
        w.add_file_type(file_type)
        if precision == "q8_0":
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_vocab_size(cfg.vocab_size)
        w.add_context_length(cfg.context_length)
        w.add_embedding_length(cfg.emb_dim)
        w.add_block_count(cfg.n_layers)
        w.add_feed_forward_length(cfg.hidden_dim)
        w.add_head_count(cfg.n_heads)
        if arch == "gpt2":
            w.add_layer_norm_eps(cfg.norm_eps)
        else:
            w.add_head_count_kv(cfg.n_kv_heads)
            w.add_layer_norm_rms_eps(cfg.norm_eps)
            w.add_rope_dimension_count(cfg.head_dim)
            w.add_rope_freq_base(cfg.rope_theta)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(names)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(tok.eot_id)
        if template == CHATML:  # a chat model ends its turn with <|im_end|>: eos and end-of-turn for llama.cpp
            end = chat_token_ids(tok)[1]
            w.add_eos_token_id(end)
            w.add_eot_token_id(end)
        else:
            w.add_eos_token_id(tok.eot_id)
        w.add_pad_token_id(tok.eot_id)
        w.add_add_bos_token(False)
        w.add_add_eos_token(False)
        if chat_template:
            w.add_chat_template(chat_template)
        n = 0
        for tensor_name, tensor in gguf_tensors(cfg, state):
            data, raw_dtype = _encode(gguf, tensor_name, tensor, precision)
            w.add_tensor(tensor_name, data, raw_dtype=raw_dtype)
            n += 1
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return GGUFInfo(path, arch, precision, n, path.stat().st_size, pre)
