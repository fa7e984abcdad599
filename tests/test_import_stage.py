"""The `import` stage end to end: a tiny random GPT-2 saved by transformers in the Hub layout, served from a
loopback mirror, imported through the stage CLI, and checked against transformers (the oracle); failures
(digest mismatch, truncated file) leave no model folder; export back to the HF layout; a tiny Llama-3 with a
tiktoken-format tokenizer.model imported from a local folder.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import shlex
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from llmcore.common import LLMCoreError
from llmcore.text.bpe import train_bpe
from llmcore.text.tokenizer import Tokenizer
from llmcore.weights.hf_convert import load_hf
from llmcore.weights.hub import HFCheckpoint
from llmcore.weights.model_dir import load_model_dir, save_model_dir
from llmcore.weights.weight_file import save_checkpoint
from tests.conftest import REPO_ROOT, require_shared

transformers = pytest.importorskip("transformers")

REV = "0123456789abcdef0123456789abcdef01234567"
HUB_DIR = Path("huggingface.co/openai-community/gpt2/resolve") / REV
CORPUS = "\n\n".join(
    f"Paragraph {i}: the quick brown fox jumps over the lazy dog, and 'tis {i * 7} times faster than you'd think."
    for i in range(40)
)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def randomized(model):
    with torch.no_grad():  # non-trivial biases and norms, so a dropped or transposed tensor would show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def hf_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=50257,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return randomized(transformers.GPT2LMHeadModel(cfg))


@pytest.fixture(scope="module")
def hub_files(hf_gpt2, tmp_path_factory) -> Path:
    """config.json + model.safetensors exactly as save_pretrained writes them."""
    path = tmp_path_factory.mktemp("hub")
    hf_gpt2.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture
def workdir(tmp_path, monkeypatch, mirror_dir) -> Path:
    """A project-like cwd: data/raw holds GPT-2's BPE files (from the shared mirror) and a small corpus."""
    bpe = require_shared(mirror_dir / "openaipublic.blob.core.windows.net/gpt-2/encodings/main")
    raw = tmp_path / "data" / "raw"
    (raw / "gpt2-bpe").mkdir(parents=True)
    shutil.copy(bpe / "encoder.json", raw / "gpt2-bpe" / "encoder.json")
    shutil.copy(bpe / "vocab.bpe", raw / "gpt2-bpe" / "vocab.bpe")
    (raw / "tiny").mkdir()
    (raw / "tiny" / "text.txt").write_text(CORPUS, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def serve_mirror(http_dir, monkeypatch, root: Path, files: Path, truncate: bool = False) -> None:
    dest = root / HUB_DIR
    dest.mkdir(parents=True)
    shutil.copy(files / "config.json", dest / "config.json")
    data = (files / "model.safetensors").read_bytes()
    (dest / "model.safetensors").write_bytes(data[: len(data) // 2] if truncate else data)
    monkeypatch.setenv("LLMCORE_MIRROR", http_dir(root))


def write_params(sources: dict, eval_tokens: int = 200) -> None:
    section = {
        "models": [],
        "sources": sources,
        "corpus": "tiny",
        "val_fraction": 0.2,
        "eval_tokens": eval_tokens,
        "eval_context": 1024,
        "device": "cpu",
    }
    Path("params.yaml").write_text(yaml.safe_dump({"import": section}))


def run_stage(*args: str):
    """The stage as dvc.yaml's `import@<name>` runs it (its paths, the name in them), ``args`` (``--name`` first)."""
    from stages.import_weights import app

    name = args[1]
    cmd = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]["import"]["do"]["cmd"]
    words = shlex.split(cmd.replace("${item}", name))
    words = words[words.index("stages.import_weights") + 1 :]
    del words[words.index("--name") : words.index("--name") + 2]
    return CliRunner().invoke(app, [*args, *words])


def error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_import_matches_transformers(workdir, hf_gpt2, hub_files, http_dir, monkeypatch):
    from llmcore.models.generate import SamplingConfig, generate

    serve_mirror(http_dir, monkeypatch, workdir / "mirror", hub_files)
    digest = sha256(hub_files / "model.safetensors")
    write_params({"tiny-gpt2": {"repo": "openai-community/gpt2", "revision": REV, "sha256": digest}})
    result = run_stage("--name", "tiny-gpt2")
    assert result.exit_code == 0, result.output

    # DVC's outs: the model folder and the metrics, at the default paths
    model, tok = load_model_dir("data/models/tiny-gpt2")
    assert sorted(p.name for p in Path("data/models/tiny-gpt2").iterdir()) == ["model.safetensors", "tokenizer.json"]
    assert (tok.kind, tok.vocab_size, tok.eot_id) == ("gpt2", 50257, 50256)

    idx = torch.randint(0, 50257, (2, 40))
    with torch.no_grad():
        assert (model(idx).logits - hf_gpt2(idx).logits).abs().max().item() < 1e-4
        prompt = tok.encode("The quick brown fox")
        ref = hf_gpt2.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, pad_token_id=0)
    got = generate(model, [prompt], SamplingConfig(max_new_tokens=20))[0]
    assert got == ref[0, len(prompt) :].tolist()

    m = json.loads(Path("reports/import/tiny-gpt2/metrics.json").read_text())
    facts = json.loads(Path("reports/import/tiny-gpt2/facts.json").read_text())
    assert facts["sha256"] == digest and facts["revision"] == REV and facts["family"] == "gpt2"
    assert m["download_bytes"] == sum((hub_files / f).stat().st_size for f in ("config.json", "model.safetensors"))
    assert m["params"] == hf_gpt2.num_parameters() == model.num_params()
    # the loss, recomputed with transformers over the same 64-token windows of the corpus' tail
    ids = tok.encode(CORPUS[int(len(CORPUS) * 0.8) :], allow_special=False)[:201]
    nll, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, 64):
            x, y = torch.tensor([ids[s : s + 64]]), torch.tensor([ids[s + 1 : s + 65]])
            logits = hf_gpt2(x[:, : y.shape[1]]).logits
            nll += torch.nn.functional.cross_entropy(logits[0], y[0], reduction="sum").item()
            n += y.numel()
    assert m["eval_tokens"] == n == 200
    assert m["val_loss"] == pytest.approx(nll / n, abs=1e-4)
    assert m["val_ppl"] == pytest.approx(math.exp(nll / n), rel=1e-3)
    assert 0 < m["val_bpb"] < m["val_loss"] / math.log(2)  # several bytes per GPT-2 token

    # a second run reuses the verified download
    monkeypatch.setenv("LLMCORE_MIRROR", str(workdir / "nowhere"))
    assert run_stage("--name", "tiny-gpt2").exit_code == 0


