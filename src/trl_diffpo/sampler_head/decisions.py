"""A state-dependent head's recorded decisions at training time: checking what the trainer hands to the loss, and the
per-decision metrics. (The decisions themselves are recorded by :mod:`trl_diffpo.step_features`.)"""

from __future__ import annotations

import torch

from ..step_features import STEP_FEATURE_NAMES
from .network import SamplerHead


def check_decisions(
    head: SamplerHead,
    prompt_hidden: torch.Tensor,
    step_features: torch.Tensor | None,
    step_threshold: torch.Tensor | None,
    step_valid: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(step_features, step_valid as bool)`` for a state head, ``None`` for a prompt head; clear errors else."""
    given = [value is not None for value in (step_features, step_threshold, step_valid)]
    if not head.config.state_dependent:
        if any(given):
            raise ValueError("head_loss got step decisions, but the head reads the prompt only (features='prompt').")
        return None
    if not all(given):
        raise ValueError(
            "The sampler head is state-dependent (features='state'): head_loss needs the rollouts' step_features, "
            "step_threshold and step_valid (DiffusionGenerateOutput.step_*, decoded with step_threshold_fn)."
        )
    rows = prompt_hidden.shape[0]
    if step_features.dim() != 3 or step_threshold.shape != step_features.shape[:2] or step_features.shape[0] != rows:
        raise ValueError(
            f"head_loss got step_features {tuple(step_features.shape)} and step_threshold "
            f"{tuple(step_threshold.shape)} for {rows} rows; expected (rows, steps, F) and (rows, steps)."
        )
    if tuple(step_valid.shape) != tuple(step_threshold.shape):
        raise ValueError(
            f"step_valid has shape {tuple(step_valid.shape)}, step_threshold {tuple(step_threshold.shape)}."
        )
    return step_features, torch.as_tensor(step_valid).bool()


def decision_metrics(head: SamplerHead, decided: torch.Tensor, valid: torch.Tensor) -> dict[str, float]:
    """Per-decision metrics of a state head's batch: decisions per row, the within-row spread of the thresholds
    (averaged over rows with two or more decisions) and the step layer's weight on each feature."""
    weights = valid.float()
    count = weights.sum(1)
    mean = (decided * weights).sum(1) / count.clamp(min=1)
    variance = ((decided - mean[:, None]).square() * weights).sum(1) / (count - 1).clamp(min=1)
    spread_rows = count > 1
    metrics = {
        "decisions_per_row": float(count.mean()),
        "threshold_row_std": float(variance[spread_rows].sqrt().mean()) if bool(spread_rows.any()) else 0.0,
    }
    step_weight = head.step_layer.weight.detach().float().flatten().tolist()
    metrics.update({f"step_weight/{name}": value for name, value in zip(STEP_FEATURE_NAMES, step_weight, strict=True)})
    return metrics
