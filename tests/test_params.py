"""params.yaml validation: every bad value is one line naming its key path."""

from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from llmcore.models.config import model_config_from_params
from llmcore.params import ParamsError, load_section


@dataclass
class Inner:
    url: str
    sha256: str | None = None


@dataclass
class Section:
    n_heads: int = 4
    lr: float = 1e-3
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: bool = False
    sources: dict[str, Inner] = field(default_factory=dict)
    prompts: list[str] = field(default_factory=list)


def write(tmp_path, text):
    p = tmp_path / "params.yaml"
    p.write_text(text)
    return p


def test_valid_section_loads_typed(tmp_path):
    p = write(tmp_path, "s:\n  n_heads: 8\n  lr: 1\n  sources: {a: {url: 'https://x/y'}}\n  prompts: [hi]\n")
    s = load_section("s", Section, p)
    assert s.n_heads == 8 and s.lr == 1.0 and isinstance(s.lr, float)
    assert s.sources["a"] == Inner("https://x/y") and s.prompts == ["hi"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("s:\n  n_heads: eight\n", "s.n_heads: expected int, got 'eight'"),
        ("s:\n  n_heads: true\n", "s.n_heads: expected int, got True"),
        ("s:\n  n_head: 8\n", "s.n_head: unknown key"),
        ("s:\n  precision: fp8\n", "s.precision: expected one of fp32|bf16|fp16, got 'fp8'"),
        ("s:\n  sources: {a: {sha256: abc}}\n", "s.sources.a.url: missing required key"),
        ("s:\n  sources: {a: {url: 3}}\n", "s.sources.a.url: expected str, got 3"),
        ("s:\n  prompts: [hi, 3]\n", "s.prompts[1]: expected str, got 3"),
        ("other: {}\n", "s: missing section"),
        ("s: [1, 2\n", "invalid YAML"),
    ],
)
def test_bad_params_name_the_key(tmp_path, text, message):
    with pytest.raises(ParamsError) as err:
        load_section("s", Section, write(tmp_path, text))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_model_section_preset_and_overrides():
    cfg = model_config_from_params({"preset": "llama3-tiny", "n_layers": 2}, vocab_size=300)
    assert cfg.n_layers == 2 and cfg.vocab_size == 300 and cfg.norm == "rmsnorm"
    with pytest.raises(ParamsError, match=r"model.n_heads: expected int, got 'eight'"):
        model_config_from_params({"preset": "llama3-tiny", "n_heads": "eight"})
    with pytest.raises(ParamsError, match=r"model.preset: expected one of"):
        model_config_from_params({"preset": "gpt5"})
    with pytest.raises(ParamsError, match=r"model.emb_dim: 130 is not divisible"):
        model_config_from_params({"preset": "gpt2-tiny", "emb_dim": 130})


@pytest.mark.parametrize("section", ["instruct", "align"])
@pytest.mark.parametrize(
    "block, value, message",
    [
        ("generate", {"max_new_tokens": 0}, "generate.max_new_tokens: expected a positive int, got 0"),
        ("generate", {"batch_size": 0}, "generate.batch_size: expected a positive int, got 0"),
        ("generate", {"temperature": -1}, "generate.temperature: expected >= 0, got -1.0"),
        ("lora", {"rank": 0}, "lora.rank: expected a positive int, got 0"),
        ("train", {"epochs": 1, "warmup_steps": -1}, "train.warmup_steps: expected >= 0, got -1"),
    ],
)
def test_a_shared_param_class_names_the_section_it_sits_in(tmp_path, section, block, value, message):
    """align.generate is instruct's GenerateParams (lora, train: shared too): an error names the key the user wrote."""
    from stages.align import AlignParams
    from stages.instruct import InstructParams

    schema = {"instruct": InstructParams, "align": AlignParams}[section]
    path = write(tmp_path, yaml.safe_dump({section: {block: value}}))
    with pytest.raises(ParamsError) as err:
        load_section(section, schema, path)
    assert str(err.value) == f"{section}.{message}"


def test_model_config_errors_name_the_section_they_come_from():
    with pytest.raises(ParamsError, match=r"^import.sources.x.emb_dim: 130 is not divisible"):
        model_config_from_params({"preset": "gpt2-tiny", "emb_dim": 130}, where="import.sources.x")
