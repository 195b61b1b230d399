"""From per-run records to the summary table: mean +- std and n over seeds for every configuration.

Per run (one configuration, one seed), from its held-out threshold sweep:

- ``accuracy`` / ``mean_nfe``: at the grid's fixed evaluation threshold;
- the **frontier**: the Pareto-optimal sweep points (no other point at least as accurate with no more NFE), joined by
  straight lines (mixing two thresholds at random reaches any point in between). On it:
  - ``accuracy_at_matched_nfe``: the frontier's accuracy at the reference NFE (``None`` below its cheapest point;
    its best accuracy beyond its most expensive one);
  - ``nfe_at_matched_accuracy``: the fewest NFE at which the frontier reaches the reference accuracy (its cheapest
    point if that is already accurate enough; ``None``, "not reached", above its best accuracy);
  the reference is the same seed's warm-up model at the fixed threshold (paired), unless the grid's evaluation block
  sets ``matched_nfe`` / ``matched_accuracy``;
- ``learned_accuracy`` / ``learned_nfe``: with the sampler head's per-prompt threshold, where the run has one.

Over seeds: mean, sample standard deviation (n - 1; ``None`` for n = 1) and n, the number of seeds where the value
exists (a frontier that never reaches the reference accuracy lowers n for that column, and the table says so).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from typing import Any

from .records import WARMUP_NAME

SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
METRICS = (
    "accuracy",
    "mean_nfe",
    "accuracy_at_matched_nfe",
    "nfe_at_matched_accuracy",
    "learned_accuracy",
    "learned_nfe",
    "train_seconds",
)
# table columns: metric -> (header, scale, digits)
COLUMNS = {
    "accuracy": ("accuracy @ fixed (%)", 100.0, 1),
    "mean_nfe": ("NFE @ fixed", 1.0, 2),
    "accuracy_at_matched_nfe": ("accuracy @ matched NFE (%)", 100.0, 1),
    "nfe_at_matched_accuracy": ("NFE @ matched accuracy", 1.0, 2),
    "learned_accuracy": ("accuracy @ learned (%)", 100.0, 1),
    "learned_nfe": ("NFE @ learned", 1.0, 2),
    "train_seconds": ("RL time (s)", 1.0, 0),
}


def frontier(points: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """``(mean_nfe, accuracy)`` of the Pareto-optimal points, by increasing NFE (so also increasing accuracy)."""
    pairs = sorted({(float(p["mean_nfe"]), float(p["accuracy"])) for p in points})
    front: list[tuple[float, float]] = []
    for nfe, accuracy in pairs:  # ascending NFE (ties: ascending accuracy), keep strict accuracy improvements
        while front and front[-1][0] == nfe:
            front.pop()
        if not front or accuracy > front[-1][1]:
            front.append((nfe, accuracy))
    return front


def accuracy_at_nfe(front: list[tuple[float, float]], nfe: float) -> float | None:
    """The interpolated frontier's accuracy at ``nfe`` (see the module docstring)."""
    if not front or nfe < front[0][0]:
        return None
    for (x0, y0), (x1, y1) in zip(front, front[1:]):
        if x0 <= nfe <= x1:
            return y0 + (y1 - y0) * (nfe - x0) / (x1 - x0)
    return front[-1][1]


def nfe_at_accuracy(front: list[tuple[float, float]], accuracy: float) -> float | None:
    """The interpolated frontier's fewest NFE reaching ``accuracy`` (see the module docstring)."""
    if not front or accuracy > front[-1][1]:
        return None
    if accuracy <= front[0][1]:
        return front[0][0]
    for (x0, y0), (x1, y1) in zip(front, front[1:]):
        if y0 <= accuracy <= y1:
            return x0 + (x1 - x0) * (accuracy - y0) / (y1 - y0)
    return None  # pragma: no cover - unreachable for a valid front


def fixed_point(evaluation: dict[str, Any]) -> dict[str, Any]:
    """The sweep point at the fixed evaluation threshold."""
    fixed = float(evaluation["fixed_threshold"])
    for point in evaluation["points"]:
        if math.isclose(float(point["threshold"]), fixed, rel_tol=0, abs_tol=1e-12):
            return point
    raise ValueError(f"The evaluation has no point at the fixed threshold {fixed}.")


