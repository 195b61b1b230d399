"""``trl-diffpo train``: DiFFPO training of a masked diffusion LM from a YAML config and command-line flags.

Built the way TRL's own ``trl grpo`` script is: a :class:`trl.TrlParser` over four dataclasses,

- :class:`DiffpoScriptArguments`: the data (a registered task or any dataset), the reward functions and the
  sampler head;
- :class:`trl_diffpo.DiffpoConfig`: the training arguments (every ``GRPOConfig`` / ``TrainingArguments`` option plus
  the diffusion ones: ``block_length``, ``diffusion_steps``, ``sampler``, ``likelihood``, ...);
- :class:`trl.ModelConfig`: the model, its dtype and attention implementation, LoRA;
- :class:`trl.DatasetMixtureConfig`: an optional mixture of datasets (a ``datasets:`` list in the YAML file).

Values come from the dataclass defaults, then the YAML file given with ``--config``, then the command line (the
command line wins). Unknown keys in the YAML file and unknown flags are errors, with a "did you mean" hint.

Examples::

    trl-diffpo train --config examples/configs/llada_gsm8k_diffpo.yaml
    trl-diffpo train --config examples/configs/tiny_cpu.yaml --max_steps 2 --output_dir /tmp/tiny
    accelerate launch --config_file examples/accelerate_configs/zero2.yaml \\
        -m trl_diffpo train --config examples/configs/llada_gsm8k_diffpo.yaml
    trl-diffpo train --accelerate_config zero2 --num_processes 8 --config examples/configs/llada_gsm8k_diffpo.yaml
"""

import argparse
import dataclasses
import difflib
import importlib
import inspect
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

from ..config import DiffpoConfig
from ..sampler_head import MODES as SAMPLER_HEAD_MODES
from ..sampler_head import SIGMA_SCHEDULES, SamplerHeadCallback, SamplerHeadConfig
from ..samplers import ADAPTIVE_SAMPLERS

logger = logging.getLogger(__name__)

PROG = "trl-diffpo train"
CONFIG_FLAG = "--config"
ACCELERATE_CONFIG_FLAG = "--accelerate_config"
# `--model_name_or_path tiny:<architecture>[,key=value...]` builds a small random model and a character tokenizer in
# code (no download): for smoke tests and CI, never for real training.
TINY_MODEL_PREFIX = "tiny:"
TINY_MODEL_OPTIONS = ("hidden_size", "num_layers", "num_heads", "max_position_embeddings", "seed")
_REGEX_CHARACTERS = set("\\*^$()[]|?+{}")
AUTOREGRESSIVE_TASK_TYPE = "CAUSAL_LM"  # TRL's default LoRA task type, replaced by None (see get_peft_config)

DESCRIPTION = f"""\
Train a masked diffusion LM (LLaDA, Dream, any bidirectional masked LM) with DiFFPO: TRL's GRPO with diffusion
rollouts, a surrogate likelihood with importance-sampling correction and, optionally, a learned sampler head.

Values come from the defaults, then the YAML file given with `{CONFIG_FLAG} FILE` (keys are the option names below;
an `env:` mapping sets environment variables), then the command line, which wins. Boolean options take an optional
value: `--use_peft`, `--use_peft true`, `--use_peft false`.

Data: `--task gsm8k|math500|countdown|sudoku` loads a registered task with its prompts and reward functions;
otherwise `--dataset_name` (a Hub id or a builder such as `json`) with `--dataset_train_files`/`--dataset_test_files`,
or a `datasets:` mixture in the YAML file. Every dataset needs a `prompt` column.

Smoke tests: `--model_name_or_path {TINY_MODEL_PREFIX}llama[,hidden_size=32,num_layers=1]` builds a tiny random model and a
character tokenizer in code (architectures: llama, qwen2, qwen3, bert, modernbert); nothing is downloaded.

Multi-GPU: `accelerate launch --config_file examples/accelerate_configs/zero2.yaml -m trl_diffpo train ...`, or
`{ACCELERATE_CONFIG_FLAG} NAME_OR_FILE` here (names: TRL's shipped configs single_gpu, multi_gpu, zero1, zero2,
zero3, fsdp1, fsdp2), which launches accelerate for you and passes it any flags this parser does not know
(e.g. `--num_processes 4`)."""

