"""Resumable training state: checkpoint folders of safetensors (tensors) + JSON (the rest), never pickled."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file, save_model

from llmcore.common import LLMCoreError
from llmcore.training.config import BOOKKEEPING, HardwareConfig, TrainConfig
from llmcore.weights.weight_file import unwrap


def split_tensors(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON-able copy of ``obj`` with each tensor moved into ``tensors`` and replaced by a reference.

    Tuples and dicts with non-string keys (an optimizer's ``state``) are tagged so they round-trip exactly.
    """
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: split_tensors(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}
        return {"__items__": [[k, split_tensors(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [split_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [split_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{prefix}: cannot checkpoint a {type(obj).__name__} (use tensors, numbers, str, list, dict)")



def join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of ``split_tensors``."""
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__tuple__"}:
            return tuple(join_tensors(v, tensors) for v in obj["__tuple__"])
        if set(obj) == {"__items__"}:
            return {k: join_tensors(v, tensors) for k, v in obj["__items__"]}
        return {k: join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [join_tensors(v, tensors) for v in obj]
    return obj



def _ckpt_name(step: int) -> str:
    return f"step_{step:08d}"



def checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints in ``out_dir``, oldest first (temporary folders are never named step_*)."""
    if not out_dir.is_dir():
        return []
    found = [p for p in out_dir.glob("step_*") if p.is_dir() and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: p.name)



def save_training_state(path: Path, model: nn.Module, tree: dict[str, Any], live_dir: Path | None) -> None:
    """Write one checkpoint folder atomically: build it under a temporary name, then rename it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for leftover in path.parent.glob(".tmp-step_*"):  # from a run killed while writing
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
    tmp.mkdir()
    try:
        save_model(unwrap(model), str(tmp / "model.safetensors"))  # dedupes tied tensors, load_model restores
        tensors: dict[str, torch.Tensor] = {}
        meta = split_tensors(tree, "state", tensors)
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta), encoding="utf-8")
        if live_dir is not None and live_dir.is_dir():
            shutil.copytree(live_dir, tmp / "live")
        if path.exists():  # only after a fresh start over a stale run with the same step
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise



def load_training_state(path: Path) -> dict[str, Any]:
    """The training-state tree of checkpoint ``path`` (the weights are read by ``load_model``)."""
    try:
        meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
        tensors = load_file(str(path / "state.safetensors"))
    except (OSError, ValueError) as e:
        raise LLMCoreError(f"{path}: unreadable checkpoint: {e}") from None
    return join_tensors(meta, tensors)



def fingerprint_of(model: nn.Module, cfg: TrainConfig, hw: HardwareConfig, world_size: int, n_batches: int,
                   extra: Any) -> str:  # fmt: skip
    """A hash of everything that decides the weights a run produces (see the module docstring)."""
    train = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in BOOKKEEPING}
    shapes = [[name, list(p.shape), p.requires_grad] for name, p in unwrap(model).named_parameters()]
    blob = {"train": train, "precision": hw.precision, "world_size": world_size, "params": shapes,
            "batches_per_epoch": n_batches, "extra": extra}  # fmt: skip
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]



def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state



def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
