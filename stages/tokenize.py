"""Stage `tokenize`: build the tokenizer and encode the pretraining corpus into memory-mappable token files.

``tokenize.kind`` picks the tokenizer: ``bpe`` (trained here on the corpus, byte-level), ``gpt2``
(OpenAI's released BPE, from the downloaded ``encoder.json``/``vocab.bpe``) or ``char`` (one id per
character, the classic first step). Outputs, in ``data/tokens/``:

    tokenizer.json   the tokenizer (format documented in llmcore/tokenizer.py)
    train.bin        token ids, uint16 when the vocab fits, else uint32 (np.memmap-able)
    val.bin          the last ``val_fraction`` of the corpus
    meta.json        dtype, vocab size, token counts, end-of-text id, corpus
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import typer

from llmcore.common import LLMCoreError, atomic_path, stage_errors, write_json_atomic
from llmcore.data.datasets import check_text_corpus, find_single_file
from llmcore.params import load_section
from llmcore.text.tokenizer import Tokenizer


@dataclass
class TokenizeParams:
    corpus: str = "tinyshakespeare"  # a source name under download.sources (its folder in data/raw)
    kind: Literal["bpe", "gpt2", "char"] = "bpe"
    vocab_size: int = 1024  # bpe only; gpt2 is 50257, char is the corpus' character set + 1
    pattern: str = "gpt4"  # bpe pre-tokenizer split regex: gpt2 | gpt4 | a raw regex
    special_tokens: list[str] = field(default_factory=lambda: ["<|endoftext|>"])
    val_fraction: float = 0.1  # the corpus' tail, as nanoGPT splits TinyShakespeare

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 0.5:
            raise LLMCoreError(f"tokenize.val_fraction: expected a value in (0, 0.5), got {self.val_fraction}")
        if self.vocab_size < 257 and self.kind == "bpe":
            raise LLMCoreError(f"tokenize.vocab_size: bpe needs at least 257 tokens, got {self.vocab_size}")


def build_tokenizer(cfg: TokenizeParams, train_text: str, raw_dir: Path) -> Tokenizer:
    if cfg.kind == "gpt2":
        return Tokenizer.gpt2(raw_dir / "gpt2-bpe" / "encoder.json", raw_dir / "gpt2-bpe" / "vocab.bpe")
    if cfg.kind == "char":
        return Tokenizer.char(train_text)
    return Tokenizer.train(train_text, cfg.vocab_size, pattern=cfg.pattern, special_tokens=cfg.special_tokens)


def write_tokens(path: Path, ids: list[int], dtype: np.dtype) -> None:
    with atomic_path(path) as tmp:
        np.asarray(ids, dtype=dtype).tofile(tmp)


def load_params(path: Path) -> TokenizeParams:
    """Everything this stage reads from params.yaml: the ``tokenize`` section."""
    return load_section("tokenize", TokenizeParams, path)


app = typer.Typer(add_completion=False)


@app.command()
def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file"),
    raw_dir: Path = typer.Option(Path("data/raw"), help="downloaded sources"),
    out: Path = typer.Option(Path("data/tokens"), help="output folder"),
    reports: Path = typer.Option(Path("reports/tokenize"), help="metrics folder"),
) -> None:
    """Train/load the tokenizer and encode the corpus into train.bin / val.bin."""
    with stage_errors():
        cfg = load_params(params)
        corpus = find_single_file(raw_dir / cfg.corpus, "tokenize.corpus")
        text = check_text_corpus(corpus)
        split = int(len(text) * (1 - cfg.val_fraction))
        train_text, val_text = text[:split], text[split:]

        start = time.perf_counter()
        tok = build_tokenizer(cfg, train_text, raw_dir)
        train_seconds = time.perf_counter() - start
        start = time.perf_counter()
        # the end-of-text token may appear in a corpus as text: encode it as text, not as the special id
        train_ids = tok.encode(train_text, allow_special=False)
        val_ids = tok.encode(val_text, allow_special=False)
        encode_seconds = time.perf_counter() - start

        dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
        out.mkdir(parents=True, exist_ok=True)
        tok.save(out / "tokenizer.json")
        write_tokens(out / "train.bin", train_ids, dtype)
        write_tokens(out / "val.bin", val_ids, dtype)
        meta = {
            "dtype": np.dtype(dtype).name, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id,
            "tokenizer": tok.kind, "corpus": cfg.corpus, "train_tokens": len(train_ids), "val_tokens": len(val_ids),
        }  # fmt: skip
        write_json_atomic(out / "meta.json", meta)
        n_bytes = len(text.encode("utf-8"))
        write_json_atomic(
            reports / "metrics.json",
            {
                "vocab_size": tok.vocab_size, "train_tokens": len(train_ids), "val_tokens": len(val_ids),
                "bytes_per_token": round(n_bytes / (len(train_ids) + len(val_ids)), 4),
                "tokenizer_seconds": round(train_seconds, 3), "encode_seconds": round(encode_seconds, 3),
            },
        )  # fmt: skip
        print(f"{tok.kind} tokenizer, vocab {tok.vocab_size}: {len(train_ids)} train / {len(val_ids)} val tokens")


if __name__ == "__main__":
    app()
