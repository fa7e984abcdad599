"""One renderer, two outputs: the report (or any page built of these blocks) as Markdown and as HTML.

``document(report)`` walks the ``Report`` once and lays it out as a list of blocks (headings, tables, figures,
notes, collapsible details); ``to_markdown`` and ``to_html`` write the same blocks in their own syntax, so the
two files cannot drift apart. The HTML is one self-contained file: CSS and figures inline (SVG as data URIs),
no script, no CDN, readable on a phone (the card's rows become cards). The Markdown shows the same content on
GitHub, with the figures as files beside it (``<figures_dir>/<name>.svg``).
"""

from __future__ import annotations

import base64
import html
import json
import re
from dataclasses import dataclass, field
from typing import Any

from llmcore.report.card import MACHINE, Figure, Report, Row, fmt
from llmcore.report.outputs import StageData, flatten

MACHINE_NOTE = (
    f"{MACHINE} machine-dependent: timings, throughput and MFU change with the machine and its load. "
    "The losses and accuracies are bit-identical between runs on one machine; on another CPU they can "
    "differ in their last digits (other vector kernels, other float rounding)."
)


# --------------------------------------------------------------------------------------------------
# Blocks


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Text:
    text: str  # plain text (escaped for HTML); **bold** and *italic* as in Markdown
    small: bool = False  # a side note (HTML: smaller, grey)


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    numeric: set[int] = field(default_factory=set)  # right-aligned columns (HTML)
    card: bool = False  # the report card: cells labelled for the phone layout, status values highlighted
    status: list[bool] = field(default_factory=list)  # card rows whose value is a status, not a figure


@dataclass
class Notes:
    title: str
    items: list[str]


@dataclass
class Sample:
    prompt: str
    text: str


@dataclass
class Figures:
    figures: list[Figure]
    captions: bool = False  # Markdown: the caption in italics under each figure (HTML always has it)


@dataclass
class Details:
    summary: str
    body: Table


@dataclass
class Code:
    text: str


Block = Heading | Text | Table | Notes | Sample | Figures | Details | Code


# --------------------------------------------------------------------------------------------------
# The report as blocks


def card_table(report: Report) -> Table:
    header = ["stage", "key figure", "value", "baselines", "book", "details"]
    rows = []
    for r in report.rows:
        if r.status != "ok":
            rows.append([r.stage, r.figure, r.status, "", _book_cell(r) if r.book else "", r.reason])
            continue
        base = "; ".join(f"{b.label} {fmt(b.value, r.kind)} ({r.verdict(b) or 'n/a'})" for b in r.baselines)
        rows.append([r.stage, r.figure, fmt(r.value, r.kind), base, _book_cell(r), r.detail])
    return Table(header, rows, card=True, status=[r.status != "ok" for r in report.rows])


def _book_cell(r: Row) -> str:
    if r.book is None:
        return ""
    verdict = r.verdict(r.book)
    mark = f" ({verdict})" if verdict else ""
    return f"{fmt(r.book.value, r.kind)}{mark}: {r.book.label}"


def params_rows(report: Report) -> list[list[str]]:
    flat = {k: v for k, v in flatten(report.params).items() if not k.startswith("download.")}
    keys = sorted(flat, key=lambda k: (k not in report.changed_params, list(flat).index(k)))
    changed = report.changed_params
    return [
        [k, flat[k] if isinstance(flat[k], str) else json.dumps(flat[k]), "changed" if k in changed else ""]
        for k in keys
    ]


def details_rows(stage: StageData) -> list[list[str]]:
    rows = [[f"metrics: {k}", fmt(v)] for k, v in flatten(stage.metrics or {}).items()]
    rows += [[f"timing: {k}", f"{fmt(v)} {MACHINE}"] for k, v in flatten(stage.timing).items()]
    rows += [[f"facts: {k}", fmt(v)] for k, v in flatten(stage.facts).items() if not k.startswith("environment.")]
    return rows


def short(text: str, n: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n] + " …"


def _prompt(r: dict[str, Any]) -> str:
    return f"{r.get('instruction', '')}" + (f" — input: {r['input']}" if r.get("input") else "")


def all_figures(report: Report) -> list[Figure]:
    return [f for figs in report.figures.values() for f in figs]


