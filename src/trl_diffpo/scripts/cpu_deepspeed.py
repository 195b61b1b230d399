"""``trl-diffpo train --accelerate_config zero2|zero3`` on a machine without a GPU: DeepSpeed on CPU processes.

DeepSpeed runs ZeRO-2/3 on CPU processes with the gloo backend, but two defaults stand in the way when
``accelerate launch`` starts it from a GPU-oriented config (TRL's shipped ``zero2``/``zero3`` and ours):

- accelerate picks no process-group backend on a CPU, DeepSpeed then starts gloo with every rank anyway while
  accelerate believes it runs one process (``train_batch_size is not equal to micro_batch_per_gpu *
  gradient_acc_step * world_size``): the training processes get ``--ddp_backend gloo``;
- the configs ask for ``mixed_precision: bf16`` while CPU training arguments say ``bf16: false`` (DeepSpeed refuses
  the mismatch): accelerate gets the precision of the training arguments.

(``use_cpu: true``, as in ``examples/configs/tiny_cpu.yaml``, does no harm on this route: accelerate launch sets
``ACCELERATE_USE_DEEPSPEED`` and DeepSpeed stays on.)

Nothing changes when an accelerator (CUDA, XPU, ...) is present or when the launch is not a DeepSpeed one; a
``--ddp_backend`` or accelerate ``--mixed_precision`` the user gave is kept.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

CPU_BACKEND = "gloo"


def has_accelerator() -> bool:
    """Whether torch sees a GPU-like accelerator (CUDA, ROCm, XPU, MPS, ...)."""
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def _uses_deepspeed(accelerate_args) -> bool:
    if getattr(accelerate_args, "use_deepspeed", False):
        return True
    config_file = getattr(accelerate_args, "config_file", None)
    if not config_file:
        return False
    from accelerate.commands.config.config_args import load_config_from_file

    distributed_type = getattr(load_config_from_file(config_file), "distributed_type", None)
    return getattr(distributed_type, "value", distributed_type) == "DEEPSPEED"


def adapt_for_cpu_deepspeed(accelerate_args, training_args, accelerator_available: bool | None = None) -> list[str]:
    """Prepare a DeepSpeed ``accelerate launch`` on a machine without an accelerator (see the module docstring).

    Sets ``accelerate_args.mixed_precision`` (unless given on the command line) and returns the flags to append to
    the training processes' arguments; returns ``[]`` and changes nothing when the launch does not need it.
    """
    if accelerator_available is None:
        accelerator_available = has_accelerator()
    if accelerator_available or getattr(accelerate_args, "cpu", False) or not _uses_deepspeed(accelerate_args):
        return []
    extra_training_args = []
    if training_args.ddp_backend is None:
        extra_training_args += ["--ddp_backend", CPU_BACKEND]
    if getattr(accelerate_args, "mixed_precision", None) is None:
        accelerate_args.mixed_precision = "bf16" if training_args.bf16 else "no"
    logger.warning(
        "No GPU found: running DeepSpeed on %s CPU processes with the %s backend (mixed precision %s).",
        getattr(accelerate_args, "num_processes", None) or "the config's",
        training_args.ddp_backend or CPU_BACKEND,
        accelerate_args.mixed_precision,
    )
    return extra_training_args
