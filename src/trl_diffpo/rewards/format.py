"""Format rewards for the ``<reasoning>...</reasoning><answer>...</answer>`` layout asked by the system prompt.

All three work on multi-line text (the anchors' regexes lacked ``re.DOTALL`` and never matched real output) and run
in linear time.
"""

from __future__ import annotations

import re

from ._base import score_completions

REASONING_OPEN, REASONING_CLOSE = "<reasoning>", "</reasoning>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
FORMAT_TAGS = (REASONING_OPEN, REASONING_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)

# the whole completion is one reasoning block then one answer block; the blocks hold no further tags
_BLOCK_BODY = r"(?:(?!</?reasoning>|</?answer>).)*"
STRICT_FORMAT = re.compile(
    rf"\A\s*<reasoning>{_BLOCK_BODY}</reasoning>\s*<answer>{_BLOCK_BODY}</answer>\s*\Z",
    flags=re.DOTALL,
)
TAG_CREDIT = 0.25  # xml_count_reward: per tag present exactly once
TRAILING_TEXT_PENALTY_PER_CHAR = 0.001  # xml_count_reward: per character after the last </answer>
MAX_TRAILING_TEXT_PENALTY = TAG_CREDIT


def is_strict_format(text: str) -> bool:
    """``<reasoning>…</reasoning>`` then ``<answer>…</answer>``, only whitespace around and between, each tag once."""
    return STRICT_FORMAT.match(text) is not None


def is_soft_format(text: str) -> bool:
    """The four tags appear in the order reasoning-open, reasoning-close, answer-open, answer-close (anything may
    surround them)."""
    position = 0
    for tag in FORMAT_TAGS:
        position = text.find(tag, position)
        if position < 0:
            return False
        position += len(tag)
    return True


def xml_tag_score(text: str) -> float:
    """:data:`TAG_CREDIT` for each of the four tags that occurs exactly once, minus a small penalty per character
    written after the last ``</answer>`` (at most :data:`MAX_TRAILING_TEXT_PENALTY`); never below 0."""
    score = sum(TAG_CREDIT for tag in FORMAT_TAGS if text.count(tag) == 1)
    last_close = text.rfind(ANSWER_CLOSE)
    if last_close >= 0:
        trailing = len(text) - last_close - len(ANSWER_CLOSE)
        score -= min(MAX_TRAILING_TEXT_PENALTY, TRAILING_TEXT_PENALTY_PER_CHAR * trailing)
    return max(0.0, score)


def strict_format_reward(prompts=None, completions=(), completion_ids=None, **kwargs) -> list[float | None]:
    """1.0 when the completion is exactly ``<reasoning>…</reasoning> <answer>…</answer>`` (see :func:`is_strict_format`)."""
    return score_completions("strict_format_reward", completions, lambda text: float(is_strict_format(text)), {})


def soft_format_reward(prompts=None, completions=(), completion_ids=None, **kwargs) -> list[float | None]:
    """1.0 when the four tags appear in order anywhere in the completion (see :func:`is_soft_format`)."""
    return score_completions("soft_format_reward", completions, lambda text: float(is_soft_format(text)), {})


def xml_count_reward(prompts=None, completions=(), completion_ids=None, **kwargs) -> list[float | None]:
    """Partial format credit, 0.25 per tag used exactly once, minus a trailing-text penalty (:func:`xml_tag_score`)."""
    return score_completions("xml_count_reward", completions, xml_tag_score, {})
