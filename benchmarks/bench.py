"""Benchmarks against the reference implementations: training and generation speed, BPE training, encoding.

    python -m benchmarks.bench                 # full run (~10 min on 2 idle cores), writes reports/bench.json
    python -m benchmarks.bench --quick         # tiny shapes, every code path, under a minute (CI smoke)
    python -m benchmarks.bench --only train,loss --out /tmp/bench.json

Peers, each measured in the same run at the same shapes: the book's model (PyPI ``llms-from-scratch``,
``ch04.GPTModel`` and ``generate_text_simple``), Hugging Face ``transformers`` (``GPT2LMHeadModel`` and its
cached ``generate``), HF ``tokenizers`` (byte-level BPE trainer) and ``tiktoken`` (GPT-2 encoding, built
from the mirror's ``encoder.json``/``vocab.bpe``; ``tiktoken.get_encoding`` would download). A peer that
is not installed is reported as skipped. ``make bench`` installs them.

How it measures:
- Every figure is the median of several timed repetitions after warm-up; wall clock (``perf_counter``),
  with the process CPU time recorded beside it (``cpu_s``): on a shared machine the two diverge.
- In the full run every training and generation measurement runs in a fresh subprocess, so its peak
  RSS (``getrusage``) is its own. ``--quick`` runs everything in-process and reports no RSS.
- Training step = forward + cross-entropy + backward + AdamW(lr 4e-4, weight_decay 0.1) step, as the
  book trains. Peers run as their users run them (AdamW's default foreach kernel); "book + fused AdamW"
  shows the book model with the one optimisation that is a flag away. llmcore uses fused AdamW and
  ``llmcore.models.ops.linear_cross_entropy`` (head + loss fused, chunked); "llmcore, unfused CE" isolates it.
- MFU = tokens/s x ``ModelConfig.flops_per_token`` / the matmul peak measured in the same run.
- Loss check: the book model's initial weights are copied into llmcore (``book_to_llmcore``); both then
  train on the same batches with dropout 0 and their losses must agree step by step.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.timing import median, repeat
from llmcore.common import write_json_atomic
from llmcore.models.config import ModelConfig
from llmcore.models.gpt import GPT
from llmcore.training.flops import measure_matmul_peak

REPO_ROOT = Path(__file__).resolve().parents[1]
MIRROR = REPO_ROOT.parent / "shared" / "data" / "mirror"
SHAKESPEARE = MIRROR / "raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
GPT2_BPE = MIRROR / "openaipublic.blob.core.windows.net/gpt-2/encodings/main"
RESULT_PREFIX = "BENCH_RESULT "
LR, WEIGHT_DECAY = 4e-4, 0.1  # the book's AdamW settings (ch05)

# ---------------------------------------------------------------------------------------------------
# What to run
# ---------------------------------------------------------------------------------------------------


@dataclass
class Shape:
    vocab_size: int = 50257
    context_length: int = 256
    emb_dim: int = 384
    n_heads: int = 6
    n_layers: int = 6
    batch_size: int = 4
    dropout: float = 0.1


@dataclass
class Plan:
    shape: Shape = field(default_factory=Shape)
    train_warmup: int = 2
    train_reps: int = 3  # per round
    train_peers: tuple[str, ...] = ("llmcore", "llmcore-untied", "llmcore-unfused-ce", "book", "book-fused", "hf")
    precisions: tuple[str, ...] = ("fp32", "bf16")
    gen_prompt: int = 20
    gen_new: int = 200
    gen_reps: int = 2  # per round
    bpe_vocabs: tuple[int, ...] = (512, 1024)
    bpe_reps: int = 3
    text_bytes: int | None = None  # None: all of TinyShakespeare
    encode_reps: int = 5
    loss_steps: int = 5
    peak_n: int = 2048
    peak_reps: int = 5
    isolate: bool = True  # one subprocess per training/generation measurement (per-run peak RSS)
    # Peak, training and generation are measured in rounds, the peer order reversed each round, and the
    # repetitions of all rounds pooled: on a shared machine a slow minute then hits every peer alike.
    rounds: int = 2


FULL = Plan()
QUICK = Plan(
    shape=Shape(vocab_size=512, context_length=64, emb_dim=64, n_heads=2, n_layers=2, batch_size=2),
    train_warmup=1,
    train_reps=3,
    train_peers=("llmcore", "book", "hf"),
    gen_new=20,
    gen_reps=2,
    bpe_vocabs=(300, 400),
    bpe_reps=1,
    text_bytes=100_000,
    encode_reps=2,
    loss_steps=3,
    peak_n=512,
    peak_reps=3,
    isolate=False,
    rounds=1,
)

SECTIONS = ("peak", "train", "loss", "generate", "bpe", "encode")


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


PEER_MODULES = {"book": "llms_from_scratch", "hf": "transformers", "tokenizers": "tokenizers"}
INSTALL_HINT = {
    "llms_from_scratch": "pip install --no-deps llms-from-scratch",
    "transformers": "pip install transformers",
    "tokenizers": "pip install tokenizers",
}


def missing_peer(peer: str) -> str | None:
    """The reason a peer cannot run here (its package is not installed), or None."""
    module = PEER_MODULES.get(peer.split("-")[0])
    if module is None or have(module):
        return None
    return f"{module} not installed ({INSTALL_HINT[module]})"


# ---------------------------------------------------------------------------------------------------
# Timing helpers
# ---------------------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any], warmup: int, reps: int) -> tuple[list[float], list[float]]:
    """Wall and process-CPU seconds of ``reps`` calls after ``warmup`` untimed ones."""
    t = repeat(fn, reps, warmup)
    return t.wall_s, t.cpu_s


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1 << 20) if sys.platform == "darwin" else rss / 1024


# ---------------------------------------------------------------------------------------------------
# The models at one shape
# ---------------------------------------------------------------------------------------------------


def llmcore_config(shape: Shape, **overrides: Any) -> ModelConfig:
    """GPT-2 style llmcore config at the bench shape (tied head, as GPT-2)."""
    kw = dict(
        vocab_size=shape.vocab_size,
        context_length=shape.context_length,
        emb_dim=shape.emb_dim,
        n_heads=shape.n_heads,
        n_layers=shape.n_layers,
        dropout=shape.dropout,
    )
    return ModelConfig.from_preset("gpt2-124m", **{**kw, **overrides})


def book_config(shape: Shape, dropout: float | None = None) -> dict[str, Any]:
    """The book's GPT_CONFIG dict (ch04) at the bench shape; qkv_bias on, as GPT-2."""
    return {
        "vocab_size": shape.vocab_size,
        "context_length": shape.context_length,
        "emb_dim": shape.emb_dim,
        "n_heads": shape.n_heads,
        "n_layers": shape.n_layers,
        "qkv_bias": True,
        "drop_rate": shape.dropout if dropout is None else dropout,
    }


