"""Token batches for language-model training: random or strided windows over memory-mapped token shards.

The tokenize stage writes each split as shards of flat token ids (``train_000000.bin`` ...; format and
manifest in ``llmcore.data.shards``). ``load_tokens`` maps a split's shards without reading them into memory
and joins them into one :class:`TokenShards` stream that slices across shard boundaries; a folder with a
plain ``<split>.bin`` and a ``meta.json`` without shard list is the one-shard case of the same thing.
Two samplers turn a token stream into (x, y) batches of next-token prediction, (B, T) int64 each, ``y``
being ``x`` shifted left by one:

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

from llmcore.common import LLMCoreError, read_json, sha256_file

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


class TokenShards:
    """Several token files read as one stream: ``len()``, ``[i]`` and ``[a:b]`` across shard boundaries.

    Each shard is an ``np.memmap`` (pages are read on demand and live in the OS page cache, shared between
    processes), so a 10B-token corpus costs no memory up front.
    """

    def __init__(self, shards: list[np.ndarray], names: list[str] | None = None) -> None:
        if not shards:
            raise LLMCoreError("no token shards")
        self.shards, self.names = shards, names or [f"shard {i}" for i in range(len(shards))]
        self.offsets = np.cumsum([0] + [len(s) for s in shards])  # shard i holds [offsets[i], offsets[i+1])
        self.dtype = shards[0].dtype

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, key: int | slice) -> np.ndarray:
        n = len(self)
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step != 1:
                raise IndexError("TokenShards: slices with a step are not supported")
            if stop <= start:
                return np.empty(0, dtype=self.dtype)
            i = int(np.searchsorted(self.offsets, start, "right")) - 1
            pieces = []
            while start < stop:
                lo = start - int(self.offsets[i])
                hi = min(stop, int(self.offsets[i + 1])) - int(self.offsets[i])
                pieces.append(self.shards[i][lo:hi])
                start += hi - lo
                i += 1
            return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        index = int(key) + n if int(key) < 0 else int(key)
        if not 0 <= index < n:
            raise IndexError(f"token {key} is out of range for {n} tokens")
        i = int(np.searchsorted(self.offsets, index, "right")) - 1
        return self.shards[i][index - int(self.offsets[i])]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)


def shard_entries(tokens_dir: str | os.PathLike, split: str, meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The manifest's shard list of ``split``; for a folder without one, ``<split>.bin`` as the only shard."""
    splits = meta.get("splits")
    if splits is None:
        return [{"file": f"{split}.bin"}]
    path = Path(tokens_dir) / "meta.json"
    entries = splits.get(split) if isinstance(splits, dict) else None
    if not isinstance(entries, list) or not entries:
        raise LLMCoreError(f"{path}: splits.{split}: expected a non-empty list of shards")
    for i, e in enumerate(entries):
        ok = isinstance(e, dict) and isinstance(e.get("file"), str) and isinstance(e.get("tokens"), int)
        if not ok or "/" in e["file"] or e["file"].startswith("."):
            raise LLMCoreError(f"{path}: splits.{split}[{i}]: expected {{file, tokens, ...}} naming a file here")
    return entries


def load_tokens(
    tokens_dir: str | os.PathLike, split: str, meta: dict[str, Any] | None = None, *, verify: bool = False
) -> TokenShards:
    """Memory-map ``split``'s shards (read-only) with the dtype from ``meta.json``, as one stream.

    Every shard must exist and hold exactly the tokens the manifest records (checked from its size);
    with ``verify`` its sha256 is checked too (reads every byte). Errors name the file.
    """
    meta = meta or read_meta(tokens_dir)
    dtype = np.dtype(meta["dtype"])
    maps, names = [], []
    for entry in shard_entries(tokens_dir, split, meta):
        path = Path(tokens_dir) / entry["file"]
        if not path.is_file():
            raise LLMCoreError(f"{path}: not found (did the tokenize stage run?)")
        size = path.stat().st_size
        if size % dtype.itemsize:
            raise LLMCoreError(f"{path}: {size} bytes is not a whole number of {dtype.name} tokens (truncated?)")
        if size == 0:
            raise LLMCoreError(f"{path}: empty token file")
        if "tokens" in entry and size != entry["tokens"] * dtype.itemsize:
            raise LLMCoreError(f"{path}: holds {size // dtype.itemsize} tokens but meta.json says {entry['tokens']}")
        if verify and entry.get("sha256") and sha256_file(path) != entry["sha256"]:
            raise LLMCoreError(f"{path}: sha256 differs from meta.json (corrupt shard)")
        maps.append(np.memmap(path, dtype=dtype, mode="r"))
        names.append(str(path))
    return TokenShards(maps, names)


