"""benchmarks.gpu: the CPU smoke run produces every section of the report; the device table and the batch rule.
The GPU figures themselves come from running it on a GPU (docs/scale.md); nothing here times anything."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import gpu


def test_smoke_run_writes_every_section(tmp_path, capsys):
    out = tmp_path / "gpu" / "cpu.json"
    assert gpu.main(["--smoke", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["status"] == "complete" and report["smoke"] and report["skipped"] == []
    assert report["device"] == "cpu" and report["datasheet_bf16_tflops"] is None
    assert report["matmul_peak_bf16_tflops"] > 0
    names = [r["name"] for r in report["train"]]
    assert names == ["gpt2-tiny", "llama-tiny", "gpt2-tiny (vocabulary not padded)", "gpt2-tiny (chunked head + loss)"]
    for r in report["train"]:
        assert r["tokens_per_s"] > 0 and r["model_tflops"] > 0 and math.isfinite(r["final_loss"])
        assert r["mfu_datasheet"] is None and r["mfu_measured_peak"] > 0
    assert report["train"][0]["pad_vocab_multiple"] == 64 and report["train"][2]["pad_vocab_multiple"] is None
    assert [r["head_loss"] for r in report["train"]] == ["chunked", "chunked", "chunked", "chunked"]  # CPU: auto
    decode = report["decode"]
    assert [(d["precision"], d["batch"]) for d in decode[:4]] == [("fp32", 1), ("fp32", 8), ("bf16", 1), ("bf16", 8)]
    assert all(d["tokens_per_s"] > 0 and d["new_tokens"] == 8 for d in decode[:4])
    assert decode[4]["mode"] == "cuda-graph" and "skipped" in decode[4]  # the hook, until llmcore has the path
    top = report["profile"]["top"]
    assert len(top) == 10 and sum(k["share"] for k in top) <= 1.0 + 1e-9
    assert [k["ms"] for k in top] == sorted((k["ms"] for k in top), reverse=True)
    impls = {(r["impl"], r["precision"]) for r in report["head_loss"][0]["results"]}
    assert impls == {("chunked", "fp32"), ("full", "fp32"), ("chunked", "bf16"), ("full", "bf16")}
    printed = capsys.readouterr().out
    assert "| gpt2-tiny (chunked) | 4 × 32 |" in printed and "top kernels of one step" in printed


@pytest.mark.parametrize(
    "name, tflops",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA H100 NVL", None),
        ("NVIDIA L4", None),
    ],
)
def test_datasheet_figure_by_device_name(name, tflops):
    assert gpu.datasheet_tflops(name)[0] == tflops


def test_report_file_name_and_batch_rule():
    assert gpu.device_slug("NVIDIA H200") == "h200"
    assert gpu.device_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    GiB = 2**30
    # 3 GiB at batch 1, 4 GiB at batch 2: 1 GiB per sequence, 2 GiB + AdamW moments fixed
    batch, per_row, fixed = gpu.largest_batch(3 * GiB, 4 * GiB, 125_000_000, 80 * GiB)
    assert per_row == GiB and fixed == 2 * GiB + 8 * 125_000_000
    assert batch == 64  # 2.9 + 64 fits in 68 GiB (85% of 80); 96 does not
    assert gpu.largest_batch(40 * GiB, 75 * GiB, 125_000_000, 80 * GiB)[0] == 1  # 35 GiB a sequence
