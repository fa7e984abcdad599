"""Preference pairs for DPO: loading and validation, encoding, and batches for ``llmcore.training.loop.fit``.

A preference entry is an instruction entry (``instruction``, ``input``, ``output``) plus two answers to it,
the preferred ``chosen`` and the dispreferred ``rejected`` (the book's ``instruction-data-with-preference.json``,
ch. 7 bonus material; or pairs the ``align`` stage built by asking the judge)::

    entries, dropped = load_preferences(path)           # llmcore.data.datasets: validated, identical dropped
    pairs, too_long = encode_pairs(entries, tok, "alpaca", max_length=256)
    data = PreferenceBatches(pairs, batch_size=8, pad_id=tok.eot_id)
    batch = data.next_batch()   # {"inputs": (2B, T), "targets": (2B, T), "ref_logps": (2B,)}: chosen rows first

Each side of a pair is one sequence ``prompt + answer + <|endoftext|>`` with the same prompt template as
instruction tuning; the targets of the prompt are always masked (-100), so a sequence's log-probability
covers the answer and its end-of-text only. The chosen and rejected rows of a batch go through the model
in one forward pass (rows ``[:B]`` chosen, ``[B:]`` rejected).

``ref_logps`` are the frozen reference model's log-probabilities of each row, filled in once before
training (``llmcore.training.dpo.attach_reference_logps``); until then they are NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llmcore.data.batches import EpochOrder
from llmcore.data.instruct import Example, collate
from llmcore.text.prompts import answer_end_id, prompt_ids
from llmcore.text.tokenizer import Tokenizer


@dataclass
class PreferencePair:
    chosen: Example  # prompt + chosen answer + [eot]
    rejected: Example  # prompt + rejected answer + [eot]
    index: int  # position in the entries it was encoded from


def encode_pairs(
    entries: Sequence[dict], tok: Tokenizer, template: str, max_length: int
) -> tuple[list[PreferencePair], list[int]]:
    """Tokenize preference entries -> (pairs, indices of entries dropped as too long).

    A side needing more than ``max_length`` input positions would be truncated, and a
    truncated answer's log-probability compares nothing fair: such a pair is dropped, not cut.
    """
    prompts = [prompt_ids(tok, template, e["instruction"], e["input"]) for e in entries]  # chatml: special tokens
    end = answer_end_id(tok, template)  # a chat model's answer ends with <|im_end|>
    chosen = tok.encode_batch([e["chosen"] for e in entries], allow_special=False)
    rejected = tok.encode_batch([e["rejected"] for e in entries], allow_special=False)
    pairs, too_long = [], []
    for i, (p, c, r) in enumerate(zip(prompts, chosen, rejected, strict=True)):
        if max(len(c), len(r)) + len(p) > max_length:  # + eot - 1 (inputs are ids[:-1])
            too_long.append(i)
            continue
        pairs.append(PreferencePair(Example(p + c + [end], len(p)), Example(p + r + [end], len(p)), i))
    return pairs, too_long


def collate_pairs(pairs: Sequence[PreferencePair], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), both (2B, T): the chosen sequences in rows ``[:B]``, the rejected in ``[B:]``;
    prompt and padding targets are -100."""
    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id, mask_prompt=True)


class PreferenceBatches:
    """Batches of preference pairs: the ``Batches`` protocol of ``llmcore.training.loop.fit``.

    ``next_batch()`` returns ``{"inputs", "targets", "ref_logps"}`` for ``batch_size`` pairs (2 x batch_size
    rows). Order and data parallelism as ``llmcore.data.instruct.InstructionBatches``: a seeded order per
    epoch (resumable), grouped by length if asked; evaluation (``shuffle=False``) walks the pairs in order.
    """

    def __init__(
        self,
        pairs: Sequence[PreferencePair],
        batch_size: int,
        pad_id: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        group_by_length: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.pairs = list(pairs)
        lengths = [max(len(p.chosen.ids), len(p.rejected.ids)) for p in self.pairs] if group_by_length else None
        self.order = EpochOrder(
            len(self.pairs),
            batch_size,
            seed=seed,
            shuffle=shuffle,
            lengths=lengths,
            rank=rank,
            world_size=world_size,
            where="align",
        )
        self.pad_id = pad_id
        # (n_pairs, 2): the reference model's log-prob of [chosen, rejected]; set by attach_reference_logps
        self.ref_logps = torch.full((len(self.pairs), 2), float("nan"), dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.order)

    def batch_of(self, rows: Sequence[int]) -> dict[str, torch.Tensor]:
        inputs, targets = collate_pairs([self.pairs[i] for i in rows], self.pad_id)
        ref = self.ref_logps[list(rows)]  # (B, 2)
        return {"inputs": inputs, "targets": targets, "ref_logps": torch.cat([ref[:, 0], ref[:, 1]])}

    def next_batch(self) -> dict[str, torch.Tensor]:
        rows = self.order.next_rows()
        if not rows:  # a short last evaluation batch left this rank nothing: a stand-in pair weighing nothing
            batch = self.batch_of([0])
            batch["targets"].fill_(-100)
            return batch
        return self.batch_of(rows)

    def state_dict(self) -> dict:
        return self.order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)
