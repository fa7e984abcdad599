"""Epoch-ordered batches over a list of examples: the order, rank slicing and resumable position that every
fine-tune's data stream shares (``fit``'s ``Batches`` protocol is built on it).

Training (``shuffle=True``): a fresh order each epoch drawn from ``(seed, epoch)``, so a resumed run sees the
same batches; the ragged tail of an epoch is dropped, so every batch is full. Evaluation (``shuffle=False``):
every example once per epoch, in order. With ``lengths`` each shuffled window of 32 global batches is sorted
by length before it is cut (then the batches are shuffled): rows of similar length pad less.

Data parallel: every rank draws the same global batch of ``batch_size * world_size`` rows and keeps its own
slice; a rank left without rows in a short last evaluation batch gets none, and the caller builds a stand-in
row labelled ``IGNORE_INDEX`` (scored by nothing, weight 0).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from llmcore.common import LLMCoreError


class EpochOrder:
    """Which example indices make up this rank's next batch; ``state_dict`` is the exact position."""

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        lengths: Sequence[int] | None = None,
        rank: int = 0,
        world_size: int = 1,
        where: str = "",
    ):
        prefix = f"{where}: " if where else ""
        if batch_size < 1:
            raise LLMCoreError(f"{prefix}batch_size must be positive, got {batch_size}")
        if not n:
            raise LLMCoreError(f"{prefix}no examples to batch")
        if shuffle and n < batch_size * world_size:  # training batches are always full
            raise LLMCoreError(
                f"{prefix}{n} training examples are fewer than one batch of {batch_size * world_size}; "
                "lower train.batch_size"
            )
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.seed, self.shuffle, self.lengths = seed, shuffle, lengths
        self.epoch, self.batch = 0, 0  # batch: the next one within the epoch
        self._order = self._epoch_order(0)

    def __len__(self) -> int:
        G = self.batch_size * self.world_size
        return self.n // G if self.shuffle else math.ceil(self.n / G)

    def _epoch_order(self, epoch: int) -> list[list[int]]:
        """The global batches of ``epoch``, as lists of example indices."""
        G = self.batch_size * self.world_size
        order = list(range(self.n))
        if self.shuffle:
            rng = random.Random(self.seed * 100_003 + epoch)  # a fixed order per (seed, epoch): resumable
            rng.shuffle(order)
            if self.lengths is not None:
                window, by_length = G * 32, self.lengths.__getitem__
                order = [i for w in range(0, len(order), window) for i in sorted(order[w : w + window], key=by_length)]
        batches = [order[i * G : (i + 1) * G] for i in range(len(self))]
        if self.shuffle and self.lengths is not None:
            rng.shuffle(batches)
        return batches

    def next_rows(self) -> list[int]:
        """This rank's example indices of the next batch (empty: a short last evaluation batch left none)."""
        if self.batch >= len(self._order):
            self.epoch, self.batch = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)
        rows = self._order[self.batch][self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        self.batch += 1
        return rows

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self._order = self._epoch_order(self.epoch)
