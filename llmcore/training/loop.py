"""The training loop shared by pretraining and both fine-tunes: one function, ``fit``, over small pieces.

A stage builds the model, its data and a loss function, and calls ``fit``::

    from llmcore.data.tokens import RandomWindows, load_tokens
    from llmcore.training.loop import HardwareConfig, TrainConfig, fit, init_runtime, lm_loss

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
``train_data`` / ``val_data`` (the ``Batches`` protocol; ``llmcore.data.tokens`` has two implementations):
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
    It may return a third element, ``{name: 0-dim tensor}`` of further means over the same ``n`` items
    (DPO's reward accuracy and margins): they are averaged like the loss and logged as ``train/<name>``
    and ``val/<name>``.

One optimizer step
------------------
``grad_accum`` micro-batches of ``batch_size`` per process, forward under autocast (``precision``), loss
scaled by GradScaler for fp16; gradients averaged across processes by DDP on the last micro-batch only;
then normalised by the item count, clipped to ``grad_clip``, and AdamW (fused when the device has it,
else foreach) steps with the scheduled learning rate: linear warmup from 0 over ``warmup_steps``, then
cosine decay to ``min_lr`` at the last step. Weight decay applies to matmul weights only, not to norms,
biases or embeddings. Global batch = ``batch_size * grad_accum * world_size``.

A step never waits for the device: its loss, item count and gradient norm stay there as one row, and the
host reads the pending rows back in one sync at log, evaluation and checkpoint steps (``read_back``), so on a
GPU the host queues the next step while the device runs this one.

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

It is built in a temporary folder, synced to disk and renamed into place (atomic); its files get the modes
the umask gives. Only then are older checkpoints removed, all but the one before it, so a kill at any moment
leaves a complete checkpoint and an unreadable newest one has a predecessor. The learning-rate "scheduler" is a
pure function of the step, so the step is its state (numpy's global RNG is never used, so it is not saved).
``fit`` resumes from the newest checkpoint that loads and whose fingerprint (a hash of the training config,
the hardware params that change the arithmetic: device, precision, compile, threads, head_loss; world size,
parameter names and shapes, the number of batches per epoch and the caller's ``fingerprint``) matches. One that
does not load is skipped with a warning line; if none matches it starts fresh, saying so, and the stale
checkpoints go when its first checkpoint is complete. ``LLMCORE_FRESH=1`` in the environment starts fresh
whatever is there (``dvc repro -f`` alone resumes a finished run: DVC does not tell the stage it was forced).
Bookkeeping fields (``eval_*``, ``log_every``, ``checkpoint_every``, ``time_budget_s``) are not in the
fingerprint: raising the time budget continues a run. On one device in fp32 a resumed run's weights are bitwise
those of an uninterrupted one.

References: nanoGPT ``train.py`` (loop, schedule, DDP), nanochat ``base_train.py``, litgpt ``pretrain.py``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm.auto import tqdm

from llmcore.common import LLMCoreError, print0
from llmcore.device import autocast_context
from llmcore.models.ops import pick_head_loss
from llmcore.training.config import HardwareConfig, TrainConfig
from llmcore.training.runtime import Runtime, close_runtime, init_runtime, move_to, out_of_time, reference_count
from llmcore.training.state import TrainState, fingerprint_of, restore_checkpoint, save_checkpoint
from llmcore.weights.weight_file import unwrap


class Batches(Protocol):
    """What ``fit`` needs from ``train_data`` / ``val_data`` (see the module docstring)."""

    def next_batch(self) -> Any: ...
    def __len__(self) -> int: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


LossFn = Callable[[nn.Module, Any], tuple]  # (mean loss, n items[, {name: mean over the n items}])


def split_loss_output(out: tuple) -> tuple[torch.Tensor, Any, dict[str, torch.Tensor]]:
    """``loss_fn``'s result as (loss, n, metrics); metrics is empty for a plain ``(loss, n)``."""
    return out[0], out[1], (out[2] if len(out) > 2 else {})


def _weighted(loss: torch.Tensor, n: torch.Tensor, metrics: dict[str, torch.Tensor], dtype) -> torch.Tensor:
    """[loss*n, n, metric_1*n, ...]: what is summed over micro-batches and ranks."""
    values = [loss.detach().to(dtype) * n, n] + [
        torch.as_tensor(v).detach().to(n.device, dtype) * n for v in metrics.values()
    ]
    return torch.stack(values)


def lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy of ``(idx, targets)``, both (B, T); targets of -100 are not scored.

    The model computes the head and the loss in its own forward (``GPT.forward(idx, targets=...)``), so a
    compiled model compiles them with the blocks: on CUDA full logits + ``F.cross_entropy``, which inductor
    fuses; on a CPU the chunked ``llmcore.models.ops.linear_cross_entropy``, which never holds the (B, T, vocab)
    logits (``hardware.head_loss`` overrides the choice).
    """
    idx, targets = batch
    loss = model(idx, targets=targets, loss_reduction="sum").loss
    n = (targets != -100).sum()
    return loss / n.clamp_min(1), n  # a batch of nothing but -100 weighs 0 instead of giving NaN


# ---------------------------------------------------------------------------------------------------
# Processes and devices
# ---------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model: nn.Module, data: Batches, loss_fn: LossFn, n_batches: int, device: torch.device, precision: str, rt: Runtime
) -> tuple[float, dict[str, float]]:
    """(mean loss, {metric: mean}) over ``n_batches`` batches (weighted by item count, over every rank)."""
    was_training = model.training
    model.eval()
    dtype = torch.float32 if device.type == "mps" else torch.float64  # mps has no float64
    total, names = None, []  # [sum of loss*n, n, sum of metric*n, ...]
    for _ in range(n_batches):
        batch = move_to(data.next_batch(), device)
        with autocast_context(device, precision):
            loss, n, metrics = split_loss_output(loss_fn(model, batch))
        n = torch.as_tensor(n, device=device, dtype=dtype)
        row = _weighted(loss, n, metrics, dtype)
        total, names = (row, list(metrics)) if total is None else (total + row, names)
    if rt.ddp:
        dist.all_reduce(total)
    model.train(was_training)
    means = (total / total[1].clamp_min(1)).tolist()
    return means[0], dict(zip(names, means[2:], strict=True))


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
    # fit's peak_flops of every segment, weighted by its time (this call's when no saved time carries one)
    peak_flops: float | None
    wall_time_s: float  # this call, start to end
    stop_reason: str  # max_steps | epochs | time_budget
    resumed_from: int | None  # the step the run resumed from, None for a fresh start
    epochs: float  # passes over train_data
    extra: dict[str, float] = field(default_factory=dict)  # the last evaluation's loss_fn and on_eval metrics


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
    peak_flops: float | None = None,
) -> FitResult:
    """Train ``model`` in place; resume from ``out_dir`` when a matching checkpoint is there.

    Args:
        model: any module; moved to the device. Seed before building it: every rank must build the same.
        train_data: ``Batches`` (module docstring), yielding this rank's share.
        val_data: the same for validation.
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
        peak_flops: the device's peak FLOP/s for this call (MFU's denominator), measured by the caller under
            the conditions this segment trains in. Saved with the state as FLOPs available (peak x time), so
            after a resume ``FitResult.peak_flops`` is every segment's peak weighted by its training time: it
            covers the same seconds as ``items_per_s``, and MFU from the two never mixes measurements.
    """
    wall_start = time.perf_counter()
    out_dir = Path(out_dir)
    rt = init_runtime(hw)
    params = prepare_model(model, trainable, rt.device)
    for module in model.modules():  # the GPT itself, or the one inside a classifier
        if hasattr(module, "checkpointing"):
            module.checkpointing = hw.activation_checkpointing
        if hasattr(module, "head_loss"):
            module.head_loss = pick_head_loss(hw.head_loss, rt.device)
    optimizer = make_optimizer(model, cfg, rt.device)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=hw.precision == "fp16")
    total_steps, stop_reason = plan_steps(cfg, len(train_data))
    fp = fingerprint_of(model, cfg, hw, rt.world_size, len(train_data), fingerprint)
    live_dir = Path(live.plots_dir) if live is not None else None
    evaluator = Evaluator(val_data, loss_fn, cfg.eval_batches or len(val_data), hw.precision, rt, live, on_eval)

    # Per-rank RNG streams (dropout): the stage seeded model init identically on every rank already.
    torch.manual_seed(cfg.seed + rt.rank)
    random.seed(cfg.seed + rt.rank)

    restored = restore_checkpoint(out_dir, fp, model, optimizer, scaler, train_data, rt, live_dir)
    state, last_checkpoint = restored if restored is not None else (TrainState(), None)
    resumed_from = None if restored is None else state.step
    if last_checkpoint is not None:
        print0(f"resuming from {last_checkpoint} (step {state.step} of {total_steps})")

    wrapped = wrap_model(model, hw, rt)

    def save() -> None:  # the previous checkpoint stays until this one is complete (and then one save longer)
        nonlocal last_checkpoint
        last_checkpoint = save_checkpoint(
            out_dir, model, state, fp, optimizer, scaler, train_data, rt, live_dir, keep=last_checkpoint
        )

    last_save = resumed_from
    if resumed_from is None:
        evaluator.run(wrapped, model, state)
    bar = tqdm(
        total=total_steps, initial=state.step, desc="train", unit="step", disable=not rt.is_main, dynamic_ncols=True
    )
    interval_items, interval_time = 0, 0.0
    pending: list[torch.Tensor] = []  # the steps' rows not yet read back to the host (see read_back)
    metric_names: list[str] = []
    step_loss, grad_norm = math.nan, math.nan
    while state.step < total_steps:
        # The budget is a host clock: no device sync. Under DDP rank 0's clock decides for every rank (a
        # broadcast, which syncs), so ranks check right after a read-back only (at most log_every steps late).
        budget_check = cfg.time_budget_s is not None and (not rt.ddp or state.step % cfg.log_every == 0)
        if budget_check and out_of_time(state.train_time_s, cfg.time_budget_s, rt, rt.device):
            stop_reason = "time_budget"
            break
        t0 = time.perf_counter()
        lr = get_lr(state.step, cfg, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        row, metric_names = train_step(wrapped, train_data, loss_fn, optimizer, scaler, params, cfg, hw, rt, state)
        pending.append(row)
        state.step += 1
        bar.update(1)
        log_now = state.step % cfg.log_every == 0 or state.step == total_steps
        eval_now = state.step % cfg.eval_every == 0 or state.step == total_steps
        save_now = state.step % cfg.checkpoint_every == 0 or state.step == total_steps
        items = 0
        if log_now or eval_now or save_now:  # the loop's only host-device sync; a step before it only queues work
            step_loss, grad_norm, items = read_back(pending, metric_names, state)
        dt = time.perf_counter() - t0  # with the read-back: an interval's time covers its steps' device work
        state.train_time_s += dt
        state.available_flops += (peak_flops or 0.0) * dt
        interval_items, interval_time = interval_items + items, interval_time + dt
        if log_now:
            per_s = interval_items / max(interval_time, 1e-9)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", **{f"{unit}/s": f"{per_s:.0f}"})
            log_metrics(
                live,
                {
                    "train/loss": step_loss,
                    "train/lr": lr,
                    f"train/{unit}_per_s": per_s,
                    "train/grad_norm": grad_norm,
                    **{f"train/{k}": v for k, v in state.step_metrics.items()},
                },
                state.step,
            )
            interval_items, interval_time = 0, 0.0
        if eval_now:
            evaluator.run(wrapped, model, state)
        if save_now:
            save()
            last_save = state.step
    bar.close()
    if pending:  # steps run before a time-budget stop
        t0 = time.perf_counter()
        read_back(pending, metric_names, state)
        dt = time.perf_counter() - t0
        state.train_time_s += dt
        state.available_flops += (peak_flops or 0.0) * dt

    if state.last_eval != state.step:
        evaluator.run(wrapped, model, state)
    if last_save != state.step:
        save()
    return FitResult(
        step=state.step,
        train_loss=state.train_loss,
        val_loss=state.val_loss,
        val_ppl=math.exp(min(state.val_loss, 50.0)),
        items_seen=state.items_seen,
        items_per_s=state.items_seen / max(state.train_time_s, 1e-9),
        train_time_s=state.train_time_s,
        peak_flops=state.available_flops / state.train_time_s if state.available_flops > 0 else peak_flops,
        wall_time_s=time.perf_counter() - wall_start,
        stop_reason=stop_reason,
        resumed_from=resumed_from,
        epochs=state.step * cfg.grad_accum / max(1, len(train_data)),
        extra=state.extra,
    )


def curves_logger(live_dir: str | os.PathLike) -> Any:
    """A ``dvclive.Live`` in ``live_dir`` that writes the curves alone (``plots/metrics/**.tsv``, the stage's DVC
    plots), never dvclive's summary (``live_dir/metrics.json``, each curve's last value): no stage declares that file,
    and the stage's own ``metrics.json`` and ``timing.json`` hold its numbers. Rank 0 only (it opens the DVC repo)."""
    from dvclive import Live  # imported late: it pulls in dvc

    class CurvesOnly(Live):
        def make_summary(self) -> None:  # Live.end() calls it: the summary is the one file left out
            pass

        def post_data_to_studio(self) -> None:  # reads the summary back; the pipeline never posts to DVC Studio
            pass

    return CurvesOnly(dir=str(live_dir), dvcyaml=False, save_dvc_exp=False)


def fit_logged(
    model: nn.Module,
    train_data: Batches,
    val_data: Batches,
    loss_fn: LossFn,
    cfg: TrainConfig,
    hw: HardwareConfig,
    out_dir: str | os.PathLike,
    rt: Runtime,
    live_dir: str | os.PathLike,
    **kwargs: Any,
) -> FitResult | None:
    """``fit`` as a fine-tuning stage runs it: dvclive curves in ``live_dir`` written by rank 0, the process group
    closed afterwards (also on failure). Returns the result on rank 0, None on the other ranks."""
    live = curves_logger(live_dir) if rt.is_main else None
    try:
        result = fit(model, train_data, val_data, loss_fn, cfg, hw, out_dir, live=live, **kwargs)
    finally:
        if live is not None:
            live.end()
        close_runtime()
    return result if rt.is_main else None


def prepare_model(model: nn.Module, trainable: Iterable[nn.Parameter] | None, device: torch.device) -> list:
    """Freeze what is not ``trainable``, move to ``device``, train mode; returns the trained parameters."""
    if trainable is not None:
        keep = {id(p) for p in trainable}
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
    model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise LLMCoreError("fit: the model has no trainable parameters")
    return params


def wrap_model(model: nn.Module, hw: HardwareConfig, rt: Runtime) -> nn.Module:
    """torch.compile, then DistributedDataParallel (nanoGPT's order); the bare model when neither applies."""
    wrapped = torch.compile(model) if hw.compile else model
    if rt.ddp:
        device_ids = [rt.local_rank] if rt.device.type == "cuda" else None
        wrapped = nn.parallel.DistributedDataParallel(wrapped, device_ids=device_ids)
    return wrapped


def train_step(
    wrapped: nn.Module,
    train_data: Batches,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    params: list,
    cfg: TrainConfig,
    hw: HardwareConfig,
    rt: Runtime,
    state: TrainState,
) -> tuple[torch.Tensor, list[str]]:
    """One optimizer step over ``grad_accum`` micro-batches -> (its row ``[mean loss, metric means..., items,
    gradient norm]``, a float32 tensor on the device; the names of ``loss_fn``'s extra metrics).

    Nothing here waits for the device: on CUDA the step is queued and the host moves on to the next one
    (``read_back`` brings rows to the host). Sets ``state.n_ref`` on the very first micro-batch of a run (one
    sync, once per run).
    """
    device = rt.device
    totals, names = None, []  # [sum of loss*n, n, sum of metric*n, ...] over this rank's micro-batches
    for micro in range(cfg.grad_accum):
        batch = move_to(train_data.next_batch(), device)
        # DDP all-reduces gradients in backward; only the last micro-batch needs that.
        last = micro == cfg.grad_accum - 1
        sync = wrapped.no_sync() if rt.ddp and not last else contextlib.nullcontext()
        with sync:
            with autocast_context(device, hw.precision):
                loss, n, metrics = split_loss_output(loss_fn(wrapped, batch))
            n = torch.as_tensor(n, device=device, dtype=torch.float32)
            if state.n_ref is None:
                state.n_ref = reference_count(n, rt)
            # Weight by items: a micro-batch counts in proportion to what it holds. Dividing by a fixed
            # n_ref (the first batch's count) keeps magnitudes as usual for fp16's GradScaler.
            scaler.scale(loss * (n / state.n_ref)).backward()
        row = _weighted(loss, n, metrics, torch.float32)
        totals, names = (row, list(metrics)) if totals is None else (totals + row, names)
    if rt.ddp:
        dist.all_reduce(totals)
    # Gradients now hold (1/W) * sum_i (n_i / n_ref) * grad(mean loss_i); make it the mean over all N items.
    scaler.unscale_(optimizer)
    torch._foreach_mul_([p.grad for p in params if p.grad is not None], rt.world_size * state.n_ref / totals[1])
    grad_norm = nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    means = totals / totals[1].clamp_min(1)
    return torch.cat([means[:1], means[2:], totals[1:2], grad_norm.reshape(1).to(totals.dtype)]), names


def read_back(pending: list[torch.Tensor], metric_names: list[str], state: TrainState) -> tuple[float, float, int]:
    """Bring the rows of the steps since the last read-back to the host in one sync, and empty ``pending``.

    Appends their losses to ``state.recent_losses``, adds their items to ``state.items_seen``, sets
    ``state.step_metrics`` to the newest step's; raises on a non-finite loss, naming its step. Returns the newest
    step's (loss, gradient norm) and the items of all of them. The values are those a per-step ``.tolist()``
    gave: the same float32 numbers, read later.
    """
    if not pending:
        return math.nan, math.nan, 0
    rows = torch.stack(pending).tolist()
    first = state.step - len(rows) + 1
    pending.clear()
    items = 0
    for i, row in enumerate(rows):
        if not math.isfinite(row[0]):
            raise LLMCoreError(f"training diverged: loss is {row[0]} at step {first + i} (lower train.lr?)")
        state.recent_losses.append(row[0])
        items += int(row[-2])
    state.items_seen += items
    state.step_metrics = dict(zip(metric_names, rows[-1][1:-2], strict=True))
    return rows[-1][0], rows[-1][-1], items


def log_metrics(live: Any | None, metrics: dict[str, float], at: int) -> None:
    if live is not None:
        live.step = at
        for name, value in metrics.items():
            live.log_metric(name, value)


@dataclass
class Evaluator:
    """Periodic evaluation: the same validation batches every time, extra metrics, logging."""

    val_data: Batches
    loss_fn: LossFn
    n_batches: int
    precision: str
    rt: Runtime
    live: Any | None
    on_eval: Callable[[nn.Module, int], dict[str, float] | None] | None

    def __post_init__(self) -> None:
        if self.n_batches < 1:
            raise LLMCoreError("fit: the validation data has no batches (fewer examples than one global batch?)")
        self.val_start = copy.deepcopy(self.val_data.state_dict())  # restored before every evaluation

    def run(self, wrapped: nn.Module, model: nn.Module, state: TrainState) -> None:
        """Evaluate at ``state.step``; updates the state's losses, extra metrics and ``last_eval``."""
        at = state.step
        self.val_data.load_state_dict(copy.deepcopy(self.val_start))
        state.val_loss, loss_metrics = evaluate(
            wrapped, self.val_data, self.loss_fn, self.n_batches, self.rt.device, self.precision, self.rt
        )
        extra = (self.on_eval(unwrap(model), at) or {}) if self.on_eval else {}
        state.extra = {k: float(v) for k, v in {**loss_metrics, **extra}.items()}
        metrics = {"val/loss": state.val_loss, "val/ppl": math.exp(min(state.val_loss, 50.0))}
        metrics.update({f"val/{k}": v for k, v in state.extra.items()})
        recent = state.recent_losses
        if recent:  # the training loss over the interval since the previous evaluation
            state.train_loss = metrics["train/loss_avg"] = sum(recent) / len(recent)
        log_metrics(self.live, metrics, at)
        if self.rt.is_main:
            train_msg = f"train {state.train_loss:.4f}, " if recent else ""
            tqdm.write(f"step {at}: {train_msg}val {state.val_loss:.4f} (ppl {metrics['val/ppl']:.2f})")
        state.last_eval, state.recent_losses = at, []
