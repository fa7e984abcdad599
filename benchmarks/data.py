"""The data path at scale: streaming tokenization into shards vs tiktoken, its memory, and the loader's speed.

    python -m benchmarks.data                     # ~200 MB corpus for the memory figure; writes reports/bench_data.json
    python -m benchmarks.data --quick             # small corpora, the same code paths (CI smoke, < 1 min)

What it measures (targets from the issue that asked for it):

- **encode**: MB/s of UTF-8 text through ``tokenize_to_shards`` (parquet files in, uint16 shards + manifest
  out: reading, encoding, end-of-text, hashing, writing) with 1 and 2 worker processes, against tiktoken's
  ``encode_ordinary_batch`` over the same documents already in memory with ``num_threads`` = 1 and 2. Both use
  GPT-2's BPE (built from the mirror's files; llmcore's gpt2 tokenizer runs on tiktoken's core, so the
  difference is the pipeline around it). Targets: >= 0.8x tiktoken at equal workers; >= 1.7x from 1 to 2.
- **rss**: peak resident memory of the tokenizing process (``VmHWM``) and of its largest worker (``VmRSS``
  sampled every 50 ms) while a ~200 MB generated corpus streams through 2 workers, in a fresh subprocess.
  Target: <= 500 MB.
- **loader**: tokens/s of ``RandomWindows`` over a 4-shard ``TokenShards`` stream at the default run's batch
  (8 x 256), against the training tokens/s of the default model (llama3-tiny, same batch, forward + backward +
  AdamW) measured in the same run. Target: >= 50x.

Corpus: TinyShakespeare's paragraphs (from the mirror), shuffled into documents of 1-40 paragraphs, repeated
to size; wall-clock medians of ``reps`` repetitions. On a shared machine, compare figures of the same run only.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.timing import median, repeat, stopwatch
from llmcore.common import write_json_atomic

REPO_ROOT = Path(__file__).resolve().parents[1]
# ../shared beside the checkout (a worktree one level deeper finds it one level up)
MIRROR = next(
    (p / "shared" / "data" / "mirror" for p in REPO_ROOT.parents[:2] if (p / "shared").is_dir()),
    REPO_ROOT.parent / "shared" / "data" / "mirror",
)
SHAKESPEARE = MIRROR / "raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
GPT2_BPE = MIRROR / "openaipublic.blob.core.windows.net/gpt-2/encodings/main"


def make_documents(target_bytes: int, seed: int = 0) -> list[str]:
    paragraphs = [p for p in SHAKESPEARE.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    rng = np.random.default_rng(seed)
    docs, size = [], 0
    while size < target_bytes:
        doc = "\n\n".join(paragraphs[i] for i in rng.integers(0, len(paragraphs), rng.integers(1, 41)))
        docs.append(doc)
        size += len(doc.encode("utf-8"))
    return docs


def write_corpus(folder: Path, docs: list[str], files: int) -> list[Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, part in enumerate(np.array_split(np.arange(len(docs)), files)):
        path = folder / f"{i:03d}.parquet"
        pq.write_table(pa.table({"text": [docs[j] for j in part]}), path, row_group_size=1024)
        paths.append(path)
    return paths


@functools.cache
def gpt2_tokenizer():
    from llmcore.text.tokenizer import Tokenizer

    return Tokenizer.gpt2(GPT2_BPE / "encoder.json", GPT2_BPE / "vocab.bpe")


def tokenize_once(paths: list[Path], workers: int, tmp: Path) -> tuple[float, dict[str, Any]]:
    """Wall time of ``tokenize_to_shards`` over ``paths`` (the last file is validation); the tokenizer is built
    before the clock starts, the worker processes' start-up is inside it."""
    from llmcore.data.shards import Source, tokenize_to_shards

    splits = {"train": [Source(str(p), path=p) for p in paths[:-1]], "val": [Source(str(paths[-1]), path=paths[-1])]}
    tok = gpt2_tokenizer()
    with stopwatch() as clock:
        meta = tokenize_to_shards(
            splits,
            tok,
            tmp / "out",
            tmp / "work",
            shard_tokens=10_000_000,
            workers=workers,
            progress_bar=False,
            log=lambda _: None,
        )
    return clock.seconds, meta


