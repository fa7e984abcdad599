"""llmcore.models.ops: linear_cross_entropy equals the unfused head + F.cross_entropy, in value and in gradients;
head_loss gives the same loss both ways and is picked per device."""

import pytest
import torch
import torch.nn.functional as F

from llmcore.models.ops import head_loss, linear_cross_entropy, pick_head_loss


def inputs(N=37, C=16, V=101, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, C, generator=g).requires_grad_()
    W = (torch.randn(V, C, generator=g) * 0.5).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g)
    y[[0, 5, 6]] = -100  # ignored positions (padding, prompt tokens)
    return h, W, y


def grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_rows", [8, 37, 1000])  # remainder chunk, exact, one chunk
def test_matches_unfused_loss_and_gradients_fp32(reduction, chunk_rows):
    h, W, y = inputs()
    ref = F.cross_entropy(h @ W.t(), y, ignore_index=-100, reduction=reduction)
    out = linear_cross_entropy(h, W, y, reduction=reduction, chunk_rows=chunk_rows)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads(out * 3.0, h, W), grads(ref * 3.0, h, W), strict=True):  # upstream grad is applied
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_batched_hidden_and_tied_weight_accumulate_like_the_model():
    # (B, T, C) hidden with the head tied to an embedding that also gets gradient from the lookup
    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 8)
    idx, y = torch.randint(0, 50, (2, 5)), torch.randint(0, 50, (2, 5))
    ref = F.cross_entropy((emb(idx) @ emb.weight.t()).flatten(0, 1), y.flatten())
    (g_ref,) = grads(ref, emb.weight)
    out = linear_cross_entropy(emb(idx), emb.weight, y, chunk_rows=3)
    (g_out,) = grads(out, emb.weight)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g_out, g_ref, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_is_close_to_autocast_reference():
    h, W, y = inputs(N=64, C=32, V=300)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy((h @ W.t()).float(), y)
        out = linear_cross_entropy(h, W, y, chunk_rows=16)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)
    g_out, g_ref = grads(out, h, W), grads(ref, h, W)
    assert [g.dtype for g in g_out] == [torch.float32, torch.float32]  # grads in the parameters' dtype
    for a, b in zip(g_out, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=2e-3)


def test_all_ignored_gives_zero_loss_and_no_grad_path_only_computes_loss():
    h, W, y = inputs()
    out = linear_cross_entropy(h, W, torch.full_like(y, -100))
    assert out.item() == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in grads(out, h, W))
    with torch.no_grad():
        loss = linear_cross_entropy(h, W, y)
    torch.testing.assert_close(loss, F.cross_entropy(h.detach() @ W.detach().t(), y))


def test_bad_arguments_are_named():
    h, W, y = inputs()
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, W, y, reduction="none")
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(h, W, y[:-1])


# --- head_loss: chunked on a CPU, full logits on CUDA ------------------------------------------------


def test_pick_head_loss_by_device_and_override():
    assert pick_head_loss("auto", "cpu") == "chunked"
    assert pick_head_loss("auto", torch.device("cuda", 0)) == "full"  # decided from the device type alone
    assert pick_head_loss("chunked", "cuda") == "chunked" and pick_head_loss("full", "cpu") == "full"
    with pytest.raises(ValueError, match="head_loss"):
        pick_head_loss("fused", "cpu")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("padded_rows", [0, 27])
def test_head_loss_full_and_chunked_agree_and_skip_padded_rows(reduction, padded_rows):
    h, W, y = inputs()
    V = W.shape[0]
    Wp = torch.cat([W.detach(), torch.full((padded_rows, W.shape[1]), 30.0)]).requires_grad_()  # rows no loss sees
    ref = F.cross_entropy(h @ W.t(), y, ignore_index=-100, reduction=reduction)
    (g_ref,) = grads(ref, h)
    for impl in ("chunked", "full"):
        out = head_loss(h, Wp, y, impl, V, reduction=reduction)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
        g_h, g_w = grads(out, h, Wp)
        torch.testing.assert_close(g_h, g_ref, rtol=1e-5, atol=1e-6)
        assert torch.count_nonzero(g_w[V:]) == 0, impl


def test_head_loss_all_ignored_is_zero_both_ways():
    h, W, y = inputs()
    for impl in ("chunked", "full"):
        assert head_loss(h, W, torch.full_like(y, -100), impl, reduction="mean").item() == 0.0
