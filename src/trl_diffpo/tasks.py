"""The task registry: for each task name, how to load it, which rewards train it and how accuracy is judged.

A trainer script takes ``task.reward_funcs`` (and ``task.reward_weights`` for ``GRPOConfig.reward_weights``); an
evaluator loads ``task.load(task.eval_split)`` and scores generated completions with :meth:`Task.is_correct`, which
takes the completions and the batch's dataset columns exactly as a TRL reward does::

    task = get_task("countdown")
    rows = task.load("test", tokenizer=tokenizer)
    batch = rows[:8]                               # dict of columns
    correct = task.is_correct(completions, **batch)  # list[bool], one per completion

Users add their own tasks with :func:`register_task`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .rewards import (
    countdown_accuracy_reward,
    countdown_reward,
    gsm8k_accuracy_reward,
    math_accuracy_reward,
    soft_format_reward,
    strict_format_reward,
    sudoku_reward,
    sudoku_strict_reward,
    xml_count_reward,
)

logger = logging.getLogger(__name__)

RewardFunc = Callable[..., list]
CORRECT = 1.0  # a correctness function returns 1.0 for a correct completion

# d1-style weights: correctness dominates, each format reward adds at most half a point
ACCURACY_WEIGHT = 2.0
FORMAT_WEIGHT = 0.5
SUDOKU_TRAIN_SIZE, SUDOKU_TEST_SIZE = 2048, 256
COUNTDOWN_NUM_NUMBERS = 3  # d1 trains and evaluates Countdown with 3 numbers


@dataclass(frozen=True)
class Task:
    """One task of the registry.

    Attributes:
        name: registry key.
        description: one line for help texts.
        loader: ``loader(split, **kwargs) -> datasets.Dataset`` with a ``prompt`` column and the answer columns.
        reward_funcs: TRL reward functions for training.
        reward_weights: suggested ``GRPOConfig.reward_weights``, one per reward function.
        correctness_func: TRL-signature function returning 1.0 for a correct completion (used for accuracy).
        answer_columns: dataset columns the rewards read.
        train_split / eval_split: split names for training and evaluation (``train_split`` None: eval-only task).
    """

    name: str
    description: str
    loader: Callable[..., Any]
    reward_funcs: tuple[RewardFunc, ...]
    reward_weights: tuple[float, ...]
    correctness_func: RewardFunc
    answer_columns: tuple[str, ...]
    train_split: str | None = "train"
    eval_split: str = "test"
    notes: str = field(default="", compare=False)

    def __post_init__(self):
        if len(self.reward_funcs) != len(self.reward_weights):
            raise ValueError(
                f"Task {self.name!r}: {len(self.reward_funcs)} reward functions but {len(self.reward_weights)} weights."
            )

    def load(self, split: str | None = None, **kwargs: Any):
        """The dataset for ``split`` (default: the training split); ``kwargs`` go to the loader (tokenizer, chat,
        data_files, num_examples, ...)."""
        split = split or self.train_split
        if split is None:
            raise ValueError(f"Task {self.name!r} is evaluation-only. {self.notes}".strip())
        return self.loader(split, **kwargs)

    def is_correct(self, completions: Sequence[Any], **columns: Any) -> list[bool]:
        """One bool per completion: whether ``correctness_func`` scores it 1.0 given the dataset ``columns``.

        A row the function cannot judge (an answer column missing) counts as not correct, with a warning.
        """
        scores = self.correctness_func(columns.pop("prompts", None), completions, **columns)
        missing = sum(score is None for score in scores)
        if missing:
            logger.warning(
                "Task %r: %d of %d rows lack the answer columns %s; counted as not correct.",
                self.name,
                missing,
                len(scores),
                list(self.answer_columns),
            )
        return [score is not None and score >= CORRECT for score in scores]


def _load_gsm8k(split: str, **kwargs: Any):
    from .data import load_gsm8k

    return load_gsm8k(split, **kwargs)


def _load_math500(split: str, **kwargs: Any):
    from .data import load_math500

    return load_math500(split, **kwargs)


def _load_countdown(split: str, *, generated: bool = False, num_examples: int | None = None, **kwargs: Any):
    """Hub Countdown (3 numbers, seeded held-out test slice) or, with ``generated=True``, the procedural generator
    (``num_examples`` rows; seed 0 for train and 1 for test unless ``seed`` is given)."""
    from .data import generate_countdown, load_countdown

    kwargs.setdefault("num_numbers", COUNTDOWN_NUM_NUMBERS)
    if generated:
        if kwargs.pop("data_files", None) is not None:
            raise ValueError("countdown: give either generated=True or data_files (local files), not both.")
        if num_examples is None:
            raise ValueError("countdown with generated=True needs num_examples (how many instances to generate).")
        kwargs.setdefault("seed", 0 if split == "train" else 1)
        return generate_countdown(num_examples, **kwargs)
    return load_countdown(split, num_examples=num_examples, **kwargs)


def _load_sudoku(split: str, *, data_files: Any = None, num_examples: int | None = None, **kwargs: Any):
    """Generated puzzles split by solution grid (default sizes 2048 train / 256 test), or a local file."""
    from .data import generate_sudoku, load_sudoku_file

    if data_files is not None:
        return load_sudoku_file(data_files, split=split, num_examples=num_examples, **kwargs)
    if num_examples is None:
        num_examples = SUDOKU_TRAIN_SIZE if split == "train" else SUDOKU_TEST_SIZE
    kwargs.setdefault("seed", 0 if split == "train" else 1)
    return generate_sudoku(num_examples, split=split, **kwargs)


_FORMAT_REWARDS = (xml_count_reward, soft_format_reward, strict_format_reward)

TASKS: dict[str, Task] = {}


def register_task(task: Task, overwrite: bool = False) -> Task:
    """Add ``task`` to the registry (``overwrite=True`` to replace an existing name)."""
    if task.name in TASKS and not overwrite:
        raise ValueError(f"A task named {task.name!r} is already registered; pass overwrite=True to replace it.")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The registered task ``name`` (``gsm8k``, ``math500``, ``countdown``, ``sudoku`` or one you registered)."""
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"Unknown task {name!r}. Registered tasks: {', '.join(sorted(TASKS))}.") from None


