"""Resumable training state: checkpoint folders of safetensors (tensors) + JSON (the rest), never pickled.

Which checkpoint a run resumes: the newest one that loads and carries the run's fingerprint (``fingerprint_of``).
A checkpoint that does not load (truncated, garbage, a ``state.json`` of the wrong shape) is skipped with one
warning line; one of another run (other params or inputs) is never resumed. ``LLMCORE_FRESH=1`` starts fresh
whatever is there (DVC's ``repro -f`` cannot tell the stage). A run keeps its newest checkpoint and the one
before; older ones and other runs' are removed only once the run's next checkpoint is complete on disk.
"""

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
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

from llmcore.common import LLMCoreError, current_umask, print0
from llmcore.training.config import BOOKKEEPING, HardwareConfig, TrainConfig
from llmcore.training.runtime import Runtime
from llmcore.weights.weight_file import unwrap

FRESH_ENV = "LLMCORE_FRESH"  # 1: train from scratch, never resume (the documented switch; DVC's -f does not reach us)


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
    """Write one checkpoint folder atomically: build it under a temporary name, sync it to disk, then rename it.

    Files and folders get the modes ``open()`` and ``mkdir()`` would give under the umask (safetensors writes
    its files private).
    """
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
        _share_and_sync(tmp)
        if path.exists():  # a stale run's (or an unreadable) checkpoint of the same step: moved aside, then gone
            old = path.parent / f".tmp-{path.name}-{os.getpid()}-old"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _sync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _share_and_sync(folder: Path) -> None:
    """Give every file and folder under ``folder`` its umask mode and flush it to disk (before the rename that
    makes the checkpoint count as complete)."""
    mask = current_umask()
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            file = Path(root) / name
            os.chmod(file, 0o666 & ~mask)
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        for name in dirs:
            os.chmod(Path(root) / name, 0o777 & ~mask)
        _sync_dir(Path(root))
    os.chmod(folder, 0o777 & ~mask)


def _sync_dir(folder: Path) -> None:
    if os.name == "nt":  # no directory handles to flush
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse to sync a directory
        pass
    finally:
        os.close(fd)


# What state.json must hold, and of which type, for a checkpoint to count as loadable.
REQUIRED = {"fingerprint": str, "step": int, "optimizer": dict, "scaler": dict, "train_data": dict, "rng": list}


