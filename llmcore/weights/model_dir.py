"""Model folders: the one format every stage writes and every command reads.

A model folder holds ``model.safetensors`` (an llmcore weight file, the model config and metadata inside) and
``tokenizer.json`` side by side. Stages write one atomically (:func:`save_model_dir`, :func:`save_classifier`,
both through :func:`staged_dir`); everything that reads one goes through :func:`open_model_dir`, which checks the
folder, reads the config, the tokenizer and the metadata (prompt template, task, family) without loading the
weights, and then loads the kind of model it holds::

    folder = open_model_dir("data/models/instruct")
    folder.task, folder.family, folder.template     # "lm", "llama", "alpaca"
    model = folder.load_lm(device="cpu")            # refuses a classifier folder with a one-line error
    classifier = open_model_dir("data/models/classify").load_classifier()

The metadata keys are strings (safetensors metadata): ``task`` ("classify" for the spam classifier; absent for
language models), ``template`` (the prompt template an instruction model was tuned with), ``labels`` and
``pooling`` (classifier), plus each stage's own keys (``stage``, ``base_model``, ...).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from llmcore.common import LLMCoreError, current_umask, new_temp
from llmcore.models.classifier import HEAD_PREFIX, POOLING, GPTClassifier
from llmcore.models.config import ModelConfig
from llmcore.models.gpt import GPT
from llmcore.text.prompts import check_template
from llmcore.text.tokenizer import Tokenizer
from llmcore.weights.weight_file import (
    FORMAT,
    load_checkpoint,
    load_into,
    load_state,
    model_state,
    read_config,
    read_metadata,
    save_checkpoint,
    write_weights,
)


def save_model_dir(
    dest: str | os.PathLike, model: GPT, tokenizer: Tokenizer, metadata: dict[str, str] | None = None
) -> Path:
    """Write a model folder atomically: both files go to a temporary sibling folder renamed onto ``dest``.

    A failure leaves ``dest`` as it was (or absent), never a folder with only one of the two files.
    """
    dest = Path(dest)
    check_fits(tokenizer, model.cfg, dest)
    with staged_dir(dest) as tmp:
        save_checkpoint(tmp / WEIGHTS_FILE, model, metadata)
        tokenizer.save(tmp / TOKENIZER_FILE)
    return dest


@contextlib.contextmanager
def staged_dir(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder of ``dest``; on success it replaces ``dest``, on error it is removed.

    The folder is named for its owner (``llmcore.common.new_temp``): one a killed run left (``.<name>.<pid>-...``
    whose process is gone) is removed here, by the next writer of the same ``dest``, and by no one else.
    """
    dest = Path(dest)
    tmp = new_temp(dest, directory=True)
    try:
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes it private; give it the mode mkdir() would
        yield tmp
        replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(src: Path, dest: Path) -> None:
    """Move folder ``src`` onto ``dest`` (same parent): a rename, with any old ``dest`` moved aside first."""
    if not dest.exists():
        os.replace(src, dest)
        return
    old = new_temp(dest, ".old", directory=True)
    os.replace(dest, old / dest.name)
    try:
        os.replace(src, dest)
    except BaseException:
        os.replace(old / dest.name, dest)  # put the previous folder back
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
TEMPLATE_KEY = "template"  # metadata: the prompt template an instruction model was tuned with
TASK_KEY = "task"  # metadata: "classify" for a classifier; language models have none
MISSING_HINT = "did the stage that writes it run? for GPT-2 weights add the size to import.models"


@dataclass(frozen=True)
class ModelFolder:
    """What a model folder holds, read without loading the weights (see the module docstring)."""

    path: Path  # the folder
    config: ModelConfig
    tokenizer: Tokenizer
    metadata: dict[str, str]

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS_FILE

    @property
    def task(self) -> str:
        """``lm`` (a causal language model) or the metadata's task (``classify``)."""
        return self.metadata.get(TASK_KEY) or "lm"

    @property
    def family(self) -> str:
        """``llama`` (RoPE) or ``gpt2`` (learned positions): the architecture family exporters name."""
        return "llama" if self.config.pos_emb == "rope" else "gpt2"

    @cached_property
    def template(self) -> str | None:
        """The prompt template stored by instruction tuning (``alpaca`` or a custom one), None when absent."""
        stored = self.metadata.get(TEMPLATE_KEY)
        return None if stored is None else check_template(stored, where=f"{self.weights}: metadata '{TEMPLATE_KEY}'")

    @cached_property
    def labels(self) -> list[str]:
        """A classifier's class names (metadata ``labels``, a JSON list)."""
        try:
            labels = json.loads(self.metadata.get("labels", ""))
        except json.JSONDecodeError:
            labels = None
        if not (isinstance(labels, list) and labels and all(isinstance(x, str) for x in labels)):
            raise LLMCoreError(
                f"{self.weights}: metadata 'labels' must be a JSON list of names, got {self.metadata.get('labels')!r}"
            )
        return labels

    def require_lm(self, use: str = "this command") -> ModelFolder:
        """This folder, if it holds a causal language model; else a one-line error saying what it holds."""
        if self.task != "lm":
            raise LLMCoreError(
                f"{self.weights}: a '{self.task}' checkpoint, not a causal language model; {use} needs one "
                "(a pretrain, import or instruct model folder)"
            )
        return self

    def load_lm(self, device: str | torch.device = "cpu", use: str = "this command") -> GPT:
        """The language model in eval mode (weights stored in bf16/fp16 are upcast to fp32)."""
        return load_checkpoint(self.require_lm(use).weights, device=device, config=self.config)

    def load_classifier(self, device: str | torch.device = "cpu") -> GPTClassifier:
        """The classifier (base GPT + ``cls_head``) in eval mode."""
        path = self.weights
        if self.task != "classify":
            holds = "a causal language model" if self.task == "lm" else f"a '{self.task}' checkpoint"
            raise LLMCoreError(
                f"{path}: {holds}, not a classifier; this needs a folder written by the classify stage "
                "(data/models/classify)"
            )
        if self.metadata.get("pooling") != POOLING:
            raise LLMCoreError(f"{path}: unsupported pooling {self.metadata.get('pooling')!r} (expected {POOLING})")
        labels = self.labels
        state = {k: v.float() if v.is_floating_point() else v for k, v in load_state(path, device).items()}
        head = {k[len(HEAD_PREFIX) :]: state.pop(k) for k in list(state) if k.startswith(HEAD_PREFIX)}
        with torch.device(device):
            model = GPTClassifier(GPT(self.config), num_classes=len(labels))
        load_into(model.gpt, state, path)
        expected = {k: tuple(v.shape) for k, v in model.head.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in head.items()}
        if got != expected:
            raise LLMCoreError(f"{path}: classification head {got} does not match {len(labels)} labels {expected}")
        model.head.load_state_dict(head)
        return model.eval()