def list_tasks() -> list[str]:
    """Names of the registered tasks."""
    return sorted(TASKS)


register_task(
    Task(
        name="gsm8k",
        description="Grade-school math word problems (openai/gsm8k), numeric answers judged by math_verify.",
        loader=_load_gsm8k,
        reward_funcs=(gsm8k_accuracy_reward, *_FORMAT_REWARDS),
        reward_weights=(ACCURACY_WEIGHT, FORMAT_WEIGHT, FORMAT_WEIGHT, FORMAT_WEIGHT),
        correctness_func=gsm8k_accuracy_reward,
        answer_columns=("answer",),
    )
)
register_task(
    Task(
        name="math500",
        description="Competition math (HuggingFaceH4/MATH-500), LaTeX answers judged by math_verify.",
        loader=_load_math500,
        reward_funcs=(math_accuracy_reward, *_FORMAT_REWARDS),
        reward_weights=(ACCURACY_WEIGHT, FORMAT_WEIGHT, FORMAT_WEIGHT, FORMAT_WEIGHT),
        correctness_func=math_accuracy_reward,
        answer_columns=("answer",),
        train_split=None,
        notes="To train on MATH, load a dataset with problem/answer columns: load_math500('train', path=...).",
    )
)
register_task(
    Task(
        name="countdown",
        description="Reach a target with +,-,*,/ using each given number once (Jiayi-Pan/Countdown-Tasks-3to4).",
        loader=_load_countdown,
        reward_funcs=(countdown_reward,),
        reward_weights=(1.0,),
        correctness_func=countdown_accuracy_reward,
        answer_columns=("target", "nums"),
    )
)
register_task(
    Task(
        name="sudoku",
        description="4x4 Sudoku with a unique solution, generated offline, train/test split by solution grid.",
        loader=_load_sudoku,
        reward_funcs=(sudoku_reward,),
        reward_weights=(1.0,),
        correctness_func=sudoku_strict_reward,
        answer_columns=("puzzle",),
    )
)
