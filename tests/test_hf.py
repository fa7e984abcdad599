"""Parity with transformers (the oracle): converted weights give the same logits, and convert back exactly."""

import pytest
import torch

from llmcore.models.gpt import GPT
from llmcore.weights.hf_convert import config_from_hf, load_hf, save_hf, state_from_hf, state_to_hf

transformers = pytest.importorskip("transformers")


def tiny_hf_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=211,
        n_positions=64,
        n_embd=48,
        n_layer=3,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # random non-zero biases and norms, so a dropped tensor would show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def tiny_hf_llama(seed=0, **overrides):
    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=203,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def convert(hf_model) -> GPT:
    cfg = config_from_hf(hf_model.config.to_dict())
    model = GPT(cfg).eval()
    model.load_state_dict(state_from_hf(cfg, hf_model.state_dict()), strict=False)
    return model


@pytest.mark.parametrize(
    "make",
    [
        tiny_hf_gpt2,
        tiny_hf_llama,
        lambda: tiny_hf_llama(num_key_value_heads=1),  # multi-query
        lambda: tiny_hf_llama(tie_word_embeddings=True),
        lambda: tiny_hf_llama(
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            }
        ),
    ],
    ids=["gpt2", "llama-gqa", "llama-mqa", "llama-tied", "llama3.1-rope-scaling"],
)
def test_logits_match_transformers(make):
    hf_model = make()
    ours = convert(hf_model)
    idx = torch.randint(0, hf_model.config.vocab_size, (2, 40))
    with torch.no_grad():
        expected = hf_model(idx).logits
        got = ours(idx).logits
    assert (got - expected).abs().max().item() < 1e-4


def test_padded_batch_matches_transformers():
    hf_model = tiny_hf_llama()
    ours = convert(hf_model)
    idx = torch.randint(0, 200, (2, 12))
    mask = torch.ones_like(idx)
    mask[0, :5] = 0  # left padding in row 0
    with torch.no_grad():
        expected = hf_model(idx, attention_mask=mask).logits
        got = ours(idx, attention_mask=mask).logits
    assert (got[mask.bool()] - expected[mask.bool()]).abs().max().item() < 1e-4


@pytest.mark.parametrize("make", [tiny_hf_gpt2, tiny_hf_llama], ids=["gpt2", "llama"])
def test_round_trip_gives_identical_tensors(make):
    hf_model = make()
    cfg = config_from_hf(hf_model.config.to_dict())
    hf_state = {k: v for k, v in hf_model.state_dict().items() if not k.endswith((".attn.bias", "masked_bias"))}
    back = state_to_hf(cfg, state_from_hf(cfg, hf_state))
    if cfg.tie_embeddings:
        hf_state.pop("lm_head.weight")
    assert back.keys() == hf_state.keys()
    for k, v in hf_state.items():
        assert torch.equal(back[k], v), k


@pytest.mark.parametrize("make", [tiny_hf_gpt2, tiny_hf_llama], ids=["gpt2", "llama"])
def test_save_hf_loads_in_transformers_with_same_logits(make, tmp_path):
    ours = convert(make())
    save_hf(ours, tmp_path / "export")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    again = load_hf(tmp_path / "export")
    idx = torch.randint(0, ours.cfg.vocab_size, (1, 30))
    with torch.no_grad():
        ref = ours(idx).logits
        assert (reloaded(idx).logits - ref).abs().max().item() < 1e-5
        assert torch.equal(again(idx).logits, ref)


def test_greedy_generation_matches_transformers_generate():
    from llmcore.models.generate import SamplingConfig, generate

    hf_model = tiny_hf_gpt2()
    ours = convert(hf_model)
    prompt = torch.randint(0, 200, (1, 7))
    with torch.no_grad():
        ref = hf_model.generate(prompt, max_new_tokens=25, do_sample=False, pad_token_id=0, eos_token_id=None)
    got = generate(ours, [prompt[0].tolist()], SamplingConfig(max_new_tokens=25))[0]
    assert got == ref[0, 7:].tolist()


def test_pickle_only_checkpoint_is_refused(tmp_path):
    from llmcore.common import LLMCoreError
    from llmcore.weights.hf_convert import read_hf_state

    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(LLMCoreError, match="safetensors required"):
        read_hf_state(tmp_path)
