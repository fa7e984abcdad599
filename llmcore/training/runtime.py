"""Processes and devices for training: torchrun/DDP setup, relaunching under torchrun, moving batches."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from llmcore.common import LLMCoreError
from llmcore.device import resolve_device
from llmcore.threads import training_threads
from llmcore.training.config import HardwareConfig


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


def relaunch_under_torchrun(nproc: int, module: str, args: Sequence[str] | None = None) -> int | None:
    """Run ``python -m torch.distributed.run --standalone --nproc_per_node nproc -m module *args``.

    ``args`` default to this process's own arguments (``sys.argv[1:]``): a stage relaunches itself with exactly
    the command line it was given. Returns torchrun's exit status, or None (run in this process) when ``nproc``
    is 1 or we already are a torchrun worker. Several nodes: start torchrun yourself on each (see
    stages/pretrain.py).
    """
    if nproc <= 1 or under_torchrun():
        return None
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += ["-m", module, *(sys.argv[1:] if args is None else args)]
    print(f"launching {nproc} processes: {' '.join(cmd)}", flush=True)
    return subprocess.call(cmd)


def relaunch_if_several(nproc: int, module: str) -> None:
    """In a stage's ``main``: with ``nproc`` > 1, run the stage under torchrun with its own arguments and exit
    with torchrun's status; otherwise (or inside torchrun) return and let the stage run here."""
    status = relaunch_under_torchrun(nproc, module)
    if status is not None:
        raise SystemExit(status)


def init_runtime(hw: HardwareConfig) -> Runtime:
    """Threads (``llmcore.threads.training_threads``), device and (under torchrun) the process group; idempotent.

    Under torchrun (RANK / WORLD_SIZE / LOCAL_RANK in the environment): nccl on CUDA, one GPU per local
    rank; gloo on CPU. Otherwise one process on ``resolve_device(hw.device)``. On CUDA fp32 matmuls may use
    TF32 tensor cores (``torch.set_float32_matmul_precision("high")``, as nanoGPT); CPU matmuls are untouched.
    """
    device = resolve_device(hw.device)
    # torchrun's local processes share this machine's CPUs (torchrun itself would give each one thread)
    torch.set_num_threads(training_threads(hw.threads, processes=int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
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
    """Tensors (also inside tuples, lists, dicts) to ``device``; anything else unchanged.

    To CUDA the copy is asynchronous from pinned host memory: a batch the loader built pinned
    (``RandomWindows(..., pin_memory=True)``) goes as it is, any other is first copied into pinned memory.
    """
    if isinstance(batch, torch.Tensor):
        if device.type == "cuda" and batch.device.type == "cpu":
            return (batch if batch.is_pinned() else batch.pin_memory()).to(device, non_blocking=True)
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    return batch


def reference_count(n: torch.Tensor, rt: Runtime) -> float:
    """The first micro-batch's item count, the same on every rank (their max) so weights agree."""
    if rt.ddp:
        n = n.clone()
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
    return max(float(n.item()), 1.0)


def out_of_time(train_time: float, budget: float, rt: Runtime, device: torch.device) -> bool:
    """Whether the time budget is spent; rank 0's clock decides for every rank so they stop together.

    One process: a comparison on the host, nothing on the device. Several: a broadcast, which waits for the
    device (``fit`` calls it right after a read-back only)."""
    if not rt.ddp:
        return train_time >= budget
    flag = torch.tensor([float(train_time >= budget)], device=device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())
