"""Continuous batching: concurrent requests to one model share its forward passes.

One engine per served model runs a loop in its own thread over a :class:`~llmcore.models.gpt.BatchedKVCache`
with ``max_batch`` rows (slots):

    gather  an idle engine (no row decoding or prefilling) that gets a request waits briefly for companions
            before its first prefill: until ``max_batch`` requests wait, or none has come for a quarter of its
            window, or the window has passed since the first. The window is ``admit_window`` (0: no wait), at
            most half as long as the last prefill pass took, and none below two of Python's thread switch
            intervals (10 ms: a small model's quick passes are not worth waiting for). Requests sent together
            reach the engine a few milliseconds apart (HTTP parsing, tokenizing, client threads); without the
            wait the first is prefilled alone and the rest queue behind that pass. A lone request waits only
            the quiet gap;
    admit   requests waiting for a slot join between decode steps. Their prompts are prefilled together in
            one right-padded forward pass over their consecutive slots after the live rows (each row keeps
            only its real length, so the padding is never attended to). Prefill comes before decode: a turn
            runs prefill passes, up to ``prefill_chunk`` padded tokens (rows x width) in all, before its decode
            step, so requests that arrive during a pass are prefilled in the next pass rather than after a
            decode step; a long prompt is prefilled in chunks between decode steps instead of stalling the
            running streams. A request whose prompt is done samples its first token from its last real
            position and decodes with the others;
    decode  one forward pass over all live rows, each appending one token at its own length;
    leave   a row that is done (end-of-text, a stop string, its token budget, a full context, or a client
            that went away) leaves at once, and the last live row moves into its slot, so the live rows
            stay contiguous and every decode step is one pass over ``cache.rows(0, n)``.

Sampling is per request: each has its own :class:`~llmcore.models.generate.SamplingConfig` and its own
seeded ``torch.Generator``, and draws from its own row of logits, so what a seeded request produces does not
depend on which other requests share its batch (up to float rounding in batched matmuls, which does not
change tokens in practice; a single request runs the same kernels as :func:`llmcore.models.generate.generate`).
A row whose sampling fails (probabilities that are not finite) ends alone with reason ``error``; the other rows of
its batch go on.

Structured outputs: a request with a ``constraint`` (:mod:`llmcore.serve.structured`, a JSON schema's grammar)
samples only the tokens its grammar allows next: before each sample the engine masks that row's logits (each row its
own mask, computed in this thread with the GIL released), and each token sampled moves the row's grammar on.
Unconstrained rows in the same batch are untouched. A row whose JSON is complete ends with reason ``stop``; one whose
budget ends first, with ``length``.

Text is made in the engine thread too (:class:`~llmcore.models.responses.TextStream`), so a stop string ends
a sequence at the step that completes it. Results go to each request's ``sink`` callable as events:
``str`` pieces, then one :class:`Finished`; the HTTP layer turns those into NDJSON or SSE.
"""

from __future__ import annotations

import collections
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from llmcore.models.generate import SamplingConfig, sample_next
from llmcore.models.gpt import GPT, BatchedKVCache
from llmcore.models.packed import MIN_ROWS, onednn_linears, packed_layers
from llmcore.models.responses import TextStream
from llmcore.models.static_decode import decoder_for, width_for
from llmcore.serve import structured
from llmcore.text.tokenizer import Tokenizer

log = logging.getLogger("llmcore.serve")

ADMIT_WINDOW = 0.02  # seconds an idle engine may wait for requests sent together with the first (see gather)


@dataclass
class Finished:
    """The last event of a request: why it ended and its counts (durations in nanoseconds)."""

    reason: str  # stop | length | cancelled | error
    prompt_tokens: int
    completion_tokens: int
    prompt_eval_duration: int = 0
    eval_duration: int = 0
    total_duration: int = 0
    error: str | None = None


@dataclass(eq=False)
class Request:
    """One generation: token ids in, text pieces out through ``sink`` (called from the engine thread)."""

    prompt_ids: list[int]
    sampling: SamplingConfig  # max_new_tokens, temperature, top_k, top_p, seed; stop_ids get the end-of-text id
    sink: Callable[[str | Finished], None]
    stop: Sequence[str] = ()  # stop strings: the text is cut before the first one and generation ends
    sections: bool = False  # Alpaca: end at a new "###" section, strip surrounding whitespace
    cancelled: bool = False  # set by the client side (disconnect); the engine drops the row next step
    constraint: structured.Constraint | None = None  # sampling limited to the tokens its JSON grammar allows
    # engine state
    _text: TextStream | None = field(default=None, repr=False)
    _generator: torch.Generator | None = field(default=None, repr=False)
    _last: int = 0
    _prefilled: int = 0  # prompt tokens in the cache so far
    _generated: int = 0
    _budget: int = 0
    _t_submit: int = 0  # perf_counter_ns at submit
    _t_first: int = 0  # perf_counter_ns when its first token was sampled

    def cancel(self) -> None:
        self.cancelled = True


