"""Exact token draws from ``softmax`` distributions over a large vocabulary (inverse-CDF sampling).

Used by :func:`trl_diffpo.generation.diffusion_generate` at ``temperature > 0``. It replaces float32 Gumbel-max, whose
noise is capped near 16.6 and so undersamples tail tokens (see :func:`sample_from_log_probs`).
"""

from __future__ import annotations

import torch

# Inverse-CDF sampling works on buckets of this many vocabulary entries: the bucket masses are summed once per position,
# their running sum is taken in float64, and only the one chosen bucket is expanded into a float64 running sum.
_CDF_BUCKET = 256


def sample_from_log_probs(log_probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Exact draws from ``softmax`` distributions by inverse-CDF sampling.

    ``log_probs`` is ``(..., vocab)`` (normalised log-probabilities, e.g. :func:`policy_log_softmax`); ``uniforms`` is
    ``(..., draws)`` float64 in ``[0, 1)``, one per draw. Returns ``(..., draws)`` token ids: token ``v`` is drawn with
    probability ``exp(log_probs[..., v])`` up to the float32 rounding of those probabilities; a token of probability 0
    (the excluded ``[MASK]``) is never drawn.

    Why not Gumbel-max: with float32 uniforms the Gumbel noise is capped near 16.6, so a tail token whose log-prob is
    more than ~16 below the head's is (almost) never drawn: at a 126k vocabulary with a 0.99 head the tail is drawn
    ~0.7% of the time instead of 1%, a lower effective temperature than the one the trace records. Inverse-CDF
    sampling needs one float64 uniform per draw instead of one per vocabulary entry. Memory: the float32
    probabilities (one slab like ``log_probs``), ``vocab / 256`` float64 bucket sums per row, and one float64 bucket of
    256 per draw, never a float64 copy of the slab.
    """
    vocab = log_probs.shape[-1]
    leading = log_probs.shape[:-1]
    probs = log_probs.reshape(-1, vocab).exp()  # (rows, vocab) float32
    rows = probs.shape[0]
    uniforms = uniforms.reshape(rows, -1).to(torch.float64)  # (rows, draws)
    full = vocab - vocab % _CDF_BUCKET
    bucket_mass = [probs[:, :full].reshape(rows, -1, _CDF_BUCKET).sum(-1)] if full else []
    if full < vocab:
        bucket_mass.append(probs[:, full:].sum(-1, keepdim=True))
    bucket_mass = torch.cat(bucket_mass, dim=-1).double()  # (rows, buckets)
    bucket_cdf = bucket_mass.cumsum(-1)
    target = _below(uniforms * bucket_cdf[:, -1:], bucket_cdf[:, -1:])
    bucket = torch.searchsorted(bucket_cdf, target, right=True)  # first bucket whose running sum exceeds the target
    mass_before = torch.where(bucket > 0, bucket_cdf.gather(-1, (bucket - 1).clamp(min=0)), 0.0)
    fraction = (target - mass_before) / bucket_mass.gather(-1, bucket)  # where in its bucket the target falls
    token = bucket[..., None] * _CDF_BUCKET + torch.arange(_CDF_BUCKET, device=probs.device)  # (rows, draws, bucket)
    in_vocab = token < vocab
    bucket_probs = probs.gather(-1, token.clamp(max=vocab - 1).flatten(1)).view(token.shape)
    local_cdf = torch.where(in_vocab, bucket_probs, 0.0).double().cumsum(-1)
    local_target = _below(fraction * local_cdf[..., -1], local_cdf[..., -1])
    offset = torch.searchsorted(local_cdf, local_target[..., None], right=True).squeeze(-1)
    return (bucket * _CDF_BUCKET + offset).view(*leading, -1)


def _below(value: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """``value`` clamped strictly below ``bound`` (a rounding guard: ``u * total`` can round up to ``total``)."""
    return torch.minimum(value, torch.nextafter(bound, torch.zeros_like(bound)).expand_as(value))
