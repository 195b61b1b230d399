"""The demo's report: its headline rows, its targets and how RL moved the accuracy-vs-NFE frontier (from the two
held-out evaluations :func:`trl_diffpo.demo.run_demo` makes), and the printed table."""

from __future__ import annotations

# targets of the demo (issue 6): RL gains >= 10 accuracy points; the learned threshold matches the fixed one's accuracy
# with >= 20% fewer forward passes
TARGET_ACCURACY_GAIN = 0.10
TARGET_NFE_SAVING = 0.20


def summary_rows(before, after) -> list[dict]:
    """The demo's three headline rows: (a) warm-up + fixed, (b) RL + fixed, (c) RL + learned threshold."""
    fixed_label = next(r.label for r in before.settings if not r.learned)
    rows = []
    for name, results, label in (
        ("(a) warm-up model, fixed threshold", before, fixed_label),
        ("(b) DiFFPO model, fixed threshold", after, fixed_label),
        ("(c) DiFFPO model, learned threshold", after, "entropy_bounded:learned"),
    ):
        result = results.by_label(label)
        rows.append(
            {
                "name": name,
                "setting": label,
                "accuracy": result.accuracy,
                "mean_nfe": result.mean_nfe,
                "std_nfe": result.std_nfe,
                "mean_threshold": result.mean_threshold,
            }
        )
    return rows


def check_targets(rows: list[dict]) -> dict:
    """Whether the measured rows meet the demo's targets (accuracy gain; NFE saving at no accuracy loss)."""
    warm, rl_fixed, rl_learned = rows
    gain = rl_fixed["accuracy"] - warm["accuracy"]
    saving = 1 - rl_learned["mean_nfe"] / rl_fixed["mean_nfe"] if rl_fixed["mean_nfe"] > 0 else 0.0
    return {
        "accuracy_gain": gain,
        "accuracy_gain_met": gain >= TARGET_ACCURACY_GAIN,
        "learned_vs_fixed_accuracy": rl_learned["accuracy"] - rl_fixed["accuracy"],
        "nfe_saving": saving,
        "learned_threshold_met": rl_learned["accuracy"] >= rl_fixed["accuracy"] and saving >= TARGET_NFE_SAVING,
    }


def frontier_gain(before, after) -> dict:
    """How RL moved the fixed-threshold accuracy-vs-NFE frontier (learned-threshold points excluded).

    ``warmup_best_accuracy`` (the warm-up model's best accuracy over the sweep) and ``nfe_to_warmup_best``: the fewest
    NFE at which the DiFFPO model's frontier reaches it (``None``: not reached); ``accuracy_at_warmup_nfe``: the DiFFPO
    frontier's accuracy at the warm-up model's NFE at the fixed threshold (``None``: below its cheapest point). The
    frontier is :func:`trl_diffpo.ablation.summary.frontier` (Pareto points joined by straight lines).
    """
    from .ablation.summary import accuracy_at_nfe, frontier, nfe_at_accuracy

    def points(results):
        return [{"mean_nfe": r.mean_nfe, "accuracy": r.accuracy} for r in results.settings if not r.learned]

    warm_front, rl_front = frontier(points(before)), frontier(points(after))
    best_nfe, best_accuracy = warm_front[-1]
    warm_fixed = next(r for r in before.settings if not r.learned)  # the fixed setting is evaluated first
    return {
        "warmup_best_accuracy": best_accuracy,
        "warmup_best_nfe": best_nfe,
        "nfe_to_warmup_best": nfe_at_accuracy(rl_front, best_accuracy),
        "warmup_fixed_nfe": warm_fixed.mean_nfe,
        "accuracy_at_warmup_nfe": accuracy_at_nfe(rl_front, warm_fixed.mean_nfe),
    }


def format_frontier_gain(gain: dict) -> str:
    """The printed frontier line of :func:`frontier_gain`."""
    needed = gain["nfe_to_warmup_best"]
    reach = "not reached" if needed is None else f"{needed:.2f} NFE (warm-up: {gain['warmup_best_nfe']:.2f})"
    accuracy = gain["accuracy_at_warmup_nfe"]
    at_nfe = "-" if accuracy is None else f"{100 * accuracy:.1f}%"
    return (
        f"frontier: the DiFFPO model reaches the warm-up model's best accuracy ({100 * gain['warmup_best_accuracy']:.1f}"
        f"%) at {reach}; at the warm-up model's {gain['warmup_fixed_nfe']:.2f} NFE it solves {at_nfe}"
    )


def format_table(rows: list[dict]) -> str:
    """The printed summary table."""
    header = f"{'':<38} {'accuracy':>9} {'mean NFE':>9} {'threshold':>10}"
    lines = [header, "-" * len(header)]
    for row in rows:
        threshold = "-" if row["mean_threshold"] is None else f"{row['mean_threshold']:.3f}"
        lines.append(f"{row['name']:<38} {100 * row['accuracy']:>8.1f}% {row['mean_nfe']:>9.2f} {threshold:>10}")
    return "\n".join(lines)
