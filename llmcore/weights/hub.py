"""Pretrained weights in the Hugging Face layout: the known GPT-2 checkpoints, fetching them, model folders.

A checkpoint on the Hub is a repository at a revision holding ``config.json`` + ``model.safetensors``;
:func:`fetch_hf_checkpoint` downloads both through :func:`llmcore.download.download` (so ``LLMCORE_MIRROR``
applies: ``https://huggingface.co/REPO/resolve/REV/FILE`` is read from ``$LLMCORE_MIRROR/huggingface.co/...``),
checks the pinned digests and that the weights file is complete, and never unpickles anything.

Every stage that produces a model writes a *model folder*, ``model.safetensors`` (llmcore checkpoint, config
inside) + ``tokenizer.json`` side by side; :func:`save_model_dir` writes one atomically and
:func:`load_model_dir` reads it back (the fine-tune stages load their ``base_model`` with it)::

    ckpt = KNOWN_CHECKPOINTS["gpt2-124m"]
    files = fetch_hf_checkpoint(ckpt, Path("data/hub") / ckpt.repo / ckpt.revision)
    model = llmcore.hf.load_hf(files.directory)
    save_model_dir("data/models/gpt2-124m", model, tokenizer)
    model, tokenizer = load_model_dir("data/models/gpt2-124m")

Llama-3 checkpoints ship their tokenizer as ``tokenizer.model`` in tiktoken's format (one ``base64-token rank``
per line); :func:`llama3_tokenizer` reads it with Meta's split pattern and special tokens (reference:
meta-llama/llama-models ``models/llama3/tokenizer.py``).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from llmcore.bpe import ENDOFTEXT
from llmcore.checkpoint import load_checkpoint, save_checkpoint
from llmcore.common import LLMCoreError
from llmcore.download import download, file_sha256
from llmcore.model import GPT
from llmcore.tokenizer import Tokenizer

HF_BASE = "https://huggingface.co"


@dataclass(frozen=True)
class HFCheckpoint:
    repo: str  # Hub repository, e.g. "openai-community/gpt2"
    revision: str  # a commit hash (pinned) or a branch name such as "main" (moves: not reproducible)
    sha256: str | None = None  # of model.safetensors; None = only the completeness check
    config_sha256: str | None = None  # of config.json
    preset: str | None = None  # llmcore preset whose shape config.json must match

    def url(self, filename: str) -> str:
        return f"{HF_BASE}/{self.repo}/resolve/{self.revision}/{filename}"


# OpenAI's GPT-2 in the HF layout. Revisions and digests as published on the Hub (each model digest agrees across
# several independent public pins; the 124M one is also in ../shared/README.md). model.safetensors sizes: 124M
# 548,105,171 B; 355M 1,519,984,962 B; 774M ~3.25 GB; 1558M ~6.43 GB (fp32, plus each layer's 1024x1024 causal
# mask buffer, which the converter drops).
KNOWN_CHECKPOINTS: dict[str, HFCheckpoint] = {
    "gpt2-124m": HFCheckpoint(
        "openai-community/gpt2", "607a30d783dfa663caf39e06633721c8d4cfcd7e",
        sha256="248dfc3911869ec493c76e65bf2fcf7f615828b0254c12b473182f0f81d3a707",
        config_sha256="0daed7749b4f02b8f76240d5444551d7b08712dab4d0adb8239c56ba823bb7b4", preset="gpt2-124m",
    ),
    "gpt2-355m": HFCheckpoint(
        "openai-community/gpt2-medium", "6dcaa7a952f72f9298047fd5137cd6e4f05f41da",
        sha256="fc5a354a19255ad494f3d71549390baca1ccf61d1d822b9408971705c687c9cd",
        config_sha256="ef1a44d889ad1a0acc7731c78134f1b87d2d222f110e97dd10fd4117331caf22", preset="gpt2-355m",
    ),
    "gpt2-774m": HFCheckpoint(
        "openai-community/gpt2-large", "32b71b12589c2f8d625668d2335a01cac3249519",
        sha256="5f47f3e12f91cd33b662ce7e433b6150ad5512b5884a2cee961b50e9c3bbebce",
        config_sha256=None,  # only one public pin found; the config is checked against the preset instead
        preset="gpt2-774m",
    ),
    "gpt2-1558m": HFCheckpoint(
        "openai-community/gpt2-xl", "15ea56dee5df4983c59b2538573817e1667135e2",
        sha256="0f8b28eb05a8075f48b61b6f35332978c74fc7763fa9fb4051a1c30511736a6a",
        config_sha256="be48115d52314bc27327e160bf10197760db02ea689d10adb24db4102edf7a8a", preset="gpt2-1558m",
    ),
}  # fmt: skip


@dataclass
class FetchedCheckpoint:
    directory: Path  # holds config.json and model.safetensors
    sha256: str  # actual digest of model.safetensors
    bytes: int  # size of the files fetched (or found already verified)


def fetch_hf_checkpoint(ckpt: HFCheckpoint, dest: str | os.PathLike) -> FetchedCheckpoint:
    """Download ``config.json`` and ``model.safetensors`` of ``ckpt`` into ``dest`` and verify them.

    Files already in ``dest`` that match their pinned digests are not fetched again. A weights file whose
    safetensors header does not fit its size (a truncated or corrupt body) is deleted and refused, so a
    rerun fetches it afresh instead of trusting it.

    Raises:
        LLMCoreError: a download failure, a digest mismatch (``dest`` keeps no bad file) or a truncated file.
    """
    dest = Path(dest)
    config = download(ckpt.url("config.json"), dest / "config.json", sha256=ckpt.config_sha256)
    weights = download(ckpt.url("model.safetensors"), dest / "model.safetensors", sha256=ckpt.sha256)
    try:
        check_safetensors(weights, source=ckpt.url("model.safetensors"))
    except LLMCoreError:
        weights.unlink(missing_ok=True)
        raise
    digest = ckpt.sha256 or file_sha256(weights)
    return FetchedCheckpoint(dest, digest, config.stat().st_size + weights.stat().st_size)


def check_safetensors(path: Path, source: str | None = None) -> None:
    """Open the header of a safetensors file; safetensors itself rejects a body shorter than the header says."""
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError) as e:
        where = f"{path} (from {source})" if source else str(path)
        raise LLMCoreError(f"{where}: not a complete safetensors file (truncated or corrupt?): {e}") from None


# ---------------------------------------------------------------------------------------------------
# Llama-3 tokenizer (tiktoken format)
# ---------------------------------------------------------------------------------------------------

# Meta's pre-tokenizer: case-insensitive contractions, digits in groups of at most three.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
LLAMA3_NUM_SPECIAL = 256  # ids len(ranks) .. len(ranks) + 255
# Llama 3.1+ names for the first special ids; the rest are <|reserved_special_token_{2 + i}|>.
LLAMA3_SPECIAL = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
    "<|eot_id|>", "<|python_tag|>",
]  # fmt: skip


def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Parse a tiktoken BPE file (``<base64 token> <rank>`` per line) into mergeable ranks."""
    path = Path(path)
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise LLMCoreError(f"cannot read {path}: {e.strerror or e}") from None
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except (ValueError, binascii.Error):
            raise LLMCoreError(
                f"{path}: line {n} is not '<base64 token> <rank>' (a tiktoken BPE file is required; "
                "sentencepiece models such as Llama 2's are not supported)"
            ) from None
        if token in ranks:
            raise LLMCoreError(f"{path}: line {n}: duplicate token")
        ranks[token] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise LLMCoreError(f"{path}: ranks are not exactly 0..{len(ranks) - 1}")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise LLMCoreError(f"{path}: lacks {len(missing)} single-byte tokens (first: byte {missing[0]})")
    return ranks


