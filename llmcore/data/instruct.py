"""Instruction fine-tuning on Alpaca-format data: split, prompt template, collate, loss and responses.

The pieces of Raschka, *Build a Large Language Model (From Scratch)*, ch. 7, as plain functions:

    train, val, test = split_entries(entries, train_fraction=0.85, test_fraction=0.10, seed=123)
    examples = encode_entries(train, tok, template="alpaca")      # prompt + output + <|endoftext|>
    data = InstructionBatches(examples, batch_size=8, pad_id=tok.eot_id, mask_prompt=True, max_length=256)
    inputs, targets = data.next_batch()                           # a seeded, resumable stream for train.fit
    loss, n = llmcore.train.lm_loss(model, (inputs, targets))     # mean over the n targets that are not -100
    answers = generate_responses(model, tok, prompts, SamplingConfig(max_new_tokens=128))

One training sequence is ``prompt ids + output ids + [eot]``; the model learns to write the output after
``### Response:`` and to end it with the end-of-text token. ``collate`` is the book's
``custom_collate_fn``: pad to the longest row, shift targets by one, ignore (``-100``) every padding target
but the first end-of-text, optionally ignore the prompt's tokens too, and truncate to the context length.

The prompt template is Alpaca's (``llmcore.prompts.format_alpaca``, shared with serving) or a custom
``str.format`` string with ``{instruction}`` and ``{input}`` placeholders.
"""

from __future__ import annotations

import codecs
import math
import os
import random
import string
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from llmcore.checkpoint import read_metadata
from llmcore.common import LLMCoreError
from llmcore.datasets import load_instruction_data
from llmcore.generate import SamplingConfig, generate_steps, stream
from llmcore.hub import load_model_dir
from llmcore.model import GPT
from llmcore.prompts import extract_response, format_alpaca, section_start
from llmcore.tokenizer import Tokenizer
from llmcore.train import lm_loss

IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index
TEMPLATE_FIELDS = ("instruction", "input")
SECTION = "\n###"  # a new Alpaca section: the model has finished its answer and starts another prompt


# ---------------------------------------------------------------------------------------------------
# Data: split and prompt template
# ---------------------------------------------------------------------------------------------------


def split_entries(
    entries: Sequence[dict], train_fraction: float, test_fraction: float, seed: int
) -> tuple[list[dict], list[dict], list[dict]]:
    """Shuffle with ``seed`` and cut into (train, val, test); validation gets what train and test leave.

    The book's cut of its 1100 entries: 85% train (935), 10% test (110), the remaining 5% validation (55).
    """
    if not (0 < train_fraction < 1 and 0 < test_fraction < 1 and train_fraction + test_fraction < 1):
        raise LLMCoreError(
            f"instruct: train_fraction={train_fraction} and test_fraction={test_fraction} must be in (0, 1) and "
            "sum to less than 1 (validation gets the rest)"
        )
    order = list(range(len(entries)))
    random.Random(seed).shuffle(order)
    n_train, n_test = int(len(entries) * train_fraction), int(len(entries) * test_fraction)
    shuffled = [entries[i] for i in order]
    train, test, val = shuffled[:n_train], shuffled[n_train : n_train + n_test], shuffled[n_train + n_test :]
    if not train or not val or not test:
        raise LLMCoreError(
            f"instruct: {len(entries)} entries give an empty split (train {len(train)}, val {len(val)}, "
            f"test {len(test)}); use more data or other fractions"
        )
    return train, val, test


def check_template(template: str, where: str = "instruct.template") -> str:
    """Accept ``"alpaca"`` or a format string using only ``{instruction}`` (required) and ``{input}``."""
    if template == "alpaca":
        return template
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise LLMCoreError(f"{where}: not a valid format string: {e}") from None
    unknown = [f for f in fields if f not in TEMPLATE_FIELDS]
    if unknown:
        raise LLMCoreError(f"{where}: unknown placeholder {{{unknown[0]}}} (known: {{instruction}}, {{input}})")
    if "instruction" not in fields:
        raise LLMCoreError(f"{where}: a custom template needs an {{instruction}} placeholder, or use 'alpaca'")
    return template


def format_prompt(template: str, instruction: str, input: str = "") -> str:
    """The prompt of one entry, ending where the response starts."""
    if template == "alpaca":
        return format_alpaca(instruction, input)
    return template.format(instruction=instruction, input=input)