EPILOG = """\
examples:
  trl-diffpo train --config examples/configs/llada_gsm8k_diffpo.yaml
  trl-diffpo train --config examples/configs/tiny_cpu.yaml --max_steps 2 --output_dir /tmp/tiny
  accelerate launch --config_file examples/accelerate_configs/zero2.yaml \\
      -m trl_diffpo train --config examples/configs/llada_gsm8k_diffpo.yaml
See docs/cli.md and docs/scaling.md."""


SAMPLER_HEAD_PREFIX = "sampler_head_"
# SamplerHeadConfig fields exposed as `--sampler_head_<field>` (`sampler` comes from DiffpoConfig.sampler and
# `input_size` from the model)
SAMPLER_HEAD_CONFIG_OPTIONS = (
    "mlp_hidden_size",
    "threshold_min",
    "threshold_max",
    "init_threshold",
    "sigma",
    "sigma_final",
    "sigma_schedule",
    "sigma_anneal_steps",
    "init_seed",
)
_HEAD_CONFIG_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SamplerHeadConfig)}
_HEAD_CALLBACK_DEFAULTS = {
    name: parameter.default for name, parameter in inspect.signature(SamplerHeadCallback).parameters.items()
}


@dataclass
class DiffpoScriptArguments(ScriptArguments):
    """Script arguments of ``trl-diffpo train``: data, rewards and the sampler head.

    Args:
        task (`str`, *optional*):
            A registered task (``gsm8k``, ``math500``, ``countdown``, ``sudoku``): loads its train/test data with the
            task's prompt format and uses its reward functions unless ``reward_funcs`` is given. With a task,
            ``dataset_name`` is ignored; ``dataset_train_files`` / ``dataset_test_files`` replace the Hub download
            with local files in the Hub schema (offline machines).
        dataset_train_files (`list[str]`, *optional*):
            Local JSON/JSONL/CSV/Parquet files of the training split.
        dataset_test_files (`list[str]`, *optional*):
            Local files of the evaluation split.
        task_kwargs (`dict` or JSON `str`, *optional*):
            Extra keyword arguments of the task's loader (``{"generated": true}``, ``{"path": ...}``).
        max_train_samples (`int`, *optional*):
            Keep only the first N training examples.
        max_eval_samples (`int`, *optional*):
            Keep only the first N evaluation examples.
        reward_funcs (`list[str]`, *optional*):
            Reward functions by name: any ``*_reward`` function of :mod:`trl_diffpo.rewards`, TRL's
            ``accuracy_reward`` / ``think_format_reward`` / ``reasoning_accuracy_reward``, or a dotted import path.
        reward_model_name_or_path (`str`, *optional*):
            A sequence-classification reward model (Hub id or local folder), added before the reward functions.
        use_sampler_head (`bool`, defaults to `False`):
            Learn a per-prompt threshold of the adaptive sampler jointly with the model (DiFFPO's "fast" part).
        sampler_head_mode (`str`, defaults to `"joint"`):
            ``joint`` trains model and head; ``sampler_only`` freezes the model and trains only the head.
        nfe_penalty (`float`, defaults to `0.0`):
            lambda in the head's reward ``task reward - lambda * NFE / completion length``.
        sampler_head_learning_rate, sampler_head_scale_advantages, sampler_head_pretrained:
            The :class:`~trl_diffpo.SamplerHeadCallback` options ``head_learning_rate``, ``scale_advantages`` and
            ``pretrained_head``.
        sampler_head_<field>:
            One option per :class:`~trl_diffpo.sampler_head.SamplerHeadConfig` field (``mlp_hidden_size``,
            ``threshold_min``, ``threshold_max``, ``init_threshold``, ``sigma``, ``sigma_final``, ``sigma_schedule``,
            ``sigma_anneal_steps``, ``init_seed``); ``None`` keeps the head's default.
    """

    _argument_group_name = "script arguments (data, rewards, sampler head)"

    task: str | None = field(
        default=None,
        metadata={
            "help": "A registered task: gsm8k, math500, countdown or sudoku. Loads its data, prompt format and reward "
            "functions (unless --reward_funcs is given); --dataset_name is then ignored."
        },
    )
    dataset_train_files: list[str] | None = field(
        default=None,
        metadata={
            "help": "Local JSON/JSONL/CSV/Parquet file(s) of the training split (with --task: files in the task's "
            "Hub schema, for offline machines)."
        },
    )
    dataset_test_files: list[str] | None = field(
        default=None, metadata={"help": "Local file(s) of the evaluation split (see --dataset_train_files)."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N training examples (quick runs)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N evaluation examples (quick runs)."}
    )
    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Reward functions by name: a `*_reward` function of trl_diffpo.rewards (e.g. gsm8k_accuracy_reward, "
            "countdown_reward, sudoku_reward, strict_format_reward, xml_count_reward), TRL's accuracy_reward / "
            "think_format_reward / reasoning_accuracy_reward, or a dotted import path (my_module.my_reward). "
            "Default: the task's rewards."
        },
    )
    reward_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A sequence-classification reward model (Hub id or folder), used before --reward_funcs."},
    )
    task_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": "Extra keyword arguments of the task's loader, as a YAML mapping or a JSON string, e.g. "
            '\'{"generated": true}\' (countdown: procedural instances instead of the Hub) or \'{"path": "..."}\' '
            "(another Hub dataset with the same columns)."
        },
    )
    use_sampler_head: bool = field(
        default=False,
        metadata={
            "help": "Learn a per-prompt threshold for the adaptive sampler (--sampler entropy_bounded or "
            "confidence_threshold, with --threshold as the fixed fallback) jointly with the model: DiFFPO's joint "
            "training. The other sampler_head_* options only apply with it."
        },
    )
    sampler_head_mode: str = field(
        default="joint",
        metadata={
            "help": "joint: train model and head; sampler_only: freeze the model, train only the head.",
            "choices": list(SAMPLER_HEAD_MODES),
        },
    )
    nfe_penalty: float = field(
        default=0.0,
        metadata={
            "help": "lambda of the head's reward `task reward - lambda * NFE / completion length` (0: correctness only)."
        },
    )
    sampler_head_learning_rate: float | None = field(
        default=_HEAD_CALLBACK_DEFAULTS["head_learning_rate"],
        metadata={
            "help": "Learning rate of the head's own parameter group (the dLLM's LoRA rate would barely move it); "
            "None: the run's learning rate."
        },
    )
    sampler_head_scale_advantages: bool = field(
        default=_HEAD_CALLBACK_DEFAULTS["scale_advantages"],
        metadata={"help": "Divide the head's group-centred reward by the group std (as scale_rewards='group')."},
    )
    sampler_head_pretrained: str | None = field(
        default=None,
        metadata={"help": "Folder or Hub id of a saved sampler head to start from (e.g. sampler_only after joint)."},
    )
    sampler_head_mlp_hidden_size: int = field(
        default=_HEAD_CONFIG_DEFAULTS["mlp_hidden_size"],
        metadata={"help": "Width of the head's MLP hidden layer; 0 makes the head linear."},
    )
    sampler_head_threshold_min: float | None = field(
        default=None,
        metadata={"help": "Lowest threshold the head can output (None: 0.0 for EB gamma, 0.5 for confidence)."},
    )
    sampler_head_threshold_max: float | None = field(
        default=None,
        metadata={"help": "Highest threshold the head can output (None: 1.0 for EB gamma and for confidence)."},
    )
    sampler_head_init_threshold: float | None = field(
        default=None,
        metadata={
            "help": "Threshold the head outputs at initialisation (None: 0.1 for EB gamma, 0.9 for confidence)."
        },
    )
    sampler_head_sigma: float = field(
        default=_HEAD_CONFIG_DEFAULTS["sigma"],
        metadata={"help": "Exploration noise: std of the Gaussian over the head's pre-sigmoid output u."},
    )
    sampler_head_sigma_final: float | None = field(
        default=None, metadata={"help": "Exploration std at the end of annealing (None: no annealing)."}
    )
    sampler_head_sigma_schedule: str = field(
        default=_HEAD_CONFIG_DEFAULTS["sigma_schedule"],
        metadata={
            "help": "Annealing of the exploration std from sampler_head_sigma to sampler_head_sigma_final.",
            "choices": list(SIGMA_SCHEDULES),
        },
    )
    sampler_head_sigma_anneal_steps: int | None = field(
        default=None, metadata={"help": "Optimizer steps over which the std anneals (None: the run's max_steps)."}
    )
    sampler_head_init_seed: int = field(
        default=_HEAD_CONFIG_DEFAULTS["init_seed"], metadata={"help": "Seed of the head's initial weights."}
    )

    def __post_init__(self):
        if isinstance(self.task_kwargs, str):
            try:
                self.task_kwargs = json.loads(self.task_kwargs)
            except json.JSONDecodeError as error:
                raise ValueError(f"--task_kwargs must be a JSON object, got {self.task_kwargs!r}: {error}") from None
        if self.task_kwargs is not None and not isinstance(self.task_kwargs, dict):
            raise ValueError(f"task_kwargs must be a mapping of loader keyword arguments, got {self.task_kwargs!r}.")

    def sampler_head_options(self) -> dict:
        """The ``SamplerHeadConfig`` fields set by the ``sampler_head_*`` options (unset ones keep their defaults)."""
        options = {name: getattr(self, f"{SAMPLER_HEAD_PREFIX}{name}") for name in SAMPLER_HEAD_CONFIG_OPTIONS}
        return {name: value for name, value in options.items() if value is not None}


