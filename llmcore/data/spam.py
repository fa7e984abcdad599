"""The spam-classification data: class balancing, the seeded split, encoding, and resumable epoch batches."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from llmcore.common import LLMCoreError
from llmcore.data.batches import EpochOrder
from llmcore.models.classifier import LABELS, right_pad
from llmcore.models.ops import IGNORE_INDEX
from llmcore.text.tokenizer import Tokenizer


class ClassificationBatches:
    """Right-padded ``(idx, attention_mask, labels)`` batches over token lists; the ``Batches`` protocol of
    ``llmcore.training.loop.fit`` (``next_batch()``, ``len()`` = batches per epoch, ``state_dict()``).

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
        self.seqs, self.labels, self.pad_id = [list(s) for s in seqs], list(labels), pad_id
        self.order = EpochOrder(
            len(self.seqs), batch_size, seed=seed, shuffle=shuffle, rank=rank, world_size=world_size
        )

    def __len__(self) -> int:
        return len(self.order)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(idx, attention_mask, labels): (B, T), (B, T), (B,) int64, on the CPU."""
        rows = self.order.next_rows()
        if not rows:
            idx, mask = right_pad(self.seqs[:1], self.pad_id)
            return idx, mask, torch.full((1,), IGNORE_INDEX)
        idx, mask = right_pad([self.seqs[i] for i in rows], self.pad_id)
        return idx, mask, torch.tensor([self.labels[i] for i in rows])

    def state_dict(self) -> dict:
        return self.order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)


def encode_texts(tok: Tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of each text, truncated to the first ``max_length`` tokens.

    Special-token strings inside a message (``<|endoftext|>`` typed by a user) are encoded as plain text.
    """
    ids = [tok.encode(t, allow_special=False)[:max_length] for t in texts]
    for i, s in enumerate(ids):
        if not s:
            raise LLMCoreError(f"text {i}: encodes to no tokens")
    return ids


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
