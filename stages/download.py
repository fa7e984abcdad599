"""Stage `download`: fetch every dataset the pipeline uses, verify it, and check its content.

Sources are declared in params.yaml (``download.sources``): URL, optional sha256, optional zip members to
extract, and a content check. A sharded corpus (FineWeb-Edu's parquet files) is one source whose ``url`` is
a template with a ``{shard}`` field and ``shards: N`` fetches files 0..N-1, each resumable and verified.
Each lands in ``data/raw/<name>/``. Set ``LLMCORE_MIRROR`` to read them from
an offline mirror laid out as ``HOST/PATH`` (README: "Offline mirror").

Hostile input (README: "Hostile input"): a file name or folder that would land outside its folder of
``data/raw`` (``..%2F`` included: names are checked after decoding) is refused; stalls, retries and a deadline
per file, and the caps on unzipping, are params of this section.

    dvc repro download           # everything: python -m stages.download --params params.yaml --raw-dir data/raw \
                                 #   --reports reports/download (its dvc.yaml command)
    python -m stages.download --params params.yaml --raw-dir data/raw --reports reports/download --only the-verdict
"""

from __future__ import annotations

import re
import string
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

import typer

from llmcore.common import LLMCoreError, sha256_file, stage_errors, write_stage_reports
from llmcore.data.chat import load_conversations_file
from llmcore.data.datasets import check_spam_table, check_text_corpus, load_instruction_data, load_preferences
from llmcore.data.parquet import parquet_info
from llmcore.download import DEADLINE, MAX_BACKOFF, extract_zip, resolve_url, safe_path
from llmcore.download import download as fetch
from llmcore.params import load_section


@dataclass
class Source:
    url: str
    sha256: str | None = None  # pinned digest of the downloaded body; None = content checks only
    extract: list[str] | None = None  # zip members to extract beside the archive
    check: Literal["none", "text", "spam", "instructions", "preferences", "parquet", "conversations"] = "none"
    folder: str | None = None  # folder under data/raw (default: the source's name); sources may share one
    shards: int | None = None  # url is a template with a {shard} field (e.g. {shard:03d}): fetch shards 0..N-1
    shard_sha256: dict[str, str] | None = None  # sharded sources: file name -> pinned sha256
    column: str = "text"  # check: parquet -> the text column every file must have

    def __post_init__(self) -> None:
        if self.shards is not None:
            if not 1 <= self.shards <= MAX_SHARDS:
                raise ValueError(f"shards: expected a positive int up to {MAX_SHARDS} or null, got {self.shards}")
            check_template(self.url)
            if "{shard" not in self.url:
                raise ValueError(f"url: shards is set but {self.url!r} has no {{shard}} field")
            if self.sha256 or self.extract:
                raise ValueError("sha256 and extract apply to single files; use shard_sha256 for shards")

    def urls(self) -> list[str]:
        if self.shards is None:
            return [self.url]
        return [self.url.format(shard=i) for i in range(self.shards)]


MAX_SHARDS = 100_000


def check_template(url: str) -> None:
    """A sharded url may hold ``{shard}`` fields with a short integer format (``{shard:03d}``) and nothing else."""
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(url) if name is not None]
    except ValueError as e:
        raise ValueError(f"url: not a {{shard}} template ({e})") from None
    for name, spec, conv in fields:
        if name != "shard" or conv is not None or not re.fullmatch(r"(0?[1-9][0-9]?)?d?", spec or ""):
            raise ValueError(
                f"url: not a {{shard}} template: {{{name}{':' + spec if spec else ''}}} (use {{shard:03d}})"
            )


