"""DiffpoTrainer: GRPO for masked diffusion LMs with DiFFPO's surrogate likelihood and importance-sampling correction.

The trainer is glue over :mod:`trl_diffpo.generation` (rollouts and their trace) and :mod:`trl_diffpo.likelihood`
(the surrogate and the IS weight). It overrides only what DiFFPO changes in TRL's ``GRPOTrainer``:

- ``_generate_single_turn``: masked-diffusion rollouts inside TRL's generation context; the trace is kept;
- ``_generate``: exposes ``nfe`` and ``threshold`` to reward functions;
- ``_get_per_token_logps_and_entropies``: the surrogate on the sampled canvas, with the batch's stored draws;
- ``_generate_and_score_completions``: attaches the trace and the draws, computes the old and reference log-probs of
  every inner iteration and the IS weight, logs the diffusion metrics;
- ``compute_loss``: selects the inner iteration, folds the IS weight into the per-token advantages and adds the
  sampler-head loss.

Folding the detached, non-negative weight ``w`` into the advantages reproduces ``w * min(rho A, clip(rho) A)`` for
every TRL loss type (each is linear in a non-negative weight on ``A``) and leaves the KL term unweighted.
"""

from __future__ import annotations

import copy
import functools
import textwrap
from dataclasses import dataclass

import torch
from accelerate.logging import get_logger
from accelerate.utils import is_peft_model
from transformers import AutoProcessor, GenerationConfig
from trl import GRPOTrainer
from trl.extras.profiling import profiling_context
from trl.models import prepare_deepspeed, prepare_fsdp, unwrap_model_for_generation
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.callbacks import SyncRefModelCallback
from trl.trainer.utils import (
    create_model_from_path,
    disable_dropout_in_model,
    get_config_model_id,
    is_async_callable,
    nanstd,
    pad,
    use_adapter,
)

from .backbones import DiffusionBackbone, check_bidirectional, is_shifted_logits_model, resolve_mask_token_id
from .config import DiffpoConfig
from .generation import DiffusionGenerateOutput, diffusion_generate, first_true_index
from .likelihood import draw_surrogate_randomness, importance_weights, surrogate_log_probs, token_stages
from .samplers import ADAPTIVE_SAMPLERS, FIXED_SCHEDULE_SAMPLERS

logger = get_logger(__name__)

# Offsets that give every process its own rollout / surrogate random stream.
_PROCESS_SEED_STRIDE = 1_000_003
_SURROGATE_SEED_OFFSET = 7_919
# A weight within this relative distance of the clamp counts as clamped in the metrics.
_CLAMP_TOLERANCE = 1e-6
# Keys of the per-row DiFFPO context in the batch dict (batch-first tensors).
_PREFIX = "diffpo_"


@dataclass
class _Rollout:
    """The trace of the last call to ``_generate_single_turn`` and the padded prompt mask it used."""

    prompt_mask: torch.Tensor
    output: DiffusionGenerateOutput


def _fit(tensor: torch.Tensor, width: int, fill: float) -> torch.Tensor:
    """Cut or right-pad the last dimension of ``tensor`` to ``width`` (TRL's completion tensors may be shorter than
    the canvas, or padded beyond it with ``pad_to_multiple_of``)."""
    length = tensor.shape[-1]
    if length >= width:
        return tensor[..., :width]
    padding = tensor.new_full((*tensor.shape[:-1], width - length), fill)
    return torch.cat([tensor, padding], dim=-1)


