"""Importing a checkpoint builds the model on the meta device and makes the converted tensors its parameters:
RAM peaks near 1x the weights (it was ~3x: the file's tensors, their converted copies and a random init)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from llmcore.models.config import ModelConfig
from llmcore.models.gpt import GPT
from llmcore.weights.hf_convert import load_hf, save_hf
from llmcore.weights.weight_file import load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
MEASURE = """
import json, sys
from llmcore.weights.hf_convert import load_hf
from llmcore.weights.weight_file import load_checkpoint
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) * 1024
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:")) * 1024
before = rss()
model = (load_hf if sys.argv[1] == "hf" else load_checkpoint)(sys.argv[2])
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"extra": hwm() - before, "weights": weights}))
"""


def peak_over_weights(kind: str, path: Path) -> float:
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, kind, str(path)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return r["extra"] / r["weights"]


def test_import_peaks_near_one_copy_of_the_weights(tmp_path):
    if not Path("/proc/self/status").exists():  # pragma: no cover - Linux only
        return
    cfg = ModelConfig.from_preset("gpt2-124m", n_layers=4, emb_dim=512, n_heads=8)  # ~38M params, 150 MB fp32
    torch.manual_seed(0)
    model = GPT(cfg)
    save_hf(model, tmp_path / "hf")  # GPT-2 layout: Conv1D weights are transposed on import
    save_checkpoint(tmp_path / "model.safetensors", model)
    hf_ratio = peak_over_weights("hf", tmp_path / "hf")
    own_ratio = peak_over_weights("llmcore", tmp_path / "model.safetensors")
    assert hf_ratio < 1.6, hf_ratio
    assert own_ratio < 1.4, own_ratio
    # and the imported model is the model
    again, ours = load_hf(tmp_path / "hf"), load_checkpoint(tmp_path / "model.safetensors")
    idx = torch.randint(0, cfg.vocab_size, (1, 12))
    with torch.no_grad():
        ref = model.eval()(idx).logits
        assert torch.equal(again(idx).logits, ref) and torch.equal(ours(idx).logits, ref)
    assert all(p.requires_grad for p in ours.parameters())  # fine-tunes train what they load
    assert again.out_head.weight is again.tok_emb.weight  # the tied head is tied again
