"""The diffusion and importance-sampling metrics that :class:`~trl_diffpo.DiffpoTrainer` logs for every batch.

Each function returns ``{metric name: float}`` over all processes (``gather`` is the accelerator's, a collective:
every process must call it the same number of times).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from trl.trainer.utils import nanstd

from .generation import DiffusionGenerateOutput
from .likelihood import SurrogateDraws, token_stages

# A weight within this relative distance of the clamp counts as clamped.
CLAMP_TOLERANCE = 1e-6

Gather = Callable[[torch.Tensor], torch.Tensor]


def rollout_metrics(trace: DiffusionGenerateOutput, draws: SurrogateDraws, gather: Gather) -> dict[str, float]:
    """NFE, tokens per step and thresholds of the rollouts; the surrogate's mean tau and forwards per sample."""
    metrics = {}
    nfe = gather(trace.nfe.float())
    metrics["diffusion/nfe/mean"] = nfe.mean().item()
    metrics["diffusion/nfe/min"] = nfe.min().item()
    metrics["diffusion/nfe/max"] = nfe.max().item()
    metrics["diffusion/tokens_per_step"] = gather(trace.tokens_per_step).mean().item()
    threshold = gather(trace.threshold.float())
    threshold = threshold[~torch.isnan(threshold)]
    if threshold.numel() > 0:  # fixed-schedule samplers have no threshold
        metrics["diffusion/threshold/mean"] = threshold.mean().item()
        metrics["diffusion/threshold/std"] = nanstd(threshold).item() if threshold.numel() > 1 else 0.0
        metrics["diffusion/threshold/min"] = threshold.min().item()
        metrics["diffusion/threshold/max"] = threshold.max().item()
    metrics["diffpo/tau/mean"] = gather(draws.tau.float().mean()[None]).mean().item()
    num_stages = draws.stage_starts.shape[-1]
    used_stages = torch.stack(
        [
            torch.nn.functional.one_hot(token_stages(trace.unmask_step, draws.stage_starts[:, it]), num_stages)
            .any(1)
            .sum(-1)
            for it in range(draws.stage_starts.shape[1])
        ]
    )
    metrics["diffpo/surrogate_forwards"] = gather(used_stages.float().mean()[None]).mean().item()
    return metrics


def importance_weight_metrics(
    weight: torch.Tensor, log_ratio: torch.Tensor, loss_mask: torch.Tensor, clamp: float, gather: Gather
) -> dict[str, float]:
    """Mean, max and clamped fraction of the IS weights, and the mean surrogate-minus-behaviour log-prob gap, over the
    tokens in ``loss_mask`` (``weight`` and ``log_ratio`` of one shape, ``loss_mask`` broadcastable to it)."""
    mask = loss_mask.expand_as(weight).bool()
    gap = log_ratio.masked_fill(~mask, 0.0)
    clamped = (weight >= clamp * (1 - CLAMP_TOLERANCE)) & mask
    local = torch.stack([weight.masked_fill(~mask, 0.0).sum(), clamped.sum().float(), gap.sum(), mask.sum().float()])
    totals = gather(local[None]).sum(0)
    denominator = totals[3].clamp(min=1.0)
    largest = weight.masked_fill(~mask, 0.0).amax() if mask.any() else weight.new_zeros(())
    return {
        "diffpo/is_weight/mean": (totals[0] / denominator).item(),
        "diffpo/is_weight/clamped_frac": (totals[1] / denominator).item(),
        "diffpo/logp_gap/mean": (totals[2] / denominator).item(),
        "diffpo/is_weight/max": gather(largest[None]).max().item(),
    }
