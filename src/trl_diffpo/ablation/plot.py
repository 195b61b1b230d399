"""The figure of the summary: each configuration's mean accuracy-vs-NFE curve over seeds, with error bars."""

from __future__ import annotations

import os
from typing import Any

FRONTIERS_PNG = "frontiers.png"


def plot_frontiers(summary: dict[str, Any], path: str, title: str | None = None) -> str:
    """One line per configuration through its sweep points (mean NFE, mean accuracy over seeds, ordered by
    threshold), error bars = sample std over seeds in both directions; a star for the learned threshold. Writes PNG."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from ..evaluation.plotting import accuracy_axis_limits

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure, axes = plt.subplots(figsize=(7.5, 5.0), dpi=120)
    percents: list[float] = []  # every plotted accuracy +- its error bar, for the axis
    try:
        for index, row in enumerate(summary["configurations"]):
            color = f"C{index % 10}"
            sweep = row["sweep"]
            x = [point["mean_nfe"]["mean"] for point in sweep]
            y = [100 * point["accuracy"]["mean"] for point in sweep]
            xerr = [point["mean_nfe"]["std"] or 0.0 for point in sweep]
            yerr = [100 * (point["accuracy"]["std"] or 0.0) for point in sweep]
            percents += [value + sign * err for value, err in zip(y, yerr, strict=True) for sign in (-1, 1)]
            axes.errorbar(
                x,
                y,
                xerr=xerr,
                yerr=yerr,
                color=color,
                marker="o",
                markersize=4,
                capsize=2,
                linewidth=1.2,
                label=f"{row['name']} (n={len(row['seeds'])})",
            )
            learned = row.get("learned")
            if learned:
                axes.errorbar(
                    [learned["mean_nfe"]["mean"]],
                    [100 * learned["accuracy"]["mean"]],
                    xerr=[learned["mean_nfe"]["std"] or 0.0],
                    yerr=[100 * (learned["accuracy"]["std"] or 0.0)],
                    color=color,
                    marker="*",
                    markersize=12,
                    capsize=2,
                    linestyle="none",
                )
        if percents:  # the evaluation plot's axis: never below 0% or above 100%
            axes.set_ylim(*accuracy_axis_limits(percents))
        axes.set_xlabel("mean NFE (forward passes per sample)")
        axes.set_ylabel("held-out accuracy (%)")
        subtitle = "mean ± std over seeds; star: learned threshold"
        axes.set_title(f"{title or 'held-out accuracy vs NFE'}\n{subtitle}", fontsize=10)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7, loc="best")
        figure.tight_layout()
        figure.savefig(path, format="png")
    finally:
        plt.close(figure)
    return path
