"""DPO step throughput against a plain instruction-tuning step on the same batch.

    python -m benchmarks.dpo                  # the default pipeline's model shape (llama3-tiny, ctx 256)
    python -m benchmarks.dpo --preset gpt2-small-cpu --batch 8 --reps 10
    python -m benchmarks.dpo --quick          # tiny, one repetition (CI smoke)

Three optimizer steps over the same ``batch`` preference pairs (2 x batch sequences: chosen + rejected):

- ``instruct``: ``lm_loss`` (fused head + cross-entropy) on the 2B sequences, as the instruct stage trains;
- ``dpo (cached ref)``: ``DPOLoss`` with the reference log-probs precomputed once per pair, as the align
  stage trains: one forward + backward of the policy;
- ``dpo (live ref)``: the same plus a frozen reference model's forward every step (what the cache saves).

Each figure is the median of ``--reps`` timed steps after warm-up; it prints pairs/s and the ratios
``dpo / instruct`` (target: <= 1.5 with the cached reference) and ``live / cached``.
"""

from __future__ import annotations

import argparse
import copy

import torch

from benchmarks.timing import repeat
from llmcore.data.instruct import Example
from llmcore.data.preferences import PreferenceBatches, PreferencePair
from llmcore.models.config import ModelConfig
from llmcore.models.gpt import GPT
from llmcore.training.dpo import DPOLoss, attach_reference_logps, sequence_logps
from llmcore.training.loop import lm_loss


def synthetic_pairs(n: int, vocab: int, prompt: int, answer: int, seed: int = 0) -> list[PreferencePair]:
    """Random-token pairs with the book data's proportions (prompt ~ answer length, answers +-25%)."""
    g = torch.Generator().manual_seed(seed)

    def ids(k: int) -> list[int]:
        return torch.randint(0, vocab - 1, (k,), generator=g).tolist()

    pairs = []
    for i in range(n):
        p = ids(prompt)
        c = ids(int(answer * (0.75 + 0.5 * torch.rand(1, generator=g).item())))
        r = ids(int(answer * (0.75 + 0.5 * torch.rand(1, generator=g).item())))
        pairs.append(PreferencePair(Example(p + c + [vocab - 1], prompt), Example(p + r + [vocab - 1], prompt), i))
    return pairs


def time_steps(step, reps: int, warmup: int = 2) -> float:
    return repeat(step, reps, warmup).median


def run(preset: str, batch: int, reps: int, context: int, threads: int | None) -> dict[str, float]:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset, context_length=context)
    model = GPT(cfg)
    prompt = min(context // 3, 80)
    pairs = synthetic_pairs(batch, cfg.vocab_size, prompt, answer=min(context // 3, 60))
    data = PreferenceBatches(pairs, batch, pad_id=cfg.vocab_size - 1, shuffle=False)
    attach_reference_logps(model, data)
    dpo_batch = data.batch_of(list(range(batch)))
    lm_batch = (dpo_batch["inputs"], dpo_batch["targets"])  # the same 2B sequences, answer tokens scored
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    dpo = DPOLoss(beta=0.1)

    def step(loss_fn, batch_):
        loss = loss_fn(model, batch_)[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def live_ref(model_, batch_):
        with torch.no_grad():
            ref, _ = sequence_logps(reference, batch_["inputs"], batch_["targets"])
        return dpo(model_, {**batch_, "ref_logps": ref})

    model.train()
    results = {}
    for name, fn, b in (
        ("instruct", lm_loss, lm_batch),
        ("dpo (cached ref)", dpo, dpo_batch),
        ("dpo (live ref)", live_ref, dpo_batch),
    ):
        results[name] = batch / time_steps(lambda fn=fn, b=b: step(fn, b), reps)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama3-tiny")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8, help="preference pairs per step")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, one repetition")
    args = ap.parse_args()
    if args.quick:
        args.batch, args.reps, args.context = 2, 1, 64
    res = run(args.preset, args.batch, args.reps, args.context, args.threads)
    print(f"{args.preset}, context {args.context}, {args.batch} pairs ({2 * args.batch} sequences) per step")
    for name, per_s in res.items():
        print(f"  {name:18s} {per_s:8.2f} pairs/s")
    cached, live = res["dpo (cached ref)"], res["dpo (live ref)"]
    print(f"  step time, dpo (cached ref) / instruct: {res['instruct'] / cached:.2f}x  (target <= 1.5x)")
    print(f"  step time, dpo (live ref) / dpo (cached ref): {cached / live:.2f}x  (what the cache saves)")


if __name__ == "__main__":
    main()
