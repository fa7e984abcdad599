"""Devices, dtypes and seeding: where torch runs, decided once at the edge from params strings."""

from __future__ import annotations

import contextlib
import random

import torch

from llmcore.common import LLMCoreError


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(device: str = "auto") -> torch.device:
    """Map ``auto|cpu|cuda|mps`` (or ``cuda:N``) to a torch device, failing clearly when unavailable."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LLMCoreError(f"device '{device}' requested but CUDA is not available")
    if device == "mps" and not torch.backends.mps.is_available():
        raise LLMCoreError("device 'mps' requested but MPS is not available")
    return torch.device(device)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_context(device: torch.device, precision: str):
    """Autocast for bf16/fp16 (weights stay fp32, the master copy); a no-op context for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])
