"""Model configuration: one typed, validated dataclass for both architecture families, plus named presets.

GPT-2 style and Llama-3 style models differ in a handful of switches (norm, positions, MLP, attention
grouping, biases, tying); everything else is shared. The config is plain data: it serialises to JSON,
travels inside every checkpoint, and downstream stages rebuild models from it.

Presets are plain dicts (``PRESETS``); ``ModelConfig.from_preset(name, **overrides)`` builds one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass
from typing import Any

from llmcore.params import ParamsError, convert, show_value

NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rope")
MLPS = ("gelu", "swiglu")


class ConfigError(ValueError):
    """A model config field has a bad value; the message names the field and the value."""


@dataclass
class ModelConfig:
    # sizes
    vocab_size: int = 50257  # tokens in the vocabulary (output head width)
    context_length: int = 1024  # longest sequence the model attends over (block_size in nanoGPT)
    emb_dim: int = 768  # residual stream width (n_embd)
    n_layers: int = 12  # transformer blocks
    n_heads: int = 12  # query heads
    n_kv_heads: int | None = None  # key/value heads: n_heads = MHA, 1 = MQA, between = GQA (None -> n_heads)
    hidden_dim: int | None = None  # MLP inner width (None -> 4*emb_dim for GELU, Llama's 8/3 rule for SwiGLU)
    # parts
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    pos_emb: str = "learned"  # learned (absolute table) | rope (rotary, applied to q and k)
    rope_theta: float = 10000.0
    # Llama-3.1 style frequency scaling: {factor, low_freq_factor, high_freq_factor, original_context_length}
    rope_scaling: dict[str, float] | None = None
    mlp: str = "gelu"  # gelu (tanh approximation, as GPT-2) | swiglu (gate/up/down, as Llama)
    qk_norm: bool = False  # RMSNorm on each head's queries and keys before attention (OLMo-2, Qwen-3)
    qkv_bias: bool = True  # bias on the query/key/value projection
    bias: bool = True  # bias on the other linear layers and on LayerNorm
    dropout: float = 0.0  # on embeddings, attention weights and residual branches
    tie_embeddings: bool = True  # output head shares the token-embedding matrix
    # Round the embedding and head rows up to a multiple of this (GPT-2's 50,257 -> 50,304 with 64): aligned matmul
    # shapes for GPU kernels. The extra rows are never scored, sampled or exported (``vocab_size`` stays the real
    # vocabulary everywhere outside the model); None keeps the rows at vocab_size.
    pad_vocab_multiple: int | None = None

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.hidden_dim is None:
            self.hidden_dim = 4 * self.emb_dim if self.mlp == "gelu" else _llama_hidden_dim(self.emb_dim)
        if self.rope_scaling is not None:
            self.rope_scaling = dict(self.rope_scaling)
        self.validate()

    def validate(self) -> None:
        for name in ("vocab_size", "context_length", "emb_dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model.{name}: expected a positive int, got {value!r}")
        for name, choices in (("norm", NORMS), ("pos_emb", POSITIONS), ("mlp", MLPS)):
            value = getattr(self, name)
            if value not in choices:
                raise ConfigError(f"model.{name}: expected one of {'|'.join(choices)}, got {value!r}")
        if self.emb_dim % self.n_heads:
            raise ConfigError(f"model.emb_dim: {self.emb_dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"model.n_kv_heads: n_heads={self.n_heads} is not divisible by {self.n_kv_heads}")
        if self.pos_emb == "rope" and self.head_dim % 2:
            raise ConfigError(f"model.emb_dim: RoPE needs an even head size, got {self.head_dim}")
        m = self.pad_vocab_multiple
        if m is not None and (not isinstance(m, int) or isinstance(m, bool) or m <= 0):
            raise ConfigError(f"model.pad_vocab_multiple: expected a positive int or null, got {m!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout: expected a value in [0, 1), got {self.dropout!r}")
        if not self.norm_eps > 0:
            raise ConfigError(f"model.norm_eps: expected a positive float, got {self.norm_eps!r}")
        if not self.rope_theta > 0:
            raise ConfigError(f"model.rope_theta: expected a positive float, got {self.rope_theta!r}")
        if self.rope_scaling is not None:
            missing = {"factor", "low_freq_factor", "high_freq_factor", "original_context_length"}
            missing -= set(self.rope_scaling)
            if missing:
                raise ConfigError(f"model.rope_scaling: missing {sorted(missing)}")

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and the output head: ``vocab_size`` rounded up to ``pad_vocab_multiple``."""
        m = self.pad_vocab_multiple or 1
        return -(-self.vocab_size // m) * m

    def unpadded(self) -> ModelConfig:
        """This config without vocabulary padding: what exports and model folders carry."""
        return dataclasses.replace(self, pad_vocab_multiple=None) if self.pad_vocab_multiple else self

    # --- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if data["pad_vocab_multiple"] is None:  # unpadded configs serialise as they did before the field existed
            del data["pad_vocab_multiple"]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"model.{unknown[0]}: unknown config field")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise ConfigError(f"model.preset: unknown preset {name!r} (known: {', '.join(PRESETS)})")
        return cls.from_dict({**PRESETS[name], **overrides})

    # --- accounting ----------------------------------------------------------------------------
    def num_params(self, include_tied_head: bool = False) -> int:
        """Parameter count computed from the shapes (equals ``sum(p.numel())`` of the built model).

        With tied embeddings the head shares the embedding matrix: ``include_tied_head=True`` counts
        it a second time, which is the number papers quote for untied models (e.g. GPT-2's "163M"). A padded
        vocabulary counts its padded rows (the parameters the model holds).
        """
        C, H = self.emb_dim, self.hidden_dim
        kv = self.n_kv_heads * self.head_dim
        norm = C * (2 if self.norm == "layernorm" and self.bias else 1)
        attn = C * (C + 2 * kv) + (C + 2 * kv) * self.qkv_bias + C * C + C * self.bias
        attn += 2 * self.head_dim * self.qk_norm
        mlp = (2 * C * H + H * self.bias) if self.mlp == "swiglu" else (C * H + H * self.bias)
        mlp += H * C + C * self.bias
        block = 2 * norm + attn + mlp
        V = self.padded_vocab_size
        emb = V * C + (self.context_length * C if self.pos_emb == "learned" else 0)
        head = V * C
        total = emb + self.n_layers * block + norm
        if not self.tie_embeddings or include_tied_head:
            total += head
        return total

    def weight_bytes(self, dtype: str = "fp32") -> int:
        """Memory of the weights alone (no activations, gradients or optimizer state)."""
        return self.num_params() * {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1}[dtype]

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6N + 12·L·C·T (PaLM appendix B, as nanoGPT).

        N excludes the position table, which costs no matmul FLOPs; the output head is included (it is
        a real matmul even when tied), at the real vocabulary: padded rows are not model FLOPs.
        """
        T = seq_len or self.context_length
        n = self.unpadded().num_params(include_tied_head=True)
        if self.pos_emb == "learned":
            n -= self.context_length * self.emb_dim
        n -= self.vocab_size * self.emb_dim  # the embedding lookup itself is not a matmul
        return 6.0 * n + 12.0 * self.n_layers * self.emb_dim * T


def _llama_hidden_dim(emb_dim: int) -> int:
    """Llama's SwiGLU width: 2/3 of 4·C (same FLOPs as a 4·C GELU MLP), rounded up to a multiple of
    256 for real sizes and of 32 for the small CPU ones."""
    multiple_of = 256 if emb_dim >= 1024 else 32
    return multiple_of * math.ceil(8 * emb_dim / 3 / multiple_of)


_GPT2 = dict(
    vocab_size=50257,
    context_length=1024,
    norm="layernorm",
    pos_emb="learned",
    mlp="gelu",
    qkv_bias=True,
    bias=True,
    tie_embeddings=True,
    dropout=0.0,
    norm_eps=1e-5,
)
_LLAMA3 = dict(
    norm="rmsnorm",
    pos_emb="rope",
    mlp="swiglu",
    qkv_bias=False,
    bias=False,
    tie_embeddings=False,
    norm_eps=1e-5,
    rope_theta=500000.0,
    dropout=0.0,
)

PRESETS: dict[str, dict[str, Any]] = {
    # OpenAI GPT-2 shapes (https://huggingface.co/openai-community/gpt2{,-medium,-large,-xl}/config.json)
    "gpt2-124m": {**_GPT2, "emb_dim": 768, "n_layers": 12, "n_heads": 12},
    "gpt2-355m": {**_GPT2, "emb_dim": 1024, "n_layers": 24, "n_heads": 16},
    "gpt2-774m": {**_GPT2, "emb_dim": 1280, "n_layers": 36, "n_heads": 20},
    "gpt2-1558m": {**_GPT2, "emb_dim": 1600, "n_layers": 48, "n_heads": 25},
    # Llama 3.2 1B (https://huggingface.co/meta-llama/Llama-3.2-1B/config.json)
    "llama3.2-1b": {
        **_LLAMA3,
        "vocab_size": 128256,
        "context_length": 131072,
        "emb_dim": 2048,
        "n_layers": 16,
        "n_heads": 32,
        "n_kv_heads": 8,
        "hidden_dim": 8192,
        "tie_embeddings": True,
        "rope_scaling": {
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_context_length": 8192,
        },
    },
    # Small CPU presets: minutes on two cores. vocab_size is set by the tokenizer at train time.
    "gpt2-tiny": {**_GPT2, "vocab_size": 1024, "context_length": 128, "emb_dim": 128, "n_layers": 4, "n_heads": 4},
    "gpt2-small-cpu": {**_GPT2, "vocab_size": 1024, "context_length": 256, "emb_dim": 256, "n_layers": 6, "n_heads": 8},
    "llama3-tiny": {
        **_LLAMA3,
        "vocab_size": 1024,
        "context_length": 128,
        "emb_dim": 128,
        "n_layers": 4,
        "n_heads": 4,
        "n_kv_heads": 2,
        "hidden_dim": 352,
        "rope_theta": 10000.0,
    },
    "llama3-small-cpu": {
        **_LLAMA3,
        "vocab_size": 1024,
        "context_length": 256,
        "emb_dim": 256,
        "n_layers": 6,
        "n_heads": 8,
        "n_kv_heads": 4,
        "hidden_dim": 688,
        "rope_theta": 10000.0,
    },
}


def model_config_from_params(data: Any, where: str = "model", **fixed: Any) -> ModelConfig:
    """params.yaml's ``model`` section: a ``preset`` name plus field overrides (``{preset: llama3-tiny, n_layers: 2}``).

    ``fixed`` values (the tokenizer's vocab size, say) override both.
    """
    if not isinstance(data, dict):
        raise ParamsError(f"{where}: expected a mapping, got {show_value(data)}")
    data = dict(data)
    preset = data.pop("preset", None)
    if preset is not None and (not isinstance(preset, str) or preset not in PRESETS):
        raise ParamsError(f"{where}.preset: expected one of {'|'.join(PRESETS)}, got {show_value(preset)}")
    hints = typing.get_type_hints(ModelConfig)
    for key, value in data.items():
        if key not in hints:
            raise ParamsError(f"{where}.{key}: unknown key (known: preset, {', '.join(hints)})")
        data[key] = convert(hints[key], value, f"{where}.{key}")
    try:
        base = PRESETS[preset] if preset else {}
        return ModelConfig.from_dict({**base, **data, **fixed})
    except ConfigError as e:  # ModelConfig names its fields "model.<field>": name the section they came from
        msg = str(e)
        raise ParamsError(f"{where}.{msg[6:]}" if msg.startswith("model.") else f"{where}: {msg}") from None
