"""Reward functions with TRL's signature ``f(prompts, completions, completion_ids=None, **columns)``.

Each returns one float per completion (None where its answer columns are missing, i.e. the reward does not apply to
that row), accepts plain-text or conversational completions, ignores extra keyword arguments (``nfe``,
``threshold``, ``trainer_state``, other columns), never raises on model output, never hangs and never ``eval``s.

- ``gsm8k_accuracy_reward`` / ``math_accuracy_reward`` (column ``answer``): 1.0 if the final answer equals the gold
  answer according to math_verify (run in a time-bounded worker process, see :class:`MathVerifier`);
- ``countdown_reward`` (``target``, ``nums``): 1.0 correct, 0.1 well formed but wrong, 0.0 otherwise;
  ``countdown_accuracy_reward``: 1.0 correct, else 0.0;
- ``sudoku_reward`` (``puzzle``, optional ``solution``): fraction of blanks filled correctly;
  ``sudoku_strict_reward`` (``puzzle``): 1.0 for a complete valid grid keeping the givens;
- ``strict_format_reward``: 1.0 for exactly ``<reasoning>...</reasoning><answer>...</answer>``;
  ``soft_format_reward``: 1.0 if the four tags appear in order; ``xml_count_reward``: 0.25 per tag used once, minus a
  trailing-text penalty.

The extraction rules are in :mod:`trl_diffpo.rewards.extraction` and docs/tasks.md. :func:`prepare_reward_funcs` applies
``DiffpoConfig``'s ``reward_*`` limits and adds per-function time and fallback metrics (see
:mod:`trl_diffpo.rewards.instrumentation`).
"""

from ._base import REWARD_FALLBACKS
from .countdown import (
    countdown_accuracy_reward,
    countdown_reward,
    extract_countdown_expression,
    judge_countdown,
    make_countdown_reward,
    parse_arithmetic,
)
from .extraction import (
    answer_expression_forms,
    answer_region,
    completion_to_text,
    extract_boxed,
    extract_math_answer,
    extract_xml_answer,
    normalize_gold_answer,
)
from .format import is_soft_format, is_strict_format, soft_format_reward, strict_format_reward, xml_count_reward
from .instrumentation import prepare_reward_funcs, timed_reward
from .math_answers import gsm8k_accuracy_reward, make_math_accuracy_reward, math_accuracy_reward
from .math_verifier import MathVerifier, configure_default_verifier, get_default_verifier
from .sudoku import (
    extract_sudoku_grid,
    judge_sudoku_cells,
    judge_sudoku_strict,
    parse_grid,
    sudoku_reward,
    sudoku_strict_reward,
)

__all__ = [
    "REWARD_FALLBACKS",
    "MathVerifier",
    "answer_expression_forms",
    "answer_region",
    "completion_to_text",
    "configure_default_verifier",
    "countdown_accuracy_reward",
    "countdown_reward",
    "extract_boxed",
    "extract_countdown_expression",
    "extract_math_answer",
    "extract_sudoku_grid",
    "extract_xml_answer",
    "get_default_verifier",
    "gsm8k_accuracy_reward",
    "is_soft_format",
    "is_strict_format",
    "judge_countdown",
    "judge_sudoku_cells",
    "judge_sudoku_strict",
    "make_countdown_reward",
    "make_math_accuracy_reward",
    "math_accuracy_reward",
    "normalize_gold_answer",
    "parse_arithmetic",
    "parse_grid",
    "prepare_reward_funcs",
    "soft_format_reward",
    "strict_format_reward",
    "sudoku_reward",
    "sudoku_strict_reward",
    "timed_reward",
    "xml_count_reward",
]
