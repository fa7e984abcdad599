"""Linear layers on oneDNN for CPU inference: one row on the weight as it is, batches on a copy packed once.

torch's CPU matrix product is MKL's sgemm. Measured 2026-12-06 on a 2-core AMD EPYC VM, 2 threads, float32, each
weight read from memory (not cache), against oneDNN's inner product (``torch.ops.mkldnn._linear_pointwise``, the
kernel Inductor uses for frozen weights):

- one row (a decode step of one sequence): the 124M head (768 x 50,257) took 10.4-11.9 ms with MKL, 5.2-7.1 ms with
  oneDNN on the same plain weight; the 48 products of the 124M blocks 22-26 ms against 17-20 ms. A decode step of
  the 124M shape is almost all these products (they were 85% of an eager step's time), and oneDNN reads the weight
  where it lies: no copy, no extra memory;
- a few rows (2-16, a batched decode step): MKL costs 2.5-3x its one-row product (the head: 10 ms for one row, 26
  for two, 32 for eight), the price of packing the weight into its blocked layout on every call. oneDNN on the plain
  weight costs less (10 / 13 ms for 2 / 8 rows), and on a copy reordered once into oneDNN's blocked layout
  (``torch.ops.mkldnn._reorder_linear_weight``) less again: 6.8 and 10.5 ms.

:func:`onednn_linears` routes each large ``nn.Linear`` of a model through oneDNN where it pays and changes nothing
else:

- inference only (no autograd), float32 on the CPU: training, autograd and other dtypes or devices keep
  ``F.linear``; so does code that ``torch.compile`` traces (Inductor lowers the oneDNN product only for weights it
  froze);
- batches of at least ``packed_from`` rows (``x.shape[0]``) use the packed copy, if the model has one
  (``packed_from=None``: no copy; the serve engine packs, ``generate`` does not); a weight changed in place
  (training, ``load_state_dict``) is repacked at its next use (its version counter moved). The copy costs memory:
  each packed weight is held twice (the 124M shape: about 500 MB more);
- the compiled decode step (:mod:`llmcore.models.static_decode`) traces the layers into its graph as the
  ``llmcore::onednn_linear`` operator (plain weights, which are the graph's inputs) and compiles that into a direct
  call of the same oneDNN product, so a compiled step and an eager one run the same kernels;
- results differ from ``F.linear``'s in float rounding only, as any two matmul kernels do; the same layers, rows
  and threads give the same bits, run after run.
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Collection

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import is_fake

MIN_ROWS = 2  # batch rows from which a packed layer uses its copy (one row: the plain weight is as fast)
# Weights smaller than this stay on torch's kernel: their products are cheap next to the call around them (serving
# the llama3-tiny model, 128-wide, measured the same either way), and a oneDNN call costs ~25 us even for a small
# product (a 64 x 64 weight, one row).
MIN_WEIGHT_ELEMENTS = 1 << 18


def available() -> bool:
    """Whether this torch has the oneDNN ops the layers use."""
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def _product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    out = torch.ops.mkldnn._linear_pointwise(flat, weight, bias, "none", [], "")
    return out.view(*x.shape[:-1], out.shape[-1])


@torch.library.custom_op("llmcore::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` on oneDNN, as an operator an exported graph can hold (AOTInductor calls it by name)."""
    return _product(x, weight, bias)


@onednn_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


# layer -> (packed weight, the weight's version when packed, a reference to the weight packed). Kept outside the
# layers: a oneDNN tensor has no storage to copy, so a model holding one could not be deep-copied (a copy packs again).
_packed: weakref.WeakKeyDictionary[nn.Linear, tuple[torch.Tensor, int, weakref.ref]] = weakref.WeakKeyDictionary()


def _current(layer: nn.Linear) -> torch.Tensor:
    """The layer's packed weight, packed again if the weight changed in place or is a new Parameter."""
    entry = _packed.get(layer)
    weight = layer.weight
    if entry is None or entry[1] != weight._version or entry[2]() is not weight:
        entry = (torch.ops.mkldnn._reorder_linear_weight(weight.detach(), layer._packed_rows), weight._version)
        entry = _packed[layer] = (*entry, weakref.ref(weight))
    return entry[0]


