"""Converters between llmcore weights and the Hugging Face layouts of GPT-2 and Llama, both directions.

GPT-2 (``GPT2LMHeadModel``): OpenAI's ``Conv1D`` stores weights as (in, out), so every linear weight is
transposed; ``c_attn`` is already the fused q|k|v projection llmcore uses; the head is tied to ``wte``.

Llama (``LlamaForCausalLM``): separate q/k/v and gate/up projections are concatenated into llmcore's
fused ``qkv`` and ``fc``. HF stores q/k in the "rotate half" RoPE order, which llmcore uses too, so
no permutation is needed (Meta's original checkpoints interleave pairs; HF's conversion permuted them).

A checkpoint directory in the HF layout is ``config.json`` + ``model.safetensors`` (or sharded files
with ``model.safetensors.index.json``). Reading never unpickles: ``pytorch_model.bin`` is refused.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from llmcore.common import LLMCoreError, atomic_path, write_json_atomic
from llmcore.models.config import ConfigError, ModelConfig
from llmcore.models.gpt import GPT
from llmcore.text.bpe_export import hf_tokenizer_files
from llmcore.text.chat import CHATML, IM_END, chat_token_ids
from llmcore.text.chat_templates import jinja_chat_template
from llmcore.text.llama3 import bos_token
from llmcore.text.tokenizer import Tokenizer
from llmcore.weights.weight_file import load_state, model_from_state, model_state

# --- configs ---------------------------------------------------------------------------------------


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Map an HF ``config.json`` (GPT-2 or Llama family) to a ``ModelConfig``."""
    model_type = hf.get("model_type")
    try:
        if model_type == "gpt2":
            if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
                raise LLMCoreError(f"config.json: unsupported GPT-2 activation {hf['activation_function']!r}")
            return ModelConfig(
                vocab_size=hf["vocab_size"],
                context_length=hf["n_positions"],
                emb_dim=hf["n_embd"],
                n_layers=hf["n_layer"],
                n_heads=hf["n_head"],
                hidden_dim=hf.get("n_inner") or 4 * hf["n_embd"],
                norm="layernorm",
                norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                pos_emb="learned",
                mlp="gelu",
                qkv_bias=True,
                bias=True,
                tie_embeddings=hf.get("tie_word_embeddings", True),
                dropout=0.0,
            )
        if model_type == "llama":
            rope = hf.get("rope_parameters") or {}
            theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
            scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type") == "llama3" else None)
            if scaling is not None and scaling.get("rope_type", scaling.get("type")) not in ("llama3", "default"):
                raise LLMCoreError(f"config.json: unsupported rope scaling {scaling!r}")
            if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "default":
                scaling = None
            n_heads = hf["num_attention_heads"]
            head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
            if head_dim * n_heads != hf["hidden_size"]:
                raise LLMCoreError("config.json: head_dim * num_attention_heads != hidden_size is not supported")
            if hf.get("hidden_act", "silu") != "silu":
                raise LLMCoreError(f"config.json: unsupported activation {hf['hidden_act']!r}")
            if scaling:
                scaling = {
                    "factor": scaling["factor"],
                    "low_freq_factor": scaling["low_freq_factor"],
                    "high_freq_factor": scaling["high_freq_factor"],
                    "original_context_length": scaling["original_max_position_embeddings"],
                }
            return ModelConfig(
                vocab_size=hf["vocab_size"],
                context_length=hf["max_position_embeddings"],
                emb_dim=hf["hidden_size"],
                n_layers=hf["num_hidden_layers"],
                n_heads=n_heads,
                n_kv_heads=hf.get("num_key_value_heads") or n_heads,
                hidden_dim=hf["intermediate_size"],
                norm="rmsnorm",
                norm_eps=hf.get("rms_norm_eps", 1e-6),
                pos_emb="rope",
                rope_theta=theta,
                rope_scaling=scaling,
                mlp="swiglu",
                qkv_bias=hf.get("attention_bias", False),
                bias=hf.get("attention_bias", False) and hf.get("mlp_bias", False),
                tie_embeddings=hf.get("tie_word_embeddings", False),
                dropout=0.0,
            )
    except KeyError as e:
        raise LLMCoreError(f"config.json: missing key {e.args[0]!r} for model_type {model_type!r}") from None
    except ConfigError as e:
        raise LLMCoreError(f"config.json: {e}") from None
    raise LLMCoreError(f"config.json: unsupported model_type {model_type!r} (supported: gpt2, llama)")


