"""Masked-diffusion rollouts inside TRL's generation loop: the part of :class:`~trl_diffpo.DiffpoTrainer` that
replaces ``GRPOTrainer``'s autoregressive generation.

- ``_generate_single_turn``: :func:`trl_diffpo.diffusion_generate` under TRL's generation context (unwrapped model,
  ZeRO-3 / FSDP parameter gathering), with the sampler head's thresholds; the trace is kept for the loss;
- ``_tokenize_prompts``: the prompt-length guard;
- ``_generate``: exposes each completion's ``nfe`` and ``threshold`` to reward functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from trl.extras.profiling import profiling_context
from trl.models import unwrap_model_for_generation
from trl.trainer.utils import pad

from .backbones import DiffusionBackbone
from .generation import DiffusionGenerateOutput, diffusion_generate, first_true_index
from .samplers import FIXED_SCHEDULE_SAMPLERS


@dataclass
class _Rollout:
    """The trace of the last call to ``_generate_single_turn`` and the padded prompt mask it used."""

    prompt_mask: torch.Tensor
    output: DiffusionGenerateOutput


class DiffusionRolloutMixin:
    """``GRPOTrainer`` overrides that generate completions by masked-diffusion decoding (mixed into
    :class:`~trl_diffpo.DiffpoTrainer`, before ``GRPOTrainer``)."""

    def _rollout_random(self, device: torch.device) -> torch.Generator:
        """The local generator of all rollout randomness, created once on the rollout device and then kept."""
        if self._rollout_generator is None:
            self._rollout_generator = torch.Generator(device=device).manual_seed(self._rollout_seed)
        return self._rollout_generator

    def _threshold_kwargs(self) -> dict:
        """How the rollouts get their thresholds: the fixed ``args.threshold``, a prompt head's ``threshold_fn`` or a
        state head's ``step_threshold_fn`` (built here, on every process: it copies the head once)."""
        head = self.sampler_head_callback
        if head is None:
            return {"threshold": self.args.threshold}
        if self._state_dependent_head():
            return {"step_threshold_fn": head.step_policy()}
        return {"threshold_fn": head.threshold_fn if self._mode() == "train" else head.head.predict_threshold}

    def _state_dependent_head(self) -> bool:
        return bool(getattr(self.sampler_head_callback, "state_dependent", False))

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if images is not None or multimodal_fields:
            raise ValueError("DiffpoTrainer supports text prompts only (no images or multimodal fields).")
        args = self.args
        device = self.accelerator.device
        prompts = [torch.tensor(ids) for ids in prompt_ids]
        input_ids = pad(
            prompts, self._tokenizer.pad_token_id, padding_side="left", pad_to_multiple_of=self.pad_to_multiple_of
        )
        prompt_mask = pad(
            [torch.ones_like(p) for p in prompts], 0, padding_side="left", pad_to_multiple_of=self.pad_to_multiple_of
        )
        input_ids, prompt_mask = input_ids.to(device), prompt_mask.to(device)
        threshold_kwargs = self._threshold_kwargs()
        # Every forward is a collective under ZeRO-3 without gathering and under FSDP: keep the ranks in step.
        synced_gpus = (self._dist.is_zero3 and not args.ds3_gather_for_generation) or self.is_fsdp_enabled
        with (
            profiling_context(self, "diffusion_generate"),
            unwrap_model_for_generation(
                self.model_wrapped,
                self.accelerator,
                gather_deepspeed3_params=args.ds3_gather_for_generation,
                gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs,
            ) as unwrapped_model,
            torch.no_grad(),
            self._dist.summon_full_params(self.model_wrapped, recurse=False),
        ):
            rollout = diffusion_generate(
                DiffusionBackbone(unwrapped_model, self.mask_token_id, logits_shift=self._logits_shift),
                input_ids,
                prompt_mask,
                gen_length=self.max_completion_length,
                block_length=args.block_length,
                sampler=args.sampler,
                steps=args.diffusion_steps if args.sampler in FIXED_SCHEDULE_SAMPLERS else None,
                **threshold_kwargs,
                temperature=self.temperature,
                generator=self._rollout_random(device),
                mask_token_id=self.mask_token_id,
                eos_token_id=self.eos_token_ids or None,  # every EOS id ends a row, as TRL cuts at any
                stop_at_eos=args.stop_at_eos,
                return_prompt_hidden=self.sampler_head_callback is not None,
                synced_gpus=synced_gpus,
                cache=args.rollout_cache,
                cache_refresh=args.rollout_cache_refresh,
            )
        self._last_rollout = _Rollout(prompt_mask=prompt_mask, output=rollout)
        # TRL's completions end at the first EOS (any of the model's EOS ids); the canvas stays in the trace.
        completion = rollout.completion_ids
        is_eos = torch.isin(completion, torch.tensor(self.eos_token_ids, device=completion.device))
        lengths = (first_true_index(is_eos) + 1).clamp(max=completion.shape[1]).tolist()
        completion_ids = [row[:n].tolist() for row, n in zip(completion.cpu(), lengths, strict=True)]
        logprobs = [row[:n].tolist() for row, n in zip(rollout.logprobs.cpu(), lengths, strict=True)]
        return completion_ids, logprobs

    def _tokenize_prompts(self, prompts: list):
        prompt_ids, images, multimodal_fields = super()._tokenize_prompts(prompts)
        return self._prompt_guard(prompt_ids, self._metrics[self._mode()]), images, multimodal_fields

    def _generate(self, prompts: list):
        (prompt_ids, completion_ids, tool_mask, completions, logprobs, extra_fields, images, tool_images) = (
            super()._generate(prompts)
        )
        rollout = self._last_rollout.output
        extra_fields = {**extra_fields, "nfe": rollout.nfe.tolist(), "threshold": rollout.threshold.tolist()}
        return prompt_ids, completion_ids, tool_mask, completions, logprobs, extra_fields, images, tool_images
