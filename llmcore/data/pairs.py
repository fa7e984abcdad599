"""Preference pairs for DPO: the params that say where they come from, and the dataset's pairs.

``PreferencesParams`` is the part of params.yaml's ``align`` section that the ``preferences`` stage reads
(``stages/preferences.py``); the ``align`` stage's schema extends it with the DPO keys (``stages/align.py``),
so an edit of ``align.beta`` reruns DPO but not the pairs.

The book's preference file (``instruction-data-with-preference.json``) is validated and split by position, as
the instruct stage splits its copy of the same entries (same fractions and seed by default), so no test prompt
is ever trained on; only the train and validation entries become pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from llmcore.common import LLMCoreError, read_json
from llmcore.data.datasets import validate_preferences
from llmcore.data.instruct import check_split, split_entries


@dataclass
class PairParams:
    """``preferences: judge``: how the two answers per prompt are sampled."""

    seeds: list[int] = field(default_factory=lambda: [1, 2])  # one sampled answer per seed (two seeds)
    temperature: float = 1.0  # > 0: the two answers must be able to differ
    top_k: int | None = 50
    top_p: float | None = None
    max_new_tokens: int = 128
    batch_size: int = 16
    max_prompts: int | None = None  # judge at most this many training prompts (null = all); validation: all

    def __post_init__(self) -> None:
        if len(self.seeds) != 2 or self.seeds[0] == self.seeds[1]:
            raise LLMCoreError(f"align.pairs.seeds: expected two different seeds, got {self.seeds}")
        if not self.temperature > 0:
            raise LLMCoreError(f"align.pairs.temperature: expected > 0 (sampled answers), got {self.temperature}")
        for key in ("max_new_tokens", "batch_size"):
            if getattr(self, key) < 1:
                raise LLMCoreError(f"align.pairs.{key}: expected a positive int, got {getattr(self, key)}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise LLMCoreError(f"align.pairs.max_prompts: expected a positive int or null, got {self.max_prompts}")


@dataclass
class PreferencesParams:
    """The ``align`` keys the ``preferences`` stage reads."""

    preferences: Literal["dataset", "judge"] = "dataset"
    dataset: str = "instruction-data-with-preference"  # a download source: one JSON list of entries
    identical: Literal["drop", "error"] = "drop"  # entries whose chosen == rejected (the book's file has 6)
    base_model: str = "instruct"  # the policy's and reference's start: data/models/<base_model>
    train_fraction: float = 0.85  # keep equal to instruct's: the test prompts are never trained on
    test_fraction: float = 0.10
    split_seed: int = 123
    pairs: PairParams = field(default_factory=PairParams)

    def __post_init__(self) -> None:
        check_split(self.train_fraction, self.test_fraction, "align")


def dataset_pairs(cfg: PreferencesParams, data_path: Path) -> tuple[list[dict], dict]:
    """The book's preference file, validated and split -> (pair records, counts)."""
    raw = read_json(data_path)
    _, identical = validate_preferences(raw, str(data_path), cfg.identical)
    skip = {id(raw[i]) for i in identical}
    # split the whole file by position, as the instruct stage splits its copy of the same entries
    train, val, test = split_entries(raw, cfg.train_fraction, cfg.test_fraction, cfg.split_seed)
    records = [
        {**e, "split": name} for name, part in (("train", train), ("val", val)) for e in part if id(e) not in skip
    ]
    return records, {"entries": len(raw), "dropped_identical": len(identical), "test_entries": len(test)}
