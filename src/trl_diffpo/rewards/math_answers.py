"""GSM8K and MATH correctness rewards, judged by ``math_verify`` in a time-bounded worker."""

from __future__ import annotations

from collections.abc import Callable

from ._base import score_completions
from .extraction import extract_math_answer, normalize_gold_answer
from .math_verifier import MathVerifier, get_default_verifier


def make_math_accuracy_reward(
    verifier: MathVerifier | None = None, name: str = "math_accuracy_reward"
) -> Callable[..., list[float | None]]:
    """Build a TRL reward: 1.0 when the completion's final answer equals the ``answer`` column, else 0.0.

    The prediction is the ``\\boxed{}`` inside the last ``<answer>`` block, else that block's text, else the last
    ``\\boxed{}`` (see :func:`~trl_diffpo.rewards.extraction.extract_math_answer`); no answer scores 0.0. The gold
    answer may be GSM8K's raw ``"...#### 42"``. Rows without an ``answer`` get None. When TRL passes ``log_metric``,
    the number of verifier timeouts in the batch is logged as ``rewards/<name>/verifier_timeouts``.

    Args:
        verifier: the :class:`MathVerifier` to use; default: the process-wide one (5 s per item).
        name: the function's ``__name__``, which TRL uses as the logged metric name.
    """

    def reward(prompts=None, completions=(), completion_ids=None, answer=None, **kwargs) -> list[float | None]:
        judge = verifier or get_default_verifier()
        timeouts_before = judge.stats["timeouts"]

        def score(text: str, answer) -> float:
            gold = normalize_gold_answer(answer)
            pred = extract_math_answer(text)
            if gold is None or pred is None:
                return 0.0
            return 1.0 if judge.is_equivalent(gold, pred) else 0.0

        rewards = score_completions(name, completions, score, {"answer": answer})
        log_metric = kwargs.get("log_metric")  # TRL >= 1.16 passes a scalar logger to reward functions
        if callable(log_metric):
            log_metric(f"rewards/{name}/verifier_timeouts", float(judge.stats["timeouts"] - timeouts_before))
        return rewards

    reward.__name__ = reward.__qualname__ = name
    reward.__doc__ = make_math_accuracy_reward.__doc__.split("\n\n")[0].replace("Build a TRL reward: ", "")
    return reward


math_accuracy_reward = make_math_accuracy_reward(name="math_accuracy_reward")
gsm8k_accuracy_reward = make_math_accuracy_reward(name="gsm8k_accuracy_reward")