def run_metrics(record: dict[str, Any], reference: dict[str, Any] | None, grid_matched: dict | None = None):
    """The per-run values of :data:`METRICS` (``None`` where undefined)."""
    evaluation = record["evaluation"]
    point = fixed_point(evaluation)
    front = frontier(evaluation["points"])
    grid_matched = grid_matched or {}
    ref_point = fixed_point(reference["evaluation"]) if reference is not None else None
    matched_nfe = grid_matched.get("matched_nfe")
    matched_accuracy = grid_matched.get("matched_accuracy")
    if matched_nfe is None and ref_point is not None:
        matched_nfe = ref_point["mean_nfe"]
    if matched_accuracy is None and ref_point is not None:
        matched_accuracy = ref_point["accuracy"]
    learned = evaluation.get("learned")
    return {
        "accuracy": point["accuracy"],
        "mean_nfe": point["mean_nfe"],
        "accuracy_at_matched_nfe": None if matched_nfe is None else accuracy_at_nfe(front, float(matched_nfe)),
        "nfe_at_matched_accuracy": None
        if matched_accuracy is None
        else nfe_at_accuracy(front, float(matched_accuracy)),
        "learned_accuracy": learned["accuracy"] if learned else None,
        "learned_nfe": learned["mean_nfe"] if learned else None,
        "train_seconds": record.get("training", {}).get("seconds"),
        "matched_nfe": matched_nfe,
        "matched_accuracy": matched_accuracy,
    }


def mean_std_n(values: list[float | None]) -> dict[str, Any]:
    """``{"mean", "std", "n"}`` over the defined values (sample std; ``None`` when fewer than 2)."""
    defined = [float(v) for v in values if v is not None]
    return {
        "mean": statistics.fmean(defined) if defined else None,
        "std": statistics.stdev(defined) if len(defined) >= 2 else None,
        "n": len(defined),
    }


def summarise(records: list[dict[str, Any]], grid_matched: dict | None = None, order: list[str] | None = None):
    """The summary: per configuration, per-seed metrics and their mean/std/n, plus per-threshold sweep means."""
    references = {r["seed"]: r for r in records if r["configuration"]["name"] == WARMUP_NAME}
    by_name: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_name.setdefault(record["configuration"]["name"], []).append(record)
    names = [WARMUP_NAME] if WARMUP_NAME in by_name else []
    names += [n for n in (order or []) if n in by_name and n not in names]
    names += sorted(n for n in by_name if n not in names)
    rows = []
    for name in names:
        runs = sorted(by_name[name], key=lambda r: r["seed"])
        per_seed = {r["seed"]: run_metrics(r, references.get(r["seed"]), grid_matched) for r in runs}
        sweep: dict[float, dict[str, list[float]]] = {}
        for record in runs:
            for point in record["evaluation"]["points"]:
                entry = sweep.setdefault(float(point["threshold"]), {"accuracy": [], "mean_nfe": []})
                entry["accuracy"].append(point["accuracy"])
                entry["mean_nfe"].append(point["mean_nfe"])
        learned = [r["evaluation"]["learned"] for r in runs if r["evaluation"].get("learned")]
        rows.append(
            {
                "name": name,
                "description": runs[0]["configuration"].get("description", ""),
                "seeds": [r["seed"] for r in runs],
                "per_seed": {str(seed): values for seed, values in per_seed.items()},
                "metrics": {m: mean_std_n([values[m] for values in per_seed.values()]) for m in METRICS},
                "sweep": [
                    {
                        "threshold": threshold,
                        "accuracy": mean_std_n(values["accuracy"]),
                        "mean_nfe": mean_std_n(values["mean_nfe"]),
                    }
                    for threshold, values in sorted(sweep.items())
                ],
                "learned": None
                if not learned
                else {
                    "accuracy": mean_std_n([point["accuracy"] for point in learned]),
                    "mean_nfe": mean_std_n([point["mean_nfe"] for point in learned]),
                },
            }
        )
    return {"configurations": rows, "matched": grid_matched or {"reference": "warm-up model at the fixed threshold"}}


TARGET_NFE_SAVING = 0.20  # issue 13: >= 20% fewer NFE than the reference frontier at the learned point's accuracy


def learned_vs_reference(records: list[dict[str, Any]], reference: str) -> list[dict[str, Any]]:
    """Each head configuration's learned operating point against the same seed's ``reference`` frontier.

    Per seed, with the learned point ``(accuracy a, NFE n)`` and the reference configuration's frontier (e.g.
    model-only training at a fixed gamma, swept): ``reference_nfe``, the fewest NFE at which the reference reaches
    accuracy ``a`` (when ``a`` is above its best accuracy: the NFE of its most accurate point, a comparison the learned
    point wins on accuracy); ``nfe_saving = 1 - n / reference_nfe`` (the target is >= 20%); and
    ``accuracy_vs_reference``: ``a`` minus the reference frontier's accuracy at ``n`` (``None`` below its cheapest
    point). Returns one row per configuration with a learned point: per-seed values and mean / std / n.
    """
    references = {r["seed"]: r for r in records if r["configuration"]["name"] == reference}
    per_configuration: dict[str, dict[int, dict[str, Any]]] = {}
    for record in records:
        learned = record["evaluation"].get("learned")
        if not learned or record["seed"] not in references:
            continue
        front = frontier(references[record["seed"]]["evaluation"]["points"])
        accuracy, nfe = float(learned["accuracy"]), float(learned["mean_nfe"])
        reference_nfe = nfe_at_accuracy(front, accuracy)
        if reference_nfe is None and front:
            reference_nfe = front[-1][0]
        reference_accuracy = accuracy_at_nfe(front, nfe)
        saving = None if not reference_nfe else 1.0 - nfe / reference_nfe
        per_configuration.setdefault(record["configuration"]["name"], {})[record["seed"]] = {
            "learned_accuracy": accuracy,
            "learned_nfe": nfe,
            "reference_nfe": reference_nfe,
            "nfe_saving": saving,
            "accuracy_vs_reference": None if reference_accuracy is None else accuracy - reference_accuracy,
            "target_met": saving is not None and saving >= TARGET_NFE_SAVING - 1e-12,
        }
    rows = []
    for name, per_seed in per_configuration.items():
        keys = ("learned_accuracy", "learned_nfe", "reference_nfe", "nfe_saving", "accuracy_vs_reference")
        rows.append(
            {
                "name": name,
                "reference": reference,
                "seeds": sorted(per_seed),
                "per_seed": {str(seed): values for seed, values in sorted(per_seed.items())},
                "metrics": {key: mean_std_n([values[key] for values in per_seed.values()]) for key in keys},
                "target_met_seeds": sum(values["target_met"] for values in per_seed.values()),
            }
        )
    return rows