def config_to_hf(cfg: ModelConfig, eot_id: int | None = None) -> dict[str, Any]:
    """The HF ``config.json`` for a GPT-2- or Llama-family llmcore config; ``eot_id`` (the tokenizer's end-of-text
    id) is bos and eos, GPT-2's 50256 when not given for a GPT-2-family model."""
    if family(cfg) == "gpt2":
        eot = 50256 if eot_id is None else eot_id
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": cfg.vocab_size,
            "n_positions": cfg.context_length,
            "n_ctx": cfg.context_length,
            "n_embd": cfg.emb_dim,
            "n_layer": cfg.n_layers,
            "n_head": cfg.n_heads,
            "n_inner": cfg.hidden_dim,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "tie_word_embeddings": True,
            "bos_token_id": eot,
            "eos_token_id": eot,
            "torch_dtype": "float32",
        }
    out = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.context_length,
        "hidden_size": cfg.emb_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.hidden_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "attention_bias": cfg.qkv_bias,
        "mlp_bias": cfg.bias,
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": "float32",
    }
    if eot_id is not None:
        out |= {"bos_token_id": eot_id, "eos_token_id": eot_id}
    if cfg.rope_scaling:
        sc = cfg.rope_scaling
        out["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": sc["factor"],
            "low_freq_factor": sc["low_freq_factor"],
            "high_freq_factor": sc["high_freq_factor"],
            "original_max_position_embeddings": sc["original_context_length"],
        }
    return out


def family(cfg: ModelConfig) -> str:
    """'gpt2' or 'llama' if ``cfg`` matches one HF architecture exactly, else a one-line error."""
    parts = (cfg.norm, cfg.pos_emb, cfg.mlp)
    gpt2_only = cfg.n_kv_heads == cfg.n_heads and cfg.bias and cfg.qkv_bias and cfg.tie_embeddings
    if parts == ("layernorm", "learned", "gelu") and gpt2_only and not cfg.qk_norm:
        return "gpt2"
    # HF Llama puts mlp_bias on gate/up/down and attention_bias on q/k/v/o: llmcore's o-proj follows `bias`
    if parts == ("rmsnorm", "rope", "swiglu") and not cfg.qk_norm and (cfg.bias == cfg.qkv_bias or not cfg.bias):
        return "llama"
    raise LLMCoreError("model config matches neither the HF GPT-2 nor the HF Llama architecture")


# --- weights ---------------------------------------------------------------------------------------
# llmcore name -> HF name templates; {} is the layer index.
_GPT2_MAP = {
    "tok_emb.weight": "wte.weight",
    "pos_emb.weight": "wpe.weight",
    "final_norm.weight": "ln_f.weight",
    "final_norm.bias": "ln_f.bias",
    "blocks.{}.norm1.weight": "h.{}.ln_1.weight",
    "blocks.{}.norm1.bias": "h.{}.ln_1.bias",
    "blocks.{}.attn.qkv.weight": "h.{}.attn.c_attn.weight",
    "blocks.{}.attn.qkv.bias": "h.{}.attn.c_attn.bias",
    "blocks.{}.attn.proj.weight": "h.{}.attn.c_proj.weight",
    "blocks.{}.attn.proj.bias": "h.{}.attn.c_proj.bias",
    "blocks.{}.norm2.weight": "h.{}.ln_2.weight",
    "blocks.{}.norm2.bias": "h.{}.ln_2.bias",
    "blocks.{}.mlp.fc.weight": "h.{}.mlp.c_fc.weight",
    "blocks.{}.mlp.fc.bias": "h.{}.mlp.c_fc.bias",
    "blocks.{}.mlp.proj.weight": "h.{}.mlp.c_proj.weight",
    "blocks.{}.mlp.proj.bias": "h.{}.mlp.c_proj.bias",
}
_CONV1D = re.compile(r"\.(c_attn|c_proj|c_fc)\.weight$")  # stored (in, out): transpose

