"""Construction helpers of :class:`~trl_diffpo.DiffpoTrainer`: loading the policy as GRPOTrainer does, giving TRL what it
reads from a causal LM, naming the reward function that raised, and the ``sampler_only`` gradient averaging under DDP.
"""

from __future__ import annotations

import functools

import torch
from accelerate.logging import get_logger
from transformers import AutoProcessor, GenerationConfig
from trl.trainer.utils import create_model_from_path

from .config import DiffpoConfig
from .validation import check_reward_output

logger = get_logger(__name__)


def named_reward(func, name: str):
    """Wrap a synchronous reward function so that an exception names the function that raised it."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            output = func(*args, **kwargs)
        except Exception as err:
            raise RuntimeError(
                f"Reward function {name!r} raised {type(err).__name__}: {err}. Reward functions must return a float "
                "(or None when not applicable) for every completion, whatever its text."
            ) from err
        completions = kwargs.get("completions")
        return check_reward_output(name, output, None if completions is None else len(completions))

    return wrapper


def load_policy(model_id: str, args: DiffpoConfig, quantization_config, processing_class):
    """Load the policy (and tokenizer) from an id as GRPOTrainer does, so that it can be checked before TRL's init."""
    kwargs = dict(args.model_init_kwargs or {})
    if quantization_config is not None:
        if "quantization_config" in kwargs:
            raise ValueError(
                "You set `quantization_config` both as a trainer argument and in `args.model_init_kwargs`. Set it "
                "in only one place, preferably as a trainer argument."
            )
        kwargs["quantization_config"] = quantization_config
    if args.distributed_state.distributed_type in ["MULTI_GPU", "DEEPSPEED"]:
        kwargs["device_map"] = None
    kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    model = create_model_from_path(model_id, **kwargs)
    if processing_class is None:
        processing_class = AutoProcessor.from_pretrained(
            model_id,
            revision=kwargs.get("revision"),
            truncation_side="left",
            padding_side="left",
            trust_remote_code=args.trust_remote_code,
        )
    return model, processing_class


def prepare_model_for_grpo(base_model, args: DiffpoConfig, processing_class) -> None:
    """Give TRL what it reads from a causal LM: a generation config, and checkpointing only where supported."""
    if getattr(base_model, "generation_config", None) is None:  # e.g. BertForMaskedLM
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        special = {
            key: getattr(tokenizer, key, None) if tokenizer is not None else None
            for key in ("pad_token_id", "eos_token_id", "bos_token_id")
        }
        base_model.generation_config = GenerationConfig(**{k: v for k, v in special.items() if v is not None})
    if args.gradient_checkpointing and not getattr(base_model, "supports_gradient_checkpointing", False):
        logger.warning(
            f"{type(base_model).__name__} does not support gradient checkpointing; training without it "
            "(`gradient_checkpointing=False`)."
        )
        args.gradient_checkpointing = False
        if hasattr(args, "activation_checkpointing"):
            args.activation_checkpointing = False
    if args.cast_lm_head_to_fp32 and not hasattr(base_model, "lm_head"):
        # TRL casts `model.lm_head`; LLaDA's output layer is `model.transformer.ff_out`, BERT's `cls.predictions`.
        raise ValueError(
            f"`cast_lm_head_to_fp32=True` casts `model.lm_head`, which {type(base_model).__name__} does not have "
            f"(its output layer is {type(base_model.get_output_embeddings()).__name__}). Set "
            "`cast_lm_head_to_fp32=False`."
        )


def average_head_gradients_under_ddp(trainer) -> None:
    """``sampler_only`` never calls the DDP-wrapped model's forward (the frozen dLLM needs no surrogate), and DDP
    only reduces gradients after its own forward: average the head's gradients across processes as they arrive.
    DeepSpeed reduces through its own gradient hooks, and a single process needs nothing."""
    if trainer.accelerator.num_processes == 1 or trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        return
    world_size = trainer.accelerator.num_processes

    def average(gradient: torch.Tensor) -> torch.Tensor:
        gradient = gradient.clone()
        torch.distributed.all_reduce(gradient)
        return gradient / world_size

    for parameter in trainer.sampler_head_callback.head.parameters():
        parameter.register_hook(average)
