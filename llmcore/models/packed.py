"""Linear layers whose weights are reordered once for oneDNN, for batched inference on CPU.

torch's CPU matrix product (MKL's sgemm) of one row is a matrix-vector pass over the weights; a product of a few
rows (2-16: the rows of a batched decode step) costs 2.5-3x as much, the price of packing the weight matrix into
its blocked layout on every call. Measured 2026-12-06 on a 2-core AMD EPYC VM, 2 threads, the 124M head
(768 x 50,257): 10 ms for one row, 26 ms for two, 32 ms for eight; with the weight reordered once into oneDNN's
blocked layout (``torch.ops.mkldnn._reorder_linear_weight``, the prepacking Inductor does for frozen weights) and
multiplied by ``torch.ops.mkldnn._linear_pointwise``: 6.4, 6.8 and 10.5 ms. A batched decode step of the 124M shape
took about half the time (8 rows, eager).

:func:`pack_linears` gives each ``nn.Linear`` of a model such a copy. A packed layer uses it only where it pays and
changes nothing else:

- inference only (no autograd), float32 input on the CPU, and at least ``min_rows`` rows in the batch dimension
  (``x.shape[0]``): a single sequence runs the same kernels as before, so batch-1 generation stays token-identical
  to :func:`llmcore.models.generate.generate` on an unpacked model; batched rows differ from it in float rounding
  only, as any two matmul kernels do;
- a weight changed in place (training, ``load_state_dict``) is repacked at its next use (its version counter moved);
- the copy costs memory: each packed weight is held twice (the 124M shape: about 500 MB more).
"""

from __future__ import annotations

import types
import weakref

import torch
import torch.nn.functional as F
from torch import nn

MIN_ROWS = 2  # batch rows from which a packed layer uses its copy (one row: torch's matrix-vector path is as fast)
# Weights smaller than this stay as they are: their products are cheap next to the call around them (serving the
# llama3-tiny model, 128-wide, measured the same with and without packing).
MIN_WEIGHT_ELEMENTS = 1 << 18


def available() -> bool:
    """Whether this torch has the oneDNN ops the packed layers use."""
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


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


def _packed_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if (
        x.dim() < 2
        or x.shape[0] < self._packed_min_rows
        or torch.is_grad_enabled()
        or x.dtype != torch.float32
        or x.device.type != "cpu"
        or self.weight.dtype != torch.float32
        or self.weight.device.type != "cpu"
    ):
        return F.linear(x, self.weight, self.bias)
    flat = x.reshape(-1, x.shape[-1])
    out = torch.ops.mkldnn._linear_pointwise(flat, _current(self), self.bias, "none", [], "")
    return out.view(*x.shape[:-1], out.shape[-1])


def pack_linears(
    model: nn.Module, min_rows: int = MIN_ROWS, rows_hint: int = 8, min_elements: int = MIN_WEIGHT_ELEMENTS
) -> int:
    """Give every ``nn.Linear`` of ``model`` (on the CPU, float32, a weight of at least ``min_elements``) a
    oneDNN-packed copy of its weight, used for batches of at least ``min_rows`` rows in inference (see the module
    docstring). ``rows_hint``: the batch size the layout is chosen for (any batch works). Returns how many layers are
    packed now (those packed before included); 0 where torch has no oneDNN. Packing twice repacks nothing."""
    if not available():
        return 0
    count = 0
    for layer in model.modules():
        if type(layer) is not nn.Linear:
            continue
        if "forward" in vars(layer):  # packed before
            count += 1
            continue
        weight = layer.weight
        if weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.numel() < min_elements:
            continue
        layer._packed_min_rows, layer._packed_rows = min_rows, rows_hint
        layer.forward = types.MethodType(_packed_forward, layer)  # this layer only; the class is untouched
        _current(layer)
        count += 1
    return count


def unpack_linears(model: nn.Module) -> None:
    """Drop the packed copies (the memory) and the packed forward."""
    for layer in model.modules():
        if type(layer) is nn.Linear and "forward" in vars(layer):
            del layer.forward, layer._packed_min_rows, layer._packed_rows
            _packed.pop(layer, None)
