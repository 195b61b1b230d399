"""A learned, per-prompt decoding threshold: the sampler head and the callback that trains it with the dLLM.

DiFFPO's "fast" half. A small MLP reads the pooled prompt hidden state of the first denoising forward (which decoding
computes anyway) and outputs the mean ``mu(c)`` of a Gaussian over an unconstrained variable ``u``. The threshold of
the adaptive sampler is ``low + (high - low) * sigmoid(u)``: the entropy bound gamma of ``"entropy_bounded"`` or the
confidence threshold of ``"confidence_threshold"``. Training draws ``u ~ N(mu(c), sigma^2)`` per rollout row, so the
G rollouts of a prompt decode with different thresholds, and a policy gradient on ``log N(u; mu(c), sigma^2)`` with a
group-relative advantage of ``reward - nfe_penalty * nfe / gen_length`` moves ``mu(c)`` toward thresholds that are
fast without costing reward. The map threshold -> ``u`` is invertible, so a rollout only has to keep its threshold.

Public pieces:

- :class:`SamplerHeadConfig`: the head's shape, threshold range, initial threshold and exploration noise (JSON).
- :class:`SamplerHead`: the ``nn.Module`` (``sample`` / ``log_prob`` / ``predict_threshold``).
- :class:`SamplerHeadCallback`: plugs the head into ``DiffpoTrainer`` (modes ``"joint"`` and ``"sampler_only"``).
- :func:`save_sampler_head` / :func:`load_sampler_head`: the head's own files, beside a model or a LoRA adapter.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .backbones import unwrap_model
from .samplers import ADAPTIVE_SAMPLERS, CONFIDENCE_THRESHOLD, ENTROPY_BOUNDED

logger = logging.getLogger(__name__)

HEAD_WEIGHTS_NAME = "sampler_head.safetensors"
HEAD_CONFIG_NAME = "sampler_head_config.json"
HEAD_ATTRIBUTE = "diffpo_sampler_head"  # the head's submodule name on the trained model
HEAD_FORMAT_VERSION = 1

MODES = ("joint", "sampler_only")
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
# Threshold batches remembered for the correlation metrics until the next `sampler_advantages` call.
_MAX_BUFFERED_DRAWS = 1024


# --------------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------------


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
        keys = ("sampler", "input_size", "mlp_hidden_size", "threshold_min", "threshold_max")
        return all(getattr(self, key) == getattr(other, key) for key in keys)


# --------------------------------------------------------------------------------------------------------------------
# The head
# --------------------------------------------------------------------------------------------------------------------


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
        save_sampler_head(self, folder)

    @classmethod
    def from_pretrained(cls, folder_or_repo_id: str | os.PathLike, **kwargs) -> SamplerHead:
        """Load a saved head in one call; see :func:`load_sampler_head` for the arguments."""
        return load_sampler_head(folder_or_repo_id, **kwargs)


# --------------------------------------------------------------------------------------------------------------------
# Persistence
# --------------------------------------------------------------------------------------------------------------------


def _zero3_gathered(head: SamplerHead, modifier_rank: int | None = None):
    """Context that materialises ZeRO-3 partitioned head parameters (a no-op otherwise). A collective under ZeRO-3.

    For reading (``modifier_rank=None``) parameters that are already whole are left alone: under
    ``unwrap_model_for_generation`` with ``ds3_gather_for_generation=True`` an outer ``GatheredParameters`` holds
    them, and a nested one over the same parameters is refused by deepspeed >= 0.19.8 (older versions re-partition
    them on exit, mid-rollout). Every rank is inside the same outer context, so all ranks skip the same ones.
    """
    import contextlib

    params = [p for p in head.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed  # only reachable when DeepSpeed partitioned the parameters
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if modifier_rank is None:
        params = [p for p in params if p.ds_status != ZeroParamStatus.AVAILABLE]
        if not params:
            return contextlib.nullcontext()
    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def head_state_dict(head: SamplerHead) -> dict[str, torch.Tensor]:
    """The head's weights as CPU tensors in their stored dtype (gathers ZeRO-3 partitions: call on every rank)."""
    with _zero3_gathered(head):
        return {name: tensor.detach().to("cpu").clone().contiguous() for name, tensor in head.state_dict().items()}


