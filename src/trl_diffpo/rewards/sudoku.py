"""4x4 Sudoku: the grid encoding, validity checks, an exact solver, and the two rewards.

Encoding: a grid is 16 cells in row-major order, digits 1-4, ``0`` for a blank: the string ``"1034..."`` (the
dataset columns ``puzzle`` and ``solution`` hold such 16-character strings). :func:`parse_grid` also accepts ``.``
or ``_`` for blanks, separators between cells, and a sequence of 16 ints or of 4 rows of 4 ints.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache
from typing import Any

from ._base import score_completions
from .extraction import answer_region

SIZE = 4
BOX = 2
CELLS = SIZE * SIZE
DIGITS = tuple(range(1, SIZE + 1))
BLANK = 0

Grid = tuple[int, ...]

# every row, column and 2x2 box as a tuple of cell indices
UNITS: tuple[tuple[int, ...], ...] = (
    tuple(tuple(row * SIZE + col for col in range(SIZE)) for row in range(SIZE))
    + tuple(tuple(row * SIZE + col for row in range(SIZE)) for col in range(SIZE))
    + tuple(
        tuple((box_row + r) * SIZE + box_col + c for r in range(BOX) for c in range(BOX))
        for box_row in range(0, SIZE, BOX)
        for box_col in range(0, SIZE, BOX)
    )
)
PEERS: tuple[frozenset[int], ...] = tuple(
    frozenset(cell for unit in UNITS if index in unit for cell in unit) - {index} for index in range(CELLS)
)
# "Row 1:", "r2)", "line 3." labels that would otherwise add digits to a written grid
_ROW_LABEL = re.compile(r"(?i)\b(?:row|line|r)\s*[0-9]+\s*[:.)\]-]")


def parse_grid(value: Any) -> Grid | None:
    """A 16-cell grid from a string (``"0-4"`` digits, ``.``/``_`` blanks, other characters ignored) or from 16
    ints / 4 rows of 4 ints; None if it does not describe exactly 16 cells with values 0-4."""
    if isinstance(value, str):
        cells = [
            BLANK if char in "._" else int(char) for char in value if char in "._" or char.isascii() and char.isdigit()
        ]
    elif isinstance(value, Sequence):
        flat: list[Any] = []
        for item in value:
            flat.extend(item if isinstance(item, Sequence) and not isinstance(item, str) else [item])
        try:
            cells = [int(cell) for cell in flat]
        except (TypeError, ValueError):
            return None
    else:
        return None
    if len(cells) != CELLS or any(cell not in (BLANK, *DIGITS) for cell in cells):
        return None
    return tuple(cells)


def grid_to_string(grid: Sequence[int]) -> str:
    """The 16-character encoding of a grid."""
    return "".join(str(cell) for cell in grid)


def is_complete_solution(grid: Sequence[int]) -> bool:
    """Whether every row, column and 2x2 box holds 1-4 exactly once."""
    return len(grid) == CELLS and all(sorted(grid[i] for i in unit) == list(DIGITS) for unit in UNITS)


def is_consistent(grid: Sequence[int], puzzle: Sequence[int]) -> bool:
    """Whether ``grid`` keeps every given (non-blank) cell of ``puzzle``."""
    return all(given == BLANK or given == cell for given, cell in zip(puzzle, grid))


def iter_solutions(puzzle: Sequence[int]) -> Iterator[Grid]:
    """All completions of ``puzzle`` (backtracking on the most constrained blank)."""
    grid = list(puzzle)
    if any(cell != BLANK and any(grid[peer] == cell for peer in PEERS[index]) for index, cell in enumerate(grid)):
        return

    def search() -> Iterator[Grid]:
        best, best_options = None, None
        for index, cell in enumerate(grid):
            if cell == BLANK:
                options = [d for d in DIGITS if all(grid[peer] != d for peer in PEERS[index])]
                if best_options is None or len(options) < len(best_options):
                    best, best_options = index, options
        if best is None:
            yield tuple(grid)
            return
        for digit in best_options:
            grid[best] = digit
            yield from search()
        grid[best] = BLANK

    yield from search()


def count_solutions(puzzle: Sequence[int], limit: int = 2) -> int:
    """Number of solutions of ``puzzle``, counting stops at ``limit`` (2 is enough to test uniqueness)."""
    count = 0
    for _ in iter_solutions(puzzle):
        count += 1
        if count >= limit:
            break
    return count


@lru_cache(maxsize=1)
def _solution_grids() -> tuple[Grid, ...]:
    return tuple(sorted(iter_solutions((BLANK,) * CELLS)))


def all_solution_grids() -> list[Grid]:
    """Every valid complete 4x4 grid (there are 288), in lexicographic order."""
    return list(_solution_grids())


def extract_sudoku_grid(text: str) -> Grid | None:
    """The grid a completion answers with, or None.

    The region is the last non-empty ``<answer>`` block, else the whole completion; row labels such as ``Row 1:``
    are removed. The grid is the region's digits when there are exactly 16 of them; with more, it is the digits of
    the region's last 4 lines that hold digits, when those hold exactly 16 (a grid written after some text).
    Anything else (fewer digits, or a run such as ``132132132132132132``) is no grid: never a guess from part of it.
    """
    region = answer_region(text)
    region = _ROW_LABEL.sub(" ", text if region is None else region)
    digits = _ascii_digits(region)
    if len(digits) == CELLS:
        return tuple(digits)
    if len(digits) > CELLS:
        digit_lines = [line_digits for line_digits in map(_ascii_digits, region.splitlines()) if line_digits]
        tail = [digit for line_digits in digit_lines[-SIZE:] for digit in line_digits]
        if len(tail) == CELLS:
            return tuple(tail)
    return None


def _ascii_digits(text: str) -> list[int]:
    return [int(char) for char in text if char.isascii() and char.isdigit()]


def _puzzle_and_solution(puzzle: Any, solution: Any) -> tuple[Grid, Grid]:
    puzzle_grid = parse_grid(puzzle)
    if puzzle_grid is None:
        raise ValueError(f"cannot read the sudoku puzzle {puzzle!r}: expected 16 cells with 0 for blanks")
    solution_grid = parse_grid(solution) if solution is not None else None
    if solution_grid is None:
        solution_grid = next(iter_solutions(puzzle_grid), None)
        if solution_grid is None:
            raise ValueError(f"the sudoku puzzle {puzzle!r} has no solution")
    return puzzle_grid, solution_grid


def judge_sudoku_cells(text: str, puzzle: Any, solution: Any = None) -> float:
    """Fraction of the puzzle's blank cells that the completion's grid fills with the solution's digit."""
    puzzle_grid, solution_grid = _puzzle_and_solution(puzzle, solution)
    answer = extract_sudoku_grid(text)
    blanks = [index for index, cell in enumerate(puzzle_grid) if cell == BLANK]
    if answer is None or not blanks:
        return 0.0
    return sum(answer[index] == solution_grid[index] for index in blanks) / len(blanks)


