"""trl-diffpo: DiFFPO reinforcement learning for masked diffusion language models, on top of Hugging Face TRL.

Heavy submodules (TRL, the trainer) are imported lazily so that ``import trl_diffpo`` stays cheap and so that the
decoding engine can be used without importing TRL at all.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> submodule that defines it
_LAZY = {
    "DiffusionBackbone": "backbones",
    "get_backbone": "backbones",
    "resolve_mask_token_id": "backbones",
    "diffusion_generate": "generation",
    "DiffusionGenerateOutput": "generation",
    "DiffpoConfig": "config",
    "DiffpoTrainer": "trainer",
    "SamplerHead": "sampler_head",
    "SamplerHeadCallback": "sampler_head",
    "SamplerHeadConfig": "sampler_head",
    "load_sampler_head": "sampler_head",
    "save_sampler_head": "sampler_head",
    "evaluate": "evaluation",
    "get_task": "tasks",
    "masked_diffusion_sft": "sft",
}

__all__ = ["__version__", *_LAZY]


def _register_native_models() -> None:
    """Register the native LLaDA / Dream classes with the Auto* factories, if that module exists."""
    try:
        models = importlib.import_module(f"{__name__}.models")
    except ModuleNotFoundError as err:  # pragma: no cover - only while the models package is absent
        if err.name != f"{__name__}.models":
            raise
        return
    register = getattr(models, "register_native_models", None)
    if register is not None:
        register()


_register_native_models()


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from .backbones import DiffusionBackbone, get_backbone, resolve_mask_token_id  # noqa: F401
    from .config import DiffpoConfig  # noqa: F401
    from .evaluation import evaluate  # noqa: F401
    from .generation import DiffusionGenerateOutput, diffusion_generate  # noqa: F401
    from .sampler_head import (  # noqa: F401
        SamplerHead,
        SamplerHeadCallback,
        SamplerHeadConfig,
        load_sampler_head,
        save_sampler_head,
    )
    from .sft import masked_diffusion_sft  # noqa: F401
    from .tasks import get_task  # noqa: F401
    from .trainer import DiffpoTrainer  # noqa: F401
