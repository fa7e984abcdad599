"""Training configs: params.yaml's `hardware` section and the `train:` part of each training stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from llmcore.threads import parse_threads


@dataclass
class HardwareConfig:
    """Where and how to run; params.yaml section ``hardware``, shared by every training stage."""

    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"  # auto: cuda, then mps, then cpu
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast dtype; weights stay fp32 (master copy)
    compile: bool = False  # torch.compile the model (minutes of compile time; pays off on long GPU runs)
    # CPU threads per process: auto (the CPUs this process may use, shared by torchrun's local processes; see
    # llmcore/threads.py) or a number. A different count is a different run (reduction order) for training.
    threads: int | str | None = "auto"
    nproc: int = 1  # processes on this machine; >1: the stage re-launches itself under torchrun (DDP)
    peak_tflops: float | None = None  # per device, for MFU; None: measured with a matmul at startup
    activation_checkpointing: bool = False  # recompute block activations in backward: less memory, ~1/3 more compute
    # output head + loss: auto (full on CUDA, chunked elsewhere) | chunked (never holds the (N, vocab) logits) | full
    head_loss: Literal["auto", "chunked", "full"] = "auto"

    def __post_init__(self) -> None:
        if self.nproc < 1:
            raise ValueError(f"nproc: expected a positive int, got {self.nproc}")
        self.threads = parse_threads(self.threads) or "auto"
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ValueError(f"peak_tflops: expected a positive float or null, got {self.peak_tflops}")


MAX_BATCH_SIZE = 1 << 20  # sequences per micro-batch: far past any memory (a typo such as 1e12 is caught at load)


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
        if self.batch_size > MAX_BATCH_SIZE:  # refused here, not as an out-of-memory traceback at the first batch
            raise ValueError(f"batch_size: expected a positive int up to {MAX_BATCH_SIZE}, got {self.batch_size}")
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
