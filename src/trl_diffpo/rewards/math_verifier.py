"""Bounded-time math equivalence checks: ``math_verify`` in a killable worker process.

Why a process: ``math_verify``'s own timeout uses ``signal.alarm``, which only works in the main thread and clobbers
any other ``SIGALRM`` user, and with it disabled sympy can run for ever on a 13-character answer such as
``9^{9^{9^{9}}}`` (it tries to evaluate the power tower). Length caps alone cannot prevent that, and a Python thread
cannot be stopped. So each check is sent to a long-lived worker (``python _math_worker.py``) and the caller waits at
most ``timeout_s`` for the reply; on timeout the worker is killed (SIGKILL), the item is judged "not correct", the
event is logged and counted in :attr:`MathVerifier.stats`, and a fresh worker starts on the next call.

Why this is safe: the worker is started with ``subprocess.Popen`` (fork + immediate exec of a new interpreter), so it
inherits no CUDA context, NCCL communicator, locks or threads of the trainer, never imports the user's script (unlike
``multiprocessing`` "spawn"), and only imports the standard library and ``math_verify``. The parent side uses no
signals; a daemon reader thread only moves lines from the pipe into a queue. On Linux the worker asks the kernel to
kill it when its parent dies, and its address space is capped (``worker_memory_mb``), so a runaway computation can
neither outlive the trainer nor exhaust the node's memory (that kernel signal fires when the *thread* that started
the worker exits; the next call then simply starts a new worker). Calls are serialised by a lock, so the verifier may
be shared by threads. After ``os.fork`` a child process starts its own worker (the pid is checked).
"""

from __future__ import annotations

import atexit
import itertools
import json
import logging
import os
import queue
import subprocess
import sys
import threading
import weakref
from collections import Counter
from pathlib import Path

logger = logging.getLogger(__name__)

WORKER_SCRIPT = Path(__file__).with_name("_math_worker.py")
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_STARTUP_TIMEOUT_S = 120.0
# answers longer than this are judged "not correct" without parsing (no real GSM8K/MATH answer is this long)
MAX_ANSWER_CHARS = 1000
# address-space cap of the worker process (it needs about 0.5 GiB); a runaway computation gets a MemoryError
DEFAULT_WORKER_MEMORY_MB = 4096

_live_verifiers: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_live_verifiers() -> None:
    for verifier in list(_live_verifiers):
        verifier.close()


