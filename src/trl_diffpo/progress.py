"""A one-line progress log: transformers prints every logged metric (about 50 with DiFFPO) into the progress bar.

:class:`CompactProgressCallback` replaces transformers' ``ProgressCallback`` and writes one short line per logging
step with the metrics a person watches (:data:`PROGRESS_METRICS`); every metric still reaches ``report_to``
(TensorBoard, W&B, ...) and ``trainer.state.log_history``. ``trl-diffpo train`` uses it; in Python call
``use_compact_progress(trainer)``.
"""

from __future__ import annotations

from transformers import ProgressCallback

# (logged key, short label) in display order; keys missing from a log are skipped
PROGRESS_METRICS = (
    ("loss", "loss"),
    ("reward", "reward"),
    ("diffusion/nfe/mean", "NFE"),
    ("diffusion/threshold/mean", "threshold"),
    ("diffpo/is_weight/clamped_frac", "IS clamped"),
    ("kl", "kl"),
    ("grad_norm", "grad norm"),
    ("learning_rate", "lr"),
)
EVAL_PREFIX = "eval_"


def format_progress_line(step: int, logs: dict) -> str:
    """``"step 3 | loss 0.0123 | reward 0.5 | NFE 12.5 ..."`` from one log dict (evaluation logs get ``eval``)."""
    evaluation = any(key.startswith(EVAL_PREFIX) for key in logs)
    prefix = EVAL_PREFIX if evaluation else ""
    parts = [f"{'eval ' if evaluation else ''}step {step}"]
    for key, label in PROGRESS_METRICS:
        value = logs.get(prefix + key)
        if isinstance(value, (int, float)):
            parts.append(f"{label} {value:.4g}")
    if "train_runtime" in logs:
        parts.append(f"train time {logs['train_runtime']:.1f}s")
    return " | ".join(parts)


class CompactProgressCallback(ProgressCallback):
    """transformers' progress bar, with one short line per log instead of the whole metrics dict."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            self.training_bar.write(format_progress_line(state.global_step, logs))


def use_compact_progress(trainer) -> None:
    """Swap ``trainer``'s ``ProgressCallback`` (present unless ``disable_tqdm``) for :class:`CompactProgressCallback`."""
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(CompactProgressCallback)
