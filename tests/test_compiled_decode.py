"""benchmarks.compiled_decode --quick: every row is measured, compiled, and gives the eager tokens; llama.cpp's row
where llama-cpp-python is installed. No speed is asserted. The model has test_static_decode.py's gpt2 shapes, so
inductor's on-disk cache usually holds its graphs already."""

import json

import pytest

from benchmarks import compiled_decode

pytestmark = pytest.mark.timeout(300)


def test_quick_run_writes_a_complete_report(tmp_path) -> None:
    out = tmp_path / "compiled_decode.json"
    assert compiled_decode.main(["--quick", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["generate"]
    assert [(r["preset"], r["batch"], r["threads"]) for r in rows] == [("gpt2-tiny", 1, 1), ("gpt2-tiny", 3, 1)]
    for row in rows:
        assert row["compiled"] and row["tokens_equal"] and row["eager_tok_s"] > 0 and row["compiled_tok_s"] > 0
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        assert "llama_cpp_f32" not in rows[0] or rows[0]["llama_cpp_f32"] is None
    else:
        cpp = rows[0]["llama_cpp_f32"]
        assert cpp["tok_s"] > 0 and cpp["first_difference_vs_llmcore"] is None  # the same weights, the same tokens
