"""Checkpoints of the sampler head's callback: its files in every ``checkpoint-N/``, restoring them on resume, and the
rollout-time state an exact resume needs. A mixin of :class:`~trl_diffpo.sampler_head.SamplerHeadCallback`, which owns
the attributes used here (``head``, ``trainer``, ``restored_from``, ``fallback_counts`` and the behaviour snapshot)."""

from __future__ import annotations

import logging
import os
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .config import HEAD_CONFIG_NAME, HEAD_WEIGHTS_NAME
from .network import SamplerHead
from .persistence import head_state_dict, load_head_weights, load_sampler_head, save_sampler_head

logger = logging.getLogger(__name__)


class SamplerHeadCheckpoints:
    """Saving, restoring and resume state of a :class:`~trl_diffpo.sampler_head.SamplerHeadCallback`."""

    def _should_write(self) -> bool:
        args = getattr(self.trainer, "args", None)
        return bool(getattr(args, "should_save", True))

    def save_head(self, output_dir: str | os.PathLike) -> None:
        """Save the head into ``output_dir`` (``sampler_head.safetensors`` + ``sampler_head_config.json``).

        Called on every process (gathering ZeRO-3 partitions is a collective); only the process that saves writes.
        """
        head = self._require_head()
        state_dict = head_state_dict(head)
        if self._should_write():
            save_sampler_head(head, output_dir, state_dict=state_dict)

    def restore_head(self, checkpoint_folder: str | os.PathLike) -> bool:
        """Load the head's weights from ``checkpoint_folder`` in place; ``False`` (logged, counted) when it has none."""
        weights_path = os.path.join(checkpoint_folder, HEAD_WEIGHTS_NAME)
        config_path = os.path.join(checkpoint_folder, HEAD_CONFIG_NAME)
        if not (os.path.isfile(weights_path) and os.path.isfile(config_path)):
            self._count_fallback("resume_without_head_files")
            logger.warning(
                "Resuming from %s, which has no %s: the sampler head keeps its current weights (the checkpoint was "
                "written without a SamplerHeadCallback).",
                checkpoint_folder,
                HEAD_WEIGHTS_NAME,
            )
            return False
        saved = load_sampler_head(checkpoint_folder)
        if not saved.config.same_head_shape(self.head.config):
            raise ValueError(
                f"The sampler head in {checkpoint_folder} ({saved.config.to_dict()}) does not match the callback's "
                f"head ({self.head.config.to_dict()}): resume with the same sampler, range and head size."
            )
        load_head_weights(self.head, saved.state_dict(), source=weights_path)
        self.restored_from = os.fspath(checkpoint_folder)
        logger.info("Restored the sampler head from %s.", checkpoint_folder)
        return True

    def resume_state(self) -> dict[str, Any]:
        """Rollout-time state a checkpoint needs for an exact resume (see :mod:`trl_diffpo.checkpointing`): the frozen
        behaviour head of the PPO ratio (inside a generation cycle the next steps score the buffered rows against it)
        and the fallback counters. The noise draws need nothing: they are derived from the global step."""
        behaviour = self._behaviour_head
        return {
            "behaviour_head": None if behaviour is None else head_state_dict(behaviour),
            "behaviour_sigma": self._behaviour_sigma,
            "scored_since_snapshot": self._scored_since_snapshot,
            "fallback_counts": dict(self.fallback_counts),
        }

    def load_resume_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`resume_state` (after the head itself exists)."""
        head = self._require_head()
        if state["behaviour_head"] is not None:
            snapshot = SamplerHead(head.config).to(head.dtype)
            load_head_weights(snapshot, state["behaviour_head"], source="the checkpoint's behaviour head")
            self._behaviour_head = snapshot.to(head.device).eval().requires_grad_(False)
        self._behaviour_sigma = state["behaviour_sigma"]
        self._scored_since_snapshot = bool(state["scored_since_snapshot"])
        self.fallback_counts = dict(state["fallback_counts"])

    def _check_resumed_head(self, state) -> None:
        """At the start of a resumed run: log where the head's weights came from (counted when from nowhere)."""
        if state.global_step > 0 and self.restored_from is None:
            if getattr(self.trainer, "is_deepspeed_enabled", False):
                logger.info("Resumed under DeepSpeed: the engine checkpoint restored the sampler head.")
            else:
                self._count_fallback("resume_without_head_restore")
                logger.warning(
                    "Training resumes at step %d but the sampler head was not restored from a checkpoint's %s; it "
                    "keeps the weights the model was loaded with.",
                    state.global_step,
                    HEAD_WEIGHTS_NAME,
                )

    def on_save(self, args, state, control, **kwargs):
        """Write the head into the ``checkpoint-N/`` folder the Trainer just saved."""
        if self.head is None:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(folder) or not self._should_write():
            self.save_head(folder)
