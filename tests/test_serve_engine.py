"""The continuous-batching engine and its batched KV cache: concurrent requests share forward passes, join and
leave between steps, and a seeded request's tokens do not depend on what else is in its batch."""

from __future__ import annotations

import queue
import threading
import time

import pytest
import torch

from llmcore.models.config import ModelConfig
from llmcore.models.generate import SamplingConfig, generate
from llmcore.models.gpt import GPT
from llmcore.serve.engine import Engine, Finished, Request
from llmcore.text.tokenizer import Tokenizer

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train("the quick brown fox jumps over the lazy dog, again and again. " * 30, vocab_size=280)


@pytest.fixture(scope="module", params=["llama3-tiny", "gpt2-tiny"])
def family(request, tok) -> GPT:
    """Both position schemes (rotary, learned table) read per-row positions from the batched cache."""
    torch.manual_seed(0)
    return GPT(ModelConfig.from_preset(request.param, vocab_size=tok.vocab_size)).eval()


@pytest.fixture(scope="module")
def model(tok) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig.from_preset("llama3-tiny", vocab_size=tok.vocab_size)).eval()


def run_all(engine: Engine, jobs: list[tuple[list[int], SamplingConfig]], **kwargs) -> list[tuple[str, Finished]]:
    """Submit every job at once; collect each one's text and final event."""
    sinks = [queue.Queue() for _ in jobs]
    for (ids, cfg), sink in zip(jobs, sinks, strict=True):
        engine.submit(Request(ids, cfg, sink.put, **kwargs))
    results = []
    for sink in sinks:
        pieces = []
        while not isinstance(event := sink.get(timeout=30), Finished):
            pieces.append(event)
        results.append(("".join(pieces), event))
    return results


def test_batched_cache_rows_match_single_sequences(family: GPT) -> None:
    """Rows of different lengths in one BatchedKVCache give the logits each sequence gets alone."""
    model = family
    torch.manual_seed(1)
    prompts = [torch.randint(0, 200, (n,)) for n in (5, 2, 9)]
    cache = model.new_batched_cache(4)
    for row, p in enumerate(prompts):  # prefill each row alone, as the engine does
        model(p[None], cache=cache.rows(row, row + 1))
    nxt = torch.tensor([[7], [8], [9]])
    batched = model(nxt, cache=cache.rows(0, 3)).logits[:, -1]
    for row, p in enumerate(prompts):
        alone = model(torch.cat([p, nxt[row]])[None]).logits[:, -1]
        torch.testing.assert_close(batched[row], alone[0], atol=1e-5, rtol=1e-4)
    cache.copy_row(2, 0)  # compaction: row 2 moves into slot 0 and decodes on as before
    assert cache.lengths[:1].tolist() == [10]
    again = model(torch.tensor([[3]]), cache=cache.rows(0, 1)).logits[:, -1]
    alone = model(torch.cat([prompts[2], torch.tensor([9, 3])])[None]).logits[:, -1]
    torch.testing.assert_close(again, alone, atol=1e-5, rtol=1e-4)


def test_concurrent_requests_share_steps_and_match_generate(family: GPT, tok: Tokenizer) -> None:
    model = family
    engine = Engine(model, tok, max_batch=4)
    try:
        jobs = []
        for i in range(10):  # more requests than slots: the rest wait and join as rows leave
            greedy = i % 3 == 0
            cfg = SamplingConfig(8 + 3 * i, temperature=0 if greedy else 0.9, top_k=None if i % 2 else 20,
                                 top_p=0.9 if i % 4 == 1 else None, seed=100 + i)  # fmt: skip
            jobs.append((tok.encode(f"the fox {'again ' * i}"), cfg))
        results = run_all(engine, jobs)
        for (ids, cfg), (text, done) in zip(jobs, results, strict=True):
            (expected,) = generate(model, [ids], cfg)
            assert text == tok.decode(expected)  # each request is exactly the library's own generation
            assert done.reason == "length" and done.completion_tokens == cfg.max_new_tokens
            assert done.prompt_tokens == len(ids)
        total_tokens = sum(cfg.max_new_tokens for _, cfg in jobs)
        assert engine.max_live == 4  # the batch filled up
        assert engine.steps < total_tokens / 2  # decode passes were shared
    finally:
        engine.stop()


