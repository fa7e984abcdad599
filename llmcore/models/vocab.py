"""Growing a model's vocabulary: new token ids (the chat format's special tokens) get embedding and output-head
rows initialised to the mean of the existing ones, so a new token starts as an "average" token rather than a
random vector the model has never seen (the usual choice when adding tokens to a pretrained model).

    model, tok = add_special_tokens(model, tok, ["<|im_start|>", "<|im_end|>"])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from llmcore.models.gpt import GPT
from llmcore.text.tokenizer import Tokenizer


def grow_vocab(model: GPT, old_size: int, new_size: int) -> GPT:
    """A model whose rows ``old_size .. new_size - 1`` (embedding and untied head) are the mean of rows
    ``0 .. old_size - 1``; a model already wider than ``new_size`` keeps its width.
    Returns a new model (same device, eval/train mode of ``model``); ``model`` is not changed."""
    cfg = model.cfg
    width = max(cfg.vocab_size, new_size)
    new_cfg = dataclasses.replace(cfg, vocab_size=width)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for key in ("tok_emb.weight", "out_head.weight"):
        if key not in state:
            continue
        w = state[key][: cfg.vocab_size]  # padded rows (pad_vocab_multiple) are cut; the new model re-pads
        if width > cfg.vocab_size:
            w = torch.cat([w, w.new_zeros(width - cfg.vocab_size, w.shape[1])])
        w[old_size:new_size] = w[:old_size].mean(dim=0, keepdim=True)
        state[key] = w
    device = model.tok_emb.weight.device
    with torch.device(device):
        grown = GPT(new_cfg)
    if new_cfg.padded_vocab_size != width:  # re-pad to the padded row count the new model holds
        for key in ("tok_emb.weight", "out_head.weight"):
            if key in state:
                w = state[key]
                state[key] = torch.cat([w, w.new_zeros(new_cfg.padded_vocab_size - width, w.shape[1])])
    grown.load_state_dict(state)
    if cfg.tie_embeddings:
        grown.out_head.weight = grown.tok_emb.weight
    return grown.train(model.training)


def add_special_tokens(model: GPT, tok: Tokenizer, names: Sequence[str]) -> tuple[GPT, Tokenizer]:
    """Reserve ``names`` in the tokenizer and give the new ids rows in the model (see :func:`grow_vocab`);
    ``(model, tok)`` unchanged when the tokenizer has them all."""
    grown_tok = tok.with_special_tokens(names)
    if grown_tok is tok:
        return model, tok
    return grow_vocab(model, tok.vocab_size, grown_tok.vocab_size), grown_tok
