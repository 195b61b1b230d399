"""How the sampler head hooks into a ``transformers`` Trainer: the backbone's size and dtype, the head's optimizer
parameter group, checkpoint-resume hooks, and the DDP unused-parameter work-around.

Functions of the trainer (and the head): :meth:`SamplerHeadCallback.setup` calls them once, in the trainer's
``__init__``, before the optimizer and any DeepSpeed engine exist.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from .config import HEAD_ATTRIBUTE

logger = logging.getLogger(__name__)


def model_hidden_size(model: nn.Module) -> int:
    """The backbone's hidden size (``config.hidden_size`` / ``d_model`` / ``n_embd``, also of a nested text config)."""
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


def model_dtype_and_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
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


def is_zero3(trainer) -> bool:
    """Whether ``trainer`` runs under DeepSpeed ZeRO-3 (TRL's distributed backend knows)."""
    return bool(getattr(getattr(trainer, "_dist", None), "is_zero3", False))


def disable_ddp_unused_parameter_search(trainer) -> None:
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
    logger.info("SamplerHeadCallback: DDP find_unused_parameters switched off (the head runs outside the forward).")


def exclude_head_from_model_files(model: nn.Module, head: nn.Module) -> None:
    """Keep ``diffpo_sampler_head.*`` out of the model's ``save_pretrained`` files (the head has its own files)."""
    ignored = getattr(model, "_keys_to_ignore_on_save", None)
    if isinstance(ignored, set):
        ignored.update(f"{HEAD_ATTRIBUTE}.{name}" for name in head.state_dict())


def hook_head_optimizer_group(trainer, head: nn.Module, learning_rate: float | None) -> None:
    """Put the head in its own parameter group (``learning_rate``, no weight decay); ``None``: leave the groups alone."""
    if learning_rate is None:
        return
    if getattr(trainer, "optimizer", None) is not None:  # the user passed `optimizers=(optimizer, scheduler)`
        add_head_group(trainer.optimizer, head, learning_rate)
        logger.warning(
            "The trainer was given a ready optimizer: the sampler head was added to it as a new parameter group "
            "at lr=%g, which a scheduler built beforehand does not schedule.",
            learning_rate,
        )
        return
    create_optimizer = getattr(trainer, "create_optimizer", None)
    if not callable(create_optimizer):
        return

    def create_optimizer_with_head_group(*args, **kwargs):
        optimizer = create_optimizer(*args, **kwargs)
        add_head_group(optimizer if optimizer is not None else trainer.optimizer, head, learning_rate)
        return optimizer

    trainer.create_optimizer = create_optimizer_with_head_group


def add_head_group(optimizer, head: nn.Module, learning_rate: float) -> None:
    """Move ``head``'s parameters out of ``optimizer``'s groups into a group of their own (idempotent)."""
    if optimizer is None or any(group.get(HEAD_ATTRIBUTE) for group in optimizer.param_groups):
        return
    head_ids = {id(p) for p in head.parameters()}
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in head_ids]
    optimizer.add_param_group(
        {
            "params": list(head.parameters()),
            "lr": learning_rate,
            "weight_decay": 0.0,
            HEAD_ATTRIBUTE: True,
        }
    )


def hook_head_resume(trainer, restore_head: Callable[[str], bool]) -> None:
    """Call ``restore_head(checkpoint_folder)`` where the Trainer restores the model's weights on
    ``train(resume_from_checkpoint=...)`` (and on ``load_best_model_at_end``).

    ``Trainer._load_from_checkpoint`` runs before the optimizer is created and its state loaded (plain / DDP runs),
    so the head's weights are back before its Adam moments are. Under DeepSpeed the engine's own checkpoint
    (module, fp32 master weights and optimizer state) already contains the head.
    """
    load_from_checkpoint = getattr(trainer, "_load_from_checkpoint", None)
    if callable(load_from_checkpoint):

        def load_from_checkpoint_with_head(resume_from_checkpoint, *args, **kwargs):
            result = load_from_checkpoint(resume_from_checkpoint, *args, **kwargs)
            restore_head(resume_from_checkpoint)
            return result

        trainer._load_from_checkpoint = load_from_checkpoint_with_head

    load_best_model = getattr(trainer, "_load_best_model", None)  # `load_best_model_at_end=True`
    if callable(load_best_model):

        def load_best_model_with_head(*args, **kwargs):
            result = load_best_model(*args, **kwargs)
            best = getattr(trainer.state, "best_model_checkpoint", None)
            if best is not None and not getattr(trainer, "is_deepspeed_enabled", False):
                restore_head(best)
            return result

        trainer._load_best_model = load_best_model_with_head
