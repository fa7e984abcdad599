"""Parquet corpora, streaming sharded tokenization, the sharded loader and bits per byte.

Parquet fixtures are generated here with pyarrow (small, several row groups); the end-to-end test serves
them through a loopback mirror and runs download -> tokenize -> pretrain on them.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from typer.testing import CliRunner

from llmcore.common import LLMCoreError, sha256_file
from llmcore.data.parquet import iter_documents, parquet_info
from llmcore.data.shards import Source, tokenize_to_shards
from llmcore.data.tokens import RandomWindows, SequentialWindows, TokenShards, load_tokens, read_meta
from llmcore.download import MIRROR_ENV
from llmcore.eval.bpb import evaluate_bpb, token_byte_lengths
from llmcore.models.gpt import ModelOutput
from llmcore.text.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
WORDS = [
    "the",
    "cell",
    "divides",
    "energy",
    "water",
    "école",
    "naïve",
    "温度",
    "photosynthesis",
    "of",
    "and",
    "a",
    "river",
    "flows",
    "into",
    "sea",
    "light",
    "absorbs",
    "plants",
    "grow",
]


def make_docs(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        k = rng.integers(1, 6)
        sentences = [" ".join(rng.choice(WORDS, rng.integers(3, 12))).capitalize() + "." for _ in range(k)]
        docs.append(" ".join(sentences))
    return docs


def write_parquet(path: Path, docs: list[str | None], row_group_size: int = 37, column: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"id": [f"doc{i}" for i in range(len(docs))], column: docs})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[list[str]]]:
    """Three parquet shards (the last one for validation), as a FineWeb-Edu-style folder."""
    root = tmp_path_factory.mktemp("corpus")
    docs = [make_docs(120, 0), make_docs(90, 1), make_docs(60, 2)]
    for i, d in enumerate(docs):
        write_parquet(root / f"{i:03d}_00000.parquet", d)
    return root, docs


@pytest.fixture(scope="module")
def tok(corpus) -> Tokenizer:
    _, docs = corpus
    return Tokenizer.train("<|endoftext|>".join(docs[0]), 300, pattern="gpt4")


def reference_stream(tok: Tokenizer, docs: list[str]) -> np.ndarray:
    """The documents' tokens with one end-of-text between documents, encoded in one go."""
    ids: list[int] = []
    for i, d in enumerate(docs):
        if i:
            ids.append(tok.eot_id)
        ids.extend(tok.encode(d, allow_special=False))
    return np.asarray(ids, dtype=np.uint16)


def splits_of(root: Path) -> dict[str, list[Source]]:
    files = sorted(root.glob("*.parquet"))
    return {"train": [Source(str(p), path=p) for p in files[:-1]], "val": [Source(str(files[-1]), path=files[-1])]}


# --- parquet reading ---------------------------------------------------------------------------------


def test_parquet_reader_streams_batches_and_starts_at_a_row(tmp_path):
    docs = make_docs(100, 3)
    docs[5] = None
    path = write_parquet(tmp_path / "a.parquet", docs, row_group_size=30)
    assert parquet_info(path).rows == 100 and parquet_info(path).row_groups == 4
    batches = list(iter_documents(path, batch_rows=8))
    assert max(len(b) for b in batches) == 8
    flat = [t for b in batches for t in b]
    assert flat == [d if d is not None else "" for d in docs]  # null -> empty document, rows keep their numbers
    assert [t for b in iter_documents(path, batch_rows=8, start_row=65) for t in b] == flat[65:]
    assert list(iter_documents(path, start_row=100)) == []


def test_bad_parquet_input_names_the_file(tmp_path):
    no_text = write_parquet(tmp_path / "no_text.parquet", ["x", "y"], column="content")
    with pytest.raises(LLMCoreError, match=r"no_text\.parquet: no column 'text' \(columns: id, content\)"):
        list(iter_documents(no_text))
    ints = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"text": [1, 2, 3]}), ints)
    with pytest.raises(LLMCoreError, match=r"ints\.parquet: column 'text' is int64, expected text"):
        parquet_info(ints)
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"this is not parquet" * 10)
    with pytest.raises(LLMCoreError, match=r"garbage\.parquet: not a readable parquet file"):
        list(iter_documents(garbage))
    good = write_parquet(tmp_path / "good.parquet", make_docs(200, 4), row_group_size=50)
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # the footer is gone
    with pytest.raises(LLMCoreError, match=r"truncated\.parquet: not a readable parquet file"):
        list(iter_documents(truncated))
    corrupt = tmp_path / "corrupt.parquet"  # footer intact, the data pages overwritten
    data = bytearray(good.read_bytes())
    data[8:2000] = os.urandom(1992)
    corrupt.write_bytes(bytes(data))
    with pytest.raises(LLMCoreError, match=r"corrupt\.parquet: "):
        list(iter_documents(corrupt))


