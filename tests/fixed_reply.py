"""A model folder whose greedy answer to any prompt is a fixed text: a judge that always says "85", or one that
always answers prose. Served by `llmcore serve`, it stands in for an Ollama judge in the tests.

The weights make a bigram table: one transformer block that passes its input through (output projections
zeroed), no position signal, and token embeddings that put every token in one of a few orthogonal classes, "any
other token" or one of the reply's characters. The output head maps each class to the next character of the
reply, and the last one to end-of-text. The prompt's last token must not be one of the reply's characters.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llmcore.models.config import ModelConfig
from llmcore.models.gpt import GPT
from llmcore.text.tokenizer import Tokenizer
from llmcore.weights.weight_file import save_checkpoint

TEXT = "Below is an instruction. ### Response: The capital of France is Paris. Score: 85 " * 20


def save_fixed_reply_model(folder: Path, reply: str) -> Path:
    chain = [b for b in reply.encode("utf-8")]  # byte-level BPE: every byte is a token with its own id
    assert len(set(chain)) == len(chain), "the reply's bytes must be distinct"
    tok = Tokenizer.train(TEXT, 300)
    cfg = ModelConfig.from_preset(
        "gpt2-tiny", vocab_size=tok.vocab_size, n_layers=1, context_length=512, tie_embeddings=False
    )
    assert 2 * (len(chain) + 1) <= cfg.emb_dim
    model = GPT(cfg)

    def direction(k: int) -> torch.Tensor:  # zero mean (LayerNorm keeps it), orthogonal for distinct k
        v = torch.zeros(cfg.emb_dim)
        v[2 * k], v[2 * k + 1] = 1.0, -1.0
        return v

    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.final_norm.weight.fill_(1.0)
        for block in model.blocks:
            block.norm1.weight.fill_(1.0)
            block.norm2.weight.fill_(1.0)
        model.tok_emb.weight[:] = direction(0)  # class 0: every token outside the reply
        targets = chain + [tok.eot_id]
        for k, token in enumerate(chain, start=1):
            model.tok_emb.weight[token] = direction(k)
        for k, target in enumerate(targets):  # class k -> the reply's k-th byte (the last -> end-of-text)
            model.out_head.weight[target] = 10.0 * direction(k)
    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint(folder / "model.safetensors", model)
    tok.save(folder / "tokenizer.json")
    return folder
