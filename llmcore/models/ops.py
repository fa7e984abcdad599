"""Fused training ops that the plain PyTorch formulation leaves on the table.

``linear_cross_entropy`` is the output head and the next-token loss in one step: it never holds the full
(N, vocab) logits, and it computes the head's gradients in the forward pass (the idea of Liger-Kernel's
``FusedLinearCrossEntropy`` and of Apple's "Cut Your Losses", here in plain PyTorch ops). With GPT-2's
50,257-wide vocabulary the logits of a 4x256 batch are 206 MB in fp32; the unfused path writes and reads
them about eight times (matmul, log-softmax, NLL, their backwards, a zero-filled gradient), which is
memory-bound work that costs as much as the head's matmuls on a small CPU. Chunked over rows, each
chunk's logits stay hot in cache and are turned into their gradient in place.

    h = model(idx, return_logits=False, return_hidden=True).hidden      # (B, T, C), after the final norm
    loss = linear_cross_entropy(h, model.out_head.weight, targets)      # == F.cross_entropy(h @ W.T, targets)
    loss.backward()

Under autocast the matmuls run in the autocast dtype and the softmax in fp32, as autocast would do
for ``linear`` followed by ``cross_entropy``; the weight gradient accumulates in fp32.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index: a target (or label) that no loss scores


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, ignore_index, reduction, chunk_rows, compute_dtype):
        N = x.shape[0]
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        xc, wc = x.to(compute_dtype), weight.to(compute_dtype)  # one cast of the weight per step, as autocast
        valid = targets != ignore_index
        safe_targets = torch.where(valid, targets, 0)
        n_valid = valid.sum()
        # mean over real tokens; an all-ignored batch gives 0 loss (not NaN) and zero gradients
        scale = 1.0 / n_valid.clamp_min(1).float() if reduction == "mean" else torch.ones((), device=x.device)
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if need_w else None
        for s in range(0, N, chunk_rows):
            e = min(s + chunk_rows, N)
            logits = (xc[s:e] @ wc.t()).float()  # (n, V)
            t, v = safe_targets[s:e, None], valid[s:e]
            lse = torch.logsumexp(logits, dim=-1)  # (n,)
            loss += ((lse - logits.gather(1, t).squeeze(1)) * v).sum()
            if not (need_x or need_w):
                continue
            # d loss / d logits = (softmax - onehot) * scale, built in place: exp(logits - lse - log(scale))
            # gives scaled probabilities; ignored rows get a shift of +inf, so their gradient is exactly 0.
            shift = torch.where(v, lse - scale.log(), float("inf"))
            logits.sub_(shift[:, None]).exp_()
            logits.scatter_add_(1, t, (-scale * v).to(logits.dtype)[:, None])
            g = logits.to(compute_dtype)
            if need_x:
                torch.mm(g, wc, out=grad_x[s:e]) if grad_x.dtype == compute_dtype else grad_x[s:e].copy_(g @ wc)
            if need_w:
                if compute_dtype == torch.float32:
                    grad_w.addmm_(g.t(), xc[s:e])
                else:
                    grad_w += g.t() @ xc[s:e]  # bf16 matmul (fp32 accumulation inside), summed over chunks in fp32
        ctx.save_for_backward(grad_x, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss * scale

    @staticmethod
    def backward(ctx, grad_out):
        grad_x, grad_w = ctx.saved_tensors
        if grad_x is not None:
            grad_x = grad_x * grad_out.to(grad_x.dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_out).to(ctx.weight_dtype)
        return grad_x, grad_w, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_rows: int = 256,
) -> torch.Tensor:
    """``F.cross_entropy(hidden @ weight.T, targets)`` without materialising the (N, vocab) logits.

    Args:
        hidden: (..., C) final hidden states (``GPT(..., return_hidden=True, return_logits=False).hidden``).
        weight: (V, C) output head weight (``model.out_head.weight``; tied or not).
        targets: (...) token ids, ``ignore_index`` where no loss is taken (padding, prompt tokens).
        ignore_index: target value that contributes neither loss nor gradient.
        reduction: ``"mean"`` over the non-ignored targets (0 when there are none) or ``"sum"``.
        chunk_rows: rows of logits computed at once; 256 x 50257 fp32 is 51 MB. Smaller saves memory,
            larger streams the weight through the matmuls fewer times.

    Returns:
        The scalar loss (fp32). Its backward is a scaled copy of gradients computed in the forward pass,
        so call it once per backward (no double backward); under ``torch.no_grad`` it only computes the loss.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} do not match")
    x = hidden.reshape(-1, hidden.shape[-1])
    device_type = x.device.type
    compute_dtype = x.dtype
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    # Autocast off inside: the function picks its own dtypes, and autograd must not insert casts.
    with torch.autocast(device_type, enabled=False):
        return _LinearCrossEntropy.apply(
            x, weight, targets.reshape(-1), ignore_index, reduction, chunk_rows, compute_dtype
        )
