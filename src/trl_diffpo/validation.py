"""Checks on what the Python API of :class:`trl_diffpo.DiffpoTrainer` is given, with errors that name the fix.

- **Datasets** (at construction): a ``prompt`` column, at least one row, and (for training) enough distinct prompts
  for one generation batch; otherwise TRL fails at step 1 with ``KeyError: 'prompt'`` or trains 0 steps and exits 0.
- **Sequence length** (:class:`PromptLengthGuard`): ``DiffpoConfig.max_prompt_length`` keeps the last tokens of longer
  prompts (the left truncation TRL applied before 1.16 removed the option); a prompt plus the canvas that exceeds a
  model's learned position table (BERT: 512) is refused with the numbers, instead of a shape error deep in torch; a
  RoPE model past ``max_position_embeddings`` (it runs, out of its trained range) gets one warning.
- **Reward values** (:func:`check_reward_output`): one float (or ``None``) per completion, else an error naming the
  function, the row and the value (TRL would fail in ``torch.tensor`` with ``too many dimensions 'str'``).
- **Unscorable batches** (:class:`UnscorableStreak`): a generation batch in which every reward function returned
  ``None``/NaN for every completion trains at zero gradient. Each is counted and warned about; after
  ``DiffpoConfig.max_unscorable_steps`` consecutive ones training stops with an error.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from accelerate.logging import get_logger
from torch import nn

logger = get_logger(__name__)

PROMPT_COLUMN = "prompt"
# Submodule names of learned absolute position tables (BERT / RoBERTa / GPT-2 style): positions beyond them crash.
_POSITION_TABLE_NAMES = ("position_embeddings", "wpe")


# ------------------------------------------------------------------------------------------------------- datasets


def _column_names(dataset) -> list[str] | None:
    names = getattr(dataset, "column_names", None)
    if names is not None:
        return list(names)
    try:  # a torch-style dataset of dict rows
        first = dataset[0]
    except Exception:  # noqa: BLE001 (unknown dataset type: nothing to check)
        return None
    return list(first) if isinstance(first, dict) else None


def check_dataset(dataset, name: str) -> None:
    """Refuse an empty ``dataset`` or one without a ``prompt`` column; ``name`` says which argument it was."""
    if dataset is None:
        return
    if isinstance(dataset, dict):  # eval_dataset={"name": dataset, ...}
        for key, value in dataset.items():
            check_dataset(value, f"{name}[{key!r}]")
        return
    size = len(dataset) if hasattr(dataset, "__len__") else None
    if size == 0:
        raise ValueError(
            f"{name} is empty (0 rows): there is nothing to generate from. Check the file or split it was loaded "
            "from (an empty JSONL, a filter that removed every row)."
        )
    columns = _column_names(dataset)
    if columns is not None and PROMPT_COLUMN not in columns:
        hint = next(
            (c for c in ("question", "problem", "query", "input", "text", "instruction") if c in columns), None
        )
        rename = (
            f"dataset.rename_column({hint!r}, 'prompt')" if hint else "dataset.rename_column(<your column>, 'prompt')"
        )
        raise ValueError(
            f"{name} has no {PROMPT_COLUMN!r} column (columns: {', '.join(columns) or 'none'}). DiffpoTrainer, like "
            f"GRPOTrainer, reads each prompt from a {PROMPT_COLUMN!r} column (a string, or a list of chat messages): "
            f"rename yours, e.g. {rename}."
        )


def check_datasets(train_dataset, eval_dataset, args) -> None:
    """Check both datasets, and that the training set fills at least one generation batch."""
    check_dataset(train_dataset, "train_dataset")
    check_dataset(eval_dataset, "eval_dataset")
    if train_dataset is None or not hasattr(train_dataset, "__len__"):
        return
    prompts_per_batch = args.generation_batch_size // args.num_generations
    if len(train_dataset) < prompts_per_batch:
        raise ValueError(
            f"train_dataset has {len(train_dataset)} prompt(s), but one generation batch takes {prompts_per_batch} "
            f"distinct prompts (generation_batch_size={args.generation_batch_size} / num_generations="
            f"{args.num_generations}); TRL drops incomplete batches, so training would run 0 steps. Add prompts, or "
            "lower per_device_train_batch_size / steps_per_generation (or raise num_generations)."
        )


# ------------------------------------------------------------------------------------------------ sequence length


def position_limit(model: nn.Module) -> tuple[int | None, bool]:
    """``(limit, hard)``: how many positions ``model`` takes, and whether more crash (a learned position table) or
    only leave the trained range (RoPE: ``max_position_embeddings`` / LLaDA's ``max_sequence_length``)."""
    tables = [
        module.num_embeddings
        for name, module in model.named_modules()
        if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in _POSITION_TABLE_NAMES
    ]
    if tables:
        return min(tables), True
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "max_sequence_length", None)
    return (int(limit) if isinstance(limit, int) and limit > 0 else None), False


