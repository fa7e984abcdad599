"""Streaming tokenization: documents in, fixed-size token shards and a manifest out, resumable per shard.

The tokenize stage turns a corpus of any size into what ``llmcore.data.tokens.load_tokens`` maps::

    <out>/train_000000.bin, train_000001.bin, ...   token ids, uint16 (vocab <= 65536) or uint32, flat
    <out>/val_000000.bin, ...
    <out>/meta.json                                  the manifest (format below)

Each split is one token stream: every document's tokens, an end-of-text token *between* documents (the
first document of a split has none before it, so a one-document corpus such as TinyShakespeare gives exactly
its own tokens). The stream is cut into shards of ``shard_tokens`` tokens (the last one shorter); a
document may continue in the next shard, and the loader reads across the cut.

How (nanoGPT's ``prepare.py`` and nanochat's ``tok_train``/dataloader, made streaming and resumable):

- Documents are read in batches of ``batch_rows`` (``llmcore.data.parquet.iter_documents`` for parquet: one
  row group's column at a time), encoded by a pool of ``workers`` processes (in this process when 1), and
  collected *in order*; at most ``2 * workers`` batches are in flight, so memory is bounded by a few
  batches of text, whatever the corpus size. Tokens stream into the open shard's temporary file.
- A shard is written under a temporary name and renamed only once complete (and fsynced), so a shard file
  under its final name is always whole. Work happens in ``work`` (``.cache/tokenize`` in the stage;
  DVC deletes a stage's outputs before it runs, so they cannot hold a resumable state), with a
  ``progress.json`` that lists the finished shards, each with the stream position where the next one
  starts: (source index, row, token offset inside that row's document). A killed run, rerun with the same
  inputs and tokenizer (the ``fingerprint``), keeps the finished shards (after checking their size and
  sha256), deletes temporary leftovers and redoes only the partial shard. At the end the shards move into
  ``out`` and ``meta.json`` is written last.

Manifest (``meta.json``)::

    {"format": "llmcore-tokens", "version": 2, "dtype": "uint16", "vocab_size": 1024, "eot_id": 1023,
     "shard_tokens": 100000000, "train_tokens": ..., "val_tokens": ..., "documents": {"train": .., "val": ..},
     "bytes": {"train": .., "val": ..},                # UTF-8 bytes of the documents' text
     "splits": {"train": [{"file": "train_000000.bin", "tokens": 100000000, "documents": 91234,
                           "bytes": 401234567, "sha256": "..."}, ...], "val": [...]},
     ... whatever the caller adds (tokenizer kind, corpus, source files)}

A document (and its bytes) counts in the shard that holds its last token; an empty first document, which holds
no token, counts in the split's first shard.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from llmcore.common import LLMCoreError, current_umask, read_json, sha256_file, write_json_atomic
from llmcore.text.tokenizer import Tokenizer

FORMAT = "llmcore-tokens"
VERSION = 2
PROGRESS = "progress.json"
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


@dataclass
class Source:
    """One input of a split, read as rows = documents: a parquet file, or a text held in memory (one row)."""

    name: str  # shown in errors and progress; the file path for parquet
    path: Path | None = None  # a parquet file
    text: str | None = None  # or one document in memory
    column: str = "text"

    def rows(self) -> int:
        if self.text is not None:
            return 1
        from llmcore.data.parquet import parquet_info

        return parquet_info(self.path, self.column).rows

    def batches(self, start_row: int, batch_rows: int) -> Iterator[list[str]]:
        if self.text is not None:
            if start_row == 0:
                yield [self.text]
            return
        from llmcore.data.parquet import iter_documents

        yield from iter_documents(self.path, self.column, batch_rows, start_row)


# ---------------------------------------------------------------------------------------------------
# Encoding (in worker processes, or in this one)
# ---------------------------------------------------------------------------------------------------

_worker: dict[str, Any] = {}


def _init_worker(tokenizer: dict, dtype: str) -> None:
    _worker["tok"] = Tokenizer.from_dict(tokenizer)
    _worker["dtype"] = np.dtype(dtype)


def encode_documents(tok: Tokenizer, texts: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, lengths, utf8_bytes): each document as ``[eot] + its tokens``, concatenated; the other two per document.

    Special-token strings inside a document are encoded as plain text: a web page that quotes
    ``<|endoftext|>`` must not end the document.
    """
    eot = tok.eot_id
    flat: list[int] = []
    lengths = np.empty(len(texts), dtype=np.int64)
    n_bytes = np.empty(len(texts), dtype=np.int64)
    for i, text in enumerate(texts):  # one thread per process: workers scale, not tiktoken's thread pool
        ids = tok.encode(text, allow_special=False)
        flat.append(eot)
        flat.extend(ids)
        lengths[i] = len(ids) + 1
        n_bytes[i] = len(text.encode("utf-8"))
    return np.asarray(flat, dtype=dtype), lengths, n_bytes


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return encode_documents(_worker["tok"], texts, _worker["dtype"])