def test_export_round_trip(workdir, hf_gpt2, hub_files):
    """llmcore model folder -> `llmcore export` -> transformers loads it -> the same logits."""
    from llmcore.cli import app as cli

    raw = Path("data/raw/gpt2-bpe")
    save_model_dir("data/models/m", load_hf(hub_files), Tokenizer.gpt2(raw / "encoder.json", raw / "vocab.bpe"))
    result = CliRunner().invoke(cli, ["export", "data/models/m", "--out", "hf-out"])
    assert result.exit_code == 0, result.output
    reloaded = transformers.AutoModelForCausalLM.from_pretrained("hf-out").eval()
    ours, _ = load_model_dir("data/models/m")
    idx = torch.randint(0, 50257, (1, 30))
    with torch.no_grad():
        ref = ours(idx).logits
        assert (reloaded(idx).logits - ref).abs().max().item() < 1e-5
        assert (hf_gpt2(idx).logits - ref).abs().max().item() < 1e-4


def test_export_refuses_a_classifier(tmp_path):
    from llmcore.cli import app as cli
    from llmcore.models.config import ModelConfig
    from llmcore.models.gpt import GPT
    from llmcore.text.tokenizer import Tokenizer

    save_checkpoint(tmp_path / "model.safetensors", GPT(ModelConfig.from_preset("gpt2-tiny")), {"task": "classify"})
    Tokenizer.char("a classifier's tokenizer").save(tmp_path / "tokenizer.json")
    result = CliRunner().invoke(cli, ["export", str(tmp_path), "--out", str(tmp_path / "hf")])
    assert "a 'classify' checkpoint, not a causal language model; export needs one" in error_line(result)
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("failure", ["digest", "truncated"])
def test_bad_download_leaves_no_model(failure, workdir, hub_files, http_dir, monkeypatch):
    serve_mirror(http_dir, monkeypatch, workdir / "mirror", hub_files, truncate=failure == "truncated")
    source = {"repo": "openai-community/gpt2", "revision": REV}
    if failure == "digest":
        source["sha256"] = "0" * 64
    write_params({"tiny-gpt2": source})
    line = error_line(run_stage("--name", "tiny-gpt2"))
    assert ("sha256 mismatch" if failure == "digest" else "truncated or corrupt") in line
    assert "model.safetensors" in line
    assert not Path("data/models/tiny-gpt2").exists()
    assert not Path("reports/import/tiny-gpt2").exists()
    # nothing bad stays in the download cache for a rerun to trust
    cached = Path("data/hub/openai-community/gpt2") / REV
    assert not (cached / "model.safetensors").exists()
    # (no temporary file; config.json's download record may stay: it describes the good config.json)
    assert not [p for p in cached.iterdir() if p.name.startswith(".") and not p.name.endswith(".download.json")]


def test_known_size_must_match_its_preset(workdir, hub_files, http_dir, monkeypatch):
    serve_mirror(http_dir, monkeypatch, workdir / "mirror", hub_files)
    write_params({"gpt2-124m": {"revision": REV}})  # the table's repo, a test revision: no digest applies
    line = error_line(run_stage("--name", "gpt2-124m"))
    assert "does not match preset gpt2-124m: context_length is 64, expected 1024" in line
    assert not Path("data/models/gpt2-124m").exists()


