"""Answers to prompts: batched generation cut at the end of the answer, and a streamed variant for `ask` and serving."""

from __future__ import annotations

import codecs
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

from llmcore.common import LLMCoreError
from llmcore.models.generate import SamplingConfig, generate_steps, stream
from llmcore.models.gpt import GPT
from llmcore.text.prompts import extract_response, section_start
from llmcore.text.tokenizer import Tokenizer


@dataclass
class GenerateParams:
    """How a stage answers its test prompts (params.yaml's ``instruct.generate`` and ``align.generate``)."""

    max_new_tokens: int = 128  # per response (fewer when the prompt leaves less of the context)
    temperature: float = 0.0  # 0 = greedy, as the book
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 123
    batch_size: int = 16  # test prompts decoded together (batched by length)
    stop_at_section: bool = True  # stop a row as soon as it starts a new "###" section

    def __post_init__(self) -> None:
        # Messages start with the field name: params.from_dict prefixes the section the user wrote it in
        # (instruct.generate or align.generate).
        for key in ("max_new_tokens", "batch_size"):
            if getattr(self, key) < 1:
                raise LLMCoreError(f"{key}: expected a positive int, got {getattr(self, key)}")
        if self.temperature < 0:
            raise LLMCoreError(f"temperature: expected >= 0, got {self.temperature}")

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            seed=self.seed,
        )


def _has_section(tok: Tokenizer, ids: list[int]) -> bool:
    return section_start(tok.decode(ids)) >= 0


def generate_responses(
    model: GPT,
    tok: Tokenizer,
    prompts: Sequence[str | list[int]],
    cfg: SamplingConfig,
    batch_size: int = 8,
    stop_at_section: bool = True,
    chat: bool = False,
) -> list[str]:
    """Answer each prompt: generate with the KV cache, keep only the new text, cut it at a new ``###``.

    Prompts are batched by length (less left padding, more room in the context); a row is done at the
    end-of-text token or, with ``stop_at_section``, as soon as its text starts a new ``###`` section, and
    a batch stops when all its rows are done. ``extract_response`` then trims the text. A prompt may be token ids
    (a rendered chat prompt); with ``chat`` the text is only stripped (a chat answer may hold ``###`` headings),
    and ``cfg.stop_ids`` should hold the end-of-turn token.

    Returns:
        One response per prompt, in the order given.
    """
    cfg = replace(cfg, stop_ids=tuple({*cfg.stop_ids, tok.eot_id}))
    texts = [i for i, p in enumerate(prompts) if isinstance(p, str)]  # ids (a rendered chat prompt) pass as they are
    encoded = [p if not isinstance(p, str) else [] for p in prompts]
    for i, ids in zip(texts, tok.encode_batch([prompts[i] for i in texts], allow_special=False), strict=True):
        encoded[i] = ids
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
            text = tok.decode(out[r])
            responses[i] = text.strip() if chat else extract_response(text)
    return responses


