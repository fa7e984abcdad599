"""benchmarks.bench on tiny shapes: every section runs, the report is complete, missing peers are skipped with
a reason (llmcore's own figures stay), the book->llmcore weight map is exact. No speed is asserted."""

import dataclasses
import json

import pytest
import torch

from benchmarks import bench
from benchmarks.bench import QUICK, SECTIONS, Plan, Shape
from tests.conftest import require_shared

HAVE_BOOK = bench.have("llms_from_scratch")
needs_book = pytest.mark.skipif(not HAVE_BOOK, reason="llms-from-scratch not installed (make bench installs it)")

# Smaller still than --quick, and one repetition of everything: this checks the logic, not the speed.
TINY = Plan(
    shape=Shape(vocab_size=300, context_length=16, emb_dim=32, n_heads=2, n_layers=1, batch_size=2),
    train_warmup=0,
    train_reps=1,
    train_peers=("llmcore", "book", "hf"),
    precisions=("fp32", "bf16"),
    gen_prompt=4,
    gen_new=5,
    gen_reps=1,
    bpe_vocabs=(260, 270),
    bpe_reps=1,
    text_bytes=20_000,
    encode_reps=1,
    loss_steps=3,
    peak_n=64,
    peak_reps=1,
    isolate=False,
    rounds=2,  # rounds: pooling is exercised
)


@pytest.fixture(scope="module")
def report():
    if any(not p.exists() for p in (bench.SHAKESPEARE, bench.GPT2_BPE / "vocab.bpe")):
        require_shared(bench.SHAKESPEARE)
    return bench.run_benchmarks(TINY, SECTIONS, log=lambda *a, **k: None)


def test_report_has_every_section_and_target(report):
    for section in SECTIONS:
        if section == "loss" and not HAVE_BOOK:  # the loss-curve check compares with the book's model
            assert report["skipped"], report
            continue
        assert report.get(section), section
    assert [t["key"] for t in report["targets"]] == [k for k, _, _ in bench.TARGETS]
    llm = report["train"]["llmcore fp32"]
    assert llm["tokens_per_s"] > 0 and llm["mfu"] > 0 and len(llm["wall_s"]) == TINY.train_reps * TINY.rounds
    assert report["generate"]["llmcore"]["new_tokens_per_s"] > 0
    json.dumps(report)  # what --out writes
    table = bench.format_table(report)
    assert "| llmcore | bf16 |" in table and "## Targets" in table


def test_bpe_and_encode_agree_with_the_peers(report):
    # same split regex, same tie-breaks up to these sizes: identical compression; and identical GPT-2 ids
    if report["bpe"]["tokenizers"] is not None:
        for v in TINY.bpe_vocabs:
            ours, theirs = report["bpe"]["llmcore"][str(v)], report["bpe"]["tokenizers"][str(v)]
            assert ours["vocab_size"] == theirs["vocab_size"] == v
            assert ours["bytes_per_token"] == pytest.approx(theirs["bytes_per_token"], rel=0.01)
    assert report["encode"]["same_ids_as_tiktoken"] is True


@needs_book
def test_loss_curves_match_and_book_generation_runs(report):
    loss = report["loss"]
    assert loss["ok"], loss
    assert len(loss["book"]) == TINY.loss_steps
    assert report["generate"]["book"]["new_tokens_per_s"] > 0


def test_missing_peers_are_skipped_with_a_reason_and_llmcore_still_reports(monkeypatch):
    monkeypatch.setattr(bench, "have", lambda module: False)
    plan = dataclasses.replace(TINY, precisions=("fp32",))
    out = bench.run_benchmarks(plan, ("train", "generate", "loss"), log=lambda *a, **k: None)
    assert out["train"]["llmcore fp32"]["tokens_per_s"] > 0
    assert out["generate"]["llmcore"]["new_tokens_per_s"] > 0
    assert out["train"]["book fp32"] is None and out["generate"]["hf"] is None
    assert "pip install --no-deps llms-from-scratch" in out["skipped"]["train book fp32"]
    assert "transformers not installed" in out["skipped"]["generate hf"]
    assert {t["key"]: t["met"] for t in out["targets"]}["train_fp32_vs_book"] is None
    assert "skipped" in bench.format_table(out)


@needs_book
def test_book_to_llmcore_gives_the_same_logits():
    from llms_from_scratch.ch04 import GPTModel

    torch.manual_seed(0)
    book = GPTModel(bench.book_config(TINY.shape, dropout=0.0)).eval()
    ours = bench.book_to_llmcore(book, bench.llmcore_config(TINY.shape, dropout=0.0, tie_embeddings=False)).eval()
    idx = torch.randint(0, TINY.shape.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx).logits, book(idx), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="untied"):
        bench.book_to_llmcore(book, bench.llmcore_config(TINY.shape))


def test_worker_subprocess_reports_its_own_peak_rss():
    out = bench.run_in_subprocess(TINY, {"job": "peak", "precision": "fp32"})
    assert out["flops"] > 0 and out["peak_rss_mb"] > 10  # torch alone is more than 10 MB resident


def test_cli_rejects_unknown_section_and_quick_plan_is_small():
    with pytest.raises(SystemExit):
        bench.main(["--only", "train,speed"])
    assert not QUICK.isolate and QUICK.shape.vocab_size < 1000  # --quick stays well under a minute
    assert bench.measure_matmul_peak(torch.float32, "cpu", n=64, reps=1) > 0
