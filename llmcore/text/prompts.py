"""The Alpaca prompt template used for instruction tuning and for serving the tuned model.

The template is the one of Raschka, *Build a Large Language Model (From Scratch)*, ch. 7 (``format_input``),
itself from Stanford Alpaca. Training and serving must build prompts byte for byte alike, so both import
``format_alpaca`` from here::

    Below is an instruction that describes a task. Write a response that appropriately completes the request.

    ### Instruction:
    {instruction}

    ### Input:                       <- only when there is an input
    {input}

    ### Response:
    <the model writes here>
"""

from __future__ import annotations

import string
from typing import TYPE_CHECKING

from llmcore.common import LLMCoreError
from llmcore.text.chat import CHATML, alpaca_to_messages, chat_token_ids, chatml_text, check_messages, render_chat

if TYPE_CHECKING:  # annotations only: never run, so not a code dep of the stages (tools/deps.py)
    from llmcore.text.tokenizer import Tokenizer

PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
RESPONSE_MARKER = "### Response:\n"


def format_alpaca(instruction: str, input: str = "") -> str:
    """The prompt for one instruction (and optional input), ending where the response starts."""
    text = f"{PREAMBLE}\n\n### Instruction:\n{instruction}"
    if input:
        text += f"\n\n### Input:\n{input}"
    return f"{text}\n\n{RESPONSE_MARKER}"


def section_start(text: str) -> int:
    """Index where a new ``###`` section starts (``###`` at the start of a line), or -1 if none."""
    return ("\n" + text).find("\n###")  # the added "\n" makes "###" at index 0 a line start; indices line up


def extract_response(text: str) -> str:
    """The response proper: text up to the first new ``###`` section, without surrounding whitespace.

    Args:
        text: the generated continuation; a whole decoded sequence that starts with the Alpaca prompt
            (prompt + continuation) works too: everything up to the prompt's ``### Response:`` line goes.

    Returns:
        The stripped response; a model that starts another ``### Instruction:`` (or ``### Input:``, ...) is cut
        there, the way the book strips what follows the answer.
    """
    if text.startswith(PREAMBLE) and RESPONSE_MARKER in text:
        text = text.split(RESPONSE_MARKER, 1)[1]
    end = section_start(text)
    return (text if end < 0 else text[:end]).strip()


TEMPLATE_FIELDS = ("instruction", "input")


SECTION = "\n###"  # a new Alpaca section: the model has finished its answer and starts another prompt


def check_template(template: str, where: str = "instruct.template") -> str:
    """Accept ``"alpaca"``, ``"chatml"`` (a chat model: :mod:`llmcore.text.chat`) or a format string using only
    ``{instruction}`` (required) and ``{input}``."""
    if template in ("alpaca", CHATML):
        return template
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise LLMCoreError(f"{where}: not a valid format string: {e}") from None
    unknown = [f for f in fields if f not in TEMPLATE_FIELDS]
    if unknown:
        raise LLMCoreError(f"{where}: unknown placeholder {{{unknown[0]}}} (known: {{instruction}}, {{input}})")
    if "instruction" not in fields:
        raise LLMCoreError(f"{where}: a custom template needs an {{instruction}} placeholder, or use 'alpaca'")
    return template


def prompt_ids(tok: Tokenizer, template: str, instruction: str, input: str = "") -> list[int]:
    """The prompt of one entry as token ids: a chat model's (``chatml``) with its special tokens, a text
    template's encoded as plain text."""
    if template == CHATML:
        user = alpaca_to_messages({"instruction": instruction, "input": input, "output": ""})[:1]
        return render_chat(tok, user, add_generation_prompt=True).ids
    return tok.encode(format_prompt(template, instruction, input), allow_special=False)


def entry_prompt_ids(tok: Tokenizer, template: str, entry: dict, where: str) -> list[int]:
    """The prompt of a test entry (``responses.json``) as token ids: a chat model's entry that kept its prompt
    turns (``messages``: system, earlier user and assistant turns, the last question) is rendered turn by turn;
    any other entry through :func:`prompt_ids`. ``where`` names the entry in the error a malformed turn gives."""
    if template == CHATML and entry.get("messages") is not None:
        messages = check_messages(entry["messages"], where, need_assistant=False)
        return render_chat(tok, messages, add_generation_prompt=True).ids
    return prompt_ids(tok, template, entry["instruction"], entry["input"])


def answer_end_id(tok: Tokenizer, template: str) -> int:
    """The token that ends an answer in training data: ``<|im_end|>`` for a chat model, else end-of-text."""
    return chat_token_ids(tok)[1] if template == CHATML else tok.eot_id


def format_prompt(template: str, instruction: str, input: str = "") -> str:
    """The prompt of one entry, ending where the response starts (``chatml``: the text of a one-turn
    conversation; encode it with its special tokens, or better, use :func:`llmcore.text.chat.render_chat`)."""
    if template == CHATML:
        return chatml_text([alpaca_to_messages({"instruction": instruction, "input": input, "output": ""})[0]], True)
    if template == "alpaca":
        return format_alpaca(instruction, input)
    return template.format(instruction=instruction, input=input)
