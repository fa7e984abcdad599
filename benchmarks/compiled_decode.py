"""Experiment: a compiled decode step over a static KV cache (the gpt-fast recipe) against llmcore's ``generate``.

    python -m benchmarks.compiled_decode                 # llama3-tiny and gpt2-tiny shapes, 1 thread
    python -m benchmarks.compiled_decode --threads 2 --new 200

Small models spend most of each token in Python and op launches, not arithmetic. Here one decode step (one token
in, logits out) is written with static shapes only: the KV cache is preallocated at the full context, the new
key/value is written with ``index_copy_`` at a position *tensor*, and attention runs over the whole cache with a
mask, so ``torch.compile`` (inductor, C++ on CPU) can fuse the step into a few kernels and trace it once. The step
reuses the model's own modules and weights; its greedy tokens are checked against ``generate`` before timing.

This is a measurement, not a feature: the server does not use it (yet). Figures: decode steps per second at batch
1 (greedy, after a prompt fed through the same step), beside ``generate``'s tokens per second, and the one-off
compile time. Writes ``reports/compiled_decode.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from llmcore.common import write_json_atomic
from llmcore.models.config import ModelConfig
from llmcore.models.generate import SamplingConfig, generate
from llmcore.models.gpt import GPT, apply_rope

REPO_ROOT = Path(__file__).resolve().parents[1]


class StaticDecoder:
    """One-token decode steps of ``model`` over a preallocated (1, n_kv_heads, context, head_dim) cache per layer."""

    def __init__(self, model: GPT):
        cfg, w = model.cfg, model.tok_emb.weight
        self.model, self.cfg = model.eval(), cfg
        shape = (1, cfg.n_kv_heads, cfg.context_length, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=w.dtype, device=w.device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=w.dtype, device=w.device) for _ in range(cfg.n_layers)]
        self.key_pos = torch.arange(cfg.context_length, device=w.device)

    def step(self, idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """idx (1, 1) token, pos (1,) its position -> (1, vocab) logits; writes the token's keys/values."""
        m = self.model
        x = m.tok_emb(idx)
        rope = None
        if m.pos_emb is not None:
            x = x + m.pos_emb(pos[None])
        else:
            freqs = pos[:, None, None, None].float() * m.inv_freq
            freqs = torch.cat((freqs, freqs), dim=-1)
            rope = (freqs.cos().to(x.dtype), freqs.sin().to(x.dtype))
        mask = (self.key_pos <= pos[0])[None, None, None, :]
        for i, block in enumerate(m.blocks):
            a = block.attn
            q, k, v = a.qkv(block.norm1(x)).split(
                [a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim, a.n_kv_heads * a.head_dim], dim=-1
            )
            q = q.view(1, 1, a.n_heads, a.head_dim).transpose(1, 2)
            k = k.view(1, 1, a.n_kv_heads, a.head_dim).transpose(1, 2)
            v = v.view(1, 1, a.n_kv_heads, a.head_dim).transpose(1, 2)
            if a.q_norm is not None:
                q, k = a.q_norm(q), a.k_norm(k)
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            self.k[i].index_copy_(2, pos, k)
            self.v[i].index_copy_(2, pos, v)
            y = F.scaled_dot_product_attention(q, self.k[i], self.v[i], attn_mask=mask,
                                               enable_gqa=a.n_kv_heads != a.n_heads)  # fmt: skip
            x = x + a.proj(y.transpose(1, 2).reshape(1, 1, -1))
            x = x + block.mlp(block.norm2(x))
        return m.out_head(m.final_norm(x))[:, -1]


@torch.no_grad()
def greedy(step, prompt: list[int], new: int) -> list[int]:
    """Feed the prompt through ``step`` one token at a time, then decode ``new`` greedy tokens."""
    logits = None
    for i, t in enumerate(prompt):
        logits = step(torch.tensor([[t]]), torch.tensor([i]))
    out = []
    token = int(logits.argmax(-1))
    for j in range(new):
        out.append(token)
        logits = step(torch.tensor([[token]]), torch.tensor([len(prompt) + j]))
        token = int(logits.argmax(-1))
    return out


def measure(preset: str, prompt_len: int, new: int, reps: int = 5, log=print) -> dict[str, Any]:
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset(preset, vocab_size=1024, dropout=0.0)).eval()
    prompt = torch.randint(0, 1024, (prompt_len,)).tolist()
    reference = generate(model, [prompt], SamplingConfig(new))[0]
    decoder = StaticDecoder(model)
    if greedy(decoder.step, prompt, new) != reference:
        raise AssertionError(f"{preset}: the static decode step disagrees with generate")
    start = time.perf_counter()
    compiled = torch.compile(decoder.step, dynamic=False, fullgraph=True)
    greedy(compiled, prompt[:1], 1)
    compile_s = time.perf_counter() - start
    if greedy(compiled, prompt, new) != reference:
        raise AssertionError(f"{preset}: the compiled decode step disagrees with generate")

    def best(fn) -> float:
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    steps = prompt_len + new
    result = {
        "preset": preset, "prompt": prompt_len, "new": new, "compile_s": compile_s,
        "generate_tokens_per_s": new / best(lambda: generate(model, [prompt], SamplingConfig(new))),
        "static_eager_steps_per_s": steps / best(lambda: greedy(decoder.step, prompt, new)),
        "compiled_steps_per_s": steps / best(lambda: greedy(compiled, prompt, new)),
    }  # fmt: skip
    result["compiled_vs_generate"] = result["compiled_steps_per_s"] / result["generate_tokens_per_s"]
    log(f"{preset}: generate {result['generate_tokens_per_s']:.0f} tok/s, static eager "
        f"{result['static_eager_steps_per_s']:.0f} steps/s, compiled {result['compiled_steps_per_s']:.0f} steps/s "
        f"({result['compiled_vs_generate']:.2f}x; compile {compile_s:.0f} s)")  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compiled_decode", description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--new", type=int, default=100, help="greedy tokens per run")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "reports" / "compiled_decode.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = [measure(preset, 16, args.new) for preset in ("llama3-tiny", "gpt2-tiny")]
    write_json_atomic(args.out, {"threads": args.threads, "torch": torch.__version__, "results": results})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