def tiktoken_gpt2():
    """tiktoken's GPT-2 ``Encoding`` from the mirror's files (tiktoken's own loader; no download, no cache)."""
    import os

    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    ranks = data_gym_to_mergeable_bpe_ranks(str(GPT2_BPE / "vocab.bpe"), str(GPT2_BPE / "encoder.json"))
    return tiktoken.Encoding(
        "gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": 50256},
        explicit_n_vocab=50257,
    )


def job_encode(mb: float, reps: int) -> dict[str, Any]:
    docs = make_documents(int(mb * 1e6))
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    out: dict[str, Any] = {"mb": n_bytes / 1e6, "documents": len(docs)}
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_corpus(Path(tmp) / "corpus", docs, files=4)
        tik = tiktoken_gpt2()
        for workers in (1, 2):
            walls = []
            for r in range(reps):
                wall, meta = tokenize_once(paths, workers, Path(tmp) / f"run{workers}_{r}")
                walls.append(wall)
            mb_per_s = n_bytes / 1e6 / median(walls)
            out[f"llmcore shards, {workers} worker(s)"] = {"wall_s": walls, "mb_per_s": mb_per_s}
            encoded: list[list[list[int]]] = []
            encode = lambda n=workers, into=encoded: into.append(tik.encode_ordinary_batch(docs, num_threads=n))
            timed = repeat(encode, reps, warmup=0)
            ids = encoded[-1]
            out[f"tiktoken encode_ordinary_batch, {workers} thread(s)"] = {
                "wall_s": timed.wall_s,
                "mb_per_s": n_bytes / 1e6 / timed.median,
            }
        # the same tokens: the shards hold tiktoken's ids, one end-of-text between the documents of a split
        n_val = len(np.array_split(np.arange(len(docs)), 4)[-1])
        expected = []
        for part in (ids[: len(docs) - n_val], ids[len(docs) - n_val :]):
            expected += [np.asarray(sum(([50256, *d] for d in part), [])[1:], dtype=np.uint16)]
        out_dir = Path(tmp) / f"run2_{reps - 1}" / "out"
        got = [
            np.concatenate([np.fromfile(out_dir / e["file"], dtype=np.uint16) for e in meta["splits"][split]])
            for split in ("train", "val")
        ]
        out["tokens"] = meta["train_tokens"] + meta["val_tokens"]
        out["same_tokens_as_tiktoken"] = all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
    ours = {w: out[f"llmcore shards, {w} worker(s)"]["mb_per_s"] for w in (1, 2)}
    for w in (1, 2):
        out[f"ratio_vs_tiktoken_{w}"] = ours[w] / out[f"tiktoken encode_ordinary_batch, {w} thread(s)"]["mb_per_s"]
    out["scaling_1_to_2"] = ours[2] / ours[1]
    return out


def _vm_kb(pid: int | str, field: str) -> int:
    """``VmHWM`` / ``VmRSS`` of a process in kB (0 if it is gone). VmHWM belongs to the process' own address space,
    so unlike ``getrusage``'s ru_maxrss it does not inherit the parent's size across fork + exec."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith(field + ":")), 0)
    except OSError:
        return 0


def _children(pid: int) -> set[int]:
    out = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            out |= {int(c) for c in (task / "children").read_text().split()}
    return out


def job_rss(mb: float) -> dict[str, Any]:
    """Run in a fresh process: generate the corpus in a child, then tokenize it here with 2 workers, sampling
    the workers' resident memory every 50 ms."""
    import os
    import threading

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "corpus"
        # generating the corpus holds it in memory; do it in another process so this one's peak is the tokenizer's
        subprocess.run(
            [sys.executable, "-m", "benchmarks.data", "--worker", "corpus", "--mb", str(mb), "--dir", str(folder)],
            check=True,
            cwd=REPO_ROOT,
        )
        paths = sorted(folder.glob("*.parquet"))
        corpus_mb = sum(p.stat().st_size for p in paths) / 1e6
        peaks: dict[int, int] = {}
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.05):
                for child in _children(os.getpid()):
                    peaks[child] = max(peaks.get(child, 0), _vm_kb(child, "VmRSS"))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        wall, meta = tokenize_once(paths, 2, Path(tmp))
        done.set()
        sampler.join()
    text_mb = sum(meta["bytes"].values()) / 1e6
    return {
        "text_mb": text_mb,
        "parquet_mb": corpus_mb,
        "tokens": meta["train_tokens"] + meta["val_tokens"],
        "wall_s": wall,
        "peak_rss_mb_main": _vm_kb("self", "VmHWM") / 1024,
        "peak_rss_mb_largest_worker": max(peaks.values(), default=0) / 1024,
        "peak_rss_mb_all_workers": sum(sorted(peaks.values())[-2:]) / 1024,
    }


