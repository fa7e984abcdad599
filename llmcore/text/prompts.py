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
