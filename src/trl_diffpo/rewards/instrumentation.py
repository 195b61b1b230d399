"""Reward functions as the trainer calls them: the math verifier's limits from the config, and per-function metrics.

:func:`prepare_reward_funcs` is what ``trl-diffpo train`` (and ``DiffpoTrainer``) apply to the reward functions:

- the process-wide :class:`~trl_diffpo.rewards.MathVerifier` takes ``reward_timeout_s`` (per answer),
  ``reward_batch_budget_s`` (per reward call) and ``reward_num_workers`` (parallel worker processes) from the config;
- every plain callable is wrapped so that each call logs, through TRL's ``log_metric``,
  ``rewards/<name>/time_s`` (wall time of the call) and ``rewards/<name>/fallbacks`` (answers that raised inside the
  reward and were scored 0.0, i.e. new :data:`~trl_diffpo.rewards.REWARD_FALLBACKS` entries). TRL averages them over
  each logging step, next to its own ``rewards/<name>/mean``.

Reward models (a model id or ``nn.Module``) and async functions are left as they are. Wrapping twice is a no-op.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from typing import Any

from ._base import REWARD_FALLBACKS
from .math_verifier import configure_default_verifier

_INSTRUMENTED = "__trl_diffpo_instrumented__"


def prepare_reward_funcs(reward_funcs: Any, args: Any = None) -> list:
    """Configure the default math verifier from ``args`` (a ``DiffpoConfig``; None keeps its limits) and return
    ``reward_funcs`` (one or a list) as a list with every plain callable wrapped by :func:`timed_reward`."""
    if args is not None:
        configure_default_verifier(
            timeout_s=getattr(args, "reward_timeout_s", None),
            num_workers=getattr(args, "reward_num_workers", None),
            batch_budget_s=getattr(args, "reward_batch_budget_s", math.nan),  # NaN keeps it; None means no limit
        )
    funcs = reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    return [timed_reward(func) for func in funcs]


def timed_reward(func: Any) -> Any:
    """``func`` wrapped to log ``rewards/<name>/time_s`` and ``rewards/<name>/fallbacks`` through the ``log_metric``
    keyword TRL passes (nothing is logged without it); anything but a plain sync callable is returned as is."""
    from trl.trainer.utils import is_async_callable

    if (
        not callable(func)
        or isinstance(func, (str, type))
        or getattr(func, _INSTRUMENTED, False)
        or is_async_callable(func)
        or _is_module(func)
    ):
        return func
    name = _callable_name(func)

    @functools.wraps(func)
    def timed(*args, **kwargs):
        fallbacks_before = sum(REWARD_FALLBACKS.values())
        started = time.perf_counter()
        try:
            return func(*args, **kwargs)
        finally:
            log_metric = kwargs.get("log_metric")
            if callable(log_metric):
                log_metric(f"rewards/{name}/time_s", time.perf_counter() - started)
                log_metric(f"rewards/{name}/fallbacks", float(sum(REWARD_FALLBACKS.values()) - fallbacks_before))

    timed.__name__ = timed.__qualname__ = name
    setattr(timed, _INSTRUMENTED, True)
    return timed


def _callable_name(func: Callable) -> str:
    """The name TRL gives a reward function, so that our metrics sit next to its ``rewards/<name>/mean``."""
    from trl.trainer.utils import get_callable_name

    return get_callable_name(func)


def _is_module(func: Any) -> bool:
    try:
        from torch import nn
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return isinstance(func, nn.Module)
