"""Export a model folder for the tools people run: GGUF + Ollama Modelfile, or the Hugging Face layout.

    export_model("data/models/instruct", "data/export/instruct", fmt="gguf", precision="q8_0")
    # -> data/export/instruct/model.gguf, data/export/instruct/Modelfile

Everything that can be refused is checked before any file is written: the folder must hold a causal language
model (a classifier is not one), the architecture must be one of the two families, and for GGUF the tokenizer
must be byte-level BPE with a split regex llama.cpp knows. The prompt template is the one stored with the model
by instruction tuning, else ``raw`` (a base model continues text); ``template`` overrides it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from llmcore.common import LLMCoreError
from llmcore.text.chat import CHATML, chat_token_ids
from llmcore.text.chat_templates import RAW, jinja_chat_template, ollama_template
from llmcore.text.prompts import check_template
from llmcore.weights.gguf import check_exportable, write_gguf
from llmcore.weights.hf_convert import family, save_hf
from llmcore.weights.model_dir import open_model_dir
from llmcore.weights.modelfile import write_modelfile

FORMATS = ("gguf", "hf")
GGUF_FILE = "model.gguf"
MODELFILE = "Modelfile"


@dataclass(frozen=True)
class ExportResult:
    out: Path
    files: list[str]  # names inside ``out``
    arch: str  # gpt2 | llama
    n_params: int
    template: str


def export_model(
    model_dir: str | os.PathLike,
    out: str | os.PathLike,
    fmt: str = "gguf",
    precision: str | None = None,
    template: str | None = None,
    name: str | None = None,
) -> ExportResult:
    """Write the model in ``model_dir`` to folder ``out`` as ``fmt`` (see the module docstring).

    Args:
        precision: GGUF only: f32 | f16 | bf16 | q8_0 (default f16); the HF export keeps fp32 weights.
        template: alpaca | chatml | raw | a format string with {instruction}/{input}; None: the stored one, else raw.
        name: the model's name in the GGUF file and the Modelfile; default: the folder's name.
    """
    if fmt not in FORMATS:
        raise LLMCoreError(f"export format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    folder = open_model_dir(model_dir).require_lm("export")
    template = template or folder.template or RAW
    if template != RAW:
        check_template(template, where="template")
    if template == CHATML:  # a chat template needs the chat tokens, which every consumer is told about
        chat_token_ids(folder.tokenizer)
    name = name or folder.path.resolve().name
    out = Path(out)
    if fmt == "gguf":
        precision = precision or "f16"
        check_exportable(folder.config, folder.tokenizer, precision)
        ollama_template(template), jinja_chat_template(template)  # refuse a template they cannot express, early
        model = folder.load_lm(use="GGUF export")
        info = write_gguf(out / GGUF_FILE, model, folder.tokenizer, precision=precision, name=name, template=template)
        write_modelfile(out / MODELFILE, GGUF_FILE, template, folder.config.context_length, name=name)
        return ExportResult(out, [GGUF_FILE, MODELFILE], info.arch, model.num_params(), template)
    if precision is not None:
        raise LLMCoreError("precision applies to GGUF export; the HF export keeps the weights in fp32")
    arch = family(folder.config)
    jinja_chat_template(template)
    model = folder.load_lm(use="HF export")
    files = save_hf(model, out, folder.tokenizer, template=template)
    return ExportResult(out, files, arch, model.num_params(), template)
