"""The continuous-batching engine and its batched KV cache: concurrent requests share forward passes, join and
leave between steps, and a seeded request's tokens do not depend on what else is in its batch."""

from __future__ import annotations

import contextlib
import copy
import queue
import threading
import time

import pytest
import torch

from llmcore.models import packed
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


def run_all(
    engine: Engine, jobs: list[tuple[list[int], SamplingConfig]], together: bool = False, **kwargs
) -> list[tuple[str, Finished]]:
    """Submit every job at once (``together``: in one engine turn); collect each one's text and final event."""
    sinks = [queue.Queue() for _ in jobs]
    with engine._cv if together else contextlib.nullcontext():  # the engine thread admits after the lock is free
        for (ids, cfg), sink in zip(jobs, sinks, strict=True):
            engine.submit(Request(ids, cfg, sink.put, **kwargs))
    return [collect(sink) for sink in sinks]


def collect(sink: queue.Queue) -> tuple[str, Finished]:
    pieces = []
    while not isinstance(event := sink.get(timeout=30), Finished):
        pieces.append(event)
    return "".join(pieces), event


def prompts(tok: Tokenizer, lengths: list[int]) -> list[list[int]]:
    """Different prompts of the given token lengths."""
    ids = tok.encode("the quick brown fox jumps over the lazy dog, again and again. " * 12)
    return [ids[3 * i : 3 * i + n] for i, n in enumerate(lengths)]


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
            cfg = SamplingConfig(
                8 + 3 * i,
                temperature=0 if greedy else 0.9,
                top_k=None if i % 2 else 20,
                top_p=0.9 if i % 4 == 1 else None,
                seed=100 + i,
            )
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


@pytest.mark.skipif(not packed.available(), reason="this torch has no oneDNN")
def test_packed_weights_serve_the_same_tokens(family: GPT, tok: Tokenizer) -> None:
    """An engine over a model whose linear layers run on oneDNN, batches on packed weights (llmcore.models.packed; the
    engine sets up wide models itself, so a small one is set up by hand here) serves the plain library's tokens."""
    model = copy.deepcopy(family)
    assert packed.onednn_linears(model, min_elements=0) > 0
    engine = Engine(model, tok, max_batch=4)
    try:
        jobs = [(ids, SamplingConfig(10, temperature=0)) for ids in prompts(tok, [3, 7, 5, 9])]
        results = run_all(engine, jobs, together=True)
        for (ids, cfg), (text, _) in zip(jobs, results, strict=True):
            (expected,) = generate(family, [ids], cfg)
            assert text == tok.decode(expected)
        assert engine.max_live == 4 and engine.packed_layers > 0
    finally:
        engine.stop()


def test_a_seeded_request_does_not_depend_on_its_batch(model: GPT, tok: Tokenizer) -> None:
    engine = Engine(model, tok, max_batch=8)
    try:
        ids = tok.encode("the lazy dog")
        cfg = SamplingConfig(30, temperature=1.0, top_k=50, seed=1234)
        ((alone, _),) = run_all(engine, [(ids, cfg)])
        others = [
            (tok.encode("quick " * (k + 1)), SamplingConfig(5 + 7 * k, temperature=1.0, seed=k)) for k in range(7)
        ]
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


def test_right_padded_rows_prefill_in_one_pass(family: GPT) -> None:
    """Rows of different lengths prefilled in one right-padded pass, each length then set to its real one, decode
    as each sequence alone: the padding past a row's length is never attended to."""
    model = family
    torch.manual_seed(1)
    seqs = [torch.randint(0, 200, (n,)) for n in (5, 2, 9)]
    cache = model.new_batched_cache(3)
    ids = torch.zeros(3, 9, dtype=torch.long)
    for row, p in enumerate(seqs):
        ids[row, : len(p)] = p
    hidden = model(ids, cache=cache, return_logits=False, return_hidden=True).hidden
    cache.lengths.copy_(torch.tensor([len(p) for p in seqs]))
    for row, p in enumerate(seqs):
        alone = model(p[None]).logits[0, -1]
        torch.testing.assert_close(model.head(hidden[row, len(p) - 1]), alone, atol=1e-5, rtol=1e-4)
    nxt = torch.tensor([[7], [8], [9]])
    batched = model(nxt, cache=cache).logits[:, -1]
    for row, p in enumerate(seqs):
        alone = model(torch.cat([p, nxt[row]])[None]).logits[:, -1]
        torch.testing.assert_close(batched[row], alone[0], atol=1e-5, rtol=1e-4)


