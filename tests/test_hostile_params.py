"""Hostile params files (issue #32, cases 12-13): every one ends in one line naming the file or the key, before a
stage writes anything, and the loader's memory stays flat however the YAML is built.

The table loads each file the way the stages do (``stages.pretrain.load_params``, ``stages.download.load_params``);
a property test then feeds the loader arbitrary documents and bytes.
"""

from __future__ import annotations

import dataclasses
import math
import re
import string
import tempfile
import time
import tracemalloc
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from llmcore.common import LLMCoreError
from llmcore.params import ParamsError, read_params
from llmcore.training.config import TrainConfig
from stages import download as download_stage
from stages import pretrain as pretrain_stage

BASE = """\
hardware: {device: cpu}
model: {preset: gpt2-tiny}
pretrain:
  train: {batch_size: 8, lr: 1.0e-3, max_steps: 10, grad_clip: 1.0}
  sample: {temperature: 0.8}
"""


def alias_bomb(levels: int) -> str:
    """The billion laughs: each level is nine aliases of the one before, 9**levels strings once expanded."""
    lines = ['  a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"  a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "model:\n  preset: gpt2-tiny\n  bomb:\n  " + "\n  ".join(lines) + "\n"


def with_train(key: str, value: str) -> str:
    return BASE.replace("max_steps: 10", f"max_steps: 10, {key}: {value}")


# (id, which stage's loader, file content, the one-line error it must give)
CASES = [
    ("not-utf8", "pretrain", BASE.encode() + b"  prompts: ['caf\xe9']\n", "not valid UTF-8"),
    ("empty-float-tag", "pretrain", BASE + "  baseline_k: !!float\n", "an explicit tag (!!float, !!int, ...) on an"),
    ("nested-too-deep", "pretrain", BASE + "  prompts: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper than"),
    ("epochs-inf", "pretrain", with_train("epochs", ".inf"), "pretrain.train.epochs: expected a finite number"),
    (
        "batch-size-1e12-string",
        "pretrain",
        BASE.replace("batch_size: 8", "batch_size: 1e12"),
        "pretrain.train.batch_size: expected int, got '1e12'",
    ),
    (
        "batch-size-1e12",
        "pretrain",
        BASE.replace("batch_size: 8", "batch_size: 1000000000000"),
        "pretrain.train.batch_size: expected a positive int up to",
    ),
    (
        "temperature-nan",
        "pretrain",
        BASE.replace("temperature: 0.8", "temperature: .nan"),
        "pretrain.sample.temperature: expected a finite number, got nan",
    ),
    (
        "grad-clip-nan",
        "pretrain",
        BASE.replace("grad_clip: 1.0", "grad_clip: .NaN"),
        "pretrain.train.grad_clip: expected a finite number, got nan",
    ),
    ("lr-inf", "pretrain", BASE.replace("lr: 1.0e-3", "lr: .inf"), "pretrain.train.lr: expected a finite number"),
    (
        "lr-overflows-to-inf",
        "pretrain",
        BASE.replace("lr: 1.0e-3", "lr: 1.0e+999"),
        "pretrain.train.lr: expected a finite number",
    ),
    (
        "model-dropout-nan",
        "pretrain",
        BASE.replace("{preset: gpt2-tiny}", "{preset: gpt2-tiny, dropout: .nan}"),
        "model.dropout: expected a finite number",
    ),
    ("duplicate-key", "pretrain", BASE + "  baseline_k: 0.01\n  baseline_k: 0.5\n", "duplicate key 'baseline_k'"),
    ("duplicate-section", "pretrain", BASE + "model: {preset: llama3-tiny}\n", "duplicate key 'model'"),
    (
        "alias-bomb",
        "pretrain",
        BASE.replace("model: {preset: gpt2-tiny}\n", "") + alias_bomb(9),
        "aliases expand to more than",
    ),
    (
        "recursive-alias",
        "pretrain",
        BASE.replace("{preset: gpt2-tiny}", "&m {preset: gpt2-tiny, x: [*m]}"),
        "refers to itself",
    ),
    (
        "url-template",
        "download",
        "download:\n  sources:\n    s: {url: 'https://x/{shard}-{0}.bin', shards: 2}\n",
        "download.sources.s.url: not a {shard} template",
    ),
    (
        "shards-1e12",
        "download",
        "download:\n  sources:\n    s: {url: 'https://x/{shard}.bin', shards: 1000000000000}\n",
        "download.sources.s.shards: expected a positive int up to",
    ),
]
LOADERS = {"pretrain": pretrain_stage.load_params, "download": download_stage.load_params}


def write(folder: Path, content: str | bytes) -> Path:
    path = folder / "params.yaml"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def test_base_params_load(tmp_path: Path) -> None:
    hw, p, model = pretrain_stage.load_params(write(tmp_path, BASE))
    assert p.train.max_steps == 10 and model == {"preset": "gpt2-tiny"}


@pytest.mark.parametrize("loader, content, fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_params_are_one_line(tmp_path: Path, loader: str, content: str | bytes, fragment: str) -> None:
    path = write(tmp_path, content)
    start = time.monotonic()
    with pytest.raises(ParamsError) as err:
        LOADERS[loader](path)
    msg = str(err.value)
    assert fragment in msg and "\n" not in msg, msg
    assert time.monotonic() - start < 2


def test_params_path_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").mkdir()
    with pytest.raises(ParamsError) as err:
        pretrain_stage.load_params(tmp_path / "params.yaml")
    assert "params.yaml" in str(err.value) and "directory" in str(err.value) and "\n" not in str(err.value)


def test_alias_bomb_memory_stays_flat(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace("model: {preset: gpt2-tiny}\n", "") + alias_bomb(9))  # 2.9 GB expanded
    tracemalloc.start()
    try:
        with pytest.raises(ParamsError, match="aliases"):
            pretrain_stage.load_params(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000


def test_small_anchors_still_work(tmp_path: Path) -> None:
    text = BASE + "  prompts: &p [a, b]\n  stride: null\nhw_copy: &hw {device: cpu}\n"
    text = text.replace("hardware: {device: cpu}", "hardware: {device: cpu}\nx: &x 3")
    data = read_params(write(tmp_path, text))
    assert data["pretrain"]["prompts"] == ["a", "b"] and data["x"] == 3


# --- property: any document, any bytes -> a valid config or one line ------------------------------------------

TRAIN_KEYS = [*TrainConfig.__dataclass_fields__, "nope"]
PRETRAIN_KEYS = ["windows", "stride", "prompts", "baseline_k", "sample"]
SAMPLE_KEYS = ["max_new_tokens", "temperature", "top_k", "top_p", "seed"]
HARDWARE_KEYS = ["device", "precision", "threads", "nproc", "peak_tflops", "head_loss"]
MODEL_KEYS = ["preset", "n_layers", "emb_dim", "n_heads", "n_kv_heads", "dropout", "norm_eps", "rope_theta", "x"]
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(["auto", "cpu", "fp32", "gpt2-tiny", "llama3-tiny", "random", "1e12", ".nan"])
    | st.text(string.printable, max_size=8)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)


def section(keys: list[str]):
    return st.dictionaries(st.sampled_from(keys), values, max_size=4)


YAML_BITS = [
    "&a ",
    "*a",
    "<<: ",
    "!!str ",
    "!!float ",
    "!!python/name:os.system ",
    ".nan",
    ".inf",
    "[",
    "]",
    "{",
    "}",
    ": ",
    "- ",
    "\n",
    "\n  ",
    "\t",
    "'",
    '"',
    "#",
    "? ",
    "1e9",
    "1.0e+999",
    "0x1F",
    "~",
    "\x00",
    "\ufeff",
    "%YAML 1.1\n",
    "---\n",
    "...",
]


def assert_one_line_or_valid(content: bytes) -> None:
    """The pretrain stage's loader (sections hardware, pretrain, model) on ``content``."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "params.yaml"
        path.write_bytes(content)
        try:
            loaded = pretrain_stage.load_params(path)
        except LLMCoreError as e:
            assert "\n" not in str(e) and str(e), repr(str(e))
        else:
            assert_finite(loaded, "params")


def assert_finite(value, where: str) -> None:
    """What a valid config means here: no NaN or infinity anywhere in what the loader returned."""
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            assert_finite(getattr(value, f.name), f"{where}.{f.name}")
    elif isinstance(value, dict):
        for k, v in value.items():
            assert_finite(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            assert_finite(v, f"{where}[{i}]")
    elif isinstance(value, float):
        assert math.isfinite(value), f"{where} = {value} was accepted"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(train={}, pretrain={}, sample={}, hardware={}, model={"preset": []})  # once a TypeError
@example(train={"grad_clip": math.nan}, pretrain={}, sample={}, hardware={}, model={})  # once accepted
@given(
    train=section(TRAIN_KEYS),
    pretrain=section(PRETRAIN_KEYS),
    sample=section(SAMPLE_KEYS),
    hardware=section(HARDWARE_KEYS),
    model=section(MODEL_KEYS),
)
def test_fuzz_documents(train: dict, pretrain: dict, sample: dict, hardware: dict, model: dict) -> None:
    doc = {
        "hardware": hardware,
        "model": {"preset": "gpt2-tiny", **model},
        "pretrain": {**pretrain, "train": {"max_steps": 5, **train}, "sample": sample},
    }
    assert_one_line_or_valid(yaml.safe_dump(doc).encode())


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pieces=st.lists(
        st.sampled_from(YAML_BITS) | st.text(string.ascii_lowercase + "_:0123456789.", max_size=6), max_size=30
    ),
    raw=st.binary(max_size=12),
)
def test_fuzz_text(pieces: list[str], raw: bytes) -> None:
    text = BASE + "  " + "".join(pieces)
    assert_one_line_or_valid(text.encode("utf-8", "surrogateescape") + raw)


# --- docs/hostile-input.md: every test its table names exists, every default it quotes is the code's -------------


def test_readme_hostile_input_table() -> None:
    from llmcore import download, params
    from llmcore.models import generate
    from llmcore.serve import guard, protocol
    from llmcore.training.config import MAX_BATCH_SIZE
    from tests.conftest import REPO_ROOT
    from tests.docs import doc_section

    section = doc_section("Hostile input")  # docs/hostile-input.md
    defined = set()
    for path in (REPO_ROOT / "tests").glob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)\(", path.read_text(encoding="utf-8"), re.MULTILINE))
    named = set(re.findall(r"`(test_\w+)`", section))
    assert named and named <= defined, sorted(named - defined)
    ids = {c[0] for c in CASES}
    for group in re.findall(r"`test_hostile_params_are_one_line` \(([^)]*)\)", section):
        assert set(group.split(", ")) <= ids, group
    d = download_stage.DownloadParams()
    quoted = [  # (the page's words, the code agreeing with them)
        ("`download.stall_timeout_s` (30 s)", d.stall_timeout_s == 30),
        ("under 1 KiB", download.STALL_BYTES == 1024),
        ("`retries` (5)", d.retries == 5),
        ("`file_deadline_s` (6 h)", d.file_deadline_s == 6 * 3600),
        ("`download.max_unzip_mb` (2048)", d.max_unzip_mb == 2048),
        ("`max_unzip_ratio` (100:1, for archives over 1 MiB)", d.max_unzip_ratio == 100),
        ("for archives over 1 MiB", download.RATIO_FLOOR == 2**20),
        ("nesting past 50 levels", params.MAX_DEPTH == 50),
        ("at most 100,000 values", params.MAX_NODES == 100_000),
        ("`batch_size` at most 2^20", MAX_BATCH_SIZE == 2**20),
        ("`shards` at most 100,000", download_stage.MAX_SHARDS == 100_000),
        ("a temperature below 1e-3 is greedy", generate.MIN_TEMPERATURE == 1e-3),
        ("above 1e4 counts as 1e4", generate.MAX_TEMPERATURE == 1e4),
        ("at most 16 stop strings", protocol.MAX_STOPS == 16),
        ("of at most 1000 characters each", protocol.MAX_STOP_CHARS == 1000),
        ("nested deeper than 32 levels", protocol.MAX_DEPTH == 32),
        ("within 30 s of its connection", guard.REQUEST_TIMEOUT == 30),
        ("at most 256 open connections", guard.MAX_CONNECTIONS == 256),
        ("headers over 16 KiB", guard.MAX_HEADER_BYTES == 16 * 1024),
        ("`LLMCORE_ALLOWED_HOSTS`", guard.HOSTS_ENV == "LLMCORE_ALLOWED_HOSTS"),
        ("`LLMCORE_ORIGINS`", guard.ORIGINS_ENV == "LLMCORE_ORIGINS"),
    ]
    for text, holds in quoted:
        assert text in section and holds, text
