"""Stage `export`: a model folder -> a GGUF file and an Ollama Modelfile, for llama.cpp, Ollama and LM Studio.

One DVC stage per entry of ``export.models`` (``foreach``); the default ``[]`` generates none.

    python -m stages.export --name instruct --params params.yaml --models-dir data/models --out data/export/instruct
    ollama create instruct -f data/export/instruct/Modelfile && ollama run instruct

Outputs (written atomically; a refused model writes nothing):

    data/export/<name>/model.gguf    weights in ``export.precision``, tokenizer and chat template inside
    data/export/<name>/Modelfile     FROM ./model.gguf, the prompt template in Ollama's syntax, stop strings
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import typer

from llmcore.common import LLMCoreError, print0, stage_errors
from llmcore.params import NOT_A_DEP, load_section
from llmcore.weights.export import export_model
from llmcore.weights.gguf import PRECISIONS


@dataclass
class ExportParams:
    # folders under data/models: dvc.yaml's foreach expands it; each export@<name> depends on its own name only
    models: list[str] = field(default_factory=list, metadata={NOT_A_DEP: "expanded by dvc.yaml's foreach"})
    precision: str = "q8_0"  # GGUF weights: f32 | f16 | bf16 | q8_0
    template: str | None = None  # prompt template; None: the one stored with the model, else raw

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise LLMCoreError(f"export.precision: expected one of {'|'.join(PRECISIONS)}, got {self.precision!r}")


def load_params(path: Path) -> ExportParams:
    """Everything this stage reads from params.yaml: the ``export`` section (``models`` aside, see above)."""
    return load_section("export", ExportParams, path)


app = typer.Typer(add_completion=False)


@app.command()
def main(
    name: str = typer.Option(..., help="model folder name under --models-dir (pretrain, instruct, gpt2-124m, ...)"),
    params: Path = typer.Option(..., help="params file"),
    models_dir: Path = typer.Option(..., help="where model folders are"),
    out: Path = typer.Option(..., help="output folder (the DVC stage: data/export/<name>)"),
) -> None:
    """Export one model folder as model.gguf + Modelfile."""
    with stage_errors():
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise LLMCoreError(f"--name {name!r}: use letters, digits, '.', '_' and '-' only")
        p = load_params(params)
        start = time.perf_counter()
        result = export_model(models_dir / name, out, fmt="gguf", precision=p.precision, template=p.template, name=name)
        size = (out / result.files[0]).stat().st_size
        print0(
            f"export: {models_dir / name} -> {out}/{{{','.join(result.files)}}} ({result.arch}, {p.precision}, "
            f"{size / 1e6:.1f} MB, template {result.template}) in {time.perf_counter() - start:.1f}s"
        )


if __name__ == "__main__":
    app()
