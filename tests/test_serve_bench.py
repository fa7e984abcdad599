"""benchmarks.serve_bench on a tiny shape: every figure is produced and the table is complete. No speed is asserted."""

import torch

from benchmarks import serve_bench
from benchmarks.serve_bench import Case


def test_serve_bench_reports_every_figure(tmp_path) -> None:
    case = Case("tiny", "llama3-tiny", {"vocab_size": 300, "n_layers": 1}, prompt=4, new=4, clients=(1, 3), reps=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is fastest, and steady on a busy machine
    try:
        report = serve_bench.run([case], log=lambda *a: None)
    finally:
        torch.set_num_threads(threads)
    (entry,) = report["cases"]
    server = entry["server"]
    for n in (1, 3):
        assert server[f"clients_{n}"]["tokens_per_s"] > 0
        assert 0 < server[f"clients_{n}"]["ttft_p50_ms"] <= server[f"clients_{n}"]["ttft_p95_ms"]
    assert server["batching_speedup"] > 0 and 1 <= server["max_live"] <= 3
    alone = server["engine_alone"]  # the same engine with no HTTP: one request, then 3 submitted at once
    one, three = alone["clients_1"], alone["clients_3"]
    assert one["ttft_p50_ms"] > 0 and 0 < three["ttft_p50_ms"] <= three["ttft_p95_ms"]
    assert alone["ttft_ratio"] == alone["clients_3"]["ttft_p95_ms"] / alone["clients_1"]["ttft_p50_ms"]
    # warm-up, one lone request, then three requests in one to three passes (up to two waited for)
    assert 3 <= server["prefill_passes"] <= 5 and 0 <= server["gathered"] <= 2
    single = entry["single_stream"]
    assert single["engine_tokens_per_s"] > 0 and single["generate_tokens_per_s"] > 0
    assert single["transformers_tokens_per_s"] > 0  # transformers is a dev dependency
    assert report["table"].count("\n") == 2 and "tiny" in report["table"]
