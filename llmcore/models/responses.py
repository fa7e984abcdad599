"""Answers to prompts: batched generation cut at the end of the answer, and a streamed variant for `ask` and serving."""

from __future__ import annotations

import codecs
from collections.abc import Iterator, Sequence
from dataclasses import replace

from llmcore.models.generate import SamplingConfig, generate_steps, stream
from llmcore.models.gpt import GPT
from llmcore.text.prompts import SECTION, extract_response, section_start
from llmcore.text.tokenizer import Tokenizer


def _has_section(tok: Tokenizer, ids: list[int]) -> bool:
    return section_start(tok.decode(ids)) >= 0



def generate_responses(
    model: GPT,
    tok: Tokenizer,
    prompts: Sequence[str],
    cfg: SamplingConfig,
    batch_size: int = 8,
    stop_at_section: bool = True,
) -> list[str]:
    """Answer each prompt: generate with the KV cache, keep only the new text, cut it at a new ``###``.

    Prompts are batched by length (less left padding, more room in the context); a row is done at the
    end-of-text token or, with ``stop_at_section``, as soon as its text starts a new ``###`` section, and
    a batch stops when all its rows are done. ``extract_response`` then trims the text.

    Returns:
        One response per prompt, in the order given.
    """
    cfg = replace(cfg, stop_ids=tuple({*cfg.stop_ids, tok.eot_id}))
    encoded = tok.encode_batch(list(prompts), allow_special=False)
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    responses: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        out: list[list[int]] = [[] for _ in rows]
        done = [False] * len(rows)
        steps = generate_steps(model, [encoded[i] for i in rows], cfg)
        for tokens, alive in steps:
            for r in range(len(rows)):
                if done[r] or not alive[r]:
                    done[r] = True
                    continue
                out[r].append(int(tokens[r]))
                # only a token holding '#' can complete a "###" marker: skip the decode otherwise
                if stop_at_section and b"#" in tok.token_bytes(out[r][-1]) and _has_section(tok, out[r]):
                    done[r] = True
            if all(done):
                steps.close()  # restores the model's train/eval mode
                break
        for r, i in enumerate(rows):
            responses[i] = extract_response(tok.decode(out[r]))
    return responses



def _held_back(text: str) -> int:
    """How many trailing characters of ``text`` may not be shown yet: whitespace and a partial ``###`` that
    starts a line could still turn out to be the end of the answer (``extract_response`` strips both)."""
    padded = "\n" + text
    hold = 0
    for k in (3, 2):  # "\n##", "\n#": the start of a possible section marker
        if padded.endswith(SECTION[:k]):
            hold = k - 1
            break
    return len(text) - len(text[: len(text) - hold].rstrip())



def stream_response(model: GPT, tok: Tokenizer, prompt: str, cfg: SamplingConfig) -> Iterator[str]:
    """Yield the answer to ``prompt`` as text pieces while it is generated (for ``ask`` and serving).

    Bytes are decoded incrementally, so a character split over tokens is shown whole once complete; the
    output stops at the end-of-text token or at a new ``###`` section. The pieces join to exactly
    ``extract_response`` of the whole generated text (leading and trailing whitespace dropped).
    """
    cfg = replace(cfg, stop_ids=tuple({*cfg.stop_ids, tok.eot_id}))
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text = ""  # all text decoded so far
    sent = None  # index in ``text`` up to which pieces were yielded; None before the first non-space character
    for token in stream(model, tok.encode(prompt, allow_special=False), cfg):
        text += decoder.decode(tok.token_bytes(token))
        end = section_start(text)
        if end >= 0:
            text = text[:end]
            break
        if sent is None:
            if not text.strip():
                continue
            sent = len(text) - len(text.lstrip())
        ready = len(text) - _held_back(text)
        if ready > sent:
            yield text[sent:ready]
            sent = ready
    else:
        text += decoder.decode(b"", final=True)
        end = section_start(text)
        text = text if end < 0 else text[:end]
    rest = text.strip() if sent is None else text[sent:].rstrip()
    if rest:
        yield rest
