"""Stages `preferences` and `align`: preference pairs, then Direct Preference Optimization of the instruction model.

    python -m stages.align pairs     # stage `preferences`: data/align/pairs.json (train and validation pairs)
    python -m stages.align train     # stage `align`: DPO from data/models/${align.base_model}

Preference pairs (``align.preferences``):

- ``dataset``: the book's ``instruction-data-with-preference.json`` (``align.dataset``, a download source):
  every entry validated (a bad one stops the stage, naming its index); entries whose chosen and rejected
  answers are the same text are dropped and counted (``align.identical: error`` stops instead).
- ``judge``: pairs from the pipeline's own model. Each training and validation prompt is answered twice by
  ``data/models/${align.base_model}``, sampling with two seeds (``align.pairs``); the judge of the evaluate
  stage (``evaluate.judge``) scores both answers 0-100 against the reference output, and the higher one is
  chosen. Ties and answers the judge could not score are dropped and counted. The judge's answers are cached
  in ``data/cache/judge.jsonl`` and the pairs are a DVC output: a rerun asks nothing it asked before.

The entries are split as the instruct stage splits its data (same fractions and seed by default, and the
book's two files hold the same 1100 instructions in the same order), so no test prompt is trained on;
only train and validation pairs are written.

DPO (``llmcore.training.dpo``): the policy starts as the instruction model; the reference is the same
weights, frozen, whose log-probabilities of every pair are computed once before training. Loss
``-logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))`` over answer tokens only, on the shared loop
(``llmcore.training.loop.fit``): full fine-tune or LoRA (merged into the saved weights). The tuned model then
answers the instruct stage's test prompts (``reports/instruct/responses.json``) with the same decoding, so
the evaluate stage compares the two models answer by answer.

Outputs, each written atomically:

    data/align/pairs.json            (preferences) the pairs: instruction, input, output, chosen, rejected, split
    reports/align/pairs.json         (preferences) counts: entries, dropped, pairs per split, judge outcomes
    reports/align/pairs_info.json    (preferences) the strings: preference source, dataset, judge model
    data/models/align/               model.safetensors (prompt template in its metadata) + tokenizer.json
    reports/align/responses.json     the aligned model's answers to the instruct test prompts
    reports/align/metrics.json       numbers only: DPO loss, reward accuracy and margins (first and last
                                     evaluation), sizes, timings
    reports/align/timing.json        run-time figures: seconds, pairs/s
    reports/align/facts.json         the strings: preference source, base model, fine-tune kind
    reports/align/live/              dvclive curves: {train,val}/{loss,reward_accuracy,reward_margin,...}

Resumable training checkpoints go to ``.cache/align`` (not a DVC output: a killed run continues; only a run with the
same params and inputs resumes). ``LLMCORE_FRESH=1`` trains from scratch instead of reloading a finished run.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import typer

from llmcore.common import (
    LLMCoreError,
    print0,
    read_json,
    sha256_file,
    stage_errors,
    write_json_atomic,
    write_stage_reports,
)
from llmcore.data.datasets import find_single_file, load_instruction_data, validate_preferences
from llmcore.data.instruct import check_split, split_entries
from llmcore.data.preferences import PreferenceBatches, encode_pairs
from llmcore.eval.judge import JudgeConfig, JudgeItem, check_judge, score_items
from llmcore.models.generate import SamplingConfig
from llmcore.models.lora import LoRAParams, apply_lora, count_trainable, mark_trainable, merge_lora
from llmcore.models.responses import generate_responses
from llmcore.params import from_dict, load_section, read_params
from llmcore.text.chat import CHATML
from llmcore.text.prompts import answer_end_id, entry_prompt_ids, prompt_ids
from llmcore.threads import threads_for_inference
from llmcore.training.config import HardwareConfig, TrainConfig
from llmcore.training.dpo import DPOLoss, attach_reference_logps
from llmcore.training.loop import fit
from llmcore.training.runtime import close_runtime, init_runtime, relaunch_under_torchrun
from llmcore.weights.model_dir import TEMPLATE_KEY, TOKENIZER_FILE, open_model_dir, save_model_dir
from stages.instruct import GenerateParams


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


def _default_train() -> TrainConfig:
    return TrainConfig(batch_size=8, lr=1e-4, min_lr=1e-5, warmup_steps=10, epochs=1, eval_every=25,
                       eval_batches=None, checkpoint_every=50, log_every=5, seed=123)  # fmt: skip


@dataclass
class AlignParams:
    preferences: Literal["dataset", "judge"] = "dataset"
    dataset: str = "instruction-data-with-preference"  # a download source: one JSON list of entries
    identical: Literal["drop", "error"] = "drop"  # entries whose chosen == rejected (the book's file has 6)
    base_model: str = "instruct"  # the policy's and reference's start: data/models/<base_model>
    train_fraction: float = 0.85  # keep equal to instruct's: the test prompts are never trained on
    test_fraction: float = 0.10
    split_seed: int = 123
    max_length: int | None = None  # longest sequence (prompt + answer); longer pairs are dropped, counted
    group_by_length: bool = True
    beta: float = 0.1  # DPO temperature: how far the policy may move from the reference
    average_logps: bool = False  # mean instead of sum of answer-token log-probs (the book's notebook)
    finetune: Literal["full", "lora"] = "full"
    lora: LoRAParams = field(default_factory=lambda: LoRAParams(dropout=0.0))
    pairs: PairParams = field(default_factory=PairParams)
    train: TrainConfig = field(default_factory=_default_train)
    generate: GenerateParams = field(default_factory=GenerateParams)

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise LLMCoreError(f"align.beta: expected > 0, got {self.beta}")
        check_split(self.train_fraction, self.test_fraction, "align")
        if self.max_length is not None and self.max_length < 2:
            raise LLMCoreError(f"align.max_length: expected an int >= 2 or null, got {self.max_length}")


def load_pairs_params(path: Path) -> tuple[AlignParams, JudgeConfig]:
    """What the ``pairs`` command (stage ``preferences``) reads: the ``align`` section and the evaluate stage's
    judge (``evaluate.judge``; the rest of ``evaluate`` is the evaluate stage's)."""
    evaluate = read_params(path).get("evaluate") or {}
    return load_section("align", AlignParams, path), from_dict(JudgeConfig, evaluate.get("judge"), "evaluate.judge")


def load_params(path: Path) -> tuple[AlignParams, HardwareConfig]:
    return load_section("align", AlignParams, path), load_section("hardware", HardwareConfig, path)


def _round(x: float, digits: int = 4) -> float | None:
    return round(x, digits) + 0.0 if math.isfinite(x) else None  # JSON has no NaN; + 0.0 turns -0.0 into 0.0


# ---------------------------------------------------------------------------------------------------
# Stage `preferences`
# ---------------------------------------------------------------------------------------------------


def dataset_pairs(cfg: AlignParams, data_path: Path) -> tuple[list[dict], dict]:
    """The book's preference file, validated and split -> (pair records, counts)."""
    raw = read_json(data_path)
    _, identical = validate_preferences(raw, str(data_path), cfg.identical)
    skip = {id(raw[i]) for i in identical}
    # split the whole file by position, as the instruct stage splits its copy of the same entries
    train, val, test = split_entries(raw, cfg.train_fraction, cfg.test_fraction, cfg.split_seed)
    records = [{**e, "split": name} for name, part in (("train", train), ("val", val)) for e in part
               if id(e) not in skip]  # fmt: skip
    return records, {"entries": len(raw), "dropped_identical": len(identical), "test_entries": len(test)}


def judge_pairs(cfg: AlignParams, data_path: Path, models_dir: Path, judge_cfg: JudgeConfig,
                cache: Path) -> tuple[list[dict], dict]:  # fmt: skip
    """Two sampled answers per train/val prompt, judged; the higher-scored one chosen -> (records, counts)."""
    entries = load_instruction_data(data_path)
    train, val, test = split_entries(entries, cfg.train_fraction, cfg.test_fraction, cfg.split_seed)
    if cfg.pairs.max_prompts is not None:
        train = train[: cfg.pairs.max_prompts]
    judge = check_judge(judge_cfg)  # before minutes of generation: fail early if the judge is not there
    folder = open_model_dir(models_dir / cfg.base_model)
    model, tok = folder.load_lm(use="the align stage"), folder.tokenizer
    template = folder.template or "alpaca"
    prompts = [(name, e) for name, part in (("train", train), ("val", val)) for e in part]
    texts = [prompt_ids(tok, template, e["instruction"], e["input"]) for _, e in prompts]
    p = cfg.pairs
    chat = template == CHATML
    stops = (answer_end_id(tok, template),)
    with threads_for_inference("auto", model.cfg):
        answers = [
            generate_responses(model, tok, texts, SamplingConfig(max_new_tokens=p.max_new_tokens,
                               temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, seed=seed, stop_ids=stops),
                               p.batch_size, stop_at_section=not chat, chat=chat)
            for seed in p.seeds
        ]  # fmt: skip
    # an empty answer, or two identical ones, make no pair: not worth asking the judge about
    counts = {"empty_answers": 0, "identical_answers": 0, "ties": 0, "unparsable": 0, "errors": 0}
    asked = []
    for k in range(len(prompts)):
        first, second = answers[0][k].strip(), answers[1][k].strip()
        if not first or not second:
            counts["empty_answers"] += 1
        elif first == second:
            counts["identical_answers"] += 1
        else:
            asked.append(k)
    items = [JudgeItem(f"{k}-{j}", prompts[k][1]["instruction"], prompts[k][1]["input"], prompts[k][1]["output"],
                       answers[j][k]) for k in asked for j in range(2)]  # fmt: skip
    records = score_items(items, judge_cfg, cache_path=cache, judge=judge) if items else []
    pairs = []
    for n, k in enumerate(asked):
        name, e = prompts[k]
        a, b = records[2 * n], records[2 * n + 1]
        if a.status == "error" or b.status == "error":
            counts["errors"] += 1
        elif a.status != "scored" or b.status != "scored":
            counts["unparsable"] += 1
        elif a.score == b.score:
            counts["ties"] += 1
        else:
            first = a.score > b.score
            pairs.append({
                "instruction": e["instruction"], "input": e["input"], "output": e["output"],
                "chosen": answers[0 if first else 1][k], "rejected": answers[1 if first else 0][k],
                "chosen_score": max(a.score, b.score), "rejected_score": min(a.score, b.score), "split": name,
            })  # fmt: skip
    counts = {
        "entries": len(entries),
        "prompts": len(prompts),
        "test_entries": len(test),
        **counts,
        "judged_answers": len(items),
        "judge_requests": sum(r.attempts for r in records),
        "judge_cached": sum(r.cached for r in records),
    }
    return pairs, {**counts, "_judge_model": judge["model"]}


def make_pairs(cfg: AlignParams, judge_cfg: JudgeConfig, raw_dir: Path, models_dir: Path, out: Path, reports: Path,
               cache: Path) -> dict:  # fmt: skip
    data_path = find_single_file(raw_dir / cfg.dataset, "align.dataset", "*.json")
    if cfg.preferences == "dataset":
        records, counts = dataset_pairs(cfg, data_path)
    else:
        records, counts = judge_pairs(cfg, data_path, models_dir, judge_cfg, cache)
    judge_model = counts.pop("_judge_model", None)
    counts["train_pairs"] = sum(r["split"] == "train" for r in records)
    counts["val_pairs"] = sum(r["split"] == "val" for r in records)
    if not counts["train_pairs"] or not counts["val_pairs"]:
        raise LLMCoreError(f"align: no usable {'training' if not counts['train_pairs'] else 'validation'} "
                           f"preference pairs from {data_path} ({counts})")  # fmt: skip
    write_json_atomic(out, records)
    write_json_atomic(reports / "pairs.json", counts)
    info = {"preferences": cfg.preferences, "dataset": cfg.dataset, "judge_model": judge_model}
    write_json_atomic(reports / "pairs_info.json", info)
    return counts


# ---------------------------------------------------------------------------------------------------
# Stage `align`
# ---------------------------------------------------------------------------------------------------


def train(cfg: AlignParams, hw: HardwareConfig, pairs_path: Path, test_prompts: Path, models_dir: Path, out: Path,
          reports: Path, work_dir: Path) -> dict | None:  # fmt: skip
    """DPO from ``data/models/<base_model>`` on the pairs; returns the metrics (None on ranks other than 0)."""
    start = time.perf_counter()
    records = read_json(pairs_path, "run the preferences stage first (python -m stages.align pairs)")
    entries, _ = validate_preferences(records, str(pairs_path), cfg.identical)
    if any(e.get("split") not in ("train", "val") for e in entries):
        raise LLMCoreError(f"{pairs_path}: every pair needs a 'split' of 'train' or 'val'")
    tests = load_instruction_data(test_prompts)  # the instruct stage's test entries (and its answers)

    rt = init_runtime(hw)
    torch.manual_seed(cfg.train.seed)
    base = open_model_dir(models_dir / cfg.base_model)
    model, tok = base.load_lm(use="the align stage"), base.tokenizer
    template = base.template or "alpaca"
    ctx = model.cfg.context_length
    max_length = cfg.max_length or ctx
    if max_length > ctx:
        raise LLMCoreError(f"align.max_length: {max_length} exceeds the context length {ctx} of {cfg.base_model}")
    splits = {name: [e for e in entries if e["split"] == name] for name in ("train", "val")}
    encoded = {name: encode_pairs(part, tok, template, max_length) for name, part in splits.items()}
    (train_pairs, train_long), (val_pairs, val_long) = encoded["train"], encoded["val"]
    if not val_pairs:
        raise LLMCoreError(f"align: every validation pair is longer than {max_length} tokens (raise align.max_length?)")
    B = cfg.train.batch_size
    train_data = PreferenceBatches(train_pairs, B, tok.eot_id, seed=cfg.train.seed, group_by_length=cfg.group_by_length,
                                   rank=rt.rank, world_size=rt.world_size)  # fmt: skip
    val_data = PreferenceBatches(val_pairs, B, tok.eot_id, shuffle=False, rank=rt.rank, world_size=rt.world_size)

    model.to(rt.device)
    ref_start = time.perf_counter()
    for data in (train_data, val_data):  # the frozen reference: the base weights, scored once per pair
        attach_reference_logps(model, data, batch_size=2 * B, average=cfg.average_logps)
    ref_seconds = time.perf_counter() - ref_start

    n_params = model.num_params()
    if cfg.finetune == "lora":
        apply_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets)
        mark_trainable(model)
    trainable = count_trainable(model)
    print0(f"{cfg.base_model}: {n_params:,} parameters, {trainable:,} trained ({cfg.finetune}); {len(train_pairs)} "
           f"train / {len(val_pairs)} val pairs, {len(train_long) + len(val_long)} longer than {max_length} dropped; "
           f"beta {cfg.beta}")  # fmt: skip
    fingerprint = {
        "pairs": sha256_file(pairs_path),
        "base": [sha256_file(base.weights), sha256_file(base.path / TOKENIZER_FILE)],
        "align": {k: v for k, v in asdict(cfg).items() if k not in ("train", "generate", "pairs")},
    }
    live = None
    if rt.is_main:
        from dvclive import Live

        live = Live(dir=str(reports / "live"), dvcyaml=False, save_dvc_exp=False)
    loss_fn = DPOLoss(cfg.beta, cfg.average_logps)
    try:
        result = fit(model, train_data, val_data, loss_fn, cfg.train, hw, work_dir, live=live,
                     fingerprint=fingerprint, unit="pairs")  # fmt: skip
    finally:
        if live is not None:
            live.end()
        close_runtime()
    if not rt.is_main:
        return None
    first = _first_eval(reports / "live")
    if cfg.finetune == "lora":
        merge_lora(model)

    gen_start = time.perf_counter()
    prompts = [entry_prompt_ids(tok, template, t, f"{test_prompts}: entry {i}") for i, t in enumerate(tests)]
    chat = template == CHATML
    sampling = cfg.generate.sampling()
    sampling.stop_ids = (*sampling.stop_ids, answer_end_id(tok, template))
    with threads_for_inference(hw.threads, model.cfg):
        answers = generate_responses(model, tok, prompts, sampling, cfg.generate.batch_size,
                                     cfg.generate.stop_at_section and not chat, chat=chat)  # fmt: skip
    gen_seconds = time.perf_counter() - gen_start
    responses = [
        {"id": t.get("id", str(i)), "instruction": t["instruction"], "input": t["input"], "output": t["output"],
         **({"messages": t["messages"]} if "messages" in t else {}), "model_response": a}
        for i, (t, a) in enumerate(zip(tests, answers, strict=True))
    ]  # fmt: skip
    write_json_atomic(reports / "responses.json", responses)
    metadata = {TEMPLATE_KEY: template, "stage": "align", "base_model": cfg.base_model, "finetune": cfg.finetune,
                "preferences": cfg.preferences, "beta": str(cfg.beta)}  # fmt: skip
    save_model_dir(out, model, tok, metadata)

    train_keys = {(e["instruction"], e["input"]) for e in splits["train"]}
    x = result.extra
    metrics = {
        "beta": cfg.beta, "trainable_params": trainable, "train_pairs": len(train_pairs), "val_pairs": len(val_pairs),
        "dropped_too_long": len(train_long) + len(val_long),
        "test_prompts_in_train": sum((t["instruction"], t["input"]) in train_keys for t in tests),
        "steps": result.step, "epochs": round(result.epochs, 3),
        "train_loss": _round(result.train_loss), "val_loss": _round(result.val_loss),
        "val_loss_start": _round(first.get("loss", math.nan)),
        "val_reward_accuracy": _round(x.get("reward_accuracy", math.nan)),
        "val_reward_margin": _round(x.get("reward_margin", math.nan)),
        "val_reward_margin_start": _round(first.get("reward_margin", math.nan)),
        "val_chosen_reward": _round(x.get("chosen_reward", math.nan)),
        "val_rejected_reward": _round(x.get("rejected_reward", math.nan)),
        "test_responses": len(responses), "empty_responses": sum(not a for a in answers),
    }  # fmt: skip
    timing = {"reference_seconds": round(ref_seconds, 1), "train_seconds": round(result.train_time_s, 1),
              "pairs_per_s": round(result.items_per_s, 2), "generate_seconds": round(gen_seconds, 1),
              "stage_seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
    facts = {"base_model": cfg.base_model, "preferences": cfg.preferences, "finetune": cfg.finetune,
             "dataset": cfg.dataset}  # fmt: skip
    write_stage_reports(reports, metrics, timing, facts)
    return {**metrics, **timing}


def _first_eval(live_dir: Path) -> dict[str, float]:
    """The step-0 evaluation's val metrics, read back from dvclive's curves (policy = reference there)."""
    out = {}
    for name in ("loss", "reward_margin", "reward_accuracy"):
        path = live_dir / "plots" / "metrics" / "val" / f"{name}.tsv"
        if path.is_file():
            rows = path.read_text(encoding="utf-8").splitlines()
            if len(rows) > 1:
                out[name] = float(rows[1].split("\t")[1])
    return out


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------

app = typer.Typer(add_completion=False, help="Preference pairs (stage `preferences`) and DPO (stage `align`).")


@app.command()
def pairs(
    params: Path = typer.Option(Path("params.yaml"), help="params file"),
    raw_dir: Path = typer.Option(Path("data/raw"), help="downloaded sources"),
    models_dir: Path = typer.Option(Path("data/models"), help="model folders (judge mode answers with one)"),
    out: Path = typer.Option(Path("data/align/pairs.json"), help="the pairs file"),
    reports: Path = typer.Option(Path("reports/align"), help="where pairs.json (counts) goes"),
    cache: Path = typer.Option(Path("data/cache/judge.jsonl"), help="judge answer cache (judge mode)"),
) -> None:
    """Build the train/validation preference pairs (from the dataset or by asking the judge)."""
    with stage_errors():
        cfg, judge_cfg = load_pairs_params(params)
        counts = make_pairs(cfg, judge_cfg, raw_dir, models_dir, out, reports, cache)
        print0(json.dumps(counts))


@app.command("train")
def train_cmd(
    params: Path = typer.Option(Path("params.yaml"), help="params file"),
    pairs_path: Path = typer.Option(Path("data/align/pairs.json"), "--pairs", help="the preferences stage's pairs"),
    test_prompts: Path = typer.Option(Path("reports/instruct/responses.json"), help="prompts to answer at the end"),
    models_dir: Path = typer.Option(Path("data/models"), help="model folders; the base is <models-dir>/<base_model>"),
    out: Path = typer.Option(Path("data/models/align"), help="where the aligned model folder goes"),
    reports: Path = typer.Option(Path("reports/align"), help="metrics, curves and responses"),
    work_dir: Path = typer.Option(Path(".cache/align"), help="resumable training checkpoints"),
) -> None:
    """DPO-tune data/models/${align.base_model} on the preference pairs and answer the test prompts."""
    with stage_errors():
        cfg, hw = load_params(params)
        args = ["train", "--params", params, "--pairs", pairs_path, "--test-prompts", test_prompts, "--models-dir",
                models_dir, "--out", out, "--reports", reports, "--work-dir", work_dir]  # fmt: skip
        status = relaunch_under_torchrun(hw.nproc, "stages.align", [str(a) for a in args])
        if status is not None:
            raise SystemExit(status)
        metrics = train(cfg, hw, pairs_path, test_prompts, models_dir, out, reports, work_dir)
        if metrics is not None:
            keys = ("val_loss_start", "val_loss", "val_reward_accuracy", "val_reward_margin", "stage_seconds")
            print0(json.dumps({k: metrics[k] for k in keys}))


if __name__ == "__main__":
    app()
