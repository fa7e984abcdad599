"""llmcore model folders as an lm-evaluation-harness model (``lm_eval.api.model.LM``), registered as ``llmcore``.

EleutherAI's harness asks a model three things; this adapter answers them with llmcore's own model and tokenizer:

    loglikelihood          log p(continuation | context) and whether greedy decoding would produce it
                           (multiple-choice tasks: HellaSwag, ARC, MMLU, PIQA, ...)
    loglikelihood_rolling  log p(text) of a whole document in windows of the context length (perplexity)
    generate_until         greedy or sampled text until a stop string or ``max_gen_toks`` (GSM8K, ...)

    from llmcore.eval.harness import LLMCoreLM, run_tasks
    lm = LLMCoreLM("data/models/pretrain", device="cpu", batch_size=16)
    results = run_tasks(lm, ["hellaswag"], limit=200)           # lm_eval.simple_evaluate underneath
    lm_eval.simple_evaluate(model="llmcore", model_args="pretrained=data/models/pretrain", tasks=[...])

How requests become forward passes (the same token-level conventions as the harness' ``hf`` backend, so the scores
are comparable with published ones):

* tokenization is the model's own: context and continuation are encoded together and split where the context's
  encoding ends (``TemplateLM._encode_pair``); an empty context is replaced by the prefix token (``<|begin_of_text|>``
  for Llama-3 tokenizers, else ``<|endoftext|>``), and Llama-3 encodings start with ``<|begin_of_text|>`` as Meta's
  do. Special-token strings in task text are encoded as special tokens, as Hugging Face tokenizers do.
* a context longer than the model's window loses tokens from the left: the input is the last ``context_length``
  tokens of ``context + continuation`` minus its final token (the count is kept in :attr:`LLMCoreLM.truncated`).
  A continuation longer than the window itself cannot be scored and is a one-line error naming the task.
* identical inputs (the one-token answers of MMLU-style tasks share ``context + continuation[:-1]``) run once.
  Inputs that share a context (the four endings of a HellaSwag item) run it once, left-padded into a KV cache, and
  each ending on top of its rows; the rest are sorted by length and right-padded into batches of ``batch_size``
  rows (no mask needed: a causal model never looks right). Positions count real tokens only, so a score never
  depends on its batch or its padding (``tests/test_harness.py`` holds it to 1e-5 in fp32).
* only continuation positions go through the output head (a vocabulary-wide matmul): a HellaSwag context costs
  the transformer blocks, not the head.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmcore.common import LLMCoreError
from llmcore.device import DTYPES, autocast_context, resolve_device
from llmcore.download import unreachable
from llmcore.models.generate import SamplingConfig, generate_steps
from llmcore.models.gpt import GPT
from llmcore.text.tokenizer import Tokenizer
from llmcore.weights.model_dir import open_model_dir

try:
    import lm_eval
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise LLMCoreError(
        f"lm-evaluation-harness is not installed ({e.name}): pip install -e '.[eval]' (or pip install lm-eval)"
    ) from None

log = logging.getLogger(__name__)

BOS = "<|begin_of_text|>"  # Llama-3's beginning of text: the prefix of every encoding where the tokenizer has it
HEAD_CHUNK = 1024  # positions per output-head matmul (bounds the logits held at once)
Request = tuple[Any, list[int], list[int]]  # (cache key, context ids, continuation ids), TemplateLM's shape


@dataclass(frozen=True)
class Scored:
    """One scored continuation: its summed log-probability and whether greedy decoding would produce it."""

    logprob: float
    greedy: bool


@register_model("llmcore")
class LLMCoreLM(TemplateLM):
    """An llmcore language-model folder as an lm-eval model.

    Args:
        pretrained: a model folder (``model.safetensors`` + ``tokenizer.json``); the name follows the ``hf``
            backend's so ``model_args="pretrained=data/models/pretrain"`` works.
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` | ``mps`` (``hardware.device``).
        precision: ``fp32`` | ``bf16`` | ``fp16`` autocast over fp32 weights (``hardware.precision``).
        batch_size: rows per forward pass (an int; lm-eval may pass it as a string).
        max_length: the scoring window in tokens; default and upper bound: the model's ``context_length``.
        max_gen_toks: new tokens per ``generate_until`` request when the task does not say.
        model: an already loaded ``(GPT, Tokenizer)`` pair instead of ``pretrained`` (tests, benchmarks).
        max_batch_size: accepted for lm-eval's interface and ignored (no automatic batch size).
    """

    def __init__(
        self,
        pretrained: str | os.PathLike | None = None,
        device: str | None = "auto",
        precision: str = "fp32",
        batch_size: int | str | None = 16,
        max_length: int | str | None = None,
        max_gen_toks: int | str = 256,
        model: tuple[GPT, Tokenizer] | None = None,
        max_batch_size: int | None = None,
        **unused: Any,
    ) -> None:
        super().__init__()
        if unused:
            raise LLMCoreError(
                f"llmcore model: unknown model_args {sorted(unused)} (known: pretrained, device, "
                "precision, batch_size, max_length, max_gen_toks)"
            )
        if precision not in DTYPES:
            raise LLMCoreError(f"precision: expected one of {'|'.join(DTYPES)}, got {precision!r}")
        self._device = resolve_device(device or "auto")
        self.precision = precision
        if model is not None:
            self.model, self.tokenizer_ = model
            self.name = "model"
            self.model.to(self._device).eval()
        elif pretrained is not None:
            folder = open_model_dir(pretrained)
            self.model, self.tokenizer_ = folder.load_lm(self._device, use="benchmarking"), folder.tokenizer
            self.name = folder.path.name
        else:
            raise LLMCoreError("llmcore model: pass pretrained=MODEL_DIR")
        self.batch_size = _positive_int(16 if batch_size is None else batch_size, "batch_size")
        ctx = self.model.cfg.context_length
        self._max_length = min(ctx, _positive_int(max_length, "max_length")) if max_length is not None else ctx
        self._max_gen_toks = _positive_int(max_gen_toks, "max_gen_toks")
        self.bos_id = self.tokenizer_.special_tokens.get(BOS)
        self.truncated = 0  # loglikelihood inputs that lost context tokens on the left
        self.forward_rows = 0  # rows actually run (after merging identical inputs), for benchmarks
        self._tasks: list[str | None] | None = None  # task of each loglikelihood request, for error messages

    # -- what lm-eval reads --------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer_.eot_id

    @property
    def prefix_token_id(self) -> int:
        return self.bos_id if self.bos_id is not None else self.tokenizer_.eot_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer_.name

    def get_model_info(self) -> dict[str, Any]:
        cfg = self.model.cfg
        return {
            "model_num_parameters": self.model.num_params(),
            "model_dtype": self.precision,
            "model_name": self.name,
            "context_length": cfg.context_length,
        }

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        ids = self.tokenizer_.encode(string, allow_special=True)
        if self.bos_id is not None and add_special_tokens is not False and ids[:1] != [self.bos_id]:
            ids = [self.bos_id, *ids]
        return ids

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer_.decode(list(ids))

    # -- loglikelihood -------------------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        self._tasks = [getattr(r, "task_name", None) for r in requests]
        try:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        finally:
            self._tasks = None

    def _loglikelihood_tokens(self, requests: list[Request], **kwargs: Any) -> list[tuple[float, bool]]:
        scored = self.score([(ctx, cont) for _, ctx, cont in requests])
        return [(s.logprob, s.greedy) for s in scored]

    @torch.no_grad()
    def score(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[Scored]:
        """Score ``(context ids, continuation ids)`` pairs: the core of both loglikelihood requests.

        Each input (``context + continuation[:-1]``, cut to the window from the left) runs once however many pairs
        share it. Inputs that share their context with others (the endings of one HellaSwag item) run the context
        once and each ending on top of its KV cache; the rest run whole, sorted longest first (the first batch is
        the biggest, so a memory error shows at once) and right-padded.
        """
        window = self._max_length
        inputs: dict[tuple[int, ...], list[int]] = {}  # input ids -> indices of the pairs that share it
        for i, (ctx, cont) in enumerate(pairs):
            if not cont:
                raise LLMCoreError(f"{self._where(i)}: empty continuation (nothing to score)")
            if not ctx:
                raise LLMCoreError(f"{self._where(i)}: empty context (lm-eval gives the prefix token)")
            if len(cont) > window:
                raise LLMCoreError(
                    f"{self._where(i)}: the continuation has {len(cont)} tokens but the model sees {window} "
                    "at most; this task needs a model with a longer context_length"
                )
            whole = [*ctx, *cont]
            if len(whole) > window + 1:
                self.truncated += 1
            inputs.setdefault(tuple(whole[-(window + 1) : -1]), []).append(i)

        # The context of an input: everything before its first scored position, plus that position's token.
        groups: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
        for inp, owners in inputs.items():
            longest = max(len(pairs[i][1]) for i in owners)
            groups.setdefault(inp[: len(inp) - longest + 1], []).append(inp)
        shared = {ctx: members for ctx, members in groups.items() if len(members) > 1}
        alone = sorted((m[0] for ctx, m in groups.items() if ctx not in shared), key=len, reverse=True)

        results: list[Scored | None] = [None] * len(pairs)
        for start in range(0, len(alone), self.batch_size):
            self._score_whole(alone[start : start + self.batch_size], inputs, pairs, results)
        for batch in self._shared_batches(shared):
            self._score_shared(batch, shared, inputs, pairs, results)
        return results  # type: ignore[return-value]

    def _score_whole(self, batch, inputs, pairs, results) -> None:
        """Run whole inputs, right-padded (no mask needed: a causal model never looks right)."""
        device = self._device
        idx = torch.zeros((len(batch), len(batch[0])), dtype=torch.long)
        for row, inp in enumerate(batch):
            idx[row, : len(inp)] = torch.tensor(inp)
        with autocast_context(device, self.precision):
            hidden = self.model(idx.to(device), return_hidden=True, return_logits=False).hidden
        self.forward_rows += len(batch)
        # (row, position) of every continuation token of every pair; pairs sharing an input are gathered separately.
        rows, positions, targets, owners = [], [], [], []
        for row, inp in enumerate(batch):
            for i in inputs[inp]:
                cont = pairs[i][1]
                rows += [row] * len(cont)
                positions += range(len(inp) - len(cont), len(inp))
                targets += cont
                owners += [i] * len(cont)
        h = hidden[torch.tensor(rows, device=device), torch.tensor(positions, device=device)]  # (N, emb)
        self._finish(h, targets, owners, results)

    def _shared_batches(self, shared: dict[tuple[int, ...], list[tuple[int, ...]]]):
        """Contexts (longest first) in batches of at most ``batch_size`` continuation rows (a bigger group alone),
        whose longest context plus longest continuation fits the window (the cache holds both)."""
        batch: list[tuple[int, ...]] = []
        rows = ctx_width = suffix_width = 0
        for ctx in sorted(shared, key=len, reverse=True):
            members = shared[ctx]
            width = max(len(m) for m in members) - len(ctx)
            if batch and (
                rows + len(members) > self.batch_size
                or max(ctx_width, len(ctx)) + max(suffix_width, width) > self._max_length
            ):
                yield batch
                batch, rows, ctx_width, suffix_width = [], 0, 0, 0
            batch.append(ctx)
            rows, ctx_width, suffix_width = rows + len(members), max(ctx_width, len(ctx)), max(suffix_width, width)
        if batch:
            yield batch

    def _score_shared(self, contexts, shared, inputs, pairs, results) -> None:
        """Run each context once (left-padded, masked, into a KV cache), then every input's remaining tokens on top
        of its context's cache rows (right-padded). Positions count real tokens only, so padding changes nothing."""
        device = self._device
        ctx_width = len(contexts[0])
        ctx_idx = torch.zeros((len(contexts), ctx_width), dtype=torch.long)
        ctx_mask = torch.zeros((len(contexts), ctx_width), dtype=torch.long)
        for row, ctx in enumerate(contexts):
            ctx_idx[row, ctx_width - len(ctx) :] = torch.tensor(ctx)
            ctx_mask[row, ctx_width - len(ctx) :] = 1
        members = [(g, inp) for g, ctx in enumerate(contexts) for inp in shared[ctx]]
        suffixes = [inp[len(contexts[g]) :] for g, inp in members]
        suffix_width = max(len(x) for x in suffixes)
        cache = self.model.new_cache(len(contexts), ctx_width + suffix_width)
        ctx_mask = ctx_mask.to(device)
        with autocast_context(device, self.precision):
            out = self.model(
                ctx_idx.to(device), attention_mask=ctx_mask, cache=cache, return_hidden=True, return_logits=False
            )
        owner_ctx = torch.tensor([g for g, _ in members], device=device)
        last = out.hidden[:, -1][owner_ctx][:, None]  # (R, 1, emb): the hidden state of each context's last token
        if suffix_width:
            rows = self.model.new_cache(len(members), ctx_width + suffix_width, dtype=cache.k[0].dtype)
            for layer in range(len(cache.k)):
                rows.k[layer][:, :, :ctx_width] = cache.k[layer][owner_ctx, :, :ctx_width]
                rows.v[layer][:, :, :ctx_width] = cache.v[layer][owner_ctx, :, :ctx_width]
            rows.pos = ctx_width
            idx = torch.zeros((len(members), suffix_width), dtype=torch.long)
            mask = torch.zeros((len(members), suffix_width), dtype=torch.long)
            for row, suffix in enumerate(suffixes):
                idx[row, : len(suffix)] = torch.tensor(suffix, dtype=torch.long)
                mask[row, : len(suffix)] = 1
            mask = torch.cat([ctx_mask[owner_ctx], mask.to(device)], dim=1)
            with autocast_context(device, self.precision):
                tail = self.model(
                    idx.to(device), attention_mask=mask, cache=rows, return_hidden=True, return_logits=False
                ).hidden
            last = torch.cat([last, tail], dim=1)  # (R, 1 + suffix_width, emb): position 0 = the context's last
        self.forward_rows += len(members)
        rows_, positions, targets, owners = [], [], [], []
        for row, (g, inp) in enumerate(members):
            first = len(contexts[g]) - 1  # position in inp of the context's last token: column 0 of `last`
            for i in inputs[inp]:
                cont = pairs[i][1]
                rows_ += [row] * len(cont)
                positions += range(len(inp) - len(cont) - first, len(inp) - first)
                targets += cont
                owners += [i] * len(cont)
        h = last[torch.tensor(rows_, device=device), torch.tensor(positions, device=device)]
        self._finish(h, targets, owners, results)

    def _finish(self, h: torch.Tensor, targets: list[int], owners: list[int], results: list) -> None:
        """Sum the continuation tokens' log-probs per pair and record whether each pair was greedy."""
        token_lp, missed = self._head_scores(h, torch.tensor(targets, device=self._device))
        local = {i: k for k, i in enumerate(dict.fromkeys(owners))}  # pair index -> slot here
        owner = torch.tensor([local[i] for i in owners])
        sums = torch.zeros(len(local), dtype=torch.float64).index_add_(0, owner, token_lp).tolist()
        misses = torch.zeros(len(local), dtype=torch.long).index_add_(0, owner, missed).tolist()
        for i, k in local.items():
            results[i] = Scored(sums[k], misses[k] == 0)

    def _head_scores(self, h: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probability of each target token and whether it missed the argmax, from final hidden states (N, emb).

        The head runs on ``HEAD_CHUNK`` positions at a time, so rolling windows of a 1024-token model with a 50k
        vocabulary never hold more than one chunk of logits. Returns CPU tensors: fp64 log-probs, 0/1 misses.
        """
        lps, misses = [], []
        for start in range(0, h.shape[0], HEAD_CHUNK):
            with autocast_context(self._device, self.precision):
                logits = self.model.head(h[start : start + HEAD_CHUNK]).float()
            t = target[start : start + HEAD_CHUNK]
            lps.append((logits.gather(-1, t[:, None]).squeeze(-1) - logits.logsumexp(-1)).cpu().double())
            misses.append((logits.argmax(-1) != t).cpu().long())
        return torch.cat(lps), torch.cat(misses)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihoods: windows of ``max_length`` tokens, each token predicted once.

        The first window starts from the prefix token; each later one predicts the next ``max_length`` tokens and,
        for the last, partial window, looks back as far as the window allows (``lm_eval.utils``'s windows, so the
        figures match other backends'). Documents are encoded without a leading ``<|begin_of_text|>``: the prefix
        token is the one beginning.
        """
        pairs, owners = [], []
        for n, request in enumerate(requests):
            (text,) = request.args
            ids = self.tok_encode(text, add_special_tokens=False)
            for ctx, cont in map(
                make_disjoint_window,
                get_rolling_token_windows(ids, self.prefix_token_id, self._max_length, context_len=1),
            ):
                pairs.append((ctx, cont))
                owners.append(n)
        totals = [0.0] * len(requests)
        for owner, s in zip(owners, self.score(pairs), strict=True):
            totals[owner] += s.logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # -- generation ----------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Decode each request until a stop string, ``<|endoftext|>`` or ``max_gen_toks`` new tokens.

        Requests are grouped by their generation kwargs, sorted by prompt length and decoded in batches (KV cache,
        left padding; each row decodes as it would alone). A finished row stops counting; the batch stops when all
        rows are finished. The text is cut before the first stop string.
        """
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
        eos = self.tokenizer_.decode([self.eot_token_id])
        for key, members in groups.items():
            kwargs = normalize_gen_kwargs(json.loads(key), self._max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = kwargs.pop("max_gen_toks")
            room = self._max_length - max_new
            if room < 1:
                task = requests[members[0]].task_name
                raise LLMCoreError(
                    f"task {task}: asks for {max_new} new tokens but the model's context is {self._max_length} "
                    "tokens; it needs a longer context_length (or a smaller max_gen_toks)"
                )
            cfg = SamplingConfig(
                max_new_tokens=max_new,
                temperature=float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0,
                top_k=kwargs.get("top_k"),
                top_p=kwargs.get("top_p"),
                stop_ids=(self.eot_token_id,),
                seed=kwargs.get("seed", 1234),
            )
            prompts = {i: self.tok_encode(requests[i].args[0])[-room:] or [self.prefix_token_id] for i in members}
            order = sorted(members, key=lambda i: len(prompts[i]), reverse=True)
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                texts = self._generate([prompts[i] for i in batch], cfg, until)
                for i, text in zip(batch, texts, strict=True):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out  # type: ignore[return-value]

    def _generate(self, prompts: list[list[int]], cfg: SamplingConfig, until: list[str]) -> list[str]:
        new: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        stops = [s for s in until if s]
        with autocast_context(self._device, self.precision):
            for tokens, alive in generate_steps(self.model, prompts, cfg):
                for row, (tok, ok) in enumerate(zip(tokens.tolist(), alive.tolist(), strict=True)):
                    if done[row]:
                        continue
                    if not ok:  # <|endoftext|>
                        done[row] = True
                        continue
                    new[row].append(tok)
                    if stops and any(s in self.tokenizer_.decode(new[row]) for s in stops):
                        done[row] = True
                if all(done):
                    break
        texts = []
        for ids in new:
            text = self.tokenizer_.decode(ids)
            for s in stops:
                text = text.split(s)[0]
            texts.append(text)
        return texts

    def _where(self, i: int) -> str:
        task = self._tasks[i] if self._tasks is not None and i < len(self._tasks) else None
        return f"task {task}" if task else "request"


def _positive_int(value: int | str, name: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or (isinstance(value, float) and value != n):
        raise LLMCoreError(f"{name}: expected a positive int, got {value!r}")
    return n


# ---------------------------------------------------------------------------------------------------
# Running tasks
# ---------------------------------------------------------------------------------------------------


def is_task_file(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml"))


def task_manager(tasks: Sequence[str], include_path: str | os.PathLike | None = None, include_defaults=None):
    """lm-eval's task index: the built-in tasks (indexing them takes ~20 s) unless every task is a YAML file,
    plus the YAML tasks under ``include_path``. Unknown names are a one-line error with close matches."""
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise LLMCoreError("tasks: none given (e.g. hellaswag,arc_easy, or a task YAML file)")
    if include_defaults is None:
        include_defaults = not all(is_task_file(t) for t in tasks)
    if include_path is not None and not Path(include_path).is_dir():
        raise LLMCoreError(f"{include_path}: no such folder of task YAML files")
    manager = TaskManager(include_path=str(include_path) if include_path else None, include_defaults=include_defaults)
    for spec in tasks:
        if is_task_file(spec):
            if not Path(spec).is_file():
                raise LLMCoreError(f"{spec}: no such task file")
        elif spec not in manager.all_tasks:
            import difflib

            close = difflib.get_close_matches(spec, manager.all_tasks, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else " (lm-eval ls tasks lists them)"
            raise LLMCoreError(f"unknown task {spec!r}: not an lm-eval task, group or tag{hint}")
    return manager


LOCAL_LOADERS = {"json", "csv", "parquet", "text", "arrow", "pandas"}  # datasets' builders over local files


def hub_tasks(tasks: Sequence[str], manager, include_path: str | os.PathLike | None = None) -> list[str]:
    """The tasks whose dataset comes from the Hugging Face Hub: lm-eval's built-in tasks and groups, and task YAML
    files whose ``dataset_path`` is neither a local loader (json, csv, parquet, ...) nor a local folder."""
    own = Path(include_path).resolve() if include_path else None
    out = []
    for spec in tasks:
        entry = None if is_task_file(spec) else manager.task_index.get(spec)
        path = Path(spec) if is_task_file(spec) else getattr(entry, "yaml_path", None)
        if path is not None and (is_task_file(spec) or (own is not None and own in Path(path).resolve().parents)):
            found = re.search(r"^dataset_path:\s*['\"]?([^'\"\s#]+)", Path(path).read_text(encoding="utf-8"), re.M)
            if found is None or found.group(1) in LOCAL_LOADERS or Path(found.group(1)).exists():
                continue
        out.append(spec)
    return out


def check_hub(tasks: Sequence[str]) -> None:
    """Fail in one line, at once, when these tasks need the Hub and it cannot be reached: the datasets library would
    otherwise retry for a minute before saying so. ``HF_DATASETS_OFFLINE=1`` (or ``HF_HUB_OFFLINE=1``) skips the
    check and reads datasets already in the local cache."""
    if not tasks or any(
        os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    ):
        return
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    why = unreachable(endpoint)
    if why is not None:
        raise LLMCoreError(
            f"tasks {','.join(tasks)}: their datasets come from the Hugging Face Hub, and {endpoint} is unreachable "
            f"({why}): go online, set HF_DATASETS_OFFLINE=1 to use datasets already in the local cache, or use a "
            "task YAML over local files"
        )


def run_tasks(
    lm: LLMCoreLM,
    tasks: Sequence[str],
    *,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    include_path: str | os.PathLike | None = None,
    include_defaults: bool | None = None,
    seed: int = 1234,
    bootstrap_iters: int = 1000,
    manager=None,
) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` on ``lm``; returns its results dict (``results``, ``n-samples``, ``configs``...).

    Task loading errors (a dataset that cannot be downloaded offline, a malformed YAML) become one line.
    ``manager`` is a :func:`task_manager` already built for ``tasks`` (building one indexes lm-eval's tasks).
    """
    manager = manager or task_manager(tasks, include_path, include_defaults)
    try:
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks),
            limit=limit,
            num_fewshot=num_fewshot,
            task_manager=manager,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
            bootstrap_iters=bootstrap_iters,
            log_samples=False,
        )
    except LLMCoreError:
        raise
    except Exception as e:  # lm-eval and datasets raise many kinds; the first line says what happened
        first = (str(e).strip().splitlines() or [""])[0][:300]
        offline = isinstance(e, ConnectionError) or "Connection" in type(e).__name__ or "Offline" in type(e).__name__
        hint = " (the task's dataset comes from the Hugging Face Hub: go online, or use a task YAML over local files)"
        raise LLMCoreError(f"tasks {','.join(tasks)}: {type(e).__name__}: {first}{hint if offline else ''}") from e
    return results


def task_metrics(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """lm-eval's ``results`` -> ``{task: {metric: value, ..., "samples": n}}`` with plain metric names.

    lm-eval keys metrics as ``"acc,none"`` / ``"acc_stderr,none"``; the ``none`` filter is dropped and other
    filters are appended (``exact_match_strict-match``). Values that are not numbers ("N/A" stderrs) are left out.
    """
    out: dict[str, dict[str, Any]] = {}
    samples = results.get("n-samples", {})
    for task, metrics in results.get("results", {}).items():
        row: dict[str, Any] = {}
        for key, value in metrics.items():
            if "," not in key or not isinstance(value, int | float) or isinstance(value, bool):
                continue
            metric, filt = key.split(",", 1)
            name = metric if filt == "none" else f"{metric}_{filt}"
            row[name] = round(float(value), 6)
        if task in samples:
            row["samples"] = int(samples[task].get("effective", 0))
        out[task] = row
    return out


def benchmark(
    model_dir: str | os.PathLike,
    tasks: Sequence[str],
    *,
    device: str = "auto",
    precision: str = "fp32",
    batch_size: int = 16,
    limit: int | None = None,
    num_fewshot: int | None = None,
    include_path: str | os.PathLike | None = None,
    seed: int = 1234,
) -> dict[str, Any]:
    """Score one model folder on ``tasks``: the metrics the stage and ``llmcore benchmark`` write."""
    start = time.perf_counter()
    manager = task_manager(tasks, include_path)  # a bad task name fails before the model loads
    check_hub(hub_tasks(tasks, manager, include_path))  # offline: one line now, not after a minute of retries
    lm = LLMCoreLM(model_dir, device=device, precision=precision, batch_size=batch_size)
    results = run_tasks(lm, tasks, limit=limit, num_fewshot=num_fewshot, seed=seed, manager=manager)
    return {
        "model": Path(model_dir).name,
        "params": lm.model.num_params(),
        "context_length": lm.model.cfg.context_length,
        "lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
        "limit": limit,
        "num_fewshot": num_fewshot,
        "truncated_requests": lm.truncated,
        "seconds": round(time.perf_counter() - start, 2),
        "tasks": task_metrics(results),
    }
