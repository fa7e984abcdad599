"""``model.pad_vocab_multiple``: the embedding and head get extra rows that no loss, sampler, export or tokenizer sees.

A padded model and an unpadded one with the same real weights give the same logits, losses, greedy tokens and
training curve, and write byte-identical weight files, Hugging Face folders and GGUF files.
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
from llmcore.weights.weight_file import load_checkpoint, load_into, model_state, read_config, save_checkpoint
from tests.conftest import require_module

V = 97  # rows padded to 128 with a multiple of 64
FAMILIES = ["gpt2-tiny", "llama3-tiny"]


def pair(preset: str, multiple: int = 64, seed: int = 0) -> tuple[GPT, GPT]:
    """(unpadded, padded) models from the same seed; the padded head's extra rows are set huge, so any leak of
    them into a loss, a softmax or an argmax would show."""
    models = []
    for m in (None, multiple):
        torch.manual_seed(seed)
        models.append(GPT(ModelConfig.from_preset(preset, vocab_size=V, context_length=32, pad_vocab_multiple=m)))
    with torch.no_grad():
        models[1].out_head.weight[V:] = 50.0
    return models[0].eval(), models[1].eval()


@pytest.mark.parametrize("preset", FAMILIES)
def test_same_seed_gives_the_same_real_weights_and_zero_padding(preset):
    torch.manual_seed(0)
    plain = GPT(ModelConfig.from_preset(preset, vocab_size=V, context_length=32))
    torch.manual_seed(0)
    padded = GPT(ModelConfig.from_preset(preset, vocab_size=V, context_length=32, pad_vocab_multiple=64))
    assert padded.cfg.padded_vocab_size == 128 and padded.tok_emb.weight.shape == (128, padded.cfg.emb_dim)
    for (name, a), (_, b) in zip(plain.state_dict().items(), padded.state_dict().items(), strict=True):
        assert torch.equal(a, b[:V] if b.shape != a.shape else b), name
    assert torch.count_nonzero(padded.tok_emb.weight[V:]) == 0
    assert (
        padded.num_params()
        == padded.cfg.num_params()
        == plain.num_params() + 31 * padded.cfg.emb_dim * (1 if padded.cfg.tie_embeddings else 2)
    )
    assert padded.cfg.flops_per_token() == plain.cfg.flops_per_token()  # padded rows are not model FLOPs


@pytest.mark.parametrize("preset", FAMILIES)
@pytest.mark.parametrize("impl", ["chunked", "full"])
def test_padded_rows_reach_no_logit_loss_or_sampler(preset, impl):
    plain, padded = pair(preset)
    plain.head_loss = padded.head_loss = impl
    idx = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(1))
    targets = torch.roll(idx, -1, 1)
    targets[0, :3] = -100
    logits = padded(idx).logits
    assert logits.shape == (2, 16, V)
    assert torch.equal(logits, plain(idx).logits)
    for reduction in ("sum", "mean"):
        loss_plain = plain(idx, targets=targets, loss_reduction=reduction).loss
        loss_padded = padded(idx, targets=targets, loss_reduction=reduction).loss
        assert torch.equal(loss_plain, loss_padded), reduction
    prompts = [[1, 2, 3], [4]]
    greedy = SamplingConfig(max_new_tokens=12, temperature=0.0)
    assert generate(padded, prompts, greedy) == generate(plain, prompts, greedy)
    sampled = SamplingConfig(max_new_tokens=12, temperature=1.5, seed=3)
    out = generate(padded, prompts, sampled)
    assert out == generate(plain, prompts, sampled) and all(t < V for row in out for t in row)


def test_loss_gradients_never_touch_the_padded_rows():
    _, padded = pair("llama3-tiny")  # untied head: both the embedding and the head are padded
    padded.train()
    idx = torch.randint(0, V, (2, 16))
    for impl in ("chunked", "full"):
        padded.head_loss = impl
        padded.zero_grad()
        padded(idx, targets=torch.roll(idx, -1, 1)).loss.backward()
        assert torch.count_nonzero(padded.out_head.weight.grad[V:]) == 0
        assert torch.count_nonzero(padded.tok_emb.weight.grad[V:]) == 0


@pytest.mark.parametrize("preset", FAMILIES)
def test_training_curves_are_identical(tmp_path, preset):
    tokens = np.tile(np.random.default_rng(0).integers(0, V, 61).astype(np.uint16), 40)
    cfg = TrainConfig(
        batch_size=4,
        lr=1e-2,
        min_lr=1e-3,
        warmup_steps=2,
        max_steps=6,
        eval_every=3,
        eval_batches=2,
        checkpoint_every=3,
        log_every=1,
        seed=7,
    )
    results = []
    for multiple in (None, 64):
        torch.manual_seed(0)
        model = GPT(ModelConfig.from_preset(preset, vocab_size=V, context_length=16, pad_vocab_multiple=multiple))
        train, val = RandomWindows(tokens, 4, 16, seed=1), RandomWindows(tokens, 4, 16, seed=2)
        r = fit(model, train, val, lm_loss, cfg, HardwareConfig(device="cpu"), tmp_path / str(multiple))
        results.append((r, model))
    (r0, m0), (r1, m1) = results
    assert (r1.train_loss, r1.val_loss) == (r0.train_loss, r0.val_loss)
    for (name, a), (_, b) in zip(m0.state_dict().items(), m1.state_dict().items(), strict=True):
        assert torch.equal(a, b[:V] if b.shape != a.shape else b), name


@pytest.mark.parametrize("preset", FAMILIES)
def test_weight_files_are_byte_identical_and_load_back(tmp_path, preset):
    plain, padded = pair(preset)
    a = save_checkpoint(tmp_path / "plain.safetensors", plain, {"step": "1"})
    b = save_checkpoint(tmp_path / "padded.safetensors", padded, {"step": "1"})
    assert a.read_bytes() == b.read_bytes()
    assert read_config(b) == plain.cfg and read_config(b).pad_vocab_multiple is None
    assert '"pad_vocab_multiple"' not in plain.cfg.to_json()  # unpadded configs serialise as before the field
    loaded = load_checkpoint(b)
    assert loaded.tok_emb.weight.shape[0] == V
    # and an unpadded file loads into a padded model (the extra rows come back as zeros)
    torch.manual_seed(5)
    target = GPT(padded.cfg)
    load_into(target, model_state(loaded), b)
    assert torch.equal(target.tok_emb.weight[:V], loaded.tok_emb.weight)
    assert torch.count_nonzero(target.tok_emb.weight[V:]) == 0
    again = load_checkpoint(b, config=padded.cfg)
    assert again.tok_emb.weight.shape[0] == 128
    # Close, not bit-equal: a head of 128 rows and one of 97 are different matmul shapes, and with a short input
    # (M=2) a many-core BLAS may split the sum over emb_dim across threads differently for each (CI saw 1-ulp gaps).
    idx = torch.tensor([[1, 2]])
    torch.testing.assert_close(again(idx).logits, loaded(idx).logits, rtol=1e-5, atol=1e-6)
    assert torch.equal(again(idx).logits.argmax(-1), loaded(idx).logits.argmax(-1))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hf_and_gguf_exports_are_byte_identical(tmp_path, family):
    from llmcore.weights.hf_convert import save_hf
    from tests.test_gguf import random_model, tokenizer

    tok = tokenizer("gpt2" if family == "gpt2" else "gpt4")
    plain = random_model(family, tok.vocab_size)
    padded = GPT(ModelConfig.from_dict({**plain.cfg.to_dict(), "pad_vocab_multiple": 64})).eval()
    load_into(padded, model_state(plain), "test")
    with torch.no_grad():
        padded.out_head.weight[tok.vocab_size :] = 7.0
    assert padded.cfg.padded_vocab_size > tok.vocab_size
    for name, model in (("plain", plain), ("padded", padded)):
        save_hf(model, tmp_path / name / "hf", tok, template="alpaca")
    files = sorted(p.name for p in (tmp_path / "plain" / "hf").iterdir())
    for f in files:
        assert (tmp_path / "plain" / "hf" / f).read_bytes() == (tmp_path / "padded" / "hf" / f).read_bytes(), f
    require_module("gguf")
    from llmcore.weights.gguf import write_gguf

    for name, model in (("plain", plain), ("padded", padded)):
        write_gguf(tmp_path / name / "m.gguf", model, tok, precision="f32", name="tiny", template="alpaca")
    assert (tmp_path / "plain" / "m.gguf").read_bytes() == (tmp_path / "padded" / "m.gguf").read_bytes()


def test_pad_vocab_multiple_is_validated():
    from llmcore.models.config import ConfigError

    with pytest.raises(ConfigError, match=r"model\.pad_vocab_multiple"):
        ModelConfig.from_preset("gpt2-tiny", pad_vocab_multiple=0)
    cfg = ModelConfig.from_preset("gpt2-124m", pad_vocab_multiple=64)
    assert cfg.padded_vocab_size == 50304 and cfg.vocab_size == 50257
    assert ModelConfig.from_json(cfg.to_json()) == cfg
