"""The manual builds, and the README stays a landing page that points into it.

``make docs`` runs ``mkdocs build --strict``: a broken link or anchor between pages, a page left out of the
navigation or a docstring mkdocstrings cannot read is an error. The tests run the same build (into a temporary
folder), check that it can fail, and that every library module has its API reference entry.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO_ROOT
from tests.docs import DOCS, headings, slug

README = REPO_ROOT / "README.md"


def mkdocs_build(config, site_dir) -> subprocess.CompletedProcess:
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings_handlers") is None:
        if os.environ.get("CI"):
            pytest.fail("mkdocs and mkdocstrings[python] are missing: install the docs extra (make venv does)")
        pytest.skip("mkdocs is not installed (the docs extra)")
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "--site-dir", str(site_dir)]
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run(cmd, cwd=config.parent, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow
def test_site_builds_offline_with_warnings_as_errors(tmp_path):
    proc = mkdocs_build(REPO_ROOT / "mkdocs.yml", tmp_path / "site")
    assert proc.returncode == 0, proc.stderr[-3000:]
    pages = {p.relative_to(tmp_path / "site").as_posix() for p in (tmp_path / "site").rglob("*.html")}
    assert {"index.html", "params.html", "pipeline.html", "api/report.html"} <= pages
    api = (tmp_path / "site/api/report.html").read_text(encoding="utf-8")
    assert "did_not_run" in api and "The one guard in front of every card function" in api  # from the docstring
    assert "fonts.googleapis.com" not in (tmp_path / "site/index.html").read_text(encoding="utf-8")  # offline


@pytest.mark.slow
def test_a_broken_anchor_fails_the_build(tmp_path):
    shutil.copy(REPO_ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    shutil.copytree(DOCS, tmp_path / "docs")
    (tmp_path / "llmcore").symlink_to(REPO_ROOT / "llmcore")
    page = tmp_path / "docs/serving.md"
    page.write_text(page.read_text(encoding="utf-8") + "\nSee [threads](reproducibility.md#no-such-heading).\n")
    proc = mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert proc.returncode != 0 and "no-such-heading" in proc.stderr


def test_every_page_is_in_the_navigation_and_every_module_in_the_api_reference():
    config = yaml.load((REPO_ROOT / "mkdocs.yml").read_text(encoding="utf-8"), Loader=yaml.BaseLoader)
    nav = re.findall(r"[\w/-]+\.md", str(config["nav"]))
    assert sorted(nav) == sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
    documented = set(
        re.findall(r"^::: (llmcore[\w.]*)$", "\n".join(p.read_text() for p in DOCS.glob("api/*.md")), re.M)
    )
    modules = {
        ".".join(p.relative_to(REPO_ROOT).with_suffix("").parts)
        for p in (REPO_ROOT / "llmcore").rglob("*.py")
        if p.name != "__init__.py" and "__pycache__" not in p.parts
    }
    assert modules == documented, (
        f"add to docs/api/: {sorted(modules - documented)}; gone: {sorted(documented - modules)}"
    )


def test_readme_is_a_landing_page_whose_links_resolve():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    for title in ("Quickstart", "What the default run gives", "The stages", "Where to go next"):
        assert any(h.startswith(title) for _, _, h in headings(text)), title
    links = re.findall(r"\]\((docs/[^)#\s]+)(?:#([^)\s]+))?\)", text)
    assert len(links) >= 12
    for path, anchor in links:
        target = REPO_ROOT / path
        assert target.is_file(), f"README.md: link to {path}: no such page"
        if anchor:
            anchors = {slug(h) for _, _, h in headings(target.read_text(encoding="utf-8"))}
            assert anchor in anchors, f"README.md: link to {path}#{anchor}: no such heading"


def test_readme_stage_table_is_the_pipeline_pages():
    """The landing page's stage table is the one in docs/pipeline.md, row for row."""

    def stage_table(text: str) -> list[str]:
        lines = text[text.index("\n## The stages") :].splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith("|"))
        end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
        return lines[start:end]

    readme = stage_table(README.read_text(encoding="utf-8"))
    assert readme == stage_table((DOCS / "pipeline.md").read_text(encoding="utf-8")) and len(readme) >= 12
