"""benchmarks.structured_bench on a tiny shape: every figure is produced and the table is complete. No speed is
asserted (the ratio is reported, its 0.7x target is not a test)."""

import torch

from benchmarks import structured_bench
from benchmarks.structured_bench import Case


def test_structured_bench_reports_every_figure() -> None:
    case = Case(
        "tiny", "llama3-tiny", {"context_length": 128, "n_layers": 1}, "bpe300", prompt=4, new=6, clients=(1, 3), reps=1
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is fastest, and steady on a busy machine
    try:
        report = structured_bench.run([case], log=lambda *a: None)
    finally:
        torch.set_num_threads(threads)
    (entry,) = report["cases"]
    assert entry["vocab_size"] == 300 and entry["first_compile_ms"] > 0
    for n in (1, 3):
        r = entry[f"streams_{n}"]
        assert r["plain_tokens_per_s"] > 0 and r["schema_tokens_per_s"] > 0
        assert r["ratio"] == r["schema_tokens_per_s"] / r["plain_tokens_per_s"]
    assert report["target_ratio"] == 0.7
    assert report["table"].count("\n") == 3 and "tiny" in report["table"]