_LLAMA_MAP = {
    "tok_emb.weight": "model.embed_tokens.weight",
    "final_norm.weight": "model.norm.weight",
    "out_head.weight": "lm_head.weight",
    "blocks.{}.norm1.weight": "model.layers.{}.input_layernorm.weight",
    "blocks.{}.norm2.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blocks.{}.attn.proj.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blocks.{}.attn.proj.bias": "model.layers.{}.self_attn.o_proj.bias",
    "blocks.{}.mlp.proj.weight": "model.layers.{}.mlp.down_proj.weight",
    "blocks.{}.mlp.proj.bias": "model.layers.{}.mlp.down_proj.bias",
}
# fused llmcore tensors <- concatenation (dim 0) of HF tensors
_LLAMA_FUSED = {
    "blocks.{}.attn.qkv.weight": [f"model.layers.{{}}.self_attn.{x}_proj.weight" for x in "qkv"],
    "blocks.{}.attn.qkv.bias": [f"model.layers.{{}}.self_attn.{x}_proj.bias" for x in "qkv"],
    "blocks.{}.mlp.fc.weight": [f"model.layers.{{}}.mlp.{x}_proj.weight" for x in ("gate", "up")],
    "blocks.{}.mlp.fc.bias": [f"model.layers.{{}}.mlp.{x}_proj.bias" for x in ("gate", "up")],
}


def _layer_names(template: str, n_layers: int) -> list[tuple[str, int | None]]:
    return [(template.format(i), i) for i in range(n_layers)] if "{}" in template else [(template, None)]


def _fused_sizes(cfg: ModelConfig, name: str) -> list[int]:
    if ".qkv." in name:
        return [cfg.emb_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim]
    return [cfg.hidden_dim, cfg.hidden_dim]


def state_from_hf(
    cfg: ModelConfig, hf_state: dict[str, torch.Tensor], *, consume: bool = False
) -> dict[str, torch.Tensor]:
    """HF state dict -> llmcore state dict (for ``cfg``, from ``config_from_hf``). Unused HF tensors
    other than known buffers are an error, so a silently dropped weight cannot pass.

    With ``consume``, ``hf_state`` is used up: tensors that are transposed or fused are dropped from it as their
    copies are made, so the conversion needs about one tensor of extra memory, not a second copy of the model."""
    if not consume:
        hf_state = dict(hf_state)
    fam = family(cfg)
    out: dict[str, torch.Tensor] = {}
    if fam == "gpt2":
        # transformers' GPT2LMHeadModel prefixes "transformer."; the Hub's safetensors file does not.
        for key in [k for k in hf_state if k.startswith("transformer.")]:
            hf_state[key.removeprefix("transformer.")] = hf_state.pop(key)
        used = set()
        for ours, theirs in _GPT2_MAP.items():
            for name, i in _layer_names(ours, cfg.n_layers):
                src = theirs.format(i) if i is not None else theirs
                if src not in hf_state:
                    raise LLMCoreError(f"GPT-2 checkpoint: missing tensor {src}")
                t = hf_state[src]
                if _CONV1D.search(src):  # the transposed copy replaces the original, one tensor at a time
                    out[name] = t.t().contiguous()
                    hf_state[src] = t = None
                else:
                    out[name] = t
                used.add(src)
        ignorable = re.compile(r"(\.attn\.bias|\.attn\.masked_bias|^lm_head\.weight)$")
    else:
        used = set()
        for ours, theirs in _LLAMA_MAP.items():
            for name, i in _layer_names(ours, cfg.n_layers):
                src = theirs.format(i) if i is not None else theirs
                if src in hf_state:
                    out[name] = hf_state[src]
                    used.add(src)
        for ours, parts in _LLAMA_FUSED.items():
            for name, i in _layer_names(ours, cfg.n_layers):
                srcs = [p.format(i) for p in parts]
                if all(s in hf_state for s in srcs):
                    out[name] = torch.cat([hf_state[s] for s in srcs], dim=0)
                    for s in srcs:  # the fused copy replaces its parts
                        hf_state[s] = None
                    used.update(srcs)
        if cfg.tie_embeddings:
            out.pop("out_head.weight", None)
        ignorable = re.compile(r"(rotary_emb\.inv_freq|^lm_head\.weight)$")
    leftover = sorted(k for k in set(hf_state) - used if not ignorable.search(k))
    if leftover:
        raise LLMCoreError(f"checkpoint has tensors llmcore does not use: {leftover[:3]}")
    return out


