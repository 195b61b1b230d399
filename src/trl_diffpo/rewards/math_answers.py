"""GSM8K and MATH correctness rewards, judged by ``math_verify`` in time-bounded parallel workers."""

from __future__ import annotations

from collections.abc import Callable

from ._base import REWARD_FALLBACKS, logger, map_completions
from .extraction import answer_expression_forms, extract_math_answer, normalize_gold_answer
from .math_verifier import MathVerifier, get_default_verifier

# MathVerifier.stats counters reported per reward call through TRL's `log_metric`
LOGGED_VERIFIER_STATS = ("timeouts", "over_budget")


def make_math_accuracy_reward(
    verifier: MathVerifier | None = None, name: str = "math_accuracy_reward"
) -> Callable[..., list[float | None]]:
    """Build a TRL reward: 1.0 when the completion's final answer equals the ``answer`` column, else 0.0.

    The prediction is the last box inside the last non-empty ``<answer>`` block, else that block's text, else the
    last box anywhere (see :func:`~trl_diffpo.rewards.extraction.extract_math_answer`); it is judged as one
    expression, as written or without its decorations (``\\text{}``, units, "The answer is"; see
    :func:`~trl_diffpo.rewards.extraction.answer_expression_forms`), never by a number picked out of it. No answer
    scores 0.0. The gold answer may be GSM8K's raw ``"...#### 42"``. Rows without an ``answer`` get None. The batch is
    judged in parallel workers within the verifier's ``batch_budget_s``. When TRL passes ``log_metric``, the batch's
    verifier timeouts and over-budget items are logged as ``rewards/<name>/verifier_timeouts`` and
    ``rewards/<name>/verifier_over_budget``.

    Args:
        verifier: the :class:`MathVerifier` to use; default: the process-wide one (5 s per item, 30 s per batch;
            :func:`~trl_diffpo.rewards.math_verifier.configure_default_verifier` changes it).
        name: the function's ``__name__``, which TRL uses as the logged metric name.
    """

    def reward(prompts=None, completions=(), completion_ids=None, answer=None, **kwargs) -> list[float | None]:
        judge = verifier or get_default_verifier()
        stats_before = {key: judge.stats[key] for key in LOGGED_VERIFIER_STATS}

        def gold_and_forms(text: str, answer) -> tuple[str, list[str]] | bool:
            gold, pred = normalize_gold_answer(answer), extract_math_answer(text)
            if gold is None or pred is None:
                return False
            return gold, answer_expression_forms(pred)

        items = map_completions(name, completions, gold_and_forms, {"answer": answer}, fallback=False)
        to_judge = [index for index, item in enumerate(items) if isinstance(item, tuple)]
        try:
            verdicts = judge.judge_many([items[index] for index in to_judge])
        except Exception:  # the verifier itself failed (e.g. cannot start a worker): score 0, never raise
            REWARD_FALLBACKS[name] += len(to_judge)
            logger.warning("%s: the math verifier failed; %d answers scored 0.0.", name, len(to_judge), exc_info=True)
            verdicts = [False] * len(to_judge)
        rewards = [None if item is None else 0.0 for item in items]
        for index, verdict in zip(to_judge, verdicts):
            rewards[index] = 1.0 if verdict else 0.0
        log_metric = kwargs.get("log_metric")  # TRL >= 1.16 passes a scalar logger to reward functions
        if callable(log_metric):
            for key in LOGGED_VERIFIER_STATS:
                log_metric(f"rewards/{name}/verifier_{key}", float(judge.stats[key] - stats_before[key]))
        return rewards

    reward.__name__ = reward.__qualname__ = name
    reward.__doc__ = make_math_accuracy_reward.__doc__.split("\n\n")[0].replace("Build a TRL reward: ", "")
    return reward


math_accuracy_reward = make_math_accuracy_reward(name="math_accuracy_reward")
gsm8k_accuracy_reward = make_math_accuracy_reward(name="gsm8k_accuracy_reward")
