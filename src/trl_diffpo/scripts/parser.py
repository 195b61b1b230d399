"""The parser of ``trl-diffpo train``: TRL's ``TrlParser`` over four dataclasses, a YAML file and flags, with
one-line errors and a ``--help`` that leads with DiFFPO's own options."""

import argparse
import sys
from pathlib import Path

from trl import DatasetMixtureConfig, ModelConfig, TrlParser

from ..config import DiffpoConfig
from ..sampler_head import SamplerHeadConfig
from ..samplers import ADAPTIVE_SAMPLERS
from .arguments import (
    SAMPLER_HEAD_CONFIG_OPTIONS,
    DiffpoDatasetMixtureConfig,
    DiffpoModelConfig,
    DiffpoScriptArguments,
    build_sampler_head_callback,
)
from .errors import CliError, did_you_mean
from .model_loading import TINY_MODEL_PREFIX

PROG = "trl-diffpo train"
CONFIG_FLAG = "--config"
ACCELERATE_CONFIG_FLAG = "--accelerate_config"

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


# `--help` shows these groups first, in this order, then TRL's (script, model, mixture and training arguments)
DIFFPO_OPTION_GROUPS = {
    "DiFFPO decoding (the diffusion sampler of the rollouts)": (
        "max_completion_length",
        "block_length",
        "diffusion_steps",
        "sampler",
        "threshold",
        "temperature",
        "stop_at_eos",
        "mask_token_id",
    ),
    "DiFFPO surrogate likelihood and importance sampling": (
        "likelihood",
        "num_stages",
        "p_mask_prompt",
        "is_correction",
        "is_clamp",
        "surrogate_seed",
    ),
    "DiFFPO sampler head (learned per-prompt threshold)": (
        "use_sampler_head",
        "sampler_head_mode",
        "nfe_penalty",
        "sampler_head_learning_rate",
        "sampler_head_scale_advantages",
        "sampler_head_pretrained",
        *(f"sampler_head_{name}" for name in SAMPLER_HEAD_CONFIG_OPTIONS),
    ),
    "task, data and rewards": (
        "task",
        "task_kwargs",
        "dataset_train_files",
        "dataset_test_files",
        "max_train_samples",
        "max_eval_samples",
        "reward_funcs",
        "reward_model_name_or_path",
        "reward_timeout_s",
        "reward_batch_budget_s",
        "reward_num_workers",
    ),
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults and keep the description's line breaks."""


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
    parser._optionals.title = "TRL training arguments (the rest of DiffpoConfig: GRPOConfig, TrainingArguments)"
    _lead_with_diffpo_groups(parser)
    return parser


def _lead_with_diffpo_groups(parser: argparse.ArgumentParser) -> None:
    """Move DiFFPO's own options into :data:`DIFFPO_OPTION_GROUPS` and list those groups first in ``--help``.

    Only the help layout changes: parsing reads ``parser._actions``, which groups do not touch.
    """
    actions: dict[str, list[argparse.Action]] = {}
    for action in parser._actions:  # a boolean option has two actions: --flag and --no_flag
        actions.setdefault(action.dest, []).append(action)
    groups = []
    for title, names in {"options": ("help",), **DIFFPO_OPTION_GROUPS}.items():
        group = parser.add_argument_group(title)
        group._group_actions.extend(_take(parser, action) for name in names for action in actions[name])
        groups.append(group)
    rest = [group for group in parser._action_groups if group not in groups and group._group_actions]
    parser._action_groups[:] = groups + rest


def _take(parser: argparse.ArgumentParser, action: argparse.Action) -> argparse.Action:
    for group in parser._action_groups:
        if action in group._group_actions:
            group._group_actions.remove(action)
    return action


def _option_names(parser: argparse.ArgumentParser) -> list[str]:
    return sorted({action.dest for action in parser._actions if action.dest != "help"})


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
        hints = "; ".join(f"{name!r}{did_you_mean(name, known)}" for name in unknown)
        raise CliError(f"unknown key(s) in {config_path}: {hints}. Run `{PROG} --help` for the options.")
    if cli_remaining and not return_remaining_strings:
        flags = [item for item in cli_remaining if item.startswith("-")] or cli_remaining
        hints = "; ".join(f"{flag}{did_you_mean(flag, known)}" for flag in flags)
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