def state_to_hf(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """llmcore state dict -> HF state dict (the keys ``save_pretrained`` writes)."""
    fam = family(cfg)
    out: dict[str, torch.Tensor] = {}
    if fam == "gpt2":
        for ours, theirs in _GPT2_MAP.items():
            for name, i in _layer_names(ours, cfg.n_layers):
                dst = "transformer." + (theirs.format(i) if i is not None else theirs)
                out[dst] = state[name].t().contiguous() if _CONV1D.search(dst) else state[name]
        return out
    for ours, theirs in _LLAMA_MAP.items():
        for name, i in _layer_names(ours, cfg.n_layers):
            if name in state:
                out[theirs.format(i) if i is not None else theirs] = state[name]
    for ours, parts in _LLAMA_FUSED.items():
        for name, i in _layer_names(ours, cfg.n_layers):
            if name in state:
                chunks = state[name].split(_fused_sizes(cfg, name), dim=0)
                out.update({p.format(i): c.contiguous() for p, c in zip(parts, chunks, strict=True)})
    return out


# --- directories -----------------------------------------------------------------------------------


def read_hf_state(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of an HF checkpoint directory (single or sharded safetensors)."""
    directory = Path(directory)
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.is_file():
        return load_state(single)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            if Path(shard).name != shard:  # a shard name must not point outside the directory
                raise LLMCoreError(f"{index}: bad shard name {shard!r}")
            state.update(load_state(directory / shard))
        return state
    if (directory / "pytorch_model.bin").exists():
        raise LLMCoreError(f"{directory}: only pickle weights (pytorch_model.bin) found; safetensors required")
    raise LLMCoreError(f"{directory}: no model.safetensors found")


def load_hf(directory: str | os.PathLike, device: str = "cpu") -> GPT:
    """Build an llmcore model from an HF checkpoint directory (``config.json`` + safetensors)."""
    directory = Path(directory)
    config_path = directory / "config.json"
    try:
        hf_config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LLMCoreError(f"{config_path}: cannot read config: {e}") from None
    cfg = config_from_hf(hf_config)
    state = read_hf_state(directory)
    for k in list(state):  # one tensor at a time: a bf16 file never sits beside its whole fp32 copy
        state[k] = state.pop(k).float()
    state = state_from_hf(cfg, state, consume=True)  # drops each HF tensor once converted
    # built on the meta device with the converted tensors as its parameters: RAM peaks near 1x the weights
    return model_from_state(cfg, state, directory).to(device).eval()


def save_hf(
    model: GPT, directory: str | os.PathLike, tokenizer: Tokenizer | None = None, template: str | None = None
) -> list[str]:
    """Write ``model`` as an HF checkpoint directory that ``from_pretrained`` loads; returns the file names.

    With a byte-level BPE ``tokenizer`` the folder also gets ``tokenizer.json``, ``tokenizer_config.json`` (with a
    chat template reproducing ``template`` when given), ``special_tokens_map.json`` and ``generation_config.json``
    (end-of-text as bos/eos/pad; a chat model's eos is ``<|im_end|>``), so ``AutoTokenizer`` and ``generate`` work
    without llmcore. A char tokenizer has no HF equivalent: only the weights and config are written.
    """
    from safetensors.torch import save_file

    cfg = model.cfg
    bpe = tokenizer is not None and tokenizer.kind != "char"
    family(cfg)  # refuse an architecture HF has no class for before writing anything
    files: dict[str, Any] = {}
    if bpe:
        files = hf_tokenizer_files(tokenizer, cfg.context_length)
        if template:
            files["tokenizer_config.json"]["chat_template"] = jinja_chat_template(template)
        eot, bos = tokenizer.eot_id, tokenizer.special_tokens.get(bos_token(tokenizer) or "", tokenizer.eot_id)
        files["generation_config.json"] = {"bos_token_id": bos, "eos_token_id": eot, "pad_token_id": eot}
        if template == CHATML:  # a chat model's turn ends at <|im_end|>: eos for transformers' generate
            end = chat_token_ids(tokenizer)[1]
            for name in ("tokenizer_config.json", "special_tokens_map.json"):
                files[name]["eos_token"] = IM_END
            files["generation_config.json"]["eos_token_id"] = [end, eot]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = state_to_hf(cfg, model_state(model))
    with atomic_path(directory / "model.safetensors") as tmp:
        save_file({k: v.cpu() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    files["config.json"] = config_to_hf(cfg, tokenizer.eot_id if bpe else None)
    if bpe:  # bos: <|begin_of_text|> for a Llama-3 tokenizer (as generation_config.json), else end-of-text
        files["config.json"]["bos_token_id"] = files["generation_config.json"]["bos_token_id"]
    for name, obj in files.items():
        write_json_atomic(directory / name, obj)
    return ["model.safetensors", *files]
