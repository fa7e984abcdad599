"""lm-evaluation-harness throughput: llmcore's adapter against the harness' own ``hf`` backend, same weights.

    python -m benchmarks.harness             # 124M shape, HellaSwag-shaped requests; writes reports/bench_harness.json
    python -m benchmarks.harness --quick     # a tiny model, every code path, seconds (CI smoke)

One GPT-2-124M-shaped model (random weights, seed 0; speed does not depend on what the weights learned) is saved as
an llmcore model folder and exported with ``llmcore.weights.hf_convert.save_hf`` (weights and tokenizer), so
``lm_eval.models.huggingface.HFLM`` loads the same weights through transformers. Both backends then score the same
``loglikelihood`` requests, shaped like HellaSwag's (a ~60-token context, four ~25-token endings; text from
TinyShakespeare in the offline mirror, GPT-2's BPE): batch size 16, fp32, CPU threads as torch sets them.

Reported: scored requests/s of each (median of ``reps`` timed passes after one untimed pass, peers alternated), the
ratio llmcore / hf, and the largest difference between the two backends' log-likelihoods (the same numbers, so a
parity check at the 124M shape) and whether their greedy flags agree.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.timing import median, stopwatch
from llmcore.common import write_json_atomic
from llmcore.models.config import ModelConfig
from llmcore.models.gpt import GPT
from llmcore.text.tokenizer import Tokenizer
from llmcore.weights.hf_convert import save_hf
from llmcore.weights.model_dir import save_model_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
# the offline mirror beside the checkout, or $LLMCORE_MIRROR when it names a local folder
MIRROR = Path(os.environ.get("LLMCORE_MIRROR") or REPO_ROOT.parent / "shared" / "data" / "mirror")
SHAKESPEARE = MIRROR / "raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
GPT2_BPE = MIRROR / "openaipublic.blob.core.windows.net/gpt-2/encodings/main"


@dataclass
class Plan:
    preset: str = "gpt2-124m"
    docs: int = 24  # HellaSwag-shaped items; 4 requests each
    ctx_tokens: int = 60
    ending_tokens: int = 25
    batch_size: int = 16
    reps: int = 2  # timed passes per peer (after one untimed pass), peers alternated


FULL = Plan()
QUICK = Plan(preset="gpt2-tiny", docs=8, ctx_tokens=20, ending_tokens=8, batch_size=8, reps=1)


def requests_like_hellaswag(tok: Tokenizer, plan: Plan) -> list:
    """``plan.docs`` contexts of ~ctx_tokens tokens with four endings of ~ending_tokens each, as lm-eval Instances."""
    from lm_eval.api.instance import Instance

    ids = tok.encode(SHAKESPEARE.read_text(encoding="utf-8")[:400_000])
    rng = random.Random(0)
    span = lambda n: tok.decode(ids[(s := rng.randrange(len(ids) - 2 * n)) : s + rng.randint(n * 3 // 4, n * 5 // 4)])
    out = []
    for d in range(plan.docs):
        ctx = " ".join(span(plan.ctx_tokens).split())
        for k in range(4):
            ending = " " + " ".join(span(plan.ending_tokens).split())
            out.append(Instance("loglikelihood", {}, (ctx, ending), k, ("hellaswag_like", d, 1)))
    return out


def build(plan: Plan, root: Path) -> tuple[Path, Path, Tokenizer]:
    """The llmcore folder and its transformers export (weights, config and GPT-2's tokenizer as HF files)."""
    tok = Tokenizer.gpt2(GPT2_BPE / "encoder.json", GPT2_BPE / "vocab.bpe")
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset(plan.preset, vocab_size=tok.vocab_size, dropout=0.0))
    ours = save_model_dir(root / "llmcore", model, tok)
    save_hf(model, root / "hf", tok)
    return ours, root / "hf", tok


def make_peer(name: str, ours: Path, hf: Path, plan: Plan):
    if name == "llmcore":
        from llmcore.eval.harness import LLMCoreLM

        return LLMCoreLM(ours, device="cpu", precision="fp32", batch_size=plan.batch_size)
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(hf), device="cpu", dtype="float32", batch_size=plan.batch_size)


def run(plan: Plan, log=print) -> dict[str, Any]:
    """Build both backends on the same weights, score the same requests with each, return the report."""
    with tempfile.TemporaryDirectory() as tmp:
        ours, hf, tok = build(plan, Path(tmp))
        requests = requests_like_hellaswag(tok, plan)
        peers = {name: make_peer(name, ours, hf, plan) for name in ("llmcore", "hf")}
        times: dict[str, list[float]] = {name: [] for name in peers}
        scores: dict[str, list[tuple[float, bool]]] = {}
        for name, lm in peers.items():  # warm-up pass; its results are the parity check
            scores[name] = lm.loglikelihood(requests, disable_tqdm=True)
        for rep in range(plan.reps):
            for name in peers if rep % 2 == 0 else reversed(peers):
                with stopwatch() as clock:
                    peers[name].loglikelihood(requests, disable_tqdm=True)
                times[name].append(clock.seconds)
                log(f"  pass {rep + 1}/{plan.reps} {name}: {times[name][-1]:.1f} s", flush=True)
        rate = {name: len(requests) / median(t) for name, t in times.items()}
        diffs = [abs(a[0] - b[0]) for a, b in zip(scores["llmcore"], scores["hf"], strict=True)]
        greedy_agree = sum(a[1] == b[1] for a, b in zip(scores["llmcore"], scores["hf"], strict=True))
        context = [len(tok.encode(r.args[0])) for r in requests]
        report = {
            "plan": asdict(plan),
            "requests": len(requests),
            "mean_context_tokens": round(statistics.fmean(context), 1),
            "requests_per_s": {k: round(v, 2) for k, v in rate.items()},
            "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
            "ratio_llmcore_vs_hf": round(rate["llmcore"] / rate["hf"], 3),
            "max_abs_logprob_diff": max(diffs),
            "greedy_flags_agree": f"{greedy_agree}/{len(requests)}",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or "",
        }
    log(f"lm-eval loglikelihood, {plan.preset}, {len(requests)} HellaSwag-shaped requests, batch {plan.batch_size}:")
    log(f"  llmcore adapter  {rate['llmcore']:8.1f} requests/s")
    log(f"  lm-eval hf       {rate['hf']:8.1f} requests/s")
    log(
        f"  ratio            {report['ratio_llmcore_vs_hf']:.2f}x   (max |logprob diff| {max(diffs):.2e}, "
        f"greedy flags agree {report['greedy_flags_agree']})"
    )
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model, seconds (CI smoke)")
    parser.add_argument("--reps", type=int, default=None, help="timed passes per backend (default: 2)")
    parser.add_argument("--out", type=Path, default=None, help="JSON report (default: reports/bench_harness.json)")
    args = parser.parse_args(argv)
    for path in (SHAKESPEARE, GPT2_BPE / "encoder.json"):
        if not path.is_file():
            print(f"error: {path}: missing (the offline mirror, ../shared/data/mirror)", file=sys.stderr)
            return 1
    plan = QUICK if args.quick else FULL
    if args.reps is not None:
        plan = Plan(**{**asdict(plan), "reps": max(1, args.reps)})
    report = run(plan)
    out = args.out or (None if args.quick else REPO_ROOT / "reports" / "bench_harness.json")
    if out is not None:
        write_json_atomic(out, report)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