class MathVerifier:
    """Judges ``gold`` vs ``pred`` math answers with ``math_verify``, with a hard per-item time bound.

    Args:
        timeout_s: seconds to wait for one judgement before killing the worker and answering ``False``.
        use_subprocess: run in a worker process (default, time-bounded). ``False`` judges in-process with
            ``math_verify``'s signal timeouts disabled: there is then **no time bound**; only for trusted input.
        startup_timeout_s: seconds to wait for a new worker to import ``math_verify``.
        max_answer_chars: longer answers (gold or prediction) are judged ``False`` without parsing.
        worker_memory_mb: address-space limit of the worker (Unix; 0 for none).

    Example:
        >>> verifier = MathVerifier(timeout_s=2.0)
        >>> verifier.is_equivalent(r"\\frac{1}{2}", "0.5")
        True
    """

    def __init__(
        self,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        use_subprocess: bool = True,
        startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
        max_answer_chars: int = MAX_ANSWER_CHARS,
        worker_memory_mb: int = DEFAULT_WORKER_MEMORY_MB,
    ):
        if timeout_s <= 0:
            raise ValueError(f"MathVerifier: timeout_s must be > 0, got {timeout_s}.")
        self.timeout_s = float(timeout_s)
        self.use_subprocess = use_subprocess
        self.startup_timeout_s = float(startup_timeout_s)
        self.max_answer_chars = int(max_answer_chars)
        self.worker_memory_mb = int(worker_memory_mb)
        self.stats: Counter[str] = Counter()  # checks, too_long, timeouts, worker_starts, worker_deaths, errors
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._replies: queue.Queue | None = None
        self._owner_pid: int | None = None
        self._request_ids = itertools.count()
        _live_verifiers.add(self)

    # ------------------------------------------------------------------ public API
    def is_equivalent(self, gold: str, pred: str) -> bool:
        """Whether ``pred`` equals ``gold`` mathematically; ``False`` on timeout, crash or over-long input."""
        self.stats["checks"] += 1
        gold, pred = str(gold).strip(), str(pred).strip()
        if not gold or not pred:
            return False
        if len(gold) > self.max_answer_chars or len(pred) > self.max_answer_chars:
            self.stats["too_long"] += 1
            return False
        if not self.use_subprocess:
            from ._math_worker import judge

            return judge(gold, pred)
        with self._lock:
            return self._judge_in_worker(gold, pred)

    def close(self) -> None:
        """Stop the worker process (a later call starts a new one)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None and self._owner_pid == os.getpid():
            proc.kill()
            proc.wait()

    # ------------------------------------------------------------------ worker management
    def _judge_in_worker(self, gold: str, pred: str) -> bool:
        self._ensure_worker()
        request_id = next(self._request_ids)
        try:
            self._proc.stdin.write(json.dumps({"id": request_id, "gold": gold, "pred": pred}) + "\n")
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            self._worker_died("it closed its input")
            return False
        try:
            reply = self._replies.get(timeout=self.timeout_s)
        except queue.Empty:
            self.stats["timeouts"] += 1
            logger.warning(
                "math_verify took more than %.1fs on an answer (%d timeouts so far); judged not correct and the "
                "worker restarted. Answer start: %r",
                self.timeout_s,
                self.stats["timeouts"],
                pred[:80],
            )
            self.close()
            return False
        if reply is None:
            self._worker_died("it exited")
            return False
        if reply.get("id") != request_id:
            self.stats["errors"] += 1
            logger.warning("math_verify worker answered out of protocol (%r); judged not correct.", reply)
            self.close()  # resynchronise with a fresh worker
            return False
        return bool(reply.get("correct", False))

    def _worker_died(self, why: str) -> None:
        self.stats["worker_deaths"] += 1
        logger.warning("math_verify worker stopped (%s); judged not correct, a new one starts on the next call.", why)
        self.close()

    def _ensure_worker(self) -> None:
        if self._owner_pid != os.getpid():  # first use, or we are a forked child: the parent's worker is not ours
            self._proc = None
        if self._proc is not None and self._proc.poll() is None:
            return
        self._start_worker()

    def _start_worker(self) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
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
                f"MathVerifier could not start its worker process ({err}). Run where subprocesses are allowed, or "
                "pass MathVerifier(use_subprocess=False) to judge in-process without a time bound."
            ) from err
        replies: queue.Queue = queue.Queue()
        threading.Thread(target=_pump_lines, args=(proc.stdout, replies), daemon=True).start()
        self._proc, self._replies, self._owner_pid = proc, replies, os.getpid()
        self.stats["worker_starts"] += 1
        try:
            hello = replies.get(timeout=self.startup_timeout_s)
        except queue.Empty:
            hello = {"error": f"no answer within {self.startup_timeout_s:.0f}s"}
        if not hello or not hello.get("ready"):
            self.close()
            detail = (hello or {}).get("error", "it exited at start")
            raise RuntimeError(
                f"MathVerifier's worker failed to start: {detail}. Check that `math-verify` is installed in "
                f"{sys.executable}."
            )


def _pump_lines(stream, replies: queue.Queue) -> None:
    """Reader thread: decoded JSON lines from the worker go to ``replies``; ``None`` marks end of stream."""
    try:
        for line in stream:
            try:
                replies.put(json.loads(line))
            except json.JSONDecodeError:
                replies.put({"id": None, "error": f"unreadable line {line[:80]!r}"})
    except (OSError, ValueError):
        pass
    replies.put(None)


_default_verifier: MathVerifier | None = None
_default_lock = threading.Lock()


def get_default_verifier() -> MathVerifier:
    """The process-wide :class:`MathVerifier` used by the math rewards when none is given (created on first use)."""
    global _default_verifier
    with _default_lock:
        if _default_verifier is None:
            _default_verifier = MathVerifier()
        return _default_verifier
