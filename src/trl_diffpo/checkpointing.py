"""Exact resume for :class:`trl_diffpo.DiffpoTrainer`: what a checkpoint needs beyond what the Trainer saves.

transformers' ``Trainer`` saves the model (or adapter), optimizer, LR scheduler, trainer state and the global RNGs
(python, numpy, torch); the sampler head saves its own files. A DiFFPO run also carries:

- the **rollout generator** (Gumbel noise and random orders of diffusion decoding) and the **surrogate generator**
  (prompt masks and cut points): both are local ``torch.Generator`` objects seeded once in ``__init__``;
- TRL's **generation cycle**: with ``num_iterations * steps_per_generation > 1`` one generation batch serves several
  micro-steps; its micro-step counter ``_step`` selects the slice and the inner iteration, and ``_buffered_inputs``
  holds the batch (rollouts, rewards, advantages, old log-probs, the surrogate draws). A checkpoint inside a cycle
  keeps the batch, so the resumed run continues the cycle instead of regenerating;
- the **data order**: TRL's ``RepeatSampler`` draws one permutation per epoch from its own generator, which a new
  run re-seeds, so a run resumed in epoch 2 would replay epoch 1's order; :class:`ResumableRepeatSampler` keeps the
  generator state the checkpoint's epoch started from;
- the **unscorable-batch streak** (:mod:`trl_diffpo.validation`) and the **sampler head callback's** rollout-time
  state (the frozen behaviour head of its PPO ratio, its fallback counters).

They go to ``diffpo_state.pt`` (``diffpo_state_<rank>.pt`` with several processes) inside ``checkpoint-N/``, written
where the Trainer writes its RNG state, so every push of a checkpoint folder carries it.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import torch
from accelerate.logging import get_logger
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from trl.trainer.utils import RepeatSampler

from .sampler_head import HEAD_CONFIG_NAME, HEAD_WEIGHTS_NAME

logger = get_logger(__name__)

DIFFPO_STATE_NAME = "diffpo_state.pt"
DIFFPO_STATE_VERSION = 2
# `resume_from_checkpoint` values that mean "the last checkpoint in output_dir" (the CLI passes strings).
LATEST_CHECKPOINT_WORDS = ("true", "latest", "last")
_NO_RESUME_WORDS = ("", "false", "none", "no")
_MODEL_FILES = (
    ("adapter", ("adapter_model.safetensors", "adapter_model.bin")),
    ("model weights", ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")),
)


def state_file_name(process_index: int, world_size: int) -> str:
    """``diffpo_state.pt`` in a single-process run, ``diffpo_state_<rank>.pt`` otherwise (as the Trainer's RNG files)."""
    return DIFFPO_STATE_NAME if world_size <= 1 else f"diffpo_state_{process_index}.pt"


def resolve_resume_checkpoint(resume_from_checkpoint: str | bool | None, output_dir: str) -> str | None:
    """The checkpoint folder ``train(resume_from_checkpoint=...)`` means, or ``None`` for a fresh start.

    ``True`` and the strings ``"true"`` / ``"latest"`` / ``"last"`` (any case: the CLI passes strings) mean the last
    ``checkpoint-N`` in ``output_dir``; ``False``, ``None``, ``""`` and ``"false"`` mean no resume; any other string is
    a checkpoint folder.
    """
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    if isinstance(resume_from_checkpoint, str) and resume_from_checkpoint.strip().lower() in _NO_RESUME_WORDS:
        return None
    latest = resume_from_checkpoint is True or (
        isinstance(resume_from_checkpoint, str) and resume_from_checkpoint.strip().lower() in LATEST_CHECKPOINT_WORDS
    )
    if latest:
        folder = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if folder is None:
            raise ValueError(
                f"resume_from_checkpoint={resume_from_checkpoint!r} resumes the last {PREFIX_CHECKPOINT_DIR}-N folder "
                f"in output_dir={output_dir!r}, but there is none. Give a checkpoint folder, or drop "
                "resume_from_checkpoint to start from scratch."
            )
        return folder
    folder = os.fspath(resume_from_checkpoint)
    if not os.path.isdir(folder):
        raise ValueError(
            f"resume_from_checkpoint={folder!r} is not a folder. Give a {PREFIX_CHECKPOINT_DIR}-N folder written by a "
            f"previous run, or {'/'.join(LATEST_CHECKPOINT_WORDS)} for the last one in output_dir ({output_dir!r})."
        )
    return folder


class ResumableRepeatSampler(RepeatSampler):
    """TRL's ``RepeatSampler`` that remembers the generator state its current epoch's permutation was drawn from.

    :meth:`resume_state` is the state a resumed run must start its first epoch from: the current epoch's start when
    a checkpoint falls inside an epoch (the Trainer then replays that epoch and skips the batches already trained),
    the state after the last permutation when the epoch has been read to its end (the resumed run starts the next).
    """

    @classmethod
    def wrap(cls, sampler: RepeatSampler, resume_state: torch.Tensor | None = None) -> ResumableRepeatSampler:
        resumable = cls.__new__(cls)
        resumable.__dict__.update(sampler.__dict__)
        if resume_state is not None and resumable.shuffle:
            resumable.generator.set_state(resume_state)
        resumable._epoch_start_state = resumable.generator.get_state() if resumable.shuffle else None
        resumable._exhausted = False
        return resumable

    def __iter__(self):
        if self.shuffle:
            self._epoch_start_state = self.generator.get_state()
        self._exhausted = False
        yield from super().__iter__()
        self._exhausted = True

    def resume_state(self) -> torch.Tensor | None:
        if not self.shuffle:
            return None
        return self.generator.get_state() if self._exhausted else self._epoch_start_state


def resumable_train_sampler(trainer, sampler):
    """Wrap TRL's train sampler (applying a restored data-order state) and keep it where the checkpoint finds it."""
    if isinstance(sampler, RepeatSampler):
        sampler = ResumableRepeatSampler.wrap(sampler, getattr(trainer, "_restored_sampler_state", None))
    trainer._restored_sampler_state = None  # used once: a later train() without resume starts from the seed
    trainer._diffpo_train_sampler = sampler
    return sampler


def _to_device(value: Any, device: torch.device | str) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {key: _to_device(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(item, device) for item in value)
    return value


def _generate_every(trainer) -> int:
    return trainer.args.steps_per_generation * trainer.num_iterations


def _cycle_shape(trainer) -> list[int]:
    args = trainer.args
    return [args.steps_per_generation, trainer.num_iterations, args.per_device_train_batch_size]


def in_generation_cycle(trainer) -> bool:
    """Whether the next micro-step reuses the buffered generation batch (a checkpoint here is "mid-cycle")."""
    return trainer._buffered_inputs is not None and trainer._step % _generate_every(trainer) != 0


def diffpo_state(trainer) -> dict[str, Any]:
    """The resume state of ``trainer`` on this process (CPU tensors and plain values only)."""
    rollout = trainer._rollout_generator
    head = trainer.sampler_head_callback
    sampler = getattr(trainer, "_diffpo_train_sampler", None)
    state = {
        "version": DIFFPO_STATE_VERSION,
        "data_order": sampler.resume_state() if isinstance(sampler, ResumableRepeatSampler) else None,
        "step": int(trainer._step),
        "cycle_shape": _cycle_shape(trainer),
        "rollout_generator": None if rollout is None else rollout.get_state(),
        "rollout_device": None if rollout is None else rollout.device.type,
        "surrogate_generator": trainer._surrogate_generator.get_state(),
        "buffered_inputs": _to_device(trainer._buffered_inputs, "cpu") if in_generation_cycle(trainer) else None,
        "unscorable": trainer._unscorable_streak.state_dict(),
        "sampler_head": head.resume_state() if callable(getattr(head, "resume_state", None)) else None,
    }
    return state


def save_diffpo_state(trainer, folder: str) -> None:
    """Write :func:`diffpo_state` into ``folder`` (every process writes its own file)."""
    os.makedirs(folder, exist_ok=True)
    name = state_file_name(trainer.args.process_index, trainer.args.world_size)
    torch.save(diffpo_state(trainer), os.path.join(folder, name))


def load_diffpo_state(trainer, folder: str) -> list[str]:
    """Restore what :func:`save_diffpo_state` wrote into ``folder``; returns the names of what was restored.

    A checkpoint without the file (written by an older version or with ``save_only_model=True``) restores nothing and
    says so: the run then continues with freshly seeded streams and a fresh generation cycle.
    """
    path = os.path.join(folder, state_file_name(trainer.args.process_index, trainer.args.world_size))
    if not os.path.isfile(path):
        logger.warning(
            f"{folder} has no {os.path.basename(path)}: the rollout and surrogate random streams restart from their "
            "seeds and TRL starts a new generation cycle, so the resumed run will not reproduce the uninterrupted one "
            "(the checkpoint was written by an older trl-diffpo or with save_only_model=True)."
        )
        return []
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("version") != DIFFPO_STATE_VERSION:
        raise ValueError(
            f"{path} has format version {state.get('version')}, this trl-diffpo reads version "
            f"{DIFFPO_STATE_VERSION}: resume with the trl-diffpo version that wrote it, or delete the file to resume "
            "without exact reproduction."
        )
    restored = ["surrogate RNG"]
    trainer._surrogate_generator.set_state(state["surrogate_generator"])
    device = trainer.accelerator.device
    if state["rollout_generator"] is not None:
        if state["rollout_device"] != torch.device(device).type:
            logger.warning(
                f"The rollout RNG in {path} was saved on {state['rollout_device']} but this run decodes on "
                f"{torch.device(device).type}; generator states do not transfer between device types, so the rollout "
                "stream restarts from its seed."
            )
        else:
            generator = trainer._rollout_random(device)
            generator.set_state(state["rollout_generator"])
            restored.append("rollout RNG")
    if state["cycle_shape"] != _cycle_shape(trainer):
        logger.warning(
            f"{path} was written with (steps_per_generation, num_iterations, per_device_train_batch_size) = "
            f"{tuple(state['cycle_shape'])}, this run uses {tuple(_cycle_shape(trainer))}: the buffered generation "
            "batch is dropped and a new generation cycle starts."
        )
        state["buffered_inputs"] = None
        state["step"] = 0  # TRL's own behaviour on resume: the next micro-step generates
    trainer._step = state["step"]
    if state["data_order"] is not None:
        trainer._restored_sampler_state = state["data_order"]
        restored.append("data order")
    if state["buffered_inputs"] is not None:
        trainer._buffered_inputs = _to_device(state["buffered_inputs"], device)
        restored.append(f"buffered generation batch (micro-step {trainer._step % _generate_every(trainer)})")
    trainer._unscorable_streak.load_state_dict(state["unscorable"])
    head = trainer.sampler_head_callback
    if state["sampler_head"] is not None and callable(getattr(head, "load_resume_state", None)):
        head.load_resume_state(state["sampler_head"])
        restored.append("sampler-head rollout state")
    return restored


def copy_head_files(checkpoint_folder: str, output_dir: str) -> list[str]:
    """Copy the sampler head's files from a checkpoint to ``output_dir`` before TRL pushes ``output_dir``.

    ``Trainer._push_from_checkpoint`` copies a fixed list of model files from the checkpoint into ``output_dir`` and
    uploads that folder: without this the intermediate pushes (``hub_strategy="every_save"``) carry no head.
    """
    copied = []
    for name in (HEAD_WEIGHTS_NAME, HEAD_CONFIG_NAME):
        source = os.path.join(checkpoint_folder, name)
        if os.path.isfile(source) and os.path.abspath(checkpoint_folder) != os.path.abspath(output_dir):
            shutil.copy(source, os.path.join(output_dir, name))
            copied.append(name)
    return copied


def restored_summary(trainer, folder: str, diffpo_restored: list[str]) -> str:
    """One line naming what a resume from ``folder`` restored (and what the checkpoint did not have)."""
    present, missing = [], []
    for label, names in _MODEL_FILES:
        found = [name for name in names if os.path.isfile(os.path.join(folder, name))]
        if found:
            present.append(f"{label} ({found[0]})")
            break
    else:
        present.append("model weights (DeepSpeed/FSDP engine)" if trainer.is_deepspeed_enabled else "model weights")
    for label, names in (
        ("optimizer", ("optimizer.pt", "optimizer.bin")),
        ("LR scheduler", ("scheduler.pt",)),
        ("sampler head", (HEAD_WEIGHTS_NAME,)),
        ("global RNGs (python, numpy, torch)", ("rng_state.pth", f"rng_state_{trainer.args.process_index}.pth")),
    ):
        if any(os.path.isfile(os.path.join(folder, name)) for name in names):
            present.append(label)
        elif label != "sampler head" or trainer.sampler_head_callback is not None:
            missing.append(label)
    present.extend(diffpo_restored)
    if not diffpo_restored:
        missing.append("DiFFPO RNG streams and generation cycle")
    line = (
        f"Resumed from {folder} at global step {trainer.state.global_step} (TRL micro-step {trainer._step}): restored "
        + ", ".join(present)
    )
    return line + (f"; not in the checkpoint: {', '.join(missing)}." if missing else ".")