def test_requests_admitted_together_prefill_in_one_pass(family: GPT, tok: Tokenizer) -> None:
    """8 prompts of different lengths admitted in one turn: one padded prefill pass, and each request's tokens are
    those of the request alone, greedy and seeded sampling."""
    model = family
    engine = Engine(model, tok, max_batch=8)
    try:
        ids = prompts(tok, [3, 17, 1, 9, 30, 5, 12, 2])
        greedy = [(p, SamplingConfig(12)) for p in ids]
        sampled = [
            (
                p,
                SamplingConfig(
                    12, temperature=1.0, top_k=None if i % 2 else 40, top_p=0.9 if i % 3 == 0 else None, seed=i
                ),
            )
            for i, p in enumerate(ids)
        ]
        for passes, jobs in enumerate([greedy, sampled], start=1):
            results = run_all(engine, jobs, together=True)
            assert engine.prefill_passes == passes and engine.max_live == 8
            for (p, cfg), (text, done) in zip(jobs, results, strict=True):
                (expected,) = generate(model, [p], cfg)
                assert text == tok.decode(expected)
                assert done.reason == "length" and done.completion_tokens == 12
    finally:
        engine.stop()


def test_a_long_prompt_admitted_with_short_ones_is_chunked_between_decode_steps(model: GPT, tok: Tokenizer) -> None:
    """prefill_chunk=16 bounds rows x width: three short prompts and the first part of a long one share a pass,
    the long one goes on in chunks while the first short one decodes, and rows that leave (after 1 and 2 tokens)
    while the long prompt is part-way in move it down with them."""
    engine = Engine(model, tok, max_batch=8, prefill_chunk=16)
    try:
        s0, s1, s3, long, s2 = prompts(tok, [4, 4, 4, 40, 4])
        jobs = [
            (s0, SamplingConfig(20)),
            (s1, SamplingConfig(1)),
            (s3, SamplingConfig(2)),
            (long, SamplingConfig(10)),
            (s2, SamplingConfig(10)),
        ]
        passes_at_piece: list[int] = []
        sinks = [queue.Queue() for _ in jobs]

        def first_sink(event) -> None:
            passes_at_piece.append(engine.prefill_passes)
            sinks[0].put(event)

        with engine._cv:
            for i, ((ids, cfg), sink) in enumerate(zip(jobs, sinks, strict=True)):
                engine.submit(Request(ids, cfg, first_sink if i == 0 else sink.put))
        results = [collect(sink) for sink in sinks]
        # s0 s1 s3 + 4 of long | 16 of long | 16 of long | last 4 of long + s2
        assert engine.prefill_passes == 4
        assert {2, 3} <= set(passes_at_piece)  # s0 got tokens while the long prompt went in
        for (ids, cfg), (text, done) in zip(jobs, results, strict=True):
            (expected,) = generate(model, [ids], cfg)
            assert text == tok.decode(expected) and done.completion_tokens == cfg.max_new_tokens
    finally:
        engine.stop()


