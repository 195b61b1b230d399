"""Bounded-time math equivalence checks: ``math_verify`` in a pool of killable worker processes.

Why processes: ``math_verify``'s own timeout uses ``signal.alarm``, which only works in the main thread and clobbers
any other ``SIGALRM`` user, and with it disabled sympy can run for ever on a 13-character answer such as
``9^{9^{9^{9}}}`` (it tries to evaluate the power tower). Length caps alone cannot prevent that, and a Python thread
cannot be stopped. So checks are sent to long-lived workers (``python _math_worker.py``) and the caller waits at most
``timeout_s`` for each reply; on timeout the worker is killed (SIGKILL), the item is judged "not correct", the event
is logged and counted in :attr:`MathVerifier.stats`, and a fresh worker takes its place.

Batches: :meth:`MathVerifier.judge_many` spreads the distinct ``(gold, prediction)`` pairs of a batch over
``num_workers`` workers and stops at ``batch_budget_s``: items still running or waiting then are judged "not
correct" (``stats["over_budget"]``). So one reward call lasts at most about ``batch_budget_s`` (plus worker start-up
on first use), whatever the model wrote.

Why this is safe: workers are started with ``subprocess.Popen`` (fork + immediate exec of a new interpreter), so they
inherit no CUDA context, NCCL communicator, locks or threads of the trainer, never import the user's script (unlike
``multiprocessing`` "spawn"), and only import the standard library and ``math_verify``. The parent side uses no
signals; daemon reader threads only move lines from the pipes into a queue. On Linux a worker asks the kernel to
kill it when its parent dies, and its address space is capped (``worker_memory_mb``), so a runaway computation can
neither outlive the trainer nor exhaust the node's memory (that kernel signal fires when the *thread* that started
the worker exits; the next call then simply starts a new worker). Calls are serialised by a lock, so the verifier may
be shared by threads. After ``os.fork`` a child process starts its own workers (the pid is checked).

This file imports nothing from ``trl_diffpo`` (it can be loaded on its own).
"""

from __future__ import annotations

import atexit
import itertools
import json
import logging
import math
import os
import queue
import subprocess
import sys
import threading
import time
import weakref
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

WORKER_SCRIPT = Path(__file__).with_name("_math_worker.py")
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_BATCH_BUDGET_S = 30.0
DEFAULT_NUM_WORKERS = max(1, min(4, os.cpu_count() or 1))
DEFAULT_STARTUP_TIMEOUT_S = 120.0
# answers longer than this are judged "not correct" without parsing (no real GSM8K/MATH answer is this long)
MAX_ANSWER_CHARS = 1000
# address-space cap of each worker process (it needs about 0.5 GiB); a runaway computation gets a MemoryError
DEFAULT_WORKER_MEMORY_MB = 4096

_live_verifiers: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_live_verifiers() -> None:
    for verifier in list(_live_verifiers):
        verifier.close()