def judge_sudoku_strict(text: str, puzzle: Any) -> float:
    """1.0 when the completion's grid is a complete valid sudoku that keeps every given of ``puzzle``, else 0.0."""
    puzzle_grid = parse_grid(puzzle)
    if puzzle_grid is None:
        raise ValueError(f"cannot read the sudoku puzzle {puzzle!r}: expected 16 cells with 0 for blanks")
    answer = extract_sudoku_grid(text)
    return float(answer is not None and is_complete_solution(answer) and is_consistent(answer, puzzle_grid))


def sudoku_reward(prompts=None, completions=(), completion_ids=None, puzzle=None, solution=None, **kwargs):
    """Fraction of blank cells filled correctly (reads ``puzzle``, and ``solution`` if present; else it is solved)."""
    return score_completions(
        "sudoku_reward", completions, judge_sudoku_cells, {"puzzle": puzzle}, optional_columns={"solution": solution}
    )


def sudoku_strict_reward(prompts=None, completions=(), completion_ids=None, puzzle=None, **kwargs):
    """1.0 for a complete valid grid consistent with the ``puzzle`` givens, else 0.0."""
    return score_completions("sudoku_strict_reward", completions, judge_sudoku_strict, {"puzzle": puzzle})


SUDOKU_REWARDS: tuple[Callable[..., list[float | None]], ...] = (sudoku_reward, sudoku_strict_reward)