def save_sampler_head(head: SamplerHead, folder: str | os.PathLike, state_dict: dict | None = None) -> None:
    """Save ``head`` as ``folder/sampler_head.safetensors`` (weights in their stored dtype, e.g. bf16 under
    DeepSpeed) and ``folder/sampler_head_config.json`` (the :class:`SamplerHeadConfig` plus the dtype).

    These files sit beside a model's or a LoRA adapter's own files and are ignored by ``from_pretrained`` of either.
    """
    from safetensors.torch import save_file

    state_dict = head_state_dict(head) if state_dict is None else state_dict
    os.makedirs(folder, exist_ok=True)
    payload = {
        "format_version": HEAD_FORMAT_VERSION,
        "dtype": str(next(iter(state_dict.values())).dtype).removeprefix("torch."),
        "exploration_sigma": head.exploration_sigma,
        "config": head.config.to_dict(),
    }
    config_path = os.path.join(folder, HEAD_CONFIG_NAME)
    weights_path = os.path.join(folder, HEAD_WEIGHTS_NAME)
    save_file(state_dict, weights_path, metadata={"format": "pt", "trl_diffpo": "sampler_head"})
    with open(config_path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.write("\n")


def _resolve_head_file(
    folder_or_repo_id: str | os.PathLike, filename: str, subfolder: str | None, **hub_kwargs
) -> str:
    """Local path of ``filename`` from a folder, or from the Hub cache / a download for a repo id."""
    base = os.fspath(folder_or_repo_id)
    local_folder = os.path.join(base, subfolder) if subfolder else base
    if os.path.isdir(local_folder):
        path = os.path.join(local_folder, filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} does not exist: this folder holds no sampler head. Save one with "
                "`save_sampler_head(head, folder)` / `SamplerHeadCallback.save_head(folder)` (DiffpoTrainer does it "
                "in every checkpoint and in `save_model` when trained with a SamplerHeadCallback)."
            )
        return path
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return hf_hub_download(base, filename, subfolder=subfolder, **hub_kwargs)
    except LocalEntryNotFoundError as err:  # a subclass of EntryNotFoundError: catch it first
        raise FileNotFoundError(
            f"{filename} of {base!r} is not in the local Hugging Face cache and the Hub cannot be reached (offline "
            "mode or no network). Pass a local folder, or download the repository first while online."
        ) from err
    except EntryNotFoundError as err:
        raise FileNotFoundError(
            f"The Hub repository {base!r} has no {filename}: it was pushed without a sampler head."
        ) from err
    except Exception as err:  # invalid repo id, unknown repository, ...
        raise FileNotFoundError(
            f"{base!r} is neither an existing folder nor a Hub repository holding {filename} ({err})."
        ) from err


