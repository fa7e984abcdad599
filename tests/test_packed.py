"""Linear layers on oneDNN for CPU inference (llmcore.models.packed): one row on the plain weight, batches on a copy
packed once, the same products as ``F.linear`` to float rounding; training and autograd keep torch's kernel; a weight
changed in place is repacked before its next use; the compiled decode step traces the same products."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from llmcore.models import packed
from llmcore.models.config import ModelConfig
from llmcore.models.generate import SamplingConfig, generate
from llmcore.models.gpt import GPT

pytestmark = pytest.mark.skipif(not packed.available(), reason="this torch has no oneDNN")


def layer(seed: int = 0, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(48, 80, bias=bias)


class Spy:
    """Records the (rows, weight kind) of each oneDNN product."""

    def __init__(self):
        self.calls: list[tuple[int, str]] = []
        self.real = torch.ops.mkldnn._linear_pointwise

    def __call__(self, x, weight, *args):
        self.calls.append((x.shape[0], "packed" if weight.is_mkldnn else "plain"))
        return self.real(x, weight, *args)


@pytest.mark.parametrize("bias", [True, False])
def test_batches_use_the_packed_copy_and_one_row_the_plain_weight(bias):
    plain, fast = layer(bias=bias), layer(bias=bias)
    assert packed.onednn_linears(fast, min_elements=0) == 1 and packed.packed_layers(fast) == 1
    with torch.no_grad():
        for shape in [(8, 48), (3, 5, 48), (2, 1, 48), (1, 7, 48), (1, 48)]:
            x = torch.randn(shape)
            torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-5)
            assert torch.equal(fast(x), fast(x.clone()))  # the same kernel, the same bits
    spy = Spy()
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.ops.mkldnn, "_linear_pointwise", spy)
        fast(torch.randn(4, 2, 48))
        fast(torch.randn(1, 2, 48))
    assert spy.calls == [(8, "packed"), (2, "plain")]  # rows flattened; a batch of one sequence: the plain weight


def test_without_a_copy_every_batch_uses_the_plain_weight():
    fast = layer()
    assert packed.onednn_linears(fast, packed_from=None, min_elements=0) == 1 and packed.packed_layers(fast) == 0
    spy = Spy()
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.ops.mkldnn, "_linear_pointwise", spy)
        fast(torch.randn(4, 48))
    assert spy.calls == [(4, "plain")]
    # asked again with a copy: the layer gets one (the serve engine over a model generate set up)
    assert packed.onednn_linears(fast, min_elements=0) == 1 and packed.packed_layers(fast) == 1


def test_training_and_autograd_take_the_plain_path():
    plain, fast = layer(), layer()
    packed.onednn_linears(fast, min_elements=0)
    x = torch.randn(6, 48)
    plain(x).sum().backward()
    fast(x).sum().backward()
    assert torch.equal(fast.weight.grad, plain.weight.grad) and torch.equal(fast.bias.grad, plain.bias.grad)


def test_a_weight_changed_in_place_or_replaced_is_repacked():
    fast = layer()
    packed.onednn_linears(fast, min_elements=0)
    x = torch.randn(4, 48)
    with torch.no_grad():
        fast.weight.mul_(2.0)  # in place: the version counter moves
        torch.testing.assert_close(fast(x), nn.functional.linear(x, fast.weight, fast.bias), rtol=1e-5, atol=1e-5)
        fast.load_state_dict(layer(seed=3).state_dict())
        torch.testing.assert_close(fast(x), layer(seed=3)(x), rtol=1e-5, atol=1e-5)
        fast.weight = nn.Parameter(torch.zeros_like(fast.weight))  # a new parameter object
        torch.testing.assert_close(fast(x), fast.bias.expand(4, -1), rtol=0, atol=0)


def test_a_model_on_onednn_decodes_like_the_plain_one_and_goes_back():
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("llama3-tiny", vocab_size=97)).eval()
    reference = copy.deepcopy(model)
    n = packed.onednn_linears(model, min_elements=0)
    assert n == len([m for m in model.modules() if type(m) is nn.Linear]) > 0
    assert packed.onednn_linears(model, min_elements=0) == n  # twice: nothing repacked, the same layers
    assert "out_head" in packed.onednn_layout(model)
    assert model.state_dict().keys() == reference.state_dict().keys()
    ids = torch.randint(0, 97, (4, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model(ids[:1]).logits, reference(ids[:1]).logits, rtol=1e-4, atol=1e-5)
    cfg = SamplingConfig(12, temperature=0)
    assert generate(model, ids.tolist(), cfg) == generate(reference, ids.tolist(), cfg)
    twin = copy.deepcopy(model)  # a model on oneDNN copies (its copy packs again on first use)
    with torch.no_grad():
        assert torch.equal(twin(ids).logits, model(ids).logits)
    packed.plain_linears(model)
    assert not any("forward" in vars(m) for m in model.modules()) and packed.onednn_layout(model) == ()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_generate_puts_wide_layers_on_onednn_without_copies():
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("llama3-tiny", vocab_size=4096, context_length=32)).eval()
    generate(model, [[1, 2, 3]], SamplingConfig(2))
    assert packed.onednn_layout(model) == ("out_head",)  # 4,096 x 128 weights; the blocks' are under the floor
    assert packed.packed_layers(model) == 0


def test_torch_compile_traces_the_plain_product():
    fast = layer()
    packed.onednn_linears(fast, min_elements=0)
    x = torch.randn(3, 48)
    compiled = torch.compile(fast, backend="eager", fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(x), nn.functional.linear(x, fast.weight, fast.bias))


def test_an_eager_call_while_another_thread_exports_runs_the_product_directly():
    """torch's "exporting" flag is one for the whole process: while the serve engine builds its compiled step in the
    background, its eager steps see it raised. Only the traced call (tracing tensors) may take the operator; an
    eager one through it raced the exporting thread on torch.fx's annotation dict (a KeyError failed the step)."""
    fast = layer()
    packed.onednn_linears(fast, packed_from=None, min_elements=0)
    x = torch.randn(3, 48)
    through_operator = []
    real = torch.ops.llmcore.onednn_linear

    def spy(*args):
        through_operator.append(args[0].shape)
        return real(*args)

    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.compiler, "_is_exporting_flag", True)  # as another thread's torch.export sets it
        mp.setattr(torch.ops.llmcore, "onednn_linear", spy)
        assert torch.compiler.is_exporting()
        out = fast(x)
    assert through_operator == []
    torch.testing.assert_close(out, nn.functional.linear(x, fast.weight, fast.bias), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # and the traced call does take it
        program = torch.export.export(fast, (x,))
    assert "llmcore.onednn_linear" in str(program.graph)


def test_other_dtypes_and_layers_are_left_alone():
    half = layer().to(torch.bfloat16)
    assert packed.onednn_linears(half, min_elements=0) == 0 and "forward" not in vars(half)
    assert packed.onednn_linears(layer()) == 0  # 48 x 80: under MIN_WEIGHT_ELEMENTS
    assert packed.onednn_linears(nn.Sequential(nn.Embedding(4, 4), nn.LayerNorm(4))) == 0
