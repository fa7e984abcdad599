"""Stage `import`: pretrained GPT-2 (or Llama-3) weights in the Hugging Face layout -> an llmcore model folder.

One DVC stage per entry of ``import.models`` (``foreach``); the default ``[]`` keeps the pipeline offline.

    python -m stages.import_weights --name gpt2-124m --params params.yaml --raw-dir data/raw \
        --cache-dir data/hub --out data/models/gpt2-124m --reports reports/import/gpt2-124m   # download, convert
    python -m stages.import_weights --name llama --from-dir ~/Llama-3.2-1B ...   # a local HF folder, no download

The paths are required options: dvc.yaml's ``import`` command passes them (``import@<name>``, as above).

Sources: the pinned table ``llmcore.weights.hub.KNOWN_CHECKPOINTS`` (gpt2-124m/355m/774m/1558m), which
``import.sources.<name>`` can override or extend (``repo``/``revision``/``sha256``/``config_sha256``/``preset``,
or ``dir`` for a local folder). Downloads go through ``llmcore.download`` (``LLMCORE_MIRROR`` honoured) into
``data/hub/<repo>/<revision>/`` and are reused while their digests match.

Outputs, all written atomically (a digest mismatch or a truncated file leaves no model folder behind):

    data/models/<name>/model.safetensors   llmcore checkpoint (fp32, config inside)
    data/models/<name>/tokenizer.json      GPT-2's BPE (data/raw/gpt2-bpe), or Llama-3's tokenizer.model
    reports/import/<name>/metrics.json     parameters, source digest, download bytes, and the loss, perplexity
                                           and bits per byte on the tail ``val_fraction`` of ``data/raw/<corpus>``
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
import typer

from llmcore.common import LLMCoreError, print0, sha256_file, stage_errors, write_stage_reports
from llmcore.data.datasets import check_text_corpus, find_single_file
from llmcore.device import resolve_device
from llmcore.download import resolve_url, safe_path
from llmcore.models.config import ModelConfig
from llmcore.models.gpt import GPT
from llmcore.params import NOT_A_DEP, load_section
from llmcore.text.llama3 import llama3_tokenizer
from llmcore.text.tokenizer import Tokenizer
from llmcore.weights.hf_convert import family, load_hf
from llmcore.weights.hub import KNOWN_CHECKPOINTS, HFCheckpoint, fetch_hf_checkpoint
from llmcore.weights.model_dir import save_model_dir


@dataclass
class Source:
    repo: str | None = None  # Hub repository, e.g. openai-community/gpt2
    revision: str | None = None  # a commit hash; overriding repo or revision drops the table's digests
    sha256: str | None = None  # of model.safetensors
    config_sha256: str | None = None  # of config.json
    preset: str | None = None  # llmcore preset config.json must match (the table's sizes check their own)
    dir: str | None = None  # a local HF-layout folder instead of a download


@dataclass
class ImportParams:
    # names to import: dvc.yaml's foreach expands it; each import@<name> stage depends on its own name only
    models: list[str] = field(default_factory=list, metadata={NOT_A_DEP: "expanded by dvc.yaml's foreach"})
    sources: dict[str, Source] = field(default_factory=dict)  # overrides/additions to KNOWN_CHECKPOINTS
    corpus: str = "tinyshakespeare"  # a download source (folder of data/raw) to measure the loss on
    val_fraction: float = 0.1  # its tail, as the tokenize stage splits it
    eval_tokens: int = 8192  # at most this many tokens are scored (keeps the 1.5B model cheap on a CPU)
    eval_context: int = 1024  # window length, capped at the model's context_length
    device: str = "auto"

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise LLMCoreError(f"import.val_fraction: expected a value in (0, 1), got {self.val_fraction}")
        for key in ("eval_tokens", "eval_context"):
            if getattr(self, key) < 1:
                raise LLMCoreError(f"import.{key}: expected a positive int, got {getattr(self, key)}")


def resolve_source(name: str, cfg: ImportParams) -> HFCheckpoint | Path:
    """The checkpoint to download for ``name`` (table entry merged with params) or a local folder."""
    known, over = KNOWN_CHECKPOINTS.get(name), cfg.sources.get(name)
    if over is not None and over.dir is not None:
        return Path(over.dir).expanduser()
    if over is None:
        if known is None:
            raise LLMCoreError(
                f"--name {name}: not a known checkpoint ({', '.join(KNOWN_CHECKPOINTS)}); "
                f"set import.sources.{name}.repo and .revision (or .dir), or pass --from-dir"
            )
        return known
    repo = over.repo or (known.repo if known else None)
    revision = over.revision or (known.revision if known else None)
    if repo is None or revision is None:
        raise LLMCoreError(f"import.sources.{name}: needs repo and revision (or dir)")
    same = known is not None and (repo, revision) == (known.repo, known.revision)  # else its digests do not apply
    return HFCheckpoint(
        repo,
        revision,
        sha256=over.sha256 or (known.sha256 if same else None),
        config_sha256=over.config_sha256 or (known.config_sha256 if same else None),
        preset=over.preset or (known.preset if known else None),
    )


def check_preset(cfg: ModelConfig, preset: str, source: Path) -> None:
    expected = ModelConfig.from_preset(preset)
    for f in fields(ModelConfig):
        got, want = getattr(cfg, f.name), getattr(expected, f.name)
        if got != want:
            raise LLMCoreError(f"{source}: does not match preset {preset}: {f.name} is {got!r}, expected {want!r}")


def load_tokenizer(model_dir: Path, fam: str, raw_dir: Path) -> Tokenizer:
    """Llama: the folder's tiktoken ``tokenizer.model``. GPT-2: the folder's vocab.json/merges.txt if there,
    else the GPT-2 BPE files the download stage fetched (the same bytes)."""
    if fam == "llama":
        for path in (model_dir / "tokenizer.model", model_dir / "original" / "tokenizer.model"):
            if path.is_file():
                return llama3_tokenizer(path)
        raise LLMCoreError(f"{model_dir}: no tokenizer.model (tiktoken format) in it or in original/")
    if (model_dir / "vocab.json").is_file() and (model_dir / "merges.txt").is_file():
        return Tokenizer.gpt2(model_dir / "vocab.json", model_dir / "merges.txt")
    encoder, merges = raw_dir / "gpt2-bpe" / "encoder.json", raw_dir / "gpt2-bpe" / "vocab.bpe"
    for path in (encoder, merges):
        if not path.is_file():
            raise LLMCoreError(f"{path}: missing (the download stage fetches GPT-2's BPE files)")
    return Tokenizer.gpt2(encoder, merges)


@torch.no_grad()
def evaluate(model: GPT, ids: list[int], context: int) -> tuple[float, int]:
    """Summed next-token cross-entropy (nats) over ``ids`` cut into non-overlapping ``context``-token windows,
    and the number of predicted tokens. Each window starts without history, as at training time."""
    device = model.tok_emb.weight.device
    data = torch.tensor(ids, dtype=torch.long, device=device)
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, context):
        x = data[start : start + context][None]  # (1, T)
        y = data[start + 1 : start + context + 1][None]
        x = x[:, : y.shape[1]]
        logits = model(x).logits.float()
        total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    return total, count


def load_params(path: Path) -> ImportParams:
    """Everything this stage reads from params.yaml: the ``import`` section (``models`` aside, see above)."""
    return load_section("import", ImportParams, path)


app = typer.Typer(add_completion=False)


@app.command()
def main(
    name: str = typer.Option(..., help="model name: a known size (gpt2-124m, ...) or a key of import.sources"),
    params: Path = typer.Option(..., help="params file"),
    from_dir: Path = typer.Option(None, help="import this local HF-layout folder instead of downloading"),
    raw_dir: Path = typer.Option(..., help="downloaded sources (GPT-2 BPE, eval corpus)"),
    cache_dir: Path = typer.Option(..., help="where Hub downloads are kept, per repo/revision"),
    out: Path = typer.Option(..., help="model folder (the DVC stage: data/models/<name>)"),
    reports: Path = typer.Option(..., help="metrics folder (the DVC stage: reports/import/<name>)"),
) -> None:
    """Fetch (or read) an HF checkpoint, convert it, measure its loss, and write an llmcore model folder."""
    with stage_errors():
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise LLMCoreError(f"--name {name!r}: use letters, digits, '.', '_' and '-' only")
        cfg = load_params(params)
        device = resolve_device(cfg.device)
        start = time.perf_counter()

        source = from_dir.expanduser() if from_dir is not None else resolve_source(name, cfg)
        over, known = cfg.sources.get(name), KNOWN_CHECKPOINTS.get(name)
        preset = (over.preset if over else None) or (known.preset if known else None)
        if isinstance(source, HFCheckpoint):
            key = f"import.sources.{name}.repo/revision"  # both name folders under --cache-dir: keep them there
            cached = safe_path(cache_dir, f"{source.repo}/{source.revision}", key)
            print0(f"{name}: {resolve_url(source.url('model.safetensors'))}")
            fetched = fetch_hf_checkpoint(source, cached)
            model_dir, digest, n_bytes = fetched.directory, fetched.sha256, fetched.bytes
            where, revision = source.url("model.safetensors"), source.revision
        else:
            if not source.is_dir():
                raise LLMCoreError(f"{source}: no such folder")
            if not (source / "config.json").is_file() and (source / "tokenizer.json").is_file():
                raise LLMCoreError(
                    f"{source}: an llmcore model folder, not a Hugging Face one (no config.json); import reads the "
                    "Hugging Face layout (`llmcore export` writes it from an llmcore language model)"
                )
            model_dir, n_bytes, where, revision = source, 0, str(source), None
            single = source / "model.safetensors"
            digest = sha256_file(single) if single.is_file() else None  # sharded: no single digest

        model = load_hf(model_dir)
        fam = family(model.cfg)
        if preset is not None:
            check_preset(model.cfg, preset, model_dir / "config.json")
        tokenizer = load_tokenizer(model_dir, fam, raw_dir)
        if tokenizer.vocab_size > model.cfg.vocab_size:
            raise LLMCoreError(
                f"{model_dir}: tokenizer has {tokenizer.vocab_size} ids, the model only {model.cfg.vocab_size}"
            )

        text = check_text_corpus(find_single_file(raw_dir / cfg.corpus, "import.corpus"))
        val_text = text[int(len(text) * (1 - cfg.val_fraction)) :]
        ids = tokenizer.encode(val_text, allow_special=False)[: cfg.eval_tokens + 1]
        if len(ids) < 2:
            raise LLMCoreError(f"import.corpus: the validation tail of {cfg.corpus} has fewer than 2 tokens")
        model.to(device)
        nll, n_tokens = evaluate(model, ids, min(cfg.eval_context, model.cfg.context_length))
        n_text_bytes = len(tokenizer.decode_bytes(ids[1 : n_tokens + 1]))  # the bytes the scored tokens spell
        loss = nll / n_tokens
        model.cpu()

        meta = {"source": where, "sha256": digest or "", "import_name": name}
        save_model_dir(out, model, tokenizer, meta)
        facts = {
            "name": name,
            "family": fam,
            "source": where,
            "revision": revision,
            "sha256": digest,
            "corpus": cfg.corpus,
        }
        metrics = {
            "download_bytes": n_bytes,
            "params": model.num_params(),
            "params_with_head": model.num_params(include_tied_head=True),
            "weight_bytes_fp32": model.cfg.weight_bytes("fp32"),
            "weight_bytes_bf16": model.cfg.weight_bytes("bf16"),
            "vocab_size": model.cfg.vocab_size,
            "context_length": model.cfg.context_length,
            "eval_tokens": n_tokens,
            "val_loss": round(loss, 4),
            "val_ppl": round(math.exp(loss), 2),
            "val_bpb": round(nll / math.log(2) / n_text_bytes, 4),
        }
        write_stage_reports(reports, metrics, {"seconds": round(time.perf_counter() - start, 2)}, facts)
        print0(
            f"{name}: {metrics['params']:,} params ({fam}) -> {out}; val loss {metrics['val_loss']} "
            f"(ppl {metrics['val_ppl']}, {metrics['val_bpb']} bits/byte) over {n_tokens} tokens of {cfg.corpus}"
        )


if __name__ == "__main__":
    app()
