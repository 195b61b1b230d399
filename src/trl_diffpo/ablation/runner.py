"""Run a grid: every (configuration, seed) not finished yet, then the summary table and the frontier plot.

Seeds are the outer loop: a seed's warm-up (trained once, cached) is evaluated first as the reference row, then every
configuration of that seed trains from it. Runs whose record already exists with the same fingerprint are skipped
(resume by running the same command again); progress is printed as ``[ablate k/N]`` lines with the elapsed time and a
naive estimate of the time left.
"""

from __future__ import annotations

import os
import time
from typing import Any

from . import records
from .grid import RECIPE, SUDOKU_CPU, AblationGrid, Configuration
from .plot import FRONTIERS_PNG, plot_frontiers
from .summary import fixed_point, learned_vs_reference, summarise, write_summary


def _fingerprint(grid: AblationGrid, configuration: Configuration | None) -> str:
    if configuration is None:  # the warm-up reference depends on the base and the evaluation only
        configuration = Configuration(name=records.WARMUP_NAME)
    return configuration.fingerprint(grid.base | {"backend": grid.backend, "recipe": grid.recipe}, grid.evaluation)


def planned_runs(grid: AblationGrid) -> list[tuple[Configuration | None, int, str]]:
    """Every run of the grid in order, ``(configuration or None for the warm-up reference, seed, record path)``."""
    plan = []
    for seed in grid.seeds:
        plan.append((None, seed, records.record_path(grid.output_dir, records.WARMUP_SLUG, seed)))
        for configuration in grid.configurations:
            plan.append((configuration, seed, records.record_path(grid.output_dir, configuration.slug, seed)))
    return plan


