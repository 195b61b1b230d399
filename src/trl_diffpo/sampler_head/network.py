"""The sampler head network: a Gaussian policy over the decoding threshold of a prompt (sample / log_prob / predict)."""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from .config import _LOG_SQRT_2PI, U_BOUND, SamplerHeadConfig


class SamplerHead(nn.Module):
    """Maps a pooled prompt hidden state to a Gaussian policy over the decoding threshold of that prompt.

    ``mu(c) = MLP(layer_norm(h(c)))`` in u-space; threshold ``= low + (high - low) * sigmoid(u)``. The input is
    detached (no gradient ever reaches the dLLM) and cast to the head's dtype: the head trains in float32 beside a bf16
    backbone, and in bf16 only under ZeRO-3 (which refuses mixed dtypes); the Gaussian's log-density is computed in float32. The last layer
    starts at zero weight and bias ``u0``, so every prompt initially gets exactly ``config.init_threshold``.

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

    def forward(self, prompt_hidden: torch.Tensor) -> torch.Tensor:
        """``(batch,)`` float32 mean ``mu(c)`` of the Gaussian over ``u`` for ``(batch, hidden)`` pooled prompts."""
        if prompt_hidden.dim() != 2 or prompt_hidden.shape[-1] != self.config.input_size:
            raise ValueError(
                f"prompt_hidden must have shape (batch, {self.config.input_size}) (pooled prompt hidden states), got "
                f"{tuple(prompt_hidden.shape)}."
            )
        features = prompt_hidden.detach().float()
        features = nn.functional.layer_norm(features, features.shape[-1:])  # in float32: hidden states can be large
        return self.mlp(features.to(device=self.device, dtype=self.dtype)).squeeze(-1).float()

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
        self, prompt_hidden: torch.Tensor, generator: torch.Generator | None = None, sigma: float | None = None
    ) -> torch.Tensor:
        """Draw one threshold per row: ``u ~ N(mu(c), sigma^2)`` (clamped to ``+-U_BOUND``), mapped to the range.

        Args:
            prompt_hidden: ``(batch, hidden)`` pooled prompt hidden states.
            generator: local ``torch.Generator`` for the noise (never the global RNG); ``None`` seeds a fresh one
                non-deterministically.
            sigma: overrides :attr:`exploration_sigma`.

        Returns:
            ``(batch,)`` float32 thresholds on ``prompt_hidden``'s device.
        """
        sigma = self._sigma(sigma)
        mu = self(prompt_hidden)
        if generator is None:
            generator = torch.Generator()
            generator.seed()
        noise = torch.randn(mu.shape, generator=generator, device=generator.device, dtype=torch.float32)
        u = (mu + sigma * noise.to(mu.device)).clamp(-U_BOUND, U_BOUND)
        return self.threshold_from_u(u).to(prompt_hidden.device)

    def log_prob(
        self, prompt_hidden: torch.Tensor, threshold: torch.Tensor, sigma: float | None = None
    ) -> torch.Tensor:
        """``(batch,)`` float32 ``log N(u(threshold); mu(c), sigma^2)``, differentiable in the head's parameters.

        The density is over ``u`` (not over the threshold): the Jacobian of the sigmoid does not depend on the
        parameters, so the policy gradient is the same.
        """
        sigma = self._sigma(sigma)
        mu = self(prompt_hidden)
        u = self.u_from_threshold(threshold.reshape(-1)).to(mu.device)
        if u.shape != mu.shape:
            raise ValueError(f"threshold has {u.numel()} values for {mu.numel()} prompt rows.")
        z = (u - mu) / sigma
        return -0.5 * z.square() - math.log(sigma) - _LOG_SQRT_2PI

    @torch.no_grad()
    def predict_threshold(self, prompt_hidden: torch.Tensor) -> torch.Tensor:
        """Deterministic ``(batch,)`` float32 threshold (the policy's mean) for inference and evaluation.

        Pass it as ``diffusion_generate(..., threshold_fn=head.predict_threshold)``.
        """
        return self.threshold_from_u(self(prompt_hidden).clamp(-U_BOUND, U_BOUND)).to(prompt_hidden.device)

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