def test_cancel_and_zero_budget_during_a_batched_prefill(model: GPT, tok: Tokenizer) -> None:
    engine = Engine(model, tok, max_batch=8, prefill_chunk=16)
    try:
        # cancelled before its pass and a budget of 0: they end without a slot, the others share one pass
        a, b, c, d = prompts(tok, [5, 7, 3, 6])
        sinks = [queue.Queue() for _ in range(4)]
        cfgs = [SamplingConfig(6), SamplingConfig(6), SamplingConfig(0), SamplingConfig(6)]
        with engine._cv:
            requests = [
                engine.submit(Request(p, cfg, sink.put)) for p, cfg, sink in zip((a, b, c, d), cfgs, sinks, strict=True)
            ]
            requests[1].cancel()
        results = [collect(sink) for sink in sinks]
        assert [done.reason for _, done in results] == ["length", "cancelled", "length", "length"]
        assert results[1][1].completion_tokens == results[2][1].completion_tokens == 0
        for p, (text, _) in ((a, results[0]), (d, results[3])):
            assert text == tok.decode(generate(model, [p], SamplingConfig(6))[0])
        assert engine.prefill_passes == 1

        # cancelled part-way in: its row is reused by the next prompt
        s0, long, s2 = prompts(tok, [4, 40, 4])
        sinks = [queue.Queue() for _ in range(3)]

        def cancel_long(event) -> None:
            long_request.cancel()
            sinks[0].put(event)

        with engine._cv:
            engine.submit(Request(s0, SamplingConfig(10), cancel_long))
            long_request = engine.submit(Request(long, SamplingConfig(10), sinks[1].put))
            engine.submit(Request(s2, SamplingConfig(10), sinks[2].put))
        (t0, _), (_, cancelled), (t2, _) = (collect(sink) for sink in sinks)
        assert cancelled.reason == "cancelled" and cancelled.completion_tokens == 0
        assert t0 == tok.decode(generate(model, [s0], SamplingConfig(10))[0])
        assert t2 == tok.decode(generate(model, [s2], SamplingConfig(10))[0])
        assert engine.prefill_passes == 1 + 2  # s0 and part of the long prompt, then s2
    finally:
        engine.stop()


def test_a_failed_prefill_pass_fails_its_requests_and_the_engine_keeps_serving(
    model: GPT, tok: Tokenizer, monkeypatch
) -> None:
    forward, failed = model.forward, []

    def failing_forward(idx, **kwargs):
        if idx.shape[0] > 1 and not failed:  # the first batched pass
            failed.append(True)
            raise RuntimeError("boom")
        return forward(idx, **kwargs)

    monkeypatch.setattr(model, "forward", failing_forward)
    engine = Engine(model, tok, max_batch=8)
    try:
        jobs = [(p, SamplingConfig(5)) for p in prompts(tok, [4, 6, 2])]
        results = run_all(engine, jobs, together=True)
        assert all(done.reason == "error" and "boom" in done.error for _, done in results)
        results = run_all(engine, jobs, together=True)
        for (p, cfg), (text, done) in zip(jobs, results, strict=True):
            assert done.reason == "length" and text == tok.decode(generate(model, [p], cfg)[0])
    finally:
        engine.stop()


def test_requests_arriving_within_the_window_are_prefilled_in_one_pass(family: GPT, tok: Tokenizer) -> None:
    """An idle engine waits for the companions of a first request: five requests submitted a few milliseconds
    apart (as HTTP arrivals of requests sent together are) share one prefill pass, with the tokens each makes
    alone; with the window off, the first goes alone."""
    model = family
    jobs = [(p, SamplingConfig(6)) for p in prompts(tok, [4, 9, 2, 6, 5])]

    def staggered(engine: Engine) -> list[tuple[str, Finished]]:
        sinks = [queue.Queue() for _ in jobs]
        for (ids, cfg), sink in zip(jobs, sinks, strict=True):
            engine.submit(Request(ids, cfg, sink.put))
            time.sleep(0.005)
        return [collect(sink) for sink in sinks]

    engine = Engine(model, tok, max_batch=8, admit_window=0.4)  # a quiet gap of 0.1 s ends the wait
    try:
        results = staggered(engine)
        assert engine.prefill_passes == 1 and engine.gathered == 4 and engine.max_live == 5
        for (ids, cfg), (text, done) in zip(jobs, results, strict=True):
            assert text == tok.decode(generate(model, [ids], cfg)[0])
            assert done.reason == "length" and done.completion_tokens == 6
    finally:
        engine.stop()
    engine = Engine(model, tok, max_batch=8, admit_window=0)
    slow = model.forward

    def slow_forward(idx, **kwargs):  # a prefill pass that outlasts the arrivals: the others come during it
        if idx.shape[1] > 1:
            time.sleep(0.1)
        return slow(idx, **kwargs)

    try:
        model.forward = slow_forward
        results = staggered(engine)
        assert engine.prefill_passes == 2 and engine.gathered == 0  # the first alone, the rest together
        assert [text for text, _ in results] == [tok.decode(generate(model, [ids], cfg)[0]) for ids, cfg in jobs]
    finally:
        del model.forward
        engine.stop()


