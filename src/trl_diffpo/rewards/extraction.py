"""Turning a completion into text and pulling the answer out of it (shared by all rewards).

Rules (documented in docs/tasks.md):
- a completion is either a string or a conversation (list of ``{"role", "content"}`` dicts, TRL's conversational
  format); for a conversation the content of the **last assistant message** is used (the last message if none has
  the assistant role). Anything else becomes ``""``;
- the answer region is the content of the **last** ``<answer>...</answer>``; a final ``<answer>`` that is never
  closed extends to the end of the text (diffusion models often lose the closing tag). An **empty** last block
  counts as no block (:func:`answer_region`), so an answer written after ``<answer></answer>`` is still read;
- ``\\boxed{...}`` (also ``\\fbox{...}``, and ``boxed{...}`` without its backslash) is read with balanced braces;
  the last box wins; a last box whose brace is never closed runs to the end of its line; an empty box is ignored.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
# box commands searched without their backslash, so that `boxed{4}` (a lost backslash) is read too; raw strings
# elsewhere keep "\b" from becoming a backspace character
BOX_NAMES = ("boxed", "fbox")
# how many trailing boxes are tried when the last ones are empty (keeps the scan linear)
MAX_BOXED_CANDIDATES = 8
GSM8K_ANSWER_SEPARATOR = "####"

_BOX_START = re.compile(r"\\?(?:" + "|".join(BOX_NAMES) + r")\{")
_EMPTY_BOX = re.compile(r"\\?(?:" + "|".join(BOX_NAMES) + r")\{\s*\}")
# decorations around a final answer that are not part of its value (see answer_expression_forms)
_TEXT_COMMAND = re.compile(r"\\(?:text|textbf|textrm|mathrm|mbox)\{([^{}]*)\}")
_LEADING_PHRASE = re.compile(r"^(?:[A-Za-z][A-Za-z' ]*?\s(?:is|are|equals)|[A-Za-z][A-Za-z' ]*:)\s+(?=\S)")
_TRAILING_WORDS = re.compile(r"^(?P<value>.*[0-9}).])\s+(?P<words>[A-Za-z]{2,}(?:[ -][A-Za-z]{2,})*)\.?$")


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


def answer_region(text: str) -> str | None:
    """The last ``<answer>`` block's content when it holds something; None without a block or for an empty one."""
    region = extract_xml_answer(text)
    return region or None


def extract_boxed(text: str) -> str | None:
    """The content of the last non-empty box in ``text``, stripped; else None.

    A box is ``\\boxed{...}`` or ``\\fbox{...}`` (the backslash may be missing) read with balanced braces; a box
    whose brace is never closed runs to the end of its line; empty boxes are skipped.
    """
    starts = [match.end() - 1 for match in _BOX_START.finditer(text)]
    for open_brace in reversed(starts[-MAX_BOXED_CANDIDATES:]):
        content = _balanced_group(text, open_brace)
        if content is None:  # unclosed: the rest of the line
            line_end = text.find("\n", open_brace)
            content = text[open_brace + 1 : line_end if line_end >= 0 else len(text)]
        if content.strip():
            return content.strip()
    return None


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
    """The final math answer of a completion; None when there is none.

    The last non-empty box inside the answer region, else the region's text (empty boxes removed), else the last
    non-empty box anywhere (so ``<answer></answer> ... \\boxed{5}`` gives ``5``).
    """
    region = answer_region(text)
    if region is not None:
        boxed = extract_boxed(region)
        if boxed is not None:
            return boxed
        plain = _EMPTY_BOX.sub(" ", region).strip()
        if plain:
            return plain
    return extract_boxed(text)


def answer_expression_forms(answer: str) -> list[str]:
    """The forms of one final answer that are judged: the answer as written, then with its decorations removed.

    Decorations are ``\\text{...}``-style wrappers (their content kept), ``$`` signs, a leading phrase ending in
    "is"/"are"/"equals" or ":" ("The answer is 14", "Answer: 14"), trailing unit words after a value ("130 dollars",
    "12 square feet") and a final period. Nothing else is removed, so ``13 or 14``, ``x = 7, y = 14`` or
    ``-4u + 14`` stay whole expressions that never equal 14.
    """
    answer = answer.strip()
    forms = [answer]
    plain = _TEXT_COMMAND.sub(r" \1 ", answer).replace("\\$", " ").replace("$", " ")
    plain = " ".join(plain.split())
    plain = _LEADING_PHRASE.sub("", plain)
    trailing = _TRAILING_WORDS.match(plain)
    if trailing is not None and not re.search(r"[A-Za-z]", trailing.group("value")):
        plain = trailing.group("value")
    plain = plain.rstrip(".").strip()
    if plain and plain != answer:
        forms.append(plain)
    return forms


def normalize_gold_answer(gold: Any) -> str | None:
    """A gold answer as text: GSM8K's ``"...#### 1,234"`` becomes ``"1234"``; other text is stripped."""
    if gold is None:
        return None
    gold = str(gold)
    if GSM8K_ANSWER_SEPARATOR in gold:
        gold = gold.rsplit(GSM8K_ANSWER_SEPARATOR, 1)[1].replace(",", "")
    gold = gold.strip()
    return gold or None