def _format_seconds(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def run_grid(
    grid: AblationGrid,
    *,
    rerun_changed: bool = False,
    show_progress: bool = True,
    dry_run: bool = False,
    jobs: int = 1,
    threads: int | None = None,
) -> dict[str, Any]:
    """Run every unfinished run of ``grid``, then write the summary and plot. Returns ``{"ran", "skipped", ...}``.

    ``jobs > 1`` runs that many runs side by side in worker processes of ``threads`` torch threads each (default:
    the cores shared evenly; :mod:`~trl_diffpo.ablation.parallel`), the ``sudoku_cpu`` backend only.
    """
    plan = planned_runs(grid)
    todo = []
    for configuration, seed, path in plan:
        finished = records.finished_record(path, _fingerprint(grid, configuration), rerun_changed=rerun_changed)
        if finished is None:
            todo.append((configuration, seed, path))
    skipped = len(plan) - len(todo)
    print(
        f"[ablate] grid {grid.name!r} ({grid.backend}): {len(grid.configurations)} configurations x "
        f"{len(grid.seeds)} seeds (+ {len(grid.seeds)} warm-up references) = {len(plan)} runs; {skipped} finished, "
        f"{len(todo)} to run; output {grid.output_dir}",
        flush=True,
    )
    if dry_run:
        for configuration, seed, _path in todo:
            print(f"[ablate] would run {configuration.name if configuration else records.WARMUP_NAME}, seed {seed}")
        return {"ran": 0, "skipped": skipped, "todo": len(todo)}

    started = time.perf_counter()
    finished: list[int] = []  # indices of the runs recorded so far (with --jobs, not in index order)

    def on_start(index: int, configuration: Configuration | None, seed: int) -> None:
        name = configuration.name if configuration else records.WARMUP_NAME
        elapsed = time.perf_counter() - started
        # naive: the mean wall time per finished run so far, times the runs not finished (running ones included)
        rate = elapsed / len(finished) if finished else None
        left = "" if rate is None else f", about {_format_seconds(rate * (len(todo) - len(finished)))} left"
        print(
            f"[ablate {index}/{len(todo)}] {name}, seed {seed} (elapsed {_format_seconds(elapsed)}{left})", flush=True
        )

    def on_record(index: int, configuration: Configuration | None, seed: int, path: str, record: dict) -> None:
        record["fingerprint"] = _fingerprint(grid, configuration)
        record["backend"] = grid.backend
        record["grid"] = grid.name
        records.write_record(path, record)
        finished.append(index)
        point = fixed_point(record["evaluation"])
        name = configuration.name if configuration else records.WARMUP_NAME
        print(
            f"[ablate {index}/{len(todo)}] {name}, seed {seed} done in {_format_seconds(record['seconds']['total'])}: "
            f"held-out accuracy {100 * point['accuracy']:.1f}% at {point['mean_nfe']:.2f} NFE "
            f"(gamma {grid.fixed_threshold:g})",
            flush=True,
        )

    if jobs > 1:
        from .parallel import run_parallel

        run_parallel(grid, todo, jobs, threads, on_record=on_record, on_start=on_start)
    else:
        contexts: dict[int, Any] = {}
        for index, (configuration, seed, path) in enumerate(todo, start=1):
            on_start(index, configuration, seed)
            on_record(
                index, configuration, seed, path, _run_one(grid, configuration, seed, path, contexts, show_progress)
            )
    wall = time.perf_counter() - started
    if todo:
        print(f"[ablate] {len(todo)} runs in {_format_seconds(wall)} wall time ({jobs} job(s))", flush=True)
    outputs = write_outputs(grid)
    return {"ran": len(todo), "skipped": skipped, "seconds": wall, **outputs}


def seed_context(grid: AblationGrid, seed: int, contexts: dict[int, Any]):
    """The ``sudoku_cpu`` :class:`~.sudoku_cpu.SudokuSeedContext` of ``seed``, kept in ``contexts`` (one seed at a time)."""
    from . import sudoku_cpu

    if seed not in contexts:
        contexts.clear()  # one seed's data at a time
        contexts[seed] = sudoku_cpu.SudokuSeedContext(grid, seed)
    return contexts[seed]


def _run_one(grid, configuration, seed, path, contexts, show_progress) -> dict[str, Any]:
    if grid.backend == SUDOKU_CPU:
        from . import sudoku_cpu

        context = seed_context(grid, seed, contexts)
        if configuration is None:
            return sudoku_cpu.run_warmup_reference(context, show_progress=show_progress)
        return sudoku_cpu.run_configuration(context, configuration, show_progress=show_progress)
    if grid.backend == RECIPE:
        from . import recipe

        run_dir = os.path.splitext(path)[0]
        if configuration is None:
            return recipe.run_warmup_reference(grid, seed, run_dir)
        return recipe.run_configuration(grid, configuration, seed, run_dir)
    raise ValueError(f"Unknown backend {grid.backend!r}.")  # pragma: no cover - parse_grid refuses it


def write_outputs(grid: AblationGrid) -> dict[str, str]:
    """Summarise every record under the grid's output folder: summary.json, summary.md and frontiers.png."""
    found = records.load_records(grid.output_dir)
    if not found:
        raise ValueError(f"No finished runs under {grid.output_dir}/{records.RUNS_FOLDER}: nothing to summarise.")
    matched = {
        key: value
        for key, value in (("matched_nfe", grid.matched_nfe), ("matched_accuracy", grid.matched_accuracy))
        if value is not None
    }
    summary = summarise(found, matched or None, order=[c.name for c in grid.configurations])
    summary["grid"] = grid.name
    summary["fixed_threshold"] = grid.fixed_threshold
    if grid.learned_reference:
        summary["learned_vs_reference"] = learned_vs_reference(found, grid.learned_reference)
    paths = write_summary(summary, grid.output_dir, grid.fixed_threshold)
    paths["png"] = plot_frontiers(
        summary,
        os.path.join(grid.output_dir, FRONTIERS_PNG),
        title=f"{grid.name}: held-out accuracy vs NFE",
    )
    with open(paths["md"], encoding="utf-8") as handle:
        print("\n" + handle.read(), flush=True)
    print(f"[ablate] wrote {paths['md']}, {paths['json']}, {paths['png']}", flush=True)
    return paths
