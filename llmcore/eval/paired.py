"""Two models' answers to the same prompts, compared: paired bootstrap statistics and a judged head-to-head.

Used by the evaluate stage to compare the instruction model with its DPO-aligned version::

    stats = paired_stats(scores_a, scores_b, n_boot=1000)        # mean and 95% CI of each and of b - a
    records = head_to_head(items, config, cache_path=..., judge=judge, seed=123)
    summary = summarize_head_to_head(records)                   # b's win rate, ties, unparsable

Head-to-head: for each prompt the judge sees the instruction, the reference answer and both answers as
"Response 1" and "Response 2", in an order drawn at random per item (seeded, so reruns agree and the cache
answers them), and names the better one (``1``, ``2`` or ``tie``). Randomising the order cancels the position
bias LLM judges are known for (Zheng et al., 2023, "Judging LLM-as-a-Judge"). Replies are cached in the same
JSONL cache as the scores (``llmcore.eval.judge.JudgeCache``) under keys that cannot collide with them.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from llmcore.eval.judge import JudgeCache, JudgeConfig, _client, _is_transient, format_input

HEAD_TO_HEAD_PROMPT = (
    "Given the input `{input}` and correct output `{reference}`, which of two model responses is better?\n"
    "Response 1: `{first}`\nResponse 2: `{second}`\n"
    "Answer with exactly one of: 1, 2, tie."
)

Winner = Literal["a", "b", "tie"]


@dataclass
class PairItem:
    """One prompt answered by both models (``a``: the baseline, ``b``: the challenger)."""

    id: str
    instruction: str
    input: str
    reference: str
    a: str
    b: str


@dataclass
class HeadToHeadRecord:
    id: str
    winner: Winner | None  # None: the reply named no single choice, or the request failed
    b_first: bool  # b was shown as "Response 1"
    raw: str | None = None
    cached: bool = False
    error: str | None = None


def bootstrap_ci(values: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean."""
    rng = np.random.default_rng(seed)
    boot = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)
    return float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))


def paired_stats(a: Sequence[float], b: Sequence[float], n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """Means and 95% bootstrap intervals of ``a``, ``b`` and the paired difference ``b - a``.

    ``a[i]`` and ``b[i]`` must score the same item. The difference's interval resamples items (pairs), so it is
    much narrower than the two separate intervals suggest when the models' scores move together.
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or not len(x):
        raise ValueError(f"paired_stats: expected two equally long, non-empty lists, got {x.shape} and {y.shape}")
    out: dict[str, float] = {"n": len(x)}
    for name, v in (("a", x), ("b", y), ("diff", y - x)):
        lo, hi = bootstrap_ci(v, n_boot, seed)
        out.update({f"{name}_mean": float(v.mean()), f"{name}_ci95_low": lo, f"{name}_ci95_high": hi})
    return out


_CHOICE_RE = re.compile(r"\b(1|2|tie)\b", re.IGNORECASE)


def parse_choice(text: str | None) -> Literal["1", "2", "tie"] | None:
    """``1``, ``2`` or ``tie`` when the reply names exactly one of them (``Response 2``, ``**1**``, ``Tie.``)."""
    if not text:
        return None
    text = text.replace("Response 1:", "").replace("Response 2:", "")  # an echo of the prompt's labels
    found = {m.group(1).lower() for m in _CHOICE_RE.finditer(text)}
    return found.pop() if len(found) == 1 else None  # type: ignore[return-value]


def render_head_to_head(item: PairItem, b_first: bool, template: str = HEAD_TO_HEAD_PROMPT) -> str:
    first, second = (item.b, item.a) if b_first else (item.a, item.b)
    values = {
        "input": format_input(item.instruction, item.input),
        "reference": item.reference,
        "first": first,
        "second": second,
    }
    return re.sub(r"\{(input|reference|first|second)\}", lambda m: values[m.group(1)], template)


def _order(seed: int, item_id: str) -> bool:
    """Whether ``b`` is shown first: a coin flip fixed by (seed, item id)."""
    digest = hashlib.sha256(f"{seed}:{item_id}".encode()).digest()
    return random.Random(digest).random() < 0.5


def head_to_head(
    items: Sequence[PairItem],
    config: JudgeConfig,
    judge: dict[str, Any],
    cache_path: str | os.PathLike | None = None,
    seed: int = 0,
) -> list[HeadToHeadRecord]:
    """Ask the judge which answer is better for every item; one record per item, in order.

    Transient failures are retried as in ``llmcore.eval.judge.score_items``; a failed item is an ``error``
    record (winner None), never an exception. ``judge`` is ``check_judge(config)``'s result.
    """
    cache = JudgeCache(cache_path) if cache_path is not None else None
    records: list[HeadToHeadRecord | None] = [None] * len(items)
    todo = []
    for i, item in enumerate(items):
        b_first = _order(seed, item.id)
        prompt = render_head_to_head(item, b_first)
        payload = {
            "kind": "head_to_head",
            "model": config.model,
            "digest": judge.get("digest") or "",
            "options": config.options,
            "prompt": prompt,
        }
        key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()
        hit = cache.get(key) if cache is not None else None
        if hit is not None:
            records[i] = _record(item.id, b_first, hit.get("raw"), cached=True)
        else:
            todo.append((i, b_first, prompt, key))

    def ask(client, prompt: str) -> str:
        for k in range(config.retries + 1):
            try:
                return client.generate(config.model, prompt, options=config.options, stream=False).response or ""
            except Exception as e:
                if k == config.retries or not _is_transient(e):
                    raise
                time.sleep(config.backoff * 2**k)
        raise AssertionError("unreachable")

    if todo:
        with _client(config) as client, ThreadPoolExecutor(min(config.max_concurrency, len(todo))) as pool:
            futures = {pool.submit(ask, client, prompt): (i, b_first, key) for i, b_first, prompt, key in todo}
            for future, (i, b_first, key) in futures.items():
                try:
                    raw = future.result()
                except Exception as e:  # counted, not raised: the comparison goes on
                    records[i] = HeadToHeadRecord(items[i].id, None, b_first, error=f"{type(e).__name__}: {e}")
                    continue
                records[i] = _record(items[i].id, b_first, raw)
                if cache is not None:
                    cache.put(key, {"id": items[i].id, "raw": raw, "kind": "head_to_head"})
    return records  # type: ignore[return-value]


def _record(item_id: str, b_first: bool, raw: str | None, cached: bool = False) -> HeadToHeadRecord:
    choice = parse_choice(raw)
    winner: Winner | None = None
    if choice == "tie":
        winner = "tie"
    elif choice is not None:
        winner = "b" if (choice == "1") == b_first else "a"
    return HeadToHeadRecord(item_id, winner, b_first, raw, cached)


def summarize_head_to_head(records: Sequence[HeadToHeadRecord]) -> dict[str, float | None]:
    """Counts and ``b_win_rate`` = (b wins + ties / 2) / decided items (None when none was decided)."""
    wins = {w: sum(r.winner == w for r in records) for w in ("a", "b", "tie")}
    decided = sum(wins.values())
    return {
        "n": len(records),
        "a_wins": wins["a"],
        "b_wins": wins["b"],
        "ties": wins["tie"],
        "undecided": len(records) - decided,
        "b_shown_first": sum(r.b_first for r in records),
        "b_win_rate": (wins["b"] + 0.5 * wins["tie"]) / decided if decided else None,
    }
