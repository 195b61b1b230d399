"""The accuracy-vs-NFE plot: one marker per setting, the Pareto frontier as a step line."""

from __future__ import annotations

import os
from collections.abc import Sequence

from .results import SettingResult, pareto_front

PLOT_MARGIN = 3.0  # accuracy points of head room above and below the plotted results
# a point drawn at 0% or 100% sits on the edge of the axis; the markers are drawn unclipped so they stay whole
ACCURACY_AXIS = (0.0, 100.0)


def plot_accuracy_vs_nfe(
    results: Sequence[SettingResult], path: str | os.PathLike, title: str | None = None, group_by=None
) -> None:
    """Scatter accuracy (%) against mean NFE, one marker per setting, with the Pareto frontier as a step line.

    Args:
        results: the settings to draw (their ``pareto_optimal`` flags are recomputed over this list).
        path: the PNG to write.
        title: the plot title.
        group_by: ``fn(result) -> str`` legend group of each point (default: the sampler, with "learned" apart).
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    group_by = group_by or (lambda r: f"{r.sampler} (learned)" if r.learned else r.sampler)
    flags = pareto_front([(r.mean_nfe, r.accuracy) for r in results])
    figure, axes = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    try:
        groups: dict[str, list[SettingResult]] = {}
        for result in results:
            groups.setdefault(group_by(result), []).append(result)
        for name, members in groups.items():
            members = sorted(members, key=lambda r: r.mean_nfe)
            axes.plot(
                [r.mean_nfe for r in members],
                [100 * r.accuracy for r in members],
                marker="*" if any(r.learned for r in members) else "o",
                markersize=11 if any(r.learned for r in members) else 6,
                linestyle="-" if len(members) > 1 else "none",
                alpha=0.85,
                clip_on=False,
                label=name,
            )
            for result in members:
                axes.annotate(
                    result.label.split(":", 1)[1],
                    (result.mean_nfe, 100 * result.accuracy),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=7,
                )
        front = sorted((r for r, flag in zip(results, flags) if flag), key=lambda r: r.mean_nfe)
        if front:
            axes.step(
                [r.mean_nfe for r in front],
                [100 * r.accuracy for r in front],
                where="post",
                color="black",
                linewidth=2.2,
                alpha=0.35,
                label="Pareto frontier",
                zorder=0,
            )
            axes.scatter(
                [r.mean_nfe for r in front],
                [100 * r.accuracy for r in front],
                s=160,
                facecolors="none",
                edgecolors="black",
                linewidths=1.2,
                zorder=3,
                clip_on=False,
            )
        percents = [100 * r.accuracy for r in results]
        if percents:
            axes.set_ylim(*accuracy_axis_limits(percents))
        axes.set_xlabel("mean NFE (forward passes per sample)")
        axes.set_ylabel("accuracy (%)")
        axes.set_title(title or "accuracy vs decoding cost")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8, loc="best")
        figure.tight_layout()
        figure.savefig(path, format="png")
    finally:
        plt.close(figure)


def accuracy_axis_limits(percents: Sequence[float]) -> tuple[float, float]:
    """The accuracy axis: the results plus :data:`PLOT_MARGIN` points each side (so a flat set of results does not
    zoom into noise), never beyond 0-100%: all-0% results give (0, 3), not a negative accuracy."""
    low, high = ACCURACY_AXIS
    return max(low, min(percents) - PLOT_MARGIN), min(high, max(percents) + PLOT_MARGIN)