class DiffpoModelConfig(ModelConfig):
    """:class:`trl.ModelConfig`, shown as its own group in ``--help``; ``model_name_or_path`` also takes ``tiny:``."""

    _argument_group_name = "model arguments (trl.ModelConfig)"


class DiffpoDatasetMixtureConfig(DatasetMixtureConfig):
    """:class:`trl.DatasetMixtureConfig`, shown as its own group in ``--help``."""

    _argument_group_name = "dataset mixture (trl.DatasetMixtureConfig; a `datasets:` list in the YAML file)"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults and keep the description's line breaks."""


class CliError(ValueError):
    """A user error in the command line or the YAML file (reported without a traceback)."""


def make_parser(prog: str = PROG) -> TrlParser:
    """The parser of ``trl-diffpo train``: script, training, model and dataset-mixture arguments."""
    parser = TrlParser(
        (DiffpoScriptArguments, DiffpoConfig, DiffpoModelConfig, DiffpoDatasetMixtureConfig),
        prog=prog,
        usage=f"%(prog)s [{CONFIG_FLAG} FILE.yaml] [--OPTION VALUE ...]",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=_HelpFormatter,
        allow_abbrev=False,  # `--max_step` must not silently mean `--max_steps`
    )
    parser._optionals.title = "training arguments (DiffpoConfig: every GRPOConfig option plus the diffusion ones)"
    return parser


