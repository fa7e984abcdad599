"""llmcore's prompt templates rewritten for other runtimes: Ollama's Go templates and the Jinja chat templates
of Hugging Face, llama.cpp (``--jinja``) and LM Studio.

Both reproduce how llmcore's server turns a conversation into a prompt (``llmcore serve``'s ``chat_prompt``):

- ``alpaca`` or a custom format string: the last message (the user's) is ``{instruction}``; the earlier ones,
  one ``Role: content`` line each (role capitalised), joined by newlines, are ``{input}``; Alpaca's
  ``### Input:`` section appears only when there are earlier messages.
- ``raw``: the non-empty message contents joined by blank lines.

A single-prompt request (Ollama's ``/api/generate``) is a conversation of one user message, so its prompt is
``format_prompt(template, prompt)``, as in llmcore. The Go templates use only ``range``, ``if``/``else``,
variables, ``eq`` and ``print`` (text/template built-ins), so any Ollama version that passes ``.Messages``
renders them.
"""

from __future__ import annotations

import json
import string

from llmcore.common import LLMCoreError
from llmcore.text.chat import CHATML, IM_END, IM_START
from llmcore.text.prompts import check_template, format_alpaca

RAW = "raw"
ALPACA_STOP = "###"  # an Alpaca model that starts a new section has finished its answer (as llmcore's server)


def _pieces(template: str) -> list[tuple[str, str | None]]:
    """``(literal, field)`` pieces of a prompt template (``alpaca`` spelled out); field None at the end."""
    check_template(template, where="prompt template")
    if template == "alpaca":
        # The ### Input: section is conditional: mark it with a pseudo-field handled by the renderers.
        head, tail = format_alpaca("\0I").split("\0I")
        return [(head, "instruction"), ("", "alpaca_input"), (tail, None)]
    pieces, text = [], ""
    for literal, field, spec, conversion in string.Formatter().parse(template):
        if field is not None and (spec or conversion):
            raise LLMCoreError(
                f"prompt template: {{{field}}} has a format spec or conversion; export needs plain fields"
            )
        text += literal  # an escaped brace ("{{") ends a literal piece early: join the pieces
        if field is not None:
            pieces.append((text, field))
            text = ""
    return [*pieces, (text, None)]


# --- Ollama (Go text/template) ---------------------------------------------------------------------------

_GO_HISTORY = (
    '{{- $input := "" }}{{- $role := "" }}{{- $content := "" }}\n'
    "{{- range .Messages }}\n"
    '{{- if $role }}{{ if $input }}{{ $input = print $input "\\n" }}{{ end }}'
    '{{ $input = print $input $role ": " $content }}{{ end }}\n'
    '{{- if eq .Role "system" }}{{ $role = "System" }}{{ else if eq .Role "user" }}{{ $role = "User" }}'
    '{{ else if eq .Role "assistant" }}{{ $role = "Assistant" }}{{ else if eq .Role "tool" }}{{ $role = "Tool" }}'
    "{{ else }}{{ $role = .Role }}{{ end }}\n"
    "{{- $content = .Content }}\n"
    "{{- end }}"
)
_GO_RAW = (
    '{{- $out := "" }}{{ range .Messages }}{{ if .Content }}'
    '{{ if $out }}{{ $out = print $out "\\n\\n" .Content }}{{ else }}{{ $out = .Content }}{{ end }}'
    "{{ end }}{{ end }}{{ $out }}"
)


def _go_literal(text: str) -> str:
    # "{{" would open an action; '"""' would end a Modelfile's triple-quoted TEMPLATE
    return text.replace("{{", '{{ "{{" }}').replace('"""', '""{{ "\\"" }}')


# ChatML: every message as a turn, then the assistant's header (Ollama always asks for the next reply)
_GO_CHATML = "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
assert IM_START in _GO_CHATML and IM_END in _GO_CHATML


def ollama_template(template: str) -> str:
    """The Modelfile ``TEMPLATE`` for a prompt template (``alpaca``, ``chatml``, ``raw`` or a custom format
    string)."""
    if template == RAW:
        return _GO_RAW
    if template == CHATML:
        return _GO_CHATML
    out = [_GO_HISTORY]
    for literal, field in _pieces(template):
        out.append(_go_literal(literal))
        if field == "instruction":
            out.append("{{ $content }}")
        elif field == "input":
            out.append("{{ $input }}")
        elif field == "alpaca_input":
            out.append("{{ if $input }}\n\n### Input:\n{{ $input }}{{ end }}")
    return "".join(out)


# --- Jinja (Hugging Face chat_template, GGUF tokenizer.chat_template) -----------------------------------

_JINJA_INPUT = (
    "{%- for m in messages[:-1] %}{{ m['role'] | capitalize }}: {{ m['content'] }}"
    "{% if not loop.last %}{{ '\\n' }}{% endif %}{% endfor %}"
)


def jinja_chat_template(template: str) -> str:
    """A Jinja chat template (``messages`` -> prompt) for a prompt template; ``add_generation_prompt`` is implied:
    the prompt always ends where the answer starts."""
    if template == CHATML:  # the one template that honours add_generation_prompt (a chat model's history ends anywhere)
        return (
            "{%- for m in messages %}{{ '" + IM_START + "' + m['role'] + '\\n' + m['content'] + '" + IM_END + "\\n' }}"
            "{%- endfor %}{%- if add_generation_prompt %}{{ '" + IM_START + "assistant\\n' }}{%- endif %}"
        )
    if template == RAW:
        return (
            "{%- for m in messages if m['content'] %}{{ m['content'] }}"
            "{% if not loop.last %}{{ '\\n\\n' }}{% endif %}{% endfor %}"
        )
    out = []
    for literal, field in _pieces(template):
        if literal:
            out.append("{{ " + json.dumps(literal, ensure_ascii=False) + " }}")
        if field == "instruction":
            out.append("{{ messages[-1]['content'] }}")
        elif field == "input":
            out.append(_JINJA_INPUT)
        elif field == "alpaca_input":
            out.append("{% if messages | length > 1 %}{{ '\\n\\n### Input:\\n' }}" + _JINJA_INPUT + "{% endif %}")
    return "".join(out)


def stop_strings(template: str) -> list[str]:
    """Strings that end an answer besides the end-of-text token (llmcore's server cuts Alpaca answers there)."""
    if template == CHATML:
        return [IM_END]  # end of turn (a special token: a runtime that stops on its id never shows it)
    return [ALPACA_STOP] if template == "alpaca" else []
