"""The per-item loop shared by every reward: TRL signature in, one float (or None) per completion out."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from .extraction import completion_to_text

logger = logging.getLogger("trl_diffpo.rewards")

# how often a reward hit an unexpected exception and fell back to 0.0, per reward name (should stay empty)
REWARD_FALLBACKS: Counter[str] = Counter()


def score_completions(
    reward_name: str,
    completions: Sequence[Any],
    score_text: Callable[..., float],
    columns: dict[str, Sequence[Any] | None],
    optional_columns: dict[str, Sequence[Any] | None] | None = None,
) -> list[float | None]:
    """Apply ``score_text(text, **row)`` to every completion.

    ``columns`` maps the answer-column names the reward needs to the batch columns TRL passed. A row where one of
    them is missing (column absent, or the value None, as for rows of another task in a mixed dataset) gets
    ``None``, TRL's "this reward does not apply here". ``optional_columns`` are passed through (None when missing).
    Any exception in ``score_text`` is logged, counted in
    :data:`REWARD_FALLBACKS` and scored 0.0, so a reward never raises on model output.
    """

    def score(text: str, **row) -> float:
        return float(score_text(text, **row))

    return map_completions(reward_name, completions, score, columns, optional_columns, fallback=0.0)


def map_completions(
    reward_name: str,
    completions: Sequence[Any],
    function: Callable[..., Any],
    columns: dict[str, Sequence[Any] | None],
    optional_columns: dict[str, Sequence[Any] | None] | None = None,
    fallback: Any = 0.0,
) -> list[Any]:
    """:func:`score_completions` for any per-row value: ``function(text, **row)``, ``None`` for rows missing a
    column, ``fallback`` (logged, counted in :data:`REWARD_FALLBACKS`) where ``function`` raises."""
    values: list[Any] = []
    for index, completion in enumerate(completions):
        row = {name: _value_at(column, index) for name, column in columns.items()}
        if any(value is None for value in row.values()):
            values.append(None)
            continue
        row.update({name: _value_at(column, index) for name, column in (optional_columns or {}).items()})
        try:
            values.append(function(completion_to_text(completion), **row))
        except Exception:  # a bug or a hostile input must not stop training: log it, count it, use the fallback
            REWARD_FALLBACKS[reward_name] += 1
            logger.warning("%s failed on completion %d; scored %r.", reward_name, index, fallback, exc_info=True)
            values.append(fallback)
    return values


def _value_at(column: Sequence[Any] | None, index: int) -> Any:
    if column is None or isinstance(column, (str, bytes)):
        return None
    try:
        return column[index]
    except (IndexError, KeyError, TypeError):
        return None
