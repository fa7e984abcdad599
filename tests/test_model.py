"""Model library: config validation, accounting, cached vs uncached decoding, padding, checkpoints."""

import json

import pytest
import torch

from llmcore.common import LLMCoreError
from llmcore.models.config import PRESETS, ConfigError, ModelConfig
from llmcore.models.generate import SamplingConfig, generate, stream
from llmcore.models.gpt import GPT
from llmcore.weights.weight_file import load_checkpoint, read_config, save_checkpoint

FAMILIES = ["gpt2-tiny", "llama3-tiny"]


def tiny(preset: str, **overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig.from_preset(preset, vocab_size=97, context_length=64, **overrides)).eval()


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"emb_dim": 130}, "emb_dim"),  # not divisible by 4 heads
        ({"n_kv_heads": 3}, "n_kv_heads"),
        ({"n_layers": 0}, "n_layers"),
        ({"vocab_size": "big"}, "vocab_size"),
        ({"norm": "batchnorm"}, "norm"),
        ({"mlp": "relu"}, "mlp"),
        ({"pos_emb": "alibi"}, "pos_emb"),
        ({"dropout": 1.5}, "dropout"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_config_validation_names_field_and_value(overrides, field):
    with pytest.raises(ConfigError, match=rf"model\.{field}") as err:
        ModelConfig.from_preset("gpt2-tiny", **overrides)
    assert "\n" not in str(err.value)


def test_config_json_round_trip_and_presets():
    for name in PRESETS:
        cfg = ModelConfig.from_preset(name)
        assert ModelConfig.from_json(cfg.to_json()) == cfg
        json.loads(cfg.to_json())  # plain JSON
    with pytest.raises(ConfigError, match="unknown preset"):
        ModelConfig.from_preset("gpt5")


@pytest.mark.parametrize(
    "name, expected",
    [("gpt2-124m", 124_439_808), ("gpt2-355m", 354_823_168), ("gpt2-774m", 774_030_080), ("gpt2-1558m", 1_557_611_200)],
)
def test_gpt2_presets_have_real_gpt2_sizes(name, expected):
    cfg = ModelConfig.from_preset(name)
    assert cfg.num_params() == expected  # the counts transformers reports for openai-community/gpt2*
    assert cfg.num_params(include_tied_head=True) == expected + cfg.vocab_size * cfg.emb_dim
    assert cfg.weight_bytes("bf16") == 2 * expected


@pytest.mark.parametrize("preset", FAMILIES + ["llama3-small-cpu"])
def test_param_count_formula_matches_module(preset):
    for overrides in ({}, {"qk_norm": True, "tie_embeddings": True}):
        model = GPT(ModelConfig.from_preset(preset, **overrides))
        assert model.num_params() == model.cfg.num_params()
        assert model.num_params(True) == model.cfg.num_params(True)


def test_flops_per_token_of_gpt2_124m():
    cfg = ModelConfig.from_preset("gpt2-124m")
    # 6·N (N = 85M non-embedding + 38.6M head) + 12·L·C·T
    n = 124_439_808 - 1024 * 768
    assert cfg.flops_per_token() == pytest.approx(6 * n + 12 * 12 * 768 * 1024)


@pytest.mark.parametrize("preset", FAMILIES)
@pytest.mark.parametrize("overrides", [{}, {"qk_norm": True}, {"n_kv_heads": 1}])
def test_kv_cache_greedy_equals_uncached_for_batch_of_different_lengths(preset, overrides):
    model = tiny(preset, **overrides)
    prompts = [[5, 9, 2], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42]]
    cfg = SamplingConfig(max_new_tokens=30)
    cached = generate(model, prompts, cfg, use_cache=True)
    uncached = generate(model, prompts, cfg, use_cache=False)
    alone = [generate(model, [p], cfg, use_cache=False)[0] for p in prompts]
    assert cached == uncached == alone
    assert all(len(t) == 30 for t in cached)