# --- streaming tokenization ----------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_shards_hold_the_documents_stream_across_cuts(tmp_path, corpus, tok, workers):
    root, docs = corpus
    meta = tokenize_to_shards(
        splits_of(root),
        tok,
        tmp_path / "out",
        tmp_path / "work",
        shard_tokens=1000,
        workers=workers,
        batch_rows=16,
        progress_bar=False,
        log=lambda _: None,
    )
    out = tmp_path / "out"
    for split, split_docs in (("train", docs[0] + docs[1]), ("val", docs[2])):
        entries = meta["splits"][split]
        assert all(e["tokens"] == 1000 for e in entries[:-1]) and 0 < entries[-1]["tokens"] <= 1000
        stream = np.concatenate([np.fromfile(out / e["file"], dtype=np.uint16) for e in entries])
        np.testing.assert_array_equal(stream, reference_stream(tok, split_docs))
        assert sum(e["documents"] for e in entries) == len(split_docs) == meta["documents"][split]
        assert sum(e["bytes"] for e in entries) == sum(len(d.encode()) for d in split_docs)
        assert all(sha256_file(out / e["file"]) == e["sha256"] for e in entries)
        loaded = load_tokens(out, split, verify=True)
        assert len(loaded) == len(stream) == meta[f"{split}_tokens"] and len(loaded.shards) == len(entries)
    assert read_meta(out)["dtype"] == "uint16"
    assert not (tmp_path / "work" / "progress.json").exists() and not list((tmp_path / "work").glob("*.bin"))


def test_a_text_corpus_is_one_document_in_one_shard(tmp_path, tok):
    text = " ".join(make_docs(30, 5))
    meta = tokenize_to_shards(
        {"train": [Source("t", text=text[:2000])], "val": [Source("v", text=text[2000:])]},
        tok,
        tmp_path / "out",
        tmp_path / "work",
        progress_bar=False,
    )
    assert [e["file"] for e in meta["splits"]["train"]] == ["train_000000.bin"]
    train = load_tokens(tmp_path / "out", "train")
    assert train[:].tolist() == tok.encode(text[:2000], allow_special=False)  # no end-of-text added


@pytest.mark.parametrize("batch_rows", [1, 16])
def test_an_empty_first_document_is_counted(tmp_path, tok, batch_rows):
    """The first document of a split has no end-of-text before it, so an empty one holds no token at all: it
    still counts in meta.json (alone in its batch, or the first of a batch), and so do empty ones later on."""
    docs = ["", *make_docs(40, 6)]
    docs[7] = ""
    write_parquet(tmp_path / "train.parquet", docs, row_group_size=13)
    splits = {
        "train": [Source("train", path=tmp_path / "train.parquet")],
        "val": [Source("empty", text=""), Source("v", text="a river flows")],
    }
    meta = tokenize_to_shards(
        splits,
        tok,
        tmp_path / "out",
        tmp_path / "work",
        shard_tokens=200,
        batch_rows=batch_rows,
        progress_bar=False,
        log=lambda _: None,
    )
    assert meta["documents"] == {"train": len(docs), "val": 2}
    assert sum(e["documents"] for e in meta["splits"]["train"]) == len(docs)
    assert meta["bytes"]["train"] == sum(len(d.encode()) for d in docs)
    out = tmp_path / "out"
    stream = np.concatenate([np.fromfile(out / e["file"], dtype=np.uint16) for e in meta["splits"]["train"]])
    np.testing.assert_array_equal(stream, reference_stream(tok, docs))


KILL_SCRIPT = """
import sys
from pathlib import Path
from llmcore.data.shards import Source, tokenize_to_shards
from llmcore.text.tokenizer import Tokenizer
root, out, work = map(Path, sys.argv[1:4])
files = sorted(root.glob("*.parquet"))
splits = {"train": [Source(str(p), path=p) for p in files[:-1]], "val": [Source(str(files[-1]), path=files[-1])]}
tok = Tokenizer.load(root / "tok.json")
tokenize_to_shards(splits, tok, out, work, shard_tokens=int(sys.argv[4]), batch_rows=4, progress_bar=False,
                   fingerprint="fixture")
"""