def _option_names(parser: argparse.ArgumentParser) -> list[str]:
    return sorted({action.dest for action in parser._actions if action.dest != "help"})


def _did_you_mean(name: str, known: list[str]) -> str:
    matches = difflib.get_close_matches(name.lstrip("-").replace("-", "_"), known, n=3, cutoff=0.6)
    return f" (did you mean {', '.join('--' + match for match in matches)}?)" if matches else ""


def _split_config_flag(argv: list[str]) -> tuple[list[str], str | None]:
    """Remove ``--config FILE`` / ``--config=FILE`` from ``argv``; check the file exists."""
    argv = list(argv)
    config_path = None
    for index, item in enumerate(argv):
        if item == CONFIG_FLAG:
            if index + 1 >= len(argv) or argv[index + 1].startswith("--"):
                raise CliError(f"{CONFIG_FLAG} needs a YAML file: {CONFIG_FLAG} path/to/config.yaml")
            config_path = argv[index + 1]
            del argv[index : index + 2]
            break
        if item.startswith(CONFIG_FLAG + "="):
            config_path = item.split("=", 1)[1]
            del argv[index]
            break
    if CONFIG_FLAG in argv or any(item.startswith(CONFIG_FLAG + "=") for item in argv):
        raise CliError(f"{CONFIG_FLAG} was given more than once; give one YAML file (flags override its values).")
    if config_path is not None and not Path(config_path).is_file():
        raise CliError(f"config file {config_path!r} does not exist.")
    return argv, config_path


