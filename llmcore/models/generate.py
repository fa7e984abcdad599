"""Text generation: greedy and sampled decoding over a batch of prompts, with or without a KV cache.

Prompts of different lengths are left-padded and masked; the model counts positions over real tokens
only, so each row decodes exactly as it would alone. With the cache the prompt is run once (prefill)
and each new token costs one single-position forward pass.

Sampling order follows common practice (HF, llama.cpp): temperature, then top-k, then top-p.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from llmcore.models.gpt import GPT
from llmcore.models.packed import onednn_linears
from llmcore.models.static_decode import decoder_for, pays, policy, width_for

# A temperature below this samples greedily: dividing logits by a tinier one overflows them to inf, and the
# probabilities to NaN (1e-300 did), while anything this small is argmax in all but exact ties anyway.
MIN_TEMPERATURE = 1e-3
MAX_TEMPERATURE = 1e4  # above: as this one (uniform over the tokens top-k and top-p keep, to float precision)


@dataclass
class SamplingConfig:
    max_new_tokens: int = 100
    temperature: float = 0.0  # 0 = greedy (argmax)
    top_k: int | None = None  # keep the k most likely tokens
    top_p: float | None = None  # keep the smallest set whose probability mass reaches p (nucleus)
    stop_ids: Sequence[int] = field(default_factory=tuple)  # e.g. the end-of-text id; not emitted
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        """Argmax decoding: a temperature of 0, below, or under :data:`MIN_TEMPERATURE`."""
        return not self.temperature >= MIN_TEMPERATURE


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Pick one token per row from (B, vocab) logits; probabilities that are not finite raise ``ValueError``."""
    if cfg.greedy:
        return logits.argmax(dim=-1)
    logits = logits.float() / min(cfg.temperature, MAX_TEMPERATURE)  # (a float32 inf would make -inf / inf NaN)
    if cfg.top_k is not None and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop = probs.cumsum(-1) - probs >= cfg.top_p
        drop[:, 0] = False  # (a top_p that rounds to 0 in float32 would drop it too)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    if not bool(torch.isfinite(probs).all()):  # NaN logits (or a bug): multinomial's own error names nothing
        raise ValueError(f"sampling probabilities are not finite (temperature {cfg.temperature})")
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def decode_attention(device: torch.device):
    """The attention kernels for decoding steps on ``device``.

    On CUDA, cuDNN's attention (which PyTorch prefers for bf16/fp16) builds an execution plan for every new key
    length; decoding grows the length by one each step, so every step would pay for a new plan. Flash,
    memory-efficient and math kernels have no such cost. Elsewhere: PyTorch's choice.
    """
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for row, p in enumerate(prompts):
        if p:
            idx[row, width - len(p) :] = torch.tensor(list(p), dtype=torch.long, device=device)
            mask[row, width - len(p) :] = 1
    return idx, mask


@torch.no_grad()
def generate_steps(
    model: GPT, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, use_cache: bool = True
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(tokens, alive)`` per step: the (B,) new tokens and which rows were still generating.

    Prompts longer than the context keep their last ``context_length - 1`` tokens, and generation stops
    when a row would exceed the context, so the cached and uncached paths always agree.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    ctx = model.cfg.context_length
    prompts = [list(p)[-(ctx - 1) :] for p in prompts]
    device = model.tok_emb.weight.device
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    idx, mask = _left_pad(prompts, pad_id=0, device=device)
    steps = min(cfg.max_new_tokens, ctx - idx.shape[1])
    # Equal-length prompts have no padding: no mask, so the model skips building one per step.
    padded = len({len(p) for p in prompts}) > 1
    stop = torch.tensor(sorted(set(cfg.stop_ids)), dtype=torch.long, device=device)
    alive = torch.ones(len(prompts), dtype=torch.bool, device=device)
    B, width = len(prompts), width_for(idx.shape[1] + steps, ctx)
    if device.type == "cpu":
        onednn_linears(model, packed_from=None)  # wide layers on oneDNN, no copies (llmcore.models.packed)
    was_training = model.training
    model.eval()
    try:
        # Decode steps after the prefill run compiled where that pays (llmcore.models.static_decode), else eagerly;
        # ``history`` counts the eager ones, which is how ``auto`` learns that a process decodes a lot.
        history = decoder = decoder_for(model) if use_cache and steps > 1 else None
        if decoder is not None and not (pays(decoder, B, width, steps - 1) and decoder.compile(B, width)):
            decoder = None
        way = policy()  # once per call: reading the environment cost ~2% of a small model's step
        # The compiled step reads full-context buffers (its graph serves any cache of that layout).
        cache = model.new_cache(B, ctx if decoder else idx.shape[1] + steps) if use_cache else None
        if decoder is not None:
            views = decoder.views(cache.k, cache.v, B, width)
            slot = torch.full((B,), idx.shape[1], dtype=torch.long, device=device)  # where each new token goes
            start = (1 - mask).sum(1)  # left padding: a row's keys start after it, its positions count from it
        step_input = idx
        for i in range(steps):
            # The head only for the last position: the prefill needs one row of logits, not T.
            step_mask = mask if padded else None
            began = time.perf_counter()
            out = (
                decoder.step(*views, step_input, slot, start)
                if decoder and i and decoder.prefer(B, width, way)
                else None
            )
            if out is not None:
                logits, greedy = out
                cache.pos += 1
            else:
                with decode_attention(device):
                    if cache is not None:
                        logits = model(step_input, attention_mask=step_mask, cache=cache, logits_to_keep=1).logits
                    else:
                        logits = model(idx, attention_mask=step_mask, logits_to_keep=1).logits
                logits, greedy = logits[:, -1], None
            if history is not None and i:
                history.record(B, width, out is not None, time.perf_counter() - began)
            if decoder is not None and i:
                slot += 1  # either way, the step wrote the cache at slot (== cache.pos before it)
            nxt = greedy if greedy is not None and cfg.greedy else sample_next(logits, cfg, generator)
            if stop.numel():
                alive = alive & ~torch.isin(nxt, stop)  # a new tensor: the one yielded before stays as it was
                yield nxt, alive
                if not alive.any():
                    break
            else:
                yield nxt, alive  # no stop ids: every row runs to the end
            step_input = nxt[:, None]
            if cache is None:
                idx = torch.cat([idx, step_input], dim=1)
            if padded:
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    finally:
        model.train(was_training)


def generate(
    model: GPT, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, use_cache: bool = True
) -> list[list[int]]:
    """Return the new tokens of each prompt (stop tokens excluded)."""
    out: list[list[int]] = [[] for _ in prompts]
    for tokens, alive in generate_steps(model, prompts, cfg, use_cache):
        for row, (tok, ok) in enumerate(zip(tokens.tolist(), alive.tolist(), strict=True)):  # one sync per step
            if ok:
                out[row].append(tok)
    return out


def stream(model: GPT, prompt: Sequence[int], cfg: SamplingConfig, use_cache: bool = True) -> Iterator[int]:
    """Yield new token ids of one prompt as they are produced (stop tokens excluded)."""
    for tokens, alive in generate_steps(model, [prompt], cfg, use_cache):
        if not alive[0]:
            return
        yield int(tokens[0])
