"""Model checkpoints: safetensors only, with the model config travelling inside the file.

A checkpoint is one ``.safetensors`` file whose metadata holds ``{"format": "llmcore", "config": <json>}``
plus any caller metadata (string values), packed as one JSON string under the single key ``llmcore``:
safetensors writes several metadata keys in a random order per process, and one key keeps the bytes of
identical weights identical (so DVC sees the same hash). Loading never unpickles anything. Writes are atomic: a crash
leaves the previous file or none, never a partial one.

A tied output head is stored once (as ``tok_emb.weight``), the way the model holds it. A model with a padded
vocabulary (``ModelConfig.pad_vocab_multiple``) is written without its padded rows and with the unpadded config:
the file is byte for byte that of the same weights trained unpadded, and loading pads the rows again (zeros).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from llmcore.common import LLMCoreError, atomic_path
from llmcore.models.config import ConfigError, ModelConfig
from llmcore.models.gpt import GPT, rope_frequencies

FORMAT = "llmcore"
VOCAB_ROWS = ("tok_emb.weight", "out_head.weight")  # the tensors with one row per vocabulary id


def unwrap(model: torch.nn.Module) -> GPT:
    """The bare model inside torch.compile (``_orig_mod``) and DistributedDataParallel (``module``)."""
    while hasattr(model, "_orig_mod") or hasattr(model, "module"):
        model = getattr(model, "_orig_mod", None) or model.module
    return model


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without the duplicate tied head and without padded vocabulary rows, contiguous and detached,
    as safetensors wants: what every export (weight file, Hugging Face, GGUF) writes."""
    model = unwrap(model)
    state = model.state_dict()
    cfg = getattr(model, "cfg", None)
    if cfg is not None and cfg.tie_embeddings:
        state.pop("out_head.weight", None)
    if cfg is not None and cfg.padded_vocab_size != cfg.vocab_size:
        state = {k: v[: cfg.vocab_size] if k in VOCAB_ROWS else v for k, v in state.items()}
    return {k: v.detach().contiguous() for k, v in state.items()}


def pad_vocab_rows(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (real vocabulary rows) with zero rows appended up to ``cfg.padded_vocab_size``."""
    extra = cfg.padded_vocab_size - cfg.vocab_size
    if not extra:
        return state
    return {k: torch.cat([v, v.new_zeros(extra, *v.shape[1:])]) if k in VOCAB_ROWS else v for k, v in state.items()}


def save_checkpoint(
    path: str | os.PathLike, model: GPT, metadata: dict[str, str] | None = None, dtype: torch.dtype | None = None
) -> Path:
    """Write ``model`` (weights + config + metadata) atomically to ``path``."""
    state = model_state(model)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    meta = {"format": FORMAT, "config": unwrap(model).cfg.unpadded().to_json(), **(metadata or {})}
    return write_weights(path, state, meta)


def write_weights(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write ``tensors`` atomically with ``metadata`` packed under the single ``llmcore`` key (see above)."""
    path = Path(path)
    with atomic_path(path, suffix=".safetensors") as tmp:
        packed = {FORMAT: json.dumps(metadata, sort_keys=True)}
        save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp), metadata=packed)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    path = Path(path)
    if not path.is_file():
        raise LLMCoreError(f"{path}: checkpoint not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise LLMCoreError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None
    try:
        return json.loads(meta[FORMAT]) if FORMAT in meta else meta
    except json.JSONDecodeError:
        raise LLMCoreError(f"{path}: corrupt llmcore metadata") from None


def read_config(path: str | os.PathLike) -> ModelConfig:
    meta = read_metadata(path)
    if meta.get("format") != FORMAT or "config" not in meta:
        raise LLMCoreError(f"{path}: not an llmcore checkpoint (no model config in its metadata)")
    try:
        return ModelConfig.from_json(meta["config"])
    except (ConfigError, json.JSONDecodeError, TypeError) as e:
        raise LLMCoreError(f"{path}: bad model config in checkpoint: {e}") from None


def load_state(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LLMCoreError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None


def check_state(model: GPT, state: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Any missing, unexpected or mis-shaped tensor of ``state`` for ``model`` is a one-line error."""
    expected = model_state(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise LLMCoreError(f"{source}: checkpoint does not match the model config: {what}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise LLMCoreError(
                f"{source}: shape mismatch for {name}: file has {tuple(tensor.shape)}, "
                f"model expects {tuple(expected[name].shape)}"
            )


def load_into(model: GPT, state: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Copy ``state`` into ``model`` after :func:`check_state`."""
    check_state(model, state, source)
    state = pad_vocab_rows(model.cfg, state)
    model.load_state_dict(state, strict=False)  # the tied head is the same tensor as tok_emb


def model_from_state(cfg: ModelConfig, state: dict[str, torch.Tensor], source: str | os.PathLike) -> GPT:
    """The model whose parameters *are* ``state``'s tensors (on their device): built on the meta device, so no
    memory is allocated and no random init is run, then the tensors are assigned. Peak memory is the state
    itself (about 1x the weights) instead of state + a freshly initialised model (2x, 3x with the conversion).

    ``state`` is checked as in :func:`load_into` (names, shapes); the tied head is re-tied and buffers that are
    not stored (RoPE's inverse frequencies) are computed.
    """
    with torch.device("meta"):
        model = GPT(cfg)
    check_state(model, state, source)
    state = pad_vocab_rows(cfg, state)
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.out_head.weight = model.tok_emb.weight
    device = model.tok_emb.weight.device
    if cfg.pos_emb == "rope":
        model.inv_freq = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).to(device)
    leftover = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:  # a parameter or buffer nothing filled: a bug here, not in the file
        raise RuntimeError(f"model_from_state: {leftover[:3]} left on the meta device")
    return model


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu", config: ModelConfig | None = None
) -> GPT:
    """Build the model from the config stored in ``path`` (or ``config`` if given) and load its weights.

    Weights stored in bf16/fp16 are upcast to fp32 (the training and CPU inference dtype).
    """
    cfg = config or read_config(path)
    state = load_state(path, device)
    for k in list(state):  # one tensor at a time: a bf16 file never sits beside its whole fp32 copy
        if state[k].is_floating_point():
            state[k] = state.pop(k).float()
    model = model_from_state(cfg, state, path)
    model.eval()
    return model
