"""Sequence classification on top of the GPT: a linear head over the hidden state of the last real token.

The book (ch. 6) swaps GPT-2's vocabulary head for a 2-way one and reads the logits at the *last position*
of a batch padded to one fixed length, so a message's prediction depends on how much padding it was given.
Here sequences are right-padded with an attention mask and the head reads the final-norm hidden state at
each row's own last real token (index ``length - 1``): under causal attention that token has seen the
whole message and no padding, so a prediction is the same alone, in any batch, at any padded width. That
also lets batches pad only to their longest message instead of the global maximum (most SMS are short).

    model = GPTClassifier(gpt, num_classes=2)               # gpt: e.g. from llmcore.hub.load_model_dir
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
``predict`` applies). ``load_classifier`` reads it back; ``llmcore.checkpoint.load_checkpoint`` refuses it (unexpected
``cls_head.*`` tensors), since it is not a language model any more.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from llmcore.checkpoint import FORMAT, load_into, load_state, model_state, read_config, read_metadata, write_weights
from llmcore.common import LLMCoreError
from llmcore.hub import staged_dir
from llmcore.lora import LoRAParams, apply_lora, count_trainable, mark_trainable
from llmcore.model import GPT
from llmcore.tokenizer import Tokenizer

LABELS = ("ham", "spam")  # class id = index; spam (1) is the positive class for precision/recall
HEAD_PREFIX = "cls_head."
POOLING = "last_token"
TRAINABLE = ("head", "last_blocks", "all", "lora")
IGNORE_INDEX = -100  # a label no loss scores (a stand-in row)


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


class ClassificationBatches:
    """Right-padded ``(idx, attention_mask, labels)`` batches over token lists; the ``Batches`` protocol of
    ``llmcore.train.fit`` (``next_batch()``, ``len()`` = batches per epoch, ``state_dict()``).

    Training (``shuffle=True``): a fresh order each epoch drawn from ``(seed, epoch)``, so a resumed run sees
    the same batches; the ragged tail of an epoch is dropped so every batch is full. Evaluation
    (``shuffle=False``): every example once per epoch, in order. Each batch pads only to its own longest row.

    Data parallel: every rank draws the same global batch of ``batch_size * world_size`` rows and keeps its
    slice; a rank left without rows in a short last evaluation batch gets one stand-in row labelled -100
    (scored by nothing, weight 0).
    """

    def __init__(
        self,
        seqs: Sequence[Sequence[int]],
        labels: Sequence[int],
        batch_size: int,
        pad_id: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        if len(seqs) != len(labels):
            raise ValueError(f"{len(seqs)} sequences but {len(labels)} labels")
        if batch_size < 1:
            raise LLMCoreError(f"batch_size must be positive, got {batch_size}")
        if not seqs:
            raise LLMCoreError("no examples to batch")
        if shuffle and len(seqs) < batch_size * world_size:
            raise LLMCoreError(
                f"{len(seqs)} training examples are fewer than one batch of {batch_size * world_size}; "
                "lower train.batch_size"
            )
        self.seqs, self.labels = [list(s) for s in seqs], list(labels)
        self.batch_size, self.pad_id, self.rank, self.world_size = batch_size, pad_id, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.batch = 0, 0  # batch: the next one within the epoch
        self._order = self._epoch_order(0)

    def __len__(self) -> int:
        G = self.batch_size * self.world_size
        return len(self.seqs) // G if self.shuffle else math.ceil(len(self.seqs) / G)

    def _epoch_order(self, epoch: int) -> list[list[int]]:
        G = self.batch_size * self.world_size
        order = list(range(len(self.seqs)))
        if self.shuffle:
            random.Random(self.seed * 100_003 + epoch).shuffle(order)  # a fixed order per (seed, epoch)
        return [order[i * G : (i + 1) * G] for i in range(len(self))]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(idx, attention_mask, labels): (B, T), (B, T), (B,) int64, on the CPU."""
        if self.batch >= len(self._order):
            self.epoch, self.batch = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)
        rows = self._order[self.batch][self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        self.batch += 1
        if not rows:
            idx, mask = right_pad(self.seqs[:1], self.pad_id)
            return idx, mask, torch.full((1,), IGNORE_INDEX)
        idx, mask = right_pad([self.seqs[i] for i in rows], self.pad_id)
        return idx, mask, torch.tensor([self.labels[i] for i in rows])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self._order = self._epoch_order(self.epoch)


def classification_loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """``fit``'s loss function: mean cross-entropy of the pooled logits over the batch's labelled rows."""
    idx, mask, labels = batch
    logits = model(idx, mask)  # (B, num_classes)
    n = (labels != IGNORE_INDEX).sum()
    loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss / n.clamp_min(1), n


def encode_texts(tok: Tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of each text, truncated to the first ``max_length`` tokens.

    Special-token strings inside a message (``<|endoftext|>`` typed by a user) are encoded as plain text.
    """
    ids = [tok.encode(t, allow_special=False)[:max_length] for t in texts]
    for i, s in enumerate(ids):
        if not s:
            raise LLMCoreError(f"text {i}: encodes to no tokens")
    return ids


# ---------------------------------------------------------------------------------------------------
# Spam data: balance, split
# ---------------------------------------------------------------------------------------------------


def balance_classes(df: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Undersample every label to the rarest label's count (ham down to the 747 spam), seeded."""
    counts = df["label"].value_counts()
    n = int(counts.min())
    parts = [df[df["label"] == label].sample(n=n, random_state=seed) for label in sorted(counts.index)]
    return pd.concat(parts).sort_index()  # file order; split() shuffles


def split_table(
    df: pd.DataFrame, fractions: Sequence[float], seed: int
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Shuffle (seeded) and cut into train/val/test by ``fractions`` (the book: 0.7, 0.1, 0.2).

    Train and val get ``floor(fraction · n)`` rows, test the rest, as in the book's ``random_split``.
    """
    shuffled = df.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    n_train = int(len(shuffled) * fractions[0])
    n_val = int(len(shuffled) * fractions[1])
    return (
        shuffled[:n_train].reset_index(drop=True),
        shuffled[n_train : n_train + n_val].reset_index(drop=True),
        shuffled[n_train + n_val :].reset_index(drop=True),
    )


def label_ids(labels: Sequence[str], names: Sequence[str] = LABELS) -> list[int]:
    index = {name: i for i, name in enumerate(names)}
    return [index[label] for label in labels]


# ---------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------


def confusion_matrix(actual: Sequence[int], predicted: Sequence[int], num_classes: int) -> list[list[int]]:
    """``m[a][p]`` = number of rows of actual class ``a`` predicted as ``p``."""
    m = [[0] * num_classes for _ in range(num_classes)]
    for a, p in zip(actual, predicted, strict=True):
        m[a][p] += 1
    return m


def classification_metrics(actual: Sequence[int], predicted: Sequence[int], positive: int = 1) -> dict[str, float]:
    """Accuracy, and precision/recall/F1 of the ``positive`` class (0.0 where undefined, as sklearn)."""
    pairs = list(zip(actual, predicted, strict=True))
    tp = sum(a == positive and p == positive for a, p in pairs)
    fp = sum(a != positive and p == positive for a, p in pairs)
    fn = sum(a == positive and p != positive for a, p in pairs)
    correct = sum(a == p for a, p in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": correct / len(pairs) if pairs else math.nan,
        "precision": precision,
        "recall": recall,
        "f1": f1,
    }


# ---------------------------------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------------------------------


def save_classifier(
    out_dir: str | os.PathLike,
    model: GPTClassifier,
    tok: Tokenizer,
    labels: Sequence[str],
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write the model folder ``out_dir``: ``model.safetensors`` (base GPT + ``cls_head.*``, format in the
    module docstring) and ``tokenizer.json``. Built in a temporary sibling folder and renamed into place,
    so a failure leaves the previous folder (or none), never half of one. LoRA layers must be merged first.
    """
    if len(labels) != model.head.out_features:
        raise ValueError(f"{len(labels)} labels for a {model.head.out_features}-way head")
    state = model_state(model.gpt)
    if any(".lora_" in k or ".base." in k for k in state):
        raise ValueError("merge the LoRA layers (llmcore.lora.merge_lora) before saving")
    for name, tensor in model.head.state_dict().items():
        state[HEAD_PREFIX + name] = tensor.detach().contiguous()
    meta = {
        "format": FORMAT, "config": model.cfg.to_json(), "task": "classify",
        "labels": json.dumps(list(labels)), "pooling": POOLING, **(metadata or {}),
    }  # fmt: skip
    with staged_dir(out_dir) as tmp:
        write_weights(tmp / "model.safetensors", state, meta)
        tok.save(tmp / "tokenizer.json")
    return Path(out_dir)


def load_classifier(model_dir: str | os.PathLike, device="cpu") -> tuple[GPTClassifier, Tokenizer, list[str]]:
    """Load a folder written by ``save_classifier`` -> (model in eval mode, tokenizer, label names)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise LLMCoreError(f"{model_dir}: no such model folder (did the classify stage run?)")
    path = model_dir / "model.safetensors"
    meta = read_metadata(path)
    if meta.get("task") != "classify":
        raise LLMCoreError(f"{path}: not a classifier checkpoint (metadata task={meta.get('task')!r})")
    if meta.get("pooling") != POOLING:
        raise LLMCoreError(f"{path}: unsupported pooling {meta.get('pooling')!r} (expected {POOLING})")
    try:
        labels = json.loads(meta.get("labels", ""))
    except json.JSONDecodeError:
        labels = None
    if not (isinstance(labels, list) and labels and all(isinstance(x, str) for x in labels)):
        raise LLMCoreError(f"{path}: metadata 'labels' must be a JSON list of names, got {meta.get('labels')!r}")
    cfg = read_config(path)
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_state(path, device).items()}
    head = {k[len(HEAD_PREFIX) :]: state.pop(k) for k in list(state) if k.startswith(HEAD_PREFIX)}
    with torch.device(device):
        model = GPTClassifier(GPT(cfg), num_classes=len(labels))
    load_into(model.gpt, state, path)
    expected = {k: tuple(v.shape) for k, v in model.head.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in head.items()}
    if got != expected:
        raise LLMCoreError(f"{path}: classification head {got} does not match {len(labels)} labels {expected}")
    model.head.load_state_dict(head)
    tok = Tokenizer.load(model_dir / "tokenizer.json")
    if tok.vocab_size > cfg.vocab_size:
        raise LLMCoreError(f"{model_dir}: tokenizer has {tok.vocab_size} ids, model only {cfg.vocab_size}")
    model.eval()
    return model, tok, labels
