"""Documents from parquet shards (FineWeb-Edu, ClimbMix, any parquet file with a text column), streamed.

A pretraining corpus on the Hugging Face Hub is a folder of parquet files, one document per row:
FineWeb-Edu's ``sample/10BT/000_00000.parquet`` ... (~2 GB, ~1M documents each), nanochat's ClimbMix
``shard_00000.parquet`` .... Reading one into memory whole would make the tokenizer's memory grow with the
corpus; :func:`iter_documents` reads only the text column, one row group (the file's unit of compression,
~100k-1M rows) at a time, decoded in batches of at most ``batch_rows`` strings, so memory stays near
one batch of text whatever the file size.

    for docs in iter_documents("000_00000.parquet", column="text", batch_rows=1024):
        ...                                     # a list of str, in file order

Bad input stops with the file named: not a parquet file (or a truncated one), no such column, a column
that is not text. ``pyarrow`` is imported on first use (the ``data`` extra), so the rest of the package
works without it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llmcore.common import LLMCoreError


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - the data extra is part of `make venv`
        raise LLMCoreError("reading parquet corpora needs pyarrow: pip install -e '.[data]'") from None
    return pa, pq


@dataclass(frozen=True)
class ParquetInfo:
    path: Path
    rows: int
    row_groups: int


def open_parquet(path: str | os.PathLike, column: str = "text"):
    """Open ``path`` as a ``pyarrow.parquet.ParquetFile`` after checking it has a string ``column``."""
    pa, pq = _pyarrow()
    path = Path(path)
    try:
        pf = pq.ParquetFile(path)
    except FileNotFoundError:
        raise LLMCoreError(f"{path}: no such file") from None
    except (pa.ArrowException, OSError) as e:
        raise LLMCoreError(f"{path}: not a readable parquet file ({_first_line(e)})") from None
    schema = pf.schema_arrow
    if column not in schema.names:
        raise LLMCoreError(f"{path}: no column {column!r} (columns: {', '.join(schema.names)})")
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise LLMCoreError(f"{path}: column {column!r} is {kind}, expected text (string)")
    return pf


def parquet_info(path: str | os.PathLike, column: str = "text") -> ParquetInfo:
    """Row and row-group counts from the footer (nothing else is read); checks the column like ``open_parquet``."""
    pf = open_parquet(path, column)
    return ParquetInfo(Path(path), pf.metadata.num_rows, pf.metadata.num_row_groups)


def iter_documents(
    path: str | os.PathLike, column: str = "text", batch_rows: int = 1024, start_row: int = 0
) -> Iterator[list[str]]:
    """Yield the ``column`` of ``path`` as lists of at most ``batch_rows`` strings, in row order.

    Args:
        path: a parquet file.
        column: the text column (``text`` for FineWeb-Edu and ClimbMix).
        batch_rows: documents per yielded list.
        start_row: skip the rows before this one (resuming); whole row groups before it are not read.

    Null values become empty documents, so row numbers stay those of the file.

    Raises:
        LLMCoreError: naming the file, for a file that is not parquet, lacks the column, or is corrupt
            (a bad page is found when its row group is read, so this can come after earlier batches).
    """
    pa, _ = _pyarrow()
    pf = open_parquet(path, column)
    meta = pf.metadata
    groups, skip, row = [], 0, 0
    for group in range(meta.num_row_groups):  # row groups wholly before start_row are never read
        n = meta.row_group(group).num_rows
        if row + n > start_row:
            if not groups:
                skip = max(0, start_row - row)
            groups.append(group)
        row += n
    if not groups:
        return
    # iter_batches decodes a row group's pages batch by batch: memory stays near one batch of text.
    batches = pf.iter_batches(batch_size=batch_rows, row_groups=groups, columns=[column], use_threads=False)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as e:
            raise LLMCoreError(f"{path}: corrupt or truncated data ({_first_line(e)})") from None
        texts = batch.column(0).to_pylist()
        if skip:
            texts, skip = texts[skip:], max(0, skip - len(texts))
        if texts:
            yield [t if t is not None else "" for t in texts]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