def load_training_state(path: Path, model: nn.Module | None = None) -> dict[str, Any]:
    """The training-state tree of checkpoint ``path``; with ``model``, also check that the weights file loads
    into it (names and shapes; the weights are read by ``load_model``). Anything unreadable is an
    ``LLMCoreError`` naming the file."""
    state_json = path / "state.json"
    try:
        meta = json.loads(state_json.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise LLMCoreError(f"{state_json}: unreadable ({e})") from None
    if not isinstance(meta, dict):
        raise LLMCoreError(f"{state_json}: expected a JSON object, got {type(meta).__name__}")
    for key, kind in REQUIRED.items():
        if key not in meta:
            raise LLMCoreError(f"{state_json}: no {key!r}")
        value = meta[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise LLMCoreError(f"{state_json}: {key!r} should be a {kind.__name__}, got {type(value).__name__}")
    if meta["step"] < 0:
        raise LLMCoreError(f"{state_json}: 'step' is {meta['step']}")
    tensors_file = path / "state.safetensors"
    try:
        tensors = load_file(str(tensors_file))
    except (OSError, SafetensorError) as e:
        raise LLMCoreError(f"{tensors_file}: unreadable ({e})") from None
    try:
        tree = join_tensors(meta, tensors)
    except (KeyError, TypeError, ValueError) as e:
        raise LLMCoreError(f"{state_json}: does not match state.safetensors ({e!r})") from None
    if model is not None:
        check_weights_file(path / "model.safetensors", model)
    return tree


def check_weights_file(file: Path, model: nn.Module) -> None:
    """Raise ``LLMCoreError`` unless ``file``'s header is readable and its tensors are ``model``'s (names, shapes;
    a tied tensor is stored once). Reads the header only."""
    try:
        with safe_open(str(file), framework="pt") as f:
            shapes = {name: list(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    except (OSError, SafetensorError) as e:
        raise LLMCoreError(f"{file}: unreadable ({e})") from None
    expected = unwrap(model).state_dict()
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(k for k in shapes if k in expected and shapes[k] != list(expected[k].shape))
    stored = {expected[k].untyped_storage().data_ptr() for k in shapes if k in expected}
    missing = sorted(k for k in expected if k not in shapes and expected[k].untyped_storage().data_ptr() not in stored)
    if unexpected or wrong or missing:
        first = (wrong or missing or unexpected)[0]
        raise LLMCoreError(
            f"{file}: not this model's weights ({len(wrong)} shapes differ, {len(missing)} missing, "
            f"{len(unexpected)} unknown, e.g. {first!r})"
        )


def fresh_start_requested() -> bool:
    """``LLMCORE_FRESH``: 1 (true, yes) starts fresh; unset, empty or 0 (false, no) resumes; else refused."""
    value = os.environ.get(FRESH_ENV, "").strip()
    if value.lower() in ("", "0", "false", "no"):
        return False
    if value.lower() in ("1", "true", "yes"):
        return True
    raise LLMCoreError(f"{FRESH_ENV}: expected 1 or 0, got {value!r}")


# hardware fields that change the numbers a run computes (precision, kernels, reduction order); nproc is in the
# world size, and peak_tflops (MFU) and activation_checkpointing (recomputes the same values) leave weights alone
HARDWARE_FINGERPRINT = ("device", "precision", "compile", "threads", "head_loss")


def fingerprint_of(
    model: nn.Module, cfg: TrainConfig, hw: HardwareConfig, world_size: int, n_batches: int, extra: Any
) -> str:
    """A hash of everything that decides the weights a run produces: the training config but its bookkeeping,
    the hardware params that change the arithmetic (as written: ``threads: auto`` stays ``auto``), the world size,
    parameter names and shapes, batches per epoch and the caller's ``extra`` (data and stage params)."""
    train = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in BOOKKEEPING}
    shapes = [[name, list(p.shape), p.requires_grad] for name, p in unwrap(model).named_parameters()]
    hardware = {k: getattr(hw, k) for k in HARDWARE_FINGERPRINT}
    blob = {
        "train": train,
        "hardware": hardware,
        "world_size": world_size,
        "params": shapes,
        "batches_per_epoch": n_batches,
        "extra": extra,
    }
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


def save_checkpoint(
    out_dir: Path,
    model: nn.Module,
    state: TrainState,
    fingerprint: str,
    optimizer: Any,
    scaler: Any,
    train_data: Any,
    rt: Runtime,
    live_dir: Path | None,
    keep: Path | None = None,
) -> Path:
    """Rank 0 writes ``<out_dir>/step_XXXXXXXX/`` (every rank's RNG gathered to it); once it is complete, every
    other checkpoint but ``keep`` (this run's previous one) is removed. Returns the new checkpoint's path."""
    rng = rng_state(rt.device)
    if rt.ddp:  # every rank's RNG streams, gathered in memory (rank 0 writes them all)
        all_rng: list[Any] = [None] * rt.world_size
        dist.all_gather_object(all_rng, rng)
    else:
        all_rng = [rng]
    path = out_dir / ckpt_name(state.step)
    if not rt.is_main:
        return path
    tree = {
        **dataclasses.asdict(state),
        "fingerprint": fingerprint,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "train_data": train_data.state_dict(),
        "rng": all_rng,
    }
    save_training_state(path, model, tree, live_dir)
    for old in checkpoints(out_dir):
        if old not in (path, keep):
            shutil.rmtree(old, ignore_errors=True)
    return path


def restore_checkpoint(
    out_dir: Path,
    fingerprint: str,
    model: nn.Module,
    optimizer: Any,
    scaler: Any,
    train_data: Any,
    rt: Runtime,
    live_dir: Path | None,
) -> tuple[TrainState, Path] | None:
    """Load the newest readable checkpoint made with the same ``fingerprint`` into the given objects and return its
    ``TrainState`` and path; None when there is none to resume, or ``LLMCORE_FRESH`` asks for a fresh start.

    An unreadable checkpoint is skipped with a warning line, a stale one (other params or inputs) with a line
    saying the run starts fresh. Nothing is removed here: ``save_checkpoint`` removes what this run does not
    need once its own next checkpoint is complete, so a fresh run that fails early leaves the old one in place.
    """
    fresh = fresh_start_requested()
    found = checkpoints(out_dir)
    if fresh and found:
        print0(f"{FRESH_ENV} is set: training from scratch; the checkpoints in {out_dir} are replaced by this run's")
    tree, path, stale = None, None, None
    for i, candidate in enumerate([] if fresh else reversed(found)):
        try:
            loaded = load_training_state(candidate, model)
        except LLMCoreError as e:
            then = "trying the one before" if i + 1 < len(found) else "no checkpoint left to resume"
            print0(f"warning: {e}; skipping this checkpoint, {then}")
            continue
        if loaded["fingerprint"] == fingerprint:
            tree, path = loaded, candidate
            break
        stale = stale or (candidate, loaded["fingerprint"])
    if tree is None and stale is not None:
        print0(
            f"{stale[0]}: made with other params or inputs (fingerprint {stale[1]} != {fingerprint}); starting fresh"
        )
    if rt.ddp:
        dist.barrier()  # every rank has read its checkpoint before rank 0 may write over it
    if tree is None or path is None:
        return None
    try:
        load_model(unwrap(model), str(path / "model.safetensors"), strict=True, device=str(rt.device))
        optimizer.load_state_dict(tree["optimizer"])
        if tree["scaler"]:
            scaler.load_state_dict(tree["scaler"])
        train_data.load_state_dict(tree["train_data"])
        set_rng_state(tree["rng"][rt.rank], rt.device)
        state = TrainState(**{f.name: tree[f.name] for f in dataclasses.fields(TrainState) if f.name in tree})
    except (KeyError, IndexError, TypeError, ValueError, SafetensorError) as e:
        raise LLMCoreError(f"{path}: cannot resume from it ({e!r}); set {FRESH_ENV}=1 to start fresh") from None
    if live_dir is not None and (path / "live").is_dir():
        shutil.rmtree(live_dir, ignore_errors=True)
        shutil.copytree(path / "live", live_dir)
    return state, path
