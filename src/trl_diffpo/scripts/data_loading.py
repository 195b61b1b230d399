"""The data and reward functions of ``trl-diffpo train``: a registered task, local files, a Hub dataset or a mixture."""

import importlib
import logging
import os
import sys

from .errors import CliError, did_you_mean

logger = logging.getLogger(__name__)


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
                f"unknown reward function {name!r}{did_you_mean(name, sorted(registry))}. Known: "
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

    from .local_files import check_data_files

    check_data_files(script_args.dataset_train_files, "--dataset_train_files")
    check_data_files(script_args.dataset_test_files, "--dataset_test_files")
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