def parse_args(
    argv: list[str] | None = None, return_remaining_strings: bool = False
) -> tuple[DiffpoScriptArguments, DiffpoConfig, ModelConfig, DatasetMixtureConfig]:
    """Parse ``argv`` (and the YAML file of ``--config``) into the four dataclasses.

    Raises:
        CliError: for a missing config file, a YAML file that is not a mapping, unknown keys or flags, or values the
            dataclasses reject (e.g. an inconsistent ``DiffpoConfig``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, config_path = _split_config_flag(argv)
    parser = make_parser()
    known = _option_names(parser)
    if config_path is not None:
        argv = [CONFIG_FLAG, config_path, *argv]
    try:
        outputs = parser.parse_args_and_config(argv, return_remaining_strings=True, separate_remaining_strings=True)
    except Exception as error:  # DiffpoConfig/GRPOConfig validation, YAML syntax, TrlParser's own checks
        raise CliError(f"invalid configuration: {error}") from error
    *dataclasses_, config_remaining, cli_remaining = outputs
    if config_remaining:
        unknown = [item[2:] for item in config_remaining[::2]]
        hints = "; ".join(f"{name!r}{_did_you_mean(name, known)}" for name in unknown)
        raise CliError(f"unknown key(s) in {config_path}: {hints}. Run `{PROG} --help` for the options.")
    if cli_remaining and not return_remaining_strings:
        flags = [item for item in cli_remaining if item.startswith("-")] or cli_remaining
        hints = "; ".join(f"{flag}{_did_you_mean(flag, known)}" for flag in flags)
        raise CliError(f"unrecognized argument(s): {hints}. Run `{PROG} --help` for the options.")
    script_args, training_args, model_args, dataset_args = dataclasses_
    _check_script_args(script_args, training_args, model_args)
    if return_remaining_strings:
        return script_args, training_args, model_args, dataset_args, cli_remaining
    return script_args, training_args, model_args, dataset_args


def _check_script_args(
    script_args: DiffpoScriptArguments, training_args: DiffpoConfig, model_args: ModelConfig
) -> None:
    if model_args.model_name_or_path is None:
        raise CliError("no model: set model_name_or_path in the YAML file or pass --model_name_or_path.")
    for name in ("max_train_samples", "max_eval_samples"):
        value = getattr(script_args, name)
        if value is not None and value <= 0:
            raise CliError(f"--{name} must be a positive number of examples, got {value}.")
    if script_args.use_sampler_head:
        if training_args.sampler not in ADAPTIVE_SAMPLERS:
            raise CliError(
                f"--use_sampler_head learns the threshold of an adaptive sampler, but --sampler is "
                f"{training_args.sampler!r}: use --sampler {' or '.join(ADAPTIVE_SAMPLERS)} (with --threshold)."
            )
        build_sampler_head_callback(script_args)  # validates mode, penalty, learning rate
        try:
            SamplerHeadConfig(sampler=training_args.sampler, **script_args.sampler_head_options())
        except ValueError as error:
            raise CliError(f"invalid sampler head options: {error}") from error


# --------------------------------------------------------------------------------------------------------------------
# Model


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

    model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
    }
    model_init_kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = model_init_kwargs
    tokenizer = AutoTokenizer.from_pretrained(
        name,
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        padding_side="left",
    )
    return name, tokenizer


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


# --------------------------------------------------------------------------------------------------------------------
# Rewards


def available_reward_functions() -> dict:
    """Reward functions selectable by name: trl_diffpo's ``*_reward`` functions, then TRL's."""
    from .. import rewards

    registry = {
        name: getattr(rewards, name)
        for name in getattr(rewards, "__all__", dir(rewards))
        if name.endswith("_reward") and callable(getattr(rewards, name, None))
    }
    try:
        trl_rewards = importlib.import_module("trl.rewards")
    except ImportError:  # pragma: no cover - trl.rewards ships with trl 1.16
        trl_rewards = None
    for name in ("accuracy_reward", "reasoning_accuracy_reward", "think_format_reward"):
        if trl_rewards is not None and hasattr(trl_rewards, name):
            registry.setdefault(name, getattr(trl_rewards, name))
    return registry


def resolve_reward_funcs(names: list[str]) -> list:
    """Reward callables for ``names`` (registered names or dotted import paths)."""
    registry = available_reward_functions()
    resolved = []
    for name in names:
        if name in registry:
            resolved.append(registry[name])
        elif "." in name:
            module_path, attribute = name.rsplit(".", 1)
            sys.path.insert(0, os.getcwd())
            try:
                function = getattr(importlib.import_module(module_path), attribute)
            except (ImportError, AttributeError) as error:
                raise CliError(f"cannot import reward function {name!r}: {error}") from error
            if not callable(function):
                raise CliError(f"reward function {name!r} is not callable.")
            resolved.append(function)
        else:
            raise CliError(
                f"unknown reward function {name!r}{_did_you_mean(name, sorted(registry))}. Known: "
                f"{', '.join(sorted(registry))}, or give a dotted import path (my_module.my_reward)."
            )
    return resolved


# --------------------------------------------------------------------------------------------------------------------
# Data


def _limit(dataset, num_examples: int | None):
    if dataset is None or num_examples is None:
        return dataset
    return dataset.select(range(min(num_examples, len(dataset))))


def load_datasets(script_args, training_args, dataset_args, tokenizer=None):
    """``(train_dataset, eval_dataset, task)``; the eval split only when ``eval_strategy != "no"``; ``task`` is the
    registered :class:`~trl_diffpo.tasks.Task` with ``--task``, else ``None``."""
    from datasets import load_dataset
    from trl import get_dataset

    want_eval = str(getattr(training_args.eval_strategy, "value", training_args.eval_strategy)) != "no"
    train_split, test_split = script_args.dataset_train_split, script_args.dataset_test_split
    task = None
    if script_args.task is not None:
        train, evaluation, task = _load_task(script_args, tokenizer, want_eval)
    elif dataset_args.datasets:
        if script_args.dataset_name:
            logger.warning("Both `datasets` and `dataset_name` are given: the `datasets` mixture is used.")
        mixture = get_dataset(dataset_args)
        train = mixture[train_split] if train_split in mixture else mixture["train"]
        evaluation = mixture.get(test_split) if want_eval else None
    elif script_args.dataset_train_files:
        from ..data import load_raw

        # the file extension picks the builder (json, csv, parquet)
        train = load_raw("", train_split, data_files=script_args.dataset_train_files)
        evaluation = (
            load_raw("", test_split, data_files=script_args.dataset_test_files)
            if want_eval and script_args.dataset_test_files
            else None
        )
    elif script_args.dataset_name:
        dataset = load_dataset(
            script_args.dataset_name, name=script_args.dataset_config, streaming=script_args.dataset_streaming
        )
        if train_split not in dataset:
            raise CliError(
                f"dataset {script_args.dataset_name!r} has no split {train_split!r} (splits: {list(dataset)}); "
                "set --dataset_train_split."
            )
        train = dataset[train_split]
        evaluation = dataset[test_split] if want_eval and test_split in dataset else None
    else:
        raise CliError(
            "no data: give --task (gsm8k, math500, countdown, sudoku), --dataset_name, --dataset_train_files or a "
            "`datasets:` list in the YAML file."
        )
    if want_eval and evaluation is None:
        raise CliError(
            f"eval_strategy={training_args.eval_strategy!r} needs an evaluation split, but none was found; set "
            "--eval_strategy no or give one (--dataset_test_split / --dataset_test_files)."
        )
    train = _limit(train, script_args.max_train_samples)
    evaluation = _limit(evaluation, script_args.max_eval_samples)
    if "prompt" not in train.column_names:
        raise CliError(
            f"the training data has no `prompt` column (columns: {train.column_names}); TRL needs one. Rename the "
            "column or use --task."
        )
    return train, evaluation, task


def _load_task(script_args, tokenizer, want_eval: bool):
    """Train/eval data and the task (for its rewards) of a registered task (see :mod:`trl_diffpo.tasks`)."""
    from ..tasks import get_task

    try:
        task = get_task(script_args.task)
    except KeyError as error:
        raise CliError(error.args[0]) from error
    loader_kwargs = dict(script_args.task_kwargs or {})
    if task.train_split is None and not (script_args.dataset_train_files or "path" in loader_kwargs):
        raise CliError(
            f"task {task.name!r} has no training split ({task.notes}) From the command line: "
            '--dataset_train_files FILE (problem/answer columns) or --task_kwargs \'{"path": "HUB_ID"}\'.'
        )

    def load(split: str, files, num_examples):
        try:
            return task.load(split, data_files=files, tokenizer=tokenizer, num_examples=num_examples, **loader_kwargs)
        except TypeError as error:  # an unknown --task_kwargs key
            raise CliError(f"task {task.name!r} loader: {error} (check --task_kwargs).") from error

    train = load(script_args.dataset_train_split, script_args.dataset_train_files, script_args.max_train_samples)
    evaluation = (
        load(script_args.dataset_test_split, script_args.dataset_test_files, script_args.max_eval_samples)
        if want_eval
        else None
    )
    return train, evaluation, task


# --------------------------------------------------------------------------------------------------------------------
# Sampler head


def build_sampler_head_callback(script_args: DiffpoScriptArguments) -> SamplerHeadCallback | None:
    """The :class:`~trl_diffpo.SamplerHeadCallback` for ``--use_sampler_head`` (``None`` without it)."""
    if not script_args.use_sampler_head:
        return None
    try:
        return SamplerHeadCallback(
            mode=script_args.sampler_head_mode,
            nfe_penalty=script_args.nfe_penalty,
            scale_advantages=script_args.sampler_head_scale_advantages,
            head_learning_rate=script_args.sampler_head_learning_rate,
            pretrained_head=script_args.sampler_head_pretrained,
            **script_args.sampler_head_options(),
        )
    except (TypeError, ValueError) as error:
        raise CliError(f"invalid sampler head options: {error}") from error


# --------------------------------------------------------------------------------------------------------------------
# Main


def train(script_args, training_args, model_args, dataset_args):
    """Build the trainer from parsed arguments, train, save (and push); returns the trainer."""
    from ..trainer import DiffpoTrainer

    model, tokenizer = build_model(model_args, training_args)
    train_dataset, eval_dataset, task = load_datasets(script_args, training_args, dataset_args, tokenizer)
    if script_args.reward_funcs:
        reward_funcs = resolve_reward_funcs(script_args.reward_funcs)
    elif task is not None:
        reward_funcs = list(task.reward_funcs)
        if training_args.reward_weights is None and not script_args.reward_model_name_or_path:
            # the task's suggested weights go with the task's rewards
            training_args.reward_weights = list(task.reward_weights)
    else:
        reward_funcs = []
    if script_args.reward_model_name_or_path:
        reward_funcs = [script_args.reward_model_name_or_path, *reward_funcs]
    if not reward_funcs:
        raise CliError(
            "no reward: give --task (which brings its rewards), --reward_funcs or --reward_model_name_or_path."
        )
    callback = build_sampler_head_callback(script_args)

    trainer = DiffpoTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        callbacks=[callback] if callback is not None else None,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.accelerator.print("Training completed.")
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.task or script_args.dataset_name)
        trainer.accelerator.print(f"Model pushed to the Hub: https://huggingface.co/{trainer.hub_model_id}.")
    return trainer


def launch_with_accelerate(argv: list[str], launch_command_fn=None) -> int:
    """``--accelerate_config NAME|FILE``: re-run this command under ``accelerate launch`` (like ``trl grpo``).

    Flags this parser does not know (``--num_processes``, ``--main_process_port`` ...) go to ``accelerate launch``;
    everything else goes to the training processes.
    """
    from accelerate.commands.launch import launch_command, launch_command_parser
    from trl.cli.accelerate_config import resolve_accelerate_config_argument

    from .cpu_deepspeed import adapt_for_cpu_deepspeed

    index = argv.index(ACCELERATE_CONFIG_FLAG)
    if index + 1 >= len(argv):
        raise CliError(f"{ACCELERATE_CONFIG_FLAG} needs a value: a file or one of TRL's names (zero2, zero3, ...).")
    accelerate_config = argv[index : index + 2]
    script_argv = argv[:index] + argv[index + 2 :]
    _, training_args, *_, cli_remaining = parse_args(script_argv, return_remaining_strings=True)
    try:
        launch_args = resolve_accelerate_config_argument(accelerate_config + cli_remaining)
    except ValueError as error:
        raise CliError(str(error)) from error
    training_argv = _remove_subsequence(script_argv, cli_remaining)
    accelerate_args = launch_command_parser().parse_args([*launch_args, "-m", __name__, *training_argv])
    accelerate_args.training_script_args += adapt_for_cpu_deepspeed(accelerate_args, training_args)
    (launch_command_fn or launch_command)(accelerate_args)
    return 0


def _remove_subsequence(items: list[str], subsequence: list[str]) -> list[str]:
    remaining = iter(subsequence)
    current = next(remaining, None)
    result = []
    for item in items:
        if current is not None and item == current:
            current = next(remaining, None)
        else:
            result.append(item)
    return result


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``trl-diffpo train`` (and ``python -m trl_diffpo.scripts.train``); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(
            f"usage: {PROG} [{CONFIG_FLAG} FILE.yaml] [--OPTION VALUE ...]\n"
            f"{PROG}: error: nothing to train: give {CONFIG_FLAG} FILE.yaml (recipes in examples/configs/) and/or "
            f"options; `{PROG} --help` lists them.",
            file=sys.stderr,
        )
        return 2
    try:
        if ACCELERATE_CONFIG_FLAG in argv:
            return launch_with_accelerate(argv)
        script_args, training_args, model_args, dataset_args = parse_args(argv)
        trainer = train(script_args, training_args, model_args, dataset_args)
    except CliError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    if hasattr(trainer, "end"):
        trainer.end()
    return 0


if __name__ == "__main__":  # pragma: no cover - `accelerate launch -m trl_diffpo.scripts.train`
    sys.exit(main())
