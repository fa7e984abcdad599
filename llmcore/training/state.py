"""Resumable training state: checkpoint folders of safetensors (tensors) + JSON (the rest), never pickled."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import load_file, load_model, save_file, save_model

from llmcore.common import LLMCoreError, print0
from llmcore.training.config import BOOKKEEPING, HardwareConfig, TrainConfig
from llmcore.training.runtime import Runtime
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


def ckpt_name(step: int) -> str:
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


def rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@dataclass
class TrainState:
    """A run's progress: saved whole with every checkpoint and restored whole on resume."""

    step: int = 0  # optimizer steps done
    items_seen: int = 0  # items (tokens, examples) trained on, every rank
    train_time_s: float = 0.0  # time in optimizer steps, summed over resumes
    # the FLOPs the device could have done in that time: each segment's peak FLOP/s (fit's peak_flops) x its time
    available_flops: float = 0.0
    n_ref: float | None = None  # the first micro-batch's item count: the fixed scale of loss weights
    recent_losses: list[float] = field(default_factory=list)  # step losses since the last evaluation
    train_loss: float = math.nan  # mean of recent_losses at the last evaluation
    val_loss: float = math.nan
    extra: dict[str, float] = field(default_factory=dict)  # the last evaluation's loss_fn and on_eval metrics
    step_metrics: dict[str, float] = field(default_factory=dict)  # the last step's loss_fn metrics
    last_eval: int | None = None  # the step of the last evaluation


def save_checkpoint(out_dir: Path, model: nn.Module, state: TrainState, fingerprint: str, optimizer: Any,
                    scaler: Any, train_data: Any, rt: Runtime, live_dir: Path | None) -> None:  # fmt: skip
    """Rank 0 writes ``<out_dir>/step_XXXXXXXX/`` (every rank's RNG gathered to it), then drops older ones."""
    rng = rng_state(rt.device)
    if rt.ddp:  # every rank's RNG streams, gathered in memory (rank 0 writes them all)
        all_rng: list[Any] = [None] * rt.world_size
        dist.all_gather_object(all_rng, rng)
    else:
        all_rng = [rng]
    if not rt.is_main:
        return
    tree = {
        **dataclasses.asdict(state), "fingerprint": fingerprint, "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(), "train_data": train_data.state_dict(), "rng": all_rng,
    }  # fmt: skip
    path = out_dir / ckpt_name(state.step)
    save_training_state(path, model, tree, live_dir)
    for old in checkpoints(out_dir):
        if old != path:
            shutil.rmtree(old, ignore_errors=True)


def restore_checkpoint(out_dir: Path, fingerprint: str, model: nn.Module, optimizer: Any, scaler: Any,
                       train_data: Any, rt: Runtime, live_dir: Path | None) -> TrainState | None:  # fmt: skip
    """Load the newest checkpoint made with the same ``fingerprint`` into the given objects and return its
    ``TrainState``; None (and stale checkpoints removed) when there is none to resume."""
    found = checkpoints(out_dir)
    tree = load_training_state(found[-1]) if found else None
    if tree is not None and tree["fingerprint"] != fingerprint:
        print0(f"{found[-1]}: made with other params (fingerprint {tree['fingerprint']} != {fingerprint}); "
               "starting fresh")
        tree = None
    if rt.ddp:
        dist.barrier()  # every rank has read the checkpoint before rank 0 may remove stale ones
    if tree is None:
        if found and rt.is_main:
            for path in found:
                shutil.rmtree(path)
        return None
    load_model(unwrap(model), str(found[-1] / "model.safetensors"), strict=True, device=str(rt.device))
    optimizer.load_state_dict(tree["optimizer"])
    if tree["scaler"]:
        scaler.load_state_dict(tree["scaler"])
    train_data.load_state_dict(tree["train_data"])
    set_rng_state(tree["rng"][rt.rank], rt.device)
    if live_dir is not None and (found[-1] / "live").is_dir():
        shutil.rmtree(live_dir, ignore_errors=True)
        shutil.copytree(found[-1] / "live", live_dir)
    return TrainState(**{f.name: tree[f.name] for f in dataclasses.fields(TrainState) if f.name in tree})
