"""Stage `download`: fetch every dataset the pipeline uses, verify it, and check its content.

Sources are declared in params.yaml (``download.sources``): URL, optional sha256, optional zip members to
extract, and a content check. A sharded corpus (FineWeb-Edu's parquet files) is one source whose ``url`` is
a template with a ``{shard}`` field and ``shards: N`` fetches files 0..N-1, each resumable and verified.
Each lands in ``data/raw/<name>/``. Set ``LLMCORE_MIRROR`` to read them from
an offline mirror laid out as ``HOST/PATH`` (README: "Offline mirror").

    python -m stages.download                 # everything
    python -m stages.download --only the-verdict
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

import typer

from llmcore.common import LLMCoreError, sha256_file, stage_errors, write_stage_reports
from llmcore.data.datasets import check_spam_table, check_text_corpus, load_instruction_data, load_preferences
from llmcore.data.parquet import parquet_info
from llmcore.download import download as fetch
from llmcore.download import extract_zip, resolve_url
from llmcore.params import load_section


@dataclass
class Source:
    url: str
    sha256: str | None = None  # pinned digest of the downloaded body; None = content checks only
    extract: list[str] | None = None  # zip members to extract beside the archive
    check: Literal["none", "text", "spam", "instructions", "preferences", "parquet"] = "none"
    folder: str | None = None  # folder under data/raw (default: the source's name); sources may share one
    shards: int | None = None  # url is a template with a {shard} field (e.g. {shard:03d}): fetch shards 0..N-1
    shard_sha256: dict[str, str] | None = None  # sharded sources: file name -> pinned sha256
    column: str = "text"  # check: parquet -> the text column every file must have

    def __post_init__(self) -> None:
        if self.shards is not None:
            if self.shards < 1:
                raise ValueError(f"shards: expected a positive int or null, got {self.shards}")
            if "{shard" not in self.url:
                raise ValueError(f"url: shards is set but {self.url!r} has no {{shard}} field")
            if self.sha256 or self.extract:
                raise ValueError("sha256 and extract apply to single files; use shard_sha256 for shards")

    def urls(self) -> list[str]:
        if self.shards is None:
            return [self.url]
        return [self.url.format(shard=i) for i in range(self.shards)]


@dataclass
class DownloadParams:
    sources: dict[str, Source] = field(default_factory=dict)


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
    if source.check == "parquet":  # footers only: the column is there and typed as text
        return {"rows": sum(parquet_info(f, source.column).rows for f in files)}
    return {}


def fetch_source(name: str, source: Source, raw_dir: Path) -> dict:
    folder = raw_dir / (source.folder or name)
    fetched = []
    for url in source.urls():
        filename = unquote(Path(urlsplit(url).path).name)
        if not filename:
            raise LLMCoreError(f"download.sources.{name}.url: no file name in {url!r}")
        digest = source.sha256 if source.shards is None else (source.shard_sha256 or {}).get(filename)
        if len(fetched):
            print(f"{name}: {resolve_url(url)}")
        fetched.append(fetch(url, folder / filename, sha256=digest))
    dest = fetched[0]
    files = extract_zip(dest, dest.parent, source.extract) if source.extract else fetched
    facts = check_content(name, source, files)
    if source.shards is None:
        return {"file": str(dest), "bytes": dest.stat().st_size, "sha256": sha256_file(dest), **facts}
    return {"folder": str(folder), "files": len(fetched), "bytes": sum(f.stat().st_size for f in fetched),
            "sha256": {f.name: sha256_file(f) for f in fetched}, **facts}  # fmt: skip


def load_params(path: Path) -> DownloadParams:
    """Everything this stage reads from params.yaml: the ``download`` section."""
    return load_section("download", DownloadParams, path)


app = typer.Typer(add_completion=False)


@app.command()
def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file"),
    raw_dir: Path = typer.Option(Path("data/raw"), help="where sources land, one folder each"),
    reports: Path = typer.Option(Path("reports/download"), help="metrics folder"),
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
            results[name] = fetch_source(name, cfg.sources[name], raw_dir)
        metrics = {"sources": len(results), "bytes": sum(r["bytes"] for r in results.values())}
        write_stage_reports(reports, metrics, {"seconds": round(time.perf_counter() - start, 3)}, {"files": results})


if __name__ == "__main__":
    app()