def hf_model(shape: Shape, dropout: float | None = None):
    from transformers import GPT2Config, GPT2LMHeadModel

    p = shape.dropout if dropout is None else dropout
    cfg = GPT2Config(
        vocab_size=shape.vocab_size,
        n_positions=shape.context_length,
        n_embd=shape.emb_dim,
        n_layer=shape.n_layers,
        n_head=shape.n_heads,
        resid_pdrop=p,
        embd_pdrop=p,
        attn_pdrop=p,
        bos_token_id=shape.vocab_size - 1,
        eos_token_id=shape.vocab_size - 1,
    )
    return GPT2LMHeadModel(cfg)


def book_to_llmcore(book: torch.nn.Module, cfg: ModelConfig) -> GPT:
    """An llmcore GPT holding the weights of the book's ``GPTModel`` (``cfg`` must be untied, same shape).

    The book keeps separate W_query/W_key/W_value projections (llmcore fuses them into ``qkv``), names
    its LayerNorm parameters scale/shift, and its MLP is ``ff.layers.{0,2}``; all are (out, in) Linears,
    so nothing is transposed.
    """
    if cfg.tie_embeddings:
        raise ValueError("the book's GPTModel has an untied output head: use tie_embeddings=False")
    src = book.state_dict()
    dst: dict[str, torch.Tensor] = {
        "tok_emb.weight": src["tok_emb.weight"],
        "pos_emb.weight": src["pos_emb.weight"],
        "final_norm.weight": src["final_norm.scale"],
        "final_norm.bias": src["final_norm.shift"],
        "out_head.weight": src["out_head.weight"],
    }
    for i in range(cfg.n_layers):
        b, o = f"trf_blocks.{i}.", f"blocks.{i}."
        qkv = [f"{b}att.W_query", f"{b}att.W_key", f"{b}att.W_value"]
        dst[o + "attn.qkv.weight"] = torch.cat([src[k + ".weight"] for k in qkv])
        if cfg.qkv_bias:
            dst[o + "attn.qkv.bias"] = torch.cat([src[k + ".bias"] for k in qkv])
        for ours, theirs in (("attn.proj", "att.out_proj"), ("mlp.fc", "ff.layers.0"), ("mlp.proj", "ff.layers.2")):
            dst[f"{o}{ours}.weight"], dst[f"{o}{ours}.bias"] = src[f"{b}{theirs}.weight"], src[f"{b}{theirs}.bias"]
        for n in ("norm1", "norm2"):
            dst[f"{o}{n}.weight"], dst[f"{o}{n}.bias"] = src[f"{b}{n}.scale"], src[f"{b}{n}.shift"]
    model = GPT(cfg)
    model.load_state_dict(dst, strict=True)  # strict: a missed or extra tensor is an error, not a silent init
    return model


