"""Procedural generators, checked by independent brute-force solvers written here."""

from __future__ import annotations

import ast
import random
from fractions import Fraction
from functools import lru_cache
from itertools import permutations

import pytest

from trl_diffpo.data import (
    generate_countdown,
    generate_sudoku,
    generate_sudoku_splits,
    make_puzzle,
    reachable_values,
    solution_grids_for_split,
    solve_countdown,
)
from trl_diffpo.rewards import countdown_accuracy_reward, sudoku_strict_reward
from trl_diffpo.rewards.sudoku import all_solution_grids, count_solutions


# ---------------------------------------------------------------------------------------------------- references
def brute_force_values(numbers: tuple[Fraction, ...]) -> set[Fraction]:
    """Every value reachable by repeatedly replacing two numbers with a op b (the classic '24 game' search)."""
    if len(numbers) == 1:
        return {numbers[0]}
    values = set()
    for i in range(len(numbers)):
        for j in range(len(numbers)):
            if i == j:
                continue
            a, b = numbers[i], numbers[j]
            rest = tuple(numbers[k] for k in range(len(numbers)) if k not in (i, j))
            results = [a + b, a - b, a * b] + ([a / b] if b != 0 else [])
            for result in results:
                values |= brute_force_values((*rest, result))
    return values


def expression_value_and_literals(expression: str) -> tuple[Fraction, list[int]]:
    """Independent evaluation of a generated solution string with Python's parser and Fractions."""
    literals = []

    def walk(node):
        if isinstance(node, ast.Constant):
            literals.append(node.value)
            return Fraction(node.value)
        left, right = walk(node.left), walk(node.right)
        operations = {ast.Add: left.__add__, ast.Sub: left.__sub__, ast.Mult: left.__mul__, ast.Div: left.__truediv__}
        return operations[type(node.op)](right)

    return walk(ast.parse(expression, mode="eval").body), literals


def is_valid_grid(grid: tuple[int, ...]) -> bool:
    rows = [grid[4 * r : 4 * r + 4] for r in range(4)]
    columns = [grid[c::4] for c in range(4)]
    boxes = [[grid[4 * (r + dr) + c + dc] for dr in (0, 1) for dc in (0, 1)] for r in (0, 2) for c in (0, 2)]
    return all(sorted(unit) == [1, 2, 3, 4] for unit in rows + columns + boxes)


@lru_cache(maxsize=1)
def brute_force_grids() -> tuple[tuple[int, ...], ...]:
    """All valid 4x4 grids by trying every choice of four row permutations (24**4 candidates)."""
    rows = list(permutations((1, 2, 3, 4)))
    return tuple(grid for a in rows for b in rows for c in rows for d in rows if is_valid_grid(grid := a + b + c + d))


def brute_force_solutions(puzzle: str) -> list[tuple[int, ...]]:
    givens = [(index, int(char)) for index, char in enumerate(puzzle) if char != "0"]
    return [grid for grid in brute_force_grids() if all(grid[index] == digit for index, digit in givens)]


# ---------------------------------------------------------------------------------------------------- countdown
class TestCountdownGenerator:
    @pytest.mark.parametrize(("num_numbers", "count"), [(2, 20), (3, 30), (4, 8)])
    def test_every_instance_is_solvable_and_the_solution_checks_out(self, num_numbers, count):
        rows = generate_countdown(count, num_numbers=num_numbers, seed=3, chat=False)
        assert rows.column_names == ["prompt", "target", "nums", "solution"]
        for row in rows:
            nums, target = row["nums"], row["target"]
            assert len(nums) == num_numbers
            assert all(1 <= n <= 100 for n in nums) and 1 <= target <= 100
            assert Fraction(target) in brute_force_values(tuple(Fraction(n) for n in nums))
            value, literals = expression_value_and_literals(row["solution"])
            assert value == target and sorted(literals) == sorted(nums)
            assert f"{target}" in row["prompt"]
        scores = countdown_accuracy_reward(None, [f"<answer>{s}</answer>" for s in rows["solution"]], **rows[:])
        assert scores == [1.0] * count

    def test_reachable_values_match_brute_force(self):
        rng = random.Random(0)
        for _ in range(15):
            nums = [rng.randint(0, 12) for _ in range(rng.randint(1, 4))]
            assert set(reachable_values(nums)) == brute_force_values(tuple(Fraction(n) for n in nums))

    def test_solver_says_none_only_when_unsolvable(self):
        assert solve_countdown([1, 1], 5) is None and 5 not in brute_force_values((Fraction(1), Fraction(1)))
        expression = solve_countdown([7, 3, 9], 21)
        assert expression_value_and_literals(expression)[0] == 21

    def test_ranges_determinism_and_distinct_rows(self):
        kwargs = {"num_numbers": 3, "number_range": (2, 9), "target_range": (20, 40), "chat": False}
        first, again = generate_countdown(25, seed=5, **kwargs), generate_countdown(25, seed=5, **kwargs)
        other = generate_countdown(25, seed=6, **kwargs)
        assert first.to_list() == again.to_list() and first.to_list() != other.to_list()
        assert all(2 <= n <= 9 for nums in first["nums"] for n in nums)
        assert all(20 <= t <= 40 for t in first["target"])
        keys = {(tuple(sorted(nums)), target) for nums, target in zip(first["nums"], first["target"])}
        assert len(keys) == 25

    def test_chat_prompts(self):
        row = generate_countdown(1, seed=0, chat=True)[0]
        assert [message["role"] for message in row["prompt"]] == ["system", "user"]

    @pytest.mark.parametrize(
        "kwargs",
        [{"num_numbers": 1}, {"num_numbers": 7}, {"number_range": (5, 2)}, {"target_range": (10, 1)}],
    )
    def test_invalid_arguments(self, kwargs):
        with pytest.raises(ValueError, match="generate_countdown"):
            generate_countdown(2, **kwargs)

    def test_impossible_request_is_a_clear_error(self):
        with pytest.raises(ValueError, match="distinct solvable"):
            generate_countdown(5, num_numbers=2, number_range=(1, 1), target_range=(1, 2))


