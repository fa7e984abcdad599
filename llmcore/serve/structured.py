"""Structured outputs: sampling constrained to a JSON schema (Ollama's ``format``, OpenAI's ``response_format``).

A request that asks for JSON gets a :class:`Constraint`: a grammar matcher that, before each sample, says which
tokens may come next (a bit mask over the vocabulary), and then consumes the token sampled. The engine masks the
logits of such rows only (each row its own mask, inside continuous batching), so a model of any quality writes
output that parses and validates; a budget that runs out mid-object ends with reason ``length``, as anywhere.

The grammar engine is llguidance (github.com/guidance-ai/llguidance, MIT): a Rust core with CPU wheels on PyPI,
maintained by the guidance team and used by vLLM, SGLang and llama.cpp. It was picked over xgrammar and
outlines-core because it builds its tokenizer from a plain list of token byte strings (what our tiktoken-style
BPE, GPT-2's BPE and the character tokenizer all give), compiles a JSON schema straight to a grammar without an
ahead-of-time index over the vocabulary (a new schema costs milliseconds, not seconds), computes a mask in
microseconds to a few hundred (it walks a token trie, without the GIL), and names unsupported schema keywords
(``Unimplemented keys: ["not"]``), which the APIs pass on in their 400.

Work is cached per tokenizer: the token table llguidance derives from the vocabulary (its trie and "slices",
the expensive part of computing masks) once per (tokenizer, vocabulary size, end tokens), and each compiled
schema once per table (later requests copy a fresh matcher).

    grammar = compile_schema({"type": "object"}, tokenizer, n_vocab=cfg.vocab_size, eos=(tokenizer.eot_id,))
    constraint = grammar.constraint()                 # per request
    masks = allowed_tokens([constraint])              # (1, n_vocab) bool, before each sample
    constraint.accept(token)                          # after it; constraint.done: the JSON is complete
"""

from __future__ import annotations

import collections
import json
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import torch

from llmcore.text.tokenizer import Tokenizer

# Output JSON as Python's json.dumps writes it ({"a": 1, "b": [2, 3]}) without free whitespace: a model cannot
# spend its budget on spaces and newlines, and what it writes is what most training text shows. A schema may
# override these in its own "x-guidance" object.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT = {"type": "object"}  # Ollama's format "json" and OpenAI's json_object: one JSON object, any keys
MAX_CACHED_SCHEMAS = 64  # compiled grammars kept per token table (least recently used dropped)


class SchemaError(ValueError):
    """A schema the grammar engine cannot honour: an unsupported keyword, a bad $ref, an unsatisfiable bound.

    The message is one line of at most 300 characters (the engine's own can span lines: a regex error draws a
    caret under the pattern)."""

    def __init__(self, message: str):
        line = " ".join(message.split())
        super().__init__(line if len(line) <= 300 else line[:297] + "...")


def closed_objects(schema: Any) -> Any:
    """``schema`` with every object that lists ``properties`` (and says nothing of others) closed to the ones it
    lists (``additionalProperties: false``), the reading llama.cpp's and xgrammar's schema converters give (so
    Ollama's and vLLM's) and OpenAI's strict mode requires: a model is not free to add keys nobody asked for and
    fill its budget with them. ``{"type": "object"}`` alone stays open. A copy; ``schema`` is not changed."""
    if isinstance(schema, list):
        return [closed_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed_objects(v) for k, v in schema.items()}
    if isinstance(schema.get("properties"), dict) and not {"additionalProperties", "patternProperties"} & set(schema):
        out["additionalProperties"] = False
    return out


class _Table:
    """llguidance's view of one tokenizer (built once: the trie over all token bytes) and its compiled schemas."""

    def __init__(self, tokenizer: Tokenizer, n_vocab: int, eos: tuple[int, ...]):
        import llguidance

        self.llg = llguidance
        specials = {i: s for s, i in tokenizer.special_tokens.items()}
        # special tokens are marked with a 0xFF byte (never in UTF-8 text), so no JSON text can be written with them
        tokens = [
            b"\xff" + specials[i].encode() if i in specials else tokenizer.token_bytes(i)
            for i in range(tokenizer.vocab_size)
        ]
        tokens += [b""] * (n_vocab - len(tokens))  # padded model vocabulary: rows no token decodes to, never allowed

        class Wrapper:  # the duck type llguidance.TokenizerWrapper wraps
            eos_token_id = eos[0]
            bos_token_id = None
            special_token_ids = sorted(specials)

            def __init__(self):
                self.tokens = tokens

            def __call__(self, text: bytes) -> list[int]:
                return tokenizer.encode(text.decode("utf-8", errors="replace"), allow_special=False)

        self.tokenizer = llguidance.LLTokenizer(
            llguidance.TokenizerWrapper(Wrapper()), n_vocab=n_vocab, eos_token=list(eos)
        )
        self.n_vocab = n_vocab
        self.grammars: collections.OrderedDict[str, Grammar] = collections.OrderedDict()
        self.lock = threading.Lock()

    def grammar(self, schema: dict) -> Grammar:
        key = json.dumps(schema, sort_keys=True)
        with self.lock:
            if key in self.grammars:
                self.grammars.move_to_end(key)
                return self.grammars[key]
        grammar = Grammar(self, schema)  # outside the lock: compiling a large schema takes a while
        with self.lock:
            self.grammars[key] = grammar
            while len(self.grammars) > MAX_CACHED_SCHEMAS:
                self.grammars.popitem(last=False)
        return grammar


