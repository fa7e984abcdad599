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
    model = llmcore.weights.hf_convert.load_hf(files.directory)
    save_model_dir("data/models/gpt2-124m", model, tokenizer)
    model, tokenizer = load_model_dir("data/models/gpt2-124m")

Llama-3 checkpoints ship their tokenizer as ``tokenizer.model`` in tiktoken's format (one ``base64-token rank``
per line); :func:`llama3_tokenizer` reads it with Meta's split pattern and special tokens (reference:
meta-llama/llama-models ``models/llama3/tokenizer.py``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open

from llmcore.common import LLMCoreError, sha256_file
from llmcore.download import download

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
        "openai-community/gpt2",
        "607a30d783dfa663caf39e06633721c8d4cfcd7e",
        sha256="248dfc3911869ec493c76e65bf2fcf7f615828b0254c12b473182f0f81d3a707",
        config_sha256="0daed7749b4f02b8f76240d5444551d7b08712dab4d0adb8239c56ba823bb7b4",
        preset="gpt2-124m",
    ),
    "gpt2-355m": HFCheckpoint(
        "openai-community/gpt2-medium",
        "6dcaa7a952f72f9298047fd5137cd6e4f05f41da",
        sha256="fc5a354a19255ad494f3d71549390baca1ccf61d1d822b9408971705c687c9cd",
        config_sha256="ef1a44d889ad1a0acc7731c78134f1b87d2d222f110e97dd10fd4117331caf22",
        preset="gpt2-355m",
    ),
    "gpt2-774m": HFCheckpoint(
        "openai-community/gpt2-large",
        "32b71b12589c2f8d625668d2335a01cac3249519",
        sha256="5f47f3e12f91cd33b662ce7e433b6150ad5512b5884a2cee961b50e9c3bbebce",
        config_sha256=None,  # only one public pin found; the config is checked against the preset instead
        preset="gpt2-774m",
    ),
    "gpt2-1558m": HFCheckpoint(
        "openai-community/gpt2-xl",
        "15ea56dee5df4983c59b2538573817e1667135e2",
        sha256="0f8b28eb05a8075f48b61b6f35332978c74fc7763fa9fb4051a1c30511736a6a",
        config_sha256="be48115d52314bc27327e160bf10197760db02ea689d10adb24db4102edf7a8a",
        preset="gpt2-1558m",
    ),
}


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
    digest = ckpt.sha256 or sha256_file(weights)
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

LLAMA3_NUM_SPECIAL = 256  # ids len(ranks) .. len(ranks) + 255


# ---------------------------------------------------------------------------------------------------
# Model folders: model.safetensors + tokenizer.json
# ---------------------------------------------------------------------------------------------------
