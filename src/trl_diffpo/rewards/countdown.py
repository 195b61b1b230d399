"""Countdown reward: a whitelist arithmetic parser with exact rational evaluation (never ``eval``).

Grammar (whitespace ignored)::

    expression := term (("+" | "-") term)*
    term       := factor (("*" | "/") factor)*
    factor     := INTEGER | "(" expression ")"

No unary minus, no exponent, no decimals. Inputs are bounded (:data:`MAX_EXPRESSION_CHARS` characters,
:data:`MAX_PAREN_DEPTH` nested parentheses, :data:`MAX_LITERAL_DIGITS` digits per number), so parsing and evaluating
take linear time and small memory whatever the model writes. Division uses :class:`fractions.Fraction`; a division by
zero makes the expression well formed but undefined (never equal to the target).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

from ._base import score_completions
from .extraction import answer_region, extract_boxed

MAX_EXPRESSION_CHARS = 200
MAX_PAREN_DEPTH = 16
MAX_LITERAL_DIGITS = 6
DEFAULT_PARTIAL_CREDIT = 0.1

# symbols models write for the four operations, mapped to ASCII (LaTeX commands first: "\div" before "\d...")
_OPERATOR_SPELLINGS = (
    (r"\times", "*"),
    (r"\cdot", "*"),
    (r"\div", "/"),
    ("×", "*"),
    ("·", "*"),
    ("∗", "*"),
    ("÷", "/"),
    ("−", "-"),
    ("–", "-"),
    (r"\left", ""),
    (r"\right", ""),
    ("$", ""),
)
_EXPRESSION_RUN = re.compile(r"[0-9+\-*/()\s]+")
_TOKEN = re.compile(r"\s*(?:([0-9]+)|([+\-*/()]))")
_OPERATOR_CHARS = frozenset("+-*/")


@dataclass(frozen=True)
class ParsedExpression:
    """A parsed countdown expression: its exact value (None after a division by zero) and its number literals."""

    value: Fraction | None
    numbers: tuple[int, ...]


class _Parser:
    def __init__(self, tokens: list[str]):
        self.tokens, self.position, self.numbers = tokens, 0, []

    def peek(self) -> str | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def take(self) -> str:
        token = self.tokens[self.position]
        self.position += 1
        return token

    def expression(self, depth: int) -> Fraction | None:
        value = self.term(depth)
        while self.peek() in ("+", "-"):
            operator, right = self.take(), self.term(depth)
            if value is None or right is None:
                value = None
            else:
                value = value + right if operator == "+" else value - right
        return value

    def term(self, depth: int) -> Fraction | None:
        value = self.factor(depth)
        while self.peek() in ("*", "/"):
            operator, right = self.take(), self.factor(depth)
            if value is None or right is None or (operator == "/" and right == 0):
                value = None
            else:
                value = value * right if operator == "*" else value / right
        return value

    def factor(self, depth: int) -> Fraction | None:
        token = self.peek()
        if token is None:
            raise ValueError("expression ends early")
        if token == "(":
            if depth >= MAX_PAREN_DEPTH:
                raise ValueError("parentheses nested too deeply")
            self.take()
            value = self.expression(depth + 1)
            if self.peek() != ")":
                raise ValueError("missing ')'")
            self.take()
            return value
        if token.isdigit():
            self.take()
            self.numbers.append(int(token))
            return Fraction(int(token))
        raise ValueError(f"unexpected {token!r}")


def parse_arithmetic(text: str) -> ParsedExpression | None:
    """Parse and exactly evaluate an arithmetic expression; None when it is not well formed or out of bounds."""
    text = text.strip()
    if not text or len(text) > MAX_EXPRESSION_CHARS:
        return None
    tokens, position = [], 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            if text[position:].strip() == "":
                break
            return None
        number, symbol = match.groups()
        if number is not None and len(number) > MAX_LITERAL_DIGITS:
            return None
        tokens.append(number if number is not None else symbol)
        position = match.end()
    parser = _Parser(tokens)
    try:
        value = parser.expression(depth=0)
    except ValueError:
        return None
    if parser.position != len(tokens):
        return None
    return ParsedExpression(value=value, numbers=tuple(parser.numbers))


def normalize_operators(text: str) -> str:
    """Map LaTeX/unicode spellings of the four operations to ``+ - * /`` and drop ``$``, ``\\left``, ``\\right``."""
    for spelling, ascii_symbol in _OPERATOR_SPELLINGS:
        text = text.replace(spelling, ascii_symbol)
    return text


def extract_countdown_expression(text: str) -> str | None:
    """The candidate expression of a countdown completion (None if there is none).

    1. The region is the last non-empty ``<answer>`` block, else the last non-empty ``\\boxed{}`` (so
       ``\\[ \\boxed{34+53-32} \\]`` without tags is read), else the last non-empty line of the completion.
    2. Operators are normalised (``\\times``, ``×`` -> ``*``; ``\\div``, ``÷`` -> ``/``; ``$`` dropped).
    3. The region is cut into runs of expression characters (digits, ``+ - * / ( )``, spaces); ``=``, letters and
       other punctuation separate runs. The **last run that holds an operator** is the candidate, else the last run
       holding a digit. So ``(1+2)*3 = 9`` and ``9 = (1+2)*3`` give ``(1+2)*3``, and words such as "The answer is"
       are dropped.
    """
    region = answer_region(text)
    if region is None:
        region = extract_boxed(text)
    if region is None:
        lines = [line for line in text.splitlines() if line.strip()]
        if not lines:
            return None
        region = lines[-1]
    region = normalize_operators(region)
    runs = [run.strip() for run in _EXPRESSION_RUN.findall(region) if any(char.isdigit() for char in run)]
    if not runs:
        return None
    with_operator = [run for run in runs if _OPERATOR_CHARS.intersection(run)]
    return (with_operator or runs)[-1]


def judge_countdown(text: str, target, nums: Sequence, partial_credit: float = DEFAULT_PARTIAL_CREDIT) -> float:
    """1.0 if the completion's expression uses each of ``nums`` exactly once and equals ``target``;
    ``partial_credit`` if an expression is found and well formed but wrong; 0.0 otherwise."""
    candidate = extract_countdown_expression(text)
    parsed = parse_arithmetic(candidate) if candidate is not None else None
    if parsed is None:
        return 0.0
    uses_all_numbers = Counter(parsed.numbers) == Counter(int(number) for number in nums)
    if uses_all_numbers and parsed.value is not None and parsed.value == Fraction(int(target)):
        return 1.0
    return float(partial_credit)


def make_countdown_reward(
    partial_credit: float = DEFAULT_PARTIAL_CREDIT, name: str = "countdown_reward"
) -> Callable[..., list[float | None]]:
    """Build a TRL reward for Countdown reading the ``target`` and ``nums`` columns (see :func:`judge_countdown`).

    Args:
        partial_credit: reward for a well-formed expression that is wrong (wrong numbers or wrong value).
        name: the function's ``__name__`` (TRL's metric name).
    """
    if not 0.0 <= partial_credit < 1.0:
        raise ValueError(f"make_countdown_reward: partial_credit must be in [0, 1), got {partial_credit}.")

    def reward(prompts=None, completions=(), completion_ids=None, target=None, nums=None, **kwargs):
        def score(text: str, target, nums) -> float:
            return judge_countdown(text, target, nums, partial_credit)

        return score_completions(name, completions, score, {"target": target, "nums": nums})

    reward.__name__ = reward.__qualname__ = name
    reward.__doc__ = f"Countdown reward (1.0 correct, {partial_credit} well formed but wrong, 0.0 otherwise)."
    return reward


countdown_reward = make_countdown_reward()
countdown_accuracy_reward = make_countdown_reward(partial_credit=0.0, name="countdown_accuracy_reward")