def document(report: Report) -> list[Block]:
    """The report, top to bottom: the card, what was skipped, run facts, examples, curves, details, params."""
    out: list[Block] = [Heading(1, "llmcore pipeline report"), Heading(2, "Report card"), card_table(report)]
    if report.notes:
        out.append(Notes("Skipped or not run", report.notes))
    out += [Heading(3, "Run facts"), Table(["fact", "value"], [[k, v] for k, v in report.run_facts])]
    out += [Text(MACHINE_NOTE, small=True), Heading(2, "What the model does")]
    if report.samples:
        out.append(Heading(3, "Pretraining samples"))
        out += [Sample(prompt, text) for prompt, text in report.samples]
    if report.mistakes:
        rows = [[short(m["text"]), m["label"], m["prediction"], m["probability"]] for m in report.mistakes]
        out += [
            Heading(3, "Spam classifier: most confident mistakes (test split)"),
            Table(["text", "label", "predicted", "probability"], rows, {3}),
        ]
    if report.figures.get("examples"):
        out.append(Figures(report.figures["examples"], captions=True))
    for kind in ("best", "worst"):
        if report.responses.get(kind):
            ranked = report.responses[kind]
            rows = [
                [
                    fmt(r["score"]),
                    short(_prompt(r), 400),
                    short(r.get("output", ""), 400),
                    short(r.get("model_response", ""), 400),
                ]
                for r in ranked
            ]
            out += [
                Heading(3, f"Instruction responses: {kind} {len(ranked)} by {report.response_rank}"),
                Table([report.response_rank, "instruction", "reference", "model"], rows, {0}),
            ]
    if report.figures.get("curves"):
        out += [Heading(2, "Curves"), Figures(report.figures["curves"])]
    out.append(Heading(2, "Stage details"))
    for name, stage in report.stages.items():
        rows = details_rows(stage)
        if rows:
            out.append(Details(name, Table(["key", "value"], rows, {1})))
    summary = f"params.yaml ({len(report.changed_params)} changed from the committed file, listed first)"
    out += [Heading(2, "Params"), Details(summary, Table(["key", "value", ""], params_rows(report)))]
    return out


# --------------------------------------------------------------------------------------------------
# Markdown


def md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(lines)


def block_markdown(block: Block, figures_dir: str) -> list[str]:
    """One block as Markdown lines, each block followed by a blank line."""
    if isinstance(block, Heading):
        return ["#" * block.level + " " + block.text, ""]
    if isinstance(block, Text):
        return [block.text, ""]
    if isinstance(block, Table):
        return [md_table(block.header, block.rows), ""]
    if isinstance(block, Notes):
        return [f"**{block.title}:**", "", *[f"- {n}" for n in block.items], ""]
    if isinstance(block, Sample):
        return [f"Prompt **{block.prompt}**:", "", "```text", block.text, "```", ""]
    if isinstance(block, Figures):
        out = []
        for fig in block.figures:
            out += [f"![{fig.caption}]({figures_dir}/{fig.name}.svg)", ""]
            out += [f"*{fig.caption}*", ""] if block.captions else []
        return out
    if isinstance(block, Details):
        table = md_table(block.body.header, block.body.rows)
        return ["<details>", f"<summary>{block.summary}</summary>", "", table, "", "</details>", ""]
    if isinstance(block, Code):
        return ["```", block.text, "```", ""]
    raise TypeError(f"no Markdown for {type(block).__name__}")


def to_markdown(report: Report | list[Block], figures_dir: str = "figures") -> str:
    """The report (or a list of blocks) as GitHub Markdown; figures are referenced as ``<figures_dir>/<name>.svg``."""
    blocks = document(report) if isinstance(report, Report) else report
    return "\n".join(line for b in blocks for line in block_markdown(b, figures_dir)) + "\n"


# --------------------------------------------------------------------------------------------------
# HTML

