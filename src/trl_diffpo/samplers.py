"""Unmasking rules: which masked positions of the current block to commit at one denoising step.

Each rule is a small vectorised function over a batch of rows and the ``block_length`` positions of each row's
current block. Inputs shared by all rules:

- ``candidates``: ``(rows, block)`` bool, the positions still masked (only these may be committed);
- ``confidence``: ``(rows, block)`` probability of the proposed token under the distribution that proposed it;
- ``entropy``: ``(rows, block)`` entropy of that distribution;
- ``num_tokens``: ``(rows,)`` tokens to commit this step (fixed-schedule rules);
- ``threshold``: ``(rows,)`` per-row threshold (adaptive rules).

Every rule returns a ``(rows, block)`` bool mask, a subset of ``candidates``, committing at least one position in
every row that has a candidate. No per-token Python loops: ranks come from one ``argsort`` per step.
"""

from __future__ import annotations

import torch

LOW_CONFIDENCE = "low_confidence"
RANDOM = "random"
CONFIDENCE_THRESHOLD = "confidence_threshold"
ENTROPY_BOUNDED = "entropy_bounded"

FIXED_SCHEDULE_SAMPLERS = (LOW_CONFIDENCE, RANDOM)
ADAPTIVE_SAMPLERS = (CONFIDENCE_THRESHOLD, ENTROPY_BOUNDED)
SAMPLERS = FIXED_SCHEDULE_SAMPLERS + ADAPTIVE_SAMPLERS


def sort_candidates(scores: torch.Tensor, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Order candidates by descending score; non-candidates come after all candidates.

    Returns ``(order, ranks)``: ``order[row, r]`` is the position of rank ``r`` and ``ranks[row, pos]`` the rank
    (0 = best) of position ``pos``. Ties are broken by position (stable sort), so the result is deterministic.
    """
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    # Second stable pass on the candidate flag alone: candidates first even when a candidate's score is -inf or nan.
    order = order.gather(-1, torch.sort((~candidates).gather(-1, order).byte(), dim=-1, stable=True).indices)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return order, ranks


def rank_descending(scores: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Rank (0 = best) of every position by descending score; see :func:`sort_candidates`."""
    return sort_candidates(scores, candidates)[1]


def select_top_k(scores: torch.Tensor, candidates: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
    """Commit the ``num_tokens[row]`` candidates with the highest score (low-confidence remasking / random)."""
    num_tokens = torch.minimum(num_tokens, candidates.sum(-1)).clamp(min=1)
    return candidates & (rank_descending(scores, candidates) < num_tokens[:, None])


def select_confidence_threshold(
    confidence: torch.Tensor, candidates: torch.Tensor, threshold: torch.Tensor
) -> torch.Tensor:
    """Commit every candidate whose confidence is at least ``threshold[row]``, and always the most confident one."""
    above = candidates & (confidence >= threshold[:, None])
    best = candidates & (rank_descending(confidence, candidates) == 0)
    return above | best


def select_entropy_bounded(entropy: torch.Tensor, candidates: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Entropy-bounded (EB) sampler: with candidates sorted by entropy ascending, commit the longest prefix whose summed
    entropy minus its largest entropy (the last one of the prefix) is at most ``threshold[row]`` (gamma); at least one.
    """
    order, ranks = sort_candidates(-entropy, candidates)  # rank 0 = lowest entropy
    sorted_entropy = entropy.gather(-1, order)
    sorted_valid = candidates.gather(-1, order)
    sorted_entropy = torch.where(sorted_valid, sorted_entropy, torch.zeros_like(sorted_entropy))
    entropy_before = sorted_entropy.cumsum(-1) - sorted_entropy  # sum of the strictly smaller-ranked entropies
    fits = sorted_valid & (entropy_before <= threshold[:, None])
    num_tokens = fits.sum(-1).clamp(min=1)
    return candidates & (ranks < num_tokens[:, None])


def fixed_schedule(block_length: int, steps_per_block: int) -> list[int]:
    """Tokens committed at each step of a block for the fixed-schedule samplers: as even as possible, the remainder
    going to the first steps (e.g. block 32 over 5 steps -> [7, 7, 6, 6, 6])."""
    base, remainder = divmod(block_length, steps_per_block)
    return [base + (1 if step < remainder else 0) for step in range(steps_per_block)]


def check_threshold(threshold: torch.Tensor, sampler: str) -> None:
    """Raise a ``ValueError`` naming the first per-row threshold out of ``sampler``'s range (no-op for fixed ones)."""
    if sampler == CONFIDENCE_THRESHOLD:
        bad = ~((threshold > 0) & (threshold <= 1))
        valid = "(0, 1]"
    elif sampler == ENTROPY_BOUNDED:
        bad = ~(torch.isfinite(threshold) & (threshold >= 0))
        valid = "[0, inf) (gamma, in nats)"
    else:
        return
    if bad.any():
        value = threshold[bad][0].item()
        raise ValueError(f"threshold={value} is out of range for sampler={sampler!r}: valid range is {valid}.")
