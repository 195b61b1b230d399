"""TRL-ready datasets for the DiFFPO tasks: Hub loaders and offline procedural generators.

Every function returns a :class:`datasets.Dataset` with a ``prompt`` column (a list of chat messages when a
tokenizer with a chat template is given or ``chat=True``, else a string) and the columns the task's rewards read:

=================================  ==========================================  ==================================
function                           columns                                     rewards
=================================  ==========================================  ==================================
:func:`load_gsm8k`                 prompt, question, answer, solution          ``gsm8k_accuracy_reward``
:func:`load_math500`               prompt, problem, solution, answer, ...      ``math_accuracy_reward``
:func:`load_countdown`             prompt, target, nums                        ``countdown_reward``
:func:`generate_countdown`         prompt, target, nums, solution              ``countdown_reward``
:func:`generate_sudoku`            prompt, puzzle, solution                    ``sudoku_reward``, strict variant
:func:`load_sudoku_file`           prompt, puzzle, solution                    ``sudoku_reward``, strict variant
=================================  ==========================================  ==================================
"""

from .countdown_generator import generate_countdown, reachable_values, solve_countdown
from .hub import load_countdown, load_gsm8k, load_math500, load_raw, load_sudoku_file
from .prompts import SYSTEM_PROMPT, build_prompt, use_chat_format
from .sudoku_generator import generate_sudoku, generate_sudoku_splits, make_puzzle, solution_grids_for_split

__all__ = [
    "SYSTEM_PROMPT",
    "build_prompt",
    "generate_countdown",
    "generate_sudoku",
    "generate_sudoku_splits",
    "load_countdown",
    "load_gsm8k",
    "load_math500",
    "load_raw",
    "load_sudoku_file",
    "make_puzzle",
    "reachable_values",
    "solution_grids_for_split",
    "solve_countdown",
    "use_chat_format",
]