def load_sampler_head(
    folder_or_repo_id: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    subfolder: str | None = None,
    **hub_kwargs,
) -> SamplerHead:
    """Load a head saved by :func:`save_sampler_head` from a folder or a Hub repository, ready for inference.

    Args:
        folder_or_repo_id: a local folder (a checkpoint, a saved model or adapter folder) or a Hub repo id.
        dtype: cast the weights to this dtype (default: the dtype they were saved in, e.g. bf16 under DeepSpeed).
        device: move the head there (default: CPU).
        subfolder: a folder inside ``folder_or_repo_id``.
        hub_kwargs: passed to ``huggingface_hub.hf_hub_download`` (``revision``, ``token``, ``cache_dir``, ...);
            honours ``HF_HUB_OFFLINE``.

    Raises:
        FileNotFoundError: a file is missing (the message names it and how to produce it).
        ValueError: a file is corrupt or does not match the config (the message names it).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config_path = _resolve_head_file(folder_or_repo_id, HEAD_CONFIG_NAME, subfolder, **hub_kwargs)
    weights_path = _resolve_head_file(folder_or_repo_id, HEAD_WEIGHTS_NAME, subfolder, **hub_kwargs)
    fix = "re-save the head from its training checkpoint (`save_sampler_head`) or delete the folder's head files."
    try:
        with open(config_path, encoding="utf-8") as handle:
            payload = json.load(handle)
        config = SamplerHeadConfig.from_dict(payload["config"])
        saved_dtype = getattr(torch, payload.get("dtype", "float32"))
        saved_sigma = float(payload.get("exploration_sigma", config.sigma))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{config_path} is not a valid sampler head config ({err}); {fix}") from err
    if payload.get("format_version", HEAD_FORMAT_VERSION) > HEAD_FORMAT_VERSION:
        raise ValueError(
            f"{config_path} was written by a newer trl-diffpo (format {payload['format_version']}); upgrade trl-diffpo."
        )
    try:
        state_dict = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{weights_path} is not a valid safetensors file ({err}); {fix}") from err

    head = SamplerHead(config).to(saved_dtype)
    load_head_weights(head, state_dict, source=weights_path)
    head.exploration_sigma = saved_sigma
    head = head.to(dtype=dtype or saved_dtype, device=device or "cpu")
    return head.eval()


def load_head_weights(head: SamplerHead, state_dict: dict[str, torch.Tensor], source: str = "state_dict") -> None:
    """Copy ``state_dict`` into ``head``'s parameters in place (keeping optimizer references), casting to their dtype.

    Raises:
        ValueError: missing / unexpected keys or shape mismatches, naming ``source``.
    """
    expected = dict(head.state_dict())
    missing, unexpected = sorted(set(expected) - set(state_dict)), sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match the sampler head (missing keys {missing}, unexpected keys {unexpected}); the "
            "file belongs to another head layout: load it with `load_sampler_head` or re-save it."
        )
    for name, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(
                f"{source}: {name} has shape {tuple(tensor.shape)}, the head expects {tuple(expected[name].shape)} "
                "(was it saved for a backbone with another hidden size?)."
            )
    with _zero3_gathered(head, modifier_rank=0), torch.no_grad():
        for name, target in head.state_dict(keep_vars=True).items():
            target.copy_(state_dict[name].to(device=target.device, dtype=target.dtype))


# --------------------------------------------------------------------------------------------------------------------
# Training: the callback
# --------------------------------------------------------------------------------------------------------------------


def _model_hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    candidates = [config]
    get_text_config = getattr(config, "get_text_config", None)
    if callable(get_text_config):
        candidates.append(get_text_config())
    for candidate in candidates:
        for name in ("hidden_size", "d_model", "n_embd"):
            value = getattr(candidate, name, None)
            if isinstance(value, int) and value > 0:
                return value
    raise ValueError(
        f"Cannot find the hidden size of {type(model).__name__} (config.hidden_size / d_model): pass "
        "SamplerHeadCallback(input_size=...) explicitly."
    )


def _model_dtype_and_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The backbone's compute dtype and device: its input embeddings', else its first floating parameter's."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    weight = None
    if callable(get_embeddings):
        try:
            weight = getattr(get_embeddings(), "weight", None)
        except (NotImplementedError, AttributeError):
            weight = None
    if weight is None or not weight.is_floating_point():
        weight = next((p for p in model.parameters() if p.is_floating_point()), None)
    if weight is None:
        return torch.float32, torch.device("cpu")
    return weight.dtype, weight.device


def _is_zero3(trainer) -> bool:
    """Whether ``trainer`` runs under DeepSpeed ZeRO-3 (TRL's distributed backend knows)."""
    return bool(getattr(getattr(trainer, "_dist", None), "is_zero3", False))


def _noise_seed(*parts: int) -> int:
    """A 63-bit seed derived from integers (stable across processes and Python runs)."""
    digest = hashlib.sha256("-".join(str(int(part)) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _pearson(x: torch.Tensor, y: torch.Tensor) -> float | None:
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


class SamplerHeadCallback(TrainerCallback):
    """Trains a :class:`SamplerHead` inside ``DiffpoTrainer``: one learned decoding threshold per prompt.

    Modes: ``"joint"`` (the dLLM and the head train on the same rollouts) and ``"sampler_only"`` (the dLLM is frozen,
    only the head trains). Model-only training is ``DiffpoTrainer`` without this callback (a fixed threshold).

    The trainer drives it through five methods (see ``notes/CONTRACT.md``): :meth:`setup` at the end of its
    ``__init__``, :meth:`threshold_fn` as ``diffusion_generate(threshold_fn=...)`` for training rollouts,
    :meth:`sampler_advantages` on the gathered rewards/NFE, :meth:`head_loss` in ``compute_loss``, and
    :meth:`save_head` in ``save_model``. The callback events save the head into every ``checkpoint-N/``
    (:meth:`on_save`) and anneal the exploration noise.

    Args:
        mode: ``"joint"`` or ``"sampler_only"``.
        nfe_penalty: lambda in the sampler reward ``reward - lambda * nfe / gen_length`` (0: reward only; ties in
            reward are then not broken in favour of speed).
        head_config: a :class:`SamplerHeadConfig` or a dict of its fields (``sampler`` and ``input_size`` are filled
            in from the trainer). Fields can also be given as keyword arguments (``threshold_max=2.0``).
        scale_advantages: divide the group-centred sampler reward by the group std (+1e-4), as TRL's
            ``scale_rewards="group"``. Off by default: in a group whose task rewards tie, the std is that of the NFE
            term alone, so any ``nfe_penalty > 0`` would become a unit-size push to decode faster.
        head_learning_rate: learning rate of the head's own optimizer parameter group (no weight decay; it follows
            the run's LR schedule). The dLLM's learning rate (e.g. 3e-6 for LoRA on LLaDA) would barely move the head.
            ``None`` leaves the head in the trainer's groups at the run's learning rate.
        head_loss_weight: factor on the head's loss before the trainer adds it to the policy loss. The run's
            gradient-norm clipping (``max_grad_norm``) acts on the dLLM and the head together, and the head's raw
            REINFORCE gradient (which scales like ``1 / sigma``) can be larger than the dLLM's: at weight 1 it would
            silently shrink the dLLM's updates. Adam-type optimizers are invariant to this factor for the head's own
            step (``head_learning_rate`` sets that), so the default 0.01 only keeps the head out of the clipping.
            The logged ``loss`` metric is the unweighted loss.
        head_clip_epsilon: PPO clipping of the head's update: the loss is
            ``-mean(min(rho_i A_i, clip(rho_i, 1 - eps, 1 + eps) A_i))`` with ``rho_i`` the ratio of the head's
            current density of ``u_i`` to the density of the head that drew it (a frozen copy taken when the rollouts
            are drawn). Its gradient equals REINFORCE's on the first pass over a batch and stops the head from
            drifting further once it has moved ``eps`` away on the later passes (TRL's ``num_iterations > 1``).
            ``None``: plain REINFORCE ``-mean(A_i log N(u_i; mu, sigma^2))``.
        pretrained_head: a folder or Hub id of a saved head to start from (e.g. ``sampler_only`` after ``joint``).
        seed: seed of the exploration noise (default: the trainer's ``args.seed``). The noise of each threshold draw is
            derived from ``(seed, process index, global step, draw index)``: a resumed run draws what the
            uninterrupted run would have drawn.
        head_kwargs: :class:`SamplerHeadConfig` fields.
    """

    is_sampler_head_callback = True

    def __init__(
        self,
        mode: str = "joint",
        nfe_penalty: float = 0.0,
        head_config: SamplerHeadConfig | dict | None = None,
        *,
        scale_advantages: bool = False,
        head_learning_rate: float | None = 1e-3,
        head_loss_weight: float = 0.01,
        head_clip_epsilon: float | None = 0.2,
        pretrained_head: str | os.PathLike | None = None,
        seed: int | None = None,
        **head_kwargs,
    ):
        if mode not in MODES:
            raise ValueError(
                f"SamplerHeadCallback(mode={mode!r}): choose 'joint' (model and head train) or 'sampler_only' (model "
                "frozen); for model-only training with a fixed threshold, do not add the callback."
            )
        if not (math.isfinite(nfe_penalty) and nfe_penalty >= 0):
            raise ValueError(f"nfe_penalty must be a finite number >= 0, got {nfe_penalty}.")
        if head_learning_rate is not None and not (math.isfinite(head_learning_rate) and head_learning_rate > 0):
            raise ValueError(f"head_learning_rate must be a number > 0 or None, got {head_learning_rate}.")
        if not (math.isfinite(head_loss_weight) and head_loss_weight > 0):
            raise ValueError(f"head_loss_weight must be a finite number > 0, got {head_loss_weight}.")
        if head_clip_epsilon is not None and not (math.isfinite(head_clip_epsilon) and 0 < head_clip_epsilon < 1):
            raise ValueError(f"head_clip_epsilon must be in (0, 1) or None, got {head_clip_epsilon}.")
        if isinstance(head_config, SamplerHeadConfig):
            head_config = head_config.to_dict()
        overrides = dict(head_config or {})
        overrides.update(head_kwargs)
        unknown = sorted(set(overrides) - {f.name for f in fields(SamplerHeadConfig)})
        if unknown:
            raise TypeError(f"SamplerHeadCallback got unknown head options {unknown}; see SamplerHeadConfig.")
        self.mode = mode
        self.nfe_penalty = float(nfe_penalty)
        self.scale_advantages = bool(scale_advantages)
        self.head_learning_rate = head_learning_rate
        self.head_loss_weight = float(head_loss_weight)
        self.head_clip_epsilon = head_clip_epsilon
        self.pretrained_head = pretrained_head
        self.seed = seed
        self.head_overrides = overrides
        self.head: SamplerHead | None = None
        self.trainer = None
        self.process_index = 0
        self.restored_from: str | None = None  # checkpoint the head weights were restored from on resume
        self.fallback_counts: dict[str, int] = {}
        self._noise_step = -1
        self._noise_draws = 0
        self._drawn_thresholds: list[torch.Tensor] = []
        self._behaviour_head: SamplerHead | None = None  # frozen copy of the head that drew the current rollouts
        self._behaviour_sigma: float | None = None
        self._scored_since_snapshot = True

    # -- building the head -------------------------------------------------------------------------------------------

    def init_head(
        self,
        input_size: int,
        sampler: str | None = None,
        dtype: torch.dtype = torch.float32,
        device=None,
        default_threshold: float | None = None,
    ) -> SamplerHead:
        """Build (or load, with ``pretrained_head``) the head without a trainer; :meth:`setup` calls this.

        ``default_threshold`` (the trainer's fixed ``DiffpoConfig.threshold``) is where the head starts when the head
        config sets no ``init_threshold``; an entropy bound above the default range widens ``threshold_max`` to twice
        it (unless ``threshold_max`` is set), so the head starts from the model-only setting and can move both ways.
        """
        options = dict(self.head_overrides)
        requested = options.pop("sampler", None)
        sampler = sampler or requested or ENTROPY_BOUNDED
        if requested is not None and requested != sampler:
            raise ValueError(
                f"The head config asks for sampler {requested!r} but the trainer decodes with {sampler!r}: the head "
                "sets the threshold of the trainer's sampler; drop `sampler` from the head config."
            )
        if default_threshold is not None and math.isfinite(default_threshold) and "init_threshold" not in options:
            low, high, _ = DEFAULT_THRESHOLD_RANGES[sampler]
            low, high = options.get("threshold_min", low), options.get("threshold_max", high)
            if sampler == ENTROPY_BOUNDED and "threshold_max" not in options and default_threshold >= high:
                high = options["threshold_max"] = 2.0 * default_threshold
            if low < default_threshold < high:
                options["init_threshold"] = float(default_threshold)
        options.setdefault("input_size", input_size)
        if options["input_size"] != input_size:
            raise ValueError(f"head input_size={options['input_size']} but the backbone hidden size is {input_size}.")
        config = SamplerHeadConfig(sampler=sampler, **options)
        if self.pretrained_head is not None:
            head = load_sampler_head(self.pretrained_head)
            if not head.config.same_head_shape(config):
                raise ValueError(
                    f"pretrained_head={self.pretrained_head!r} has config {head.config.to_dict()}, which does not match "
                    f"{config.to_dict()} (sampler, input_size, mlp_hidden_size, threshold range must agree)."
                )
            head.config = config  # keep the requested exploration settings
        else:
            head = SamplerHead(config)
        self.head = head.to(dtype=dtype, device=device or "cpu").train()
        self.head.exploration_sigma = config.sigma
        return self.head

    def setup(self, trainer) -> None:
        """Build the head for ``trainer``'s backbone and attach it as ``trainer.model.diffpo_sampler_head``.

        Called by ``DiffpoTrainer`` at the end of its ``__init__`` (before the optimizer and any DeepSpeed engine
        exist, so the head joins both). Checks that the trainer decodes with an adaptive sampler, creates the head on
        the backbone's device in float32 (in the backbone's dtype under ZeRO-3), freezes every other parameter in ``sampler_only`` mode, keeps the head's
        weights out of the model's own ``save_pretrained`` files (they go to ``sampler_head.safetensors``), gives the
        head its own optimizer parameter group and hooks checkpoint resumption.
        """
        args = getattr(trainer, "args", None)
        sampler = getattr(args, "sampler", None)
        if sampler not in ADAPTIVE_SAMPLERS:
            raise ValueError(
                f"SamplerHeadCallback learns a per-prompt decoding threshold, but the trainer decodes with "
                f"sampler={sampler!r}, which has no threshold. Set DiffpoConfig(sampler='entropy_bounded') or "
                "DiffpoConfig(sampler='confidence_threshold'), or remove the callback for model-only training."
            )
        model = unwrap_model(trainer.model)
        get_base = getattr(model, "get_base_model", None)  # peft.PeftModel
        backbone = get_base() if callable(get_base) else model
        hidden_size = self.head_overrides.get("input_size") or _model_hidden_size(backbone)
        backbone_dtype, device = _model_dtype_and_device(backbone)
        # float32 by default: in bf16 an Adam step of 1e-3 cannot move a bias near 2.2 (bf16 spacing 0.0156 there).
        # ZeRO-3 refuses a module of mixed dtypes, so there the head takes the backbone's dtype.
        dtype = backbone_dtype if _is_zero3(trainer) else torch.float32
        if isinstance(getattr(model, HEAD_ATTRIBUTE, None), nn.Module):
            logger.warning("The model already carries a %s; SamplerHeadCallback replaces it.", HEAD_ATTRIBUTE)
        head = self.init_head(
            hidden_size,
            sampler=sampler,
            dtype=dtype,
            device=device,
            default_threshold=getattr(args, "threshold", None),
        )
        setattr(model, HEAD_ATTRIBUTE, head)  # a submodule: the main optimizer trains it, DDP/ZeRO reduce its grads
        self._exclude_from_model_files(model)
        if self.mode == "sampler_only":
            frozen = 0
            for name, parameter in model.named_parameters():
                if not name.startswith(HEAD_ATTRIBUTE + ".") and parameter.requires_grad:
                    parameter.requires_grad_(False)
                    frozen += parameter.numel()
            logger.info("sampler_only: froze %d dLLM parameters; only the sampler head trains.", frozen)
        for parameter in head.parameters():
            parameter.requires_grad_(True)

        self.trainer = trainer
        self.seed = int(getattr(args, "seed", 0) if self.seed is None else self.seed)
        accelerator = getattr(trainer, "accelerator", None)
        self.process_index = int(getattr(accelerator, "process_index", 0) or 0)
        self._hook_optimizer(trainer)
        self._hook_resume(trainer)
        self._disable_ddp_unused_parameter_search(trainer)

    def _disable_ddp_unused_parameter_search(self, trainer) -> None:
        """DDP with ``find_unused_parameters=True`` marks the head's parameters as unused after the model's forward (the
        head runs outside it) and then fails when their gradients arrive ("marked as ready twice"). The Trainer turns
        the search on by default when gradient checkpointing is off; switch it off (the accelerator has not wrapped
        the model yet), or refuse an explicit ``ddp_find_unused_parameters=True``."""
        handler = getattr(getattr(trainer, "accelerator", None), "ddp_handler", None)
        if handler is None or not getattr(handler, "find_unused_parameters", False):
            return
        if getattr(trainer.args, "ddp_find_unused_parameters", None):
            raise ValueError(
                "ddp_find_unused_parameters=True does not work with a SamplerHeadCallback: the head's loss is computed "
                "outside the model's forward, so DDP would mark its parameters unused and then fail when their "
                "gradients arrive. Set ddp_find_unused_parameters=False (every trainable dLLM parameter is used by the "
                "policy loss)."
            )
        handler.find_unused_parameters = False
        logger.info(
            "SamplerHeadCallback: DDP find_unused_parameters switched off (the head runs outside the forward)."
        )

    def _exclude_from_model_files(self, model: nn.Module) -> None:
        """Keep ``diffpo_sampler_head.*`` out of the model's ``save_pretrained`` files (the head has its own files)."""
        ignored = getattr(model, "_keys_to_ignore_on_save", None)
        if isinstance(ignored, set):
            ignored.update(f"{HEAD_ATTRIBUTE}.{name}" for name in self.head.state_dict())

    def _hook_optimizer(self, trainer) -> None:
        """Put the head in its own parameter group (``head_learning_rate``, no weight decay)."""
        if self.head_learning_rate is None:
            return
        if getattr(trainer, "optimizer", None) is not None:  # the user passed `optimizers=(optimizer, scheduler)`
            self._add_head_group(trainer.optimizer)
            logger.warning(
                "The trainer was given a ready optimizer: the sampler head was added to it as a new parameter group "
                "at lr=%g, which a scheduler built beforehand does not schedule.",
                self.head_learning_rate,
            )
            return
        create_optimizer = getattr(trainer, "create_optimizer", None)
        if not callable(create_optimizer):
            return

        def create_optimizer_with_head_group(*args, **kwargs):
            optimizer = create_optimizer(*args, **kwargs)
            self._add_head_group(optimizer if optimizer is not None else trainer.optimizer)
            return optimizer

        trainer.create_optimizer = create_optimizer_with_head_group

    def _add_head_group(self, optimizer) -> None:
        if optimizer is None or any(group.get(HEAD_ATTRIBUTE) for group in optimizer.param_groups):
            return
        head_ids = {id(p) for p in self.head.parameters()}
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in head_ids]
        optimizer.add_param_group(
            {
                "params": list(self.head.parameters()),
                "lr": self.head_learning_rate,
                "weight_decay": 0.0,
                HEAD_ATTRIBUTE: True,
            }
        )

    def _hook_resume(self, trainer) -> None:
        """Restore the head where the Trainer restores the model's weights on ``train(resume_from_checkpoint=...)``.

        ``Trainer._load_from_checkpoint`` runs before the optimizer is created and its state loaded (plain / DDP runs),
        so the head's weights are back before its Adam moments are. Under DeepSpeed the engine's own checkpoint
        (module, fp32 master weights and optimizer state) already contains the head.
        """
        load_from_checkpoint = getattr(trainer, "_load_from_checkpoint", None)
        if callable(load_from_checkpoint):

            def load_from_checkpoint_with_head(resume_from_checkpoint, *args, **kwargs):
                result = load_from_checkpoint(resume_from_checkpoint, *args, **kwargs)
                self.restore_head(resume_from_checkpoint)
                return result

            trainer._load_from_checkpoint = load_from_checkpoint_with_head

        load_best_model = getattr(trainer, "_load_best_model", None)  # `load_best_model_at_end=True`
        if callable(load_best_model):

            def load_best_model_with_head(*args, **kwargs):
                result = load_best_model(*args, **kwargs)
                best = getattr(trainer.state, "best_model_checkpoint", None)
                if best is not None and not getattr(trainer, "is_deepspeed_enabled", False):
                    self.restore_head(best)
                return result

            trainer._load_best_model = load_best_model_with_head

    def restore_head(self, checkpoint_folder: str | os.PathLike) -> bool:
        """Load the head's weights from ``checkpoint_folder`` in place; ``False`` (logged, counted) when it has none."""
        weights_path = os.path.join(checkpoint_folder, HEAD_WEIGHTS_NAME)
        config_path = os.path.join(checkpoint_folder, HEAD_CONFIG_NAME)
        if not (os.path.isfile(weights_path) and os.path.isfile(config_path)):
            self._count_fallback("resume_without_head_files")
            logger.warning(
                "Resuming from %s, which has no %s: the sampler head keeps its current weights (the checkpoint was "
                "written without a SamplerHeadCallback).",
                checkpoint_folder,
                HEAD_WEIGHTS_NAME,
            )
            return False
        saved = load_sampler_head(checkpoint_folder)
        if not saved.config.same_head_shape(self.head.config):
            raise ValueError(
                f"The sampler head in {checkpoint_folder} ({saved.config.to_dict()}) does not match the callback's "
                f"head ({self.head.config.to_dict()}): resume with the same sampler, range and head size."
            )
        load_head_weights(self.head, saved.state_dict(), source=weights_path)
        self.restored_from = os.fspath(checkpoint_folder)
        logger.info("Restored the sampler head from %s.", checkpoint_folder)
        return True

    def resume_state(self) -> dict[str, Any]:
        """Rollout-time state a checkpoint needs for an exact resume (see :mod:`trl_diffpo.checkpointing`): the frozen
        behaviour head of the PPO ratio (inside a generation cycle the next steps score the buffered rows against it)
        and the fallback counters. The noise draws need nothing: they are derived from the global step."""
        behaviour = self._behaviour_head
        return {
            "behaviour_head": None if behaviour is None else head_state_dict(behaviour),
            "behaviour_sigma": self._behaviour_sigma,
            "scored_since_snapshot": self._scored_since_snapshot,
            "fallback_counts": dict(self.fallback_counts),
        }

    def load_resume_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`resume_state` (after the head itself exists)."""
        head = self._require_head()
        if state["behaviour_head"] is not None:
            snapshot = SamplerHead(head.config).to(head.dtype)
            load_head_weights(snapshot, state["behaviour_head"], source="the checkpoint's behaviour head")
            self._behaviour_head = snapshot.to(head.device).eval().requires_grad_(False)
        self._behaviour_sigma = state["behaviour_sigma"]
        self._scored_since_snapshot = bool(state["scored_since_snapshot"])
        self.fallback_counts = dict(state["fallback_counts"])

    def _count_fallback(self, name: str) -> None:
        self.fallback_counts[name] = self.fallback_counts.get(name, 0) + 1

    # -- rollouts ----------------------------------------------------------------------------------------------------

    def _require_head(self) -> SamplerHead:
        if self.head is None:
            raise RuntimeError(
                "The SamplerHeadCallback has no head yet: DiffpoTrainer calls `setup(trainer)` in its __init__ "
                "(or call `init_head(hidden_size)` when using the callback by hand)."
            )
        return self.head

    def _global_step(self) -> int:
        state = getattr(self.trainer, "state", None)
        return int(getattr(state, "global_step", 0) or 0)

    def _training(self) -> bool:
        model = getattr(self.trainer, "model", None)
        return True if model is None else bool(model.training)

    def threshold_fn(self, prompt_hidden: torch.Tensor) -> torch.Tensor:
        """``(batch,)`` float32 per-row thresholds for ``diffusion_generate(threshold_fn=...)`` (no gradient).

        In training, each row draws its own threshold ``u ~ N(mu(c), sigma^2)``; when the trainer's model is in eval
        mode the deterministic :meth:`SamplerHead.predict_threshold` is used instead.
        """
        head = self._require_head()
        if not self._training():
            return head.predict_threshold(prompt_hidden)
        step = self._global_step()
        if step != self._noise_step:
            self._noise_step, self._noise_draws = step, 0
        generator = torch.Generator().manual_seed(
            _noise_seed(self.seed or 0, self.process_index, step, self._noise_draws)
        )
        self._noise_draws += 1
        if self._scored_since_snapshot or self._behaviour_head is None:
            self._snapshot_behaviour_head()
        threshold = head.sample(prompt_hidden, generator=generator)
        self._drawn_thresholds.append(threshold.detach().float().cpu())
        del self._drawn_thresholds[:-_MAX_BUFFERED_DRAWS]  # used outside a trainer: keep the buffer bounded
        return threshold

    def _snapshot_behaviour_head(self) -> None:
        """Freeze a copy of the head as it is when rollouts are drawn (the behaviour policy of the PPO ratio).

        Taken at the first draw after the head was last scored: the head only changes through :meth:`head_loss` and
        an optimizer step, so every draw until then comes from the same policy.
        """
        if self.head_clip_epsilon is None:
            return
        head = self.head
        snapshot = SamplerHead(head.config).to(head.dtype)
        load_head_weights(snapshot, head_state_dict(head), source="the live sampler head")
        self._behaviour_head = snapshot.to(head.device).eval().requires_grad_(False)
        self._behaviour_sigma = head.exploration_sigma
        self._scored_since_snapshot = False

    def sampler_advantages(
        self, rewards: torch.Tensor, nfe: torch.Tensor, gen_length: int, num_generations: int
    ) -> torch.Tensor:
        """Group-relative advantage of the sampler reward ``reward - nfe_penalty * nfe / gen_length``.

        Args:
            rewards: ``(N,)`` rewards of all rollouts (gathered across processes, groups of ``num_generations``
                consecutive rows as in TRL); NaN rows (unscorable) get advantage 0 and do not enter the baseline.
            nfe: ``(N,)`` forward passes of each rollout.
            gen_length: completion length (normalises NFE to "forward passes per token").
            num_generations: G, the group size.

        Returns:
            ``(N,)`` float32 advantages: group mean subtracted, divided by the group std + 1e-4 when
            ``scale_advantages``.
        """
        rewards = torch.as_tensor(rewards).float().flatten()
        nfe = torch.as_tensor(nfe).to(rewards.device).float().flatten()
        if rewards.numel() != nfe.numel():
            raise ValueError(f"rewards has {rewards.numel()} values but nfe has {nfe.numel()}.")
        if num_generations <= 0 or rewards.numel() % num_generations != 0:
            raise ValueError(
                f"{rewards.numel()} rollouts do not split into groups of num_generations={num_generations}."
            )
        if gen_length <= 0:
            raise ValueError(f"gen_length must be positive, got {gen_length}.")
        sampler_reward = (rewards - self.nfe_penalty * nfe / gen_length).view(-1, num_generations)
        valid = torch.isfinite(sampler_reward)
        count = valid.sum(1, keepdim=True)
        filled = torch.where(valid, sampler_reward, torch.zeros_like(sampler_reward))
        mean = filled.sum(1, keepdim=True) / count.clamp(min=1)
        centred = torch.where(valid, sampler_reward - mean, torch.zeros_like(sampler_reward))
        if self.scale_advantages:
            variance = centred.square().sum(1, keepdim=True) / (count - 1).clamp(min=1)
            centred = centred / (variance.sqrt() + ADVANTAGE_STD_EPS)
        self._log_rollout_metrics(rewards, nfe, sampler_reward.flatten())
        return centred.flatten()

    def _log_rollout_metrics(self, rewards: torch.Tensor, nfe: torch.Tensor, sampler_reward: torch.Tensor) -> None:
        """Correlation of the drawn thresholds with reward and NFE (on this process's rows), via ``trainer._metrics``."""
        drawn = torch.cat(self._drawn_thresholds) if self._drawn_thresholds else torch.empty(0)
        self._drawn_thresholds = []
        metrics = {"sampler_reward": float(torch.nanmean(sampler_reward))}
        total, local = rewards.numel(), drawn.numel()
        if local and total % local == 0 and (self.process_index + 1) * local <= total:
            rows = (
                slice(self.process_index * local, (self.process_index + 1) * local) if local != total else slice(None)
            )
            for name, values in (("reward", rewards[rows]), ("nfe", nfe[rows])):
                correlation = _pearson(drawn, values.cpu())
                if correlation is not None:
                    metrics[f"corr_threshold_{name}"] = correlation
        elif local:
            self._count_fallback("correlation_rows_mismatch")
            logger.debug(
                "sampler head: %d drawn thresholds for %d rewards; correlation metrics skipped.", local, total
            )
        self.log_metrics(metrics)

    def log_metrics(self, metrics: dict[str, float]) -> None:
        """Append ``metrics`` to the trainer's metric store under ``sampler_head/<name>`` (no-op without trainer)."""
        store = getattr(self.trainer, "_metrics", None)
        if not isinstance(store, dict):
            return
        mode = "train" if self._training() else "eval"
        if mode not in store:
            return
        for name, value in metrics.items():
            store[mode][f"sampler_head/{name}"].append(float(value))

    # -- the head's loss ---------------------------------------------------------------------------------------------

    def head_loss(
        self, prompt_hidden: torch.Tensor, threshold: torch.Tensor, advantages: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Policy-gradient loss of the head on a (micro-)batch's rows, times ``head_loss_weight``.

        With ``head_clip_epsilon`` (default) the PPO-clipped ``-mean(min(rho_i A_i, clip(rho_i, 1-eps, 1+eps) A_i))``,
        ``rho_i = N(u_i; mu(c_i), sigma^2) / N(u_i; mu_old(c_i), sigma_old^2)`` against the head that drew the rows;
        otherwise (or when no draw was seen, e.g. the first batch after a resume; counted) REINFORCE
        ``-mean(A_i * log N(u_i; mu(c_i), sigma^2))``. Both have the same gradient while the head has not moved.

        Args:
            prompt_hidden: ``(b, hidden)`` pooled prompt hidden states the rows were decoded with (detached here).
            threshold: ``(b,)`` thresholds the rows were decoded with (from :meth:`threshold_fn`).
            advantages: ``(b,)`` from :meth:`sampler_advantages` (detached here).

        Returns:
            ``(loss, metrics)``: a float32 scalar with gradient into the head only, and floats ``loss``
            (unweighted), ``threshold_mean/std/min/max`` (of the rows), ``predicted_threshold_mean`` (the policy
            mean), ``sigma`` and, with clipping, ``ratio_mean`` and ``clipped_frac``.
        """
        head = self._require_head()
        threshold = torch.as_tensor(threshold).float().flatten()
        advantages = torch.as_tensor(advantages).detach().float().flatten()
        if threshold.numel() != prompt_hidden.shape[0] or advantages.numel() != prompt_hidden.shape[0]:
            raise ValueError(
                f"head_loss got {prompt_hidden.shape[0]} prompt rows, {threshold.numel()} thresholds and "
                f"{advantages.numel()} advantages; they must match."
            )
        if prompt_hidden.shape[0] == 0:  # keep every head parameter in the graph (DDP expects gradients)
            loss = sum(parameter.sum() for parameter in head.parameters()) * 0.0
            return loss.float(), {"loss": 0.0, "sigma": head.exploration_sigma}
        self._scored_since_snapshot = True
        log_prob = head.log_prob(prompt_hidden, threshold)
        advantages = advantages.to(log_prob.device)
        extra: dict[str, float] = {}
        if self.head_clip_epsilon is not None and self._behaviour_head is None:
            self._count_fallback("head_loss_without_behaviour_head")
        if self.head_clip_epsilon is not None and self._behaviour_head is not None:
            with torch.no_grad():
                behaviour = self._behaviour_head.log_prob(prompt_hidden, threshold, sigma=self._behaviour_sigma)
            ratio = torch.exp(log_prob - behaviour.to(log_prob.device))
            clipped = ratio.clamp(1 - self.head_clip_epsilon, 1 + self.head_clip_epsilon)
            unweighted_loss = -torch.minimum(ratio * advantages, clipped * advantages).mean()
            is_clipped = (ratio * advantages) > (clipped * advantages)
            extra = {"ratio_mean": float(ratio.detach().mean()), "clipped_frac": float(is_clipped.float().mean())}
        else:
            unweighted_loss = -(advantages * log_prob).mean()
        with torch.no_grad():
            predicted = head.predict_threshold(prompt_hidden)
        metrics = {
            "loss": float(unweighted_loss.detach()),
            "threshold_mean": float(threshold.mean()),
            "threshold_std": float(threshold.std()) if threshold.numel() > 1 else 0.0,
            "threshold_min": float(threshold.min()),
            "threshold_max": float(threshold.max()),
            "predicted_threshold_mean": float(predicted.mean()),
            "sigma": head.exploration_sigma,
            **extra,
        }
        return self.head_loss_weight * unweighted_loss, metrics

    # -- persistence and callback events -----------------------------------------------------------------------------

    def _should_write(self) -> bool:
        args = getattr(self.trainer, "args", None)
        return bool(getattr(args, "should_save", True))

    def save_head(self, output_dir: str | os.PathLike) -> None:
        """Save the head into ``output_dir`` (``sampler_head.safetensors`` + ``sampler_head_config.json``).

        Called on every process (gathering ZeRO-3 partitions is a collective); only the process that saves writes.
        """
        head = self._require_head()
        state_dict = head_state_dict(head)
        if self._should_write():
            save_sampler_head(head, output_dir, state_dict=state_dict)

    def _update_sigma(self, state) -> None:
        if self.head is not None:
            self.head.exploration_sigma = self.head.config.sigma_at(state.global_step, state.max_steps)

    def on_train_begin(self, args, state, control, **kwargs):
        self._update_sigma(state)
        if state.global_step > 0 and self.restored_from is None:
            if getattr(self.trainer, "is_deepspeed_enabled", False):
                logger.info("Resumed under DeepSpeed: the engine checkpoint restored the sampler head.")
            else:
                self._count_fallback("resume_without_head_restore")
                logger.warning(
                    "Training resumes at step %d but the sampler head was not restored from a checkpoint's %s; it "
                    "keeps the weights the model was loaded with.",
                    state.global_step,
                    HEAD_WEIGHTS_NAME,
                )

    def on_step_begin(self, args, state, control, **kwargs):
        self._update_sigma(state)

    def on_save(self, args, state, control, **kwargs):
        """Write the head into the ``checkpoint-N/`` folder the Trainer just saved."""
        if self.head is None:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(folder) or not self._should_write():
            self.save_head(folder)
