"""Stage `report`: the report card and everything behind it, in reports/report.html and reports/report.md.

The HTML file is self-contained (inline CSS, figures embedded as SVG data, no script, no CDN): mail it or
open it offline. report.md shows the same content on GitHub, with the figures in reports/figures/*.svg.

    dvc repro report             # or its dvc.yaml command:
    python -m stages.report --params params.yaml --reports reports --dvc-yaml dvc.yaml
"""

from __future__ import annotations

import datetime
import hashlib
import subprocess
from pathlib import Path

import typer
import yaml

from llmcore.common import atomic_path, stage_errors, write_text_atomic
from llmcore.params import plain, read_params
from llmcore.report.card import build_report
from llmcore.report.render import to_html, to_markdown


def load_params(path: Path) -> dict:
    """Everything this stage reads from params.yaml: every section but ``download`` (the report's params table)."""
    raw = read_params(path)
    return {name: plain(raw[name]) for name in raw if name != "download"}


app = typer.Typer(add_completion=False)


def git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def pipeline_stages(dvc_yaml: Path) -> dict[str, str | None] | None:
    """The stages dvc.yaml defines that write ``reports/<stage>/metrics.json``, in order: name -> None, or for a
    ``foreach`` stage (``reports/<stage>/${item}/metrics.json``) the params key it iterates over. None when
    there is no dvc.yaml to read."""
    try:
        stages = (yaml.safe_load(dvc_yaml.read_text(encoding="utf-8")) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(stages, dict):
        return None
    out: dict[str, str | None] = {}
    for name, spec in stages.items():
        spec = spec if isinstance(spec, dict) else {}
        body = spec.get("do", spec) if isinstance(spec.get("do", spec), dict) else {}
        metrics = [next(iter(m)) if isinstance(m, dict) else str(m) for m in body.get("metrics") or []]
        if "foreach" in spec and any(m.startswith(f"reports/{name}/${{item}}/") for m in metrics):
            out[name] = str(spec["foreach"]).removeprefix("${").removesuffix("}")
        elif f"reports/{name}/metrics.json" in metrics:
            out[name] = None
    return out


def run_facts(params: Path) -> list[tuple[str, str]]:
    commit = git("rev-parse", "--short=12", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    dirty = ""
    if status is not None:
        # the run's own outputs (reports/, dvc.lock) are uncommitted while it runs: code and params are what count
        changed = [line[3:] for line in status.splitlines() if not line[3:].startswith(("reports/", "dvc.lock"))]
        more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
        dirty = f", with uncommitted changes to {', '.join(changed[:6])}{more}" if changed else ", clean"
    digest = hashlib.sha256(params.read_bytes()).hexdigest()[:12] if params.is_file() else "?"
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return [
        ("git commit", (commit.strip() if commit else "not a git checkout") + dirty),
        ("params digest", f"sha256 {digest}… of {params}"),
        ("report written", now),
    ]


def committed_params(params: Path) -> dict | None:
    text = git("show", f"HEAD:{params.as_posix()}")
    try:
        return yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        return None


@app.command()
def main(
    params: Path = typer.Option(..., help="params file"),
    reports: Path = typer.Option(..., help="the stages' reports folder"),
    dvc_yaml: Path = typer.Option(..., help="the pipeline (which stages exist)"),
) -> None:
    """Write report.md, report.html and figures/ from the stages' outputs."""
    with stage_errors():
        report = build_report(
            reports,
            load_params(params),
            pipeline=pipeline_stages(dvc_yaml),
            run_facts=run_facts(params),
            default_params=committed_params(params),
        )
        figures = reports / "figures"
        figures.mkdir(parents=True, exist_ok=True)
        wanted = {f"{fig.name}.svg" for figs in report.figures.values() for fig in figs}
        for old in figures.glob("*.svg"):  # figures of a previous run that this one has not
            if old.name not in wanted:
                old.unlink()
        for figs in report.figures.values():
            for fig in figs:
                with atomic_path(figures / f"{fig.name}.svg") as tmp:
                    tmp.write_text(fig.svg, encoding="utf-8")
        write_text_atomic(reports / "report.md", to_markdown(report, "figures"))
        write_text_atomic(reports / "report.html", to_html(report))
        ok = sum(r.status == "ok" for r in report.rows)
        print(
            f"wrote {reports / 'report.html'} and {reports / 'report.md'}: {ok} of {len(report.rows)} card rows "
            f"scored, {len(wanted)} figures"
        )


if __name__ == "__main__":
    app()