_TABLES: weakref.WeakKeyDictionary[Tokenizer, dict[tuple, _Table]] = weakref.WeakKeyDictionary()
_TABLES_LOCK = threading.Lock()


def _table(tokenizer: Tokenizer, n_vocab: int, eos: tuple[int, ...]) -> _Table:
    with _TABLES_LOCK:
        tables = _TABLES.setdefault(tokenizer, {})
        key = (n_vocab, eos)
        if key not in tables:
            tables[key] = _Table(tokenizer, n_vocab, eos)
        return tables[key]


class Grammar:
    """One JSON schema compiled for one token table; :meth:`constraint` gives each request its own matcher."""

    def __init__(self, table: _Table, schema: dict):
        llg = table.llg
        self.table, self.schema = table, schema
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)
        except (ValueError, TypeError) as e:
            raise SchemaError(str(e)) from None
        failed, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, table.tokenizer)
        if failed or messages:  # warnings are features it would drop ("Unimplemented keys: ..."): refused, not ignored
            raise SchemaError("; ".join(m.removeprefix("WARNING: ") for m in messages) or "invalid schema")
        self._matcher = llg.LLMatcher(table.tokenizer, grammar, log_level=0)
        if self._matcher.is_error():
            raise SchemaError(self._matcher.get_error())

    def constraint(self) -> Constraint:
        return Constraint(self._matcher.deep_copy(), self.table)


class Constraint:
    """A request's grammar state: which tokens may come next, and whether the JSON is complete."""

    def __init__(self, matcher: Any, table: _Table):
        self.matcher, self.table = matcher, table

    def accept(self, token: int) -> bool:
        """Consume a sampled token; False (and :attr:`error` set) if the grammar does not allow it."""
        return self.matcher.consume_token(token)

    @property
    def done(self) -> bool:
        """The JSON is complete and nothing can follow it (the request ends with reason ``stop``)."""
        return self.matcher.is_stopped()

    @property
    def error(self) -> str:
        return f"the output left the JSON schema: {self.matcher.get_error() or 'no token allowed'}"


def allowed_tokens(constraints: Sequence[Constraint]) -> torch.Tensor:
    """(len(constraints), n_vocab) bool: the tokens each constraint allows next.

    All constraints must share one token table (one model's requests do). The masks are computed one after the
    other in the calling thread (the engine's): llguidance's thread pool (``LLExecutor``) costs more in hand-offs
    than it saves at a server's batch sizes on a few cores, and it would compete with torch's threads."""
    table = constraints[0].table
    words = (table.n_vocab + 31) // 32
    packed = torch.empty(len(constraints), words, dtype=torch.int32)  # bit j of word w: token 32 w + j
    for i, c in enumerate(constraints):
        c.matcher.unsafe_compute_mask_ptr(packed[i].data_ptr(), words * 4)  # releases the GIL while it works
    bits = (packed.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1  # (B, words, 32)
    return bits.view(len(constraints), words * 32)[:, : table.n_vocab].bool()


def compile_schema(schema: dict, tokenizer: Tokenizer, n_vocab: int, eos: Sequence[int]) -> Grammar:
    """The compiled grammar of ``schema`` for ``tokenizer`` (cached), its objects closed (:func:`closed_objects`).
    ``n_vocab``: the model's vocabulary (at least the tokenizer's); ``eos``: the tokens that end a reply, allowed
    once the JSON could be complete.

    Raises:
        SchemaError: a feature the engine does not support (named), or a schema that is not valid.
    """
    if not isinstance(schema, dict):
        raise SchemaError(f"a JSON schema must be an object, got {type(schema).__name__}")
    return _table(tokenizer, n_vocab, tuple(eos)).grammar(closed_objects(schema))