class _Worker:
    """One worker process; ``ready`` once it has imported math_verify, ``job`` = (item, request id, deadline)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.ready, self.job = proc, False, None
        self.started_at = time.monotonic()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class MathVerifier:
    """Judges ``gold`` vs ``pred`` math answers with ``math_verify``, with a hard time bound per item and per batch.

    Args:
        timeout_s: seconds to wait for one judgement before killing its worker and answering ``False``.
        use_subprocess: run in worker processes (default, time-bounded). ``False`` judges in-process with
            ``math_verify``'s signal timeouts disabled: there is then **no time bound**; only for trusted input.
        startup_timeout_s: seconds to wait for a new worker to import ``math_verify``.
        max_answer_chars: longer answers (gold or prediction) are judged ``False`` without parsing.
        worker_memory_mb: address-space limit of each worker (Unix; 0 for none).
        num_workers: worker processes that judge the items of a batch in parallel (started when first needed).
        batch_budget_s: seconds one :meth:`judge_many` call may take once its workers are up; ``None`` for no limit.

    Example:
        >>> verifier = MathVerifier(timeout_s=2.0)
        >>> verifier.is_equivalent(r"\\frac{1}{2}", "0.5")
        True
        >>> verifier.judge_many([("14", "14"), ("14", "13 or 14")])
        [True, False]
    """

    def __init__(
        self,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        use_subprocess: bool = True,
        startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
        max_answer_chars: int = MAX_ANSWER_CHARS,
        worker_memory_mb: int = DEFAULT_WORKER_MEMORY_MB,
        num_workers: int = DEFAULT_NUM_WORKERS,
        batch_budget_s: float | None = DEFAULT_BATCH_BUDGET_S,
    ):
        self.use_subprocess = use_subprocess
        self.startup_timeout_s = float(startup_timeout_s)
        self.max_answer_chars = int(max_answer_chars)
        self.worker_memory_mb = int(worker_memory_mb)
        self.configure(timeout_s=timeout_s, num_workers=num_workers, batch_budget_s=batch_budget_s)
        # checks, cached (repeats within a batch), too_long, timeouts, over_budget, worker_starts, worker_deaths, errors
        self.stats: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        self._replies: queue.Queue = queue.Queue()
        self._owner_pid: int | None = None
        self._request_ids = itertools.count()
        _live_verifiers.add(self)

    def configure(
        self, timeout_s: float | None = None, num_workers: int | None = None, batch_budget_s: float | None = math.nan
    ) -> None:
        """Change the time limits or the pool size (``None`` keeps a value; ``batch_budget_s=None`` removes it)."""
        if timeout_s is not None:
            if not timeout_s > 0:
                raise ValueError(f"MathVerifier: timeout_s must be > 0, got {timeout_s}.")
            self.timeout_s = float(timeout_s)
        if num_workers is not None:
            if int(num_workers) < 1:
                raise ValueError(f"MathVerifier: num_workers must be >= 1, got {num_workers}.")
            self.num_workers = int(num_workers)
        if batch_budget_s is None or not math.isnan(batch_budget_s):
            if batch_budget_s is not None and not batch_budget_s > 0:
                raise ValueError(f"MathVerifier: batch_budget_s must be > 0 or None, got {batch_budget_s}.")
            self.batch_budget_s = None if batch_budget_s is None else float(batch_budget_s)

    # ------------------------------------------------------------------ public API
    def is_equivalent(self, gold: str, pred: str | Sequence[str]) -> bool:
        """Whether ``pred`` (one answer, or a list of forms of it) equals ``gold``; ``False`` on timeout, crash or
        over-long input."""
        return self.judge_many([(gold, pred)])[0]

    def judge_many(self, pairs: Sequence[tuple[str, str | Sequence[str]]]) -> list[bool]:
        """Judge ``(gold, pred)`` pairs in parallel workers within ``batch_budget_s``; one bool per pair.

        ``pred`` is one answer or a list of forms of one answer (any equal form counts). Repeated pairs are judged
        once. Items that time out, crash their worker, are over-long or still unjudged when the budget runs out are
        ``False``. Never raises on the inputs (only when a worker cannot start at all: math_verify missing).
        """
        verdicts = [False] * len(pairs)
        indices_by_item: dict[tuple[str, tuple[str, ...]], list[int]] = {}
        for index, (gold, pred) in enumerate(pairs):
            self.stats["checks"] += 1
            gold = str(gold).strip()
            forms = tuple(form for form in (str(f).strip() for f in _as_forms(pred)) if form)
            if not gold or not forms:
                continue
            if len(gold) > self.max_answer_chars or any(len(form) > self.max_answer_chars for form in forms):
                self.stats["too_long"] += 1
                continue
            indices_by_item.setdefault((gold, forms), []).append(index)
        self.stats["cached"] += sum(len(indices) - 1 for indices in indices_by_item.values())
        items = list(indices_by_item)
        if not items:
            return verdicts
        if self.use_subprocess:
            with self._lock:
                item_verdicts = self._judge_in_pool(items)
        else:
            from ._math_worker import judge

            item_verdicts = [judge(gold, list(forms)) for gold, forms in items]
        for item, verdict in zip(items, item_verdicts):
            for index in indices_by_item[item]:
                verdicts[index] = bool(verdict)
        return verdicts

    def close(self) -> None:
        """Stop the worker processes (a later call starts new ones)."""
        workers, self._workers = self._workers, []
        if self._owner_pid == os.getpid():
            for worker in workers:
                worker.kill()

    # ------------------------------------------------------------------ the pool
    def _judge_in_pool(self, items: list[tuple[str, tuple[str, ...]]]) -> list[bool]:
        if self._owner_pid != os.getpid():  # first use, or we are a forked child: the parent's workers are not ours
            self._workers, self._owner_pid = [], os.getpid()
        self._workers = [worker for worker in self._workers if worker.proc.poll() is None]
        self._wait_until_ready(self._start_workers(min(self.num_workers, len(items))))
        verdicts = [False] * len(items)
        # a stack, shortest answer on top: within a budget, many quick items beat one that may hang
        pending = sorted(range(len(items)), key=lambda index: -sum(map(len, items[index][1])))
        budget_end = math.inf if self.batch_budget_s is None else time.monotonic() + self.batch_budget_s
        while True:
            for worker in list(self._workers):
                if worker.ready and worker.job is None and pending:
                    self._send(worker, pending.pop(), items, budget_end)
            busy = [worker for worker in self._workers if worker.job is not None]
            if not busy and not pending:
                return verdicts
            if not self._workers:
                self._start_workers(1)
            starting = [worker.started_at + self.startup_timeout_s for worker in self._workers if not worker.ready]
            deadline = min([worker.job[2] for worker in busy] + starting + [budget_end])
            try:
                worker, message = self._replies.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self._expire(busy, budget_end, pending, items)
                continue
            self._receive(worker, message, verdicts)

    def _send(self, worker: _Worker, item_index: int, items, budget_end: float) -> None:
        gold, forms = items[item_index]
        request_id = next(self._request_ids)
        worker.job = (item_index, request_id, min(time.monotonic() + self.timeout_s, budget_end))
        try:
            worker.proc.stdin.write(json.dumps({"id": request_id, "gold": gold, "pred": list(forms)}) + "\n")
            worker.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            self._replace(worker, "worker_deaths", "it closed its input")

    def _receive(self, worker: _Worker, message: dict | None, verdicts: list[bool]) -> None:
        if worker not in self._workers:
            return  # a late line (or end of stream) from a worker already killed
        if not worker.ready:
            if message is None or not message.get("ready"):
                self._workers.remove(worker)
                worker.kill()
                detail = "it exited at start" if message is None else message.get("error", message)
                raise RuntimeError(
                    f"MathVerifier's worker failed to start: {detail}. Check that `math-verify` is installed in "
                    f"{sys.executable}."
                )
            worker.ready = True
        elif message is None:
            self._replace(worker, "worker_deaths", "it exited")
        elif worker.job is None or message.get("id") != worker.job[1]:
            self._replace(worker, "errors", f"it answered out of protocol ({message!r})")
        else:
            verdicts[worker.job[0]] = bool(message.get("correct", False))
            worker.job = None

    def _expire(self, busy: list[_Worker], budget_end: float, pending: list[int], items) -> None:
        now = time.monotonic()
        for worker in busy:
            if now >= worker.job[2]:
                over_budget = now >= budget_end
                self.stats["over_budget" if over_budget else "timeouts"] += 1
                if not over_budget:
                    logger.warning(
                        "math_verify took more than %.1fs on an answer (%d timeouts so far); judged not correct and "
                        "the worker restarted. Answer start: %r",
                        self.timeout_s,
                        self.stats["timeouts"],
                        items[worker.job[0]][1][0][:80],
                    )
                # a replacement only when items wait for it (starting one costs about a second of CPU)
                self._replace(worker, None, None, restart=not over_budget and bool(pending))
        if now >= budget_end and pending:
            self.stats["over_budget"] += len(pending)
            pending.clear()
        if now >= budget_end:
            logger.warning(
                "math_verify batch budget of %.1fs spent; the unjudged answers are judged not correct (%d over budget "
                "so far).",
                self.batch_budget_s,
                self.stats["over_budget"],
            )
        for worker in [worker for worker in self._workers if not worker.ready]:
            if now - worker.started_at >= self.startup_timeout_s:
                self._workers.remove(worker)
                worker.kill()
                raise RuntimeError(
                    f"MathVerifier's worker did not start within {self.startup_timeout_s:.0f}s. Check that "
                    f"`math-verify` is installed in {sys.executable}."
                )

    def _replace(self, worker: _Worker, counter: str | None, why: str | None, restart: bool = True) -> None:
        """Kill ``worker`` (its item stays ``False``) and, unless ``restart=False``, start a new one in its place."""
        if counter is not None:
            self.stats[counter] += 1
            logger.warning("math_verify worker stopped (%s); judged not correct, a new one starts.", why)
        self._workers.remove(worker)
        worker.kill()
        if restart:
            self._start_workers(len(self._workers) + 1)

    def _start_workers(self, count: int) -> list[_Worker]:
        """Start workers until the pool has ``count``; returns the new ones (not ready yet)."""
        started = []
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        while len(self._workers) < count:
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-u", str(WORKER_SCRIPT), str(self.worker_memory_mb)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    text=True,
                    bufsize=1,
                    env=env,
                    close_fds=True,
                )
            except OSError as err:
                raise RuntimeError(
                    f"MathVerifier could not start its worker process ({err}). Run where subprocesses are allowed, "
                    "or pass MathVerifier(use_subprocess=False) to judge in-process without a time bound."
                ) from err
            worker = _Worker(proc)
            threading.Thread(target=_pump_lines, args=(worker, self._replies), daemon=True).start()
            self._workers.append(worker)
            self.stats["worker_starts"] += 1
            started.append(worker)
        return started

    def _wait_until_ready(self, workers: list[_Worker]) -> None:
        """Block until the new ``workers`` have imported math_verify (start-up does not count against the budget)."""
        end = time.monotonic() + self.startup_timeout_s
        while any(not worker.ready for worker in workers):
            try:
                worker, message = self._replies.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                self._expire([], math.inf, [], [])  # raises for the workers that did not start in time
                continue
            self._receive(worker, message, [])


def _as_forms(pred: str | Sequence[str]) -> Sequence[str]:
    return [pred] if isinstance(pred, str) or not isinstance(pred, Sequence) else pred


def _pump_lines(worker: _Worker, replies: queue.Queue) -> None:
    """Reader thread: ``(worker, decoded JSON line)`` into ``replies``; ``(worker, None)`` marks end of stream."""
    try:
        for line in worker.proc.stdout:
            try:
                replies.put((worker, json.loads(line)))
            except json.JSONDecodeError:
                replies.put((worker, {"id": None, "error": f"unreadable line {line[:80]!r}"}))
    except (OSError, ValueError):
        pass
    replies.put((worker, None))


_default_verifier: MathVerifier | None = None
_default_lock = threading.Lock()


def get_default_verifier() -> MathVerifier:
    """The process-wide :class:`MathVerifier` used by the math rewards when none is given (created on first use)."""
    global _default_verifier
    with _default_lock:
        if _default_verifier is None:
            _default_verifier = MathVerifier()
        return _default_verifier


def configure_default_verifier(
    timeout_s: float | None = None, num_workers: int | None = None, batch_budget_s: float | None = math.nan
) -> MathVerifier:
    """Set the limits of the process-wide verifier (what ``DiffpoConfig.reward_timeout_s``, ``reward_num_workers``
    and ``reward_batch_budget_s`` do); returns it."""
    verifier = get_default_verifier()
    verifier.configure(timeout_s=timeout_s, num_workers=num_workers, batch_budget_s=batch_budget_s)
    return verifier
