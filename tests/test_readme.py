"""The manual's commands for newcomers (README and docs/), run as written (model folders and ports swapped for
test ones): judging with `llmcore serve` in place of Ollama, the deterministic curl example that matches `ask`,
`classify predict`."""

from __future__ import annotations

import json
import re
import shlex
import threading
import time
import urllib.request

import pytest
import torch
import typer
import yaml
from typer.testing import CliRunner

from llmcore import cli
from llmcore.eval.judge import shortfall
from llmcore.models.classifier import GPTClassifier
from llmcore.models.config import ModelConfig
from llmcore.models.gpt import GPT
from llmcore.serve import app as serve_module
from llmcore.serve.app import make_server
from llmcore.serve.models import ModelHandle
from llmcore.serve.ollama_api import sampling_from_options
from llmcore.text.tokenizer import Tokenizer
from llmcore.weights.model_dir import save_classifier, save_model_dir
from stages import evaluate
from tests.conftest import REPO_ROOT
from tests.docs import doc_section
from tests.fixed_reply import TEXT, save_fixed_reply_model

section = doc_section  # the section headed so, on whichever page of the manual holds it


def commands(text: str) -> list[list[str]]:
    """The shell commands of the ```bash blocks (and the ``$ `` lines of ```console blocks) in ``text``, split into
    words (comments and a trailing & dropped)."""
    out = []
    for kind, block in re.findall(r"```(bash|console)\n(.*?)```", text, re.DOTALL):
        for line in block.splitlines():
            if kind == "console" and not line.startswith("$ "):
                continue  # output, not a command
            words = shlex.split(line.removeprefix("$ "), comments=True)
            if words:
                out.append(words[:-1] if words[-1] == "&" else words)
    return out


def command(text: str, *prefix: str) -> list[str]:
    found = [c for c in commands(text) if c[: len(prefix)] == list(prefix)]
    assert len(found) == 1, f"docs: expected one `{' '.join(prefix)}` command, found {found}"
    return found[0]


def option(words: list[str], name: str) -> str:
    return words[words.index(name) + 1]


@pytest.fixture
def running_cli_server(monkeypatch):
    """Runs `llmcore serve ARGS` (the real CLI) in a thread; yields a function that starts it and returns its URL."""
    servers, threads = [], []

    def spy(models, host, port, max_body, **limits):
        servers.append(make_server(models, host, port, max_body, **limits))
        return servers[-1]

    monkeypatch.setattr(serve_module, "make_server", spy)

    def start(args: list[str]) -> str:
        command = typer.main.get_command(cli.app)  # run as the shell would, without swapping sys.stdout
        thread = threading.Thread(target=command.main, args=(args,), kwargs={"standalone_mode": False}, daemon=True)
        thread.start()
        threads.append(thread)
        deadline = time.monotonic() + 60
        while not servers and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert servers, "llmcore serve did not start"
        return servers[-1].url

    yield start
    for s in servers:
        s.shutdown()
    for t in threads:
        t.join(10)


