"""DiFFPO's log-probs inside TRL's loss: the part of :class:`~trl_diffpo.DiffpoTrainer` that answers
``GRPOTrainer``'s per-token log-prob hook with the surrogate likelihood, and computes the clamped IS weight.

- ``_get_per_token_logps_and_entropies``: the surrogate (mean-field, two-stage or K-stage) of the batch's sampled
  canvas with the draws of the current inner iteration; with no stored old log-probs, the IS weight of this very
  forward is folded into the advantages TRL's loss reads next;
- ``_log_probs_per_iteration``: the old and reference surrogate log-probs of every inner iteration, at generation;
- ``_importance_weights``: the clamped weight against the rollouts' behaviour log-probs, and its metrics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from .backbones import DiffusionBackbone
from .likelihood import importance_weights, surrogate_log_probs
from .rollout_metrics import importance_weight_metrics

# Keys of the per-row DiFFPO context in the batch dict (batch-first tensors).
_PREFIX = "diffpo_"


@dataclass
class _LossContext:
    """What :meth:`DiffpoTrainer.compute_loss` hands to the log-prob hook TRL's loss calls: the batch, its inner
    iteration, the inputs TRL's loss reads, whether the IS weight comes from the current forward, and the mode."""

    inputs: dict
    iteration: int
    policy_inputs: dict
    weight_from_current: bool
    mode: str


def _fit(tensor: torch.Tensor, width: int, fill: float) -> torch.Tensor:
    """Cut or right-pad the last dimension of ``tensor`` to ``width`` (TRL's completion tensors may be shorter than
    the canvas, or padded beyond it with ``pad_to_multiple_of``)."""
    length = tensor.shape[-1]
    if length >= width:
        return tensor[..., :width]
    padding = tensor.new_full((*tensor.shape[:-1], width - length), fill)
    return torch.cat([tensor, padding], dim=-1)


class SurrogateLogProbMixin:
    """``GRPOTrainer``'s log-prob hook answered with DiFFPO's surrogate and IS weight (mixed into
    :class:`~trl_diffpo.DiffpoTrainer`, before ``GRPOTrainer``)."""

    def _surrogate(self, model, context: dict, iteration: int, batch_size=None, compute_entropy=False):
        """Surrogate log-probs (and entropies) of the batch's canvas under ``model``, with iteration ``iteration``'s
        draws. Runs with gradients unless called under ``no_grad``."""
        backbone = DiffusionBackbone(model, self.mask_token_id, logits_shift=self._logits_shift)
        with self.accelerator.autocast():
            return surrogate_log_probs(
                backbone,
                context[_PREFIX + "sequences"],
                context[_PREFIX + "prompt_mask"],
                context[_PREFIX + "unmask_step"],
                context[_PREFIX + "prompt_noise"][:, iteration],
                context[_PREFIX + "stage_starts"][:, iteration],
                temperature=self.temperature,
                batch_size=batch_size,
                compute_entropy=compute_entropy,
                entropy_requires_grad=self._entropy_bonus_enabled,  # TRL's entropy bonus is the only gradient user
                # every forward is a collective under ZeRO-3 / FSDP: make the count independent of the draws
                every_stage=self._dist.is_zero3 or self.is_fsdp_enabled,
            )

    def _get_per_token_logps_and_entropies(
        self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False, **kwargs
    ):
        """TRL's hook for per-token log-probs, answered with the surrogate of the current batch's sampled canvas.

        TRL passes its EOS-truncated ids; the surrogate scores the raw canvas instead, with the draws of the current
        inner iteration (set by :meth:`compute_loss`). TRL's own generation-time calls are answered with
        placeholders: the old and reference log-probs are computed per inner iteration afterwards. When the batch
        carries no old log-probs (they equal the detached current ones), the IS weight is computed here from this
        very forward and folded into the advantages, which TRL's loss reads after this call.
        """
        width = logits_to_keep
        if self._loss_context is None:
            if self._defer_log_probs:
                return input_ids.new_zeros((input_ids.shape[0], width), dtype=torch.float32), None, None
            raise RuntimeError(
                "DiffpoTrainer computes log-probs on the sampled diffusion trace of a batch; "
                "`_get_per_token_logps_and_entropies` was called outside `compute_loss`."
            )
        context = self._loss_context
        logps, entropy = self._surrogate(model, context.inputs, context.iteration, batch_size, compute_entropy)
        if context.weight_from_current:
            inputs = context.inputs
            weight = self._importance_weights(
                inputs["completion_mask"], inputs[_PREFIX + "behaviour_logps"], logps[:, None], context.mode
            )[:, 0]
            context.policy_inputs["advantages"] = context.inputs["advantages"][:, None] * _fit(weight, width, 1.0)
        return _fit(logps, width, 0.0), None if entropy is None else _fit(entropy, width, 0.0), None

    def _old_logps_are_current(self, mode: str) -> bool:
        """Whether the policy is unchanged between generation and every use of the batch, so that the old surrogate
        log-probs equal the detached current ones (TRL's own criterion, plus one inner iteration)."""
        if mode != "train":
            return True
        generate_every = self.args.steps_per_generation * self.num_iterations
        return self.num_iterations == 1 and self.args.gradient_accumulation_steps % generate_every == 0

    def _policy_is_frozen(self) -> bool:
        """``sampler_only``: the dLLM does not train, so no surrogate log-probs are needed at all."""
        head = self.sampler_head_callback
        return head is not None and getattr(head, "mode", None) == "sampler_only"

    @torch.no_grad()
    def _log_probs_per_iteration(self, context: dict, num_iterations: int, batch_size: int, need_old: bool):
        """Old (when ``need_old``) and reference surrogate log-probs for every inner iteration: ``(batch,
        num_iterations, L)`` each, or ``None``."""
        with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            old = (
                [self._surrogate(self.model, context, it, batch_size)[0] for it in range(num_iterations)]
                if need_old
                else None
            )
            ref = None
            if self.beta != 0.0:
                if self.ref_model is not None:
                    ref = [self._surrogate(self.ref_model, context, it, batch_size)[0] for it in range(num_iterations)]
                else:
                    unwrapped = self.accelerator.unwrap_model(self.model)
                    with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                        ref = [self._surrogate(self.model, context, it, batch_size)[0] for it in range(num_iterations)]
        return (None if old is None else torch.stack(old, dim=1)), (None if ref is None else torch.stack(ref, dim=1))

    def _importance_weights(
        self, completion_mask: torch.Tensor, behaviour_logps: torch.Tensor, surrogate_logps: torch.Tensor, mode: str
    ) -> torch.Tensor:
        """``(batch, iterations, L)`` clamped IS weights of ``surrogate_logps`` (same shape) against the rollouts'
        ``(batch, L)`` behaviour log-probs, counting TRL's ``completion_mask``; logs what the correction sees."""
        loss_mask = _fit(completion_mask.float(), surrogate_logps.shape[-1], 0.0)[:, None]
        behaviour = behaviour_logps[:, None, :]
        weight = importance_weights(surrogate_logps, behaviour, loss_mask, self.args.is_correction, self.args.is_clamp)
        gap = surrogate_logps.detach() - behaviour
        self._log(mode, importance_weight_metrics(weight, gap, loss_mask, self.args.is_clamp, self.accelerator.gather))
        return weight