def job_loader(steps: int, batches: int = 500) -> dict[str, Any]:
    import torch

    from llmcore.data.tokens import RandomWindows, TokenShards
    from llmcore.models.config import ModelConfig
    from llmcore.models.gpt import GPT
    from llmcore.training.loop import lm_loss

    torch.set_num_threads(1)
    B, T = 8, 256
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        maps = []
        for i in range(4):  # 4 shards of 2.5M tokens, memory-mapped as the pretrain stage does
            path = Path(tmp) / f"train_{i:06d}.bin"
            rng.integers(0, 1024, 2_500_000, dtype=np.uint16).tofile(path)
            maps.append(np.memmap(path, dtype=np.uint16, mode="r"))
        windows = RandomWindows(TokenShards(maps), B, T, seed=0)
        with stopwatch() as clock:
            for _ in range(batches):
                windows.next_batch()
        loader = batches * B * T / clock.seconds
    cfg = ModelConfig.from_preset("llama3-tiny", context_length=T)
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    batch = windows.next_batch()

    def step() -> None:
        loss, _ = lm_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    train = B * T / repeat(step, steps, warmup=2).median
    return {
        "loader_tokens_per_s": loader,
        "train_tokens_per_s_1_thread": train,
        "ratio": loader / train,
        "batch": [B, T],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.data", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small corpora (CI smoke)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "reports" / "bench_data.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--mb", type=float, default=200.0, help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker == "corpus":
        write_corpus(args.dir, make_documents(int(args.mb * 1e6), seed=1), files=8)
        return 0
    if args.worker == "rss":
        print("BENCH_RESULT " + json.dumps(job_rss(args.mb)))
        return 0

    encode_mb, rss_mb, reps, steps = (2.0, 10.0, 1, 3) if args.quick else (20.0, 200.0, 3, 10)
    report: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine(), "quick": args.quick}
    print(f"encode: {encode_mb:.0f} MB, 1 and 2 workers vs tiktoken ...", flush=True)
    report["encode"] = job_encode(encode_mb, reps)
    print(f"rss: tokenizing a {rss_mb:.0f} MB corpus with 2 workers (fresh process) ...", flush=True)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.data", "--worker", "rss", "--mb", str(rss_mb)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
    )
    if proc.returncode:
        raise SystemExit(proc.stderr)
    report["rss"] = json.loads(proc.stdout.split("BENCH_RESULT ", 1)[1])
    print("loader: windows over 4 shards vs the default model's training step ...", flush=True)
    report["loader"] = job_loader(steps)
    write_json_atomic(args.out, report)
    print(format_table(report))
    print(f"wrote {args.out}")
    return 0


def format_table(r: dict[str, Any]) -> str:
    e, m, ld = r["encode"], r["rss"], r["loader"]
    rows = ["| measurement | figure | target |", "|---|---|---|"]
    for w in (1, 2):
        rows.append(
            f"| encode, {w} worker(s): llmcore shards / tiktoken batch | "
            f"{e[f'llmcore shards, {w} worker(s)']['mb_per_s']:.2f} / "
            f"{e[f'tiktoken encode_ordinary_batch, {w} thread(s)']['mb_per_s']:.2f} MB/s "
            f"({e[f'ratio_vs_tiktoken_{w}']:.2f}x) | >= 0.8x |"
        )
    rows.append(f"| encode scaling 1 -> 2 workers | {e['scaling_1_to_2']:.2f}x | >= 1.7x |")
    rows.append(
        f"| peak RSS tokenizing {m['text_mb']:.0f} MB (2 workers): main / largest worker | "
        f"{m['peak_rss_mb_main']:.0f} / {m['peak_rss_mb_largest_worker']:.0f} MB | <= 500 MB |"
    )
    rows.append(
        f"| loader vs training (8 x 256) | {ld['loader_tokens_per_s']:,.0f} vs "
        f"{ld['train_tokens_per_s_1_thread']:,.0f} tokens/s ({ld['ratio']:.0f}x) | >= 50x |"
    )
    return "\n".join(rows)


if __name__ == "__main__":
    raise SystemExit(main())
