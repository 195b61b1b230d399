"""Turning a completion into text and pulling the answer out of it (shared by all rewards).

Rules (documented in docs/tasks.md):
- a completion is either a string or a conversation (list of ``{"role", "content"}`` dicts, TRL's conversational
  format); for a conversation the content of the **last assistant message** is used (the last message if none has
  the assistant role). Anything else becomes ``""``;
- the answer region is the content of the **last** ``<answer>...</answer>``; a final ``<answer>`` that is never
  closed extends to the end of the text (diffusion models often lose the closing tag);
- ``\\boxed{...}`` is read with balanced braces, the last complete one wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
BOXED_COMMANDS = (r"\boxed", r"\fbox")  # raw strings: "\b" would be a backspace character
# how many trailing \boxed occurrences are tried when the last ones are unbalanced (keeps the scan linear)
MAX_BOXED_CANDIDATES = 8
GSM8K_ANSWER_SEPARATOR = "####"


def completion_to_text(completion: Any) -> str:
    """The text of one completion: a string as is, or the last assistant message of a conversation."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return _content_to_text(completion.get("content"))
    if isinstance(completion, Sequence) and not isinstance(completion, (bytes, bytearray)):
        messages = [message for message in completion if isinstance(message, dict)]
        if not messages:
            return ""
        assistant = [message for message in messages if message.get("role") == "assistant"]
        return _content_to_text((assistant or messages)[-1].get("content"))
    return ""


def _content_to_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):  # multimodal content: a list of {"type": "text", "text": ...} parts
        parts = [part.get("text") for part in content if isinstance(part, dict)]
        return "".join(part for part in parts if isinstance(part, str))
    return ""


def extract_xml_answer(text: str) -> str | None:
    """The content of the last ``<answer>`` block (to ``</answer>`` or the end of the text), stripped; else None."""
    start = text.rfind(ANSWER_OPEN)
    if start < 0:
        return None
    start += len(ANSWER_OPEN)
    end = text.find(ANSWER_CLOSE, start)
    return (text[start:] if end < 0 else text[start:end]).strip()


def extract_boxed(text: str) -> str | None:
    """The content of the last balanced ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, stripped; else None."""
    starts = sorted(
        (index for command in BOXED_COMMANDS for index in _find_all(text, command + "{")),
        reverse=True,
    )
    for start in starts[:MAX_BOXED_CANDIDATES]:
        open_brace = text.index("{", start)
        content = _balanced_group(text, open_brace)
        if content is not None:
            return content.strip()
    return None


def _find_all(text: str, needle: str) -> list[int]:
    indices, index = [], text.find(needle)
    while index >= 0:
        indices.append(index)
        index = text.find(needle, index + 1)
    return indices


def _balanced_group(text: str, open_brace: int) -> str | None:
    depth = 0
    for index in range(open_brace, len(text)):
        char = text[index]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[open_brace + 1 : index]
    return None


def extract_math_answer(text: str) -> str | None:
    """The final math answer of a completion: a ``\\boxed{}`` inside the last ``<answer>`` block, else that block's
    text, else the last ``\\boxed{}`` anywhere; None when there is none."""
    answer = extract_xml_answer(text)
    if answer is not None:
        boxed = extract_boxed(answer)
        return boxed if boxed is not None else (answer or None)
    return extract_boxed(text)


def normalize_gold_answer(gold: Any) -> str | None:
    """A gold answer as text: GSM8K's ``"...#### 1,234"`` becomes ``"1234"``; other text is stripped."""
    if gold is None:
        return None
    gold = str(gold)
    if GSM8K_ANSWER_SEPARATOR in gold:
        gold = gold.rsplit(GSM8K_ANSWER_SEPARATOR, 1)[1].replace(",", "")
    gold = gold.strip()
    return gold or None