class PromptLengthGuard:
    """Truncates prompts to ``max_prompt_length`` (keeping their end) and refuses what the model cannot hold.

    Args:
        model: the policy (its position limit is read once).
        max_prompt_length: ``DiffpoConfig.max_prompt_length`` (``None``: no truncation).
        completion_length: the canvas length (``max_completion_length``).
        pad_to_multiple_of: TRL's prompt padding multiple (the padded width is what the model sees).
    """

    def __init__(
        self, model: nn.Module, max_prompt_length: int | None, completion_length: int, pad_to_multiple_of=None
    ):
        self.limit, self.hard = position_limit(model)
        self.model_name = type(model).__name__
        self.max_prompt_length = max_prompt_length
        self.completion_length = completion_length
        self.multiple = pad_to_multiple_of or 1
        self.truncated_prompts = 0
        self._warned = False
        if self.hard and self.limit is not None:
            room = self.limit - completion_length
            if room < 1:
                raise ValueError(
                    f"max_completion_length={completion_length} leaves no room for a prompt in {self.model_name}, "
                    f"which holds {self.limit} positions: lower max_completion_length."
                )
            if max_prompt_length is not None and max_prompt_length > room:
                raise ValueError(
                    f"max_prompt_length={max_prompt_length} + max_completion_length={completion_length} exceeds the "
                    f"{self.limit} positions {self.model_name} holds: set max_prompt_length <= {room}."
                )

    def __call__(self, prompt_ids: list[list[int]], metrics: dict[str, list] | None = None) -> list[list[int]]:
        """The (truncated) prompt ids; raises when a padded prompt plus the canvas exceeds a hard position limit."""
        if self.max_prompt_length is not None:
            cut = [len(ids) > self.max_prompt_length for ids in prompt_ids]
            prompt_ids = [list(ids[-self.max_prompt_length :]) if long else ids for ids, long in zip(prompt_ids, cut)]
            self.truncated_prompts += sum(cut)
            if metrics is not None:
                metrics["prompts/truncated_frac"].append(sum(cut) / max(len(cut), 1))
        longest = max((len(ids) for ids in prompt_ids), default=0)
        width = math.ceil(longest / self.multiple) * self.multiple + self.completion_length
        if self.limit is None or width <= self.limit:
            return prompt_ids
        if self.hard:
            room = self.limit - self.completion_length
            raise ValueError(
                f"A prompt of {longest} tokens plus the {self.completion_length}-token canvas (max_completion_length) "
                f"needs {width} positions, but {self.model_name} holds {self.limit}. Set "
                f"DiffpoConfig(max_prompt_length={room}) to keep the last {room} tokens of longer prompts, shorten "
                "the prompts, or lower max_completion_length."
            )
        if not self._warned:
            self._warned = True
            logger.warning(
                f"A prompt of {longest} tokens plus the {self.completion_length}-token canvas needs {width} positions, "
                f"beyond the {self.limit} {self.model_name} was trained for (max_position_embeddings): decoding runs, "
                "out of the trained range. Set max_prompt_length to truncate prompts. (Warned once.)"
            )
        return prompt_ids


# ----------------------------------------------------------------------------------------------------- rewards


def _is_reward_value(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and not value.is_complex()
    return isinstance(value, numbers.Real)


def check_reward_output(name: str, output: Any, num_completions: int | None) -> Any:
    """Return ``output`` if it is one float-like value (or ``None``) per completion (``num_completions``; ``None``:
    not checked); raise naming the function, the row and the value otherwise."""
    if isinstance(output, (str, bytes)) or not hasattr(output, "__len__"):
        raise TypeError(
            f"Reward function {name!r} returned {type(output).__name__} {output!r:.80}; it must return a list with "
            "one float (or None) per completion."
        )
    if num_completions is not None and len(output) != num_completions:
        raise ValueError(
            f"Reward function {name!r} returned {len(output)} rewards for {num_completions} completions; return "
            "exactly one float (or None when not applicable) per completion, in order."
        )
    for index, value in enumerate(output):
        if not _is_reward_value(value):
            raise TypeError(
                f"Reward function {name!r} returned {value!r:.80} ({type(value).__name__}) for completion {index}; "
                "rewards must be numbers (or None when not applicable): convert with float(...)."
            )
    return output


class UnscorableStreak:
    """Counts generation batches in which no completion got any reward, and stops training after ``limit`` in a row.

    Args:
        limit: ``DiffpoConfig.max_unscorable_steps`` (0: count and warn, never stop).
    """

    def __init__(self, limit: int):
        self.limit = int(limit)
        self.consecutive = 0
        self.total = 0

    def update(self, rewards_per_func: torch.Tensor, reward_names: list[str], global_step: int) -> None:
        """Update with one generation batch's gathered ``(num_completions, num_funcs)`` rewards (NaN = none)."""
        if not bool(torch.isnan(rewards_per_func).all()):
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total += 1
        names = ", ".join(repr(name) for name in reward_names)
        message = (
            f"Step {global_step}: no completion of this generation batch got a reward ({names} returned None or NaN "
            f"for all {rewards_per_func.shape[0]} completions), so it trains at zero gradient. "
            f"{self.consecutive} such batch(es) in a row"
        )
        if self.limit and self.consecutive >= self.limit:
            raise RuntimeError(
                f"{message}: stopping (max_unscorable_steps={self.limit}). Check that the reward functions can read "
                "the completions and the dataset columns they need, or set max_unscorable_steps=0 to only warn."
            )
        limit = f" of max_unscorable_steps={self.limit} before training stops" if self.limit else ""
        logger.warning(f"{message}{limit}.")

    def state_dict(self) -> dict[str, int]:
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consecutive, self.total = int(state["consecutive"]), int(state["total"])