def test_the_wait_ends_when_the_batch_is_full(model: GPT, tok: Tokenizer) -> None:
    engine = Engine(model, tok, max_batch=3, admit_window=1.0)
    try:
        began = time.perf_counter()
        results = run_all(engine, [(p, SamplingConfig(3)) for p in prompts(tok, [3, 4, 5])])
        assert time.perf_counter() - began < 0.25  # not the quarter-second quiet gap: three slots, three requests
        assert engine.prefill_passes == 1 and [done.reason for _, done in results] == ["length"] * 3
    finally:
        engine.stop()


def test_a_lone_request_waits_only_the_quiet_gap(model: GPT, tok: Tokenizer) -> None:
    """A request alone on an idle engine waits a quarter of the window for companions, not the window; once a
    prefill pass has been timed the wait never exceeds what such a pass takes (a small model barely waits)."""
    engine = Engine(model, tok, max_batch=8, admit_window=0.4)
    try:
        (ids,) = prompts(tok, [5])
        ((text, done),) = run_all(engine, [(ids, SamplingConfig(4))])
        assert 0.1 <= done.prompt_eval_duration / 1e9 < 0.4  # submitted to first token: the gap and the prefill
        assert text == tok.decode(generate(model, [ids], SamplingConfig(4))[0])
        assert engine._prefill_s < 0.1  # a tiny model's pass
        ((_, again),) = run_all(engine, [(ids, SamplingConfig(4))])
        assert again.prompt_eval_duration / 1e9 < 0.1
    finally:
        engine.stop()
    with pytest.raises(ValueError, match="admit_window"):
        Engine(model, tok, admit_window=-0.01)


def test_arrivals_during_a_prefill_pass_go_before_the_next_decode_step(model: GPT, tok: Tokenizer) -> None:
    """Prefill before decode, within the turn's budget of ``prefill_chunk`` padded tokens: requests that arrive
    while a pass runs get the next pass before any decode step; a prompt that does not fit the rest of the budget
    goes in chunks between decode steps."""
    first, second, long = prompts(tok, [4, 5, 40])
    passes: list[tuple[int, list[int]]] = []  # (decode steps so far, each row's tokens) at each prefill pass

    class Recording(Engine):
        def _next_prefill(self, budget: int, whole: bool = False) -> list[tuple[Request, int]]:
            group = super()._next_prefill(budget, whole)
            if group:
                passes.append((self.steps, [chunk for _, chunk in group]))
            return group

        def _prefill(self, budget: int, whole: bool = False) -> int:
            used = super()._prefill(budget, whole)
            if len(passes) == 1 and used:  # two requests arrive during the first pass
                self.submit(Request(second, SamplingConfig(6), sinks[1].put))
                self.submit(Request(long, SamplingConfig(6), sinks[2].put))
            return used

    engine = Recording(model, tok, max_batch=8, prefill_chunk=16, admit_window=0)
    sinks = [queue.Queue() for _ in range(3)]
    try:
        engine.submit(Request(first, SamplingConfig(6), sinks[0].put))
        results = [collect(sink) for sink in sinks]
        for ids, (text, done) in zip((first, second, long), results, strict=True):
            assert text == tok.decode(generate(model, [ids], SamplingConfig(6))[0]) and done.reason == "length"
        assert passes[0] == (0, [4])  # the first request alone
        assert passes[1] == (0, [5])  # the second, whole, in the same turn: no decode step in between
        assert [chunks for _, chunks in passes[2:]] == [[16], [16], [8]]  # the long one did not fit the rest of
        assert 1 <= passes[2][0] < passes[3][0] < passes[4][0]  # the budget: in chunks, between decode steps
    finally:
        engine.stop()
