"""The training loop shared by pretraining and both fine-tunes: one function, ``fit``, over small pieces.

A stage builds the model, its data and a loss function, and calls ``fit``::

    from llmcore.data import RandomWindows, load_tokens
    from llmcore.train import HardwareConfig, TrainConfig, fit, init_runtime, lm_loss

    hw = HardwareConfig(device="cpu", threads=2)
    rt = init_runtime(hw)                            # DDP from torchrun's env, device, threads
    torch.manual_seed(1337)
    model = GPT(ModelConfig.from_preset("llama3-tiny"))
    train = RandomWindows(load_tokens("data/tokens", "train"), 16, 128, seed=1337, rank=rt.rank,
                          world_size=rt.world_size)
    val = RandomWindows(load_tokens("data/tokens", "val"), 16, 128, seed=1338, rank=rt.rank,
                        world_size=rt.world_size)
    cfg = TrainConfig(batch_size=16, lr=3e-3, max_steps=1000, eval_every=100, checkpoint_every=100)
    result = fit(model, train, val, lm_loss, cfg, hw, Path(".cache/pretrain"), live=live)
    result.val_loss, result.items_per_s         # the model was trained in place

The two contracts
-----------------
``train_data`` / ``val_data`` (the ``Batches`` protocol; ``llmcore.data`` has two implementations):
    ``next_batch()``                   the next batch for *this rank*: a tensor, or a tuple/list/dict of
                                       tensors (moved to the device by ``fit``), or anything ``loss_fn`` reads
    ``len(data)``                      batches per epoch (``next_batch`` calls, per rank); ``epochs`` and
                                       ``eval_batches=None`` use it
    ``state_dict()`` / ``load_state_dict(state)``   the exact position in the stream; values may be
                                       tensors, numbers, strings, lists, tuples and dicts (saved as safetensors
                                       + JSON, never pickled)
    With several processes each rank's object yields that rank's share of the global batch.
    ``fit`` snapshots ``val_data``'s state once and restores it before every evaluation, so every
    evaluation scores the same batches and curves are comparable.

``loss_fn(model, batch) -> (loss, n)``: ``loss`` is the *mean* loss over the ``n`` items (tokens,
    examples) of the batch, ``n`` an int or a 0-dim tensor. Micro-batches and ranks are weighted by ``n``, so
    an optimizer step's gradient is that of the mean over every item of the global batch, even when
    micro-batches hold different numbers of items (instruction tuning's ``-100`` labels). ``lm_loss`` is
    next-token cross-entropy with ``-100`` ignored; a classifier returns ``(F.cross_entropy(logits, y),
    len(y))``. ``model`` is the wrapped model (compiled / DDP): call it, do not reach inside.

One optimizer step
------------------
``grad_accum`` micro-batches of ``batch_size`` per process, forward under autocast (``precision``), loss
scaled by GradScaler for fp16; gradients averaged across processes by DDP on the last micro-batch only;
then normalised by the item count, clipped to ``grad_clip``, and AdamW (fused when the device has it,
else foreach) steps with the scheduled learning rate: linear warmup from 0 over ``warmup_steps``, then
cosine decay to ``min_lr`` at the last step. Weight decay applies to matmul weights only, not to norms,
biases or embeddings. Global batch = ``batch_size * grad_accum * world_size``.

Stopping: at ``max_steps`` or after ``epochs`` passes over ``train_data`` (whichever is fewer steps; the
cosine schedule spans that number), or earlier when ``time_budget_s`` of training time has passed.

Checkpoints and resume
----------------------
Every ``checkpoint_every`` steps and at the end, rank 0 writes ``<out_dir>/step_XXXXXXXX/``:

    model.safetensors   the weights (generic state dict; shared tensors stored once)
    state.safetensors   every tensor of the training state: optimizer moments, RNG and sampler states
    state.json          the rest: step, fingerprint, counters, optimizer hyper-parameters, GradScaler,
                        Python RNG state, with {"__tensor__": key} pointing into state.safetensors
    live/               a copy of dvclive's plots folder as of this step (when ``live`` is given)

It is built in a temporary folder and renamed into place (atomic), then older checkpoints are removed,
so a kill at any moment leaves one complete checkpoint. The learning-rate "scheduler" is a pure
function of the step, so the step is its state (numpy's global RNG is never used, so it is not saved).
``fit`` resumes from the newest checkpoint whose fingerprint (a hash of the training config, precision,
world size, parameter names and shapes, the number of batches per epoch and the caller's ``fingerprint``)
matches; otherwise it removes the stale checkpoints and starts fresh. Bookkeeping fields (``eval_*``,
``log_every``, ``checkpoint_every``, ``time_budget_s``) are not in the fingerprint: raising the time budget
continues a run. On one device in fp32 a resumed run's weights are bitwise those of an uninterrupted one.

References: nanoGPT ``train.py`` (loop, schedule, DDP), nanochat ``base_train.py``, litgpt ``pretrain.py``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import load_file, load_model, save_file, save_model
from tqdm.auto import tqdm

from llmcore.checkpoint import unwrap
from llmcore.common import LLMCoreError, autocast_context, print0, resolve_device
from llmcore.ops import linear_cross_entropy

# ---------------------------------------------------------------------------------------------------
# Configs (params.yaml: `hardware` and the `train` part of each training stage's section)
# ---------------------------------------------------------------------------------------------------


@dataclass
class HardwareConfig:
    """Where and how to run; params.yaml section ``hardware``, shared by every training stage."""

    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"  # auto: cuda, then mps, then cpu
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast dtype; weights stay fp32 (master copy)
    compile: bool = False  # torch.compile the model (minutes of compile time; pays off on long GPU runs)
    threads: int | None = None  # torch.set_num_threads (None: torch's default; 1 in torchrun workers)
    nproc: int = 1  # processes on this machine; >1: the stage re-launches itself under torchrun (DDP)
    peak_tflops: float | None = None  # per device, for MFU; None: measured with a matmul at startup

    def __post_init__(self) -> None:
        if self.nproc < 1:
            raise ValueError(f"nproc: expected a positive int, got {self.nproc}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads: expected a positive int or null, got {self.threads}")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ValueError(f"peak_tflops: expected a positive float or null, got {self.peak_tflops}")


@dataclass
class TrainConfig:
    """One training run's optimisation and bookkeeping; embedded as ``train:`` in a stage's section."""

    batch_size: int = 16  # sequences (examples) per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3  # peak learning rate, reached after warmup
    min_lr: float = 1e-4  # the cosine decays to this at the last step
    weight_decay: float = 0.1  # AdamW decay of matmul weights (never norms, biases, embeddings)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 100  # linear warmup from 0
    max_steps: int | None = None  # optimizer steps; at least one of max_steps / epochs
    epochs: float | None = None  # passes over train_data (len(train_data) batches each); may be fractional
    time_budget_s: float | None = None  # stop after this much training time (summed over resumes)
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    eval_every: int = 100  # steps between evaluations (and one at step 0 and at the end)
    eval_batches: int | None = 20  # validation batches per evaluation; None = len(val_data)
    checkpoint_every: int = 100  # steps between resumable checkpoints (and one at the end)
    log_every: int = 10  # steps between train-loss log rows
    seed: int = 1337  # dropout / torch RNG (offset by rank); the stage seeds model init and data

    def __post_init__(self) -> None:
        self.betas = list(self.betas)
        if self.max_steps is None and self.epochs is None:
            raise ValueError("set max_steps or epochs (they fix the length of the learning-rate schedule)")
        positive = ("batch_size", "grad_accum", "eval_every", "checkpoint_every", "log_every")
        for name in positive + ("max_steps", "eval_batches"):
            value = getattr(self, name)
            if (value is not None or name in positive) and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        for name in ("epochs", "time_budget_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name}: expected a positive number or null, got {value!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: expected >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr: expected 0 <= min_lr <= lr={self.lr}, got {self.min_lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas: expected two values in [0, 1), got {self.betas}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("weight_decay and grad_clip must be >= 0")


# Fields that do not change the weights a run produces: not part of its fingerprint.
BOOKKEEPING = ("time_budget_s", "eval_every", "eval_batches", "checkpoint_every", "log_every")


class Batches(Protocol):
    """What ``fit`` needs from ``train_data`` / ``val_data`` (see the module docstring)."""

    def next_batch(self) -> Any: ...
    def __len__(self) -> int: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


LossFn = Callable[[nn.Module, Any], tuple[torch.Tensor, "int | torch.Tensor"]]


def lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy of ``(idx, targets)``, both (B, T); targets of -100 are not scored.

    The output head and the loss are fused (``llmcore.ops.linear_cross_entropy``): the (B, T, vocab) logits
    are never held in memory, which is most of a small model's activation memory and time.
    """
    idx, targets = batch
    hidden = model(idx, return_hidden=True, return_logits=False).hidden  # (B, T, C)
    loss = linear_cross_entropy(hidden, unwrap(model).out_head.weight, targets, ignore_index=-100, reduction="sum")
    n = (targets != -100).sum()
    return loss / n.clamp_min(1), n  # a batch of nothing but -100 weighs 0 instead of giving NaN


