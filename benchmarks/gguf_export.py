"""GGUF export benchmark: export time and file size per precision, and llama.cpp's generation speed on the
exported q8_0 file beside llmcore's own generation on the same prompt.

    python -m benchmarks.gguf_export            # 124M-shaped random GPT-2 model with GPT-2's BPE (~2 min on 2 cores)
    python -m benchmarks.gguf_export --quick    # tiny shapes, every code path, seconds (CI smoke)

Generation: batch 1, a 20-token prompt then N greedy tokens, both with a KV cache; llama.cpp through
llama-cpp-python (``eval`` one token, argmax of its logits: the same loop llmcore runs), llmcore through
``llmcore.models.generate`` in fp32. Each figure is the median of a few repetitions after a warm-up, wall
clock. The model is random: the speed of a forward pass does not depend on what the weights say.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench import GPT2_BPE, MIRROR, SHAKESPEARE
from benchmarks.timing import repeat, stopwatch
from llmcore.common import write_json_atomic
from llmcore.models.config import ModelConfig
from llmcore.models.generate import SamplingConfig, generate
from llmcore.models.gpt import GPT
from llmcore.text.tokenizer import Tokenizer
from llmcore.weights.gguf import PRECISIONS, write_gguf


def run(quick: bool, threads: int, new_tokens: int, reps: int, mirror: Path = MIRROR) -> dict:
    torch.set_num_threads(threads)
    if quick:
        text = "First Citizen: Before we proceed any further, hear me speak.\n" * 50
        tok = Tokenizer.train(text, 300)
        cfg = ModelConfig.from_preset("gpt2-tiny", vocab_size=tok.vocab_size, emb_dim=64, n_layers=2, n_heads=2)
        prompt_text = text
    else:
        bpe, corpus = (mirror / p.relative_to(MIRROR) for p in (GPT2_BPE, SHAKESPEARE))
        tok = Tokenizer.gpt2(bpe / "encoder.json", bpe / "vocab.bpe")
        cfg = ModelConfig.from_preset("gpt2-124m")
        prompt_text = corpus.read_text(encoding="utf-8")[:2000]
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    prompt = tok.encode(prompt_text)[:20]
    report: dict = {
        "model": f"{'tiny' if quick else 'gpt2-124m'} ({model.num_params():,} parameters)",
        "threads": threads,
        "export": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for precision in PRECISIONS:
            path = Path(tmp) / f"{precision}.gguf"
            with stopwatch() as clock:
                write_gguf(path, model, tok, precision=precision)
            seconds = clock.seconds
            report["export"][precision] = {"seconds": round(seconds, 2), "mb": round(path.stat().st_size / 1e6, 1)}
            print(f"export {precision:>5}: {seconds:6.2f} s  {path.stat().st_size / 1e6:8.1f} MB", flush=True)

        import llama_cpp

        llm = llama_cpp.Llama(
            model_path=str(Path(tmp) / "q8_0.gguf"),
            n_ctx=len(prompt) + new_tokens + 1,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )

        def llama_generate() -> list[int]:
            llm.reset()
            llm.eval(prompt)
            out = []
            for _ in range(new_tokens):
                out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
                llm.eval(out[-1:])
            return out

        sampling = SamplingConfig(max_new_tokens=new_tokens)

        def llmcore_generate() -> list[int]:
            return generate(model, [prompt], sampling)[0]

        llama_s = repeat(llama_generate, reps, warmup=1).median
        ours_s = repeat(llmcore_generate, reps, warmup=1).median
    report["generate"] = {
        "prompt_tokens": len(prompt),
        "new_tokens": new_tokens,
        "llama_cpp_q8_0_tok_s": round(new_tokens / llama_s, 1),
        "llmcore_fp32_tok_s": round(new_tokens / ours_s, 1),
    }
    report["generate"]["ratio"] = round(ours_s / llama_s, 2)
    g = report["generate"]
    print(
        f"generate {len(prompt)} -> +{new_tokens} greedy tokens, batch 1, {threads} threads: llama.cpp q8_0 "
        f"{g['llama_cpp_q8_0_tok_s']} tok/s, llmcore fp32 {g['llmcore_fp32_tok_s']} tok/s: "
        f"llama.cpp is {g['ratio']}x llmcore"
    )
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CI smoke)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--new-tokens", type=int, default=None, help="generated tokens (default 100, quick 10)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default 3, quick 1)")
    ap.add_argument("--out", type=Path, default=Path("reports/bench_gguf.json"))
    ap.add_argument("--mirror", type=Path, default=MIRROR, help="offline mirror with GPT-2's BPE and TinyShakespeare")
    args = ap.parse_args(argv)
    report = run(
        args.quick,
        args.threads,
        args.new_tokens or (10 if args.quick else 100),
        args.reps or (1 if args.quick else 3),
        args.mirror,
    )
    write_json_atomic(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
