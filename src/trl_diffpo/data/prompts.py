"""Prompt wording and the plain-text / conversational prompt builder shared by every task.

The system prompt asks for the two-block XML layout that the format rewards check and from which the answer is
extracted (d1-style, our own wording).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

SYSTEM_PROMPT = (
    "Work through the problem step by step before answering. Reply in exactly this layout:\n"
    "<reasoning>\n"
    "your step-by-step working\n"
    "</reasoning>\n"
    "<answer>\n"
    "the final answer, and nothing else\n"
    "</answer>"
)

MATH_INSTRUCTION = "Give the final answer in simplest form (LaTeX is fine), without units."
COUNTDOWN_TEMPLATE = (
    "Using the numbers {nums}, write an arithmetic expression that equals {target}. You may use +, -, *, / and "
    "parentheses, and must use every number exactly once. In the answer, write only the expression, for example "
    "(7 - 3) * 5."
)
SUDOKU_TEMPLATE = (
    "Solve this 4x4 Sudoku. Replace every 0 with a digit from 1 to 4 so that each row, each column and each of the "
    "four 2x2 boxes contains 1, 2, 3 and 4 exactly once.\n\n{grid}\n\n"
    "In the answer, write the completed grid as 4 lines of 4 digits."
)


def use_chat_format(tokenizer: Any = None, chat: bool | None = None) -> bool:
    """Whether prompts are conversational: ``chat`` when given, else whether ``tokenizer`` has a chat template."""
    if chat is not None:
        return bool(chat)
    return tokenizer is not None and getattr(tokenizer, "chat_template", None) is not None


def build_prompt(
    user_text: str,
    *,
    tokenizer: Any = None,
    chat: bool | None = None,
    system_prompt: str | None = SYSTEM_PROMPT,
    system_role: bool = True,
) -> str | list[dict[str, str]]:
    """A TRL prompt: a list of messages (conversational) or one string.

    Args:
        user_text: the task text.
        tokenizer: decides the format when ``chat`` is None (conversational if it has a chat template).
        chat: force conversational (True) or plain text (False).
        system_prompt: instructions placed before the task; None or "" for none.
        system_role: in conversational format, send ``system_prompt`` as a ``system`` message (True) or prepend it
            to the user message (False, for chat templates without a system role).

    Example:
        >>> build_prompt("What is 2 + 3?", chat=False, system_prompt="Be brief.")
        'Be brief.\\n\\nWhat is 2 + 3?'
    """
    if not use_chat_format(tokenizer, chat):
        return f"{system_prompt}\n\n{user_text}" if system_prompt else user_text
    if system_prompt and system_role:
        return [{"role": "system", "content": system_prompt}, {"role": "user", "content": user_text}]
    content = f"{system_prompt}\n\n{user_text}" if system_prompt else user_text
    return [{"role": "user", "content": content}]


def countdown_question(nums: Sequence[int], target: int) -> str:
    """The Countdown task text for ``nums`` and ``target``."""
    return COUNTDOWN_TEMPLATE.format(nums=", ".join(str(int(number)) for number in nums), target=int(target))


def sudoku_question(puzzle: str) -> str:
    """The Sudoku task text for a 16-character puzzle (0 = blank), shown as 4 lines of 4 digits."""
    grid = "\n".join(puzzle[row : row + 4] for row in range(0, 16, 4))
    return SUDOKU_TEMPLATE.format(grid=grid)


def math_question(problem: str) -> str:
    """The MATH task text: the problem and the answer-form instruction."""
    return f"{problem}\n\n{MATH_INSTRUCTION}"
