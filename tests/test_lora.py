"""LoRA: exact start, only adapters train, merge gives the same function with plain layers, bad targets fail."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from llmcore.common import LLMCoreError
from llmcore.models.config import ModelConfig
from llmcore.models.gpt import GPT
from llmcore.models.lora import LORA_TARGETS, LoRALinear, apply_lora, count_trainable, mark_trainable, merge_lora


def tiny(preset: str = "gpt2-tiny") -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig.from_preset(preset, n_layers=2, emb_dim=32, n_heads=4, vocab_size=64, context_length=16))


def perturb_adapters(model: nn.Module) -> None:
    """B starts at zero; give it values so the adapters actually change the function."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            with torch.no_grad():
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


def test_lora_linear_starts_as_base_and_merges():
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    x = torch.randn(3, 5, 12)
    ref = base(x)
    layer = LoRALinear(base, rank=4, alpha=8)
    torch.testing.assert_close(layer(x), ref, rtol=0, atol=0)  # B = 0: exactly the base at the start
    with torch.no_grad():
        layer.lora_B.normal_()
    wrapped = layer(x)
    assert not torch.allclose(wrapped, ref)
    expected = ref + (x @ layer.lora_A.T @ layer.lora_B.T) * 2.0  # alpha / rank = 2
    torch.testing.assert_close(wrapped, expected, rtol=1e-5, atol=1e-5)
    merged = layer.merged()
    assert type(merged) is nn.Linear
    torch.testing.assert_close(merged(x), wrapped, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama3-tiny"])
def test_apply_lora_trains_only_adapters(preset: str):
    model = tiny(preset)
    cfg = model.cfg
    rank = 4
    names = apply_lora(model, rank=rank, alpha=8, dropout=0.0)
    assert len(names) == 4 * cfg.n_layers
    n = mark_trainable(model)
    # rank * (in + out) per adapted layer: qkv C -> C + 2*kv, proj C -> C, fc C -> width, proj hidden -> C
    C, H, kv = cfg.emb_dim, cfg.hidden_dim, cfg.n_kv_heads * cfg.head_dim
    fc_out = 2 * H if cfg.mlp == "swiglu" else H
    per_block = rank * ((C + C + 2 * kv) + (C + C) + (C + fc_out) + (H + C))
    assert n == cfg.n_layers * per_block
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A" in name or ".lora_B" in name for name in trainable)

    # one optimizer step moves the adapters and nothing else
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    idx = torch.randint(0, cfg.vocab_size, (2, 8))
    model(idx).logits.square().mean().backward()
    opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("lora_" in k for k in changed)


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama3-tiny"])
def test_merge_lora_matches_and_leaves_plain_model(preset: str):
    model = tiny(preset)
    plain_keys = set(model.state_dict())
    apply_lora(model, rank=4, alpha=16, dropout=0.1)
    perturb_adapters(model)
    model.eval()  # adapter dropout off
    idx = torch.randint(0, model.cfg.vocab_size, (2, 10))
    with torch.no_grad():
        ref = model(idx).logits
        base_only = tiny(preset)(idx).logits
    assert not torch.allclose(ref, base_only, atol=1e-3)  # the adapters do change the function
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == plain_keys  # the base architecture's names: loadable as a plain GPT
    with torch.no_grad():
        torch.testing.assert_close(model(idx).logits, ref, rtol=1e-5, atol=1e-5)


def test_mark_trainable_prefixes_and_tied_head():
    model = tiny()
    apply_lora(model, rank=2, alpha=2, targets=["attn.qkv"])
    n = mark_trainable(model, ["final_norm"])
    adapters = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    assert n == adapters + sum(p.numel() for p in model.final_norm.parameters())
    # the tied head is the embedding: naming it trains that one tensor
    mark_trainable(model, ["out_head"], lora=False)
    assert model.tok_emb.weight.requires_grad and count_trainable(model) == model.tok_emb.weight.numel()


def test_bad_targets_and_prefixes_fail():
    model = tiny()
    with pytest.raises(LLMCoreError, match="targets: 'attn.qkvv' matches no linear layer"):
        apply_lora(model, rank=2, alpha=2, targets=["attn.qkvv"])
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # nothing half-applied
    with pytest.raises(LLMCoreError, match="rank: expected a positive int"):
        apply_lora(model, rank=0, alpha=2)
    apply_lora(model, rank=2, alpha=2, targets=LORA_TARGETS)
    with pytest.raises(LLMCoreError, match="already has LoRA"):
        apply_lora(model, rank=2, alpha=2)
    with pytest.raises(LLMCoreError, match="'head' matches no parameter"):
        mark_trainable(model, ["head"])
