"""oneDNN-packed linear weights for batched CPU inference (llmcore.models.packed): the same products to float
rounding for batches, the very same kernels for one row and for training, and a weight changed in place is
repacked before its next use."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from llmcore.models import packed
from llmcore.models.config import ModelConfig
from llmcore.models.gpt import GPT

pytestmark = pytest.mark.skipif(not packed.available(), reason="this torch has no oneDNN")


def layer(seed: int = 0, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(48, 80, bias=bias)


@pytest.mark.parametrize("bias", [True, False])
def test_batches_use_the_packed_copy_and_one_row_the_plain_product(bias):
    plain, fast = layer(bias=bias), layer(bias=bias)
    assert packed.pack_linears(fast, min_elements=0) == 1
    with torch.no_grad():
        for shape in [(8, 48), (3, 5, 48), (2, 1, 48)]:
            x = torch.randn(shape)
            torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-5)
        one = torch.randn(1, 7, 48)
        assert torch.equal(fast(one), plain(one))  # batch 1: torch's own kernel, bit for bit
    calls = []
    real = torch.ops.mkldnn._linear_pointwise

    class Spy:
        def __call__(self, *args):
            calls.append(args[0].shape)
            return real(*args)

    spy = Spy()
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.ops.mkldnn, "_linear_pointwise", spy)
        fast(torch.randn(4, 2, 48))
        fast(torch.randn(1, 2, 48))
    assert calls == [torch.Size([8, 48])]


def test_training_and_autograd_take_the_plain_path():
    plain, fast = layer(), layer()
    packed.pack_linears(fast, min_elements=0)
    x = torch.randn(6, 48)
    plain(x).sum().backward()
    fast(x).sum().backward()
    assert torch.equal(fast.weight.grad, plain.weight.grad) and torch.equal(fast.bias.grad, plain.bias.grad)


def test_a_weight_changed_in_place_or_replaced_is_repacked():
    fast = layer()
    packed.pack_linears(fast, min_elements=0)
    x = torch.randn(4, 48)
    with torch.no_grad():
        fast.weight.mul_(2.0)  # in place: the version counter moves
        torch.testing.assert_close(fast(x), nn.functional.linear(x, fast.weight, fast.bias), rtol=1e-5, atol=1e-5)
        fast.load_state_dict(layer(seed=3).state_dict())
        torch.testing.assert_close(fast(x), layer(seed=3)(x), rtol=1e-5, atol=1e-5)
        fast.weight = nn.Parameter(torch.zeros_like(fast.weight))  # a new parameter object
        torch.testing.assert_close(fast(x), fast.bias.expand(4, -1), rtol=0, atol=0)


def test_a_packed_model_decodes_like_the_plain_one_and_unpacks():
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("llama3-tiny", vocab_size=97)).eval()
    reference = copy.deepcopy(model)
    n = packed.pack_linears(model, min_elements=0)
    assert n == len([m for m in model.modules() if type(m) is nn.Linear]) > 0
    assert packed.pack_linears(model, min_elements=0) == n  # twice: nothing repacked, the same layers
    assert "out_head._packed" not in dict(model.named_buffers()) and model.state_dict().keys() == (
        reference.state_dict().keys()
    )
    ids = torch.randint(0, 97, (4, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-5)
        assert torch.equal(model(ids[:1]).logits, reference(ids[:1]).logits)
    twin = copy.deepcopy(model)  # a packed model copies (its copy packs again on first use)
    with torch.no_grad():
        assert torch.equal(twin(ids).logits, model(ids).logits)
    packed.unpack_linears(model)
    assert not any("forward" in vars(m) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_other_dtypes_and_layers_are_left_alone():
    half = layer().to(torch.bfloat16)
    assert packed.pack_linears(half, min_elements=0) == 0 and "forward" not in vars(half)
    assert packed.pack_linears(layer()) == 0  # 48 x 80: under MIN_WEIGHT_ELEMENTS, not worth a copy
    assert packed.pack_linears(nn.Sequential(nn.Embedding(4, 4), nn.LayerNorm(4))) == 0
