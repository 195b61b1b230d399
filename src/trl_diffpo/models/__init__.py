"""Native transformers-5 implementations of the LLaDA and Dream masked diffusion LMs.

Importing :mod:`trl_diffpo` calls :func:`register_native_models`, which registers the classes with ``AutoConfig``,
``AutoModel``, ``AutoModelForMaskedLM`` and ``AutoModelForCausalLM`` under the checkpoints' own ``model_type`` values
(``"llada"``, ``"Dream"``). ``AutoModel.from_pretrained("GSAI-ML/LLaDA-8B-Instruct")`` then builds
:class:`LLaDAModelLM` without ``trust_remote_code``, even though the checkpoint's ``config.json`` has an ``auto_map``
pointing to its Hub code (transformers prefers explicitly registered classes over remote code). Set the environment
variable ``TRL_DIFFPO_NATIVE_MODELS=0`` before importing :mod:`trl_diffpo` to skip the registration and load the Hub
code with ``trust_remote_code=True`` instead.
"""

from __future__ import annotations

import logging
import os

from .checkpoint import CheckpointError, CheckpointReport, ShapeMismatch, check_checkpoint, main
from .dream import (
    DREAM_LORA_TARGET_MODULES,
    DREAM_MASK_TOKEN_ID,
    DreamBaseModel,
    DreamConfig,
    DreamModel,
    DreamPreTrainedModel,
)
from .llada import (
    LLADA_EOS_TOKEN_ID,
    LLADA_LORA_TARGET_MODULES,
    LLADA_MASK_TOKEN_ID,
    LLaDAConfig,
    LLaDAModel,
    LLaDAModelLM,
    LLaDAPreTrainedModel,
)

logger = logging.getLogger(__name__)

NATIVE_MODELS_ENV = "TRL_DIFFPO_NATIVE_MODELS"
# (config class, class built by AutoModel / AutoModelForMaskedLM / AutoModelForCausalLM)
NATIVE_MODELS = ((LLaDAConfig, LLaDAModelLM), (DreamConfig, DreamModel))

__all__ = [
    "CheckpointError",
    "CheckpointReport",
    "DREAM_LORA_TARGET_MODULES",
    "DREAM_MASK_TOKEN_ID",
    "DreamBaseModel",
    "DreamConfig",
    "DreamModel",
    "DreamPreTrainedModel",
    "LLADA_EOS_TOKEN_ID",
    "LLADA_LORA_TARGET_MODULES",
    "LLADA_MASK_TOKEN_ID",
    "LLaDAConfig",
    "LLaDAModel",
    "LLaDAModelLM",
    "LLaDAPreTrainedModel",
    "NATIVE_MODELS",
    "ShapeMismatch",
    "check_checkpoint",
    "lora_target_modules",
    "main",
    "register_native_models",
]


def native_models_enabled() -> bool:
    """False when ``TRL_DIFFPO_NATIVE_MODELS`` is ``0`` / ``false`` / ``no`` / ``off``."""
    return os.environ.get(NATIVE_MODELS_ENV, "1").strip().lower() not in {"0", "false", "no", "off"}


def register_native_models() -> bool:
    """Register LLaDA and Dream with the ``Auto*`` factories; idempotent. Returns whether they are registered.

    Skipped (returns ``False``) when ``TRL_DIFFPO_NATIVE_MODELS=0``, so that the checkpoints' Hub code can be used
    with ``trust_remote_code=True``.
    """
    if not native_models_enabled():
        logger.info("%s=0: not registering the native LLaDA / Dream classes.", NATIVE_MODELS_ENV)
        return False
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    for config_class, model_class in NATIVE_MODELS:
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        for auto_class in (AutoModel, AutoModelForMaskedLM, AutoModelForCausalLM):
            auto_class.register(config_class, model_class, exist_ok=True)
    return True


def lora_target_modules(model) -> str | list[str] | None:
    """The default LoRA ``target_modules`` for a native LLaDA / Dream model (or its config), else ``None``.

    LLaDA's is a regex that matches every projection inside the blocks but not the output head, which shares the
    name ``ff_out`` with the blocks' down projections.
    """
    config = getattr(model, "config", model)
    model_type = getattr(config, "model_type", None)
    if model_type == LLaDAConfig.model_type:
        return LLADA_LORA_TARGET_MODULES
    if model_type == DreamConfig.model_type:
        return list(DREAM_LORA_TARGET_MODULES)
    return None