CSS = """*{box-sizing:border-box}body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1100px;
margin:0 auto;padding:1em;color:#1d1d1f}h1{font-size:1.6em;margin:.2em 0 .6em}
h2{margin-top:1.6em;border-bottom:1px solid #ddd}h3{margin-top:1.2em}
.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch}table{border-collapse:collapse;
margin:.4em 0 1.2em;font-size:.92em}td,th{border:1px solid #d5d5d5;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f6}td.num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}
.better{color:#17632a;font-weight:600}.worse{color:#a4161a;font-weight:600}.status{font-weight:600;color:#8a5a00}
.notes{background:#fff7e0;border:1px solid #eed58a;padding:.5em 1em;border-radius:4px}.notes li{margin:.2em 0}
.small{color:#555;font-size:.88em}pre{white-space:pre-wrap;background:#f6f6f6;padding:.6em;border-radius:4px;
font-size:.88em}figure{margin:.6em 0;display:inline-block;max-width:100%;vertical-align:top}figure img{max-width:100%;
height:auto;display:block}figcaption{font-size:.85em;color:#555}.grid{display:flex;flex-wrap:wrap;gap:.6em}
.grid figure{flex:1 1 420px}details{margin:.4em 0}summary{cursor:pointer;font-weight:600}
@media (max-width:640px){table.card thead{display:none}table.card tr{display:block;border:1px solid #d5d5d5;
margin-bottom:.6em;padding:.3em 0}table.card td{display:block;border:none;padding:1px 8px;text-align:left}
table.card td:first-child{font-weight:700}table.card td:not(:first-child):before{content:attr(data-label) ": ";
color:#555}table.card td:empty{display:none}}"""


def _inline(text: str) -> str:
    """Escaped text with Markdown's **bold** and *italic* as HTML."""
    e = html.escape(str(text))
    e = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", e)
    return re.sub(r"(?<![*\w])\*([^*]+?)\*(?![*\w])", r"<em>\1</em>", e)


def cell(text: str) -> str:
    """A table cell's text, escaped, with "(better)" and "(worse)" coloured and a whole **bold** cell bold."""
    e = re.sub(r"\((better|worse)\)", r"(<span class='\1'>\1</span>)", html.escape(str(text)))
    return re.sub(r"^\*\*(.+)\*\*$", r"<strong>\1</strong>", e)


def html_table(header: list[str], rows: list[list[str]], numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    td = lambda i: "<td class=num>" if i in numeric else "<td>"
    body = "".join("<tr>" + "".join(f"{td(i)}{cell(c)}</td>" for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def _card_html(t: Table) -> str:
    e = html.escape
    body = []
    for is_status, cells in zip(t.status, t.rows, strict=True):
        value = f"<span class='status'>{e(cells[2])}</span>" if is_status else e(cells[2])
        tds = [
            f"<td data-label='{e(t.header[i])}'{' class=num' if i == 2 else ''}>{value if i == 2 else cell(c)}</td>"
            for i, c in enumerate(cells)
        ]
        body.append("<tr>" + "".join(tds) + "</tr>")
    head = "".join(f"<th>{e(h)}</th>" for h in t.header)
    table = f"<table class='card'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    return f"<div class='scroll'>{table}</div>"


def img(fig: Figure) -> str:
    data = base64.b64encode(fig.svg.encode("utf-8")).decode("ascii")
    caption = html.escape(fig.caption)
    image = f"<img src='data:image/svg+xml;base64,{data}' alt='{caption}'>"
    return f"<figure>{image}<figcaption>{caption}</figcaption></figure>"


def block_html(block: Block) -> str:
    e = html.escape
    if isinstance(block, Heading):
        return f"<h{block.level}>{e(block.text)}</h{block.level}>"
    if isinstance(block, Text):
        return f"<p class='small'>{_inline(block.text)}</p>" if block.small else f"<p>{_inline(block.text)}</p>"
    if isinstance(block, Table):
        return _card_html(block) if block.card else html_table(block.header, block.rows, block.numeric)
    if isinstance(block, Notes):
        items = "".join(f"<li>{e(n)}</li>" for n in block.items)
        return f"<div class='notes'><strong>{e(block.title)}</strong><ul>{items}</ul></div>"
    if isinstance(block, Sample):
        return f"<p class='small'>Prompt <strong>{e(block.prompt)}</strong></p><pre>{e(block.text)}</pre>"
    if isinstance(block, Figures):
        return "<div class='grid'>" + "".join(img(f) for f in block.figures) + "</div>"
    if isinstance(block, Details):
        return f"<details><summary>{e(block.summary)}</summary>{block_html(block.body)}</details>"
    if isinstance(block, Code):
        return f"<pre>{e(block.text)}</pre>"
    raise TypeError(f"no HTML for {type(block).__name__}")


def to_html(report: Report | list[Block], title: str = "llmcore pipeline report") -> str:
    """The report (or a list of blocks) as one self-contained HTML page."""
    blocks = document(report) if isinstance(report, Report) else report
    head = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
    ]
    return "\n".join([*head, *(block_html(b) for b in blocks), "</body></html>"]) + "\n"
