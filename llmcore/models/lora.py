"""LoRA: low-rank adapters on a model's linear layers, trained while the base weights stay frozen.

A wrapped layer computes ``base(x) + (alpha / rank) · B(A(dropout(x)))`` with ``A: (rank, in)`` and
``B: (out, rank)``. ``B`` starts at zero, so the wrapped model starts out computing exactly what the base
did; only ``A`` and ``B`` (``rank · (in + out)`` numbers per layer) learn. After training, ``merge_lora``
folds ``W + (alpha / rank) · B @ A`` back into plain ``nn.Linear`` layers: the exported model has the
base architecture and state-dict names, and costs nothing extra at inference.

    apply_lora(model, rank=8, alpha=16, dropout=0.05, targets=LORA_TARGETS)  # wrap attn/MLP linears
    mark_trainable(model, ["head"])         # adapters + any parameter under "head"; the rest frozen
    ...train...
    merge_lora(model)                       # back to plain nn.Linear, same outputs

The model is wrapped in place and is otherwise untouched, so this works for any ``nn.Module`` holding
``nn.Linear`` children (``GPT``, a classifier around it, ...).

References: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021), and its ``loralib``
(init and scaling); Raschka, *Build a Large Language Model (From Scratch)*, appendix E; litgpt ``lora.py``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from llmcore.common import LLMCoreError

# Module-name suffixes of llmcore.models.gpt.GPT's linear layers: attention qkv/out projection, MLP in/out.
LORA_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")


@dataclass
class LoRAParams:
    """A params.yaml ``lora:`` block (``apply_lora``'s arguments)."""

    rank: int = 8  # r, the inner dimension of each update
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on the adapters' input
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))  # linear layers to adapt, by name suffix

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank: expected a positive int, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: expected a value in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError("targets: expected at least one linear-layer name")


class LoRALinear(nn.Module):
    """An ``nn.Linear`` plus a trainable low-rank update; the wrapped layer is kept as ``self.base``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.base = base
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and loralib; B = 0 keeps the start exact
        self.dropout = nn.Dropout(dropout)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling  # (out, in), the update merge adds to W

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base layer with the update folded into its weight (the base module, modified in place)."""
        self.base.weight += self.delta_weight().to(self.base.weight.dtype)
        return self.base

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


def _matches(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    targets: Sequence[str] = LORA_TARGETS,
) -> list[str]:
    """Wrap, in place, every ``nn.Linear`` whose module name ends with one of ``targets`` in a ``LoRALinear``.

    Args:
        model: any module; its linear layers are found by name (``blocks.3.attn.qkv`` matches ``attn.qkv``).
        rank: inner dimension r of the update.
        alpha: scale numerator; the update is multiplied by ``alpha / rank``.
        dropout: dropout on the adapter's input only (the base path is unchanged).
        targets: module-name suffixes to wrap (default: attention qkv/proj and MLP fc/proj).

    Returns:
        The names of the wrapped modules.

    Raises:
        LLMCoreError: a target matches no linear layer (a typo would otherwise train nothing), or the model
            already holds LoRA layers.
    """
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise LLMCoreError("apply_lora: the model already has LoRA layers")
    if rank <= 0:
        raise LLMCoreError(f"rank: expected a positive int, got {rank}")
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(n, targets)]
    for target in targets:
        if not any(_matches(n, [target]) for n in names):
            raise LLMCoreError(f"targets: '{target}' matches no linear layer of the model")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, dropout))
    return names


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace, in place, every ``LoRALinear`` by its base ``nn.Linear`` with the update folded in."""
    names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, getattr(parent, child).merged())
    return model


def lora_parameters(model: nn.Module) -> Iterable[tuple[str, nn.Parameter]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield f"{name}.lora_A", module.lora_A
            yield f"{name}.lora_B", module.lora_B


def mark_trainable(model: nn.Module, prefixes: Sequence[str] = (), lora: bool = True) -> int:
    """Freeze every parameter except the LoRA adapters (if ``lora``) and those under ``prefixes``.

    Args:
        model: the model; ``requires_grad`` is set on every parameter.
        prefixes: parameter-name prefixes to train as well, e.g. ``["head"]`` or ``["gpt.blocks.11", "head"]``.
            A prefix matches whole name components (``"head"`` matches ``head.weight``, not ``header.w``).
        lora: also train the ``lora_A``/``lora_B`` adapters.

    Returns:
        The number of trainable parameters (a tied tensor counts once).

    Raises:
        LLMCoreError: a prefix matches no parameter.
    """
    named = list(model.named_parameters(remove_duplicate=False))  # a tied tensor matches under either name
    for prefix in prefixes:
        if not any(n == prefix or n.startswith(prefix + ".") for n, _ in named):
            raise LLMCoreError(f"mark_trainable: '{prefix}' matches no parameter of the model")
    for _, p in named:
        p.requires_grad_(False)
    for name, p in named:
        if any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes):
            p.requires_grad_(True)
    if lora:
        for _, p in lora_parameters(model):
            p.requires_grad_(True)
    return count_trainable(model)


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)  # parameters() yields tied tensors once
