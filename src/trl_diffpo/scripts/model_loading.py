"""The model and tokenizer of ``trl-diffpo train``: ``tiny:`` specs built in code, Hub ids or folders, and LoRA."""

import logging

from trl import ModelConfig

from ..config import DiffpoConfig
from .errors import CliError
from .local_files import check_model_source

logger = logging.getLogger(__name__)

# `--model_name_or_path tiny:<architecture>[,key=value...]` builds a small random model and a character tokenizer in
# code (no download): for smoke tests and CI, never for real training.
TINY_MODEL_PREFIX = "tiny:"
TINY_MODEL_OPTIONS = ("hidden_size", "num_layers", "num_heads", "max_position_embeddings", "seed")
_REGEX_CHARACTERS = set("\\*^$()[]|?+{}")
AUTOREGRESSIVE_TASK_TYPE = "CAUSAL_LM"  # TRL's default LoRA task type, replaced by None (see get_peft_config)


def parse_tiny_spec(spec: str) -> tuple[str, dict[str, int]]:
    """``"tiny:llama,hidden_size=32"`` -> ``("llama", {"hidden_size": 32})``."""
    body = spec[len(TINY_MODEL_PREFIX) :]
    architecture, *options = [part.strip() for part in body.split(",")]
    kwargs = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or key not in TINY_MODEL_OPTIONS:
            raise CliError(
                f"bad tiny-model option {option!r} in {spec!r}: use {TINY_MODEL_PREFIX}<architecture>[,key=value...] "
                f"with keys {', '.join(TINY_MODEL_OPTIONS)}."
            )
        try:
            kwargs[key] = int(value)
        except ValueError:
            raise CliError(f"tiny-model option {key}={value!r} in {spec!r} must be an integer.") from None
    return architecture, kwargs


def _torch_dtype(name: str | None):
    import torch

    if name in (None, "auto", "float32"):
        return torch.float32
    if name in ("bfloat16", "float16"):
        return getattr(torch, name)
    raise CliError(f"--dtype {name!r}: choose auto, bfloat16, float16 or float32.")


def build_model(model_args: ModelConfig, training_args: DiffpoConfig):
    """``(model, tokenizer)`` for the trainer: ``model`` is a module (``tiny:`` specs) or the Hub id / folder.

    ``tiny:`` specs are built in code. Anything else is loaded by the trainer with ``training_args.model_init_kwargs``
    (revision, dtype, attention implementation, ``trust_remote_code``), as in TRL's GRPO script; the tokenizer is
    loaded here (left padding) because the task loaders format prompts with its chat template.
    """
    name = model_args.model_name_or_path
    if name.startswith(TINY_MODEL_PREFIX):
        from ..tiny import build_char_tokenizer, build_tiny_model

        architecture, kwargs = parse_tiny_spec(name)
        tokenizer = build_char_tokenizer()
        try:
            model = build_tiny_model(
                tokenizer, architecture=architecture, dtype=_torch_dtype(model_args.dtype), **kwargs
            )
        except ValueError as error:
            raise CliError(str(error)) from error
        return model, tokenizer
    from transformers import AutoTokenizer

    check_model_source(name, "--model_name_or_path")
    model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
    }
    model_init_kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = model_init_kwargs
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name,
            revision=model_args.model_revision,
            trust_remote_code=training_args.trust_remote_code,
            padding_side="left",
        )
    except OSError as error:  # not on the Hub, offline without a cached copy, no tokenizer files in the folder
        raise CliError(f"cannot load the tokenizer of --model_name_or_path {name!r}: {_first_line(error)}") from error
    return name, tokenizer


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def get_peft_config(model_args: ModelConfig):
    """TRL's LoRA config from ``model_args``, adapted to masked diffusion LMs.

    - A single regex target (e.g. LLaDA's) is passed to PEFT as a regex: PEFT matches a ``str`` as a full regex but
      list items as module-name suffixes, and the command line always gives a list.
    - ``lora_task_type="CAUSAL_LM"`` (TRL's default) would wrap the model in ``PeftModelForCausalLM``, which needs the
      autoregressive ``prepare_inputs_for_generation`` that LLaDA / Dream do not have (and DiFFPO never calls): the
      adapter is attached with a plain ``PeftModel`` instead (task type ``None``).
    """
    from trl import get_peft_config as trl_get_peft_config

    targets = model_args.lora_target_modules
    if isinstance(targets, list) and len(targets) == 1 and _REGEX_CHARACTERS & set(targets[0]):
        model_args.lora_target_modules = targets[0]
    if model_args.lora_task_type == AUTOREGRESSIVE_TASK_TYPE:
        logger.info("LoRA task type %s -> None: diffusion LMs get a plain PeftModel.", AUTOREGRESSIVE_TASK_TYPE)
        model_args.lora_task_type = None
    return trl_get_peft_config(model_args)