def make_train_step(peer: str, shape: Shape, precision: str, seed: int = 0):
    """A closure running one training step of ``peer`` on a fixed random batch, and its model."""
    torch.manual_seed(seed)
    B, T, V = shape.batch_size, shape.context_length, shape.vocab_size
    x, y = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))
    if peer.startswith("llmcore"):
        from llmcore.models.ops import linear_cross_entropy

        model = GPT(llmcore_config(shape, tie_embeddings=peer != "llmcore-untied"))
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
        if peer == "llmcore-unfused-ce":
            loss_fn = lambda: F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten())
        else:
            loss_fn = lambda: linear_cross_entropy(
                model(x, return_logits=False, return_hidden=True).hidden, model.out_head.weight, y
            )
    elif peer.startswith("book"):
        from llms_from_scratch.ch04 import GPTModel

        model = GPTModel(book_config(shape))
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=peer == "book-fused")
        loss_fn = lambda: F.cross_entropy(model(x).flatten(0, 1), y.flatten())  # ch05 calc_loss_batch
    elif peer == "hf":
        model = hf_model(shape)
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        loss_fn = lambda: F.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten())
    else:
        raise ValueError(f"unknown training peer {peer!r}")
    model.train()

    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step, model


def make_generate(peer: str, shape: Shape, prompt_len: int, new_tokens: int, seed: int = 0):
    """A closure generating ``new_tokens`` greedy tokens after a random prompt (batch 1); returns the ids."""
    torch.manual_seed(seed)
    prompt = torch.randint(0, shape.vocab_size, (1, prompt_len))
    if peer == "llmcore":
        from llmcore.models.generate import SamplingConfig, generate

        model = GPT(llmcore_config(shape, dropout=0.0)).eval()
        ids = prompt[0].tolist()
        return lambda n=new_tokens: generate(model, [ids], SamplingConfig(max_new_tokens=n), use_cache=True)[0]
    if peer == "book":
        from llms_from_scratch.ch04 import GPTModel, generate_text_simple

        model = GPTModel(book_config(shape, dropout=0.0)).eval()
        ctx = shape.context_length
        return lambda n=new_tokens: generate_text_simple(model, prompt, n, ctx)[0, prompt_len:].tolist()
    if peer == "hf":
        model = hf_model(shape, dropout=0.0).eval()
        eos = model.config.eos_token_id

        def run(n: int = new_tokens) -> list[int]:
            out = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                use_cache=True,
                pad_token_id=eos,
            )
            return out[0, prompt_len:].tolist()

        return run
    raise ValueError(f"unknown generation peer {peer!r}")


def read_text(plan: Plan) -> str:
    text = SHAKESPEARE.read_text(encoding="utf-8")
    return text[: plan.text_bytes] if plan.text_bytes else text


# ---------------------------------------------------------------------------------------------------
# Jobs: each returns a JSON-able dict; run in-process or in a fresh subprocess
# ---------------------------------------------------------------------------------------------------


def job_peak(plan: Plan, precision: str) -> dict[str, Any]:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    return {"flops": measure_matmul_peak(dtype, "cpu", n=plan.peak_n, reps=plan.peak_reps)}


def job_train(plan: Plan, peer: str, precision: str) -> dict[str, Any]:
    step, _ = make_train_step(peer, plan.shape, precision)
    wall, cpu = timed(step, plan.train_warmup, plan.train_reps)
    tokens = plan.shape.batch_size * plan.shape.context_length
    return {"wall_s": wall, "cpu_s": cpu, "tokens_per_s": tokens / median(wall)}