def llama3_tokenizer(path: str | os.PathLike, name: str = "llama3") -> Tokenizer:
    """A ``"bpe"`` Tokenizer from a Llama-3 ``tokenizer.model`` (tiktoken format), with Meta's 256 specials.

    llmcore's Tokenizer requires an ``<|endoftext|>`` special token and takes the end-of-text id from it, so
    Llama's ``<|end_of_text|>`` (id ``len(ranks) + 1``, the base models' document separator) is stored under
    that name. Ids and encodings of ordinary text are Meta's; only that one special token's string differs.
    """
    # TODO: the string "<|end_of_text|>" encodes as plain text and id len(ranks)+1 decodes to "<|endoftext|>";
    # fixed once Tokenizer can name its end-of-text token (e.g. an `eot_token` argument saved in the file).
    ranks = read_tiktoken_ranks(path)
    names = [*LLAMA3_SPECIAL, *(f"<|reserved_special_token_{2 + i}|>" for i in range(245))]
    names[1] = ENDOFTEXT
    specials = {s: len(ranks) + i for i, s in enumerate(names)}
    return Tokenizer("bpe", name, specials, ranks=ranks, pattern=LLAMA3_PATTERN)


# ---------------------------------------------------------------------------------------------------
# Model folders: model.safetensors + tokenizer.json
# ---------------------------------------------------------------------------------------------------


def save_model_dir(
    dest: str | os.PathLike, model: GPT, tokenizer: Tokenizer, metadata: dict[str, str] | None = None
) -> Path:
    """Write a model folder atomically: both files go to a temporary sibling folder renamed onto ``dest``.

    A failure leaves ``dest`` as it was (or absent), never a folder with only one of the two files.
    """
    dest = Path(dest)
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise LLMCoreError(f"{dest}: tokenizer has {tokenizer.vocab_size} ids, model only {model.cfg.vocab_size}")
    with staged_dir(dest) as tmp:
        save_checkpoint(tmp / "model.safetensors", model, metadata)
        tokenizer.save(tmp / "tokenizer.json")
    return dest


@contextlib.contextmanager
def staged_dir(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder of ``dest``; on success it replaces ``dest``, on error it is removed."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the folder is meant to be shared like any output
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
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
    os.replace(dest, old / dest.name)
    try:
        os.replace(src, dest)
    except BaseException:
        os.replace(old / dest.name, dest)  # put the previous folder back
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def load_model_dir(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer]:
    """Load a model folder (``model.safetensors`` + ``tokenizer.json``) -> (model in eval mode, tokenizer).

    Args:
        path: e.g. ``data/models/pretrain`` or ``data/models/gpt2-124m`` (``data/models/${base_model}``).
        device: where the weights go.

    Raises:
        LLMCoreError: naming the folder when it or one of its files is missing, or when they do not fit.
    """
    path = Path(path)
    hint = "did the stage that writes it run? for GPT-2 weights add the size to import.models"
    if not path.is_dir():
        raise LLMCoreError(f"{path}: no such model folder ({hint})")
    for name in ("model.safetensors", "tokenizer.json"):
        if not (path / name).is_file():
            raise LLMCoreError(f"{path}: no {name} ({hint})")
    model = load_checkpoint(path / "model.safetensors", device=device)
    tokenizer = Tokenizer.load(path / "tokenizer.json")
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise LLMCoreError(f"{path}: tokenizer has {tokenizer.vocab_size} ids, model only {model.cfg.vocab_size}")
    return model, tokenizer
