"""Math-equivalence judging with ``math_verify``, run inside a dedicated worker process.

This file is deliberately standalone (standard library + ``math_verify`` only, no ``trl_diffpo`` imports) so that the
worker starts as ``python _math_worker.py`` in a fresh interpreter: it never imports the user's training script,
torch or CUDA, and can be killed at any moment without harming the parent. :func:`judge` is also imported in-process
by :class:`trl_diffpo.rewards.math_verifier.MathVerifier` when ``use_subprocess=False``.

Usage: ``python _math_worker.py [MAX_MEMORY_MB]``. Protocol (one JSON object per line): the worker first writes ``{"ready": true}`` (or ``{"error": "..."}`` and exits),
then answers every request ``{"id": n, "gold": str, "pred": str | list[str]}`` with ``{"id": n, "correct": bool}``.
"""

from __future__ import annotations

import json
import logging
import os
import sys

# parsed gold answers are reused across the G completions of one prompt; bound the cache so it cannot grow forever
GOLD_CACHE_SIZE = 4096
_gold_cache: dict[str, list] = {}


def _parse(text: str) -> list:
    from math_verify import parse

    # signal-based timeouts are disabled: the caller bounds run time by running this in a killable process
    return parse(text, parsing_timeout=None)


def _parse_gold(gold: str) -> list:
    parsed = _gold_cache.get(gold)
    if parsed is None:
        parsed = _parse(gold if "\\boxed" in gold else f"\\boxed{{{gold}}}")
        if len(_gold_cache) >= GOLD_CACHE_SIZE:
            _gold_cache.clear()
        _gold_cache[gold] = parsed
    return parsed


def judge(gold: str, pred: str | list[str]) -> bool:
    """Whether ``pred`` is mathematically equivalent to ``gold`` (both LaTeX or plain text) according to math_verify.

    ``pred`` is one final answer, or a list of forms of it (the caller's normalisations, see
    ``trl_diffpo.rewards.extraction.answer_expression_forms``); each form is parsed as **one** expression, wrapped
    in ``\\boxed{}``, and any form equal to ``gold`` counts. The raw text is never handed to math_verify unboxed:
    its free-text mode takes the last number of a longer answer (``13 or 14`` would equal 14). Never raises.
    """
    from math_verify import verify

    forms = [pred] if isinstance(pred, str) else list(pred)
    try:
        gold_parsed = _parse_gold(gold)
        if not gold_parsed:
            return False
        for form in forms:
            pred_parsed = _parse(form if "\\boxed" in form else f"\\boxed{{{form}}}")
            if pred_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=None):
                return True
    except Exception:  # math_verify/sympy can raise almost anything on odd input: "not equivalent"
        return False
    return False


def _limit_self(max_memory_mb: int) -> None:
    """Best-effort guards: die with the parent (Linux) and cap the address space, so that a runaway sympy
    computation can neither outlive the trainer nor eat the node's memory (it then fails with MemoryError)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            import signal

            pr_set_pdeathsig = 1
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
        except Exception:
            pass
    if max_memory_mb > 0:
        try:
            import resource

            _, hard = resource.getrlimit(resource.RLIMIT_AS)
            limit = max_memory_mb * 2**20
            resource.setrlimit(
                resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard)
            )
        except Exception:
            pass


def _serve(max_memory_mb: int = 0) -> int:
    _limit_self(max_memory_mb)
    logging.disable(logging.CRITICAL)  # math_verify warns that its timeouts are off: expected here
    protocol_out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr  # anything a library prints must not corrupt the protocol stream
    try:
        import math_verify  # noqa: F401
    except Exception as err:  # pragma: no cover - depends on the environment
        protocol_out.write(json.dumps({"error": f"cannot import math_verify: {err!r}"}) + "\n")
        return 1
    protocol_out.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        try:
            request = json.loads(line)
            pred = request["pred"]
            correct = judge(
                str(request["gold"]), [str(form) for form in pred] if isinstance(pred, list) else str(pred)
            )
            reply = {"id": request["id"], "correct": bool(correct)}
        except Exception as err:  # a malformed request must not kill the worker
            reply = {"id": None, "error": repr(err)}
        protocol_out.write(json.dumps(reply) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(_serve(max_memory_mb=int(sys.argv[1]) if len(sys.argv) > 1 else 0))
