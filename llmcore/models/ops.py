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

``head_loss`` is what the model's ``forward(idx, targets=...)`` calls: the chunked function above, or the plain
formulation (full logits, then ``F.cross_entropy``), picked per device by ``pick_head_loss``.

- CPU: chunked. ``python -m benchmarks.head_loss --device cpu --threads N`` (forward + backward of the head and
  the loss alone, fp32, median of 9, the 2-core VM): at the benchmark's 50,257-token vocabulary (4 x 256 tokens,
  emb 384) chunked 0.93 s vs full 1.49 s with 1 thread, 0.52 s vs 0.55-0.62 s with 2, and it never holds the
  206 MB of logits; at the default model's 1,024-token vocabulary full is a little faster (6.8 vs 7.8 ms, 2
  threads), a small part of that step. One CPU path also keeps the default pipeline's outputs byte-identical.
- CUDA: full. ``torch.compile`` fuses the logits' cast, log-softmax and loss (and their backward) into the
  model's one graph; the chunked function is a Python loop of small kernels whose count grows with the batch.
  ``hardware.head_loss: chunked`` keeps it where the (N, vocab) logits do not fit in memory. Timed on the GPU
  by ``benchmarks/gpu.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


HEAD_LOSSES = ("auto", "chunked", "full")  # hardware.head_loss: how the output head and the loss are computed


def pick_head_loss(choice: str, device: torch.device | str) -> str:
    """``chunked`` or ``full`` for ``choice`` (one of ``HEAD_LOSSES``) on ``device``.

    ``auto``: ``full`` on CUDA (full logits + ``F.cross_entropy``, fused by ``torch.compile``), ``chunked``
    elsewhere (CPU, where it was measured faster; MPS, untimed, keeps what it had).
    """
    if choice not in HEAD_LOSSES:
        raise ValueError(f"head_loss: expected one of {'|'.join(HEAD_LOSSES)}, got {choice!r}")
    if choice != "auto":
        return choice
    return "full" if torch.device(device).type == "cuda" else "chunked"


def head_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    impl: str = "auto",
    vocab_size: int | None = None,
    *,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "sum",
) -> torch.Tensor:
    """Next-token cross-entropy of the logits ``hidden @ weight[:vocab_size].T`` (fp32 scalar).

    Args:
        hidden: (..., C) final hidden states; targets: (...) ids, ``ignore_index`` where no loss is taken.
        weight: (V, C) output head weight; its rows past ``vocab_size`` (a padded vocabulary) are never scored.
        impl: ``chunked`` (``linear_cross_entropy``), ``full`` (the logits, then ``F.cross_entropy``) or ``auto``
            (``pick_head_loss`` by the device of ``hidden``).
        vocab_size: the real vocabulary (None: every row of ``weight``).
        reduction: ``sum``, or ``mean`` over the scored targets (0 when there are none).
    """
    impl = pick_head_loss(impl, hidden.device)
    padded = vocab_size is not None and vocab_size < weight.shape[0]
    if impl == "chunked":
        return linear_cross_entropy(
            hidden, weight[:vocab_size] if padded else weight, targets, ignore_index=ignore_index, reduction=reduction
        )
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    logits = F.linear(hidden, weight)  # all rows: the padded width is the matmul shape the hardware wants
    if padded:
        logits = logits[..., :vocab_size]  # a view; the padded logits never reach the softmax
    logits = logits.reshape(-1, logits.shape[-1]).float()  # softmax in fp32, as autocast does for cross_entropy
    flat = targets.reshape(-1)
    loss = F.cross_entropy(logits, flat, ignore_index=ignore_index, reduction="sum")
    if reduction == "mean":
        loss = loss / (flat != ignore_index).sum().clamp_min(1)
    return loss
