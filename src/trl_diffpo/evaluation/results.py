"""What an evaluation measures per setting, the Pareto front over (mean NFE, accuracy), and the results files."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

RESULTS_FILE = "results.json"
PLOT_FILE = "accuracy_vs_nfe.png"
RESULTS_FORMAT_VERSION = 1


@dataclass
class SettingResult:
    """The measurements of one setting (see :func:`evaluate`)."""

    label: str
    sampler: str
    threshold: float | None
    steps: int | None
    learned: bool
    num_samples: int
    num_correct: int
    accuracy: float
    mean_nfe: float
    std_nfe: float
    tokens_per_step: float
    wall_time_s: float
    samples_per_s: float
    mean_threshold: float | None = None
    std_threshold: float | None = None
    pareto_optimal: bool = False


@dataclass
class EvaluationResults:
    """What :func:`evaluate` returns (and writes as JSON)."""

    settings: list[SettingResult]
    metadata: dict[str, Any] = field(default_factory=dict)
    completions: dict[str, list[str]] | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: ``format_version``, ``metadata``, ``settings`` (and ``completions`` when kept)."""
        payload = {
            "format_version": RESULTS_FORMAT_VERSION,
            "metadata": self.metadata,
            "settings": [asdict(result) for result in self.settings],
        }
        if self.completions is not None:
            payload["completions"] = self.completions
        return payload

    def by_label(self, label: str) -> SettingResult:
        """The result of the setting named ``label``."""
        for result in self.settings:
            if result.label == label:
                return result
        raise KeyError(f"No setting {label!r}; have {[result.label for result in self.settings]}.")

    def table(self) -> str:
        """A fixed-width text table, one row per setting, with a legend under it.

        ``threshold`` is the fixed threshold of an adaptive setting, or for a ``learned`` setting the mean +- std of
        the per-prompt thresholds the sampler head chose; ``*`` marks the Pareto-optimal settings.
        """
        header = (
            f"{'setting':<32} {'accuracy':>9} {'mean NFE':>9} {'std NFE':>8} {'threshold':>14} {'tok/step':>9} "
            f"{'time s':>8}"
        )
        lines = [header, "-" * len(header)]
        for result in self.settings:
            mark = "*" if result.pareto_optimal else " "
            lines.append(
                f"{result.label:<31}{mark} {100 * result.accuracy:>8.1f}% {result.mean_nfe:>9.2f} "
                f"{result.std_nfe:>8.2f} {_threshold_cell(result):>14} {result.tokens_per_step:>9.2f} "
                f"{result.wall_time_s:>8.1f}"
            )
        lines.append("* Pareto-optimal: no other setting is at least as accurate with fewer mean NFE.")
        if any(result.learned for result in self.settings):
            lines.append("threshold of a learned setting: mean +- std of the per-prompt thresholds the head chose.")
        return "\n".join(lines)


def _threshold_cell(result: SettingResult) -> str:
    if result.learned and result.mean_threshold is not None:
        return f"{result.mean_threshold:.3g} +- {result.std_threshold or 0.0:.2g}"
    return "-" if result.threshold is None else f"{result.threshold:g}"


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For ``(mean_nfe, accuracy)`` points, whether each is Pareto-optimal: no other point has NFE <= and accuracy
    >= with at least one strict (fewer forward passes is better, higher accuracy is better)."""
    flags = []
    for index, (nfe, accuracy) in enumerate(points):
        dominated = any(
            other_nfe <= nfe and other_accuracy >= accuracy and (other_nfe < nfe or other_accuracy > accuracy)
            for other_index, (other_nfe, other_accuracy) in enumerate(points)
            if other_index != index
        )
        flags.append(not dominated)
    return flags


def write_results(results: EvaluationResults, output_dir: str | os.PathLike, plot_title: str | None = None) -> None:
    """Write ``results.json`` and ``accuracy_vs_nfe.png`` into ``output_dir`` (created if needed)."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, RESULTS_FILE), "w", encoding="utf-8") as handle:
        json.dump(results.to_dict(), handle, indent=2)
    from .plotting import plot_accuracy_vs_nfe

    plot_accuracy_vs_nfe(results.settings, os.path.join(output_dir, PLOT_FILE), title=plot_title)
