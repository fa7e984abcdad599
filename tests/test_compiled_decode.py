"""benchmarks.compiled_decode: the static-shape decode step gives generate's greedy tokens (eager; compiling it is
left to `make bench`, where its time is measured)."""

import pytest
import torch

from benchmarks.compiled_decode import StaticDecoder, greedy
from llmcore.models.config import ModelConfig
from llmcore.models.generate import SamplingConfig, generate
from llmcore.models.gpt import GPT


@pytest.mark.parametrize("preset", ["llama3-tiny", "gpt2-tiny"])
def test_static_decode_step_matches_generate(preset: str) -> None:
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset(preset, vocab_size=300, n_layers=2, dropout=0.0)).eval()
    prompt = torch.randint(0, 300, (7,)).tolist()
    assert greedy(StaticDecoder(model).step, prompt, 20) == generate(model, [prompt], SamplingConfig(20))[0]