# ---------------------------------------------------------------------------------------------------
# Processes and devices
# ---------------------------------------------------------------------------------------------------


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def ddp(self) -> bool:
        return self.world_size > 1


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def relaunch_under_torchrun(nproc: int, module: str, args: Sequence[str]) -> int | None:
    """Run ``python -m torch.distributed.run --standalone --nproc_per_node nproc -m module *args``.

    Returns its exit status, or None (run in this process) when ``nproc`` is 1 or we already are a
    torchrun worker. Several nodes: start torchrun yourself on each (see stages/pretrain.py).
    """
    if nproc <= 1 or under_torchrun():
        return None
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += ["-m", module, *args]
    print(f"launching {nproc} processes: {' '.join(cmd)}", flush=True)
    return subprocess.call(cmd)


def init_runtime(hw: HardwareConfig) -> Runtime:
    """Threads, device and (under torchrun) the process group; safe to call more than once.

    Under torchrun (RANK / WORLD_SIZE / LOCAL_RANK in the environment): nccl on CUDA, one GPU per local
    rank; gloo on CPU. Otherwise one process on ``resolve_device(hw.device)``.
    """
    if hw.threads:
        torch.set_num_threads(hw.threads)
    device = resolve_device(hw.device)
    if not under_torchrun():
        return Runtime(device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type == "mps" and world > 1:
        raise LLMCoreError("hardware.nproc: several processes are not supported on mps")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Runtime(device, rank, local_rank, world)


def close_runtime() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def move_to(batch: Any, device: torch.device) -> Any:
    """Tensors (also inside tuples, lists, dicts) to ``device``; anything else unchanged."""
    if isinstance(batch, torch.Tensor):
        if device.type == "cuda":
            return batch.pin_memory().to(device, non_blocking=True)
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    return batch


# ---------------------------------------------------------------------------------------------------
# Optimizer and schedule
# ---------------------------------------------------------------------------------------------------


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay matmul weights; no decay for norms and biases (ndim < 2) and embeddings.

    Only parameters with ``requires_grad`` are included; a tied output head is the embedding (no decay).
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():  # yields a shared (tied) tensor once
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or id(p) in embeddings else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over ``param_groups``: the fused kernel where this torch has it for the device, else foreach."""
    groups = param_groups(model, cfg.weight_decay)
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=1e-8)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, ValueError):  # no fused kernel for this device / dtype
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


def get_lr(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine to ``min_lr``.

    Warmup reaches ``lr`` at step ``warmup_steps - 1``; the cosine reaches ``min_lr`` at ``total_steps - 1``.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, total_steps - 1 - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def plan_steps(cfg: TrainConfig, batches_per_epoch: int) -> tuple[int, str]:
    """(total optimizer steps, which limit set them): the fewer of ``max_steps`` and ``epochs``."""
    limits = []
    if cfg.max_steps is not None:
        limits.append((cfg.max_steps, "max_steps"))
    if cfg.epochs is not None:
        if batches_per_epoch < 1:
            raise LLMCoreError("train.epochs: the training data has no batches per epoch")
        limits.append((max(1, math.ceil(cfg.epochs * batches_per_epoch / cfg.grad_accum)), "epochs"))
    return min(limits)


# ---------------------------------------------------------------------------------------------------
# Checkpoints: safetensors for tensors, JSON for everything else (nothing is ever pickled)
# ---------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, data: Batches, loss_fn: LossFn, n_batches: int, device: torch.device,
             precision: str, rt: Runtime) -> float:  # fmt: skip
    """Mean loss over ``n_batches`` batches (weighted by item count, over every rank)."""
    was_training = model.training
    model.eval()
    dtype = torch.float32 if device.type == "mps" else torch.float64  # mps has no float64
    total = torch.zeros(2, device=device, dtype=dtype)  # [sum of loss*n, n]
    for _ in range(n_batches):
        batch = move_to(data.next_batch(), device)
        with autocast_context(device, precision):
            loss, n = loss_fn(model, batch)
        n = torch.as_tensor(n, device=device, dtype=dtype)
        total += torch.stack([loss.detach().to(dtype) * n, n])
    if rt.ddp:
        dist.all_reduce(total)
    model.train(was_training)
    return (total[0] / total[1].clamp_min(1)).item()


# ---------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------


@dataclass
class FitResult:
    step: int  # optimizer steps done
    train_loss: float  # mean training loss over the steps since the previous evaluation
    val_loss: float
    val_ppl: float  # exp(val_loss)
    items_seen: int  # items (tokens / examples, as counted by loss_fn) trained on, every rank
    items_per_s: float  # items_seen / train_time_s
    train_time_s: float  # time in optimizer steps, summed over resumes (no eval, no checkpoints)
    wall_time_s: float  # this call, start to end
    stop_reason: str  # max_steps | epochs | time_budget
    resumed_from: int | None  # the step the run resumed from, None for a fresh start
    epochs: float  # passes over train_data
    extra: dict[str, float] = field(default_factory=dict)  # the last on_eval metrics


def fit(
    model: nn.Module,
    train_data: Batches,
    val_data: Batches,
    loss_fn: LossFn,
    cfg: TrainConfig,
    hw: HardwareConfig,
    out_dir: str | os.PathLike,
    *,
    live: Any | None = None,
    trainable: Iterable[nn.Parameter] | None = None,
    on_eval: Callable[[nn.Module, int], dict[str, float] | None] | None = None,
    fingerprint: Any = None,
    unit: str = "tokens",
) -> FitResult:
    """Train ``model`` in place; resume from ``out_dir`` when a matching checkpoint is there.

    Args:
        model: any module; moved to the device. Seed before building it: every rank must build the same.
        train_data, val_data: ``Batches`` (module docstring), yielding this rank's share.
        loss_fn: ``(model, batch) -> (mean loss, n items)``.
        cfg: optimisation, stopping and bookkeeping.
        hw: device, precision, compile, threads (processes come from torchrun's environment).
        out_dir: checkpoint folder for resuming; keep it out of DVC's outs (DVC deletes those first).
        live: a ``dvclive.Live`` (rank 0 only; None elsewhere): ``train/loss``, ``train/lr``,
            ``train/<unit>_per_s``, ``train/grad_norm``, ``val/loss``, ``val/ppl`` and ``val/<on_eval key>``
            rows, indexed by step. Its plots folder is saved with each checkpoint and restored on resume,
            so the curves of a resumed run have no gap and no duplicate rows.
        trainable: parameters to train; the others get ``requires_grad=False``. None: those that already
            require grad.
        on_eval: called on every rank after each evaluation with the bare model and the step; returns
            extra metrics to log (e.g. accuracy) from rank 0.
        fingerprint: JSON-able description of the data and anything else outside ``cfg`` that decides the
            result; a checkpoint made with a different one is not resumed.
        unit: what ``n`` counts, for the throughput metric's name.
    """
    wall_start = time.perf_counter()
    out_dir = Path(out_dir)
    rt = init_runtime(hw)
    device = rt.device
    if trainable is not None:
        keep = {id(p) for p in trainable}
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
    model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise LLMCoreError("fit: the model has no trainable parameters")
    optimizer = make_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=hw.precision == "fp16")
    total_steps, horizon = plan_steps(cfg, len(train_data))
    eval_batches = cfg.eval_batches or len(val_data)
    if eval_batches < 1:
        raise LLMCoreError("fit: the validation data has no batches (fewer examples than one global batch?)")
    fp = fingerprint_of(model, cfg, hw, rt.world_size, len(train_data), fingerprint)
    live_dir = Path(live.plots_dir) if live is not None else None

    # Per-rank RNG streams (dropout): the stage seeded model init identically on every rank already.
    torch.manual_seed(cfg.seed + rt.rank)
    random.seed(cfg.seed + rt.rank)
    val_start = copy.deepcopy(val_data.state_dict())

    # --- resume or start fresh ----------------------------------------------------------------------
    step, items_seen, train_time, n_ref, recent = 0, 0, 0.0, None, []
    train_loss, val_loss, extra, last_eval = float("nan"), float("nan"), {}, None
    resumed_from, tree = None, None
    found = checkpoints(out_dir)
    if found:
        tree = load_training_state(found[-1])
        if tree["fingerprint"] != fp:
            print0(f"{found[-1]}: made with other params (fingerprint {tree['fingerprint']} != {fp}); starting fresh")
            tree = None
    if rt.ddp:
        dist.barrier()  # every rank has read the checkpoint before rank 0 may remove stale ones
    if tree is None and found and rt.is_main:
        for path in found:
            shutil.rmtree(path)
    if tree is not None:
        load_model(unwrap(model), str(found[-1] / "model.safetensors"), strict=True, device=str(device))
        optimizer.load_state_dict(tree["optimizer"])
        if tree["scaler"]:
            scaler.load_state_dict(tree["scaler"])
        train_data.load_state_dict(tree["train_data"])
        _set_rng_state(tree["rng"][rt.rank], device)
        step, items_seen, train_time = tree["step"], tree["items_seen"], tree["train_time_s"]
        n_ref, recent, resumed_from = tree["n_ref"], tree["recent_losses"], tree["step"]
        train_loss, val_loss, extra, last_eval = tree["train_loss"], tree["val_loss"], tree["extra"], tree["last_eval"]
        if live is not None and (found[-1] / "live").is_dir():
            shutil.rmtree(live_dir, ignore_errors=True)
            shutil.copytree(found[-1] / "live", live_dir)
        print0(f"resuming from {found[-1]} (step {step} of {total_steps})")

    # --- wrap: compile, then DDP (nanoGPT's order) ---------------------------------------------------
    wrapped = model
    if hw.compile:
        wrapped = torch.compile(wrapped)
    if rt.ddp:
        wrapped = nn.parallel.DistributedDataParallel(wrapped, device_ids=[rt.local_rank] if device.type == "cuda"
                                                      else None)  # fmt: skip

    def log(metrics: dict[str, float], at: int) -> None:
        if live is not None:
            live.step = at
            for name, value in metrics.items():
                live.log_metric(name, value)

    def run_eval(at: int) -> None:
        nonlocal train_loss, val_loss, extra, last_eval, recent
        val_data.load_state_dict(copy.deepcopy(val_start))  # the same batches at every evaluation
        val_loss = evaluate(wrapped, val_data, loss_fn, eval_batches, device, hw.precision, rt)
        extra = {k: float(v) for k, v in ((on_eval(unwrap(model), at) or {}) if on_eval else {}).items()}
        metrics = {"val/loss": val_loss, "val/ppl": math.exp(min(val_loss, 50.0))}
        metrics.update({f"val/{k}": v for k, v in extra.items()})
        if recent:  # the training loss over the interval since the previous evaluation
            train_loss = metrics["train/loss_avg"] = sum(recent) / len(recent)
        log(metrics, at)
        if live is not None:
            live.make_summary()
        if rt.is_main:
            train_msg = f"train {train_loss:.4f}, " if recent else ""
            tqdm.write(f"step {at}: {train_msg}val {val_loss:.4f} (ppl {metrics['val/ppl']:.2f})")
        last_eval, recent = at, []

    def save(at: int) -> None:
        rng = _rng_state(device)
        if rt.ddp:  # every rank's RNG streams, gathered in memory (rank 0 writes them all)
            all_rng: list[Any] = [None] * rt.world_size
            dist.all_gather_object(all_rng, rng)
        else:
            all_rng = [rng]
        if not rt.is_main:
            return
        state = {
            "step": at, "fingerprint": fp, "items_seen": items_seen, "train_time_s": train_time, "n_ref": n_ref,
            "recent_losses": recent, "train_loss": train_loss, "val_loss": val_loss, "extra": extra,
            "last_eval": last_eval, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "train_data": train_data.state_dict(), "rng": all_rng,
        }  # fmt: skip
        path = out_dir / _ckpt_name(at)
        save_training_state(path, model, state, live_dir)
        for old in checkpoints(out_dir):
            if old != path:
                shutil.rmtree(old, ignore_errors=True)

    last_save = resumed_from
    if resumed_from is None:
        run_eval(0)
    stop_reason = horizon
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not rt.is_main, dynamic_ncols=True)
    interval_items, interval_time = 0, 0.0
    while step < total_steps:
        if cfg.time_budget_s is not None and out_of_time(train_time, cfg.time_budget_s, rt, device):
            stop_reason = "time_budget"
            break
        t0 = time.perf_counter()
        lr = get_lr(step, cfg, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        totals = torch.zeros(2, device=device)  # [sum of loss*n, n] over this rank's micro-batches
        for micro in range(cfg.grad_accum):
            batch = move_to(train_data.next_batch(), device)
            # DDP all-reduces gradients in backward; only the last micro-batch needs that.
            last = micro == cfg.grad_accum - 1
            sync = wrapped.no_sync() if rt.ddp and not last else contextlib.nullcontext()
            with sync:
                with autocast_context(device, hw.precision):
                    loss, n = loss_fn(wrapped, batch)
                n = torch.as_tensor(n, device=device, dtype=torch.float32)
                if n_ref is None:
                    n_ref = reference_count(n, rt)
                # Weight by items: a micro-batch counts in proportion to what it holds. Dividing by a
                # fixed n_ref (the first batch's count) keeps magnitudes as usual for fp16's GradScaler.
                scaler.scale(loss * (n / n_ref)).backward()
            totals += torch.stack([loss.detach().float() * n, n])
        if rt.ddp:
            dist.all_reduce(totals)
        # Gradients now hold (1/W) * sum_i (n_i / n_ref) * grad(mean loss_i); make it the mean over all N items.
        scaler.unscale_(optimizer)
        torch._foreach_mul_([p.grad for p in params if p.grad is not None], rt.world_size * n_ref / totals[1])
        grad_norm = nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step_loss = (totals[0] / totals[1].clamp_min(1)).item()  # syncs the device: step timing is honest
        dt = time.perf_counter() - t0
        step += 1
        train_time += dt
        step_items = int(totals[1].item())
        items_seen += step_items
        interval_items, interval_time = interval_items + step_items, interval_time + dt
        recent.append(step_loss)
        bar.update(1)
        if step % cfg.log_every == 0 or step == total_steps:
            per_s = interval_items / max(interval_time, 1e-9)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", **{f"{unit}/s": f"{per_s:.0f}"})
            log({"train/loss": step_loss, "train/lr": lr, f"train/{unit}_per_s": per_s,
                 "train/grad_norm": float(grad_norm)}, step)  # fmt: skip
            interval_items, interval_time = 0, 0.0
        if not math.isfinite(step_loss):
            raise LLMCoreError(f"training diverged: loss is {step_loss} at step {step} (lower train.lr?)")
        if step % cfg.eval_every == 0 or step == total_steps:
            run_eval(step)
        if step % cfg.checkpoint_every == 0 or step == total_steps:
            save(step)
            last_save = step
    bar.close()

    if last_eval != step:
        run_eval(step)
    if last_save != step:
        save(step)
    return FitResult(
        step=step, train_loss=train_loss, val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50.0)),
        items_seen=items_seen, items_per_s=items_seen / max(train_time, 1e-9), train_time_s=train_time,
        wall_time_s=time.perf_counter() - wall_start, stop_reason=stop_reason, resumed_from=resumed_from,
        epochs=step * cfg.grad_accum / max(1, len(train_data)), extra=extra,
    )  # fmt: skip


def reference_count(n: torch.Tensor, rt: Runtime) -> float:
    """The first micro-batch's item count, the same on every rank (their max) so weights agree."""
    if rt.ddp:
        n = n.clone()
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
    return max(float(n.item()), 1.0)


def out_of_time(train_time: float, budget: float, rt: Runtime, device: torch.device) -> bool:
    """Whether the time budget is spent; rank 0's clock decides for every rank so they stop together."""
    flag = torch.tensor([float(train_time >= budget)], device=device)
    if rt.ddp:
        dist.broadcast(flag, src=0)
    return bool(flag.item())
