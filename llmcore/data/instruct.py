"""Instruction fine-tuning on Alpaca-format data: split, prompt template, collate, loss and responses.

The pieces of Raschka, *Build a Large Language Model (From Scratch)*, ch. 7, as plain functions:

    train, val, test = split_entries(entries, train_fraction=0.85, test_fraction=0.10, seed=123)
    examples = encode_entries(train, tok, template="alpaca")      # prompt + output + <|endoftext|>
    data = InstructionBatches(examples, batch_size=8, pad_id=tok.eot_id, mask_prompt=True, max_length=256)
    inputs, targets = data.next_batch()                           # a seeded, resumable stream for train.fit
    loss, n = llmcore.training.loop.lm_loss(model, (inputs, targets))     # mean over the n targets that are not -100
    answers = generate_responses(model, tok, prompts, SamplingConfig(max_new_tokens=128))

One training sequence is ``prompt ids + output ids + [eot]``; the model learns to write the output after
``### Response:`` and to end it with the end-of-text token. ``collate`` is the book's
``custom_collate_fn``: pad to the longest row, shift targets by one, ignore (``-100``) every padding target
but the first end-of-text, optionally ignore the prompt's tokens too, and truncate to the context length.

The prompt template is Alpaca's (``llmcore.text.prompts.format_alpaca``, shared with serving) or a custom
``str.format`` string with ``{instruction}`` and ``{input}`` placeholders.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from llmcore.common import LLMCoreError
from llmcore.data.batches import EpochOrder
from llmcore.models.ops import IGNORE_INDEX
from llmcore.text.chat import CHATML, alpaca_to_messages, render_chat
from llmcore.text.prompts import format_prompt
from llmcore.text.tokenizer import Tokenizer

# ---------------------------------------------------------------------------------------------------
# Data: split and prompt template
# ---------------------------------------------------------------------------------------------------


def check_split(train_fraction: float, test_fraction: float, where: str) -> None:
    """The fractions ``split_entries`` takes: each in (0, 1), leaving some validation data (``where``: the section)."""
    for key, value in (("train_fraction", train_fraction), ("test_fraction", test_fraction)):
        if not 0 < value < 1:
            raise LLMCoreError(f"{where}.{key}: expected a value in (0, 1), got {value}")
    if train_fraction + test_fraction >= 1:
        raise LLMCoreError(f"{where}.test_fraction: train_fraction + test_fraction must leave some validation data")


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


@dataclass
class Example:
    ids: list[int]  # prompt + response + [eot]
    prompt_len: int  # how many of ``ids`` are the prompt
    mask: list[bool] | None = None  # chat: per id, whether it is learned (assistant content + end of turn)


def encode_entries(entries: Sequence[dict], tok: Tokenizer, template: str) -> list[Example]:
    """Tokenize entries into training sequences ``prompt + output + <|endoftext|>``.

    Prompt and output are encoded apart, as at inference where only the prompt is given; the text is
    encoded as plain text, so a literal ``<|endoftext|>`` in the data cannot end a sequence early.

    ``chatml`` (a chat model): each entry is a conversation (its ``messages`` prompt turns when it has them, else
    the instruction and input as one user turn) ending in the output as the assistant's answer, rendered by
    :func:`llmcore.text.chat.render_chat`; the mask keeps the final answer and its end-of-turn token.
    """
    if template == CHATML:
        out = []
        for e in entries:
            prompt = e.get("messages") or alpaca_to_messages(e)[:1]
            enc = render_chat(tok, [*prompt, {"role": "assistant", "content": e["output"]}])
            prompt_len = len(render_chat(tok, prompt, add_generation_prompt=True).ids)
            mask = [m and i >= prompt_len for i, m in enumerate(enc.mask)]  # this answer, not earlier ones
            out.append(Example(enc.ids, prompt_len, mask))
        return out
    prompts = [format_prompt(template, e["instruction"], e["input"]) for e in entries]
    prompt_ids = tok.encode_batch(prompts, allow_special=False)
    output_ids = tok.encode_batch([e["output"] for e in entries], allow_special=False)
    return [Example(p + o + [tok.eot_id], len(p)) for p, o in zip(prompt_ids, output_ids, strict=True)]


# ---------------------------------------------------------------------------------------------------
# Batches and loss
# ---------------------------------------------------------------------------------------------------


def encode_conversations(
    conversations: Sequence[dict], tok: Tokenizer, max_length: int
) -> tuple[list[Example], int, int]:
    """Encode conversations as training examples with the assistant-only mask.

    A conversation longer than ``max_length`` positions (``len(ids) - 1``) is cut after the last assistant turn
    that fits (a user turn after it would be context for nothing); one whose first answer does not fit is dropped.

    Returns:
        ``(examples, cut, dropped)``: the examples (same order, dropped ones left out) and the two counts.
    """
    examples, cut, dropped = [], 0, 0
    for c in conversations:
        enc = render_chat(tok, c["messages"])
        ids, mask = enc.ids, enc.mask
        if len(ids) - 1 > max_length:
            fits = [
                n
                for n, m in zip(enc.turn_ends, c["messages"], strict=True)
                if m["role"] == "assistant" and n - 1 <= max_length
            ]
            if not fits:
                dropped += 1
                continue
            ids, mask = ids[: fits[-1]], mask[: fits[-1]]
            cut += 1
        examples.append(Example(ids, 0, mask))
    return examples, cut, dropped


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
    covers only the response (and its end-of-text). A conversation (an example with a ``mask``) keeps only the
    targets its mask marks: the assistant turns and their end-of-turn tokens.

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
        if e.mask is not None:  # a conversation: only assistant tokens are targets, whatever mask_prompt says
            keep = torch.tensor(e.mask[1:], dtype=torch.bool)
            targets[row, :n][~keep] = ignore_index
        elif mask_prompt:
            targets[row, : e.prompt_len - 1] = ignore_index  # target j predicts token j+1
    if max_length is not None:
        inputs, targets = inputs[:, :max_length], targets[:, :max_length]
    return inputs, targets


class InstructionBatches:
    """Batches over encoded examples, one pass per epoch in a seeded order; the ``Batches`` protocol of
    ``llmcore.training.loop.fit`` (``next_batch()``, ``len()`` = batches per epoch, ``state_dict()``).

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
        self.examples = list(examples)
        lengths = [len(e.ids) for e in self.examples] if group_by_length else None
        self.order = EpochOrder(
            len(self.examples),
            batch_size,
            seed=seed,
            shuffle=shuffle,
            lengths=lengths,
            rank=rank,
            world_size=world_size,
            where="instruct",
        )
        self.pad_id, self.mask_prompt, self.max_length = pad_id, mask_prompt, max_length

    def __len__(self) -> int:
        return len(self.order)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of the next batch, (B, T) int64 each, on the CPU."""
        rows = self.order.next_rows()
        if not rows:  # a short last evaluation batch left this rank nothing: a stand-in row scoring no target
            inputs, targets = collate(self.examples[:1], self.pad_id, max_length=self.max_length)
            return inputs, targets.fill_(IGNORE_INDEX)
        batch = [self.examples[i] for i in rows]
        return collate(batch, self.pad_id, mask_prompt=self.mask_prompt, max_length=self.max_length)

    def state_dict(self) -> dict:
        return self.order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)


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


# ---------------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------
# Saved instruction models
# ---------------------------------------------------------------------------------------------------
