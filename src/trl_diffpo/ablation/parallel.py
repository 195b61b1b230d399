"""``trl-diffpo ablate --jobs N``: run a grid's runs in N worker processes side by side (the CPU backend).

A 2-core machine runs the CPU study in two lanes of one torch thread each in about half the time of one lane. The
parent process schedules and every worker runs one (configuration, seed) at a time with the sequential runner's own
code, so a record made in a worker equals the record the sequential runner makes with the same torch thread count.

A seed's configurations wait until its warm-up is ready: the seed's warm-up reference run trains it (or loads it from
the cache) first, so two workers never train the same warm-up at once; warm-ups are scheduled before everything
else, so no worker idles waiting for one. The parent writes every record (one writer) as its run finishes; a run
that fails stops the scheduling of new runs, the runs in flight finish and are recorded, and
the failure is raised with the run it came from.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any

from .grid import SUDOKU_CPU, AblationGrid, Configuration

# one (configuration or None for the warm-up reference, seed, record path)
Run = tuple[Configuration | None, int, str]
_WORKER_CONTEXTS: dict[int, Any] = {}  # the worker's SudokuSeedContext of its current seed


def default_threads(jobs: int) -> int:
    """Torch threads per worker when ``--threads`` is not given: the machine's cores shared evenly, at least 1."""
    return max(1, (os.cpu_count() or 1) // jobs)


def _exit_with_parent(parent: int, every: float = 2.0) -> None:
    """End this worker when the parent process is gone (killed), instead of finishing a run nobody will record."""
    import time

    while os.getppid() == parent:
        time.sleep(every)
    os._exit(1)


def _init_worker(threads: int, parent: int) -> None:
    import threading

    import torch

    torch.set_num_threads(threads)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _run_in_worker(grid: AblationGrid, configuration: Configuration | None, seed: int, path: str, gate: bool):
    from .runner import _run_one, seed_context

    if gate:  # the seed's warm-up is already recorded: only make sure its model is trained / cached
        seed_context(grid, seed, _WORKER_CONTEXTS).warmup_model()
        return None
    return _run_one(grid, configuration, seed, path, _WORKER_CONTEXTS, show_progress=False)


def run_parallel(
    grid: AblationGrid,
    todo: list[Run],
    jobs: int,
    threads: int | None,
    on_record: Callable[[int, Configuration | None, int, str, dict[str, Any]], None],
    on_start: Callable[[int, Configuration | None, int], None],
) -> None:
    """Run ``todo`` in ``jobs`` worker processes; ``on_record(index, configuration, seed, path, record)`` per run.

    Raises:
        ValueError: for a backend other than ``sudoku_cpu`` (recipe runs launch their own, possibly multi-GPU,
            processes: run those one at a time).
        RuntimeError: when a run failed (after the runs in flight have finished and been recorded).
    """
    if grid.backend != SUDOKU_CPU:
        raise ValueError(
            f"--jobs {jobs} runs the in-process {SUDOKU_CPU!r} backend side by side; the {grid.backend!r} backend "
            "launches its own (multi-GPU) processes per run: use --jobs 1 and the launcher's own parallelism."
        )
    seeds_to_train = {seed for configuration, seed, _ in todo if configuration is not None}
    seeds_with_reference = {seed for configuration, seed, _ in todo if configuration is None}
    # (run, gate) in plan order; a gate task readies a seed whose warm-up reference is already recorded
    pending: list[tuple[Run, bool]] = [
        ((None, seed, ""), True) for seed in sorted(seeds_to_train - seeds_with_reference)
    ]
    pending += [(run, False) for run in todo]
    ready_seeds: set[int] = set()
    index_of = {id(run): index for index, run in enumerate(todo, start=1)}
    in_flight: dict[Future, tuple[Run, bool]] = {}
    failures: list[tuple[Run, BaseException]] = []

    context = multiprocessing.get_context("spawn")  # a fresh interpreter per worker (torch and fork do not mix)
    threads = threads or default_threads(jobs)
    with ProcessPoolExecutor(
        max_workers=jobs, mp_context=context, initializer=_init_worker, initargs=(threads, os.getpid())
    ) as pool:
        while pending or in_flight:
            while not failures and len(in_flight) < jobs:
                # warm-ups first (a lane never waits for a seed's warm-up while another lane could train it), then
                # the runs of ready seeds in plan order
                choice = next((item for item in pending if item[0][0] is None), None) or next(
                    (item for item in pending if item[0][1] in ready_seeds), None
                )
                if choice is None:
                    break
                pending.remove(choice)
                (configuration, seed, path), gate = choice
                if not gate:
                    on_start(index_of[id(choice[0])], configuration, seed)
                in_flight[pool.submit(_run_in_worker, grid, configuration, seed, path, gate)] = choice
            if not in_flight:
                break  # a failure stopped the scheduling and everything in flight has finished
            done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in done:
                run, gate = in_flight.pop(future)
                configuration, seed, path = run
                try:
                    record = future.result()
                except BaseException as error:  # noqa: BLE001 - reported with the run's name below
                    failures.append((run, error))
                    continue
                if configuration is None:
                    ready_seeds.add(seed)
                if not gate:
                    on_record(index_of[id(run)], configuration, seed, path, record)
    if failures:
        (configuration, seed, _path), error = failures[0]
        name = configuration.name if configuration else "the warm-up"
        raise RuntimeError(
            f"{len(failures)} run(s) failed; first: {name}, seed {seed}: {type(error).__name__}: {error}. The finished "
            "runs are recorded: fix the cause and run the same command again to resume."
        ) from error
