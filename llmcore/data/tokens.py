"""Token batches for language-model training: random or strided windows over memory-mapped token files.

The tokenize stage writes ``train.bin`` / ``val.bin`` (flat token ids, dtype named in ``meta.json``);
``load_tokens`` maps them without reading them into memory. Two samplers turn a token stream into (x, y)
batches of next-token prediction, (B, T) int64 each, ``y`` being ``x`` shifted left by one:

    RandomWindows      nanoGPT's ``get_batch``: B windows at uniformly random offsets, drawn from a seeded
                       ``torch.Generator``. An "epoch" is nominal: as many tokens as the stream holds.
    SequentialWindows  the book's ``GPTDatasetV1``: a window every ``stride`` tokens, visited in a seeded
                       random order that changes each epoch (``shuffle=False``: in order, for evaluation).

Both implement the ``Batches`` protocol that ``llmcore.training.loop.fit`` consumes (see there): ``next_batch()``,
``len()`` = batches per epoch, and ``state_dict()`` / ``load_state_dict()`` holding the exact position in
the stream, so a resumed run draws exactly the batches the uninterrupted one would have.

Data parallel: every rank builds its sampler with the same seed, draws the *global* batch
(``batch_size * world_size`` windows) and keeps its own slice of ``batch_size``. The ranks' batches put
together are exactly what one process with the global batch draws, and the sampler state is the same on
every rank (rank 0's checkpoint serves them all).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmcore.common import LLMCoreError, read_json

TOKEN_DTYPES = ("uint16", "uint32")


def read_meta(tokens_dir: str | os.PathLike) -> dict[str, Any]:
    """``meta.json`` of a tokens folder; needs at least ``dtype`` and ``vocab_size``."""
    path = Path(tokens_dir) / "meta.json"
    meta = read_json(path, "did the tokenize stage run?")
    if not isinstance(meta, dict):
        raise LLMCoreError(f"{path}: expected a JSON object")
    if meta.get("dtype") not in TOKEN_DTYPES:
        raise LLMCoreError(f"{path}: dtype: expected one of {'|'.join(TOKEN_DTYPES)}, got {meta.get('dtype')!r}")
    vocab = meta.get("vocab_size")
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab <= 0:
        raise LLMCoreError(f"{path}: vocab_size: expected a positive int, got {vocab!r}")
    return meta


def load_tokens(tokens_dir: str | os.PathLike, split: str, meta: dict[str, Any] | None = None) -> np.ndarray:
    """Memory-map ``<tokens_dir>/<split>.bin`` (read-only) with the dtype from ``meta.json``."""
    meta = meta or read_meta(tokens_dir)
    path = Path(tokens_dir) / f"{split}.bin"
    if not path.is_file():
        raise LLMCoreError(f"{path}: not found (did the tokenize stage run?)")
    dtype = np.dtype(meta["dtype"])
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise LLMCoreError(f"{path}: {size} bytes is not a whole number of {dtype.name} tokens (truncated?)")
    if size == 0:
        raise LLMCoreError(f"{path}: empty token file")
    return np.memmap(path, dtype=dtype, mode="r")


def _windows(tokens: np.ndarray, starts: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) for windows beginning at ``starts``: x = tokens[s : s+T], y = tokens[s+1 : s+T+1]."""
    buf = np.stack([tokens[s : s + T + 1] for s in starts.tolist()]).astype(np.int64)  # (B, T+1)
    buf = torch.from_numpy(buf)
    return buf[:, :-1].contiguous(), buf[:, 1:].contiguous()


def _check(tokens: np.ndarray, batch_size: int, context_length: int, rank: int, world_size: int) -> None:
    if batch_size < 1 or context_length < 1:
        raise LLMCoreError(f"batch_size and context_length must be positive, got {batch_size}, {context_length}")
    if not 0 <= rank < world_size:
        raise LLMCoreError(f"rank {rank} is outside world_size {world_size}")
    if len(tokens) < context_length + 1:
        raise LLMCoreError(f"{len(tokens)} tokens are too few for one window of context_length {context_length} + 1")


class RandomWindows:
    """Windows of ``context_length`` tokens at random offsets (with replacement), reproducible from ``seed``.

    Args:
        tokens: the token stream (a memmap from ``load_tokens`` or any 1-D integer array).
        batch_size: windows per batch on this rank.
        context_length: T, tokens per window.
        seed: seeds the generator; the same on every rank.
        rank, world_size: this process's slice of the global batch.
    """

    def __init__(
        self, tokens: np.ndarray, batch_size: int, context_length: int, *, seed: int, rank: int = 0,
        world_size: int = 1,
    ) -> None:  # fmt: skip
        _check(tokens, batch_size, context_length, rank, world_size)
        self.tokens, self.batch_size, self.T = tokens, batch_size, context_length
        self.rank, self.world_size = rank, world_size
        self.n_starts = len(tokens) - context_length  # window s needs tokens[s : s+T+1]
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        """Batches per nominal epoch: as many as cover the stream's tokens once (at least 1)."""
        return max(1, (len(self.tokens) - 1) // (self.batch_size * self.world_size * self.T))

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        B = self.batch_size
        starts = torch.randint(self.n_starts, (B * self.world_size,), generator=self.generator)
        return _windows(self.tokens, starts[self.rank * B : (self.rank + 1) * B], self.T)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


class SequentialWindows:
    """Windows starting every ``stride`` tokens (the book's ``GPTDatasetV1``), one pass per epoch.

    Each epoch visits the windows in a fresh random order drawn from a seeded generator (or in order with
    ``shuffle=False``); the last ``n_windows % global_batch`` windows of an epoch's order are dropped so
    every batch is full. ``stride = context_length`` gives non-overlapping windows; smaller overlaps them.
    """

    def __init__(
        self, tokens: np.ndarray, batch_size: int, context_length: int, *, stride: int | None = None,
        seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1,
    ) -> None:  # fmt: skip
        _check(tokens, batch_size, context_length, rank, world_size)
        self.stride = stride or context_length
        if self.stride < 1:
            raise LLMCoreError(f"stride must be positive, got {self.stride}")
        self.tokens, self.batch_size, self.T = tokens, batch_size, context_length
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.n_windows = (len(tokens) - context_length - 1) // self.stride + 1
        if self.n_windows < batch_size * world_size:
            raise LLMCoreError(
                f"{self.n_windows} windows (stride {self.stride}) are fewer than one global batch of "
                f"{batch_size * world_size}; lower batch_size or stride"
            )
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch, self.batch = 0, 0
        self._new_epoch_order()

    def _new_epoch_order(self) -> None:
        # Remember the generator as it was before drawing this epoch's order: that is the whole state.
        self._epoch_start = self.generator.get_state()
        if self.shuffle:
            self.order = torch.randperm(self.n_windows, generator=self.generator)
        else:
            self.order = torch.arange(self.n_windows)

    def __len__(self) -> int:
        return self.n_windows // (self.batch_size * self.world_size)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.batch == len(self):
            self.epoch, self.batch = self.epoch + 1, 0
            self._new_epoch_order()
        B, G = self.batch_size, self.batch_size * self.world_size
        first = self.batch * G + self.rank * B
        self.batch += 1
        return _windows(self.tokens, self.order[first : first + B] * self.stride, self.T)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.batch, "generator": self._epoch_start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self._new_epoch_order()
        self.epoch, self.batch = state["epoch"], state["batch"]
