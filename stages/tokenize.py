"""Stage `tokenize`: build the tokenizer and encode the pretraining corpus into memory-mappable token shards.

``tokenize.kind`` picks the tokenizer: ``bpe`` (trained here on a sample of the training text, at most
``train_chars`` characters, as nanochat does), ``gpt2`` (OpenAI's released BPE, from the downloaded
``encoder.json``/``vocab.bpe``) or ``char`` (one id per character, the classic first step).

The corpus is a download source (``data/raw/<corpus>/``) of one of two shapes:

- one text file (TinyShakespeare, the-verdict): one document; the last ``val_fraction`` of it is validation;
- parquet files (FineWeb-Edu, ClimbMix, ...; one document per row, ``text_column``): the last
  ``val_files`` files are validation (nanochat keeps its last shard for validation).

Either way the text streams through ``llmcore.data.shards.tokenize_to_shards`` (a pool of ``workers``
processes, memory bounded, resumable per shard from ``--work``). Outputs, in ``data/tokens/``:

    tokenizer.json          the tokenizer (format documented in llmcore/text/tokenizer.py)
    train_000000.bin ...    token ids, uint16 when the vocab fits, else uint32 (np.memmap-able), in shards of
    val_000000.bin ...      ``shard_tokens`` tokens, an end-of-text token between documents
    meta.json               the manifest: dtype, vocab size, end-of-text id, per shard tokens/documents/sha256

    dvc repro tokenize           # or its dvc.yaml command, which passes every path (none has a default):
    python -m stages.tokenize --params params.yaml --raw-dir data/raw --out data/tokens --reports reports/tokenize \
        --work .cache/tokenize
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import typer

from llmcore.common import LLMCoreError, stage_errors, write_json_atomic, write_stage_reports
from llmcore.data.datasets import check_text_corpus, find_single_file
from llmcore.data.shards import Source, tokenize_to_shards
from llmcore.params import load_section
from llmcore.text.bpe import ENDOFTEXT
from llmcore.text.tokenizer import Tokenizer


@dataclass
class TokenizeParams:
    corpus: str = "tinyshakespeare"  # a source name under download.sources (its folder in data/raw)
    kind: Literal["bpe", "gpt2", "char"] = "bpe"
    vocab_size: int = 1024  # bpe only; gpt2 is 50257, char is the corpus' character set + 1
    pattern: str = "gpt4"  # bpe pre-tokenizer split regex: gpt2 | gpt4 | a raw regex
    special_tokens: list[str] = field(default_factory=lambda: ["<|endoftext|>"])
    val_fraction: float = 0.1  # text corpora: the tail, as nanoGPT splits TinyShakespeare
    val_files: int = 1  # parquet corpora: the last N files are the validation split
    text_column: str = "text"  # parquet corpora: the column holding each document's text
    train_chars: int = 100_000_000  # bpe/char: train on at most this many characters of the training split
    shard_tokens: int = 100_000_000  # tokens per shard file (200 MB in uint16)
    workers: int = 1  # encoding processes (1: in the stage's own process)

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 0.5:
            raise LLMCoreError(f"tokenize.val_fraction: expected a value in (0, 0.5), got {self.val_fraction}")
        if self.vocab_size < 257 and self.kind == "bpe":
            raise LLMCoreError(f"tokenize.vocab_size: bpe needs at least 257 tokens, got {self.vocab_size}")
        for name in ("val_files", "train_chars", "shard_tokens", "workers"):
            if getattr(self, name) < 1:
                raise LLMCoreError(f"tokenize.{name}: expected a positive int, got {getattr(self, name)}")


@dataclass
class Corpus:
    splits: dict[str, list[Source]]  # train / val
    files: list[Path]
    kind: str  # text | parquet

    def fingerprint(self) -> list:
        return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in self.files]


def find_corpus(cfg: TokenizeParams, raw_dir: Path) -> Corpus:
    """The corpus' documents, split: parquet files by file, a text file by its tail."""
    folder = raw_dir / cfg.corpus
    parquet = sorted(p for p in folder.glob("*.parquet") if p.is_file() and not p.name.startswith("."))
    if parquet:
        if len(parquet) <= cfg.val_files:
            raise LLMCoreError(
                f"tokenize.val_files: {folder} has {len(parquet)} parquet file(s); the last "
                f"{cfg.val_files} are validation: at least {cfg.val_files + 1} needed"
            )
        sources = [Source(str(p), path=p, column=cfg.text_column) for p in parquet]
        for s in sources:  # every file has the column: checked now, from the footers, before any work
            s.rows()
        n_val = cfg.val_files
        return Corpus({"train": sources[:-n_val], "val": sources[-n_val:]}, parquet, "parquet")
    path = find_single_file(folder, "tokenize.corpus")
    text = check_text_corpus(path)
    split = int(len(text) * (1 - cfg.val_fraction))
    splits = {
        "train": [Source(f"{path}[:{split}]", text=text[:split])],
        "val": [Source(f"{path}[{split}:]", text=text[split:])],
    }
    return Corpus(splits, [path], "text")