@dataclass
class DownloadParams:
    sources: dict[str, Source] = field(default_factory=dict)
    stall_timeout_s: float = 30.0  # a transfer receiving (almost) nothing this long is cut and retried
    file_deadline_s: float = DEADLINE  # the most one file may take (6 h), retries and waits included
    retries: int = 5  # extra attempts per file after a stall, a dropped connection, a 5xx or a 429
    backoff_s: float = 1.0  # the first wait between attempts, doubled each time (at most 30 s)
    max_unzip_mb: float = 2048.0  # an archive may unpack to at most this many MB ...
    max_unzip_ratio: float = 100.0  # ... nor expand more than this many times its compressed size (zip bombs)

    def __post_init__(self) -> None:
        for name in ("stall_timeout_s", "file_deadline_s", "max_unzip_mb", "max_unzip_ratio"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected a positive number, got {getattr(self, name)}")
        if not 0 <= self.retries <= 100:
            raise ValueError(f"retries: expected an int in [0, 100], got {self.retries}")
        if not 0 <= self.backoff_s <= MAX_BACKOFF:
            raise ValueError(f"backoff_s: expected a number in [0, {MAX_BACKOFF:g}], got {self.backoff_s}")


def check_content(name: str, source: Source, files: list[Path]) -> dict:
    """Run the declared content check; returns facts for the metrics (row counts)."""
    if source.check == "text":
        return {"chars": len(check_text_corpus(files[0]))}
    if source.check == "spam":
        table = check_spam_table(files[0])
        return {"rows": len(table), "spam": int((table.label == "spam").sum())}
    if source.check == "instructions":
        return {"entries": len(load_instruction_data(files[0]))}
    if source.check == "preferences":
        entries, identical = load_preferences(files[0])
        return {"entries": len(entries) + len(identical), "identical_pairs": len(identical)}
    if source.check == "conversations":  # chat data: every row a well-formed conversation (jsonl or parquet)
        return {"conversations": sum(len(load_conversations_file(f)) for f in files)}
    if source.check == "parquet":  # footers only: the column is there and typed as text
        return {"rows": sum(parquet_info(f, source.column).rows for f in files)}
    return {}


def fetch_source(name: str, source: Source, raw_dir: Path, cfg: DownloadParams | None = None) -> dict:
    cfg = cfg or DownloadParams()
    where = f"download.sources.{name}"
    folder = safe_path(raw_dir, source.folder or name, f"{where}.folder")
    fetched = []
    for url in source.urls():
        filename = file_name(url, f"{where}.url")
        digest = source.sha256 if source.shards is None else (source.shard_sha256 or {}).get(filename)
        if len(fetched):
            print(f"{name}: {resolve_url(url)}")
        dest = safe_path(folder, filename, f"{where}.url")
        stall = cfg.stall_timeout_s
        fetched.append(
            fetch(
                url,
                dest,
                sha256=digest,
                timeout=(min(10.0, stall), stall),
                deadline=cfg.file_deadline_s,
                retries=cfg.retries,
                backoff=cfg.backoff_s,
            )
        )
    dest = fetched[0]
    files = unpack(name, source, dest, cfg) if source.extract else fetched
    facts = check_content(name, source, files)
    if source.shards is None:
        return {"file": str(dest), "bytes": dest.stat().st_size, "sha256": sha256_file(dest), **facts}
    return {
        "folder": str(folder),
        "files": len(fetched),
        "bytes": sum(f.stat().st_size for f in fetched),
        "sha256": {f.name: sha256_file(f) for f in fetched},
        **facts,
    }


def file_name(url: str, where: str) -> str:
    """The file name a URL is saved under: its last path segment, decoded, and a plain name (no '/', no '..')."""
    name = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    if not name or name in (".", "..") or name.startswith(".") or any(c in name for c in "/\\\0"):
        raise LLMCoreError(f"{where}: file name {name!r} of {url!r} is not a plain file name")
    return name


def unpack(name: str, source: Source, archive: Path, cfg: DownloadParams) -> list[Path]:
    """The source's ``extract`` members, unpacked beside the archive within the params' caps."""
    return extract_zip(
        archive, archive.parent, source.extract, max_bytes=int(cfg.max_unzip_mb * 2**20), max_ratio=cfg.max_unzip_ratio
    )


def load_params(path: Path) -> DownloadParams:
    """Everything this stage reads from params.yaml: the ``download`` section."""
    return load_section("download", DownloadParams, path)


app = typer.Typer(add_completion=False)


@app.command()
def main(
    params: Path = typer.Option(..., help="params file"),
    raw_dir: Path = typer.Option(..., help="where sources land, one folder each"),
    reports: Path = typer.Option(..., help="metrics folder"),
    only: list[str] = typer.Option(None, help="fetch only these sources (repeatable)"),
) -> None:
    """Download, verify and check every source declared in params.yaml."""
    with stage_errors():
        cfg = load_params(params)
        names = only or list(cfg.sources)
        unknown = [n for n in names if n not in cfg.sources]
        if unknown:
            raise LLMCoreError(f"--only {unknown[0]}: not a source in download.sources")
        start = time.perf_counter()
        results = {}
        for name in names:
            print(f"{name}: {resolve_url(cfg.sources[name].urls()[0])}")
            results[name] = fetch_source(name, cfg.sources[name], raw_dir, cfg)
        metrics = {"sources": len(results), "bytes": sum(r["bytes"] for r in results.values())}
        write_stage_reports(reports, metrics, {"seconds": round(time.perf_counter() - start, 3)}, {"files": results})


if __name__ == "__main__":
    app()