def job_generate(plan: Plan, peer: str) -> dict[str, Any]:
    run = make_generate(peer, plan.shape, plan.gen_prompt, plan.gen_new)
    run(min(8, plan.gen_new))  # warm-up: allocator, BLAS threads
    ids: list[int] = []

    def once() -> None:
        ids[:] = run()

    wall, cpu = timed(once, 0, plan.gen_reps)
    if len(ids) != plan.gen_new:
        raise RuntimeError(f"{peer} generated {len(ids)} tokens, expected {plan.gen_new}")
    return {"wall_s": wall, "cpu_s": cpu, "new_tokens_per_s": plan.gen_new / median(wall)}


def job_loss(plan: Plan) -> dict[str, Any]:
    """Same init, same batches, dropout 0: llmcore's training step (fused CE, fused AdamW) vs the book's."""
    from llms_from_scratch.ch04 import GPTModel

    from llmcore.models.ops import linear_cross_entropy

    shape = plan.shape
    torch.manual_seed(123)
    book = GPTModel(book_config(shape, dropout=0.0))
    ours = book_to_llmcore(book, llmcore_config(shape, dropout=0.0, tie_embeddings=False))
    B, T = shape.batch_size, shape.context_length
    batches, data = _loss_batches(plan, plan.loss_steps, B, T)
    with torch.no_grad():
        init_diff = (book(batches[0][0]) - ours(batches[0][0]).logits).abs().max().item()
    opt_book = torch.optim.AdamW(book.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
    book_losses, our_losses = [], []
    for x, y in batches:
        loss = F.cross_entropy(book(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt_book.step()
        opt_book.zero_grad(set_to_none=True)
        book_losses.append(loss.item())
        loss = linear_cross_entropy(ours(x, return_logits=False, return_hidden=True).hidden, ours.out_head.weight, y)
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)
        our_losses.append(loss.item())
    max_diff = max(abs(a - b) for a, b in zip(book_losses, our_losses, strict=True))
    return {
        "data": data,
        "steps": len(batches),
        "book": book_losses,
        "llmcore": our_losses,
        "init_logits_max_diff": init_diff,
        "max_abs_diff": max_diff,
        "ok": init_diff < 1e-4 and max_diff < 1e-3 and our_losses[-1] < our_losses[0],
    }


def _loss_batches(plan: Plan, steps: int, B: int, T: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], str]:
    """Next-token batches from TinyShakespeare in GPT-2 tokens when the shape has GPT-2's vocabulary and the
    mirror is there (a real loss curve); random tokens otherwise (the check is the same)."""
    n = steps * B * T + 1
    if plan.shape.vocab_size == 50257 and SHAKESPEARE.exists() and (GPT2_BPE / "vocab.bpe").exists():
        from llmcore.text.tokenizer import Tokenizer

        tok = Tokenizer.gpt2(GPT2_BPE / "encoder.json", GPT2_BPE / "vocab.bpe")
        ids = torch.tensor(tok.encode(SHAKESPEARE.read_text(encoding="utf-8")[: 8 * n], allow_special=False)[:n])
        data = "tinyshakespeare (gpt2 tokens)"
    else:
        ids = torch.randint(0, plan.shape.vocab_size, (n,), generator=torch.Generator().manual_seed(0))
        data = "random tokens"
    x, y = ids[:-1].view(steps, B, T), ids[1:].view(steps, B, T)
    return list(zip(x, y, strict=True)), data


def job_bpe(plan: Plan, trainer: str) -> dict[str, Any]:
    """Seconds to train a byte-level BPE at each vocab size, and bytes/token of the result on the same text."""
    text = read_text(plan)
    n_bytes = len(text.encode("utf-8"))
    out: dict[str, Any] = {"text_bytes": n_bytes}
    for vocab in plan.bpe_vocabs:
        if trainer == "llmcore":
            from llmcore.text.tokenizer import Tokenizer

            train = lambda v=vocab: Tokenizer.train(text, v, pattern="gpt2")
            encode = lambda tok: tok.encode(text, allow_special=False)
        else:
            train, encode = _hf_bpe_trainer(text, vocab), lambda tok: tok.encode(text).ids
        made: list[Any] = []
        wall, cpu = timed(lambda t=train, made=made: made.append(t()), 0, plan.bpe_reps)
        tok = made[-1]
        n_vocab = tok.vocab_size if trainer == "llmcore" else tok.get_vocab_size()
        out[str(vocab)] = {
            "wall_s": wall,
            "cpu_s": cpu,
            "seconds": median(wall),
            "vocab_size": n_vocab,
            "bytes_per_token": n_bytes / len(encode(tok)),
        }
    return out


def _hf_bpe_trainer(text: str, vocab: int) -> Callable[[], Any]:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    def train():
        tok = Tokenizer(models.BPE())
        # ByteLevel = GPT-2's split regex + byte-to-unicode map, the same pre-tokenization llmcore uses
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab,
            special_tokens=["<|endoftext|>"],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator([text], trainer)
        return tok

    return train


def tiktoken_gpt2():
    """tiktoken's GPT-2 ``Encoding`` from local files (tiktoken's own loader; no download, no cache)."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    os.environ["TIKTOKEN_CACHE_DIR"] = ""  # "" disables tiktoken's file cache
    ranks = data_gym_to_mergeable_bpe_ranks(str(GPT2_BPE / "vocab.bpe"), str(GPT2_BPE / "encoder.json"))
    return tiktoken.Encoding(
        "gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": 50256},
        explicit_n_vocab=50257,
    )


def job_encode(plan: Plan) -> dict[str, Any]:
    """MB/s of plain-text encoding (no special tokens), one thread, same text for all."""
    from llmcore.text.tokenizer import Tokenizer

    text = read_text(plan)
    mb = len(text.encode("utf-8")) / 1e6
    trained = Tokenizer.train(text[:200_000], max(plan.bpe_vocabs), pattern="gpt2")
    gpt2 = Tokenizer.gpt2(GPT2_BPE / "encoder.json", GPT2_BPE / "vocab.bpe")
    tik = tiktoken_gpt2()
    encoders = {
        f"llmcore bpe{trained.vocab_size}": lambda: trained.encode(text, allow_special=False),
        "llmcore gpt2": lambda: gpt2.encode(text, allow_special=False),
        "tiktoken gpt2": lambda: tik.encode_ordinary(text),
    }
    same = gpt2.encode(text, allow_special=False) == tik.encode_ordinary(text)
    out: dict[str, Any] = {"mb": mb, "same_ids_as_tiktoken": same}
    for name, fn in encoders.items():
        wall, cpu = timed(fn, 1, plan.encode_reps)
        out[name] = {"wall_s": wall, "cpu_s": cpu, "mb_per_s": mb / median(wall)}
    return out


JOBS: dict[str, Callable[..., dict[str, Any]]] = {
    "peak": job_peak,
    "train": job_train,
    "loss": job_loss,
    "generate": job_generate,
    "bpe": job_bpe,
    "encode": job_encode,
}


def run_job(plan: Plan, job: dict[str, Any]) -> dict[str, Any]:
    """Run one job here; add this process' peak RSS (meaningful only in a fresh subprocess)."""
    args = {k: v for k, v in job.items() if k != "job"}
    result = JOBS[job["job"]](plan, **args)
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def run_in_process(plan: Plan, job: dict[str, Any]) -> dict[str, Any]:
    result = run_job(plan, job)
    result["peak_rss_mb"] = None  # the process also ran other jobs: its peak says nothing about this one
    return result


def run_in_subprocess(plan: Plan, job: dict[str, Any]) -> dict[str, Any]:
    """Run one job in a fresh interpreter (``--worker``) so that its peak RSS is its own."""
    payload = json.dumps({"plan": asdict(plan), "job": job})
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench", "--worker", payload],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    raise RuntimeError(f"worker for {job} exited {proc.returncode}: {tail}")


def plan_from_dict(d: dict[str, Any]) -> Plan:
    shape = Shape(**d.pop("shape"))
    return Plan(shape=shape, **{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# ---------------------------------------------------------------------------------------------------
# The run: jobs -> results -> ratios, targets, table
# ---------------------------------------------------------------------------------------------------

TARGETS = [
    # (key, description, goal): key names a ratio computed in `summarise`
    ("train_fp32_vs_book", "training fp32: llmcore / book tokens/s", 1.1),
    ("train_bf16_vs_book", "training bf16 autocast: llmcore / book tokens/s", 1.5),
    ("gen_vs_hf", "generation: llmcore / transformers new tokens/s", 1.5),
    ("gen_vs_book", "generation: llmcore / book new tokens/s", 8.0),
    ("bpe_time_vs_tokenizers", "BPE training at the largest vocab: llmcore / tokenizers seconds (<= goal)", 3.0),
    ("bpe_compression_gap", "BPE compression: |bytes/token gap| vs tokenizers, % (<= goal)", 1.0),
    ("encode_vs_tiktoken", "encoding: llmcore gpt2 / tiktoken gpt2 MB/s", 0.9),
]
AT_MOST = {"bpe_time_vs_tokenizers", "bpe_compression_gap"}


def run_benchmarks(plan: Plan, sections: tuple[str, ...] = SECTIONS, runner=None, log=print) -> dict[str, Any]:
    """Run the selected sections and return the report (also what ``--out`` writes)."""
    runner = runner or (run_in_subprocess if plan.isolate else run_in_process)
    load_before = os.getloadavg()
    started = time.perf_counter()
    results: dict[str, Any] = {"skipped": {}}

    def attempt(key: str, job: dict[str, Any], peer: str | None = None, tag: str = "") -> dict[str, Any] | None:
        reason = missing_peer(peer) if peer else None
        if reason is None:
            log(f"  {key}{tag} ...", end="", flush=True)
            t = time.perf_counter()
            try:
                out = runner(plan, job)
                log(f" {time.perf_counter() - t:.0f}s")
                return out
            except Exception as e:  # one broken peer must not lose the other measurements
                reason = f"failed: {e}"
                log(" failed")
        results["skipped"][key] = reason
        return None

    # (section, key, job, peer) measured in rounds; the rest once
    timed_jobs = []
    if "peak" in sections:
        timed_jobs += [("peak", p, {"job": "peak", "precision": p}, None) for p in plan.precisions]
    if "train" in sections:
        timed_jobs += [
            ("train", f"{peer} {p}", {"job": "train", "peer": peer, "precision": p}, peer)
            for p in plan.precisions
            for peer in plan.train_peers
        ]
    if "generate" in sections:
        timed_jobs += [("generate", g, {"job": "generate", "peer": g}, g) for g in ("llmcore", "hf", "book")]
    for section, key, _, _ in timed_jobs:
        results.setdefault(section, {})[key] = None
    for r in range(plan.rounds):
        # peaks first in every round (the machine's best, for MFU); the peers in alternating order
        order = timed_jobs if r % 2 == 0 else sorted(timed_jobs[::-1], key=lambda j: j[0] != "peak")
        for section, key, job, peer in order:
            tag = f" (round {r + 1}/{plan.rounds})" if plan.rounds > 1 else ""
            out = attempt(f"{section} {key}", job, peer, tag)
            results[section][key] = _pool(section, results[section][key], out, plan)
    if "loss" in sections:
        results["loss"] = attempt("loss check", {"job": "loss"}, "book")
    if ("bpe" in sections or "encode" in sections) and not SHAKESPEARE.exists():
        results["skipped"]["bpe/encode"] = f"corpus missing: {SHAKESPEARE}"
        sections = tuple(s for s in sections if s not in ("bpe", "encode"))
    if "bpe" in sections:
        results["bpe"] = {t: attempt(f"bpe {t}", {"job": "bpe", "trainer": t}, t) for t in ("llmcore", "tokenizers")}
    if "encode" in sections:
        results["encode"] = attempt("encode", {"job": "encode"})

    report = {
        "meta": {
            "quick": plan is QUICK or plan.shape == QUICK.shape,
            "plan": asdict(plan),
            "sections": list(sections),
            "cpu": _cpu_name(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "seconds": time.perf_counter() - started,
        },
        **results,
    }
    report["ratios"] = summarise(report, plan)
    report["targets"] = [
        {
            "key": k,
            "what": what,
            "goal": goal,
            "value": report["ratios"].get(k),
            "met": None
            if report["ratios"].get(k) is None
            else (report["ratios"][k] <= goal if k in AT_MOST else report["ratios"][k] >= goal),
        }
        for k, what, goal in TARGETS
    ]
    return report


def _pool(section: str, old: dict[str, Any] | None, new: dict[str, Any] | None, plan: Plan) -> dict[str, Any] | None:
    """Merge one more round into a result: repetitions pooled, figures recomputed from the pooled median."""
    if old is None or new is None:
        return old or new
    if section == "peak":  # the best the machine did: a preempted round must not inflate MFU
        return {"flops": max(old["flops"], new["flops"]), "peak_rss_mb": new["peak_rss_mb"]}
    out = {**new, "wall_s": old["wall_s"] + new["wall_s"], "cpu_s": old["cpu_s"] + new["cpu_s"]}
    rss = [r for r in (old["peak_rss_mb"], new["peak_rss_mb"]) if r is not None]
    out["peak_rss_mb"] = max(rss) if rss else None
    mid = median(out["wall_s"])
    if section == "train":
        out["tokens_per_s"] = plan.shape.batch_size * plan.shape.context_length / mid
    else:
        out["new_tokens_per_s"] = plan.gen_new / mid
    return out


def summarise(report: dict[str, Any], plan: Plan) -> dict[str, float]:
    """Ratios between peers (and MFU figures filled into the training rows)."""
    ratios: dict[str, float] = {}
    train, peak = report.get("train") or {}, report.get("peak") or {}
    flops_per_token = llmcore_config(plan.shape).flops_per_token(plan.shape.context_length)
    for key, row in train.items():
        if row is None:
            continue
        p = key.split()[-1]
        if peak.get(p):
            row["mfu"] = row["tokens_per_s"] * flops_per_token / peak[p]["flops"]
    for p in plan.precisions:
        ours, book = train.get(f"llmcore {p}"), train.get(f"book {p}")
        if ours and book:
            ratios[f"train_{p}_vs_book"] = ours["tokens_per_s"] / book["tokens_per_s"]
            # the same ratio from process CPU time: robust to other load on the machine
            ratios[f"train_{p}_vs_book_cpu"] = median(book["cpu_s"]) / median(ours["cpu_s"])
    gen = report.get("generate") or {}
    for peer in ("hf", "book"):
        if gen.get("llmcore") and gen.get(peer):
            ratios[f"gen_vs_{peer}"] = gen["llmcore"]["new_tokens_per_s"] / gen[peer]["new_tokens_per_s"]
            ratios[f"gen_vs_{peer}_cpu"] = median(gen[peer]["cpu_s"]) / median(gen["llmcore"]["cpu_s"])
    bpe = report.get("bpe") or {}
    if bpe.get("llmcore") and bpe.get("tokenizers"):
        v = str(max(plan.bpe_vocabs))
        ours, theirs = bpe["llmcore"][v], bpe["tokenizers"][v]
        ratios["bpe_time_vs_tokenizers"] = ours["seconds"] / theirs["seconds"]
        ratios["bpe_compression_gap"] = 100 * abs(ours["bytes_per_token"] / theirs["bytes_per_token"] - 1)
    enc = report.get("encode")
    if enc:
        ratios["encode_vs_tiktoken"] = enc["llmcore gpt2"]["mb_per_s"] / enc["tiktoken gpt2"]["mb_per_s"]
    return ratios


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mb(row: dict[str, Any] | None) -> str:
    return "-" if not row or row.get("peak_rss_mb") is None else f"{row['peak_rss_mb']:.0f}"


def format_table(report: dict[str, Any]) -> str:
    """The human-readable summary printed at the end of a run (markdown tables)."""
    meta, ratios, lines = report["meta"], report["ratios"], []
    s = Shape(**meta["plan"]["shape"])
    la, lb = meta["loadavg_before"], meta["loadavg_after"]
    lines += [
        f"# llmcore bench{' (--quick)' if meta['quick'] else ''}: {meta['cpu']}, {meta['threads']} threads, "
        f"torch {meta['torch']}, load avg {la[0]:.1f} -> {lb[0]:.1f}, {meta['seconds']:.0f} s",
        "",
    ]
    peak = report.get("peak") or {}
    if peak:
        lines.append("matmul peak: " + ", ".join(f"{p} {r['flops'] / 1e9:.0f} GFLOP/s" for p, r in peak.items() if r))
        lines.append("")
    if report.get("train"):
        lines += [
            f"## Training: vocab {s.vocab_size}, context {s.context_length}, emb {s.emb_dim}, {s.n_heads} heads, "
            f"{s.n_layers} layers, batch {s.batch_size}, dropout {s.dropout}; forward + CE + backward + AdamW",
            "",
            "| peer | precision | tokens/s | MFU | peak RSS MB | vs book |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for key, row in report["train"].items():
            peer, p = key.rsplit(" ", 1)
            book = report["train"].get(f"book {p}")
            if row is None:
                lines.append(f"| {peer} | {p} | skipped | | | |")
                continue
            vs = f"{row['tokens_per_s'] / book['tokens_per_s']:.2f}x" if book else "-"
            mfu = f"{100 * row['mfu']:.0f}%" if "mfu" in row else "-"
            lines.append(f"| {peer} | {p} | {row['tokens_per_s']:.0f} | {mfu} | {_mb(row)} | {vs} |")
        lines.append("")
    loss = report.get("loss")
    if loss:
        lines += [
            f"Loss curve, llmcore vs book ({loss['data']}, same init, dropout 0, {loss['steps']} steps): "
            f"max |diff| {loss['max_abs_diff']:.2e} -> {'MATCH' if loss['ok'] else 'MISMATCH'}",
            "  book:    " + " ".join(f"{v:.4f}" for v in loss["book"]),
            "  llmcore: " + " ".join(f"{v:.4f}" for v in loss["llmcore"]),
            "",
        ]
    gen = report.get("generate") or {}
    if gen:
        plan = meta["plan"]
        lines += [
            f"## Generation: batch 1, {plan['gen_prompt']}-token prompt, {plan['gen_new']} new greedy tokens",
            "",
            "| peer | new tokens/s | peak RSS MB | llmcore is |",
            "|---|---:|---:|---:|",
        ]
        names = {
            "llmcore": "llmcore (KV cache)",
            "hf": "transformers generate(use_cache=True)",
            "book": "book generate_text_simple (no cache)",
        }
        for peer, row in gen.items():
            if row is None:
                lines.append(f"| {names[peer]} | skipped | | |")
                continue
            ours = gen.get("llmcore")
            vs = f"{ours['new_tokens_per_s'] / row['new_tokens_per_s']:.2f}x" if ours and peer != "llmcore" else ""
            lines.append(f"| {names[peer]} | {row['new_tokens_per_s']:.1f} | {_mb(row)} | {vs} |")
        lines.append("")
    bpe = report.get("bpe") or {}
    if bpe:
        lines += [
            "## BPE training on TinyShakespeare (byte-level, GPT-2 split)",
            "",
            "| trainer | vocab | seconds | bytes/token |",
            "|---|---:|---:|---:|",
        ]
        for trainer, res in bpe.items():
            if res is None:
                lines.append(f"| {trainer} | skipped | | |")
                continue
            for v in meta["plan"]["bpe_vocabs"]:
                r = res[str(v)]
                lines.append(f"| {trainer} | {v} | {r['seconds']:.2f} | {r['bytes_per_token']:.4f} |")
        lines.append("")
    enc = report.get("encode")
    if enc:
        lines += [
            f"## Encoding {enc['mb']:.2f} MB of TinyShakespeare, one thread (llmcore gpt2 ids == tiktoken: "
            f"{enc['same_ids_as_tiktoken']})",
            "",
            "| tokenizer | MB/s |",
            "|---|---:|",
        ]
        for name, r in enc.items():
            if isinstance(r, dict):
                lines.append(f"| {name} | {r['mb_per_s']:.1f} |")
        lines.append("")
    lines += ["## Targets", "", "| target | measured | goal | met | (CPU-time ratio) |", "|---|---:|---:|---|---:|"]
    for t in report["targets"]:
        v = t["value"]
        cpu = ratios.get(t["key"] + "_cpu")
        op = "<=" if t["key"] in AT_MOST else ">="
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "NO")
        lines.append(
            f"| {t['what']} | {'-' if v is None else f'{v:.2f}'} | {op} {t['goal']} | {met} | "
            f"{'' if cpu is None else f'{cpu:.2f}'} |"
        )
    if report["skipped"]:
        lines += ["", "Skipped: " + "; ".join(f"{k}: {v}" for k, v in report["skipped"].items())]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, in-process, < 1 min (CI smoke)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "reports" / "bench.json", help="report JSON")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {','.join(SECTIONS)}")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one job, print its result
    args = parser.parse_args(argv)
    if args.worker:
        payload = json.loads(args.worker)
        result = run_job(plan_from_dict(payload["plan"]), payload["job"])
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return 0
    sections = tuple(s.strip() for s in args.only.split(",") if s.strip())
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"--only: unknown section {unknown[0]!r} (choose from {', '.join(SECTIONS)})")
    plan = QUICK if args.quick else FULL
    print(f"llmcore bench ({'quick' if args.quick else 'full'}): {', '.join(sections)}", flush=True)
    report = run_benchmarks(plan, sections)
    table = format_table(report)
    report["table"] = table
    write_json_atomic(args.out, report)
    print("\n" + table + f"\n\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
