"""Bits per byte: a language model's loss in a unit that does not depend on its tokenizer.

Loss per token rewards a tokenizer with short tokens (more, easier predictions); loss per *byte* of text
does not. Over the scored target tokens (nanochat's ``evaluate_bpb``)::

    bpb = sum of next-token losses in nats / (ln 2 * sum of the UTF-8 bytes of those target tokens)

Special tokens (``<|endoftext|>`` between documents) are no text: they count neither in the numerator nor in
the denominator. Targets of ``-100`` (not scored) are skipped too. The output head runs over chunks of rows,
so a 65k vocabulary never materialises (B, T, V) logits.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from llmcore.text.tokenizer import Tokenizer


def token_byte_lengths(tok: Tokenizer) -> torch.Tensor:
    """(vocab_size,) int64: UTF-8 bytes of each token; 0 for special tokens (not scored)."""
    specials = set(tok.special_tokens.values())
    return torch.tensor(
        [0 if i in specials else len(tok.token_bytes(i)) for i in range(tok.vocab_size)], dtype=torch.int64
    )


def bpb_from_sums(nats: float, n_bytes: float) -> float:
    return nats / (math.log(2) * n_bytes) if n_bytes > 0 else math.nan


@torch.no_grad()
def nats_and_bytes(
    model: torch.nn.Module, idx: torch.Tensor, targets: torch.Tensor, token_bytes: torch.Tensor, chunk_rows: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss in nats, summed bytes) over the scored targets of one batch; both 0-dim float64."""
    hidden = model(idx, return_hidden=True, return_logits=False).hidden  # (B, T, C)
    weight = model.out_head.weight
    cfg = getattr(model, "cfg", None)
    if cfg is not None and weight.shape[0] != cfg.vocab_size:
        weight = weight[: cfg.vocab_size]  # a padded vocabulary: its extra rows are never scored
    x, y = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    nbytes = torch.where(y >= 0, token_bytes.to(y.device)[y.clamp_min(0)], 0)  # (N,)
    nats = torch.zeros((), dtype=torch.float64, device=x.device)
    for lo in range(0, len(y), chunk_rows):
        logits = (x[lo : lo + chunk_rows] @ weight.T).float()  # (rows, V)
        loss = F.cross_entropy(logits, y[lo : lo + chunk_rows].clamp_min(0), reduction="none")
        nats += (loss.double() * (nbytes[lo : lo + chunk_rows] > 0)).sum()
    return nats, nbytes.sum().double()


@torch.no_grad()
def evaluate_bpb(
    model: torch.nn.Module,
    batches,
    n_batches: int,
    token_bytes: torch.Tensor,
    device: torch.device,
    autocast=None,
    ddp: bool = False,
) -> float:
    """Bits per byte over ``n_batches`` ``(idx, targets)`` batches of ``batches.next_batch()``, every rank summed."""
    was_training = model.training
    model.eval()
    dtype = torch.float32 if device.type == "mps" else torch.float64
    total = torch.zeros(2, device=device, dtype=dtype)
    for _ in range(n_batches):
        idx, targets = (t.to(device) for t in batches.next_batch())
        with autocast() if autocast is not None else torch.autocast(device.type, enabled=False):
            nats, nbytes = nats_and_bytes(model, idx, targets, token_bytes)
        total += torch.stack([nats.to(dtype), nbytes.to(dtype)])
    if ddp:
        dist.all_reduce(total)
    model.train(was_training)
    return bpb_from_sums(total[0].item(), total[1].item())