class Engine:
    """The continuous-batching loop of one model (see the module docstring)."""

    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer,
        max_batch: int = 8,
        name: str = "model",
        prefill_chunk: int = 512,
        threads: int | None = None,
        compiled_decode: bool | None = None,
        admit_window: float = ADMIT_WINDOW,
        packed_weights: bool = True,
    ):
        if max_batch < 1 or prefill_chunk < 1:
            raise ValueError(f"max_batch and prefill_chunk must be >= 1, got {max_batch}, {prefill_chunk}")
        if not 0 <= admit_window <= 1:
            raise ValueError(f"admit_window is in seconds, from 0 (off) to 1, got {admit_window}")
        self.model, self.tokenizer, self.max_batch, self.name = model.eval(), tokenizer, max_batch, name
        self.prefill_chunk = prefill_chunk
        self.admit_window = admit_window  # seconds an idle engine waits for companions of a request (gather)
        self._prefill_s = 2 * admit_window  # how long the last prefill pass took (until one is timed: a guess)
        self.threads = threads  # torch CPU threads, set in the loop's thread when it starts (None: leave as is)
        self.context_length = model.cfg.context_length
        self.device = model.tok_emb.weight.device
        # Decode steps run compiled (llmcore.models.static_decode) on CPU unless compiled_decode=False or the
        # policy is ``never``: graphs compile in a background thread while the steps run eagerly, so no request
        # waits for the compiler. None: the process policy (auto: compile, then keep whichever way times faster per
        # batch size; a server runs long enough to pay for it). True: compiled whenever a graph is ready.
        self._decode_policy = None if compiled_decode is None else ("always" if compiled_decode else "never")
        # Wide linear layers multiply on oneDNN (llmcore.models.packed; before the decoder, whose graphs trace them):
        # one row on the plain weight, and batches, where torch's CPU matmul costs 2.5-3x its one-row product, on a
        # copy packed once (packed_weights=False: no copy, oneDNN on the plain weight for every batch).
        if self.device.type == "cpu":
            onednn_linears(model, packed_from=MIN_ROWS if packed_weights else None)
        self.packed_layers = packed_layers(model)
        self._decoder = decoder_for(model, self._decode_policy)
        self._start_rows = torch.zeros(max_batch, dtype=torch.long, device=self.device)  # a packed cache: no padding
        self._views: dict[tuple[int, int], tuple] = {}  # (rows, width) -> the compiled step's views of the cache
        self._cache: BatchedKVCache | None = None  # allocated on the first request
        self._waiting: collections.deque[Request] = collections.deque()
        self._live: list[Request] = []  # row i of the cache holds _live[i]
        # admitted, not yet decoding; prompts part-way in hold rows len(_live), len(_live) + 1, ... (in order)
        self._prefilling: collections.deque[Request] = collections.deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode passes run (for tests and logs)
        self.max_live = 0  # most rows ever decoded together
        self.prefill_passes = 0  # prefill forward passes (chunks) run
        self.gathered = 0  # requests that joined a first one while an idle engine waited for companions

    # -- client side --------------------------------------------------------------------------------

    def start(self) -> Engine:
        """Start the loop (again, after :meth:`stop`: a model can be served by one server after another)."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name=f"engine-{self.name}", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Finish: requests still waiting or running end with reason ``cancelled``."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, request: Request) -> Request:
        if not request.prompt_ids:
            raise ValueError("a request needs at least one prompt token")
        if len(request.prompt_ids) >= self.context_length:
            raise ValueError(
                f"prompt of {len(request.prompt_ids)} tokens leaves no room in a context of {self.context_length}"
            )
        request._t_submit = time.perf_counter_ns()
        with self._cv:
            if self._stopping:
                raise RuntimeError("the engine is stopped")
            self._waiting.append(request)
            self._cv.notify()
        self.start()
        return request

    def generate(self, prompt_ids: list[int], sampling: SamplingConfig, **kwargs: Any) -> Iterator[str | Finished]:
        """Blocking convenience for scripts and benchmarks: yield the request's events as they come."""
        import queue

        events: queue.Queue = queue.Queue()
        request = self.submit(Request(list(prompt_ids), sampling, events.put, **kwargs))
        try:
            while True:
                event = events.get()
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            request.cancel()

    # -- the loop -----------------------------------------------------------------------------------

    def _loop(self) -> None:
        if self.threads and self.device.type == "cpu":
            torch.set_num_threads(self.threads)
        while True:
            with self._cv:
                while not self._stopping and not self._waiting and not self._live and not self._prefilling:
                    self._cv.wait()
                if not self._stopping and not self._live and not self._prefilling:
                    self._gather()
                if self._stopping:
                    break
                self._admit()
            try:
                with torch.no_grad():
                    budget = self.prefill_chunk
                    while budget > 0 and (used := self._prefill(budget, whole=budget < self.prefill_chunk)):
                        budget -= used  # arrivals during that pass go next, before the decode step
                        with self._cv:
                            self._admit()
                    self._drop_cancelled()
                    if self._live:
                        self._decode()
            except Exception as e:  # a bug or out-of-memory: fail the running requests, keep the engine running
                log.exception("engine %s failed a step", self.name)
                started = [r for r in self._prefilling if r._text is not None]  # in the failed pass, or part-way
                self._prefilling = collections.deque(r for r in self._prefilling if r._text is None)
                for request in [*self._live, *started]:
                    self._end(request, "error", error=f"{type(e).__name__}: {e}")
                self._live.clear()
        for request in [*self._live, *self._prefilling, *self._waiting]:
            self._end(request, "cancelled")
        self._live.clear()
        self._prefilling.clear()
        self._waiting.clear()

    def _gather(self) -> None:
        """With the lock held, on an idle engine with a request waiting: wait for the requests sent with it (see
        the module docstring). :meth:`submit` wakes the wait at each arrival."""
        # a companion later than half a prefill pass after the first is served as well by the next pass (prefill
        # comes before decode), so a model whose passes are quick (small, or short prompts) barely waits
        window = min(self.admit_window, self._prefill_s / 2)
        if window < 2 * sys.getswitchinterval() or not self._waiting:  # a woken thread may wait one switch interval
            return  # for the interpreter: a shorter wait would cost a lone request more than it saves the others
        before = len(self._waiting)
        first = self._waiting[0]._t_submit
        while not self._stopping and len(self._waiting) < self.max_batch:
            last = self._waiting[-1]._t_submit
            left = min(first + window * 1e9, last + window * 0.25e9) - time.perf_counter_ns()
            if left <= 0:
                break
            self._cv.wait(left / 1e9)
        self.gathered += len(self._waiting) - before

    def _admit(self) -> None:
        """With the lock held: waiting requests take the free slots, in order of arrival."""
        while self._waiting and len(self._live) + len(self._prefilling) < self.max_batch:
            self._prefilling.append(self._waiting.popleft())

    def _prefill(self, budget: int, whole: bool = False) -> int:
        """One forward pass over the next admitted requests, each in its slot after the live rows (see
        :meth:`_next_prefill`: at most ``budget`` padded tokens; ``whole``: only prompts that fit whole); the
        prompts are right-padded to one width, and each row's cache length is then set to its real length, so the
        padding is never attended to. A request whose prompt is done samples its first token from its last real
        position and joins the live rows. Returns the padded tokens of the pass (0: none ran)."""
        if self._cache is None and self._prefilling:
            self._cache = self.model.new_batched_cache(self.max_batch)
        group = self._next_prefill(budget, whole)
        if not group:
            return 0
        began = time.perf_counter()
        start, width = len(self._live), max(chunk for _, chunk in group)
        rows = self._cache.rows(start, start + len(group))
        ids = [r.prompt_ids[r._prefilled : r._prefilled + chunk] + [0] * (width - chunk) for r, chunk in group]
        ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        slots = torch.tensor([r._prefilled for r, _ in group], device=self.device)
        last = torch.tensor([chunk - 1 for _, chunk in group], device=self.device)
        out = self._compiled_prompts(start, ids, slots, last)
        if out is not None:  # the compiled pass writes the keys and leaves the lengths to us
            logits, padded = out[0], True
        elif all(chunk == width for _, chunk in group):  # no padding (one row alone: the path of ``generate``)
            rows.lengths.copy_(slots)
            logits, padded = self.model(ids, cache=rows, logits_to_keep=1).logits[:, -1], False
        else:  # causal attention keeps each row's real positions off the padding after them
            rows.lengths.copy_(slots)
            hidden = self.model(ids, cache=rows, return_logits=False, return_hidden=True).hidden
            logits, padded = self.model.head(hidden[torch.arange(len(group), device=self.device), last]), True
        self.prefill_passes += 1
        for request, chunk in group:
            request._prefilled += chunk
        if padded:  # keys past a row's real length are unread
            rows.lengths.copy_(slots + last + 1)
        done = [r for r, _ in group if r._prefilled == len(r.prompt_ids)]  # all but maybe the last one
        for request in done:
            self._prefilling.popleft()
            self._live.append(request)
            request._t_first = time.perf_counter_ns()
        logits = self._masked(logits, done)
        tokens = [self._sample_row(logits[i : i + 1], r) for i, r in enumerate(done)]
        self._prefill_s = time.perf_counter() - began
        for i in reversed(range(len(done))):  # from the end, as in _decode: a row leaving moves the last one in
            self._accept(start + i, tokens[i])
        return len(group) * width

    def _compiled_prompts(
        self, start: int, ids: torch.Tensor, slots: torch.Tensor, last: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The prefill pass through the compiled prompt graph (llmcore.models.static_decode) into cache rows
        ``start ..``, or None (no graph ready, or a model whose eager pass is as quick: see
        :attr:`~llmcore.models.static_decode.StaticDecoder.prompt_pays`; the caller runs the model eagerly). The
        graph runs without the interpreter lock, so requests arriving meanwhile are parsed on another core. Built in
        the background once a decode graph is ready (decode steps are most of a server's work; one build at a time)."""
        decoder = self._decoder
        if decoder is None or not decoder.prompt_pays:
            return None
        n = ids.shape[0]
        width = width_for(int(slots.max()) + ids.shape[1], self.context_length)
        if not (decoder.ready(n, width, prompt=True) or decoder.ready(1, width) or decoder.ready(2, width)):
            return None
        if not decoder.compile(n, width, background=True, prompt=True):
            return None
        k = [t[start : start + n, :, :width] for t in self._cache.k]
        v = [t[start : start + n, :, :width] for t in self._cache.v]
        return decoder.prompt_step(k, v, ids, slots, self._start_rows[:n], last)

    def _next_prefill(self, budget: int, whole: bool = False) -> list[tuple[Request, int]]:
        """The leading admitted requests for the next prefill pass, each with its number of prompt tokens.

        A row costs the pass's width whatever its own length, so rows x width stays within ``budget``, and each
        row's padded positions stay inside the context. Only the last request may be taken part-way (unless
        ``whole``): the ones before it finish and join the live rows in slot order, and a prompt part-way in stays
        next to them. Cancelled and zero-budget requests end here, before they take a slot.
        """
        group: list[tuple[Request, int]] = []
        width = furthest = 0
        i = 0
        while i < len(self._prefilling):
            request = self._prefilling[i]
            if request.cancelled:
                del self._prefilling[i]
                self._end(request, "cancelled")
                continue
            furthest = max(furthest, request._prefilled)
            cap = min(budget // (len(group) + 1), self.context_length - furthest)
            if cap < width or (whole and cap < len(request.prompt_ids) - request._prefilled):
                break
            if request._text is None:  # first chunk: set the request up
                cfg = request.sampling
                request._text = TextStream(self.tokenizer, request.stop, request.sections)
                if cfg.seed is not None:
                    request._generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
                request._budget = min(cfg.max_new_tokens, self.context_length - len(request.prompt_ids))
                if request._budget <= 0:
                    del self._prefilling[i]
                    self._end(request, "length")
                    continue
            chunk = min(len(request.prompt_ids) - request._prefilled, cap)
            group.append((request, chunk))
            width = max(width, chunk)
            i += 1
            if request._prefilled + chunk < len(request.prompt_ids):
                break  # the rest of this prompt in the next turns, between decode steps
        return group

    def _decode(self) -> None:
        n = len(self._live)
        self.max_live = max(self.max_live, n)
        ids = torch.tensor([[r._last] for r in self._live], dtype=torch.long, device=self.device)
        out, decoder, began = None, self._decoder, time.perf_counter()
        if decoder is not None:  # the compiled step where its graph is ready and faster, on the same cache buffers
            lengths = self._cache.lengths[:n]
            width = width_for(int(lengths.max()) + 1, self.context_length)
            if decoder.compile(n, width, background=True) and decoder.prefer(n, width, self._decode_policy):
                if (n, width) not in self._views:
                    self._views[n, width] = decoder.views(self._cache.k, self._cache.v, n, width)
                out = decoder.step(*self._views[n, width], ids, lengths, self._start_rows[:n])
            if out is not None:
                lengths += 1
        if out is None:
            logits = self.model(ids, cache=self._cache.rows(0, n), logits_to_keep=1).logits[:, -1]
        else:
            logits = out[0]
        if decoder is not None:
            decoder.record(n, width, out is not None, time.perf_counter() - began)
        self.steps += 1
        tokens = self._sample(logits)
        for slot in reversed(range(n)):  # from the end: a row leaving moves the last row into its slot
            self._accept(slot, tokens[slot])

    def _sample(self, logits: torch.Tensor) -> list[int | Exception]:
        """One token per row, each from its own request's sampling config and generator; a row whose sampling
        fails gets the exception instead, and only that request ends (with an error)."""
        logits = self._masked(logits, self._live)
        greedy = [i for i, r in enumerate(self._live) if r.sampling.greedy]
        tokens: list[int | Exception] = [0] * len(self._live)
        if greedy:
            for i, t in zip(greedy, logits[greedy].argmax(-1).tolist(), strict=True):
                tokens[i] = t
        for i, r in enumerate(self._live):
            if not r.sampling.greedy:
                tokens[i] = self._sample_row(logits[i : i + 1], r)
        return tokens

    @staticmethod
    def _masked(logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
        """``logits`` (rows in the order of ``requests``) with the tokens each constrained request's grammar forbids
        set to -inf; the same tensor when no request has a constraint."""
        rows = [i for i, r in enumerate(requests) if r.constraint is not None]
        if not rows:
            return logits
        allowed = structured.allowed_tokens([requests[i].constraint for i in rows]).to(logits.device)  # (R, V)
        index = torch.tensor(rows, device=logits.device)
        logits = logits.clone()
        logits[index] = logits[index].masked_fill(~allowed[:, : logits.shape[-1]], float("-inf"))
        return logits

    def _sample_row(self, logits: torch.Tensor, request: Request) -> int | Exception:
        try:
            return int(sample_next(logits, request.sampling, request._generator)[0])
        except Exception as e:  # this row's numbers (or a bug): the other rows of the batch go on
            log.error("engine %s: a request's sampling failed: %s", self.name, e)
            return e

    def _accept(self, slot: int, token: int | Exception) -> None:
        request = self._live[slot]
        if isinstance(token, Exception):
            return self._leave(slot, "error", error=f"{type(token).__name__}: {token}")
        request._generated += 1
        if token in request.sampling.stop_ids:
            return self._leave(slot, "stop")
        constraint = request.constraint
        if constraint is not None and not constraint.accept(token):
            return self._leave(slot, "error", error=constraint.error)
        request._last = token
        piece = request._text.push(token)
        if piece:
            self._emit(request, piece)
        if request._text.stopped or (constraint is not None and constraint.done):
            return self._leave(slot, "stop")
        if request._generated >= request._budget:
            return self._leave(slot, "length")

    def _drop_cancelled(self) -> None:
        for slot in reversed(range(len(self._live))):
            if self._live[slot].cancelled:
                self._leave(slot, "cancelled")

    def _leave(self, slot: int, reason: str, error: str | None = None) -> None:
        request = self._live[slot]
        last = len(self._live) - 1
        if slot != last:
            self._cache.copy_row(last, slot)
            self._live[slot] = self._live[last]
        self._live.pop()
        for i, waiting in enumerate(self._prefilling):  # prompts part-way in move down one, to stay next to the
            if not waiting._prefilled:  # live rows in order
                break
            self._cache.copy_row(last + 1 + i, last + i)
        self._end(request, reason, error)

    def _end(self, request: Request, reason: str, error: str | None = None) -> None:
        if reason not in ("cancelled", "error") and request._text is not None:
            tail = request._text.finish()
            if tail:
                self._emit(request, tail)
        now = time.perf_counter_ns()
        first = request._t_first or now
        self._emit(
            request,
            Finished(
                reason=reason,
                prompt_tokens=len(request.prompt_ids),
                completion_tokens=request._generated,
                prompt_eval_duration=first - request._t_submit,
                eval_duration=now - first,
                total_duration=now - request._t_submit,
                error=error,
            ),
        )

    @staticmethod
    def _emit(request: Request, event: str | Finished) -> None:
        try:
            request.sink(event)
        except Exception:  # a client whose event loop is gone: it went away, drop its row next step
            request.cancelled = True
