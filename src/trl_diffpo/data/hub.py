"""Loaders for the Hub datasets (GSM8K, MATH-500, Countdown-Tasks-3to4) and for local Sudoku files.

Every loader returns a :class:`datasets.Dataset` with a ``prompt`` column (conversational when the tokenizer has a
chat template or ``chat=True``, a string otherwise) and the answer columns its rewards read. ``data_files`` loads
local JSON/JSONL/CSV/Parquet files with the Hub schema instead of the Hub (tests, offline machines).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset, Value, load_dataset

from ..rewards.extraction import normalize_gold_answer
from ..rewards.sudoku import CELLS, Grid, grid_to_string, parse_grid
from .prompts import SYSTEM_PROMPT, build_prompt, countdown_question, math_question, sudoku_question

GSM8K_PATH, GSM8K_CONFIG = "openai/gsm8k", "main"
MATH500_PATH = "HuggingFaceH4/MATH-500"
COUNTDOWN_PATH = "Jiayi-Pan/Countdown-Tasks-3to4"
# the Countdown Hub dataset has only a "train" split: a fixed, seeded slice of it is held out as "test"
COUNTDOWN_TEST_SIZE = 512
COUNTDOWN_SPLIT_SEED = 0
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def _builder_for(data_files: str | Sequence[str]) -> str:
    first = data_files if isinstance(data_files, (str, Path)) else next(iter(data_files))
    suffix = Path(str(first)).suffix.lower()
    if suffix not in _FILE_BUILDERS:
        raise ValueError(
            f"Cannot load {first!r}: unsupported file type {suffix!r}. Use one of {sorted(_FILE_BUILDERS)}."
        )
    return _FILE_BUILDERS[suffix]


def load_raw(
    path: str, split: str, *, name: str | None = None, data_files: str | Sequence[str] | None = None
) -> Dataset:
    """One split of a Hub dataset, or of local files when ``data_files`` is given (``path`` is then ignored)."""
    if data_files is not None:
        files = str(data_files) if isinstance(data_files, Path) else data_files
        return load_dataset(_builder_for(files), data_files={split: files}, split=split)
    return load_dataset(path, name, split=split)


def _require_columns(dataset: Dataset, columns: Sequence[str], source: str) -> None:
    missing = [column for column in columns if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"{source} lacks the column(s) {missing}; found {dataset.column_names}. Pass files with the Hub schema."
        )


def _limit(dataset: Dataset, num_examples: int | None) -> Dataset:
    return dataset if num_examples is None else dataset.select(range(min(num_examples, len(dataset))))


def load_gsm8k(
    split: str = "train",
    *,
    path: str = GSM8K_PATH,
    name: str = GSM8K_CONFIG,
    data_files: str | Sequence[str] | None = None,
    tokenizer: Any = None,
    chat: bool | None = None,
    system_prompt: str | None = SYSTEM_PROMPT,
    num_examples: int | None = None,
) -> Dataset:
    """GSM8K (``openai/gsm8k``, config ``main``): columns ``prompt``, ``question``, ``answer`` (the final number,
    e.g. ``"72"``) and ``solution`` (the original worked answer ending in ``#### 72``).

    Example:
        >>> train = load_gsm8k("train", tokenizer=tokenizer)  # doctest: +SKIP
    """
    raw = _limit(load_raw(path, split, name=name, data_files=data_files), num_examples)
    _require_columns(raw, ("question", "answer"), f"GSM8K ({data_files or path})")

    def convert(row: dict) -> dict:
        return {
            "prompt": build_prompt(row["question"], tokenizer=tokenizer, chat=chat, system_prompt=system_prompt),
            "question": row["question"],
            "answer": normalize_gold_answer(row["answer"]) or "",
            "solution": row["answer"],
        }

    return raw.map(convert, remove_columns=raw.column_names).select_columns(
        ["prompt", "question", "answer", "solution"]
    )


def load_math500(
    split: str = "test",
    *,
    path: str = MATH500_PATH,
    data_files: str | Sequence[str] | None = None,
    tokenizer: Any = None,
    chat: bool | None = None,
    system_prompt: str | None = SYSTEM_PROMPT,
    num_examples: int | None = None,
) -> Dataset:
    """MATH-500 (``HuggingFaceH4/MATH-500``, only a ``test`` split): columns ``prompt``, ``problem``, ``solution``,
    ``answer`` (LaTeX, judged by math_verify), ``subject``, ``level``, ``unique_id``."""
    raw = _limit(load_raw(path, split, data_files=data_files), num_examples)
    _require_columns(raw, ("problem", "answer"), f"MATH-500 ({data_files or path})")
    return raw.map(
        lambda row: {
            "prompt": build_prompt(
                math_question(row["problem"]), tokenizer=tokenizer, chat=chat, system_prompt=system_prompt
            )
        }
    ).select_columns(
        ["prompt"]
        + [c for c in ("problem", "solution", "answer", "subject", "level", "unique_id") if c in raw.column_names]
    )


def load_countdown(
    split: str = "train",
    *,
    path: str = COUNTDOWN_PATH,
    data_files: str | Sequence[str] | None = None,
    num_numbers: int | None = None,
    test_size: int | None = None,
    split_seed: int = COUNTDOWN_SPLIT_SEED,
    tokenizer: Any = None,
    chat: bool | None = None,
    system_prompt: str | None = SYSTEM_PROMPT,
    num_examples: int | None = None,
) -> Dataset:
    """Countdown (``Jiayi-Pan/Countdown-Tasks-3to4``): columns ``prompt``, ``target`` (int), ``nums`` (list of int).

    Args:
        split: ``"train"`` or ``"test"``. The Hub dataset has one split, so by default a seeded slice of
            :data:`COUNTDOWN_TEST_SIZE` rows (after the ``num_numbers`` filter) is ``"test"`` and the rest ``"train"``.
        num_numbers: keep only instances with this many numbers (d1 uses 3); None keeps all.
        test_size: rows of the held-out ``"test"`` slice. None (default): :data:`COUNTDOWN_TEST_SIZE` for the Hub,
            no slicing for ``data_files`` (the files *are* the requested split). 0: no slicing, ``split`` is passed
            to the dataset as is.
        split_seed: seed of the held-out slice.
    """
    source = f"Countdown ({data_files or path})"
    if test_size is None:
        test_size = 0 if data_files is not None else COUNTDOWN_TEST_SIZE
    if not test_size:
        raw = load_raw(path, split, data_files=data_files)
    else:
        if split not in ("train", "test"):
            raise ValueError(f"load_countdown: split must be 'train' or 'test' when test_size is set, got {split!r}.")
        raw = load_raw(path, "train", data_files=data_files)
    _require_columns(raw, ("target", "nums"), source)
    if num_numbers is not None:
        raw = raw.filter(lambda row: len(row["nums"]) == num_numbers)
    if test_size:
        if not 0 < test_size < len(raw):
            raise ValueError(
                f"load_countdown: test_size={test_size} must be between 1 and {len(raw) - 1} (the {source} rows "
                "left after filtering); lower it or pass test_size=0."
            )
        raw = raw.train_test_split(test_size=test_size, seed=split_seed)[split]
    raw = _limit(raw, num_examples)

    def convert(row: dict) -> dict:
        nums, target = [int(number) for number in row["nums"]], int(row["target"])
        question = countdown_question(nums, target)
        return {
            "prompt": build_prompt(question, tokenizer=tokenizer, chat=chat, system_prompt=system_prompt),
            "target": target,
            "nums": nums,
        }

    return raw.map(convert, remove_columns=raw.column_names).select_columns(["prompt", "target", "nums"])


def load_sudoku_file(
    data_files: str | Sequence[str],
    *,
    split: str = "train",
    tokenizer: Any = None,
    chat: bool | None = None,
    system_prompt: str | None = SYSTEM_PROMPT,
    num_examples: int | None = None,
) -> Dataset:
    """4x4 Sudoku puzzles from local files with ``puzzle`` and ``solution`` columns (any capitalisation; grids as
    16 digits with 0 or ``.`` for blanks, or nested lists): columns ``prompt``, ``puzzle``, ``solution`` (16-char)."""
    raw = _limit(load_raw("", split, data_files=data_files), num_examples)
    renames = {column: column.lower() for column in raw.column_names if column.lower() in ("puzzle", "solution")}
    raw = raw.rename_columns({old: new for old, new in renames.items() if old != new})
    _require_columns(raw, ("puzzle", "solution"), f"Sudoku ({data_files})")
    # a CSV reader turns "0000403030000200" into the integer 403030000200: read such columns back with their zeros
    integer_columns = {
        column
        for column in ("puzzle", "solution")
        if str(getattr(raw.features[column], "dtype", "")).startswith("int")
    }
    for column in integer_columns:
        raw = raw.cast_column(column, Value("string"))
    # new names for the outputs, so that datasets does not cast them back to the input columns' types
    raw = raw.rename_columns({"puzzle": "raw_puzzle", "solution": "raw_solution"})

    def cells(row: dict, column: str) -> Grid | None:
        value = row[f"raw_{column}"]
        return parse_grid(value.zfill(CELLS) if column in integer_columns else value)

    def convert(row: dict) -> dict:
        puzzle, solution = cells(row, "puzzle"), cells(row, "solution")
        if puzzle is None or solution is None:
            raise ValueError(f"Unreadable 4x4 sudoku row {row!r}: expected 16 cells with 0 for blanks.")
        question = sudoku_question(grid_to_string(puzzle))
        return {
            "prompt": build_prompt(question, tokenizer=tokenizer, chat=chat, system_prompt=system_prompt),
            "puzzle": grid_to_string(puzzle),
            "solution": grid_to_string(solution),
        }

    return raw.map(convert, remove_columns=raw.column_names).select_columns(["prompt", "puzzle", "solution"])