def _cut(text: str, stops: Sequence[str], final: bool) -> tuple[str, bool]:
    """``(shown, stopped)``: ``text`` up to the first stop string; unless ``final``, also hold back a tail
    that could still grow into a stop string."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    if hits:
        return text[: min(hits)], True
    if final:
        return text, False
    held = max((k for s in stops for k in range(len(s) - 1, 0, -1) if text.endswith(s[:k])), default=0)
    return text[: len(text) - held], False


class StopMatcher:
    """Finds the first of several stop strings in a text that only grows, in time linear in the text.

    Each stop string has a Knuth-Morris-Pratt automaton whose state is the length of the longest prefix of the
    stop string that the text read so far ends with: one step per new character (amortised), whatever the
    lengths, so a long stop string costs nothing per token, and the tail to hold back (a prefix that may still
    grow into a stop string) is the largest state.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self._fail = [self._failure(s) for s in self.stops]
        self._state = [0] * len(self.stops)
        self._read = 0  # characters of the text read so far
        self.match: int | None = None  # where the first stop string starts in the text, once one has

    @staticmethod
    def _failure(s: str) -> list[int]:
        """``fail[i]``: the longest proper prefix of ``s[: i + 1]`` that is also its suffix."""
        fail, k = [0] * len(s), 0
        for i in range(1, len(s)):
            while k and s[i] != s[k]:
                k = fail[k - 1]
            if s[i] == s[k]:
                k += 1
            fail[i] = k
        return fail

    def feed(self, text: str) -> None:
        """Read the characters of ``text`` (the whole text so far) not read yet. A stop string completed in them
        sets :attr:`match` to the earliest start among those completed: what ``min(text.find(s))`` gives."""
        if self.match is not None:
            return
        starts = []
        for pos in range(self._read, len(text)):
            c = text[pos]
            for j, s in enumerate(self.stops):
                k, fail = self._state[j], self._fail[j]
                while k and s[k] != c:
                    k = fail[k - 1]
                if s[k] == c:
                    k += 1
                if k == len(s):
                    starts.append(pos + 1 - k)
                    k = fail[k - 1]
                self._state[j] = k
        self._read = len(text)
        if starts:
            self.match = min(starts)

    @property
    def held(self) -> int:
        """Characters at the end of the text that may still grow into a stop string."""
        return max(self._state, default=0)


class TextStream:
    """Turns generated token ids into text pieces: incremental UTF-8, stop strings, Alpaca sections.

    Token bytes go through an incremental UTF-8 decoder, so a character split over several byte-level tokens
    is emitted once complete. Text that might be the start of a stop string (or, with ``sections``, of a new
    ``###`` section, or trailing whitespace) is held back until it is not, so the concatenated pieces always
    equal the final text: streaming and non-streaming answers agree. With ``sections`` the pieces join to
    exactly ``extract_response`` of the generated text.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), sections: bool = False):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self._stops = StopMatcher(self.stop)
        self.sections = sections  # Alpaca: stop at a new "###" section, strip surrounding whitespace
        self.stopped = False  # a stop string or section marker was reached
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text = ""
        self._sent = 0  # characters of the visible text already returned

    def push(self, token_id: int) -> str:
        """Add one token; return the newly visible text (often empty)."""
        if token_id < self.tokenizer.vocab_size:  # a padded model vocab can name ids the tokenizer lacks
            self._text += self._decoder.decode(self.tokenizer.decode_bytes([token_id]))
        return self._advance(final=False)

    def finish(self) -> str:
        """No more tokens: return what was held back (a cut-off character becomes U+FFFD)."""
        if not self.stopped:
            self._text += self._decoder.decode(b"", final=True)
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        self._stops.feed(self._text)  # only the new characters: linear in the text, whatever the stop strings
        stopped = self._stops.match is not None
        text = self._text[: self._stops.match if stopped else len(self._text) - (0 if final else self._stops.held)]
        if self.sections:
            final = final or stopped
            end = section_start(text)
            if end >= 0:
                text, stopped = text[:end], True
            elif not final:
                text = _cut("\n" + text, ("\n###",), final=False)[0][1:]
            text = text.strip()
        self.stopped = self.stopped or stopped
        piece = text[self._sent :]
        self._sent = len(text)
        return piece


def stream_response(
    model: GPT, tok: Tokenizer, prompt: str | list[int], cfg: SamplingConfig, sections: bool = True
) -> Iterator[str]:
    """Yield the answer to ``prompt`` as text pieces while it is generated (for ``ask``).

    The output stops at the end-of-text token or at a new ``###`` section; the pieces join to exactly
    ``extract_response`` of the whole generated text (see :class:`TextStream`).
    """
    cfg = replace(cfg, stop_ids=tuple({*cfg.stop_ids, tok.eot_id}))
    text = TextStream(tok, sections=sections)
    ids = tok.encode(prompt, allow_special=False) if isinstance(prompt, str) else prompt
    for token in stream(model, ids, cfg):
        piece = text.push(token)
        if piece:
            yield piece
        if text.stopped:
            break
    rest = text.finish()
    if rest:
        yield rest