def training_sample(corpus: Corpus, max_chars: int) -> str:
    """The first ``max_chars`` characters of the training documents, joined by end-of-text (no merge crosses)."""
    parts, n = [], 0
    for source in corpus.splits["train"]:
        for texts in source.batches(0, 1024):
            for text in texts:
                parts.append(text[: max_chars - n])
                n += len(parts[-1])
                if n >= max_chars:
                    return ENDOFTEXT.join(parts)
    return ENDOFTEXT.join(parts)


def build_tokenizer(cfg: TokenizeParams, corpus: Corpus, raw_dir: Path) -> Tokenizer:
    if cfg.kind == "gpt2":
        return Tokenizer.gpt2(raw_dir / "gpt2-bpe" / "encoder.json", raw_dir / "gpt2-bpe" / "vocab.bpe")
    sample = training_sample(corpus, cfg.train_chars)
    if cfg.kind == "char":
        return Tokenizer.char(sample.replace(ENDOFTEXT, ""))
    return Tokenizer.train(sample, cfg.vocab_size, pattern=cfg.pattern, special_tokens=cfg.special_tokens)


def cached_tokenizer(cfg: TokenizeParams, corpus: Corpus, raw_dir: Path, work: Path) -> tuple[Tokenizer, bool]:
    """The tokenizer, trained or reloaded from ``work`` when a killed run already trained it on the same inputs."""
    key = {
        "kind": cfg.kind,
        "vocab_size": cfg.vocab_size,
        "pattern": cfg.pattern,
        "special": cfg.special_tokens,
        "train_chars": cfg.train_chars,
        "val_fraction": cfg.val_fraction,
        "val_files": cfg.val_files,
        "column": cfg.text_column,
        "files": corpus.fingerprint(),
    }
    key_hash = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    path, key_path = work / "tokenizer.json", work / "tokenizer.key"
    if path.is_file() and key_path.is_file() and key_path.read_text().strip() == key_hash:
        return Tokenizer.load(path), True
    tok = build_tokenizer(cfg, corpus, raw_dir)
    tok.save(path)
    write_json_atomic(key_path, key_hash)
    return tok, False


def load_params(path: Path) -> TokenizeParams:
    """Everything this stage reads from params.yaml: the ``tokenize`` section."""
    return load_section("tokenize", TokenizeParams, path)


app = typer.Typer(add_completion=False)


@app.command()
def main(
    params: Path = typer.Option(..., help="params file"),
    raw_dir: Path = typer.Option(..., help="downloaded sources"),
    out: Path = typer.Option(..., help="output folder"),
    reports: Path = typer.Option(..., help="metrics folder"),
    work: Path = typer.Option(..., help="resumable work folder (keep out of DVC outs)"),
) -> None:
    """Train/load the tokenizer and encode the corpus into train/val token shards with a manifest."""
    with stage_errors():
        cfg = load_params(params)
        corpus = find_corpus(cfg, raw_dir)
        work.mkdir(parents=True, exist_ok=True)

        start = time.perf_counter()
        tok, reused = cached_tokenizer(cfg, corpus, raw_dir, work)
        train_seconds = time.perf_counter() - start
        print(f"{tok.kind} tokenizer, vocab {tok.vocab_size}" + (" (reused from an interrupted run)" if reused else ""))
        start = time.perf_counter()
        meta = tokenize_to_shards(
            corpus.splits,
            tok,
            out,
            work,
            shard_tokens=cfg.shard_tokens,
            workers=cfg.workers,
            fingerprint={"files": corpus.fingerprint(), "column": cfg.text_column},
            extra_meta={"tokenizer": tok.kind, "corpus": cfg.corpus},
        )
        encode_seconds = time.perf_counter() - start
        tok.save(out / "tokenizer.json")
        n_tokens = meta["train_tokens"] + meta["val_tokens"]
        n_bytes = sum(meta["bytes"].values())
        write_stage_reports(
            reports,
            {
                "vocab_size": tok.vocab_size,
                "train_tokens": meta["train_tokens"],
                "val_tokens": meta["val_tokens"],
                "documents": sum(meta["documents"].values()),
                "shards": sum(len(v) for v in meta["splits"].values()),
                "bytes_per_token": round(n_bytes / n_tokens, 4),
            },
            {
                "tokenizer_seconds": round(train_seconds, 3),
                "encode_seconds": round(encode_seconds, 3),
                "encode_mb_per_s": round(n_bytes / 1e6 / max(encode_seconds, 1e-9), 3),
            },
            {"tokenizer": tok.kind, "corpus": cfg.corpus, "corpus_bytes": n_bytes},
        )
        print(
            f"{meta['train_tokens']} train / {meta['val_tokens']} val tokens in "
            f"{sum(len(v) for v in meta['splits'].values())} shard(s), {encode_seconds:.1f} s"
        )


if __name__ == "__main__":
    app()
