"""CUDA paths (skipped without a GPU): bf16 autocast, fp16 + GradScaler, torch.compile, the KV cache on the device.

CI has no GPU, so these skip there; `benchmarks/gpu.py` runs them on a GPU machine together with throughput.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmcore.data.tokens import RandomWindows
from llmcore.models.config import ModelConfig
from llmcore.models.generate import SamplingConfig, generate
from llmcore.models.gpt import GPT
from llmcore.training.config import HardwareConfig, TrainConfig
from llmcore.training.loop import fit, lm_loss

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def tiny(preset: str) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig.from_preset(preset, vocab_size=512))


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama3-tiny"])
def test_cuda_forward_matches_cpu_and_bf16_stays_close(preset):
    model = tiny(preset).eval()
    idx = torch.randint(0, 512, (2, 64))
    with torch.no_grad():
        cpu = model(idx).logits
        model.cuda()
        gpu = model(idx.cuda()).logits.cpu()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = model(idx.cuda()).logits.float().cpu()
    assert (gpu - cpu).abs().max().item() < 1e-3
    rel = ((bf16 - cpu).norm() / cpu.norm()).item()
    assert rel < 2e-2, rel


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama3-tiny"])
def test_cuda_greedy_generation_with_the_kv_cache_matches_cpu(preset):
    model = tiny(preset).eval()
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    cfg = SamplingConfig(max_new_tokens=20, temperature=0.0)
    cpu = generate(model, prompts, cfg)
    assert generate(model.cuda(), prompts, cfg) == cpu
    assert generate(model, prompts, cfg, use_cache=False) == cpu


@pytest.mark.parametrize(("precision", "compile"), [("bf16", False), ("fp16", False), ("bf16", True)])
def test_cuda_training_learns(tmp_path, precision, compile):
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("llama3-tiny", vocab_size=64))
    pattern = np.tile(np.arange(64, dtype=np.uint16), 400)  # a learnable sequence
    train = RandomWindows(pattern, 8, 32, seed=1)
    val = RandomWindows(pattern, 8, 32, seed=2)
    cfg = TrainConfig(
        batch_size=8, lr=3e-3, max_steps=60, warmup_steps=5, eval_every=30, checkpoint_every=60, eval_batches=2
    )
    result = fit(
        model,
        train,
        val,
        lm_loss,
        cfg,
        HardwareConfig(device="cuda", precision=precision, compile=compile),
        tmp_path / "ckpt",
    )
    assert result.val_loss < 1.0, result  # from ln(64) = 4.16


def test_pinned_batches_copy_without_another_pin_and_tf32_is_on():
    from llmcore.training.runtime import init_runtime, move_to

    tokens = np.arange(5000, dtype=np.uint16)
    plain, pinned = RandomWindows(tokens, 4, 32, seed=1), RandomWindows(tokens, 4, 32, seed=1, pin_memory=True)
    x, y = pinned.next_batch()
    assert x.is_pinned() and y.is_pinned()
    assert all(torch.equal(a, b) for a, b in zip(plain.next_batch(), (x, y), strict=True))
    moved = move_to((x, y), torch.device("cuda"))
    torch.cuda.synchronize()
    assert torch.equal(moved[0].cpu(), x) and moved[0].device.type == "cuda"
    init_runtime(HardwareConfig(device="cuda"))
    assert torch.get_float32_matmul_precision() == "high"