def test_a_seeded_request_does_not_depend_on_its_batch(model: GPT, tok: Tokenizer) -> None:
    engine = Engine(model, tok, max_batch=8)
    try:
        ids = tok.encode("the lazy dog")
        cfg = SamplingConfig(30, temperature=1.0, top_k=50, seed=1234)
        ((alone, _),) = run_all(engine, [(ids, cfg)])
        others = [(tok.encode("quick " * (k + 1)), SamplingConfig(5 + 7 * k, temperature=1.0, seed=k))
                  for k in range(7)]  # fmt: skip
        crowded = run_all(engine, [others[0], others[1], others[2], (ids, cfg), *others[3:]])
        assert crowded[3][0] == alone
        assert engine.max_live == 8
    finally:
        engine.stop()


def test_join_between_steps_leave_on_stop_and_cancel(model: GPT, tok: Tokenizer) -> None:
    engine = Engine(model, tok, max_batch=4)
    try:
        long_events: queue.Queue = queue.Queue()
        long = engine.submit(Request(tok.encode("the"), SamplingConfig(120, seed=0), long_events.put))
        first = long_events.get(timeout=30)  # the long request is decoding ...
        assert isinstance(first, str) or first.reason != "cancelled"
        ((text, done),) = run_all(engine, [(tok.encode("fox"), SamplingConfig(3, seed=0))])  # ... and this joins
        assert done.reason == "length" and done.completion_tokens == 3
        assert not long.cancelled and engine.steps < 100  # it did not wait for the long one to finish
        long.cancel()
        while not isinstance(event := long_events.get(timeout=30), Finished):
            pass
        assert event.reason == "cancelled" and event.completion_tokens < 120
        assert engine._live == []  # the slot is free

        # A stop string ends the sequence at the step that completes it; the text stops before it.
        ids, cfg = tok.encode("the quick"), SamplingConfig(40, seed=0)
        ((full, _),) = run_all(engine, [(ids, cfg)])
        stop = full[len(full) // 2 : len(full) // 2 + 3]
        ((cut, done),) = run_all(engine, [(ids, cfg)], stop=[stop])
        assert cut == full[: full.find(stop)] and done.reason == "stop"
        assert done.completion_tokens < 40
    finally:
        engine.stop()


def slowed(model: GPT, monkeypatch, seconds: float) -> GPT:
    """The model with a pause before each forward pass, so a test can act while sequences are still running."""
    forward = model.forward

    def slow_forward(*args, **kwargs):
        time.sleep(seconds)
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", slow_forward)
    return model


def test_stop_ends_waiting_and_running_requests(model: GPT, tok: Tokenizer, monkeypatch) -> None:
    engine = Engine(slowed(model, monkeypatch, 0.005), tok, max_batch=1)
    events: list[queue.Queue] = [queue.Queue() for _ in range(3)]
    for sink in events:
        engine.submit(Request(tok.encode("the"), SamplingConfig(10_000, seed=0), sink.put))
    threading.Event().wait(0.2)
    engine.stop()
    finals = []
    for sink in events:
        while not isinstance(event := sink.get(timeout=30), Finished):
            pass
        finals.append(event.reason)
    assert set(finals) <= {"cancelled", "length"} and "cancelled" in finals
    with pytest.raises(RuntimeError, match="stopped"):
        engine.submit(Request(tok.encode("the"), SamplingConfig(1), lambda e: None))


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(model: GPT, tok: Tokenizer) -> None:
    engine = Engine(model, tok, max_batch=4, prefill_chunk=8)
    try:
        passes_at_piece: list[int] = []
        first: queue.Queue = queue.Queue()

        def sink(event) -> None:
            passes_at_piece.append(engine.prefill_passes)
            first.put(event)

        running = engine.submit(Request(tok.encode("the"), SamplingConfig(100, seed=0), sink))
        first.get(timeout=30)  # it is decoding
        before = engine.prefill_passes
        long_ids = tok.encode("the quick brown fox jumps over the lazy dog, " * 8)[:90]
        cfg = SamplingConfig(10, seed=0)
        ((text, done),) = run_all(engine, [(long_ids, cfg)])
        (expected,) = generate(model, [long_ids], cfg)
        assert text == tok.decode(expected) and done.prompt_tokens == 90  # chunked prefill, same tokens
        chunks = -(-90 // 8)
        assert engine.prefill_passes - before == chunks
        # the running request kept getting tokens while the long prompt went in
        assert any(before < p < before + chunks for p in passes_at_piece)
        running.cancel()
    finally:
        engine.stop()
