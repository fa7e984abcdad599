"""Instruction-model evaluation without a judge: the loss on the reference answers."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from llmcore.common import LLMCoreError
from llmcore.data.datasets import load_instruction_data
from llmcore.data.instruct import encode_entries, eval_batches
from llmcore.models.gpt import GPT
from llmcore.models.ops import IGNORE_INDEX
from llmcore.training.loop import lm_loss
from llmcore.weights.model_dir import load_instruct_model


@torch.no_grad()
def evaluate_loss(model: GPT, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Token-weighted mean loss over ``batches`` (each scored target counts once, whatever its batch)."""
    was_training = model.training
    model.eval()
    device = model.tok_emb.weight.device
    total, count = 0.0, 0
    try:
        for inputs, targets in batches:
            loss, n = lm_loss(model, (inputs.to(device), targets.to(device)))
            total, count = total + float(loss) * int(n), count + int(n)
    finally:
        model.train(was_training)
    if not count:
        raise LLMCoreError("instruct: no target tokens to evaluate (every sequence truncated inside its prompt?)")
    return total / count


def reference_loss(model_dir: str | os.PathLike, responses: str | os.PathLike, batch_size: int = 8) -> dict:
    """Loss and perplexity of the instruction model on the reference outputs of ``responses.json``.

    Only response tokens (and the end-of-text) are scored, as in training with ``mask_prompt``; sequences
    are cut to the model's context. Used by the ``evaluate`` stage.

    Returns:
        ``{"reference_loss": float, "reference_perplexity": float, "reference_tokens": int}``
    """
    model, tok, template = load_instruct_model(model_dir, use="the loss on the reference answers (evaluate)")
    path = Path(responses)
    entries = load_instruction_data(path)  # the same keys, checked entry by entry
    examples = encode_entries(entries, tok, template)
    ctx = model.cfg.context_length
    batches = list(eval_batches(examples, batch_size, tok.eot_id, mask_prompt=True, max_length=ctx))
    loss = evaluate_loss(model, batches)
    n = sum(int((t != IGNORE_INDEX).sum()) for _, t in batches)
    return {"reference_loss": round(loss, 4), "reference_perplexity": round(math.exp(loss), 3), "reference_tokens": n}