# ---------------------------------------------------------------------------------------------------
# Writing shards
# ---------------------------------------------------------------------------------------------------


class _OpenShard:
    """The shard being filled: a temporary file beside its final name, hashed as it is written."""

    def __init__(self, work: Path, split: str, index: int, dtype: np.dtype):
        self.name = shard_name(split, index)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.name}.", suffix=".tmp", dir=work)
        self.file, self.tmp, self.final = os.fdopen(fd, "wb"), Path(tmp), work / self.name
        self.hash, self.tokens, self.documents, self.bytes, self.dtype = hashlib.sha256(), 0, 0, 0, dtype

    def write(self, ids: np.ndarray) -> None:
        data = np.ascontiguousarray(ids, dtype=self.dtype).view(np.uint8)
        self.file.write(data)
        self.hash.update(data)
        self.tokens += len(ids)

    def close(self, end: list[int]) -> dict[str, Any]:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.chmod(self.tmp, 0o666 & ~current_umask())
        os.replace(self.tmp, self.final)
        return {
            "file": self.name,
            "tokens": self.tokens,
            "documents": self.documents,
            "bytes": self.bytes,
            "sha256": self.hash.hexdigest(),
            "end": end,
        }

    def discard(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


class _Progress:
    """``progress.json`` in the work folder: the fingerprint and, per split, finished shards and ``done``."""

    def __init__(self, work: Path, fingerprint: Any):
        self.path = work / PROGRESS
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
        self.splits: dict[str, dict[str, Any]] = {}

    def save(self) -> None:
        write_json_atomic(self.path, {"fingerprint": self.fingerprint, "splits": self.splits})


def _restore(work: Path, fingerprint: Any, dtype: np.dtype, log: Callable[[str], None]) -> _Progress:
    """Load a matching ``progress.json`` and keep every finished shard that verifies; clear the rest."""
    progress = _Progress(work, fingerprint)
    old = read_json(progress.path) if progress.path.is_file() else None
    if isinstance(old, dict) and old.get("fingerprint") == progress.fingerprint:
        for split, state in old.get("splits", {}).items():
            kept = []
            for shard in state.get("shards", []):
                path = work / shard["file"]
                ok = (
                    path.is_file()
                    and path.stat().st_size == shard["tokens"] * dtype.itemsize
                    and sha256_file(path) == shard["sha256"]
                )
                if not ok:
                    log(f"{path}: missing or not as recorded; redoing it and what follows")
                    break
                kept.append(shard)
            complete = state.get("done", False) and len(kept) == len(state.get("shards", []))
            progress.splits[split] = {"shards": kept, "done": complete}
        n = sum(len(s["shards"]) for s in progress.splits.values())
        if n:
            log(f"resuming tokenization in {work}: {n} finished shard(s) kept")
    elif old is not None:
        log(f"{progress.path}: made from other inputs or another tokenizer; starting over")
    keep = {s["file"] for state in progress.splits.values() for s in state["shards"]}
    for path in work.iterdir():
        if path.is_file() and (path.name.endswith(".tmp") or (path.suffix == ".bin" and path.name not in keep)):
            path.unlink()  # a partial shard of a killed run, or shards of other inputs
    progress.save()
    return progress


def _batches(sources: list[Source], start: list[int], batch_rows: int) -> Iterator[tuple[int, int, list[str]]]:
    """(source index, first row, texts) from stream position ``start`` = [source, row, offset] on."""
    src0, row0 = start[0], start[1]
    for s in range(src0, len(sources)):
        row = row0 if s == src0 else 0
        for texts in sources[s].batches(row, batch_rows):
            yield s, row, texts
            row += len(texts)


def write_split(
    split: str,
    sources: list[Source],
    tok: Tokenizer,
    work: Path,
    progress: _Progress,
    *,
    shard_tokens: int,
    workers: int,
    batch_rows: int,
    bar: tqdm,
) -> None:
    """Tokenize one split into shards in ``work``, continuing from what ``progress`` holds."""
    dtype = token_dtype(tok.vocab_size)
    state = progress.splits.setdefault(split, {"shards": [], "done": False})
    if state["done"]:
        return
    # The stream starts inside document 0, after its end-of-text token: none before the first document.
    start = state["shards"][-1]["end"] if state["shards"] else [0, 0, 1]
    skip = start[2]
    shard = _OpenShard(work, split, len(state["shards"]), dtype)
    counters = {"tokens": 0, "docs": 0, "t0": time.perf_counter()}

    def consume(src: int, row: int, n_docs: int, ids: np.ndarray, lengths: np.ndarray, n_bytes: np.ndarray) -> None:
        nonlocal shard, skip
        first_skip = skip
        if skip:
            if lengths[0] < skip:
                raise LLMCoreError(
                    f"{sources[src].name}: row {row} has {lengths[0]} tokens but {work / PROGRESS} "
                    f"resumes at token {skip} of it (changed input?)"
                )
            ids, lengths = ids[skip:], lengths.copy()
            lengths[0] -= skip
            skip = 0
        ends = np.cumsum(lengths)  # where each document's tokens end in ``ids``
        bytes_before = np.concatenate([[0], np.cumsum(n_bytes)])
        # A split's empty first document has no token left (not even an end-of-text): it ends at 0, before
        # any token the loop below sees, so it counts in the open shard here.
        empty = int(np.searchsorted(ends, 0, "right"))
        shard.documents += empty
        shard.bytes += int(bytes_before[empty])
        cursor = 0
        while cursor < len(ids):
            take = min(len(ids) - cursor, shard_tokens - shard.tokens)
            shard.write(ids[cursor : cursor + take])
            first, last = np.searchsorted(ends, [cursor, cursor + take], "right")  # documents ending in here
            shard.documents += int(last - first)
            shard.bytes += int(bytes_before[last] - bytes_before[first])
            cursor += take
            if shard.tokens == shard_tokens:  # full: the next shard starts at ``cursor``
                j = int(np.searchsorted(ends, cursor, "right"))  # the document holding token ``cursor``
                offset = cursor - (int(ends[j - 1]) if j else 0) + (first_skip if j == 0 else 0)
                end = [src, row + j, offset] if j < n_docs else [src, row + n_docs, 0]
                state["shards"].append(shard.close(end))
                progress.save()
                shard = _OpenShard(work, split, len(state["shards"]), dtype)
        counters["tokens"] += len(ids)
        counters["docs"] += n_docs
        bar.update(n_docs)
        elapsed = max(time.perf_counter() - counters["t0"], 1e-9)
        bar.set_postfix_str(f"{split}, {counters['tokens'] / elapsed / 1e6:.2f}M tokens/s", refresh=False)

    try:
        batches = _batches(sources, start, batch_rows)
        if workers <= 1:
            for src, row, texts in batches:
                consume(src, row, len(texts), *encode_documents(tok, texts, dtype))
        else:
            ctx = mp.get_context("spawn")  # fork would copy this process (and its threads) into each worker
            with ctx.Pool(workers, initializer=_init_worker, initargs=(tok.to_dict(), dtype.name)) as pool:
                pending: deque = deque()
                for src, row, texts in batches:
                    pending.append((src, row, len(texts), pool.apply_async(_encode_in_worker, (texts,))))
                    if len(pending) >= 2 * workers:  # bounded: never more than this many batches in memory
                        src_, row_, n_, result = pending.popleft()
                        consume(src_, row_, n_, *result.get())
                while pending:
                    src_, row_, n_, result = pending.popleft()
                    consume(src_, row_, n_, *result.get())
        if shard.tokens:
            state["shards"].append(shard.close([len(sources), 0, 0]))
        else:
            shard.discard()
    except BaseException:
        shard.discard()
        raise
    if not state["shards"]:
        raise LLMCoreError(f"split {split!r}: the corpus gave no tokens ({', '.join(s.name for s in sources)})")
    state["done"] = True
    progress.save()


def tokenize_to_shards(
    splits: dict[str, list[Source]],
    tok: Tokenizer,
    out: str | os.PathLike,
    work: str | os.PathLike,
    *,
    shard_tokens: int = 100_000_000,
    workers: int = 1,
    batch_rows: int = 1024,
    fingerprint: Any = None,
    extra_meta: dict[str, Any] | None = None,
    progress_bar: bool | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Tokenize every split into shards in ``out`` and write its manifest ``meta.json``; returns the manifest.

    Args:
        splits: split name -> its sources in order (``train`` and ``val``).
        tok: the tokenizer (must be picklable as ``to_dict``: any ``Tokenizer``).
        out: the tokens folder; its old ``*.bin`` and ``meta.json`` are replaced.
        work: where shards are built and ``progress.json`` lives; a rerun with the same ``fingerprint``
            and tokenizer resumes there.
        shard_tokens: tokens per shard (the last shard of a split is shorter).
        workers: encoding processes; 1 encodes in this process.
        batch_rows: documents per batch handed to a worker.
        fingerprint: JSON-able description of the inputs (files, sizes, params); with the tokenizer it
            decides whether ``work`` holds a resumable run.
        extra_meta: added to the manifest (tokenizer kind, corpus name, ...).
        progress_bar: show a tqdm bar (documents, ETA, tokens/s); default: when stderr is a terminal.
    """
    if shard_tokens < 1 or workers < 1 or batch_rows < 1:
        raise LLMCoreError(
            f"shard_tokens, workers and batch_rows must be positive, got {shard_tokens}, {workers}, {batch_rows}"
        )
    out, work = Path(out), Path(work)
    work.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tok.vocab_size)
    tok_hash = hashlib.sha256(json.dumps(tok.to_dict(), sort_keys=True).encode()).hexdigest()
    fp = {
        "inputs": fingerprint,
        "tokenizer": tok_hash,
        "shard_tokens": shard_tokens,
        "dtype": dtype.name,
        "splits": {k: [s.name for s in v] for k, v in splits.items()},
    }
    progress = _restore(work, fp, dtype, log)
    total_docs = sum(s.rows() for sources in splits.values() for s in sources)  # parquet footers only
    show = sys.stderr.isatty() if progress_bar is None else progress_bar
    with tqdm(total=total_docs, unit="doc", desc="tokenize", disable=not show, dynamic_ncols=True) as bar:
        for split, sources in splits.items():
            write_split(
                split,
                sources,
                tok,
                work,
                progress,
                shard_tokens=shard_tokens,
                workers=workers,
                batch_rows=batch_rows,
                bar=bar,
            )

    # Publish: shards into ``out`` (a rename on the same file system), the manifest last.
    out.mkdir(parents=True, exist_ok=True)
    entries = {
        split: [{k: v for k, v in s.items() if k != "end"} for s in progress.splits[split]["shards"]]
        for split in splits
    }
    names = {e["file"] for shards in entries.values() for e in shards}
    for path in out.glob("*.bin"):
        if path.name not in names:
            path.unlink()
    for name in sorted(names):
        shutil.move(work / name, out / name)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": dtype.name,
        "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id,
        **(extra_meta or {}),
        "shard_tokens": shard_tokens,
        **{f"{split}_tokens": sum(e["tokens"] for e in shards) for split, shards in entries.items()},
        "documents": {split: sum(e["documents"] for e in shards) for split, shards in entries.items()},
        "bytes": {split: sum(e["bytes"] for e in shards) for split, shards in entries.items()},
        "splits": entries,
    }
    write_json_atomic(out / "meta.json", meta)
    progress.path.unlink(missing_ok=True)
    return meta
