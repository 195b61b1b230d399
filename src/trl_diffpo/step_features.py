"""What a state-dependent threshold policy sees at one denoising step: a small, fixed vector per row.

:func:`trl_diffpo.generation.diffusion_generate` computes these from what the step already has (the row's canvas and
the log-probabilities of its current block) and passes them to ``step_threshold_fn`` before the sampler selects
positions. All features lie in ``[0, 1]``:

========================  ==========================================================================================
``decoded_fraction``      fraction of the completion's positions already committed (before this step)
``block_position``        the row's current block index / number of blocks (0 for the first block)
``block_masked_fraction`` fraction of the current block's positions still masked
``entropy_mean``          mean entropy of the still-masked positions of the current block, divided by ``log(V - 1)``
``entropy_max``           their largest entropy (same normalisation)
``entropy_min``           their smallest entropy (same normalisation)
``confidence_mean``       mean over the still-masked positions of the top-1 probability
``confidence_max``        largest top-1 probability among them
========================  ==========================================================================================

Entropies and probabilities are those of the distribution the sampler draws from (``softmax(logits / temperature)``
with ``[MASK]`` excluded, :func:`~trl_diffpo.generation.policy_log_softmax`); ``V - 1`` tokens remain once ``[MASK]``
is excluded, so the normalised entropy of a uniform distribution is 1. The confidence is the top-1 probability (what
the confidence-threshold sampler compares at temperature 0), not the probability of the token drawn at this step, so
the features do not depend on the sampling noise.
"""

from __future__ import annotations

import math

import torch

from .samplers import ADAPTIVE_SAMPLERS, check_threshold

STEP_FEATURE_NAMES = (
    "decoded_fraction",
    "block_position",
    "block_masked_fraction",
    "entropy_mean",
    "entropy_max",
    "entropy_min",
    "confidence_mean",
    "confidence_max",
)
NUM_STEP_FEATURES = len(STEP_FEATURE_NAMES)


def block_entropy(block_logprobs: torch.Tensor) -> torch.Tensor:
    """``(rows, block)`` entropy in nats of each position's distribution (``-inf`` log-probs contribute 0)."""
    # p log p with 0 * (-inf) = nan -> 0 at the excluded [MASK] (several times cheaper than xlogy's second log)
    return -(block_logprobs.exp() * block_logprobs).nan_to_num_(nan=0.0).sum(-1)


def step_features(
    block_logprobs: torch.Tensor,
    candidates: torch.Tensor,
    completion: torch.LongTensor,
    mask_token_id: int,
    block_index: torch.Tensor,
    num_blocks: int,
    entropy: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ``(rows, NUM_STEP_FEATURES)`` float32 features of one step, in the order of :data:`STEP_FEATURE_NAMES`.

    Args:
        block_logprobs: ``(rows, block, vocab)`` float32 log-probabilities of the current block's positions.
        candidates: ``(rows, block)`` bool, the block's still-masked positions (at least one per decoding row; a row
            without any gets 0 for the entropy and confidence features).
        completion: ``(rows, gen_length)`` the completion part of the canvas before this step's commit.
        mask_token_id: the ``[MASK]`` id.
        block_index: ``(rows,)`` the current block of each row.
        num_blocks: blocks per completion.
        entropy: ``(rows, block)`` :func:`block_entropy` of ``block_logprobs`` when the caller has it already.
    """
    if entropy is None:
        entropy = block_entropy(block_logprobs)
    entropy = entropy / math.log(max(block_logprobs.shape[-1] - 1, 2))
    confidence = block_logprobs.max(-1).values.exp()
    weights = candidates.float()
    count = weights.sum(-1)
    per_position_mean = count.clamp(min=1)
    has_any = count > 0

    def masked_reduce(values: torch.Tensor, fill: float, reduce) -> torch.Tensor:
        return torch.where(has_any, reduce(torch.where(candidates, values, fill)), 0.0)

    features = [
        (completion != mask_token_id).float().mean(-1),
        block_index.float() / num_blocks,
        count / candidates.shape[-1],
        (entropy * weights).sum(-1) / per_position_mean,
        masked_reduce(entropy, -math.inf, lambda v: v.max(-1).values),
        masked_reduce(entropy, math.inf, lambda v: v.min(-1).values),
        (confidence * weights).sum(-1) / per_position_mean,
        masked_reduce(confidence, -math.inf, lambda v: v.max(-1).values),
    ]
    return torch.stack(features, dim=-1).float()


def check_threshold_sources(sampler: str, threshold, threshold_fn, step_threshold_fn) -> None:
    """At most one of ``threshold_fn`` / ``step_threshold_fn``, only for adaptive samplers, never with a ``threshold``
    next to a ``step_threshold_fn``."""
    for name, value in (("threshold_fn", threshold_fn), ("step_threshold_fn", step_threshold_fn)):
        if value is not None and sampler not in ADAPTIVE_SAMPLERS:
            raise ValueError(f"{name} only applies to the adaptive samplers {ADAPTIVE_SAMPLERS}, not {sampler!r}.")
    if step_threshold_fn is not None and (threshold_fn is not None or threshold is not None):
        raise ValueError(
            "step_threshold_fn decides the threshold at every step: pass it alone, without `threshold` or "
            "`threshold_fn` (a per-row threshold goes through `threshold`, a per-prompt head through `threshold_fn`)."
        )


def call_step_threshold_fn(step_threshold_fn, prompt_hidden, features: torch.Tensor, sampler: str) -> torch.Tensor:
    """The ``(rows,)`` float32 thresholds ``step_threshold_fn`` returns for one step, checked."""
    rows = features.shape[0]
    threshold = torch.as_tensor(step_threshold_fn(prompt_hidden, features), dtype=torch.float32)
    if threshold.numel() != rows:
        raise ValueError(
            f"step_threshold_fn must return one threshold per active row, shape ({rows},); got a tensor of shape "
            f"{tuple(threshold.shape)}."
        )
    threshold = threshold.reshape(rows).detach().to(features.device)
    check_threshold(threshold, sampler)
    return threshold


class StepDecisions:
    """The trace of a state-dependent policy: the features and threshold of every step of every row.

    A row takes at most ``gen_length`` steps (each commits at least one token), so step ``t`` (1-based) of a row is
    stored at index ``t - 1`` of its ``(gen_length,)`` slots; ``valid`` marks the slots that hold a decision.
    """

    def __init__(self, batch_size: int, gen_length: int, device: torch.device):
        self.features = torch.zeros(batch_size, gen_length, NUM_STEP_FEATURES, dtype=torch.float32, device=device)
        self.threshold = torch.full((batch_size, gen_length), float("nan"), dtype=torch.float32, device=device)
        self.valid = torch.zeros(batch_size, gen_length, dtype=torch.bool, device=device)

    def record(self, rows: torch.Tensor, step: torch.Tensor, features: torch.Tensor, threshold: torch.Tensor) -> None:
        """Store the decisions of ``rows`` (batch indices) at their 1-based ``step`` (both ``(rows,)``)."""
        slot = step - 1
        self.features[rows, slot] = features
        self.threshold[rows, slot] = threshold
        self.valid[rows, slot] = True

    def row_mean_threshold(self) -> torch.Tensor:
        """``(batch,)`` mean threshold of each row's decisions (``nan`` for a row without any)."""
        total = torch.where(self.valid, self.threshold, 0.0).sum(-1)
        return total / self.valid.sum(-1)
