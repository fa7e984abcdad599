"""Sequence classification on top of the GPT: a linear head over the hidden state of the last real token.

The book (ch. 6) swaps GPT-2's vocabulary head for a 2-way one and reads the logits at the *last position*
of a batch padded to one fixed length, so a message's prediction depends on how much padding it was given.
Here sequences are right-padded with an attention mask and the head reads the final-norm hidden state at
each row's own last real token (index ``length - 1``): under causal attention that token has seen the
whole message and no padding, so a prediction is the same alone, in any batch, at any padded width. That
also lets batches pad only to their longest message instead of the global maximum (most SMS are short).

    model = GPTClassifier(gpt, num_classes=2)               # gpt: e.g. from llmcore.weights.hub.load_model_dir
    set_trainable(model, "lora", lora=LoRAParams(rank=8))   # head | last_blocks | all | lora
    logits = model(idx, attention_mask)                     # (B, num_classes)
    fit(model, ClassificationBatches(seqs, labels, 16, pad_id), val, classification_loss, ...)
    merge_lora(model); save_classifier("data/models/classify", model, tok, LABELS)
    model, tok, labels = load_classifier("data/models/classify")

The spam data preparation (balance, split, tokenize) and the metrics (accuracy, precision, recall, F1,
confusion matrix; spam is the positive class) live here too.

Saved format: a folder with ``tokenizer.json`` and ``model.safetensors``, an llmcore checkpoint of the base
GPT (LoRA already merged, same tensor names) plus two extra tensors ``cls_head.weight`` (num_classes,
emb_dim) and ``cls_head.bias`` (num_classes,), and extra metadata::

    {"format": "llmcore", "config": <ModelConfig json>, "task": "classify",
     "labels": "[\\"ham\\", \\"spam\\"]", "pooling": "last_token", ...caller's keys}

(the classify stage adds ``stage``, ``base_model``, ``trainable`` and ``max_length``, the truncation
``predict`` applies). ``llmcore.weights.model_dir.load_classifier`` reads it back; a language-model loader
refuses it, since it is not a language model any more.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmcore.common import LLMCoreError
from llmcore.models.gpt import GPT
from llmcore.models.lora import LoRAParams, apply_lora, count_trainable, mark_trainable
from llmcore.models.ops import IGNORE_INDEX

LABELS = ("ham", "spam")  # class id = index; spam (1) is the positive class for precision/recall
HEAD_PREFIX = "cls_head."
POOLING = "last_token"
TRAINABLE = ("head", "last_blocks", "all", "lora")


# ---------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token in a right-padded (B, T) mask: ``length - 1``."""
    lengths = attention_mask.long().sum(dim=-1)
    if (lengths == 0).any():
        raise ValueError("a row of the batch has no real tokens")
    return lengths - 1


class GPTClassifier(nn.Module):
    """The base GPT (its vocabulary head unused) plus a ``num_classes`` linear head on the last real token."""

    def __init__(self, gpt: GPT, num_classes: int):
        super().__init__()
        self.gpt = gpt
        self.head = nn.Linear(gpt.cfg.emb_dim, num_classes)
        w = gpt.tok_emb.weight
        self.head.to(device=w.device, dtype=w.dtype)

    @property
    def cfg(self):
        return self.gpt.cfg

    def forward(self, idx: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) right-padded ids and mask (1 = real token) -> (B, num_classes) logits."""
        # return_logits=False: the vocab-wide output matmul would be wasted work here
        hidden = self.gpt(idx, attention_mask=attention_mask, return_hidden=True, return_logits=False).hidden
        rows = torch.arange(idx.shape[0], device=idx.device)
        pooled = hidden[rows, last_token_index(attention_mask)]  # (B, C)
        return self.head(pooled)


def set_trainable(model: GPTClassifier, mode: str, last_blocks: int = 1, lora: LoRAParams | None = None) -> int:
    """Choose what fine-tuning updates; everything else is frozen. Returns the trainable parameter count.

    Args:
        model: the classifier (LoRA layers are added to ``model.gpt`` in place for ``"lora"``).
        mode: ``head`` (a linear probe), ``last_blocks`` (the last ``last_blocks`` blocks + final norm +
            head, the book's choice), ``all`` (full fine-tuning, all but an untied vocabulary head) or
            ``lora`` (adapters on the linear layers named by ``lora.targets`` + head).
        last_blocks: how many final transformer blocks ``last_blocks`` trains.
        lora: rank/alpha/dropout/targets for ``lora``.
    """
    if mode == "all":
        for p in model.parameters():
            p.requires_grad_(True)
        if not model.cfg.tie_embeddings:  # an untied vocabulary head is never used by the classifier
            model.gpt.out_head.weight.requires_grad_(False)
        return count_trainable(model)
    if mode == "head":
        return mark_trainable(model, ["head"], lora=False)
    if mode == "last_blocks":
        n = model.cfg.n_layers
        if not 1 <= last_blocks <= n:
            raise LLMCoreError(f"last_blocks: expected 1..{n} (the base model's n_layers), got {last_blocks}")
        blocks = [f"gpt.blocks.{i}" for i in range(n - last_blocks, n)]
        return mark_trainable(model, [*blocks, "gpt.final_norm", "head"], lora=False)
    if mode == "lora":
        lora = lora or LoRAParams()
        try:
            apply_lora(model.gpt, lora.rank, lora.alpha, lora.dropout, lora.targets)
        except LLMCoreError as e:
            raise LLMCoreError(f"lora.{e}") from None
        return mark_trainable(model, ["head"], lora=True)
    raise LLMCoreError(f"trainable: expected one of {'|'.join(TRAINABLE)}, got {mode!r}")


# ---------------------------------------------------------------------------------------------------
# Batching and inference
# ---------------------------------------------------------------------------------------------------


def right_pad(
    seqs: Sequence[Sequence[int]], pad_id: int, width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists to ``width`` (default: the longest) -> (B, T) ids and (B, T) mask of 0/1."""
    width = width or max(len(s) for s in seqs)
    idx = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        if not 0 < len(s) <= width:
            raise ValueError(f"row {row}: {len(s)} tokens, expected 1..{width}")
        idx[row, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[row, : len(s)] = 1
    return idx, mask


@torch.no_grad()
def predict_proba(
    model: GPTClassifier, seqs: Sequence[Sequence[int]], pad_id: int, batch_size: int = 64, device="cpu"
) -> torch.Tensor:
    """Class probabilities (N, num_classes) for token lists, in eval mode.

    Sequences are sorted by length so each batch pads little; results come back in input order.
    """
    was_training = model.training
    model.eval()
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    probs = torch.empty(len(seqs), model.head.out_features)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        idx, mask = right_pad([seqs[i] for i in rows], pad_id)
        logits = model(idx.to(device), mask.to(device))
        probs[rows] = logits.float().softmax(dim=-1).cpu()
    model.train(was_training)
    return probs


def classification_loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """``fit``'s loss function: mean cross-entropy of the pooled logits over the batch's labelled rows."""
    idx, mask, labels = batch
    logits = model(idx, mask)  # (B, num_classes)
    n = (labels != IGNORE_INDEX).sum()
    loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss / n.clamp_min(1), n


# ---------------------------------------------------------------------------------------------------
# Spam data: balance, split
# ---------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------------------------------