def _windows(
    tokens: TokenShards | np.ndarray, starts: torch.Tensor, T: int, pin_memory: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) for windows beginning at ``starts``: x = tokens[s : s+T], y = tokens[s+1 : s+T+1].

    ``pin_memory``: both are allocated in pinned (page-locked) host memory and filled there, so a
    ``.to("cuda", non_blocking=True)`` copies them asynchronously without another copy into a pinned buffer
    (torch's caching host allocator hands the same blocks back once their copies are done).
    """
    buf = np.stack([tokens[s : s + T + 1] for s in starts.tolist()])  # (B, T+1), the token dtype
    x = torch.empty((len(buf), T), dtype=torch.int64, pin_memory=pin_memory)
    y = torch.empty((len(buf), T), dtype=torch.int64, pin_memory=pin_memory)
    x.numpy()[:] = buf[:, :-1]  # widened to int64 in place: one copy per tensor
    y.numpy()[:] = buf[:, 1:]
    return x, y


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
        rank: this process's index; with ``world_size``, its slice of the global batch.
        world_size: the number of processes sharing the global batch.
        pin_memory: build batches in pinned host memory (for asynchronous copies to a CUDA device).
    """

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        context_length: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
    ) -> None:
        _check(tokens, batch_size, context_length, rank, world_size)
        self.tokens, self.batch_size, self.T = tokens, batch_size, context_length
        self.rank, self.world_size, self.pin_memory = rank, world_size, pin_memory
        self.n_starts = len(tokens) - context_length  # window s needs tokens[s : s+T+1]
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        """Batches per nominal epoch: as many as cover the stream's tokens once (at least 1)."""
        return max(1, (len(self.tokens) - 1) // (self.batch_size * self.world_size * self.T))

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        B = self.batch_size
        starts = torch.randint(self.n_starts, (B * self.world_size,), generator=self.generator)
        return _windows(self.tokens, starts[self.rank * B : (self.rank + 1) * B], self.T, self.pin_memory)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


class SequentialWindows:
    """Windows starting every ``stride`` tokens (the book's ``GPTDatasetV1``), one pass per epoch.

    Each epoch visits the windows in a fresh random order drawn from a seeded generator (or in order with
    ``shuffle=False``); the last ``n_windows % global_batch`` windows of an epoch's order are dropped so
    every batch is full. ``stride = context_length`` gives non-overlapping windows; smaller overlaps them.
    ``pin_memory`` as in :class:`RandomWindows`.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        context_length: int,
        *,
        stride: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
    ) -> None:
        _check(tokens, batch_size, context_length, rank, world_size)
        self.stride = stride or context_length
        if self.stride < 1:
            raise LLMCoreError(f"stride must be positive, got {self.stride}")
        self.tokens, self.batch_size, self.T = tokens, batch_size, context_length
        self.rank, self.world_size, self.shuffle, self.pin_memory = rank, world_size, shuffle, pin_memory
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
        return _windows(self.tokens, self.order[first : first + B] * self.stride, self.T, self.pin_memory)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.batch, "generator": self._epoch_start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self._new_epoch_order()
        self.epoch, self.batch = state["epoch"], state["batch"]