def _named_reward(func, name: str):
    """Wrap a synchronous reward function so that an exception names the function that raised it."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except Exception as err:
            raise RuntimeError(
                f"Reward function {name!r} raised {type(err).__name__}: {err}. Reward functions must return a float "
                "(or None when not applicable) for every completion, whatever its text."
            ) from err

    return wrapper


class DiffpoTrainer(GRPOTrainer):
    """
    Trainer for DiFFPO (Diffusion Fast and Furious Policy Optimization, https://huggingface.co/papers/2510.02212):
    GRPO for masked diffusion language models.

    Rollouts come from masked-diffusion decoding (:func:`trl_diffpo.diffusion_generate`); the policy gradient uses a
    surrogate likelihood of each completion (mean-field, two-stage or K-stage, see :mod:`trl_diffpo.likelihood`)
    with a clamped importance-sampling weight that corrects for the gap between the surrogate and the real sampler.
    A :class:`trl_diffpo.SamplerHeadCallback` among the callbacks learns a per-prompt sampler threshold jointly.

    The constructor is `GRPOTrainer`'s (model id or instance, `reward_funcs`, `args` as a [`DiffpoConfig`],
    datasets, `processing_class`, `peft_config`, `callbacks`, ...). `tools`, `environment_factory` and `rollout_func`
    are refused: they bypass diffusion decoding.

    Example:

    ```python
    >>> from trl_diffpo import DiffpoConfig, DiffpoTrainer

    >>> trainer = DiffpoTrainer(
    ...     model="GSAI-ML/LLaDA-8B-Instruct",
    ...     reward_funcs=my_reward,
    ...     args=DiffpoConfig(output_dir="llada-diffpo"),
    ...     train_dataset=dataset,
    ...     peft_config=LoraConfig(r=128, lora_alpha=64, target_modules=["q_proj", "k_proj", "v_proj"]),
    ... )
    >>> trainer.train()
    ```
    """

    _tag_names = ["trl", "diffpo", "diffusion"]
    _name = "DiFFPO"
    _paper = {
        "title": "Diffusion Fast and Furious Policy Optimization",
        "id": "2510.02212",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{diffpo2025,
                title        = {{DiFFPO: Diffusion Fast and Furious Policy Optimization}},
                year         = 2025,
                eprint       = {arXiv:2510.02212},
            }"""),
    }

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: DiffpoConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        reward_processing_classes=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        tools=None,
        rollout_func=None,
        environment_factory=None,
    ):
        for name, value in (
            ("tools", tools),
            ("rollout_func", rollout_func),
            ("environment_factory", environment_factory),
        ):
            if value:
                raise ValueError(
                    f"DiffpoTrainer does not support `{name}`: it replaces diffusion decoding (or needs multi-turn "
                    "autoregressive generation), so rollouts would carry no diffusion trace. Remove it."
                )
        if args is None:
            model_name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = DiffpoConfig(f"{model_name.split('/')[-1]}-DiFFPO")
        elif not isinstance(args, DiffpoConfig):
            raise TypeError(
                f"DiffpoTrainer needs a `DiffpoConfig` (got {type(args).__name__}); it carries the diffusion decoding "
                "and surrogate options."
            )

        loaded_here = isinstance(model, str)
        if loaded_here:
            model, processing_class = self._load_policy(model, args, quantization_config, processing_class)
            quantization_config = None
        base_model = model.get_base_model() if is_peft_model(model) else model
        self._prepare_model_for_grpo(base_model, args, processing_class)

        # TRL would rebuild the reference model from `_name_or_path`, which fails for models built in memory: take a
        # frozen copy now (before TRL patches `forward`), and hide beta from TRL while it initialises.
        needs_reference = args.beta != 0.0
        reference = None
        if needs_reference and peft_config is None and not is_peft_model(model):
            reference = copy.deepcopy(model).eval().requires_grad_(False)
        hidden = {"beta": 0.0, "sync_ref_model": False}
        if loaded_here:  # already applied: keep TRL from warning that they are ignored
            hidden["model_init_kwargs"] = None
        saved = {key: getattr(args, key) for key in hidden}
        for key, value in hidden.items():
            setattr(args, key, value)
        try:
            super().__init__(
                model=model,
                reward_funcs=reward_funcs,
                args=args,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                reward_processing_classes=reward_processing_classes,
                callbacks=callbacks,
                optimizers=optimizers,
                quantization_config=quantization_config,
                peft_config=peft_config,
            )
        finally:
            for key, value in saved.items():
                setattr(args, key, value)
        self.beta = args.beta
        self.ref_model = self._prepare_reference(reference) if reference is not None else None
        if args.sync_ref_model:
            if self.ref_model is None:
                raise ValueError(
                    "`sync_ref_model=True` needs a separate reference model: it is not supported with PEFT (the "
                    "reference is the adapter-disabled model) nor with beta=0.0 (no reference)."
                )
            self.add_callback(SyncRefModelCallback(ref_model=self.ref_model, accelerator=self.accelerator))
        if self.aux_loss_enabled:
            logger.warning("The MoE router auxiliary loss is not supported by DiffpoTrainer; it is disabled.")
            self.aux_loss_enabled = False

        self.mask_token_id = resolve_mask_token_id(self.model, self._tokenizer, args.mask_token_id)
        check_bidirectional(self.model)
        self._logits_shift = is_shifted_logits_model(self.model)
        for i, (func, name) in enumerate(zip(self.reward_funcs, self.reward_func_names, strict=True)):
            if not isinstance(func, torch.nn.Module) and not is_async_callable(func):
                self.reward_funcs[i] = _named_reward(func, name)

        seed = args.seed if args.surrogate_seed is None else args.surrogate_seed
        process_offset = self.accelerator.process_index * _PROCESS_SEED_STRIDE
        self._surrogate_generator = torch.Generator().manual_seed(seed + _SURROGATE_SEED_OFFSET + process_offset)
        self._rollout_seed = args.seed + process_offset
        self._rollout_generator = None
        self._last_rollout: _Rollout | None = None
        self._rewards_per_func: torch.Tensor | None = None
        self._defer_log_probs = False
        self._surrogate_context: tuple[dict, int] | None = None

        self.sampler_head_callback = next(
            (cb for cb in self.callback_handler.callbacks if getattr(cb, "is_sampler_head_callback", False)), None
        )
        if self.sampler_head_callback is not None:
            if args.sampler not in ADAPTIVE_SAMPLERS:
                raise ValueError(
                    f"A sampler head learns the threshold of an adaptive sampler ({', '.join(ADAPTIVE_SAMPLERS)}), "
                    f"but sampler={args.sampler!r}. Choose an adaptive sampler or remove the SamplerHeadCallback."
                )
            self.sampler_head_callback.setup(self)

    # ------------------------------------------------------------------------------------------------ construction

    @staticmethod
    def _load_policy(model_id: str, args: DiffpoConfig, quantization_config, processing_class):
        """Load the policy (and tokenizer) from an id as GRPOTrainer does, so that it can be checked before TRL's init."""
        kwargs = dict(args.model_init_kwargs or {})
        if quantization_config is not None:
            if "quantization_config" in kwargs:
                raise ValueError(
                    "You set `quantization_config` both as a trainer argument and in `args.model_init_kwargs`. Set it "
                    "in only one place, preferably as a trainer argument."
                )
            kwargs["quantization_config"] = quantization_config
        if args.distributed_state.distributed_type in ["MULTI_GPU", "DEEPSPEED"]:
            kwargs["device_map"] = None
        kwargs.setdefault("trust_remote_code", args.trust_remote_code)
        model = create_model_from_path(model_id, **kwargs)
        if processing_class is None:
            processing_class = AutoProcessor.from_pretrained(
                model_id,
                revision=kwargs.get("revision"),
                truncation_side="left",
                padding_side="left",
                trust_remote_code=args.trust_remote_code,
            )
        return model, processing_class

    @staticmethod
    def _prepare_model_for_grpo(base_model, args: DiffpoConfig, processing_class) -> None:
        """Give TRL what it reads from a causal LM: a generation config, and checkpointing only where supported."""
        if getattr(base_model, "generation_config", None) is None:  # e.g. BertForMaskedLM
            tokenizer = getattr(processing_class, "tokenizer", processing_class)
            special = {
                key: getattr(tokenizer, key, None) if tokenizer is not None else None
                for key in ("pad_token_id", "eos_token_id", "bos_token_id")
            }
            base_model.generation_config = GenerationConfig(**{k: v for k, v in special.items() if v is not None})
        if args.gradient_checkpointing and not getattr(base_model, "supports_gradient_checkpointing", False):
            logger.warning(
                f"{type(base_model).__name__} does not support gradient checkpointing; training without it "
                "(`gradient_checkpointing=False`)."
            )
            args.gradient_checkpointing = False
            if hasattr(args, "activation_checkpointing"):
                args.activation_checkpointing = False
        if args.cast_lm_head_to_fp32 and not hasattr(base_model, "lm_head"):
            # TRL casts `model.lm_head`; LLaDA's output layer is `model.transformer.ff_out`, BERT's `cls.predictions`.
            raise ValueError(
                f"`cast_lm_head_to_fp32=True` casts `model.lm_head`, which {type(base_model).__name__} does not have "
                f"(its output layer is {type(base_model.get_output_embeddings()).__name__}). Set "
                "`cast_lm_head_to_fp32=False`."
            )

    def _prepare_reference(self, reference):
        if self.args.disable_dropout:
            disable_dropout_in_model(reference)
        if self.is_deepspeed_enabled:
            return prepare_deepspeed(reference, self.accelerator)
        if self.is_fsdp_enabled:
            return prepare_fsdp(reference, self.accelerator)
        return self.accelerator.prepare_model(reference, evaluation_mode=True)

    # -------------------------------------------------------------------------------------------------- rollouts

    def _mode(self) -> str:
        return "train" if self.model.training else "eval"

    def _rollout_random(self, device: torch.device) -> torch.Generator:
        """The local generator of all rollout randomness, created once on the rollout device and then kept."""
        if self._rollout_generator is None:
            self._rollout_generator = torch.Generator(device=device).manual_seed(self._rollout_seed)
        return self._rollout_generator

    def _threshold_fn(self):
        head = self.sampler_head_callback
        if head is None:
            return None
        return head.threshold_fn if self._mode() == "train" else head.head.predict_threshold

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
        threshold_fn = self._threshold_fn()
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
                threshold=None if threshold_fn is not None else args.threshold,
                threshold_fn=threshold_fn,
                temperature=self.temperature,
                generator=self._rollout_random(device),
                mask_token_id=self.mask_token_id,
                eos_token_id=self.eos_token_ids[0],
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

    def _generate(self, prompts: list):
        (prompt_ids, completion_ids, tool_mask, completions, logprobs, extra_fields, images, tool_images) = (
            super()._generate(prompts)
        )
        rollout = self._last_rollout.output
        extra_fields = {**extra_fields, "nfe": rollout.nfe.tolist(), "threshold": rollout.threshold.tolist()}
        return prompt_ids, completion_ids, tool_mask, completions, logprobs, extra_fields, images, tool_images

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        infinite = torch.isinf(rewards_per_func)
        if infinite.any():
            name = self.reward_func_names[int(infinite.any(0).int().argmax())]
            raise ValueError(
                f"Reward function {name!r} returned an infinite reward; rewards must be finite floats (or None / NaN "
                "for 'not applicable')."
            )
        mode = self._mode()
        missing = torch.isnan(rewards_per_func)
        for i, name in enumerate(self.reward_func_names):
            self._metrics[mode][f"rewards/{name}/missing_frac"].append(missing[:, i].float().mean().item())
        # Completions without any reward get a zero advantage (TRL); count them.
        self._metrics[mode]["rewards/unscorable_frac"].append(missing.all(dim=1).float().mean().item())
        self._rewards_per_func = rewards_per_func
        return rewards_per_func

    # -------------------------------------------------------------------------------------------- log-probs

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
                # every forward is a collective under ZeRO-3 / FSDP: make the count independent of the draws
                every_stage=self._dist.is_zero3 or self.is_fsdp_enabled,
            )

    def _get_per_token_logps_and_entropies(
        self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False, **kwargs
    ):
        """TRL's hook for per-token log-probs, answered with the surrogate of the current batch's sampled canvas.

        TRL passes its EOS-truncated ids; the surrogate scores the raw canvas instead, with the draws of the current
        inner iteration (set by :meth:`compute_loss`). TRL's own generation-time calls are answered with
        placeholders: the old and reference log-probs are computed per inner iteration afterwards.
        """
        width = logits_to_keep
        if self._surrogate_context is None:
            if self._defer_log_probs:
                return input_ids.new_zeros((input_ids.shape[0], width), dtype=torch.float32), None, None
            raise RuntimeError(
                "DiffpoTrainer computes log-probs on the sampled diffusion trace of a batch; "
                "`_get_per_token_logps_and_entropies` was called outside `compute_loss`."
            )
        context, iteration = self._surrogate_context
        logps, entropy = self._surrogate(model, context, iteration, batch_size, compute_entropy)
        return _fit(logps, width, 0.0), None if entropy is None else _fit(entropy, width, 0.0), None

    @torch.no_grad()
    def _log_probs_per_iteration(self, context: dict, num_iterations: int, batch_size: int):
        """Old (and reference) surrogate log-probs for every inner iteration: ``(batch, num_iterations, L)``."""
        with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            old = [self._surrogate(self.model, context, it, batch_size)[0] for it in range(num_iterations)]
            ref = None
            if self.beta != 0.0:
                if self.ref_model is not None:
                    ref = [self._surrogate(self.ref_model, context, it, batch_size)[0] for it in range(num_iterations)]
                else:
                    unwrapped = self.accelerator.unwrap_model(self.model)
                    with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                        ref = [self._surrogate(self.model, context, it, batch_size)[0] for it in range(num_iterations)]
        return torch.stack(old, dim=1), None if ref is None else torch.stack(ref, dim=1)

    # ---------------------------------------------------------------------------------------------- the batch

    def _generate_and_score_completions(self, inputs):
        mode = self._mode()
        args = self.args
        self._defer_log_probs = True
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._defer_log_probs = False
        output.pop("old_per_token_logps", None)
        output.pop("ref_per_token_logps", None)
        rollout, self._last_rollout = self._last_rollout, None
        trace = rollout.output
        gen_length = trace.unmask_step.shape[1]

        num_iterations = self.num_iterations if mode == "train" else 1
        draws = draw_surrogate_randomness(
            rollout.prompt_mask,
            trace.nfe,
            likelihood=args.likelihood,
            num_stages=args.num_stages,
            p_mask_prompt=args.p_mask_prompt,
            num_iterations=num_iterations,
            generator=self._surrogate_generator,
        )
        context = {
            _PREFIX + "sequences": trace.sequences,
            _PREFIX + "prompt_mask": rollout.prompt_mask,
            _PREFIX + "unmask_step": trace.unmask_step,
            _PREFIX + "behaviour_logps": trace.logprobs,
            _PREFIX + "nfe": trace.nfe,
            _PREFIX + "threshold": trace.threshold,
            _PREFIX + "prompt_noise": draws.prompt_noise,
            _PREFIX + "stage_starts": draws.stage_starts,
        }
        if trace.prompt_hidden is not None:
            context[_PREFIX + "prompt_hidden"] = trace.prompt_hidden
        batch_size = args.per_device_train_batch_size if mode == "train" else args.per_device_eval_batch_size
        old_logps, ref_logps = self._log_probs_per_iteration(context, num_iterations, batch_size)
        context[_PREFIX + "old_logps"] = old_logps
        if ref_logps is not None:
            context[_PREFIX + "ref_logps"] = ref_logps

        loss_mask = _fit(output["completion_mask"].float(), gen_length, 0.0)
        behaviour = trace.logprobs[:, None, :]
        is_weight = importance_weights(old_logps, behaviour, loss_mask[:, None], args.is_correction, args.is_clamp)
        context[_PREFIX + "is_weight"] = is_weight

        if self.sampler_head_callback is not None:
            context[_PREFIX + "sampler_advantages"] = self._sampler_advantages(trace, len(inputs), mode)

        self._log_rollout_metrics(mode, trace, draws, old_logps, behaviour, is_weight, loss_mask)
        output.update(context)
        return output

    def _sampler_advantages(self, trace: DiffusionGenerateOutput, local_size: int, mode: str) -> torch.Tensor:
        rewards_per_func = self._rewards_per_func
        weights = self.reward_weights.to(rewards_per_func.device)
        rewards = (rewards_per_func * weights[None]).nansum(dim=1)
        rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan  # unscorable, as TRL marks them
        nfe = self.accelerator.gather(trace.nfe)
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        advantages = self.sampler_head_callback.sampler_advantages(
            rewards, nfe, self.max_completion_length, num_generations
        )
        start = self.accelerator.process_index * local_size
        return advantages[start : start + local_size].to(trace.nfe.device)

    def _log_rollout_metrics(self, mode, trace, draws, old_logps, behaviour, is_weight, loss_mask) -> None:
        gather = self.accelerator.gather
        metrics = self._metrics[mode]
        nfe = gather(trace.nfe.float())
        metrics["diffusion/nfe/mean"].append(nfe.mean().item())
        metrics["diffusion/nfe/min"].append(nfe.min().item())
        metrics["diffusion/nfe/max"].append(nfe.max().item())
        metrics["diffusion/tokens_per_step"].append(gather(trace.tokens_per_step).mean().item())
        threshold = gather(trace.threshold.float())
        threshold = threshold[~torch.isnan(threshold)]
        if threshold.numel() > 0:  # fixed-schedule samplers have no threshold
            metrics["diffusion/threshold/mean"].append(threshold.mean().item())
            metrics["diffusion/threshold/std"].append(nanstd(threshold).item() if threshold.numel() > 1 else 0.0)
            metrics["diffusion/threshold/min"].append(threshold.min().item())
            metrics["diffusion/threshold/max"].append(threshold.max().item())

        mask = loss_mask[:, None].expand_as(is_weight).bool()
        gap = (old_logps - behaviour).masked_fill(~mask, 0.0)
        count = mask.sum().float()
        clamped = (is_weight >= self.args.is_clamp * (1 - _CLAMP_TOLERANCE)) & mask
        totals = gather(
            torch.stack([is_weight.masked_fill(~mask, 0.0).sum(), clamped.sum().float(), gap.sum(), count])[None]
        ).sum(0)
        denominator = totals[3].clamp(min=1.0)
        metrics["diffpo/is_weight/mean"].append((totals[0] / denominator).item())
        metrics["diffpo/is_weight/clamped_frac"].append((totals[1] / denominator).item())
        metrics["diffpo/logp_gap/mean"].append((totals[2] / denominator).item())
        largest = is_weight.masked_fill(~mask, 0.0).amax() if mask.any() else is_weight.new_zeros(())
        metrics["diffpo/is_weight/max"].append(gather(largest[None]).max().item())
        metrics["diffpo/tau/mean"].append(gather(draws.tau.float().mean()[None]).mean().item())
        used_stages = torch.stack(
            [
                torch.nn.functional.one_hot(
                    token_stages(trace.unmask_step, draws.stage_starts[:, it]), draws.stage_starts.shape[-1]
                )
                .any(1)
                .sum(-1)
                for it in range(draws.stage_starts.shape[1])
            ]
        )
        metrics["diffpo/surrogate_forwards"].append(gather(used_stages.float().mean()[None]).mean().item())

    # --------------------------------------------------------------------------------------------------- loss

    def _inner_iteration(self, mode: str) -> int:
        if mode != "train":
            return 0
        steps_per_generation = self.args.steps_per_generation
        return (self._step % (steps_per_generation * self.num_iterations)) // steps_per_generation

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = self._mode()
        iteration = self._inner_iteration(mode)
        width = inputs["completion_ids"].shape[1]
        policy_inputs = dict(inputs)
        policy_inputs["old_per_token_logps"] = _fit(inputs[_PREFIX + "old_logps"][:, iteration], width, 0.0)
        if _PREFIX + "ref_logps" in inputs:
            policy_inputs["ref_per_token_logps"] = _fit(inputs[_PREFIX + "ref_logps"][:, iteration], width, 0.0)
        weight = _fit(inputs[_PREFIX + "is_weight"][:, iteration], width, 1.0)
        policy_inputs["advantages"] = inputs["advantages"][:, None] * weight
        self._surrogate_context = (inputs, iteration)
        try:
            loss = super().compute_loss(model, policy_inputs, return_outputs, num_items_in_batch)
        finally:
            self._surrogate_context = None
        if self.sampler_head_callback is not None and mode == "train":
            loss = loss + self._sampler_head_loss(inputs, mode)
        return loss

    def _sampler_head_loss(self, inputs, mode: str) -> torch.Tensor:
        head_loss, head_metrics = self.sampler_head_callback.head_loss(
            inputs[_PREFIX + "prompt_hidden"], inputs[_PREFIX + "threshold"], inputs[_PREFIX + "sampler_advantages"]
        )
        for name, value in head_metrics.items():
            self._metrics[mode][f"sampler_head/{name}"].append(float(value))
        # Scaled like TRL scales its policy loss for gradient accumulation.
        return head_loss / self.current_gradient_accumulation_steps

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Save the model (or adapter) as `Trainer` does, then the sampler head beside it (on every process, like
        `save_model`; the callback writes where `args.should_save`)."""
        super().save_model(output_dir, _internal_call)
        if self.sampler_head_callback is not None:
            self.sampler_head_callback.save_head(output_dir if output_dir is not None else self.args.output_dir)


__all__ = ["DiffpoTrainer"]
