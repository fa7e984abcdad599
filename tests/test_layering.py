"""The package map (docs/architecture.md) as a test: a lower layer never imports a higher one.

Every import in ``llmcore/`` counts, including imports inside functions (the late imports that keep the CLI
fast are still dependencies). ``stages/`` and ``benchmarks/`` sit above the library and may import anything;
the library never imports them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tools.deps import imported_modules  # the walker that also keeps dvc.yaml's code deps

# low -> high; a module may import its own layer and the ones below it.
LAYERS: list[tuple[str, ...]] = [
    ("common", "threads", "params"),  # torch-free helpers; the CPU thread policy; the params.yaml loader
    ("device", "download"),  # devices/dtypes/seeding, the downloader
    ("text",),  # tokenizers and prompt templates
    ("models",),  # the transformer, its ops, LoRA, the classifier head, decoding
    ("weights",),  # weight files, model folders, HF conversion, Hub checkpoints
    ("data",),  # datasets, token files, batches
    ("training",),  # the loop, its state, DDP
    ("eval",),  # measurement: metrics, baselines, bits per byte, the judge, the harness adapter, paired statistics
    ("serve",),  # the HTTP server
    ("report",),  # presentation: the report card, its renderer and figures, the experiments page
    ("cli",),  # the `llmcore` command
]
RANK = {room: i for i, rooms in enumerate(LAYERS) for room in rooms}
PACKAGE = REPO_ROOT / "llmcore"


def room_of(module: str) -> str | None:
    """'llmcore.models.gpt' -> 'models'; the package itself (``llmcore``) has no room."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "llmcore" and parts[1] != "__init__" else None


def library_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_room_is_in_the_map():
    rooms = {p.relative_to(PACKAGE).with_suffix("").parts[0] for p in library_modules()} - {"__init__"}
    missing = sorted(rooms - set(RANK))
    assert not missing, f"add these to LAYERS (and to the package map in docs/architecture.md): {missing}"


@pytest.mark.parametrize("path", library_modules(), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_lower_layers_never_import_higher_ones(path: Path):
    me = room_of(".".join(path.relative_to(REPO_ROOT).with_suffix("").parts))
    bad = []
    for module in sorted(imported_modules(path)):
        top = module.split(".")[0]
        if top in ("stages", "benchmarks", "tests"):
            bad.append(f"{module} (the library never imports entry points)")
            continue
        room = room_of(module)
        if me is None or room is None or room not in RANK:
            continue
        if RANK[room] > RANK[me]:
            bad.append(f"{module} (layer {room} is above {me})")
    assert not bad, f"{path.relative_to(REPO_ROOT)} imports upward: {'; '.join(bad)}"


def test_common_is_torch_free():
    """``llmcore.common`` is what the CLI imports before deciding to load torch (fast ``--help``)."""
    assert "torch" not in {m.split(".")[0] for m in imported_modules(PACKAGE / "common.py")}
