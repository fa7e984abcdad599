"""lm-evaluation-harness adapter, `benchmark` stage and `llmcore benchmark`, offline.

lm-eval's own datasets cannot be downloaded here, so the end-to-end tests define local tasks (a multiple-choice and
a generation task in YAML over JSONL written to tmp_path) and check the metrics lm-eval computes against the same
metrics computed directly from the model. Unit tests check every score against a direct forward pass.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from llmcore.common import LLMCoreError
from llmcore.eval.harness import LLMCoreLM, run_tasks, task_manager, task_metrics
from llmcore.models.classifier import GPTClassifier
from llmcore.models.config import ModelConfig
from llmcore.models.generate import SamplingConfig, generate
from llmcore.models.gpt import GPT
from llmcore.report.published import PUBLISHED, benchmark_rows
from llmcore.text.tokenizer import Tokenizer
from llmcore.weights.model_dir import save_classifier, save_model_dir

pytestmark = pytest.mark.timeout(120)

CORPUS = " ".join(f"the cat sat on mat {i}. a dog ran to the park {i}. birds sing at dawn." for i in range(60))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[GPT, Tokenizer, Path]:
    """A random gpt2-tiny-shaped model (context 128) with a small BPE, saved as a model folder."""
    tok = Tokenizer.train(CORPUS, vocab_size=300)
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("gpt2-tiny", vocab_size=tok.vocab_size)).eval()
    folder = save_model_dir(tmp_path_factory.mktemp("models") / "tiny", model, tok)
    return model, tok, folder


@pytest.fixture(scope="module")
def lm(tiny) -> LLMCoreLM:
    model, tok, _ = tiny
    return LLMCoreLM(model=(model, tok), device="cpu", batch_size=8)


class Req:
    """The part of lm_eval.api.instance.Instance the adapter reads."""

    def __init__(self, *args, task_name: str = "toy"):
        self.args = args
        self.task_name = task_name


@torch.no_grad()
def direct_logprob(model: GPT, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """log p(cont | ctx) and the greedy flag from one unbatched forward pass over ctx + cont[:-1]."""
    ids = torch.tensor([ctx + cont[:-1]])
    logp = F.log_softmax(model(ids).logits[0, -len(cont) :].double(), dim=-1)
    target = torch.tensor(cont)
    return logp.gather(-1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all())


def encode_pair(tok: Tokenizer, ctx: str, cont: str) -> tuple[list[int], list[int]]:
    whole, head = tok.encode(ctx + cont), tok.encode(ctx)
    return head, whole[len(head) :]


# --------------------------------------------------------------------------------------------------
# loglikelihood


def test_loglikelihood_matches_a_direct_computation(tiny, lm):
    model, tok, _ = tiny
    pairs = [
        ("the cat sat on", " mat 3."),
        ("a dog ran", " to the park"),
        ("birds", " sing at dawn."),
        ("the cat sat on mat 7. ", "a dog"),
    ]
    got = lm.loglikelihood([Req(c, x) for c, x in pairs])
    for (ctx, cont), (lp, greedy) in zip(pairs, got, strict=True):
        stripped = ctx.rstrip(" ")  # lm-eval moves the context's trailing spaces into the continuation
        want_lp, want_greedy = direct_logprob(model, *encode_pair(tok, stripped, ctx[len(stripped) :] + cont))
        assert lp == pytest.approx(want_lp, abs=1e-5)
        assert greedy == want_greedy


def test_greedy_flag_and_empty_context(tiny, lm):
    model, tok, _ = tiny
    ctx = tok.encode("the cat sat on")
    greedy_ids = generate(model, [ctx], SamplingConfig(max_new_tokens=4))[0]
    ((lp, greedy),) = lm._loglikelihood_tokens([(None, ctx, greedy_ids)])
    assert greedy is True
    wrong = [(greedy_ids[0] + 1) % tok.vocab_size, *greedy_ids[1:]]
    ((lp_wrong, greedy_wrong),) = lm._loglikelihood_tokens([(None, ctx, wrong)])
    assert greedy_wrong is False and lp_wrong < lp
    # an empty context is lm-eval's: the prefix token (<|endoftext|> here) conditions the continuation
    ((lp_empty, _),) = lm.loglikelihood([Req("", "the cat")])
    assert lp_empty == pytest.approx(direct_logprob(model, [tok.eot_id], tok.encode("the cat"))[0], abs=1e-5)


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama3-tiny"])  # learned positions, RoPE
def test_batching_and_padding_never_change_a_score(tiny, monkeypatch, preset):
    from llmcore.eval import harness

    model, tok, _ = tiny
    if preset != "gpt2-tiny":
        torch.manual_seed(1)
        model = GPT(ModelConfig.from_preset(preset, vocab_size=tok.vocab_size)).eval()
    g = torch.Generator().manual_seed(0)
    pairs = []
    for _ in range(24):
        n_ctx, n_cont = torch.randint(1, 60, (1,), generator=g).item(), torch.randint(1, 12, (1,), generator=g).item()
        ids = torch.randint(0, tok.vocab_size, (n_ctx + n_cont,), generator=g).tolist()
        pairs.append((ids[:n_ctx], ids[n_ctx:]))
    pairs += [(pairs[0][0], [9]), (pairs[0][0], [7])]  # one-token answers to one context: one input, run once
    for n_ctx in (70, 5, 33):  # multiple-choice items: one context, endings of different lengths (shared prefill)
        ctx = torch.randint(0, tok.vocab_size, (n_ctx,), generator=g).tolist()
        pairs += [(ctx, torch.randint(0, tok.vocab_size, (k,), generator=g).tolist()) for k in (1, 4, 9, 2)]
    pairs.append((pairs[-1][0][:-3], pairs[-1][0][-3:] + [11, 12]))  # a context that is a prefix of another's
    scores = {}
    for batch_size in (1, 3, 64):
        monkeypatch.setattr(harness, "HEAD_CHUNK", 5 if batch_size == 3 else 1024)  # the head in slices, or not
        lm = LLMCoreLM(model=(model, tok), device="cpu", batch_size=batch_size)
        scored = lm.score(pairs)
        scores[batch_size] = torch.tensor([s.logprob for s in scored], dtype=torch.float64)
        greedy = [s.greedy for s in scored]
    direct = [direct_logprob(model, c, x) for c, x in pairs]
    alone = torch.tensor([lp for lp, _ in direct], dtype=torch.float64)
    for batch_size, got in scores.items():
        assert (got - alone).abs().max().item() <= 1e-5, batch_size
    assert greedy == [g for _, g in direct]
    assert lm.forward_rows == len(pairs) - 1


def test_long_context_is_truncated_from_the_left(tiny):
    model, tok, _ = tiny
    lm = LLMCoreLM(model=(model, tok), device="cpu")
    window = model.cfg.context_length
    ctx, cont = list(range(3, 3 + window + 40)), [5, 6, 7]
    ((lp, _),) = lm._loglikelihood_tokens([(None, ctx, cont)])
    kept = (ctx + cont)[-(window + 1) :]
    assert lp == pytest.approx(direct_logprob(model, kept[: -len(cont)], cont)[0], abs=1e-5)
    assert lm.truncated == 1


def test_a_continuation_longer_than_the_context_is_a_one_line_error(tiny, lm):
    model, tok, _ = tiny
    with pytest.raises(LLMCoreError, match=r"task toy: the continuation has \d+ tokens but the model sees 128") as e:
        lm.loglikelihood([Req("the", " cat sat on mat" * 60)])
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------------
# loglikelihood_rolling and generate_until


@torch.no_grad()
def direct_rolling(model: GPT, ids: list[int], prefix: int) -> float:
    """Windows of W predicted tokens, the first after the prefix token, each later one with as much of the text
    before it as fits in the window (the last, partial window looks back further)."""
    W, full, total = model.cfg.context_length, [prefix, *ids], 0.0
    for s in range(0, len(ids), W):
        e = min(s + W, len(ids))  # predict ids[s:e] == full[s + 1 : e + 1]
        inp = full[max(0, e - W) : e]
        logp = F.log_softmax(model(torch.tensor([inp])).logits[0].double(), dim=-1)[-(e - s) :]
        total += logp.gather(-1, torch.tensor(full[s + 1 : e + 1])[:, None]).sum().item()
    return total


def test_rolling_loglikelihood_covers_every_token_once(tiny, lm):
    model, tok, _ = tiny
    short, long = "birds sing at dawn.", CORPUS[:1500]
    assert len(tok.encode(long)) > 2 * model.cfg.context_length + 10  # three windows, the last one partial
    got = lm.loglikelihood_rolling([Req(short), Req(long)])
    assert got[0] == pytest.approx(direct_rolling(model, tok.encode(short), tok.eot_id), abs=1e-5)
    assert got[1] == pytest.approx(direct_rolling(model, tok.encode(long), tok.eot_id), abs=1e-4)


def test_generate_until_stops_at_stop_strings_and_batches_like_alone(tiny):
    model, tok, _ = tiny
    prompts = ["the cat sat on mat 4.", "a dog", "birds sing at dawn. the"]
    kwargs = {"until": ["zz"], "max_gen_toks": 12, "do_sample": False}
    expected = []
    for p in prompts:
        ids = generate(model, [tok.encode(p)], SamplingConfig(max_new_tokens=12, stop_ids=(tok.eot_id,)))[0]
        expected.append(tok.decode(ids))
    batched = LLMCoreLM(model=(model, tok), device="cpu", batch_size=8).generate_until(
        [Req(p, kwargs) for p in prompts]
    )
    assert batched == expected
    # a stop string cuts the text before it, and ends that row
    stop = expected[0][3:6]
    (cut,) = LLMCoreLM(model=(model, tok), device="cpu").generate_until([Req(prompts[0], {**kwargs, "until": [stop]})])
    assert cut == expected[0].split(stop)[0]


def test_generation_that_cannot_fit_the_context_is_a_one_line_error(lm):
    with pytest.raises(LLMCoreError, match="task toy: asks for 500 new tokens but the model's context is 128"):
        lm.generate_until([Req("the cat", {"until": ["."], "max_gen_toks": 500})])


def test_llama3_tokenizers_begin_with_begin_of_text():
    tok = Tokenizer.train(CORPUS, vocab_size=300, special_tokens=["<|endoftext|>", "<|begin_of_text|>"])
    model = GPT(ModelConfig.from_preset("llama3-tiny", vocab_size=tok.vocab_size))
    lm = LLMCoreLM(model=(model, tok), device="cpu")
    bos = tok.special_tokens["<|begin_of_text|>"]
    assert lm.prefix_token_id == bos
    assert lm.tok_encode("the cat") == [bos, *tok.encode("the cat")]
    assert lm.tok_encode("the cat", add_special_tokens=False) == tok.encode("the cat")
    assert lm.tok_encode("<|begin_of_text|>the cat") == [bos, *tok.encode("the cat")]  # never twice


# --------------------------------------------------------------------------------------------------
# End to end through lm_eval.simple_evaluate on local tasks

MC_DOCS = [
    {"query": f"the cat sat on mat {i}.", "choices": [" a dog ran", " birds sing", " zq xv", " park"], "label": i % 4}
    for i in range(10)
]
GEN_PROMPTS = [f"a dog ran to the park {i}." for i in range(6)]


def write_tasks(root: Path, gen_targets: list[str]) -> tuple[Path, Path]:
    (root / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in MC_DOCS))
    gen = [{"q": q, "a": a} for q, a in zip(GEN_PROMPTS, gen_targets, strict=True)]
    (root / "gen.jsonl").write_text("".join(json.dumps(d) + "\n" for d in gen))
    common = "dataset_path: json\ntest_split: test\n"
    data = lambda name: f"dataset_kwargs:\n  data_files:\n    test: {root / name}\n  cache_dir: {root / 'hf'}\n"
    mc = root / "toy_mc.yaml"
    mc.write_text(
        "task: toy_mc\noutput_type: multiple_choice\n"
        + common
        + data("mc.jsonl")
        + 'doc_to_text: "{{query}}"\ndoc_to_target: "{{label}}"\ndoc_to_choice: "{{choices}}"\n'
        + "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        + "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
    )
    gen_yaml = root / "toy_gen.yaml"
    gen_yaml.write_text(
        "task: toy_gen\noutput_type: generate_until\n"
        + common
        + data("gen.jsonl")
        + 'doc_to_text: "{{q}}"\ndoc_to_target: "{{a}}"\n'
        + "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 6\n  do_sample: false\n"
        + "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return mc, gen_yaml


def greedy_text(model: GPT, tok: Tokenizer, prompt: str, n: int) -> str:
    ids = generate(model, [tok.encode(prompt)], SamplingConfig(max_new_tokens=n, stop_ids=(tok.eot_id,)))[0]
    return tok.decode(ids).split("\n")[0]


@pytest.fixture(scope="module")
def local_tasks(tiny, tmp_path_factory) -> tuple[Path, Path]:
    model, tok, _ = tiny
    # the model's own greedy answer for the first half of the prompts, a wrong one for the rest: exact_match 0.5
    answers = [greedy_text(model, tok, q, 6) if i < 3 else "never said" for i, q in enumerate(GEN_PROMPTS)]
    assert all(a.strip() == a and a for a in answers[:3]), answers  # lm-eval compares stripped strings
    return write_tasks(tmp_path_factory.mktemp("tasks"), answers)


def test_local_tasks_end_to_end_through_simple_evaluate(tiny, lm, local_tasks):
    model, tok, _ = tiny
    mc, gen = local_tasks
    metrics = task_metrics(run_tasks(lm, [str(mc), str(gen)]))
    acc = acc_norm = 0
    for doc in MC_DOCS:
        lls = [direct_logprob(model, *encode_pair(tok, doc["query"], " " + c))[0] for c in doc["choices"]]
        acc += max(range(4), key=lambda k: lls[k]) == doc["label"]
        acc_norm += max(range(4), key=lambda k: lls[k] / len(" " + doc["choices"][k])) == doc["label"]
    assert metrics["toy_mc"]["acc"] == pytest.approx(acc / len(MC_DOCS))
    assert metrics["toy_mc"]["acc_norm"] == pytest.approx(acc_norm / len(MC_DOCS))
    assert metrics["toy_mc"]["acc_stderr"] == pytest.approx(
        math.sqrt((acc / 10) * (1 - acc / 10) / 9), abs=1e-6
    )  # lm-eval's sample standard error of a mean
    assert metrics["toy_mc"]["samples"] == 10
    assert metrics["toy_gen"]["exact_match"] == 0.5
    assert metrics["toy_gen"]["samples"] == 6


def test_stage_and_cli_write_metrics(tiny, local_tasks, tmp_path, monkeypatch):
    from llmcore.cli import app as cli
    from stages.benchmark import app as stage

    _, _, folder = tiny
    mc, gen = local_tasks
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(
        "hardware: {device: cpu, precision: fp32, threads: null}\n"
        f"benchmark: {{models: [tiny], tasks: ['{mc}'], limit: 4, num_fewshot: null, batch_size: 4, seed: 1}}\n"
    )
    args = ["--params", "params.yaml", "--models", str(folder.parent), "--reports", "reports/benchmark/tiny"]
    result = CliRunner().invoke(stage, ["--name", "tiny", *args])
    assert result.exit_code == 0, result.output
    metrics = json.loads(Path("reports/benchmark/tiny/metrics.json").read_text())
    assert metrics["model"] == "tiny" and metrics["limit"] == 4 and metrics["truncated_requests"] == 0
    assert set(metrics["tasks"]["toy_mc"]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "samples"}
    assert metrics["tasks"]["toy_mc"]["samples"] == 4

    result = CliRunner().invoke(cli, ["benchmark", str(folder), "--tasks", f"{gen}", "--limit", "2", "-o", "m.json"])
    assert result.exit_code == 0, result.output
    assert json.loads(Path("m.json").read_text())["tasks"]["toy_gen"]["samples"] == 2
    assert 'toy_gen: {"exact_match": ' in result.output


def test_bad_input_is_one_line(tiny, local_tasks, tmp_path, monkeypatch):
    from llmcore.cli import app as cli
    from stages.benchmark import app as stage

    _, tok, folder = tiny
    mc, _ = local_tasks

    def error(result) -> str:
        assert result.exit_code == 1, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.output
        return lines[0]

    run = lambda *args: CliRunner().invoke(cli, ["benchmark", *map(str, args)])
    with pytest.raises(LLMCoreError, match=r"unknown task 'toy_mcq': .*; did you mean toy_mc\?"):
        task_manager(["toy_mcq"], include_path=mc.parent, include_defaults=False)  # indexing lm-eval's own: 20 s
    assert "no such task file" in error(run(folder, "--tasks", tmp_path / "missing.yaml"))
    broken = tmp_path / "broken.yaml"
    broken.write_text(mc.read_text().replace("mc.jsonl", "absent.jsonl").replace("toy_mc", "toy_broken"))
    assert error(run(folder, "--tasks", broken)).startswith(f"error: tasks {broken}: FileNotFoundError: ")

    clf_dir = tmp_path / "classify"
    torch.manual_seed(0)
    classifier = GPTClassifier(GPT(ModelConfig.from_preset("gpt2-tiny", vocab_size=tok.vocab_size)), num_classes=2)
    save_classifier(clf_dir, classifier, tok, ["ham", "spam"])
    assert "not a causal language model; benchmarking needs one" in error(run(clf_dir, "--tasks", mc))

    monkeypatch.chdir(tmp_path)
    paths = ["--params", "params.yaml", "--models", "data/models", "--reports", "reports/benchmark/tiny"]
    Path("params.yaml").write_text("hardware: {device: cpu}\nbenchmark: {models: [tiny], tasks: []}\n")
    assert "benchmark.tasks: empty" in error(CliRunner().invoke(stage, ["--name", "tiny", *paths]))
    Path("params.yaml").write_text("hardware: {device: cpu}\nbenchmark: {models: [tiny], tasks: [x], limit: 0}\n")
    assert "benchmark.limit" in error(CliRunner().invoke(stage, ["--name", "tiny", *paths]))


def test_benchmark_rows_pair_ours_with_published_figures(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text(
        json.dumps({"tasks": {"hellaswag": {"acc": 0.25, "acc_norm": 0.26, "samples": 200}, "arc_easy": {"acc": 0.4}}})
    )
    rows = benchmark_rows(path)
    assert [(r["metric"], r["ours"], r["published"]) for r in rows] == [
        ("acc", 0.25, 0.2892),
        ("acc_norm", 0.26, 0.3114),
        ("acc", 0.25, 0.2859),
        ("acc_norm", 0.26, 0.2955),
    ]
    assert all("llm.c" in r["source"] and r["model"] == "GPT-2 124M" for r in rows)
    assert benchmark_rows({"tasks": {"arc_easy": {"acc": 0.4}}}) == []
    assert {p.task for p in PUBLISHED} == {"hellaswag"}
    with pytest.raises(LLMCoreError, match="run the benchmark stage"):
        benchmark_rows(tmp_path / "absent.json")


def test_sampled_generation_follows_the_seed(tiny):
    model, tok, _ = tiny
    kwargs = {"until": ["zz"], "max_gen_toks": 10, "do_sample": True, "temperature": 1.0, "seed": 7}
    lm = LLMCoreLM(model=(model, tok), device="cpu")
    (text,) = lm.generate_until([Req("a dog", kwargs)])
    cfg = SamplingConfig(max_new_tokens=10, temperature=1.0, seed=7, stop_ids=(tok.eot_id,))
    assert text == tok.decode(generate(model, [tok.encode("a dog")], cfg)[0])
    (greedy,) = lm.generate_until([Req("a dog", {**kwargs, "do_sample": False})])
    assert text != greedy  # 10 tokens sampled at temperature 1 from a random model: not the greedy ones


def test_registered_with_lm_eval_as_llmcore(tiny):
    from lm_eval.api.registry import get_model

    _, _, folder = tiny
    lm = get_model("llmcore").create_from_arg_string(
        f"pretrained={folder},batch_size=4,max_length=64", {"device": "cpu", "batch_size": None}
    )
    assert isinstance(lm, LLMCoreLM) and lm.batch_size == 4 and lm.max_length == 64 and lm.name == "tiny"
    with pytest.raises(LLMCoreError, match=r"unknown model_args \['dtype'\]"):
        get_model("llmcore").create_from_arg_string(f"pretrained={folder},dtype=float16")


def test_hub_tasks_offline_fail_at_once_in_one_line(tiny, local_tasks, tmp_path, monkeypatch):
    """A Hub task with the Hub unreachable: one line before any dataset is asked for (datasets would retry for a
    minute); local task files need no Hub; HF_DATASETS_OFFLINE=1 skips the check (datasets from the local cache)."""
    from llmcore.cli import app as cli
    from llmcore.eval import harness

    _, _, folder = tiny
    mc, _ = local_tasks
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once, never the network
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    asked = []
    monkeypatch.setattr(harness.lm_eval, "simple_evaluate", lambda **kw: asked.append(kw) or {})
    result = CliRunner().invoke(cli, ["benchmark", str(folder), "--tasks", "hellaswag", "--limit", "2"])
    assert result.exit_code == 1 and asked == []
    (line,) = result.output.strip().splitlines()
    assert line.startswith(
        "error: tasks hellaswag: their datasets come from the Hugging Face Hub, and http://127.0.0.1:9 is unreachable ("
    )
    assert "HF_DATASETS_OFFLINE=1" in line

    manager = harness.task_manager([str(mc), "hellaswag"])
    assert harness.hub_tasks([str(mc), "hellaswag"], manager) == ["hellaswag"]
    harness.check_hub([])  # a local task file: nothing to check
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    harness.check_hub(["hellaswag"])  # offline on purpose: datasets reads its cache, no probe