def open_model_dir(path: str | os.PathLike) -> ModelFolder:
    """Check a model folder and read its config, tokenizer and metadata (not the weights).

    Args:
        path: the folder, e.g. ``data/models/instruct`` (``data/models/${base_model}``), or the
            ``model.safetensors`` file inside one.

    Raises:
        LLMCoreError: naming the folder when it or one of its files is missing, unreadable, or when the
            tokenizer does not fit the model.
    """
    path = Path(path)
    if path.name == WEIGHTS_FILE and path.is_file():
        path = path.parent
    if not path.is_dir():
        raise LLMCoreError(f"{path}: no such model folder ({MISSING_HINT})")
    for name in (WEIGHTS_FILE, TOKENIZER_FILE):
        if not (path / name).is_file():
            raise LLMCoreError(f"{path}: no {name} ({MISSING_HINT})")
    config = read_config(path / WEIGHTS_FILE)
    metadata = read_metadata(path / WEIGHTS_FILE)
    tokenizer = Tokenizer.load(path / TOKENIZER_FILE)
    check_fits(tokenizer, config, path)
    return ModelFolder(path, config, tokenizer, metadata)


def check_fits(tokenizer: Tokenizer, config: ModelConfig, where: str | os.PathLike) -> None:
    """A tokenizer belongs to a model only if every id it makes has an embedding row."""
    if tokenizer.vocab_size > config.vocab_size:
        raise LLMCoreError(
            f"{where}: tokenizer has {tokenizer.vocab_size} ids, model only {config.vocab_size}: "
            "they do not belong together"
        )


def load_model_dir(
    path: str | os.PathLike, device: str | torch.device = "cpu", use: str = "this command"
) -> tuple[GPT, Tokenizer]:
    """A language-model folder -> (model in eval mode, tokenizer). Refuses a classifier folder, naming ``use``."""
    folder = open_model_dir(path)
    return folder.load_lm(device, use=use), folder.tokenizer


def load_instruct_model(
    path: str | os.PathLike, device: str | torch.device = "cpu", use: str = "this command"
) -> tuple[GPT, Tokenizer, str]:
    """An instruction-model folder -> (model, tokenizer, its prompt template; ``alpaca`` when none is stored)."""
    folder = open_model_dir(path)
    return folder.load_lm(device, use=use), folder.tokenizer, folder.template or "alpaca"


def save_classifier(
    out_dir: str | os.PathLike,
    model: GPTClassifier,
    tok: Tokenizer,
    labels: Sequence[str],
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write the model folder ``out_dir``: ``model.safetensors`` (base GPT + ``cls_head.*``, format in the
    module docstring) and ``tokenizer.json``. Built in a temporary sibling folder and renamed into place,
    so a failure leaves the previous folder (or none), never half of one. LoRA layers must be merged first.
    """
    if len(labels) != model.head.out_features:
        raise ValueError(f"{len(labels)} labels for a {model.head.out_features}-way head")
    state = model_state(model.gpt)
    if any(".lora_" in k or ".base." in k for k in state):
        raise ValueError("merge the LoRA layers (llmcore.models.lora.merge_lora) before saving")
    for name, tensor in model.head.state_dict().items():
        state[HEAD_PREFIX + name] = tensor.detach().contiguous()
    meta = {
        "format": FORMAT,
        "config": model.cfg.unpadded().to_json(),
        TASK_KEY: "classify",
        "labels": json.dumps(list(labels)),
        "pooling": POOLING,
        **(metadata or {}),
    }
    with staged_dir(out_dir) as tmp:
        write_weights(tmp / WEIGHTS_FILE, state, meta)
        tok.save(tmp / TOKENIZER_FILE)
    return Path(out_dir)


def load_classifier(model_dir: str | os.PathLike, device="cpu") -> tuple[GPTClassifier, Tokenizer, list[str]]:
    """A folder written by ``save_classifier`` -> (model in eval mode, tokenizer, label names)."""
    folder = open_model_dir(model_dir)
    return folder.load_classifier(device), folder.tokenizer, folder.labels
