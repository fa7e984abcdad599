"""Stage `report`: gather every stage's metrics and curves into reports/report.md and reports/report.html.

The HTML file is self-contained (inline CSS and SVG, no scripts), so it can be mailed or opened offline.
"""

from __future__ import annotations

from pathlib import Path

import typer

from llmcore.common import stage_errors, write_text_atomic
from llmcore.eval.report import build_report, to_html, to_markdown
from llmcore.params import plain, read_params


def load_params(path: Path) -> dict:
    """Everything this stage reads from params.yaml: every section but ``download`` (the report's params table)."""
    raw = read_params(path)
    return {name: plain(raw[name]) for name in raw if name != "download"}


app = typer.Typer(add_completion=False)


@app.command()
def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file"),
    reports: Path = typer.Option(Path("reports"), help="the stages' reports folder"),
) -> None:
    """Write report.md and report.html from the stages' outputs."""
    with stage_errors():
        report = build_report(reports, load_params(params))
        write_text_atomic(reports / "report.md", to_markdown(report))
        write_text_atomic(reports / "report.html", to_html(report))
        print(f"wrote {reports / 'report.md'} and {reports / 'report.html'}")


if __name__ == "__main__":
    app()
