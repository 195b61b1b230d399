"""Offline Countdown generator: solvable instances with one stored solution, deterministic for a seed.

An instance is ``nums`` (``num_numbers`` integers drawn from ``number_range``) and an integer ``target`` in
``target_range`` that some expression using every number exactly once with ``+ - * /`` and parentheses reaches
exactly (rational arithmetic: intermediate fractions and negatives are allowed, as in the reward). All reachable
values are found by an exact search over subsets, and the target is drawn uniformly among the reachable ones, so every
instance is solvable by construction; ``solution`` holds one such expression.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

from datasets import Dataset

from .prompts import SYSTEM_PROMPT, build_prompt, countdown_question

MIN_NUMBERS, MAX_NUMBERS = 2, 5  # the exact search grows very fast beyond 5 numbers
DEFAULT_NUMBER_RANGE = (1, 100)
DEFAULT_TARGET_RANGE = (1, 100)
MAX_ATTEMPTS_PER_EXAMPLE = 200


def reachable_values(nums: Sequence[int]) -> dict[Fraction, str]:
    """Every exact value an expression using each of ``nums`` once can take, with one expression for each.

    Dynamic programming over subsets (bitmasks): the values of a subset are all ``a op b`` for a split of the
    subset into two non-empty parts with values ``a`` and ``b``.
    """
    count = len(nums)
    table: dict[int, dict[Fraction, str]] = {1 << i: {Fraction(int(n)): str(int(n))} for i, n in enumerate(nums)}
    for mask in sorted(range(1, 1 << count), key=lambda m: bin(m).count("1")):
        if mask in table:
            continue
        values: dict[Fraction, str] = {}
        part = (mask - 1) & mask
        while part:
            rest = mask ^ part
            if part < rest:  # each unordered split once; both operand orders are tried below
                for left, left_text in table[part].items():
                    for right, right_text in table[rest].items():
                        for value, text in _combinations(left, _wrap(left_text), right, _wrap(right_text)):
                            values.setdefault(value, text)
            part = (part - 1) & mask
        table[mask] = values
    return table[(1 << count) - 1]


def _wrap(text: str) -> str:
    return text if text.isdigit() else f"({text})"


def _combinations(a: Fraction, a_text: str, b: Fraction, b_text: str):
    yield a + b, f"{a_text} + {b_text}"
    yield a * b, f"{a_text} * {b_text}"
    yield a - b, f"{a_text} - {b_text}"
    yield b - a, f"{b_text} - {a_text}"
    if b != 0:
        yield a / b, f"{a_text} / {b_text}"
    if a != 0:
        yield b / a, f"{b_text} / {a_text}"


def solve_countdown(nums: Sequence[int], target: int) -> str | None:
    """One expression using each of ``nums`` exactly once that equals ``target``, or None if there is none."""
    return reachable_values(nums).get(Fraction(int(target)))


def generate_countdown(
    num_examples: int,
    *,
    num_numbers: int = 3,
    number_range: tuple[int, int] = DEFAULT_NUMBER_RANGE,
    target_range: tuple[int, int] = DEFAULT_TARGET_RANGE,
    seed: int = 0,
    tokenizer: Any = None,
    chat: bool | None = None,
    system_prompt: str | None = SYSTEM_PROMPT,
) -> Dataset:
    """Generate ``num_examples`` distinct solvable Countdown instances.

    Args:
        num_examples: number of rows.
        num_numbers: numbers per instance (2 to 5).
        number_range: inclusive range of the numbers.
        target_range: inclusive range of the target.
        seed: the same seed gives the same dataset.
        tokenizer, chat, system_prompt: prompt format, as in :func:`~trl_diffpo.data.prompts.build_prompt`.

    Returns:
        A Dataset with ``prompt``, ``target``, ``nums`` (the loader's columns) and ``solution`` (one expression).

    Example:
        >>> rows = generate_countdown(4, num_numbers=3, seed=1, chat=False)
        >>> sorted(rows.column_names)
        ['nums', 'prompt', 'solution', 'target']
    """
    if not MIN_NUMBERS <= num_numbers <= MAX_NUMBERS:
        raise ValueError(
            f"generate_countdown: num_numbers must be in [{MIN_NUMBERS}, {MAX_NUMBERS}], got {num_numbers}."
        )
    low, high = number_range
    target_low, target_high = target_range
    if not 0 <= low <= high or not target_low <= target_high:
        raise ValueError(
            f"generate_countdown: need 0 <= low <= high in number_range={number_range} and an ordered target_range="
            f"{target_range}."
        )
    rng = random.Random(seed)
    rows, seen = [], set()
    for _ in range(num_examples * MAX_ATTEMPTS_PER_EXAMPLE):
        if len(rows) == num_examples:
            break
        nums = [rng.randint(low, high) for _ in range(num_numbers)]
        reachable = reachable_values(nums)
        targets = sorted(
            int(value) for value in reachable if value.denominator == 1 and target_low <= value <= target_high
        )
        if not targets:
            continue
        target = rng.choice(targets)
        key = (tuple(sorted(nums)), target)
        if key in seen:
            continue
        seen.add(key)
        question = countdown_question(nums, target)
        rows.append(
            {
                "prompt": build_prompt(question, tokenizer=tokenizer, chat=chat, system_prompt=system_prompt),
                "target": target,
                "nums": nums,
                "solution": reachable[Fraction(target)],
            }
        )
    if len(rows) < num_examples:
        raise ValueError(
            f"generate_countdown: only {len(rows)} distinct solvable instances found for {num_examples} requested; "
            "widen number_range or target_range."
        )
    return Dataset.from_list(rows)
