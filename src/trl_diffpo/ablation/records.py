"""One JSON record per (configuration, seed): where it lives, how it is written (atomically) and when it is reusable.

Layout under the grid's output folder::

    runs/<configuration-slug>/seed-<seed>.json   one finished run (settings, seed, training curves, evaluation)
    runs/warm-up/seed-<seed>.json                the shared warm-up model of that seed, evaluated the same way
    summary.json, summary.md, frontiers.png      written by the summary step

A record is written only once its run has finished (to a temporary file, then renamed), so an interrupted study
leaves no half-written record, and a re-run skips every run whose record exists with the same fingerprint.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import time
from typing import Any

RECORD_FORMAT_VERSION = 1
RUNS_FOLDER = "runs"
WARMUP_NAME = "warm-up (no RL)"
WARMUP_SLUG = "warm-up"


def record_path(output_dir: str, slug: str, seed: int) -> str:
    """The record file of one run."""
    return os.path.join(output_dir, RUNS_FOLDER, slug, f"seed-{seed}.json")


def _git(source_dir: str, *args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", source_dir, *args], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):  # no git, or it hung
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@functools.cache
def code_revision(source_dir: str | None = None) -> dict[str, Any]:
    """Which code made a record: the package version and, when it runs from a git checkout, the commit and whether
    the package's files differed from it (``git_revision`` / ``git_dirty`` are None outside a checkout)."""
    from .. import __version__

    if source_dir is None:
        source_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    revision = _git(source_dir, "rev-parse", "HEAD")
    changes = _git(source_dir, "status", "--porcelain", "--", ".") if revision else None
    return {
        "version": __version__,
        "git_revision": revision,
        "git_dirty": None if changes is None else bool(changes),
    }


def write_record(path: str, record: dict[str, Any]) -> None:
    """Write ``record`` as JSON atomically (temporary file + rename), creating folders as needed; the record gets
    its format version, the time it finished and the code that made it (:func:`code_revision`)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    record = {
        "format_version": RECORD_FORMAT_VERSION,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "code": code_revision(),
        **record,
    }
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2, default=str)
    os.replace(temporary, path)


def read_record(path: str) -> dict[str, Any] | None:
    """The record at ``path``, or None when there is none (or it cannot be read)."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError):
        return None


def finished_record(path: str, fingerprint: str, rerun_changed: bool = False) -> dict[str, Any] | None:
    """The record at ``path`` if it is a finished run with this fingerprint, else None.

    A record from other settings raises (so a changed grid never mixes old and new runs silently), unless
    ``rerun_changed``: then it counts as not finished and will be overwritten.
    """
    record = read_record(path)
    if record is None:
        return None
    if record.get("fingerprint") != fingerprint:
        if rerun_changed:
            return None
        raise ValueError(
            f"{path} holds a run made with other settings (fingerprint {record.get('fingerprint')} != {fingerprint}): "
            "the grid file changed since. Use a new --output-dir, or delete that record (or pass --rerun-changed) "
            "to run it again with the current settings."
        )
    return record


def load_records(output_dir: str) -> list[dict[str, Any]]:
    """Every record under ``<output_dir>/runs`` (sorted by configuration folder, then seed)."""
    root = os.path.join(output_dir, RUNS_FOLDER)
    records = []
    if not os.path.isdir(root):
        return records
    for slug in sorted(os.listdir(root)):
        folder = os.path.join(root, slug)
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            if name.startswith("seed-") and name.endswith(".json"):
                record = read_record(os.path.join(folder, name))
                if record is not None:
                    records.append(record)
    return records


POINT_KEYS = ("label", "threshold", "num_samples", "num_correct", "accuracy", "mean_nfe", "std_nfe", "mean_threshold")


def evaluation_record(settings: list[dict[str, Any]], fixed_threshold: float) -> dict[str, Any]:
    """The evaluation part of a record from per-setting results (``SettingResult`` as dicts, or the ``settings`` list
    of an evaluation's ``results.json``).

    ``points`` are the fixed-threshold settings of the sweep (sorted by threshold), ``learned`` the sampler head's
    setting when one was evaluated.
    """
    points, learned = [], None
    for result in settings:
        row = {name: result.get(name) for name in POINT_KEYS}
        if result.get("learned"):
            learned = row
        else:
            points.append(row)
    points.sort(key=lambda row: row["threshold"])
    return {"fixed_threshold": fixed_threshold, "points": points, "learned": learned}
