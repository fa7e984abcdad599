"""The Ollama ``Modelfile`` written next to an exported GGUF file, so that

    ollama create my-model -f data/export/instruct/Modelfile
    ollama run my-model "Name a primary color."

gives the prompts llmcore's own server builds (:mod:`llmcore.text.chat_templates`), the same stop strings, and
a context window of the model's ``context_length`` (Ollama's default ``num_ctx`` would run a small model past
the positions it was trained on).
"""

from __future__ import annotations

import os
from pathlib import Path

from llmcore.common import write_text_atomic
from llmcore.text.chat_templates import ollama_template, stop_strings

# Sampling defaults, as llmcore's server and Ollama itself use them.
DEFAULT_PARAMETERS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9}


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def modelfile_text(gguf_name: str, template: str, context_length: int, name: str = "") -> str:
    """The Modelfile for ``gguf_name`` (a path relative to the Modelfile) and a prompt template."""
    lines = [
        f"# {name or 'model'}: exported by llmcore (prompt template: {template})",
        f"# ollama create {name or 'NAME'} -f Modelfile && ollama run {name or 'NAME'}",
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{ollama_template(template)}"""',
        *(f"PARAMETER stop {_quote(stop)}" for stop in stop_strings(template)),
        f"PARAMETER num_ctx {context_length}",
        *(f"PARAMETER {key} {value}" for key, value in DEFAULT_PARAMETERS.items()),
    ]
    return "\n".join(lines) + "\n"


def write_modelfile(
    path: str | os.PathLike, gguf_name: str, template: str, context_length: int, name: str = ""
) -> Path:
    """Write the Modelfile atomically; returns its path."""
    write_text_atomic(path, modelfile_text(gguf_name, template, context_length, name))
    return Path(path)
