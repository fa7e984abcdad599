"""One decoder-only Transformer for the GPT-2 and Llama-3 families, read top to bottom.

The parts are chosen by ``ModelConfig`` once, in ``__init__``, so ``forward`` stays branch-light:

    norm       LayerNorm (GPT-2)          | RMSNorm (Llama)
    positions  learned table (GPT-2)      | rotary, RoPE (Llama; optional Llama-3.1 frequency scaling)
    MLP        GELU, tanh approx (GPT-2)  | SwiGLU gate/up/down (Llama)
    attention  n_heads queries sharing n_kv_heads key/value heads (MHA = equal, GQA = fewer, MQA = 1),
               optional QK-norm, optional qkv bias, causal SDPA

The rotary convention is the "rotate half" one of the Hugging Face Llama code (the first and second
halves of each head are the pair), so HF Llama checkpoints load without permuting q/k weights.

References: OpenAI's GPT-2 and HF ``modeling_gpt2.py``; Meta's Llama 3 and HF ``modeling_llama.py``;
nanoGPT ``model.py``; Raschka, *Build a Large Language Model (From Scratch)*, ch. 4 and appendix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from llmcore.models.config import ModelConfig
from llmcore.models.ops import head_loss

# ---------------------------------------------------------------------------------------------------
# Small blocks
# ---------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Root-mean-square norm (Llama). Computed in fp32 for stability, like the reference code."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * x.to(dtype)


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias)


def rope_frequencies(head_dim: int, theta: float, scaling: dict[str, float] | None = None) -> torch.Tensor:
    """Inverse frequencies of RoPE, (head_dim/2,), with optional Llama-3.1 wavelength-dependent scaling.

    Llama 3.1 stretches long wavelengths by ``factor``, keeps short ones and interpolates in between,
    so a model trained at ``original_context_length`` extends to longer contexts.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_context_length"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
    return torch.where(medium, smoothed, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + hs/2) of each head. x: (B, nh, T, hs); cos/sin: (B, 1, T, hs)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class KVCache:
    """Preallocated keys/values for incremental decoding: prefill once, then one token per step.

    Holds every layer's (B, n_kv_heads, max_len, head_dim) buffers and the number of filled positions.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.max_len = max_len
        self.pos = 0  # positions filled so far (same for every layer)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = k.shape[2]
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache overflow: {self.pos + T} > {self.max_len} positions")
        self.k[layer][:, :, self.pos : self.pos + T] = k
        self.v[layer][:, :, self.pos : self.pos + T] = v
        end = self.pos + T
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class BatchedKVCache:
    """Keys/values of independent sequences, one row (slot) each, every row with its own length.

    This is the cache of continuous batching: sequences start and finish at different times, so row ``b``
    holds ``lengths[b]`` positions and a forward pass appends ``T`` new tokens to each row at that row's own
    offset. Stale entries past a row's length are never read (the mask stops at the row's length), so a
    slot is reused without clearing. :meth:`rows` is a view over a slice of rows sharing the buffers: the
    server prefills new sequences in their slots in one right-padded pass (then sets each row's length to its
    real one, so the padding is stale), and decodes all live rows in one pass.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_len = max_len
        # where the pass in flight writes: one start position for all rows, or (rows, positions) per row
        self._index: int | tuple[torch.Tensor, torch.Tensor] | None = None

    def rows(self, start: int, stop: int) -> BatchedKVCache:
        """A cache over rows ``start:stop`` that shares the buffers (writes land in this cache)."""
        view = object.__new__(BatchedKVCache)
        view.k = [k[start:stop] for k in self.k]
        view.v = [v[start:stop] for v in self.v]
        view.lengths = self.lengths[start:stop]
        view.max_len, view._index = self.max_len, None
        return view

    def copy_row(self, src: int, dst: int) -> None:
        """Move sequence ``src`` into slot ``dst`` (keeps the live rows contiguous when one leaves)."""
        n = int(self.lengths[src])
        for buf in (*self.k, *self.v):
            buf[dst, :, :n] = buf[src, :, :n]
        self.lengths[dst] = n

    def layout(self, T: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Positions (B, T) of the new tokens and the attention mask (B, 1, T, S), or None where every row is
        full-length and plain causal attention is exact (one row: the same kernels as ``KVCache``)."""
        B, device = self.lengths.shape[0], self.lengths.device
        lengths = self.lengths.tolist()
        if max(lengths) + T > self.max_len:
            raise ValueError(f"KV cache overflow: {max(lengths) + T} > {self.max_len} positions")
        positions = self.lengths[:, None] + torch.arange(T, device=device)  # (B, T)
        if len(set(lengths)) == 1:  # every row at the same length: plain slice writes
            self._index = lengths[0]
        else:
            self._index = (torch.arange(B, device=device)[:, None].expand(B, T), positions)
        if len(set(lengths)) == 1 and (T == 1 or lengths[0] == 0):
            self._width = lengths[0] + T
            return positions, None
        S = max(lengths) + T
        self._width = S
        k_pos = torch.arange(S, device=device)
        return positions, (k_pos[None, None, :] <= positions[:, :, None])[:, None]  # (B, 1, T, S)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self._index, int):
            start, end = self._index, self._index + k.shape[2]
            self.k[layer][:, :, start:end] = k
            self.v[layer][:, :, start:end] = v
        else:
            rows, positions = self._index
            self.k[layer][rows, :, positions] = k.transpose(1, 2)  # (B, T, nkv, hs) at each row's own offset
            self.v[layer][rows, :, positions] = v.transpose(1, 2)
        return self.k[layer][:, :, : self._width], self.v[layer][:, :, : self._width]

    def advance(self, T: int) -> None:
        self.lengths += T
        self._index = None


class CausalSelfAttention(nn.Module):
    """Multi-head attention with grouped key/value heads.

    One fused projection produces [q (n_heads) | k (n_kv_heads) | v (n_kv_heads)] heads; each group of
    n_heads/n_kv_heads query heads reads the same key/value head (SDPA's ``enable_gqa``).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.qkv = nn.Linear(cfg.emb_dim, q_dim + 2 * kv_dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(q_dim, cfg.emb_dim, bias=cfg.bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def heads(self, x, rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (B, nh, T, hs), keys and values (B, nkv, T, hs) of ``x``, normed and rotated."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim],
            dim=-1,
        )
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v

    def forward(self, x, rope, mask, cache: KVCache | None, layer: int):
        B, T, _ = x.shape
        q, k, v = self.heads(x, rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=mask is None and T > 1,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    """GELU MLP (GPT-2) or SwiGLU (Llama: down(silu(gate(x)) * up(x)), gate and up fused in ``fc``)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        width = 2 * cfg.hidden_dim if self.swiglu else cfg.hidden_dim
        self.fc = nn.Linear(cfg.emb_dim, width, bias=cfg.bias)
        self.proj = nn.Linear(cfg.hidden_dim, cfg.emb_dim, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return self.dropout(self.proj(h))


class Block(nn.Module):
    """Pre-norm residual block:  x + attn(norm1(x)),  then  x + mlp(norm2(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = make_norm(cfg, cfg.emb_dim)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = make_norm(cfg, cfg.emb_dim)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, mask, cache, layer):
        x = x + self.attn(self.norm1(x), rope, mask, cache, layer)
        return x + self.mlp(self.norm2(x))


# ---------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # (B, T, vocab_size)
    hidden: torch.Tensor | None = None  # (B, T, emb_dim), after the final norm
    loss: torch.Tensor | None = None  # next-token cross-entropy of ``targets`` (fp32 scalar), when given


class GPT(nn.Module):
    """Decoder-only Transformer; ``ModelConfig`` picks GPT-2 or Llama-3 parts."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim) if cfg.pos_emb == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = make_norm(cfg, cfg.emb_dim)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if cfg.padded_vocab_size != cfg.vocab_size:
            # Rows appended after construction, so module init drew exactly the random numbers of an unpadded
            # model (reset_parameters below then draws for the real rows only).
            for module in (self.tok_emb, self.out_head):
                w = module.weight.data
                module.weight = nn.Parameter(
                    torch.cat([w, w.new_zeros(cfg.padded_vocab_size - cfg.vocab_size, cfg.emb_dim)])
                )
            self.tok_emb.num_embeddings = self.out_head.out_features = cfg.padded_vocab_size
        if cfg.tie_embeddings:
            self.out_head.weight = self.tok_emb.weight
        if cfg.pos_emb == "rope":
            inv_freq = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
            self.register_buffer("inv_freq", inv_freq, persistent=False)
        # Activation checkpointing (training only): keep each block's input, recompute its activations in the
        # backward pass. Memory for activations drops from ~all blocks' internals to one block's, for ~1/3
        # more compute (one extra forward). Set by ``fit`` from ``hardware.activation_checkpointing``.
        self.checkpointing = False
        # How ``forward(idx, targets=...)`` computes the head and the loss: auto | chunked | full
        # (``llmcore.models.ops.pick_head_loss``). Set by ``fit`` from ``hardware.head_loss``.
        self.head_loss = "auto"
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02) weights, zero biases, and residual output projections scaled by
        1/sqrt(2·n_layers) so the residual stream's variance does not grow with depth.

        Padded vocabulary rows are zeros, and the real rows draw exactly the random numbers of an unpadded
        model: the same seed gives the same real weights with or without ``pad_vocab_multiple``."""
        V = self.cfg.vocab_size
        for name, p in self.named_parameters():
            if p.shape[0] != V and name in ("tok_emb.weight", "out_head.weight"):
                nn.init.zeros_(p[V:])
                p = p[:V]
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif "norm" in name:
                nn.init.ones_(p)
            elif name.endswith("proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.cfg.n_layers))
            else:
                nn.init.normal_(p, std=0.02)

    def num_params(self, include_tied_head: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a tied tensor once
        if include_tied_head and self.cfg.tie_embeddings:
            n += self.out_head.weight.numel()
        return n

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype=None) -> KVCache:
        w = self.tok_emb.weight
        return KVCache(self.cfg, batch_size, max_len or self.cfg.context_length, w.device, dtype or w.dtype)

    def new_batched_cache(self, batch_size: int, max_len: int | None = None, dtype=None) -> BatchedKVCache:
        w = self.tok_emb.weight
        return BatchedKVCache(self.cfg, batch_size, max_len or self.cfg.context_length, w.device, dtype or w.dtype)

    def forward(
        self,
        idx: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        return_hidden: bool = False,
        return_logits: bool = True,
        logits_to_keep: int = 0,
        targets: torch.Tensor | None = None,
        loss_reduction: str = "mean",
    ) -> ModelOutput:
        """Run the model on token ids.

        Args:
            idx: (B, T) token ids, the new tokens only when ``cache`` holds earlier ones.
            attention_mask: (B, S) with 1 for real tokens and 0 for padding, covering the cached and the
                new positions (S = cache.pos + T). Positions are counted over real tokens only, so a
                left-padded prompt gets the same positions (and outputs) as the prompt alone.
            cache: a ``KVCache``, whose position offset places the new tokens after the cached ones, or a
                ``BatchedKVCache``, whose rows each append at their own length (``attention_mask`` unused).
            return_hidden: also return the final-norm hidden states (classifier heads pool them).
            return_logits: set False to skip the output head (saves the vocab-wide matmul).
            logits_to_keep: if > 0, run the head on the last ``logits_to_keep`` positions only (decoding needs
                one row of logits, not T).
            targets: (B, T) next-token ids, -100 where no loss is taken: the head runs inside the loss
                (``llmcore.models.ops.head_loss``, as ``self.head_loss`` picks) and ``loss`` is returned instead of
                logits, so ``torch.compile`` of the model covers the head and the loss in one graph.
            loss_reduction: ``mean`` over the scored targets (0 when there are none) or ``sum``.

        Logits cover the real vocabulary only (``cfg.vocab_size`` columns), also when the rows are padded.
        """
        B, T = idx.shape
        if isinstance(cache, BatchedKVCache):  # per-row lengths: the cache lays out positions and the mask
            if int(cache.lengths.max()) + T > self.cfg.context_length:
                raise ValueError(f"a row would exceed context_length={self.cfg.context_length}")
            positions, mask = cache.layout(T)
        elif (offset := cache.pos if cache is not None else 0) + T > self.cfg.context_length:
            raise ValueError(f"sequence of {offset + T} tokens exceeds context_length={self.cfg.context_length}")
        elif attention_mask is not None:
            attention_mask = attention_mask.to(torch.bool)
            positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, offset : offset + T]  # (B, T)
            mask = self._padding_mask(attention_mask, offset, T)
        else:
            positions = torch.arange(offset, offset + T, device=idx.device).expand(B, T)
            # SDPA's is_causal aligns the mask top-left, which is wrong for T>1 after a prefix in cache.
            mask = self._padding_mask(None, offset, T, idx.device) if offset and T > 1 else None

        x, rope = self.embed(idx, positions)
        x = self.drop(x)
        recompute = self.checkpointing and self.training and cache is None and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if recompute:
                x = torch.utils.checkpoint.checkpoint(block, x, rope, mask, cache, i, use_reentrant=False)
            else:
                x = block(x, rope, mask, cache, i)
        if isinstance(cache, BatchedKVCache):
            cache.advance(T)
        elif cache is not None:
            cache.pos += T
        x = self.final_norm(x)
        hidden = x if return_hidden else None
        if targets is not None:
            loss = head_loss(
                x, self.out_head.weight, targets, self.head_loss, self.cfg.vocab_size, reduction=loss_reduction
            )
            return ModelOutput(logits=None, hidden=hidden, loss=loss)
        logits = None
        if return_logits:
            logits = self.head(x[:, -logits_to_keep:] if logits_to_keep else x)
        return ModelOutput(logits=logits, hidden=hidden)

    def embed(self, idx: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, tuple | None]:
        """Token embeddings (B, T, C) of ``idx`` at ``positions`` (B, T): plus the learned position table, or with
        the RoPE (cos, sin) pair, each (B, 1, T, hs), that attention applies to queries and keys."""
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            return x + self.pos_emb(positions), None
        freqs = positions[:, None, :, None].float() * self.inv_freq  # (B, 1, T, hs/2)
        freqs = torch.cat((freqs, freqs), dim=-1)
        return x, (freqs.cos().to(x.dtype), freqs.sin().to(x.dtype))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (..., vocab_size) of final hidden states: the output head, padded rows cut off (a view)."""
        logits = self.out_head(x)
        return logits if logits.shape[-1] == self.cfg.vocab_size else logits[..., : self.cfg.vocab_size]

    @staticmethod
    def _padding_mask(attention_mask, offset: int, T: int, device=None) -> torch.Tensor:
        """Boolean (B|1, 1, T, S) mask: causal over absolute positions, and keys must be real tokens.

        A padding query would see no key at all (a NaN row in SDPA), so every query may also see itself;
        those rows are padding and never read.
        """
        S = offset + T
        device = attention_mask.device if attention_mask is not None else device
        q_pos = torch.arange(offset, S, device=device)[:, None]
        k_pos = torch.arange(S, device=device)[None, :]
        mask = (k_pos <= q_pos)[None, None]  # (1, 1, T, S)
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, :S]
            mask = mask | (k_pos == q_pos)[None, None]
        return mask