def learned_vs_reference_table(rows: list[dict[str, Any]]) -> str:
    """The learned-vs-reference rows as a markdown table (mean ± std over seeds)."""
    reference = rows[0]["reference"]
    lines = [
        f"| configuration | seeds | learned accuracy (%) | learned NFE | {reference} NFE at that accuracy | NFE saving (%) "
        f"| accuracy vs {reference} at that NFE (points) | seeds with saving >= {100 * TARGET_NFE_SAVING:.0f}% |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        seeds, m = len(row["seeds"]), row["metrics"]
        cells = [
            _cell(m["learned_accuracy"], 100.0, 1, seeds),
            _cell(m["learned_nfe"], 1.0, 2, seeds),
            _cell(m["reference_nfe"], 1.0, 2, seeds),
            _cell(m["nfe_saving"], 100.0, 1, seeds),
            _cell(m["accuracy_vs_reference"], 100.0, 1, seeds),
        ]
        lines.append(
            f"| {row['name']} | {seeds} | " + " | ".join(cells) + f" | {row['target_met_seeds']} of {seeds} |"
        )
    lines += [
        "",
        f"learned point vs the same seed's '{reference}' frontier (its swept thresholds); NFE saving = 1 - learned NFE / "
        f"the NFE at which '{reference}' reaches the learned accuracy (its most accurate point when it never does).",
    ]
    return "\n".join(lines) + "\n"


def _cell(stat: dict[str, Any], scale: float, digits: int, seeds: int) -> str:
    if stat["mean"] is None:
        return "-"
    text = f"{scale * stat['mean']:.{digits}f}"
    if stat["std"] is not None:
        text += f" ± {scale * stat['std']:.{digits}f}"
    if stat["n"] != seeds:
        text += f" (n={stat['n']})"
    return text


def markdown_table(summary: dict[str, Any], fixed_threshold: float | None = None) -> str:
    """The summary as a markdown table: mean ± std over seeds; ``(n=k)`` where a value exists for fewer seeds."""
    header = ["configuration", "seeds"] + [COLUMNS[m][0] for m in METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 2 + "---:|" * len(METRICS)]
    for row in summary["configurations"]:
        seeds = len(row["seeds"])
        cells = [_cell(row["metrics"][m], *COLUMNS[m][1:], seeds) for m in METRICS]
        lines.append(f"| {row['name']} | {seeds} | " + " | ".join(cells) + " |")
    notes = ["", "mean ± sample std over seeds; `(n=k)`: defined for k seeds only; `-`: not applicable / not reached."]
    if fixed_threshold is not None:
        notes.append(f"fixed evaluation threshold: entropy-bounded gamma = {fixed_threshold:g}.")
    matched = summary.get("matched") or {}
    if "matched_nfe" in matched or "matched_accuracy" in matched:
        notes.append(f"matched NFE / accuracy: {matched}.")
    else:
        notes.append("matched NFE / accuracy: the same seed's warm-up model at the fixed threshold (paired).")
    return "\n".join(lines + notes) + "\n"


def write_summary(summary: dict[str, Any], output_dir: str, fixed_threshold: float | None = None) -> dict[str, str]:
    """Write ``summary.json`` and ``summary.md``; returns their paths."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {"json": os.path.join(output_dir, SUMMARY_JSON), "md": os.path.join(output_dir, SUMMARY_MD)}
    with open(paths["json"], "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2)
    with open(paths["md"], "w", encoding="utf-8") as handle:
        handle.write(markdown_table(summary, fixed_threshold))
        if summary.get("learned_vs_reference"):
            handle.write("\n" + learned_vs_reference_table(summary["learned_vs_reference"]))
    return paths
