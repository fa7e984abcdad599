"""The manual as the tests read it: the README (the landing page) and the pages under docs/.

Tests that keep the documentation, params.yaml and the code in step read the section that holds a claim by
its heading, whichever page it sits on, so a section can move between pages without touching the tests.
"""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import REPO_ROOT

DOCS = REPO_ROOT / "docs"


def pages() -> list[Path]:
    """README.md, then every Markdown page of the site."""
    return [REPO_ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def headings(text: str) -> list[tuple[int, int, str]]:
    """(offset, level, title) of each Markdown heading outside fenced code blocks."""
    out, offset, fenced = [], 0, False
    for line in text.splitlines(keepends=True):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"(#{1,6}) (.+?)\s*$", line)):
            out.append((offset, len(m.group(1)), m.group(2)))
        offset += len(line)
    return out


def doc_section(title: str) -> str:
    """The section headed ``title`` (any level) on whichever page has it, up to the next heading of its level or
    above; a page's title gives the whole page. Exactly one page may have it."""
    found = []
    for page in pages():
        text = page.read_text(encoding="utf-8")
        marks = headings(text)
        for i, (start, level, heading) in enumerate(marks):
            if heading == title:
                end = next((o for o, lv, _ in marks[i + 1 :] if lv <= level), len(text))
                found.append((page, text[start:end]))
    assert len(found) == 1, f"docs: expected one section headed {title!r}, found {[str(p) for p, _ in found]}"
    return found[0][1]


def slug(title: str) -> str:
    """The anchor mkdocs (Python-Markdown's toc) gives a heading."""
    text = re.sub(r"[^\w\s-]", "", title.replace("`", "")).strip().lower()
    return re.sub(r"[-\s]+", "-", text)
