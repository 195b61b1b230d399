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

import sys
import warnings

from ..progress import use_compact_progress
from ..rewards import prepare_reward_funcs
from .arguments import (  # noqa: F401 - the public names of this module before it was split
    SAMPLER_HEAD_CONFIG_OPTIONS,
    DiffpoDatasetMixtureConfig,
    DiffpoModelConfig,
    DiffpoScriptArguments,
    build_sampler_head_callback,
)
from .data_loading import available_reward_functions, load_datasets, resolve_reward_funcs  # noqa: F401
from .errors import CliError
from .local_files import check_resume_checkpoint
from .model_loading import TINY_MODEL_PREFIX, build_model, get_peft_config, parse_tiny_spec  # noqa: F401
from .parser import ACCELERATE_CONFIG_FLAG, CONFIG_FLAG, DIFFPO_OPTION_GROUPS, PROG, make_parser, parse_args  # noqa: F401


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
    reward_funcs = prepare_reward_funcs(reward_funcs, training_args)  # verifier limits; time and fallback metrics
    callback = build_sampler_head_callback(script_args)
    check_resume_checkpoint(training_args.resume_from_checkpoint)

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
    use_compact_progress(trainer)
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
    # TRL 1.16 reads `model.is_gradient_checkpointing`, which transformers >= 5.23 deprecates, on every step
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
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