def _onednn_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if (
        x.dim() < 2
        or torch.is_grad_enabled()
        or x.dtype != torch.float32
        or x.device.type != "cpu"
        or self.weight.dtype != torch.float32
        or self.weight.device.type != "cpu"
    ):
        return F.linear(x, self.weight, self.bias)
    # The compiled decode step's graph. is_exporting() is one flag for the whole process, raised while any thread
    # exports (the serve engine builds its graph in the background while it decodes eagerly): only tracing tensors
    # say this call is the one being traced. (An eager call through the operator there also raced the exporting
    # thread on torch.fx's global annotation dict, a KeyError that failed the engine's step.)
    if torch.compiler.is_exporting() and is_fake(x):
        return torch.ops.llmcore.onednn_linear(x, self.weight, self.bias)
    if torch.compiler.is_compiling():  # torch.compile: Inductor's own matmul
        return F.linear(x, self.weight, self.bias)
    packed = self._packed_from is not None and x.shape[0] >= self._packed_from
    return _product(x, _current(self) if packed else self.weight, self.bias)


def uses_onednn(layer: nn.Module) -> bool:
    return "forward" in vars(layer) and getattr(layer.forward, "__func__", None) is _onednn_forward


def onednn_linears(
    model: nn.Module,
    packed_from: int | None = MIN_ROWS,
    rows_hint: int = 8,
    min_elements: int = MIN_WEIGHT_ELEMENTS,
    names: Collection[str] | None = None,
) -> int:
    """Route every ``nn.Linear`` of ``model`` with a float32 weight of at least ``min_elements`` on the CPU (or the
    meta device: a traced stand-in) through oneDNN for inference (see the module docstring). ``packed_from``: the
    batch rows from which a packed copy is used (None: no copy); ``rows_hint``: the batch size its layout is chosen
    for (any batch works). Returns how many layers use oneDNN now (those set up before included); 0 where torch has
    no oneDNN. ``names``: exactly these layers (by module name), whatever their size. Calling it again changes
    nothing, except that a layer set up without a copy gets one if ``packed_from`` asks for it."""
    if not available():
        return 0
    count = 0
    for name, layer in model.named_modules():
        if type(layer) is not nn.Linear or (names is not None and name not in names):
            continue
        if uses_onednn(layer):
            if packed_from is not None and layer._packed_from is None and layer.weight.device.type == "cpu":
                layer._packed_from, layer._packed_rows = packed_from, rows_hint
                _current(layer)
            count += 1
            continue
        weight = layer.weight
        if (
            weight.device.type not in ("cpu", "meta")
            or weight.dtype != torch.float32
            or (names is None and weight.numel() < min_elements)
        ):
            continue
        layer._packed_from, layer._packed_rows = packed_from, rows_hint
        layer.forward = types.MethodType(_onednn_forward, layer)  # this layer only; the class is untouched
        if packed_from is not None and weight.device.type == "cpu":
            _current(layer)  # now, not in the first batched step a request waits for
        count += 1
    return count


def packed_layers(model: nn.Module) -> int:
    """How many layers of ``model`` hold a packed copy for batches."""
    return sum(uses_onednn(m) and m._packed_from is not None for m in model.modules())


def onednn_layout(model: nn.Module) -> tuple[str, ...]:
    """The names of the layers that use oneDNN (what a compiled graph traced from ``model`` depends on)."""
    return tuple(name for name, m in model.named_modules() if uses_onednn(m))


def plain_linears(model: nn.Module) -> None:
    """Back to ``F.linear`` everywhere; the packed copies (the memory) are dropped."""
    for layer in model.modules():
        if type(layer) is nn.Linear and uses_onednn(layer):
            del layer.forward, layer._packed_from, layer._packed_rows
            _packed.pop(layer, None)