def test_padding_does_not_change_real_positions():
    model = tiny("llama3-tiny")
    idx = torch.tensor([[3, 4, 5, 6]])
    padded = torch.tensor([[0, 0, 0, 3, 4, 5, 6]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        a = model(idx).logits
        b = model(padded, attention_mask=mask).logits[:, 3:]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_hidden_states_and_skip_head():
    model = tiny("gpt2-tiny")
    out = model(torch.tensor([[1, 2, 3]]), return_hidden=True, return_logits=False)
    assert out.logits is None and out.hidden.shape == (1, 3, model.cfg.emb_dim)


def test_sampling_is_seeded_and_respects_stop_and_top_k():
    model = tiny("gpt2-tiny")
    cfg = SamplingConfig(max_new_tokens=20, temperature=1.0, top_k=5, top_p=0.9, seed=7)
    a = generate(model, [[1, 2, 3]], cfg)
    assert a == generate(model, [[1, 2, 3]], cfg)
    assert list(stream(model, [1, 2, 3], cfg)) == a[0]
    first = a[0][0]
    stopped = generate(model, [[1, 2, 3]], SamplingConfig(**{**cfg.__dict__, "stop_ids": [first]}))
    assert stopped == [[]]


def test_top_k_one_is_greedy():
    model = tiny("llama3-tiny")
    greedy = generate(model, [[4, 5]], SamplingConfig(max_new_tokens=10))
    k1 = generate(model, [[4, 5]], SamplingConfig(max_new_tokens=10, temperature=0.8, top_k=1, seed=1))
    assert greedy == k1


def test_context_overflow_is_an_error_and_generation_stops_at_context():
    model = tiny("gpt2-tiny")
    with pytest.raises(ValueError, match="context_length"):
        model(torch.zeros((1, 65), dtype=torch.long))
    out = generate(model, [list(range(1, 61))], SamplingConfig(max_new_tokens=50))
    assert len(out[0]) == 4


@pytest.mark.parametrize("preset", FAMILIES)
def test_checkpoint_round_trip_is_exact(preset, tmp_path):
    model = tiny(preset)
    path = save_checkpoint(tmp_path / "m.safetensors", model, metadata={"step": "3"})
    assert read_config(path) == model.cfg
    loaded = load_checkpoint(path)
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left behind


def test_truncated_checkpoint_fails_with_one_line_error(tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", tiny("gpt2-tiny"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(LLMCoreError, match="truncated or corrupt") as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_shape_mismatched_checkpoint_fails_with_one_line_error(tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", tiny("gpt2-tiny"))
    other = ModelConfig.from_preset("gpt2-tiny", vocab_size=97, context_length=64, emb_dim=64)
    with pytest.raises(LLMCoreError, match="shape mismatch for .*file has") as err:
        load_checkpoint(path, config=other)
    assert "\n" not in str(err.value)


# --- forward + loss: one graph for torch.compile -------------------------------------------------


@pytest.mark.parametrize("preset", FAMILIES)
@pytest.mark.parametrize("pad", [None, 64])
def test_forward_and_loss_compile_to_one_graph(preset, pad):
    """The CUDA path's head + loss (full logits, F.cross_entropy), traced on the CPU: no graph break, so
    torch.compile sees the blocks, the head and the loss as one graph it can fuse."""
    model = tiny(preset, pad_vocab_multiple=pad).train()
    model.head_loss = "full"
    idx = torch.randint(0, 97, (2, 16))
    targets = torch.roll(idx, -1, 1).masked_fill(torch.rand(2, 16) < 0.2, -100)

    def step(idx, targets):
        return model(idx, targets=targets, loss_reduction="sum").loss

    torch._dynamo.reset()
    explained = torch._dynamo.explain(step)(idx, targets)
    torch._dynamo.reset()
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    eager = step(idx, targets)
    model.head_loss = "chunked"
    torch.testing.assert_close(step(idx, targets), eager, rtol=1e-5, atol=1e-5)  # the CPU path, same loss
