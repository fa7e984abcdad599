"""The served models: a loaded network with its tokenizer, prompt template, batching engine and listing facts.

Names follow Ollama's model-name rules (``namespace/model:tag``; letters, digits, ``_``, ``-`` and ``.``; each
part starts with a letter, digit or ``_``; at most 80 characters a part), and an untagged name means ``:latest``.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from llmcore.common import LLMCoreError, sha256_file
from llmcore.models.gpt import GPT
from llmcore.serve.engine import ADMIT_WINDOW, Engine
from llmcore.text.chat import CHATML, IM_END, ROLES, chat_token_ids, chatml_text, render_chat
from llmcore.text.prompts import check_template, format_prompt
from llmcore.text.tokenizer import Tokenizer
from llmcore.threads import inference_threads
from llmcore.weights.model_dir import open_model_dir

STREAM_INTERVAL = 0.02  # seconds between a stream's writes at most once its first piece is out (ModelHandle)

_PART = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}"
_NAME = re.compile(rf"(?:{_PART}/)?{_PART}(?::{_PART})?")


class RequestError(Exception):
    """A request the server refuses; each API renders it in its own error shape with this HTTP status.

    ``param`` names the offending field and ``code`` is a machine-readable reason (OpenAI's error object).
    """

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def check_name(name: str, where: str = "--name") -> str:
    """``name`` with Ollama's default tag added, or an error naming the rule it breaks."""
    if not _NAME.fullmatch(name):
        raise LLMCoreError(
            f"{where} {name!r} is not a valid model name: use [namespace/]model[:tag], each part letters, digits, "
            "'_', '-' or '.', starting with a letter, digit or '_', at most 80 characters"
        )
    return qualify(name)


def qualify(name: str) -> str:
    """Add Ollama's default tag: ``instruct`` -> ``instruct:latest``."""
    return name if ":" in name else f"{name}:latest"


def default_name(path: str | Path) -> str:
    """Ollama-style name of a model directory: ``data/models/instruct`` -> ``instruct:latest``."""
    path = Path(path)
    folder = path.parent if path.suffix == ".safetensors" else path
    return check_name(folder.resolve().name, where=f"the folder name of {path} (pick another with --name)")


def served_names(models: Sequence[str | Path], names: Sequence[str] = ()) -> list[str]:
    """The name each of ``models`` is served under: the n-th of ``names`` for the n-th model (``--name`` repeated
    in order), the folder name for the rest; an error when names are left over or two models would share one."""
    if len(names) > len(models):
        raise LLMCoreError(f"{len(names)} --name given for {len(models)} --model")
    served = [check_name(n) for n in names] + [default_name(path) for path in models[len(names) :]]
    if len(set(served)) != len(served):
        raise LLMCoreError(f"two models would share a name: {served}; tell them apart with --name")
    return served


def rfc3339(timestamp: float | None = None) -> str:
    when = datetime.fromtimestamp(time.time() if timestamp is None else timestamp, tz=timezone.utc)
    return when.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _human_count(n: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.1f}{suffix}"
    return str(n)


@dataclass(eq=False)
class ModelHandle:
    """One served model: the network, its tokenizer, how prompts are built, and what the listings say.

    ``template``: ``alpaca`` or a stored format string with ``{instruction}``/``{input}`` (instruction models: the
    reply ends at a new ``###`` section and is stripped), ``chatml`` (a chat model: the whole conversation in its
    own chat format, the reply ends at ``<|im_end|>``), or ``raw`` (the prompt as given; the end-of-text token
    alone ends the reply).
    """

    model: GPT
    tokenizer: Tokenizer
    template: str = "alpaca"
    path: Path | None = None  # the model.safetensors file
    digest: str = ""  # sha256 hex of model.safetensors
    size: int = 0  # bytes of model.safetensors
    modified_at: str = ""  # RFC 3339 mtime of model.safetensors
    quantization: str = "F32"  # dtype of the stored weights, as Ollama names it (F32, BF16, F16)
    max_batch: int = 8  # sequences decoded together (continuous batching slots)
    threads: int | str = "auto"  # CPU threads of the engine (llmcore.threads.inference_threads)
    admit_window: float = ADMIT_WINDOW  # seconds an idle engine waits for requests sent together (0: none)
    # seconds a stream waits after a write before the next: the pieces that came meanwhile go out in one write (0:
    # a write per piece as it comes). A stream's first piece goes out at once; only faster than one piece per
    # interval (a small model on CPU) does it matter, and then each write and wake-up saved is time for the model.
    stream_interval: float = STREAM_INTERVAL
    created: int = field(default_factory=lambda: int(time.time()))
    engine: Engine = field(init=False, repr=False)
    _embed_lock: threading.Lock = field(init=False, repr=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if not 0 <= self.stream_interval <= 1:
            raise ValueError(f"stream_interval is in seconds, from 0 (off) to 1, got {self.stream_interval}")
        if self.template != "raw":
            check_template(self.template, where="--template")
        if self.chat:
            chat_token_ids(self.tokenizer)  # a model without the chat tokens cannot be served as a chat model
        self.model.eval()
        self.engine = Engine(
            self.model,
            self.tokenizer,
            max_batch=self.max_batch,
            threads=inference_threads(self.threads, self.model.cfg),
            admit_window=self.admit_window,
        )

    @classmethod
    def load(
        cls,
        path: str | Path,
        template: str | None = None,
        device: str | torch.device = "cpu",
        max_batch: int = 8,
        threads: int | str = "auto",
        admit_window: float = ADMIT_WINDOW,
        stream_interval: float = STREAM_INTERVAL,
    ) -> ModelHandle:
        """Load a model folder; ``template`` None: the one stored with the model by instruction tuning, else ``raw``
        (a base model never learned a template; its GGUF export says raw too)."""
        folder = open_model_dir(path).require_lm("serve")
        weights = folder.weights
        model = folder.load_lm(device)
        with safe_open(str(weights), framework="pt") as f:
            first = next(iter(f.keys()), None)
            quantization = f.get_slice(first).get_dtype() if first else "F32"
        stat = weights.stat()
        return cls(
            model=model,
            tokenizer=folder.tokenizer,
            template=template or folder.template or "raw",
            path=weights,
            digest=sha256_file(weights),
            size=stat.st_size,
            modified_at=rfc3339(stat.st_mtime),
            quantization=quantization,
            max_batch=max_batch,
            threads=threads,
            admit_window=admit_window,
            stream_interval=stream_interval,
        )

    @property
    def context_length(self) -> int:
        return self.model.cfg.context_length

    @property
    def chat(self) -> bool:
        """A chat model (ChatML turns with reserved tokens, :mod:`llmcore.text.chat`)."""
        return self.template == CHATML

    @property
    def sections(self) -> bool:
        """Instruction templates end the reply at a new ``###`` section and strip it."""
        return self.template not in ("raw", CHATML)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Tokens that end a reply: end-of-text, and a chat model's end of turn."""
        eot = self.tokenizer.eot_id
        return (eot, self.tokenizer.special_tokens[IM_END]) if self.chat else (eot,)

    @property
    def family(self) -> str:
        return "llama" if self.model.cfg.pos_emb == "rope" else "gpt2"

    def details(self) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": "safetensors",
            "family": self.family,
            "families": [self.family],
            "parameter_size": _human_count(self.model.num_params()),
            "quantization_level": self.quantization,
        }

    def encode(self, prompt: str) -> list[int]:
        try:
            return self.tokenizer.encode(prompt, allow_special=False)  # as in training: "<|endoftext|>" is text
        except LLMCoreError as e:
            raise RequestError(400, str(e), param="prompt") from None

    def embed(self, inputs: Sequence[Sequence[int]], batch_tokens: int = 4096) -> torch.Tensor:
        """(N, emb_dim) float32 embeddings of token-id inputs: the final-norm hidden states mean-pooled over each
        input's tokens, L2-normalised (cosine similarity is then a dot product).

        Inputs run in right-padded batches of at most ``batch_tokens`` padded tokens (longest first, so each batch
        pads little); causal attention keeps each row's positions off the padding after it. One batch runs at a
        time per model, beside the engine's decode steps on the same weights."""
        order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i]))
        out = torch.empty(len(inputs), self.model.cfg.emb_dim)
        device = self.model.tok_emb.weight.device
        start = 0
        with self._embed_lock, torch.no_grad():
            while start < len(order):
                width = len(inputs[order[start]])
                rows = order[start : start + max(1, batch_tokens // width)]
                ids = torch.zeros(len(rows), width, dtype=torch.long)
                real = torch.zeros(len(rows), width, dtype=torch.bool)
                for r, i in enumerate(rows):
                    ids[r, : len(inputs[i])] = torch.tensor(inputs[i])
                    real[r, : len(inputs[i])] = True
                hidden = (
                    self.model(ids.to(device), attention_mask=real.to(device), return_logits=False, return_hidden=True)
                    .hidden.float()
                    .cpu()
                )  # (B, T, C)
                pooled = (hidden * real[..., None]).sum(1) / real.sum(1, keepdim=True)  # (B, C)
                out[rows] = torch.nn.functional.normalize(pooled, dim=-1)
                start += len(rows)
        return out

    def chat_prompt(self, messages: Sequence[dict[str, str]]) -> str:
        return chat_prompt(messages, self.template)

    def chat_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """The prompt ids of a conversation: a chat model renders every turn in its chat format (special tokens
        included) and ends with the assistant's header; other models encode :meth:`chat_prompt` as text."""
        if not self.chat:
            return self.encode(self.chat_prompt(messages))
        for i, m in enumerate(messages):
            if m["role"] not in ROLES:
                raise RequestError(
                    400,
                    f"messages[{i}]: role '{m['role']}' is not one of {', '.join(ROLES)}",
                    param=f"messages[{i}].role",
                )
        try:
            return render_chat(self.tokenizer, messages, add_generation_prompt=True).ids
        except LLMCoreError as e:
            raise RequestError(400, str(e), param="messages") from None


def chat_prompt(messages: Sequence[dict[str, str]], template: str) -> str:
    """The prompt text for a conversation.

    ``raw``: the messages' contents joined by blank lines. An instruction template: the last message (which must
    come from the user) is the instruction; system messages and earlier turns become the input text, one
    ``Role: content`` line per message, so the model sees the conversation as context.
    """
    if template == "raw":
        return "\n\n".join(m["content"] for m in messages if m["content"])
    if template == CHATML:  # the text of what chat_ids encodes (its special tokens are tokens, not text)
        return chatml_text(messages, add_generation_prompt=True)
    *history, last = messages
    if last["role"] != "user":
        raise RequestError(400, f"the last message must have role 'user' (got '{last['role']}')", param="messages")
    context = "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in history)
    return format_prompt(template, last["content"], context)
