"""benchmarks.compiled_decode --quick: every row is measured, compiled, and gives the eager tokens; llama.cpp's row
where llama-cpp-python is installed. No speed is asserted. The model has test_static_decode.py's gpt2 shapes, so in
one pytest session its packages are usually in the session's decode cache already (else two builds, ~20 s each on 2
cores). The other modes (slow: a JIT compile, a static-batch build and a cold build in a fresh process) each write
their complete report, with the eager tokens wherever tokens are decoded."""

import json
from pathlib import Path

import pytest

from benchmarks import compiled_decode
from llmcore.models import static_decode
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.timeout(300)


def test_quick_run_writes_a_complete_report(tmp_path) -> None:
    out = tmp_path / "compiled_decode.json"
    assert compiled_decode.main(["--quick", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["generate"]
    assert [(r["preset"], r["batch"], r["threads"]) for r in rows] == [("gpt2-tiny", 1, 1), ("gpt2-tiny", 3, 1)]
    for row in rows:
        assert row["compiled"] and row["tokens_equal"] and row["eager_tok_s"] > 0 and row["compiled_tok_s"] > 0
        assert row["package"] in ("loaded", "built", "ready") and row["first_compiled_call_s"] > 0
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        assert "llama_cpp_f32" not in rows[0] or rows[0]["llama_cpp_f32"] is None
    else:
        cpp = rows[0]["llama_cpp_f32"]
        assert cpp["tok_s"] > 0 and cpp["first_difference_vs_llmcore"] is None  # the same weights, the same tokens


@pytest.mark.slow
def test_options_prices_the_package_against_the_jit_step(tmp_path) -> None:
    out = tmp_path / "options.json"
    assert compiled_decode.main(["--quick", "--options", "--out", str(out)]) == 0
    report = json.loads(out.read_text())["options"]
    assert set(report) == {"batch1-threads1", "batch3-threads1"}
    for rows in report.values():
        assert set(rows) == {
            compiled_decode.JIT,
            compiled_decode.LIBRARY,
            "AOT package, argmax-outside",
            "AOT package, fresh-tensors",
        }
        assert rows[compiled_decode.JIT]["vs_jit"] == 1.0 and rows[compiled_decode.JIT]["compile_s"] > 0
        assert rows[compiled_decode.LIBRARY]["package"] in ("loaded", "built")
        for row in rows.values():
            assert row["tokens_equal"] and row["steps_s"] > 0 and row["tok_s"] > 0 and row["vs_jit"] > 0


@pytest.mark.slow
def test_compile_time_builds_into_an_empty_cache_then_loads_in_a_fresh_process(tmp_path) -> None:
    out = tmp_path / "compile_time.json"
    assert compiled_decode.main(["--quick", "--compile-time", "--out", str(out)]) == 0
    runs = json.loads(out.read_text())["compile_time"]["gpt2-tiny"]
    assert [runs[name]["package"] for name in ("cold", "warm", "warm_auto")] == ["built", "loaded", "loaded"]
    assert runs["warm"]["compile_s"] < runs["cold"]["compile_s"]  # loading a package, not building one
    for run in runs.values():
        assert run["tokens_equal"] and run["first_compiled_step_s"] >= run["compile_s"] > 0


@pytest.mark.slow
def test_batch_shapes_times_each_way_to_shape_the_batch(tmp_path) -> None:
    out = tmp_path / "batch_shapes.json"
    assert compiled_decode.main(["--quick", "--batch-shapes", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["batch_shapes"]["gpt2-tiny-threads1"]
    assert rows.pop("static_matches_library") is True  # the same step, compiled for another batch shape
    assert set(rows) == {
        "1 stream: batch-1 package (library)",
        "1 stream: always 3 rows",
        "3 streams: static batch-3 package",
        "3 streams: dynamic batch >= 2 package (library)",
    }
    assert all(row["us_per_step"] > 0 and row["tok_s"] > 0 for row in rows.values())


def test_the_serving_page_names_the_decode_cache_and_the_build_threshold(monkeypatch) -> None:
    """docs/serving.md's folder, variable and step count are the library's."""
    page = (REPO_ROOT / "docs" / "serving.md").read_text(encoding="utf-8")
    monkeypatch.delenv(static_decode.CACHE_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert static_decode.cache_dir() == Path.home() / ".cache" / "llmcore" / "decode"
    assert "`~/.cache/llmcore/decode`" in page and f"`${static_decode.CACHE_ENV}` moves it" in page
    assert f"after ~{static_decode.COMPILE_AFTER_STEPS:,} decode steps" in page
