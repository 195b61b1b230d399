"""Offline 4x4 Sudoku generator: unique-solution puzzles, split by solution grid, deterministic for a seed.

There are exactly 288 valid 4x4 grids. They are shuffled with ``split_seed`` and a ``test_fraction`` of them is
reserved for the ``"test"`` split, the rest for ``"train"``: no solution grid appears in both splits, whatever
``seed`` each split is sampled with (keep ``split_seed`` and ``test_fraction`` equal for the two calls). A puzzle
is made by blanking cells of a grid in random order, skipping any cell whose removal would allow a second solution,
until ``num_blanks`` cells are blank.
"""

from __future__ import annotations

import random
from typing import Any

from datasets import Dataset, DatasetDict

from ..rewards.sudoku import BLANK, CELLS, Grid, all_solution_grids, count_solutions, grid_to_string
from .prompts import SYSTEM_PROMPT, build_prompt, sudoku_question

MIN_GIVENS = 4  # no 4x4 sudoku with fewer than 4 givens has a unique solution
MAX_BLANKS = CELLS - MIN_GIVENS
DEFAULT_NUM_BLANKS = (6, 10)
DEFAULT_TEST_FRACTION = 0.25
DEFAULT_SPLIT_SEED = 0
MAX_ATTEMPTS_PER_EXAMPLE = 200


def solution_grids_for_split(
    split: str, test_fraction: float = DEFAULT_TEST_FRACTION, split_seed: int = DEFAULT_SPLIT_SEED
) -> list[Grid]:
    """The solution grids reserved for ``split`` ("train" or "test"); the two lists are disjoint and cover all 288."""
    if split not in ("train", "test"):
        raise ValueError(f"sudoku split must be 'train' or 'test', got {split!r}.")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}.")
    grids = all_solution_grids()
    random.Random(split_seed).shuffle(grids)
    num_test = max(1, round(test_fraction * len(grids)))
    return grids[:num_test] if split == "test" else grids[num_test:]


def make_puzzle(solution: Grid, num_blanks: int, rng: random.Random) -> Grid | None:
    """Blank ``num_blanks`` cells of ``solution`` keeping the solution unique; None if this random order fails."""
    puzzle = list(solution)
    order = list(range(CELLS))
    rng.shuffle(order)
    blanks = 0
    for index in order:
        if blanks == num_blanks:
            break
        kept = puzzle[index]
        puzzle[index] = BLANK
        if count_solutions(puzzle, limit=2) == 1:
            blanks += 1
        else:
            puzzle[index] = kept
    return tuple(puzzle) if blanks == num_blanks else None


def _blank_counts(num_blanks: int | tuple[int, int]) -> tuple[int, int]:
    low, high = (num_blanks, num_blanks) if isinstance(num_blanks, int) else num_blanks
    if not 1 <= low <= high <= MAX_BLANKS:
        raise ValueError(f"num_blanks must be an int or (low, high) within [1, {MAX_BLANKS}], got {num_blanks!r}.")
    return low, high


def generate_sudoku(
    num_examples: int,
    *,
    split: str = "train",
    num_blanks: int | tuple[int, int] = DEFAULT_NUM_BLANKS,
    seed: int = 0,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    split_seed: int = DEFAULT_SPLIT_SEED,
    tokenizer: Any = None,
    chat: bool | None = None,
    system_prompt: str | None = SYSTEM_PROMPT,
) -> Dataset:
    """Generate ``num_examples`` distinct 4x4 puzzles with exactly one solution, from ``split``'s solution grids.

    Args:
        num_examples: number of rows.
        split: ``"train"`` or ``"test"``: which reserved set of solution grids to use.
        num_blanks: blank cells per puzzle, an int or an inclusive ``(low, high)`` range (at most 12).
        seed: sampling seed (the same seed gives the same dataset).
        test_fraction, split_seed: how the 288 grids are divided between the splits.
        tokenizer, chat, system_prompt: prompt format, as in :func:`~trl_diffpo.data.prompts.build_prompt`.

    Returns:
        A Dataset with ``prompt``, ``puzzle`` and ``solution`` (16-character strings, 0 = blank).

    Example:
        >>> rows = generate_sudoku(3, split="test", num_blanks=8, seed=0, chat=False)
        >>> rows[0]["puzzle"].count("0")
        8
    """
    low, high = _blank_counts(num_blanks)
    grids = solution_grids_for_split(split, test_fraction, split_seed)
    rng = random.Random(seed)
    rows, seen = [], set()
    for _ in range(num_examples * MAX_ATTEMPTS_PER_EXAMPLE):
        if len(rows) == num_examples:
            break
        solution = rng.choice(grids)
        puzzle = make_puzzle(solution, rng.randint(low, high), rng)
        if puzzle is None or puzzle in seen:
            continue
        seen.add(puzzle)
        puzzle_text = grid_to_string(puzzle)
        question = sudoku_question(puzzle_text)
        rows.append(
            {
                "prompt": build_prompt(question, tokenizer=tokenizer, chat=chat, system_prompt=system_prompt),
                "puzzle": puzzle_text,
                "solution": grid_to_string(solution),
            }
        )
    if len(rows) < num_examples:
        raise ValueError(
            f"generate_sudoku: only {len(rows)} distinct unique-solution puzzles found for {num_examples} requested "
            f"with num_blanks={num_blanks!r}; request fewer, or allow a wider num_blanks range."
        )
    return Dataset.from_list(rows)


def generate_sudoku_splits(num_train: int, num_test: int, *, seed: int = 0, **kwargs: Any) -> DatasetDict:
    """``DatasetDict(train=..., test=...)`` from :func:`generate_sudoku` with grid-disjoint splits.

    The two splits use different sampling seeds derived from ``seed``; other keyword arguments go to both calls.
    """
    return DatasetDict(
        train=generate_sudoku(num_train, split="train", seed=seed, **kwargs),
        test=generate_sudoku(num_test, split="test", seed=seed + 1, **kwargs),
    )