@dataclass
class Example:
    ids: list[int]  # prompt + response + [eot]
    prompt_len: int  # how many of ``ids`` are the prompt


def encode_entries(entries: Sequence[dict], tok: Tokenizer, template: str) -> list[Example]:
    """Tokenize entries into training sequences ``prompt + output + <|endoftext|>``.

    Prompt and output are encoded apart, as at inference where only the prompt is given; the text is
    encoded as plain text, so a literal ``<|endoftext|>`` in the data cannot end a sequence early.
    """
    prompts = [format_prompt(template, e["instruction"], e["input"]) for e in entries]
    prompt_ids = tok.encode_batch(prompts, allow_special=False)
    output_ids = tok.encode_batch([e["output"] for e in entries], allow_special=False)
    return [Example(p + o + [tok.eot_id], len(p)) for p, o in zip(prompt_ids, output_ids, strict=True)]


# ---------------------------------------------------------------------------------------------------
# Batches and loss
# ---------------------------------------------------------------------------------------------------


def collate(
    examples: Sequence[Example],
    pad_id: int,
    *,
    ignore_index: int = IGNORE_INDEX,
    mask_prompt: bool = False,
    max_length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a batch to its longest sequence and build shifted targets (the book's ``custom_collate_fn``).

    Row ``i`` holds ``ids[:-1]`` as inputs and ``ids[1:]`` as targets, so the last real target is the
    end-of-text token (the model learns to stop); every target after it is padding and set to
    ``ignore_index``. With ``mask_prompt`` the targets that are prompt tokens are ignored too, so the loss
    covers only the response (and its end-of-text).

    Args:
        examples: sequences ending in the end-of-text token, with their prompt lengths.
        pad_id: id written into padded input positions (the book uses the end-of-text id); never a target.
        ignore_index: target value the loss skips.
        mask_prompt: ignore the targets inside the prompt.
        max_length: truncate inputs and targets to this many positions (the model's context length).

    Returns:
        ``(inputs, targets)``, both (B, T) int64 with T = min(longest sequence - 1, max_length).
    """
    if not examples:
        raise ValueError("collate: empty batch")
    if any(len(e.ids) < 2 for e in examples):
        raise ValueError("collate: every sequence needs at least two tokens (one input, one target)")
    width = max(len(e.ids) for e in examples) - 1
    inputs = torch.full((len(examples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), width), ignore_index, dtype=torch.long)
    for row, e in enumerate(examples):
        ids = torch.tensor(e.ids, dtype=torch.long)
        n = len(e.ids) - 1
        inputs[row, :n] = ids[:-1]
        targets[row, :n] = ids[1:]
        if mask_prompt:
            targets[row, : e.prompt_len - 1] = ignore_index  # target j predicts token j+1
    if max_length is not None:
        inputs, targets = inputs[:, :max_length], targets[:, :max_length]
    return inputs, targets


class InstructionBatches:
    """Batches over encoded examples, one pass per epoch in a seeded order; the ``Batches`` protocol of
    ``llmcore.train.fit`` (``next_batch()``, ``len()`` = batches per epoch, ``state_dict()``).

    Training (``shuffle=True``): a fresh order each epoch, drawn from ``(seed, epoch)`` so a resumed run sees
    the same batches; the ragged tail of an epoch is dropped (every batch is full). With ``group_by_length``
    each shuffled window of 32 batches is sorted by length before it is cut (then the batches are shuffled):
    rows of similar length pad less. Evaluation (``shuffle=False``): every example once per epoch, in order.

    Data parallel: each rank draws the same global batch of ``batch_size * world_size`` examples and keeps
    its own slice.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        batch_size: int,
        pad_id: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        mask_prompt: bool = False,
        max_length: int | None = None,
        group_by_length: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size < 1:
            raise LLMCoreError(f"instruct: batch_size must be positive, got {batch_size}")
        if not examples:
            raise LLMCoreError("instruct: no examples to batch")
        if shuffle and len(examples) < batch_size * world_size:  # training batches are always full
            raise LLMCoreError(
                f"instruct: {len(examples)} examples are fewer than one batch of {batch_size * world_size}; "
                "lower the batch size"
            )
        self.examples = list(examples)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.pad_id, self.mask_prompt, self.max_length = pad_id, mask_prompt, max_length
        self.seed, self.shuffle, self.group_by_length = seed, shuffle, group_by_length
        self.epoch, self.batch = 0, 0  # batch: the next one within the epoch
        self._order = self._epoch_order(self.epoch)

    def __len__(self) -> int:
        G = self.batch_size * self.world_size
        return len(self.examples) // G if self.shuffle else math.ceil(len(self.examples) / G)

    def _epoch_order(self, epoch: int) -> list[list[int]]:
        """The global batches of ``epoch``, as lists of example indices."""
        G = self.batch_size * self.world_size
        order = list(range(len(self.examples)))
        if not self.shuffle:
            return [order[i : i + G] for i in range(0, len(order), G)]
        rng = random.Random(self.seed * 100_003 + epoch)  # a fixed order per (seed, epoch): resumable
        rng.shuffle(order)
        if self.group_by_length:
            window = G * 32
            by_length = lambda i: len(self.examples[i].ids)
            order = [i for w in range(0, len(order), window) for i in sorted(order[w : w + window], key=by_length)]
        batches = [order[i * G : (i + 1) * G] for i in range(len(self))]
        if self.group_by_length:
            rng.shuffle(batches)
        return batches

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of the next batch, (B, T) int64 each, on the CPU."""
        if self.batch >= len(self._order):
            self.epoch, self.batch = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)
        rows = self._order[self.batch][self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        self.batch += 1
        if not rows:  # a short last evaluation batch left this rank nothing: a stand-in row scoring no target
            inputs, targets = collate(self.examples[:1], self.pad_id, max_length=self.max_length)
            return inputs, targets.fill_(IGNORE_INDEX)
        batch = [self.examples[i] for i in rows]
        return collate(batch, self.pad_id, mask_prompt=self.mask_prompt, max_length=self.max_length)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self._order = self._epoch_order(self.epoch)


def eval_batches(
    examples: Sequence[Example],
    batch_size: int,
    pad_id: int,
    *,
    mask_prompt: bool = False,
    max_length: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every example once, in order, in batches (for the validation and test loss)."""
    for start in range(0, len(examples), batch_size):
        yield collate(examples[start : start + batch_size], pad_id, mask_prompt=mask_prompt, max_length=max_length)


@torch.no_grad()
def evaluate_loss(model: GPT, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Token-weighted mean loss over ``batches`` (each scored target counts once, whatever its batch)."""
    was_training = model.training
    model.eval()
    device = model.tok_emb.weight.device
    total, count = 0.0, 0
    try:
        for inputs, targets in batches:
            loss, n = lm_loss(model, (inputs.to(device), targets.to(device)))
            total, count = total + float(loss) * int(n), count + int(n)
    finally:
        model.train(was_training)
    if not count:
        raise LLMCoreError("instruct: no target tokens to evaluate (every sequence truncated inside its prompt?)")
    return total / count


# ---------------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------
# Saved instruction models
# ---------------------------------------------------------------------------------------------------

TEMPLATE_KEY = "template"  # checkpoint metadata: the prompt template the model was tuned with


def load_instruct_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer, str]:
    """Load an instruction model folder -> (model, tokenizer, its prompt template from the checkpoint metadata)."""
    model, tok = load_model_dir(path, device=str(device))
    template = read_metadata(Path(path) / "model.safetensors").get(TEMPLATE_KEY, "alpaca")
    return model, tok, check_template(template, where=f"{path}: metadata '{TEMPLATE_KEY}'")


def reference_loss(model_dir: str | os.PathLike, responses: str | os.PathLike, batch_size: int = 8) -> dict:
    """Loss and perplexity of the instruction model on the reference outputs of ``responses.json``.

    Only response tokens (and the end-of-text) are scored, as in training with ``mask_prompt``; sequences
    are cut to the model's context. Used by the ``evaluate`` stage.

    Returns:
        ``{"reference_loss": float, "reference_perplexity": float, "reference_tokens": int}``
    """
    model, tok, template = load_instruct_model(model_dir)
    path = Path(responses)
    entries = load_instruction_data(path)  # the same keys, checked entry by entry
    examples = encode_entries(entries, tok, template)
    ctx = model.cfg.context_length
    batches = list(eval_batches(examples, batch_size, tok.eot_id, mask_prompt=True, max_length=ctx))
    loss = evaluate_loss(model, batches)
    n = sum(int((t != IGNORE_INDEX).sum()) for _, t in batches)
    return {"reference_loss": round(loss, 4), "reference_perplexity": round(math.exp(loss), 3), "reference_tokens": n}
