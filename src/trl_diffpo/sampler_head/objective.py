"""The sampler head's RL objective: group-relative advantages of the sampler reward, the PPO-clipped surrogate, and
the correlation used by its rollout metrics. Pure tensor functions (no trainer, no head)."""

from __future__ import annotations

import torch

from .config import ADVANTAGE_STD_EPS


def group_relative_sampler_advantages(
    rewards: torch.Tensor,
    nfe: torch.Tensor,
    gen_length: int,
    num_generations: int,
    nfe_penalty: float,
    scale_advantages: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-relative advantage of the sampler reward ``reward - nfe_penalty * nfe / gen_length``.

    Args:
        rewards: ``(N,)`` rewards of all rollouts (groups of ``num_generations`` consecutive rows as in TRL); NaN rows
            (unscorable) get advantage 0 and do not enter the baseline.
        nfe: ``(N,)`` forward passes of each rollout.
        gen_length: completion length (normalises NFE to "forward passes per token").
        num_generations: G, the group size.
        nfe_penalty: lambda.
        scale_advantages: divide the group-centred reward by the group std + 1e-4.

    Returns:
        ``(advantages, sampler_reward)``: both ``(N,)`` float32.
    """
    rewards = torch.as_tensor(rewards).float().flatten()
    nfe = torch.as_tensor(nfe).to(rewards.device).float().flatten()
    if rewards.numel() != nfe.numel():
        raise ValueError(f"rewards has {rewards.numel()} values but nfe has {nfe.numel()}.")
    if num_generations <= 0 or rewards.numel() % num_generations != 0:
        raise ValueError(f"{rewards.numel()} rollouts do not split into groups of num_generations={num_generations}.")
    if gen_length <= 0:
        raise ValueError(f"gen_length must be positive, got {gen_length}.")
    sampler_reward = (rewards - nfe_penalty * nfe / gen_length).view(-1, num_generations)
    valid = torch.isfinite(sampler_reward)
    count = valid.sum(1, keepdim=True)
    filled = torch.where(valid, sampler_reward, torch.zeros_like(sampler_reward))
    mean = filled.sum(1, keepdim=True) / count.clamp(min=1)
    centred = torch.where(valid, sampler_reward - mean, torch.zeros_like(sampler_reward))
    if scale_advantages:
        variance = centred.square().sum(1, keepdim=True) / (count - 1).clamp(min=1)
        centred = centred / (variance.sqrt() + ADVANTAGE_STD_EPS)
    return centred.flatten(), sampler_reward.flatten()


def clipped_surrogate(
    log_prob: torch.Tensor,
    behaviour_log_prob: torch.Tensor | None,
    advantages: torch.Tensor,
    clip_epsilon: float | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-decision surrogate objective (to maximise), unreduced.

    With ``clip_epsilon`` and a behaviour log-prob: PPO's ``min(rho A, clip(rho, 1 - eps, 1 + eps) A)`` with
    ``rho = exp(log_prob - behaviour_log_prob)``; otherwise REINFORCE's ``A * log_prob``. Both have the same gradient
    while the policy equals the behaviour policy.

    Returns:
        ``(objective, diagnostics)``: ``objective`` has ``log_prob``'s shape; ``diagnostics`` holds the detached
        ``ratio`` and the bool ``is_clipped`` (empty for REINFORCE).
    """
    if clip_epsilon is None or behaviour_log_prob is None:
        return advantages * log_prob, {}
    ratio = torch.exp(log_prob - behaviour_log_prob.to(log_prob.device))
    clipped = ratio.clamp(1 - clip_epsilon, 1 + clip_epsilon)
    objective = torch.minimum(ratio * advantages, clipped * advantages)
    is_clipped = (ratio * advantages) > (clipped * advantages)
    return objective, {"ratio": ratio.detach(), "is_clipped": is_clipped}


def pearson(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Pearson correlation over the rows where both are finite; ``None`` when undefined (< 2 rows, zero variance)."""
    x, y = x.double().flatten(), y.double().flatten()
    keep = torch.isfinite(x) & torch.isfinite(y)
    x, y = x[keep], y[keep]
    if x.numel() < 2:
        return None
    x, y = x - x.mean(), y - y.mean()
    denominator = (x.square().sum() * y.square().sum()).sqrt()
    if denominator.item() <= 0:
        return None
    return float((x * y).sum() / denominator)
