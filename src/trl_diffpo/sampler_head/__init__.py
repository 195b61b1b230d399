"""A learned, per-prompt decoding threshold: the sampler head and the callback that trains it with the dLLM.

DiFFPO's "fast" half. A small MLP reads the pooled prompt hidden state of the first denoising forward (which decoding
computes anyway) and outputs the mean ``mu(c)`` of a Gaussian over an unconstrained variable ``u``. The threshold of
the adaptive sampler is ``low + (high - low) * sigmoid(u)``: the entropy bound gamma of ``"entropy_bounded"`` or the
confidence threshold of ``"confidence_threshold"``. Training draws ``u ~ N(mu(c), sigma^2)`` per rollout row, so the
G rollouts of a prompt decode with different thresholds, and a policy gradient on ``log N(u; mu(c), sigma^2)`` with a
group-relative advantage of ``reward - nfe_penalty * nfe / gen_length`` moves ``mu(c)`` toward thresholds that are
fast without costing reward. The map threshold -> ``u`` is invertible, so a rollout only has to keep its threshold.
With ``SamplerHeadConfig(features="state")`` the head decides a threshold at every denoising step instead, from the
prompt and the step's features (:mod:`trl_diffpo.step_features`).

The package, one idea per module:

- :mod:`.config`: :class:`SamplerHeadConfig` (the head's shape, threshold range, initial threshold and exploration
  noise; JSON) and the shared constants.
- :mod:`.network`: :class:`SamplerHead`, the ``nn.Module`` (``sample`` / ``log_prob`` / ``predict_threshold``).
- :mod:`.persistence`: :func:`save_sampler_head` / :func:`load_sampler_head` (the head's own files, beside a model or a
  LoRA adapter) and ZeRO-3 gathering of its weights.
- :mod:`.objective`: the group-relative sampler advantage and the PPO-clipped surrogate.
- :mod:`.callback`: :class:`SamplerHeadCallback`, which plugs the head into ``DiffpoTrainer`` (modes ``"joint"`` and
  ``"sampler_only"``); :mod:`.checkpoints` its checkpoint files and resume state; :mod:`.decisions` a state head's
  recorded decisions in the loss.
- :mod:`.training_hooks`: the head's optimizer group, checkpoint-resume hooks and the DDP work-around.
"""

from .callback import SamplerHeadCallback
from .callback import _noise_seed as _noise_seed  # private, re-exported for tests and scripts
from .config import (
    ADVANTAGE_STD_EPS,
    DEFAULT_THRESHOLD_RANGES,
    FEATURES,
    HEAD_ATTRIBUTE,
    HEAD_CONFIG_NAME,
    HEAD_FORMAT_VERSION,
    HEAD_WEIGHTS_NAME,
    MODES,
    PROMPT_FEATURES,
    SIGMA_SCHEDULES,
    STATE_FEATURES,
    U_BOUND,
    SamplerHeadConfig,
)
from .network import SamplerHead
from .objective import clipped_surrogate, group_relative_sampler_advantages
from .objective import pearson as _pearson  # noqa: F401  (the name before the split)
from .persistence import (
    head_state_dict,
    load_head_weights,
    load_sampler_head,
    save_sampler_head,
)

__all__ = [
    "ADVANTAGE_STD_EPS",
    "DEFAULT_THRESHOLD_RANGES",
    "FEATURES",
    "HEAD_ATTRIBUTE",
    "HEAD_CONFIG_NAME",
    "HEAD_FORMAT_VERSION",
    "HEAD_WEIGHTS_NAME",
    "MODES",
    "PROMPT_FEATURES",
    "SIGMA_SCHEDULES",
    "STATE_FEATURES",
    "U_BOUND",
    "SamplerHead",
    "SamplerHeadCallback",
    "SamplerHeadConfig",
    "clipped_surrogate",
    "group_relative_sampler_advantages",
    "head_state_dict",
    "load_head_weights",
    "load_sampler_head",
    "save_sampler_head",
]
