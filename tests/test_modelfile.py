"""The Ollama Modelfile and the Jinja chat template reproduce llmcore's prompts.

The Go templates are rendered by a small interpreter of text/template's semantics (tests/gotemplate.py) and
compared with the prompt llmcore's own server builds for the same conversation; a golden Modelfile pins the
whole file, written from Ollama's documented Modelfile syntax.
"""

from __future__ import annotations

import jinja2
import pytest

from llmcore.common import LLMCoreError
from llmcore.serve.models import chat_prompt
from llmcore.text.chat_templates import jinja_chat_template, ollama_template
from llmcore.text.prompts import format_alpaca
from llmcore.weights.modelfile import modelfile_text
from tests.gotemplate import render

CONVERSATIONS = [
    [{"role": "user", "content": "Name a primary color."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is {{2+2}}?"}],
    [
        {"role": "user", "content": "Translate 'cat'."},
        {"role": "assistant", "content": "Katze"},
        {"role": "tool", "content": "dictionary: ok"},
        {"role": "user", "content": "And 'dog'?\nIn German."},
    ],
    [{"role": "system", "content": ""}, {"role": "user", "content": ""}],
]
TEMPLATES = [
    "alpaca",
    "raw",
    "Question: {instruction}\nContext: {input}\nAnswer:",
    '{{literal braces}} """quoted""" {instruction}',
]


def go_render(template: str, messages: list[dict]) -> str:
    return render(template, {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]})


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("messages", CONVERSATIONS, ids=range(len(CONVERSATIONS)))
def test_ollama_template_renders_llmcore_prompt(template, messages):
    assert go_render(ollama_template(template), messages) == chat_prompt(messages, template)


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("messages", CONVERSATIONS, ids=range(len(CONVERSATIONS)))
def test_jinja_chat_template_renders_llmcore_prompt(template, messages):
    rendered = jinja2.Environment().from_string(jinja_chat_template(template)).render(messages=messages)
    assert rendered == chat_prompt(messages, template)


def test_single_prompt_is_the_alpaca_prompt():
    """Ollama's /api/generate passes one user message: the prompt llmcore trains and serves with."""
    messages = [{"role": "user", "content": "Rewrite: the sky blue."}]
    assert go_render(ollama_template("alpaca"), messages) == format_alpaca("Rewrite: the sky blue.")


def test_interpreter_follows_go_semantics():
    """The test oracle itself: trim markers, scoped variables, assignment, else-if, print, range."""
    t = '  {{- $x := "a" }} {{ if eq 1 2 }}no{{ else if eq "b" "b" }}{{ $x = print $x "b" }}{{ end -}}  ! {{ $x }}'
    assert render(t, {}) == " ! ab"
    t = "{{ range .Items }}{{ $y := .N }}[{{ $y }}]{{ end }}{{ if .Items }}ok{{ else }}empty{{ end }}"
    assert render(t, {"Items": [{"N": "1"}, {"N": "2"}]}) == "[1][2]ok"
    assert render(t, {"Items": []}) == "empty"
    with pytest.raises(ValueError, match="unsupported"):
        render("{{ index .Items 0 }}", {"Items": [1]})


GOLDEN_ALPACA = '''# instruct: exported by llmcore (prompt template: alpaca)
# ollama create instruct -f Modelfile && ollama run instruct
FROM ./model.gguf
TEMPLATE """{{- $input := "" }}{{- $role := "" }}{{- $content := "" }}
{{- range .Messages }}
{{- if $role }}{{ if $input }}{{ $input = print $input "\\n" }}{{ end }}{{ $input = print $input $role ": " $content }}{{ end }}
{{- if eq .Role "system" }}{{ $role = "System" }}{{ else if eq .Role "user" }}{{ $role = "User" }}{{ else if eq .Role "assistant" }}{{ $role = "Assistant" }}{{ else if eq .Role "tool" }}{{ $role = "Tool" }}{{ else }}{{ $role = .Role }}{{ end }}
{{- $content = .Content }}
{{- end }}Below is an instruction that describes a task. Write a response that appropriately completes the request.

### Instruction:
{{ $content }}{{ if $input }}

### Input:
{{ $input }}{{ end }}

### Response:
"""
PARAMETER stop "###"
PARAMETER num_ctx 256
PARAMETER temperature 0.8
PARAMETER top_k 40
PARAMETER top_p 0.9
'''  # noqa: E501


def test_modelfile_golden():
    assert modelfile_text("model.gguf", "alpaca", 256, name="instruct") == GOLDEN_ALPACA
    raw = modelfile_text("model.gguf", "raw", 128, name="base")
    assert "PARAMETER stop" not in raw and "PARAMETER num_ctx 128" in raw


def test_template_with_format_spec_is_refused():
    with pytest.raises(LLMCoreError, match="format spec or conversion"):
        ollama_template("{instruction!r}")
