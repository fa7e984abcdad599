"""Params profiles (params/*.yaml): they validate as full params files, and the `dvc exp run -S` arguments
`llmcore profile` prints give back exactly their values. Activation checkpointing changes no gradient."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from typer.testing import CliRunner

from llmcore.cli import app
from llmcore.models.config import ModelConfig, model_config_from_params
from llmcore.models.gpt import GPT
from llmcore.params import load_section, merge_params, profile_overrides, read_params
from llmcore.training.config import HardwareConfig
from stages.align import AlignParams
from stages.download import DownloadParams
from stages.instruct import InstructParams
from stages.pretrain import PretrainParams
from stages.tokenize import TokenizeParams

REPO = Path(__file__).resolve().parents[1]
PROFILES = sorted((REPO / "params").glob("*.yaml"))


def set_path(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


@pytest.mark.parametrize("profile", PROFILES, ids=[p.stem for p in PROFILES])
def test_profile_validates_and_round_trips_through_set_param(profile, tmp_path):
    base = read_params(REPO / "params.yaml")
    merged = merge_params(base, read_params(profile))
    result = CliRunner().invoke(
        app, ["profile", str(profile), "--params", str(REPO / "params.yaml"), "--write", str(tmp_path / "merged.yaml")]
    )
    assert result.exit_code == 0, result.output
    path = tmp_path / "merged.yaml"
    assert read_params(path) == merged
    schemas = {
        "download": DownloadParams,
        "tokenize": TokenizeParams,
        "pretrain": PretrainParams,
        "hardware": HardwareConfig,
        "instruct": InstructParams,
        "align": AlignParams,
    }
    for section, schema in schemas.items():
        load_section(section, schema, path)
    cfg = model_config_from_params(merged["model"], vocab_size=65536)
    assert cfg.flops_per_token() > 0.5e9  # a real-size model, not the CPU default

    # Applying the printed --set-param overrides to params.yaml (as dvc exp run does) gives the merged file.
    applied = read_params(REPO / "params.yaml")
    for override in OverridesParser.create().parse_overrides(profile_overrides(base, read_params(profile))):
        set_path(applied, override.key_or_group, override.value())
    assert applied == merged


def counted(fn, count: list[int]):
    def wrapper(*args, **kwargs):
        count[0] += 1
        return fn(*args, **kwargs)

    return wrapper


def test_activation_checkpointing_gives_the_same_gradients():
    cfg = ModelConfig.from_preset(
        "llama3-tiny", vocab_size=64, context_length=16, emb_dim=32, n_layers=3, n_heads=4, n_kv_heads=2, hidden_dim=64
    )
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    grads, calls = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = GPT(cfg)
        model.checkpointing = checkpointing
        count = [0]
        for block in model.blocks:  # count block forwards (hooks do not fire on checkpoint recomputation)
            block.forward = counted(block.forward, count)
        logits = model(idx).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.roll(-1, 1).flatten()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        calls.append(count[0])
    assert calls == [3, 6]  # with checkpointing each block runs again in backward
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=0)


@pytest.mark.parametrize(
    "profile,line",
    [
        ("pretrain:\n  train:\n    lrr: 0.1\n", "pretrain.train.lrr: unknown key (known: batch_size,"),
        ("hardware:\n  threads: many\n", "hardware.threads: expected auto or a positive int, got 'many'"),
        ("pretrian:\n  windows: random\n", "unknown section 'pretrian' (did you mean 'pretrain'?)"),
    ],
)
def test_a_bad_profile_is_one_line_and_writes_nothing(tmp_path, profile, line):
    """`llmcore profile` loads the merged params through every stage's loader before writing or printing."""
    (tmp_path / "bad.yaml").write_text(profile)
    result = CliRunner().invoke(
        app,
        [
            "profile",
            str(tmp_path / "bad.yaml"),
            "--params",
            str(REPO / "params.yaml"),
            "--write",
            str(tmp_path / "merged.yaml"),
        ],
    )
    assert result.exit_code == 1
    (error,) = result.output.strip().splitlines()
    assert error.startswith(f"error: {tmp_path / 'bad.yaml'} (merged over {REPO / 'params.yaml'}): ") and line in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]
    assert not list(REPO.glob(".profile-*"))  # the file validated beside params.yaml is gone