def test_name_and_source_errors(workdir):
    write_params({})
    assert "not a known checkpoint (gpt2-124m, gpt2-355m" in error_line(run_stage("--name", "mystery"))
    assert "letters, digits" in error_line(run_stage("--name", "../escape"))
    assert "no such folder" in error_line(run_stage("--name", "x", "--from-dir", "missing"))


def test_resolve_source_merges_params_with_the_table():
    from stages.import_weights import ImportParams, Source, resolve_source

    pinned = resolve_source("gpt2-355m", ImportParams())
    assert pinned.revision == "6dcaa7a952f72f9298047fd5137cd6e4f05f41da" and len(pinned.sha256) == 64
    moved = resolve_source("gpt2-355m", ImportParams(sources={"gpt2-355m": Source(revision="main")}))
    assert (moved.repo, moved.revision, moved.sha256, moved.preset) == (pinned.repo, "main", None, "gpt2-355m")
    assert moved.url("config.json") == "https://huggingface.co/openai-community/gpt2-medium/resolve/main/config.json"
    local = resolve_source("mine", ImportParams(sources={"mine": Source(dir="/some/where")}))
    assert local == Path("/some/where")
    assert isinstance(resolve_source("gpt2-124m", ImportParams()), HFCheckpoint)


def test_load_model_dir_names_what_is_missing(tmp_path):
    with pytest.raises(LLMCoreError, match=r"gpt2-124m: no such model folder .*import\.models"):
        load_model_dir(tmp_path / "gpt2-124m")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "tokenizer.json").write_text("{}")
    with pytest.raises(LLMCoreError, match=r"m: no model\.safetensors"):
        load_model_dir(tmp_path / "m")


def test_save_model_dir_replaces_whole_folders(tmp_path):
    from llmcore.models.config import ModelConfig
    from llmcore.models.gpt import GPT

    tok = Tokenizer.char("abc")
    small, other = (GPT(ModelConfig.from_preset("gpt2-tiny", vocab_size=v, n_layers=1)) for v in (4, 8))
    save_model_dir(tmp_path / "m", small, tok)
    save_model_dir(tmp_path / "m", other, tok, {"note": "second"})
    model, _ = load_model_dir(tmp_path / "m")
    assert model.cfg.vocab_size == 8
    too_small = GPT(ModelConfig.from_preset("gpt2-tiny", vocab_size=3, n_layers=1))
    with pytest.raises(LLMCoreError, match="tokenizer has 4 ids, model only 3"):
        save_model_dir(tmp_path / "new", too_small, tok)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary or half-written folders


def test_llama_from_local_dir(workdir):
    """A tiny Llama-3 in the HF layout with Meta's tiktoken-format tokenizer.model under original/."""
    from tiktoken.load import load_tiktoken_bpe

    ranks = train_bpe(CORPUS, 300, pattern="gpt4", special_tokens=[])
    folder = workdir / "Llama-tiny"
    (folder / "original").mkdir(parents=True)
    lines = [f"{base64.b64encode(tok).decode()} {rank}" for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])]
    (folder / "original" / "tokenizer.model").write_text("\n".join(lines) + "\n")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(ranks) + 256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    hf_llama = randomized(transformers.LlamaForCausalLM(cfg))
    hf_llama.save_pretrained(folder, safe_serialization=True)

    write_params({})
    result = run_stage("--name", "llama-tiny", "--from-dir", str(folder))
    assert result.exit_code == 0, result.output
    model, tok = load_model_dir("data/models/llama-tiny")
    idx = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        assert (model(idx).logits - hf_llama(idx).logits).abs().max().item() < 1e-4

    # tiktoken's own reader agrees on the ranks; the specials follow them in Meta's order
    expected = load_tiktoken_bpe(str(folder / "original" / "tokenizer.model"))
    n = len(expected)
    assert tok.vocab_size == cfg.vocab_size == n + 256
    assert tok.special_tokens["<|begin_of_text|>"] == n and tok.eot_id == n + 1
    assert tok.special_tokens["<|eot_id|>"] == n + 9
    text = "the lazy dog's 12345 times"
    assert tok.decode(tok.encode(text)) == text
    assert all(tok.token_bytes(i) == t for t, i in expected.items() if i % 37 == 0)
    m = json.loads(Path("reports/import/llama-tiny/metrics.json").read_text())
    facts = json.loads(Path("reports/import/llama-tiny/facts.json").read_text())
    assert (facts["family"], m["download_bytes"], facts["sha256"]) == ("llama", 0, sha256(folder / "model.safetensors"))
    assert m["params"] == hf_llama.num_parameters()


def test_llama_without_tiktoken_tokenizer_is_refused(workdir):
    folder = workdir / "Llama-sp"
    cfg = transformers.LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=64,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    (folder / "tokenizer.model").write_bytes(b"\n\x0e\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02")  # sentencepiece-ish
    write_params({})
    line = error_line(run_stage("--name", "sp", "--from-dir", str(folder)))
    assert "tokenizer.model: line 2 is not '<base64 token> <rank>'" in line  # line 1 is empty
    assert not Path("data/models/sp").exists()
