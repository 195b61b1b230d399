"""The sampler head network: a Gaussian policy over the decoding threshold of a prompt (sample / log_prob / predict)."""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from ..step_features import NUM_STEP_FEATURES
from .config import _LOG_SQRT_2PI, U_BOUND, SamplerHeadConfig


class SamplerHead(nn.Module):
    """Maps a pooled prompt hidden state to a Gaussian policy over the decoding threshold of that prompt.

    ``mu(c) = MLP(layer_norm(h(c)))`` in u-space; threshold ``= low + (high - low) * sigmoid(u)``. The input is
    detached (no gradient ever reaches the dLLM) and cast to the head's dtype: the head trains in float32 beside a bf16
    backbone, and in bf16 only under ZeRO-3 (which refuses mixed dtypes); the Gaussian's log-density is computed in float32. The last layer
    starts at zero weight and bias ``u0``, so every prompt initially gets exactly ``config.init_threshold``.

    A state-dependent head (``config.features == "state"``) adds a linear map of the step features
    (:mod:`trl_diffpo.step_features`): ``mu(c, s) = MLP(layer_norm(h(c))) + step_layer(s)``, decided at every denoising
    step. ``step_layer`` starts at zero weight and bias, so it initially outputs exactly what the prompt head would.
    Every method then takes ``step_features``: ``(batch, F)`` for one decision per row, or ``(batch, steps, F)``.

    Attributes:
        exploration_sigma: the standard deviation currently used by :meth:`sample` and :meth:`log_prob` (set by the
            callback from the annealing schedule; starts at ``config.sigma``).
    """

    def __init__(self, config: SamplerHeadConfig):
        super().__init__()
        if config.input_size is None:
            raise ValueError(
                "SamplerHeadConfig.input_size is not set: pass the backbone's hidden size "
                "(SamplerHeadCallback.setup fills it in from the model config)."
            )
        self.config = config
        size, width = int(config.input_size), int(config.mlp_hidden_size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.init_seed)
            if width > 0:
                self.mlp = nn.Sequential(nn.Linear(size, width), nn.SiLU(), nn.Linear(width, 1))
            else:
                self.mlp = nn.Sequential(nn.Linear(size, 1))
            # created after the MLP: a prompt and a state head of the same seed share the MLP's initial weights
            self.step_layer = nn.Linear(NUM_STEP_FEATURES, 1) if config.state_dependent else None
        if self.step_layer is not None:
            nn.init.zeros_(self.step_layer.weight)
            nn.init.zeros_(self.step_layer.bias)
        output_layer = self.mlp[-1]
        nn.init.zeros_(output_layer.weight)
        nn.init.constant_(output_layer.bias, config.init_u)
        self.exploration_sigma = float(config.sigma)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, prompt_hidden: torch.Tensor, step_features: torch.Tensor | None = None) -> torch.Tensor:
        """float32 mean of the Gaussian over ``u``: ``(batch,)`` ``mu(c)`` for ``(batch, hidden)`` pooled prompts; for a
        state head ``mu(c, s)`` of the shape of ``step_features`` without its last dimension."""
        if prompt_hidden.dim() != 2 or prompt_hidden.shape[-1] != self.config.input_size:
            raise ValueError(
                f"prompt_hidden must have shape (batch, {self.config.input_size}) (pooled prompt hidden states), got "
                f"{tuple(prompt_hidden.shape)}."
            )
        self._check_step_features(prompt_hidden, step_features)
        features = prompt_hidden.detach().float()
        features = nn.functional.layer_norm(features, features.shape[-1:])  # in float32: hidden states can be large
        mu = self.mlp(features.to(device=self.device, dtype=self.dtype)).squeeze(-1).float()
        if self.step_layer is None:
            return mu
        step = self.step_layer(step_features.detach().to(device=self.device, dtype=self.dtype)).squeeze(-1).float()
        return (mu if step.dim() == 1 else mu[:, None]) + step

    def _check_step_features(self, prompt_hidden: torch.Tensor, step_features: torch.Tensor | None) -> None:
        if self.step_layer is None:
            if step_features is not None:
                raise ValueError(
                    "This sampler head reads the prompt only (features='prompt'): it takes no step_features. Decode "
                    "with diffusion_generate(threshold_fn=head.predict_threshold)."
                )
            return
        if step_features is None:
            raise ValueError(
                "This sampler head is state-dependent (features='state'): it decides a threshold at every denoising "
                "step and needs the step features. Decode with diffusion_generate(step_threshold_fn="
                "head.predict_threshold) (or SamplerHeadCallback / evaluation, which do that)."
            )
        if step_features.dim() not in (2, 3) or step_features.shape[0] != prompt_hidden.shape[0]:
            raise ValueError(
                f"step_features must have shape ({prompt_hidden.shape[0]}, {NUM_STEP_FEATURES}) or "
                f"({prompt_hidden.shape[0]}, steps, {NUM_STEP_FEATURES}), got {tuple(step_features.shape)}."
            )
        if step_features.shape[-1] != NUM_STEP_FEATURES:
            raise ValueError(
                f"step_features has {step_features.shape[-1]} features per step, the head expects "
                f"{NUM_STEP_FEATURES} (trl_diffpo.step_features.STEP_FEATURE_NAMES)."
            )

    # -- threshold <-> u ---------------------------------------------------------------------------------------------

    def threshold_from_u(self, u: torch.Tensor) -> torch.Tensor:
        """float32 threshold ``low + (high - low) * sigmoid(u)``."""
        low, high = self.config.threshold_min, self.config.threshold_max
        return (low + (high - low) * torch.sigmoid(u.double())).float()

    def u_from_threshold(self, threshold: torch.Tensor) -> torch.Tensor:
        """float32 ``u = logit((threshold - low) / (high - low))``, clamped to ``[-U_BOUND, U_BOUND]``.

        Raises:
            ValueError: for a non-finite threshold (e.g. a row decoded with a fixed-schedule sampler).
        """
        threshold = threshold.detach().double()
        if not bool(torch.isfinite(threshold).all()):
            raise ValueError(
                "The sampler head got a non-finite threshold: every row must have been decoded with a threshold the "
                f"head drew (sampler {self.config.sampler!r}), not a fixed-schedule sampler."
            )
        low, high = self.config.threshold_min, self.config.threshold_max
        position = ((threshold - low) / (high - low)).clamp(0.0, 1.0)
        u = torch.log(position) - torch.log1p(-position)
        return u.clamp(-U_BOUND, U_BOUND).float()

    # -- the policy --------------------------------------------------------------------------------------------------

    def _sigma(self, sigma: float | None) -> float:
        sigma = self.exploration_sigma if sigma is None else float(sigma)
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"The exploration sigma must be a finite number > 0, got {sigma}.")
        return sigma

    @torch.no_grad()
    def sample(
        self,
        prompt_hidden: torch.Tensor,
        generator: torch.Generator | None = None,
        sigma: float | None = None,
        step_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Draw one threshold per row: ``u ~ N(mu(c), sigma^2)`` (clamped to ``+-U_BOUND``), mapped to the range.

        Args:
            prompt_hidden: ``(batch, hidden)`` pooled prompt hidden states.
            generator: local ``torch.Generator`` for the noise (never the global RNG); ``None`` seeds a fresh one
                non-deterministically.
            sigma: overrides :attr:`exploration_sigma`.
            step_features: a state head's step features (see :meth:`forward`).

        Returns:
            ``(batch,)`` float32 thresholds on ``prompt_hidden``'s device (a state head: ``mu``'s shape).
        """
        sigma = self._sigma(sigma)
        mu = self(prompt_hidden, step_features)
        if generator is None:
            generator = torch.Generator()
            generator.seed()
        noise = torch.randn(mu.shape, generator=generator, device=generator.device, dtype=torch.float32)
        u = (mu + sigma * noise.to(mu.device)).clamp(-U_BOUND, U_BOUND)
        return self.threshold_from_u(u).to(prompt_hidden.device)

    def log_prob(
        self,
        prompt_hidden: torch.Tensor,
        threshold: torch.Tensor,
        sigma: float | None = None,
        step_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``(batch,)`` float32 ``log N(u(threshold); mu(c), sigma^2)``, differentiable in the head's parameters.

        The density is over ``u`` (not over the threshold): the Jacobian of the sigmoid does not depend on the
        parameters, so the policy gradient is the same. A state head takes ``step_features`` and one threshold per
        decision (``threshold`` of ``mu``'s shape) and returns that shape.
        """
        sigma = self._sigma(sigma)
        mu = self(prompt_hidden, step_features)
        u = self.u_from_threshold(threshold.reshape(-1)).to(mu.device)
        if u.numel() != mu.numel():
            raise ValueError(f"threshold has {u.numel()} values for {mu.numel()} prompt rows.")
        u = u.view(mu.shape)
        z = (u - mu) / sigma
        return -0.5 * z.square() - math.log(sigma) - _LOG_SQRT_2PI

    @torch.no_grad()
    def predict_threshold(
        self, prompt_hidden: torch.Tensor, step_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Deterministic ``(batch,)`` float32 threshold (the policy's mean) for inference and evaluation.

        Pass it as ``diffusion_generate(..., threshold_fn=head.predict_threshold)``, or for a state head as
        ``diffusion_generate(..., step_threshold_fn=head.predict_threshold)`` (:meth:`generate_kwargs` picks).
        """
        mu = self(prompt_hidden, step_features)
        return self.threshold_from_u(mu.clamp(-U_BOUND, U_BOUND)).to(prompt_hidden.device)

    def generate_kwargs(self) -> dict:
        """The ``diffusion_generate`` keyword that decodes with this head's mean policy: ``threshold_fn`` for a prompt
        head, ``step_threshold_fn`` for a state head."""
        name = "step_threshold_fn" if self.config.state_dependent else "threshold_fn"
        return {name: self.predict_threshold}

    # -- persistence -------------------------------------------------------------------------------------------------

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write ``sampler_head.safetensors`` and ``sampler_head_config.json`` into ``folder``."""
        from .persistence import save_sampler_head  # persistence builds heads: imported here to avoid a cycle

        save_sampler_head(self, folder)

    @classmethod
    def from_pretrained(cls, folder_or_repo_id: str | os.PathLike, **kwargs) -> SamplerHead:
        """Load a saved head in one call; see :func:`load_sampler_head` for the arguments."""
        from .persistence import load_sampler_head

        return load_sampler_head(folder_or_repo_id, **kwargs)
