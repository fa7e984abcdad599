"""Stage `check-params`: params.yaml validated as a whole, before any other stage runs.

    dvc repro check-params       # exit 1 with one line naming the first bad key; else data/params-checked.txt
    python -m stages.check_params --params params.yaml --out data/params-checked.txt   # its dvc.yaml command

DVC deletes a stage's outputs just before it runs the stage, so a typo that only the stage itself noticed would
cost the outputs of its last run. This stage depends on params.yaml as a file (any edit reruns it, a new
section too, which no stage declares as a param) and runs every stage's ``load_params``: the whole file is
checked the way each stage will read it. Every other stage depends on its output, so ``dvc repro`` runs it
first and stops at the first bad key with the stage's own one-line error, before anything is deleted:

    error: pretrain.train.lrr: unknown key (known: batch_size, lr, ...)

Its output is one constant line: a valid edit reruns this stage (a second or two) and then only the stages whose
own params changed.
"""

from __future__ import annotations

from pathlib import Path

import typer

from llmcore.common import stage_errors, write_text_atomic
from stages import (
    align,
    benchmark,
    classify,
    download,
    evaluate,
    export,
    import_weights,
    instruct,
    preferences,
    pretrain,
    report,
    tokenize,
)

# every stage script dvc.yaml runs (tests/test_deps.py keeps the list complete), in pipeline order
STAGES = (
    download,
    tokenize,
    pretrain,
    import_weights,
    export,
    classify,
    instruct,
    preferences,
    align,
    evaluate,
    benchmark,
    report,
)
CHECKED = "params.yaml: valid for every stage\n"  # the output; constant, so it never reruns a later stage


def load_params(path: Path) -> None:
    """Load ``path`` through every stage's ``load_params``: the first bad key raises ``ParamsError``."""
    for stage in STAGES:
        stage.load_params(path)


app = typer.Typer(add_completion=False)


@app.command()
def main(
    params: Path = typer.Option(..., help="params file"),
    out: Path = typer.Option(..., help="written (always the same line) when it is valid"),
) -> None:
    """Check params.yaml the way every stage reads it; a DVC stage that runs before all others."""
    with stage_errors():
        load_params(params)
        write_text_atomic(out, CHECKED)
        print(CHECKED, end="")


if __name__ == "__main__":
    app()