def test_killed_tokenization_keeps_whole_shards_and_resumes(tmp_path, tok):
    root = tmp_path / "corpus"
    for i in range(3):
        write_parquet(root / f"{i:03d}.parquet", make_docs(500, 10 + i), row_group_size=100)
    tok.save(root / "tok.json")
    args = [sys.executable, "-c", KILL_SCRIPT, str(root)]
    shard = "1000"
    ref = subprocess.run(
        [*args, str(tmp_path / "ref"), str(tmp_path / "ref_work"), shard],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ref.returncode == 0, ref.stderr

    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.Popen(
        [*args, str(out), str(work), shard], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 60
    finished: list[dict] = []
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            finished = json.loads((work / "progress.json").read_text())["splits"]["train"]["shards"]
        except (OSError, ValueError, KeyError):
            finished = []
        if len(finished) >= 4:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "tokenization ended before it could be killed"

    # Every shard under its final name is whole and as recorded; the partial one is only a temporary file.
    recorded = {s["file"]: s for s in json.loads((work / "progress.json").read_text())["splits"]["train"]["shards"]}
    on_disk = sorted(p.name for p in work.glob("*.bin"))
    assert len(recorded) >= 4 and set(recorded) <= set(on_disk)
    assert len(on_disk) <= len(recorded) + 1  # a shard renamed just before the kill may not be recorded yet
    for name in recorded:
        assert sha256_file(work / name) == recorded[name]["sha256"]
    kept = {name: (work / name).stat().st_mtime_ns for name in recorded}

    rerun = subprocess.run([*args, str(out), str(work), shard], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(recorded)} finished shard(s) kept" in rerun.stdout
    for name, mtime in kept.items():  # kept, not rewritten (moved into the output folder)
        assert (out / name).stat().st_mtime_ns == mtime
    ref_meta, meta = read_meta(tmp_path / "ref"), read_meta(out)
    assert meta["splits"] == ref_meta["splits"]  # same shards, same tokens, same digests
    assert not list(work.glob("*.tmp")) and not list(out.glob(".*"))


def test_manifest_mismatch_and_corrupt_shards_name_the_file(tmp_path, corpus, tok):
    root, _ = corpus
    out = tmp_path / "out"
    tokenize_to_shards(splits_of(root), tok, out, tmp_path / "work", shard_tokens=1000, progress_bar=False)
    shard = out / "train_000001.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    load_tokens(out, "train")  # same size: only the digest can tell
    with pytest.raises(LLMCoreError, match=r"train_000001\.bin: sha256 differs from meta\.json"):
        load_tokens(out, "train", verify=True)
    shard.write_bytes(bytes(data[:-2]))
    with pytest.raises(LLMCoreError, match=r"train_000001\.bin: holds 999 tokens but meta\.json says 1000"):
        load_tokens(out, "train")
    shard.unlink()
    with pytest.raises(LLMCoreError, match=r"train_000001\.bin: not found"):
        load_tokens(out, "train")
    meta = json.loads((out / "meta.json").read_text())
    meta["splits"]["val"][0]["file"] = "../elsewhere.bin"
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(LLMCoreError, match=r"meta\.json: splits\.val\[0\]"):
        load_tokens(out, "val")


# --- the loader ------------------------------------------------------------------------------------------


def split_into_shards(stream: np.ndarray, sizes: list[int]) -> TokenShards:
    cuts = np.cumsum(sizes)[:-1]
    return TokenShards(np.split(stream, cuts))


def test_token_shards_slice_across_boundaries_like_one_array():
    stream = np.arange(1000, dtype=np.uint16)
    shards = split_into_shards(stream, [7, 300, 1, 692])
    rng = np.random.default_rng(0)
    for _ in range(200):
        a, b = sorted(rng.integers(0, 1001, 2))
        np.testing.assert_array_equal(shards[a:b], stream[a:b])
    assert shards[307] == 307 and shards[-1] == 999 and len(shards) == 1000
    one, many = RandomWindows(stream, 4, 50, seed=3), RandomWindows(shards, 4, 50, seed=3)
    for _ in range(20):  # the same windows whether the stream is one file or four
        assert all(torch.equal(a, b) for a, b in zip(one.next_batch(), many.next_batch(), strict=True))


def test_ddp_ranks_never_overlap_and_cover_every_window():
    shards = split_into_shards(np.arange(2000, dtype=np.uint32), [500, 250, 1250])
    T, B = 16, 3
    ranks = [SequentialWindows(shards, B, T, seed=5, rank=r, world_size=2) for r in range(2)]
    seen: list[list[int]] = [[], []]
    for _ in range(len(ranks[0])):  # one epoch
        for r in range(2):
            x, y = ranks[r].next_batch()
            assert torch.equal(x[:, 1:], y[:, :-1])
            seen[r] += x[:, 0].tolist()
    assert not set(seen[0]) & set(seen[1])  # no window on both ranks
    n_windows = (2000 - T - 1) // T + 1
    assert len(seen[0]) + len(seen[1]) == len(set(seen[0]) | set(seen[1])) == n_windows - n_windows % (2 * B)
    # random windows: the two ranks' batches are the two halves of the one-process global batch
    solo = RandomWindows(shards, 2 * B, T, seed=9)
    duo = [RandomWindows(shards, B, T, seed=9, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):
        torch.testing.assert_close(solo.next_batch()[0], torch.cat([d.next_batch()[0] for d in duo]))


# --- bits per byte -----------------------------------------------------------------------------------


class UniformModel(torch.nn.Module):
    """Hidden states of zeros and a zero head: every next token has probability 1/V."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.out_head = torch.nn.Linear(4, vocab_size, bias=False)
        torch.nn.init.zeros_(self.out_head.weight)

    def forward(self, idx, return_hidden=False, return_logits=True):
        return ModelOutput(logits=None, hidden=torch.zeros(*idx.shape, 4))


class Fixed:
    def __init__(self, batch):
        self.batch = batch

    def next_batch(self):
        return self.batch


def test_bits_per_byte_on_a_hand_example():
    tok = Tokenizer.char("ab€")  # ids: a=0, b=1, €=2 (3 UTF-8 bytes), <|endoftext|>=3 (special: 0 bytes)
    assert token_byte_lengths(tok).tolist() == [1, 1, 3, 0]
    idx = torch.tensor([[0, 1, 2, 3, 0]])
    targets = torch.tensor([[1, 2, 3, 0, -100]])  # b, €, <eot> (not scored), a, ignored
    bpb = evaluate_bpb(UniformModel(4), Fixed((idx, targets)), 1, token_byte_lengths(tok), torch.device("cpu"))
    # three scored targets, each ln 4 nats; 1 + 3 + 1 bytes
    assert bpb == pytest.approx(3 * math.log(4) / (math.log(2) * 5))
    assert bpb == pytest.approx(3 * 2 / 5)  # = 2 bits per scored token over 5 bytes


# --- the stages, end to end ----------------------------------------------------------------------------


def test_parquet_corpus_through_download_tokenize_pretrain(tmp_path, corpus, http_dir, monkeypatch):
    from stages.download import app as download
    from stages.pretrain import app as pretrain
    from stages.tokenize import app as tokenize

    root, docs = corpus
    host = tmp_path / "mirror" / "huggingface.co" / "datasets" / "acme" / "edu" / "resolve" / "abc123" / "sample"
    host.mkdir(parents=True)
    for p in sorted(root.glob("*.parquet")):
        (host / p.name).write_bytes(p.read_bytes())
    monkeypatch.setenv(MIRROR_ENV, http_dir(tmp_path / "mirror"))
    url = "https://huggingface.co/datasets/acme/edu/resolve/abc123/sample/{shard:03d}_00000.parquet"
    pinned = {"000_00000.parquet": sha256_file(root / "000_00000.parquet")}
    params = {
        "download": {"sources": {"edu": {"url": url, "shards": 3, "check": "parquet", "shard_sha256": pinned}}},
        "tokenize": {
            "corpus": "edu",
            "kind": "bpe",
            "vocab_size": 300,
            "train_chars": 20000,
            "shard_tokens": 2000,
            "workers": 2,
            "val_files": 1,
        },
        "model": {
            "preset": "llama3-tiny",
            "context_length": 32,
            "emb_dim": 32,
            "n_layers": 1,
            "n_heads": 2,
            "n_kv_heads": 1,
            "hidden_dim": 64,
        },
        "hardware": {"device": "cpu", "peak_tflops": 1.0, "threads": 1},
        "pretrain": {
            "train": {
                "batch_size": 8,
                "lr": 1e-2,
                "min_lr": 1e-3,
                "warmup_steps": 2,
                "max_steps": 12,
                "eval_every": 6,
                "eval_batches": 2,
                "checkpoint_every": 6,
                "log_every": 2,
            },
            "prompts": ["The cell"],
            "sample": {"max_new_tokens": 8},
        },
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    p, raw, tokens = ["--params", str(tmp_path / "params.yaml")], tmp_path / "raw", tmp_path / "tokens"
    r = CliRunner().invoke(download, [*p, "--raw-dir", str(raw), "--reports", str(tmp_path / "rep" / "dl")])
    assert r.exit_code == 0, r.output
    dl = json.loads((tmp_path / "rep" / "dl" / "facts.json").read_text())["files"]["edu"]  # names: run facts
    assert dl["files"] == 3 and dl["rows"] == sum(map(len, docs))

    r = CliRunner().invoke(
        tokenize,
        [
            *p,
            "--raw-dir",
            str(raw),
            "--out",
            str(tokens),
            "--work",
            str(tmp_path / "w"),
            "--reports",
            str(tmp_path / "rep" / "tok"),
        ],
    )
    assert r.exit_code == 0, r.output
    meta = read_meta(tokens)
    assert meta["documents"] == {"train": len(docs[0]) + len(docs[1]), "val": len(docs[2])}
    assert len(meta["splits"]["train"]) > 1  # several shards: the loader reads across them

    r = CliRunner().invoke(
        pretrain,
        [
            *p,
            "--tokens",
            str(tokens),
            "--out",
            str(tmp_path / "model"),
            "--reports",
            str(tmp_path / "rep" / "pre"),
            "--ckpt",
            str(tmp_path / "ck"),
        ],
    )
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "rep" / "pre" / "metrics.json").read_text())
    assert m["step"] == 12 and math.isfinite(m["val_bpb"]) and m["val_loss"] < m["unigram_val_loss"] + 1
    # bpb and loss describe the same predictions: bpb ~ loss / (ln 2 * bytes per scored token)
    bytes_per_token = meta["bytes"]["val"] / (meta["val_tokens"] - meta["documents"]["val"] + 1)
    assert m["val_bpb"] == pytest.approx(m["val_loss"] / (math.log(2) * bytes_per_token), rel=0.25)
    bpb_rows = (tmp_path / "rep" / "pre" / "live" / "plots" / "metrics" / "val" / "bpb.tsv").read_text().splitlines()
    assert len(bpb_rows) == 1 + 3  # header + steps 0, 6, 12

    # A corpus file without the text column stops the stage with the file named, before anything is written.
    write_parquet(raw / "edu" / "003_00000.parquet", ["x"] * 3, column="content")
    r = CliRunner().invoke(
        tokenize,
        [
            *p,
            "--raw-dir",
            str(raw),
            "--out",
            str(tmp_path / "t2"),
            "--work",
            str(tmp_path / "w2"),
            "--reports",
            str(tmp_path / "rep" / "t2"),
        ],
    )
    assert r.exit_code == 1 and "003_00000.parquet: no column 'text'" in r.output
    assert not (tmp_path / "t2").exists()


def test_data_benchmark_runs_and_its_shards_equal_tiktoken():
    """The benchmark's logic on a tiny corpus (no speed asserted): the shards hold exactly tiktoken's ids."""
    from benchmarks import data as bench_data
    from tests.conftest import require_shared

    require_shared(bench_data.SHAKESPEARE)
    encode = bench_data.job_encode(0.2, reps=1)
    assert encode["same_tokens_as_tiktoken"] and encode["scaling_1_to_2"] > 0
    loader = bench_data.job_loader(steps=1, batches=20)
    assert loader["loader_tokens_per_s"] > 0 and loader["train_tokens_per_s_1_thread"] > 0
    table = bench_data.format_table(
        {
            "encode": encode,
            "loader": loader,
            "rss": {"text_mb": 1.0, "peak_rss_mb_main": 1.0, "peak_rss_mb_largest_worker": 1.0},
        }
    )
    assert "tiktoken" in table and "loader vs training" in table