# ---------------------------------------------------------------------------------------------------- sudoku
class TestSudokuGenerator:
    def test_all_grids_match_brute_force(self):
        assert sorted(all_solution_grids()) == sorted(brute_force_grids())
        assert len(brute_force_grids()) == 288

    @pytest.mark.parametrize(("split", "num_blanks"), [("train", (4, 12)), ("test", 12), ("test", 6)])
    def test_every_puzzle_has_exactly_one_solution(self, split, num_blanks):
        rows = generate_sudoku(40, split=split, num_blanks=num_blanks, seed=2, chat=False)
        low, high = (num_blanks, num_blanks) if isinstance(num_blanks, int) else num_blanks
        for row in rows:
            puzzle, solution = row["puzzle"], row["solution"]
            assert len(puzzle) == 16 and low <= puzzle.count("0") <= high
            assert brute_force_solutions(puzzle) == [tuple(int(char) for char in solution)]
            assert all(p in ("0", s) for p, s in zip(puzzle, solution))
        assert len(set(rows["puzzle"])) == len(rows)
        assert sudoku_strict_reward(None, [f"<answer>{s}</answer>" for s in rows["solution"]], **rows[:]) == [1.0] * 40

    def test_library_solver_agrees_with_brute_force(self):
        rng = random.Random(1)
        for _ in range(30):
            grid = rng.choice(brute_force_grids())
            puzzle = "".join("0" if rng.random() < 0.7 else str(cell) for cell in grid)
            expected = min(len(brute_force_solutions(puzzle)), 2)
            assert count_solutions(tuple(int(char) for char in puzzle), limit=2) == expected

    def test_train_and_test_never_share_a_solution_grid(self):
        splits = generate_sudoku_splits(300, 100, seed=4, num_blanks=(6, 10), chat=False)
        train_grids, test_grids = set(splits["train"]["solution"]), set(splits["test"]["solution"])
        assert not train_grids & test_grids
        # also across independent calls with other sampling seeds
        other_test = generate_sudoku(100, split="test", seed=99, chat=False)
        assert not train_grids & set(other_test["solution"])

    def test_grid_partition(self):
        train = solution_grids_for_split("train", test_fraction=0.25, split_seed=3)
        test = solution_grids_for_split("test", test_fraction=0.25, split_seed=3)
        assert len(test) == 72 and len(train) == 216
        assert set(train).isdisjoint(test) and set(train) | set(test) == set(brute_force_grids())
        assert solution_grids_for_split("test", test_fraction=0.25, split_seed=4) != test

    def test_determinism(self):
        assert generate_sudoku(10, seed=8, chat=False).to_list() == generate_sudoku(10, seed=8, chat=False).to_list()
        assert generate_sudoku(10, seed=8, chat=False).to_list() != generate_sudoku(10, seed=9, chat=False).to_list()

    def test_make_puzzle_keeps_uniqueness(self):
        rng = random.Random(0)
        grid = brute_force_grids()[17]
        puzzle = make_puzzle(grid, 10, rng)
        assert puzzle is not None and puzzle.count(0) == 10
        assert brute_force_solutions("".join(map(str, puzzle))) == [grid]

    def test_prompt_shows_the_grid(self):
        row = generate_sudoku(1, seed=0, chat=False)[0]
        rows_text = "\n".join(row["puzzle"][i : i + 4] for i in range(0, 16, 4))
        assert rows_text in row["prompt"]

    @pytest.mark.parametrize(
        "kwargs",
        [{"num_blanks": 0}, {"num_blanks": 13}, {"num_blanks": (8, 5)}, {"split": "valid"}, {"test_fraction": 1.0}],
    )
    def test_invalid_arguments(self, kwargs):
        with pytest.raises(ValueError):
            generate_sudoku(2, **kwargs)
