"""The sampler head's configuration (:class:`SamplerHeadConfig`, saved as JSON) and the constants shared by the package."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from ..samplers import ADAPTIVE_SAMPLERS, CONFIDENCE_THRESHOLD, ENTROPY_BOUNDED

HEAD_WEIGHTS_NAME = "sampler_head.safetensors"
HEAD_CONFIG_NAME = "sampler_head_config.json"
HEAD_ATTRIBUTE = "diffpo_sampler_head"  # the head's submodule name on the trained model
HEAD_FORMAT_VERSION = 1

MODES = ("joint", "sampler_only")
# What the policy reads: the pooled prompt only (one threshold per row), or also the state of every denoising step.
PROMPT_FEATURES = "prompt"
STATE_FEATURES = "state"
FEATURES = (PROMPT_FEATURES, STATE_FEATURES)
SIGMA_SCHEDULES = ("constant", "linear", "cosine")

# |u| is kept within this bound: sigmoid(8) = 0.99966, far enough from 0/1 that a float32 threshold maps back to u
# within ~1e-3, and wide enough that the head can reach (almost) both ends of the range.
U_BOUND = 8.0
# Added to the group std before dividing (TRL uses the same value for its own advantages).
ADVANTAGE_STD_EPS = 1e-4
# Default (low, high, initial) threshold per sampler. Entropy bound: transformers' DiffusionGemma decodes with an
# entropy bound of 0.1 nats. Confidence threshold: Fast-dLLM's 0.9.
DEFAULT_THRESHOLD_RANGES = {ENTROPY_BOUNDED: (0.0, 1.0, 0.1), CONFIDENCE_THRESHOLD: (0.5, 1.0, 0.9)}
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class SamplerHeadConfig:
    """Configuration of a :class:`SamplerHead` (saved as ``sampler_head_config.json``).

    Args:
        sampler: the adaptive sampler whose threshold the head sets: ``"entropy_bounded"`` (the head predicts the
            entropy bound gamma, in nats) or ``"confidence_threshold"`` (a confidence in (0, 1]).
        input_size: size of the pooled prompt hidden state (the backbone's hidden size). Filled in by
            :meth:`SamplerHeadCallback.setup` from the model config.
        mlp_hidden_size: width of the MLP's hidden layer; ``0`` makes the head a linear map.
        threshold_min: lowest threshold the head can output (default: 0.0 for gamma, 0.5 for confidence).
        threshold_max: highest threshold (default: 1.0 for gamma, 1.0 for confidence). Confidence thresholds must lie
            within [0, 1].
        init_threshold: threshold the head outputs for every prompt at initialisation (default: 0.1 for gamma, 0.9 for
            confidence); strictly inside the range.
        sigma: exploration noise, the standard deviation of the Gaussian over ``u`` (the logit of the position of the
            threshold within the range). 0.5 moves a mid-range threshold by about +-12% of the range.
        sigma_final: the standard deviation at the end of the annealing (``None``: no annealing).
        sigma_schedule: ``"constant"``, ``"linear"`` or ``"cosine"`` annealing from ``sigma`` to ``sigma_final``.
        sigma_anneal_steps: optimizer steps over which sigma anneals (``None``: the run's ``max_steps``).
        init_seed: seed of the MLP's initial weights (a forked RNG: the global RNG is untouched).
        features: what the policy reads. ``"prompt"``: the pooled prompt only, one threshold per rollout row.
            ``"state"``: a state-dependent policy deciding the threshold at every denoising step,
            ``mu(c, s) = MLP(layer_norm(h(c))) + Linear(step features s)`` (the features of
            :mod:`trl_diffpo.step_features`; the linear layer starts at zero, so the initial threshold is
            ``init_threshold`` at every step). Files saved before this field existed load as ``"prompt"``.
    """

    sampler: str = ENTROPY_BOUNDED
    input_size: int | None = None
    mlp_hidden_size: int = 256
    threshold_min: float | None = None
    threshold_max: float | None = None
    init_threshold: float | None = None
    sigma: float = 0.5
    sigma_final: float | None = None
    sigma_schedule: str = "constant"
    sigma_anneal_steps: int | None = None
    init_seed: int = 0
    features: str = PROMPT_FEATURES

    def __post_init__(self):
        if self.sampler not in ADAPTIVE_SAMPLERS:
            raise ValueError(
                f"SamplerHeadConfig.sampler={self.sampler!r}: a sampler head sets the threshold of an adaptive sampler, "
                f"choose one of {ADAPTIVE_SAMPLERS}."
            )
        low, high, init = DEFAULT_THRESHOLD_RANGES[self.sampler]
        self.threshold_min = float(low if self.threshold_min is None else self.threshold_min)
        self.threshold_max = float(high if self.threshold_max is None else self.threshold_max)
        if self.init_threshold is None:
            init = init if self.threshold_min < init < self.threshold_max else None
            self.init_threshold = init if init is not None else 0.5 * (self.threshold_min + self.threshold_max)
        self.init_threshold = float(self.init_threshold)
        self._validate()

    def _validate(self) -> None:
        low, high = self.threshold_min, self.threshold_max
        if not (math.isfinite(low) and math.isfinite(high) and 0 <= low < high):
            raise ValueError(
                f"The threshold range [{low}, {high}] must satisfy 0 <= threshold_min < threshold_max (finite)."
            )
        if self.sampler == CONFIDENCE_THRESHOLD and high > 1:
            raise ValueError(
                f"threshold_max={high} is above 1, but confidence thresholds are probabilities in (0, 1]: "
                "set threshold_max <= 1."
            )
        position = (self.init_threshold - low) / (high - low)
        lowest, highest = torch.sigmoid(torch.tensor([-U_BOUND, U_BOUND], dtype=torch.float64)).tolist()
        if not lowest <= position <= highest:
            raise ValueError(
                f"init_threshold={self.init_threshold} must lie strictly inside the range [{low}, {high}] "
                f"(at least {lowest:.1e} of the range away from either end)."
            )
        if self.input_size is not None and int(self.input_size) <= 0:
            raise ValueError(f"input_size must be a positive integer, got {self.input_size}.")
        if self.mlp_hidden_size < 0:
            raise ValueError(f"mlp_hidden_size must be >= 0 (0 = linear head), got {self.mlp_hidden_size}.")
        for name in ("sigma", "sigma_final"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0 (exploration noise in u-space), got {value}.")
        if self.features not in FEATURES:
            raise ValueError(
                f"features={self.features!r}; choose 'prompt' (one threshold per prompt) or 'state' (a threshold "
                "per denoising step from the decoding state)."
            )
        if self.sigma_schedule not in SIGMA_SCHEDULES:
            raise ValueError(f"sigma_schedule={self.sigma_schedule!r}; choose one of {SIGMA_SCHEDULES}.")
        if self.sigma_schedule != "constant" and self.sigma_final is None:
            raise ValueError(f"sigma_schedule={self.sigma_schedule!r} anneals towards sigma_final: set sigma_final.")
        if self.sigma_anneal_steps is not None and self.sigma_anneal_steps <= 0:
            raise ValueError(f"sigma_anneal_steps must be a positive number of steps, got {self.sigma_anneal_steps}.")

    @property
    def init_u(self) -> float:
        """The pre-sigmoid value ``u`` at which the head outputs ``init_threshold``."""
        position = (self.init_threshold - self.threshold_min) / (self.threshold_max - self.threshold_min)
        return math.log(position) - math.log1p(-position)

    def sigma_at(self, step: int, total_steps: int | None = None) -> float:
        """Exploration standard deviation after ``step`` optimizer steps.

        Annealing runs over ``sigma_anneal_steps`` (else ``total_steps``) and then stays at ``sigma_final``.
        """
        if self.sigma_schedule == "constant" or self.sigma_final is None:
            return float(self.sigma)
        horizon = self.sigma_anneal_steps or total_steps
        if not horizon or horizon <= 0:
            return float(self.sigma)
        progress = min(max(step / horizon, 0.0), 1.0)
        if self.sigma_schedule == "cosine":
            progress = 0.5 * (1 - math.cos(math.pi * progress))
        return float(self.sigma + (self.sigma_final - self.sigma) * progress)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SamplerHeadConfig:
        """Build from :meth:`to_dict` output; unknown keys raise (a file from another tool, or a typo)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown SamplerHeadConfig fields {unknown}; known fields: {sorted(known)}.")
        return cls(**values)

    def same_head_shape(self, other: SamplerHeadConfig) -> bool:
        """Whether a head with ``other``'s config has the same weights layout and the same threshold mapping."""
        keys = ("sampler", "input_size", "mlp_hidden_size", "threshold_min", "threshold_max", "features")
        return all(getattr(self, key) == getattr(other, key) for key in keys)

    @property
    def state_dependent(self) -> bool:
        """Whether the head decides a threshold per denoising step (``features="state"``)."""
        return self.features == STATE_FEATURES
