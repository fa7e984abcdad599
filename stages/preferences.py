"""Stage `preferences`: the train/validation preference pairs the `align` stage's DPO trains on.

    dvc repro preferences        # data/align/pairs.json; its dvc.yaml command passes every path:
    python -m stages.preferences --params params.yaml --raw-dir data/raw --models-dir data/models \
        --out data/align/pairs.json --reports reports/align --cache data/cache/judge.jsonl

Its params are the pair-making keys of params.yaml's ``align`` section (``llmcore.data.pairs.PreferencesParams``)
and, in judge mode, the evaluate stage's judge (``evaluate.judge``); DPO's own keys (``align.beta``, ...) are
the align stage's alone, so editing them does not rebuild the pairs.

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

Outputs, each written atomically:

    data/align/pairs.json            the pairs: instruction, input, output, chosen, rejected, split
    reports/align/pairs.json         counts: entries, dropped, pairs per split, judge outcomes
    reports/align/pairs_info.json    the strings: preference source, dataset, judge model
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from llmcore.common import LLMCoreError, print0, stage_errors, write_json_atomic
from llmcore.data.datasets import find_single_file, load_instruction_data
from llmcore.data.instruct import split_entries
from llmcore.data.pairs import PreferencesParams, dataset_pairs
from llmcore.eval.judge import JudgeConfig, JudgeItem, check_judge, score_items
from llmcore.models.generate import SamplingConfig
from llmcore.models.responses import generate_responses
from llmcore.params import from_dict, load_fields, read_params
from llmcore.text.chat import CHATML
from llmcore.text.prompts import answer_end_id, prompt_ids
from llmcore.threads import threads_for_inference
from llmcore.weights.model_dir import open_model_dir


def load_params(path: Path) -> tuple[PreferencesParams, JudgeConfig]:
    """The pair-making keys of the ``align`` section (the rest of it is the align stage's) and the evaluate
    stage's judge (``evaluate.judge``; the rest of ``evaluate`` is the evaluate stage's)."""
    evaluate = read_params(path).get("evaluate") or {}
    cfg = load_fields("align", PreferencesParams, path)
    return cfg, from_dict(JudgeConfig, evaluate.get("judge"), "evaluate.judge")


def judge_pairs(
    cfg: PreferencesParams, data_path: Path, models_dir: Path, judge_cfg: JudgeConfig, cache: Path
) -> tuple[list[dict], dict]:
    """Two sampled answers per train/val prompt, judged; the higher-scored one chosen -> (records, counts)."""
    entries = load_instruction_data(data_path)
    train, val, test = split_entries(entries, cfg.train_fraction, cfg.test_fraction, cfg.split_seed)
    if cfg.pairs.max_prompts is not None:
        train = train[: cfg.pairs.max_prompts]
    judge = check_judge(judge_cfg)  # before minutes of generation: fail early if the judge is not there
    folder = open_model_dir(models_dir / cfg.base_model)
    model, tok = folder.load_lm(use="the preferences stage"), folder.tokenizer
    template = folder.template or "alpaca"
    prompts = [(name, e) for name, part in (("train", train), ("val", val)) for e in part]
    texts = [prompt_ids(tok, template, e["instruction"], e["input"]) for _, e in prompts]
    p = cfg.pairs
    chat = template == CHATML
    stops = (answer_end_id(tok, template),)
    with threads_for_inference("auto", model.cfg):
        answers = [
            generate_responses(
                model,
                tok,
                texts,
                SamplingConfig(
                    max_new_tokens=p.max_new_tokens,
                    temperature=p.temperature,
                    top_k=p.top_k,
                    top_p=p.top_p,
                    seed=seed,
                    stop_ids=stops,
                ),
                p.batch_size,
                stop_at_section=not chat,
                chat=chat,
            )
            for seed in p.seeds
        ]
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
    items = [
        JudgeItem(
            f"{k}-{j}", prompts[k][1]["instruction"], prompts[k][1]["input"], prompts[k][1]["output"], answers[j][k]
        )
        for k in asked
        for j in range(2)
    ]
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
            pairs.append(
                {
                    "instruction": e["instruction"],
                    "input": e["input"],
                    "output": e["output"],
                    "chosen": answers[0 if first else 1][k],
                    "rejected": answers[1 if first else 0][k],
                    "chosen_score": max(a.score, b.score),
                    "rejected_score": min(a.score, b.score),
                    "split": name,
                }
            )
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


def run(
    cfg: PreferencesParams,
    judge_cfg: JudgeConfig,
    raw_dir: Path,
    models_dir: Path,
    out: Path,
    reports: Path,
    cache: Path,
) -> dict:
    """Write the pairs file and its reports; returns the counts."""
    data_path = find_single_file(raw_dir / cfg.dataset, "align.dataset", "*.json")
    if cfg.preferences == "dataset":
        records, counts = dataset_pairs(cfg, data_path)
    else:
        records, counts = judge_pairs(cfg, data_path, models_dir, judge_cfg, cache)
    judge_model = counts.pop("_judge_model", None)
    counts["train_pairs"] = sum(r["split"] == "train" for r in records)
    counts["val_pairs"] = sum(r["split"] == "val" for r in records)
    if not counts["train_pairs"] or not counts["val_pairs"]:
        raise LLMCoreError(
            f"align: no usable {'training' if not counts['train_pairs'] else 'validation'} "
            f"preference pairs from {data_path} ({counts})"
        )
    write_json_atomic(out, records)
    write_json_atomic(reports / "pairs.json", counts)
    info = {"preferences": cfg.preferences, "dataset": cfg.dataset, "judge_model": judge_model}
    write_json_atomic(reports / "pairs_info.json", info)
    return counts


app = typer.Typer(add_completion=False)


@app.command()
def main(
    params: Path = typer.Option(..., help="params file"),
    raw_dir: Path = typer.Option(..., help="downloaded sources"),
    models_dir: Path = typer.Option(..., help="model folders (judge mode answers with one)"),
    out: Path = typer.Option(..., help="the pairs file"),
    reports: Path = typer.Option(..., help="where pairs.json (counts) goes"),
    cache: Path = typer.Option(..., help="judge answer cache (judge mode)"),
) -> None:
    """Build the train/validation preference pairs (from the dataset or by asking the judge)."""
    with stage_errors():
        cfg, judge_cfg = load_params(params)
        print0(json.dumps(run(cfg, judge_cfg, raw_dir, models_dir, out, reports, cache)))


if __name__ == "__main__":
    app()