def test_judge_with_llmcore_serve_as_the_readme_says(tmp_path, running_cli_server):
    text = section("Judge the answers with Ollama or `llmcore serve`")
    serve = command(text, "llmcore", "serve")
    exp = command(text, "dvc", "exp", "run", "-S", "evaluate.judge.host=http://127.0.0.1:11435")
    # the documented command, with a judge that answers 85 to everything instead of the tiny instruct model
    serve[serve.index("--model") + 1] = str(save_fixed_reply_model(tmp_path / "judge", "85"))
    serve[serve.index("--port") + 1] = "0"
    assert option(serve, "--name") == "judge"
    url = running_cli_server(serve[1:] + ["--template", "raw"])

    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))
    for key, value in (exp[i + 1].split("=", 1) for i, word in enumerate(exp) if word == "-S"):
        *parents, leaf = key.split(".")
        target = params
        for p in parents:
            target = target[p]
        assert leaf in target, f"docs: -S {key}: no such key in params.yaml"
        target[leaf] = yaml.safe_load(value)
    assert params["evaluate"]["judge"]["host"] == "http://127.0.0.1:11435"
    params["evaluate"]["judge"]["host"] = url
    params["evaluate"]["judge_mode"] = "required"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    responses = [{"instruction": "Name a primary colour.", "input": "", "output": "Red.", "model_response": "Blue."}]
    (tmp_path / "responses.json").write_text(json.dumps(responses))
    model = tmp_path / "instruct"
    save_model_dir(model, *tiny_lm())
    args = [
        "--params",
        str(tmp_path / "params.yaml"),
        "--responses",
        str(tmp_path / "responses.json"),
        "--model-dir",
        str(model),
        "--cache",
        str(tmp_path / "cache.jsonl"),
        "--reports",
        str(tmp_path / "r"),
    ]
    result = CliRunner().invoke(evaluate.app, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    facts = json.loads((tmp_path / "r" / "facts.json").read_text())
    assert (facts["judge_status"], facts["judge_model"], metrics["mean"]) == ("scored", "judge:latest", 85.0)

    # the error the docs quote is the one the stage prints
    quoted = re.search(r"`(error: the judge .*?)`", text, re.DOTALL).group(1)
    summary = {"n_items": 110, "n_scored": 0, "n_refused": 110, "n_error": 0}
    made = shortfall(summary, 0.9, "the judge 'judge:latest' at http://127.0.0.1:11435")
    assert " ".join(quoted.split()) == f"error: {made}"
    assert '"ollama>=' in (REPO_ROOT / "pyproject.toml").read_text()  # the Python client comes with the project


def tiny_lm() -> tuple[GPT, Tokenizer]:
    """A random one-block Llama: it rambles (no end-of-text) for the whole 256 tokens, quickly."""
    tok = Tokenizer.train(TEXT, 300)
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(
        "llama3-tiny",
        vocab_size=tok.vocab_size,
        context_length=512,
        n_layers=1,
        emb_dim=32,
        n_heads=2,
        n_kv_heads=1,
        hidden_dim=64,
    )
    return GPT(cfg), tok


def test_deterministic_curl_example_equals_ask(tmp_path):
    text = section("Chat with your model: `llmcore serve`")
    (curl,) = [c for c in commands(text) if c[0] == "curl" and "/api/generate" in c[1]]
    body = json.loads(option(curl, "-d"))  # valid JSON, as a shell would pass it
    assert body["options"]["temperature"] == 0 and body["stream"] is False
    ask = command(text, "llmcore", "ask")
    assert ask[2] == body["prompt"]
    # "like Ollama, the server samples at 0.8 unless told otherwise"
    assert sampling_from_options({}, 256)[0].temperature == 0.8

    folder = tmp_path / body["model"]
    save_model_dir(folder, *tiny_lm(), metadata={"template": "alpaca"})  # as the instruct stage stores it
    server = make_server({f"{body['model']}:latest": ModelHandle.load(folder)}, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        path = curl[1].split("11435", 1)[1]
        request = urllib.request.Request(server.url + path, data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(request, timeout=60) as r:
            reply = json.loads(r.read())
    finally:
        server.shutdown()
    result = CliRunner().invoke(cli.app, ask[1:] + ["--model", str(folder)])
    assert result.exit_code == 0, result.output
    assert reply["eval_count"] == 256 and result.output == reply["response"] + "\n"  # num_predict = ask's limit


def test_classify_predict_as_the_readme_says(tmp_path):
    text = section("From the command line: `llmcore ask`, `llmcore chat`, `llmcore classify`")
    tok = Tokenizer.train(TEXT, 300)
    torch.manual_seed(0)
    gpt = GPT(ModelConfig.from_preset("gpt2-tiny", vocab_size=tok.vocab_size, n_layers=1))
    save_classifier(tmp_path / "clf", GPTClassifier(gpt, num_classes=2), tok, ["ham", "spam"])
    args, piped = (c for c in commands(text) if c[:2] == ["llmcore", "classify"])
    assert piped[2:] == ["<", "messages.txt"]
    messages = args[2:]
    result = CliRunner().invoke(cli.app, ["classify", *messages, "--model", str(tmp_path / "clf")])
    assert result.exit_code == 0, result.output
    rows = [line.split("\t") for line in result.output.splitlines()]
    assert [r[2] for r in rows] == messages and {r[0] for r in rows} <= {"ham", "spam"}
    assert all(0.5 <= float(r[1]) <= 1 for r in rows)  # the probability of the predicted label
    stdin = CliRunner().invoke(cli.app, ["classify", "--model", str(tmp_path / "clf")], input="\n".join(messages))
    assert stdin.output == result.output
