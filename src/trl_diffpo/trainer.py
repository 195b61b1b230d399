"""DiffpoTrainer: GRPO for masked diffusion LMs with DiFFPO's surrogate likelihood and importance-sampling correction.

The trainer is glue over :mod:`trl_diffpo.generation` (rollouts and their trace) and :mod:`trl_diffpo.likelihood`
(the surrogate and the IS weight). It overrides only what DiFFPO changes in TRL's ``GRPOTrainer``; two mixins hold
the two halves of that change:

- :class:`~trl_diffpo.trainer_rollouts.DiffusionRolloutMixin`: masked-diffusion rollouts inside TRL's generation
  context (``_generate_single_turn``, ``_generate``: ``nfe`` and ``threshold`` for reward functions);
- :class:`~trl_diffpo.trainer_surrogate.SurrogateLogProbMixin`: TRL's per-token log-prob hook answered with the
  surrogate on the sampled canvas, the old / reference log-probs of every inner iteration, the IS weight.

This module keeps the construction (reference model, sampler head, guards) and the batch:

- ``_generate_and_score_completions``: attaches the trace and the draws, computes the old and reference log-probs of
  every inner iteration and the IS weight, logs the diffusion metrics;
- ``compute_loss``: selects the inner iteration, folds the IS weight into the per-token advantages and adds the
  sampler-head loss;
- checkpoints, resume and the model card.

Folding the detached, non-negative weight ``w`` into the advantages reproduces ``w * min(rho A, clip(rho) A)`` for
every TRL loss type (each is linear in a non-negative weight on ``A``) and leaves the KL term unweighted.
"""

from __future__ import annotations

import copy
import textwrap

import torch
from accelerate.logging import get_logger
from accelerate.utils import is_peft_model
from trl import GRPOTrainer
from trl.models import prepare_deepspeed, prepare_fsdp
from trl.trainer.callbacks import SyncRefModelCallback
from trl.trainer.utils import (
    disable_dropout_in_model,
    get_config_model_id,
    is_async_callable,
)

from .backbones import check_bidirectional, is_shifted_logits_model, resolve_mask_token_id
from .checkpointing import (
    copy_head_files,
    load_diffpo_state,
    resolve_resume_checkpoint,
    restored_summary,
    resumable_train_sampler,
    save_diffpo_state,
)
from .config import DiffpoConfig
from .generation import DiffusionGenerateOutput
from .likelihood import draw_surrogate_randomness
from .model_card import write_model_card
from .rewards import prepare_reward_funcs
from .rollout_metrics import rollout_metrics
from .samplers import ADAPTIVE_SAMPLERS
from .trainer_rollouts import DiffusionRolloutMixin, _Rollout
from .trainer_setup import average_head_gradients_under_ddp, load_policy, named_reward, prepare_model_for_grpo
from .trainer_surrogate import _PREFIX, SurrogateLogProbMixin, _fit, _LossContext
from .validation import PromptLengthGuard, UnscorableStreak, check_datasets

logger = get_logger(__name__)

# Offsets that give every process its own rollout / surrogate random stream.
_PROCESS_SEED_STRIDE = 1_000_003
_SURROGATE_SEED_OFFSET = 7_919


class DiffpoTrainer(DiffusionRolloutMixin, SurrogateLogProbMixin, GRPOTrainer):
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

        if reward_funcs is not None:  # the math verifier's limits from `args`; reward time and fallback metrics
            reward_funcs = prepare_reward_funcs(reward_funcs, args)
        loaded_here = isinstance(model, str)
        if loaded_here:
            model, processing_class = load_policy(model, args, quantization_config, processing_class)
            quantization_config = None
        base_model = model.get_base_model() if is_peft_model(model) else model
        prepare_model_for_grpo(base_model, args, processing_class)

        # Full fine-tuning: TRL would rebuild the reference model from `_name_or_path`, which fails for models built
        # in memory, so take a frozen copy now (before TRL patches `forward`) and hide beta from TRL while it
        # initialises. PEFT: TRL builds no reference model, and for a model that already carries an adapter it copies
        # that adapter into a frozen "ref" adapter only when it sees beta != 0, so beta stays visible.
        uses_peft = peft_config is not None or is_peft_model(model)
        reference = None
        hidden = {"sync_ref_model": False}
        if args.beta != 0.0 and not uses_peft:
            reference = copy.deepcopy(model).eval().requires_grad_(False)
            hidden["beta"] = 0.0
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
                self.reward_funcs[i] = named_reward(func, name)

        seed = args.seed if args.surrogate_seed is None else args.surrogate_seed
        process_offset = self.accelerator.process_index * _PROCESS_SEED_STRIDE
        self._surrogate_generator = torch.Generator().manual_seed(seed + _SURROGATE_SEED_OFFSET + process_offset)
        self._rollout_seed = args.seed + process_offset
        self._rollout_generator = None
        self._last_rollout: _Rollout | None = None
        self._rewards_per_func: torch.Tensor | None = None
        self._defer_log_probs = False
        self._loss_context: _LossContext | None = None

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
            if self._policy_is_frozen():
                average_head_gradients_under_ddp(self)
        check_datasets(train_dataset, eval_dataset, args)
        self._prompt_guard = PromptLengthGuard(
            self.model, args.max_prompt_length, self.max_completion_length, self.pad_to_multiple_of
        )
        self._unscorable_streak = UnscorableStreak(args.max_unscorable_steps)
        self._resumed_diffpo_state: list[str] = []

    # ------------------------------------------------------------------------------------------------ construction

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
        if mode == "train":
            self._unscorable_streak.update(rewards_per_func, self.reward_func_names, self.state.global_step)
            self._metrics[mode]["rewards/unscorable_batches"].append(float(self._unscorable_streak.total))
        self._rewards_per_func = rewards_per_func
        return rewards_per_func

    def _log(self, mode: str, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self._metrics[mode][name].append(value)

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
        # TRL keeps the returned behaviour log-probs as `sampling_per_token_logps`, and its off-policy mask
        # (`off_policy_mask_threshold`) would compare them with the current surrogate: that is the structural
        # surrogate-vs-sampler gap (the IS weight's business), not staleness. Without them the mask compares the
        # iteration's old surrogate log-probs with the current ones, as it should.
        output.pop("sampling_per_token_logps", None)
        rollout, self._last_rollout = self._last_rollout, None
        trace = rollout.output

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
        if trace.step_features is not None:  # a state head's decisions, batch-first like the rest
            context[_PREFIX + "step_features"] = trace.step_features
            context[_PREFIX + "step_threshold"] = trace.step_threshold
            context[_PREFIX + "step_valid"] = trace.step_valid
        # sampler_only: the frozen dLLM needs no surrogate at all. Otherwise the old log-probs (and the IS weight
        # from them) are computed here only where the policy moves between generation and use.
        if not self._policy_is_frozen():
            batch_size = args.per_device_train_batch_size if mode == "train" else args.per_device_eval_batch_size
            need_old = not self._old_logps_are_current(mode)
            old_logps, ref_logps = self._log_probs_per_iteration(context, num_iterations, batch_size, need_old)
            if ref_logps is not None:
                context[_PREFIX + "ref_logps"] = ref_logps
            if old_logps is not None:
                context[_PREFIX + "old_logps"] = old_logps
                context[_PREFIX + "is_weight"] = self._importance_weights(
                    output["completion_mask"], trace.logprobs, old_logps, mode
                )

        if self.sampler_head_callback is not None:
            context[_PREFIX + "sampler_advantages"] = self._sampler_advantages(trace, len(inputs), mode)

        self._log(mode, rollout_metrics(trace, draws, self.accelerator.gather))
        output.update(context)
        return output

    def _sampler_advantages(self, trace: DiffusionGenerateOutput, local_size: int, mode: str) -> torch.Tensor:
        rewards_per_func = self._rewards_per_func
        weights = self.reward_weights.to(rewards_per_func.device)
        rewards = (rewards_per_func * weights[None]).nansum(dim=1)
        rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan  # unscorable, as TRL marks them
        nfe = self.accelerator.gather(trace.nfe)
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        # a state head's per-row thresholds are the means of its decisions (the callback cannot pair up its draws)
        row_thresholds = {"row_thresholds": trace.threshold} if self._state_dependent_head() else {}
        advantages = self.sampler_head_callback.sampler_advantages(
            rewards, nfe, self.max_completion_length, num_generations, **row_thresholds
        )
        start = self.accelerator.process_index * local_size
        return advantages[start : start + local_size].to(trace.nfe.device)

    # --------------------------------------------------------------------------------------------------- loss

    def _inner_iteration(self, mode: str) -> int:
        if mode != "train":
            return 0
        steps_per_generation = self.args.steps_per_generation
        return (self._step % (steps_per_generation * self.num_iterations)) // steps_per_generation

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = self._mode()
        if self._policy_is_frozen():
            if return_outputs:
                raise ValueError("The GRPOTrainer does not support returning outputs")
            return self._sampler_head_loss(inputs, mode)
        iteration = self._inner_iteration(mode)
        width = inputs["completion_ids"].shape[1]
        policy_inputs = dict(inputs)
        weight_from_current = _PREFIX + "old_logps" not in inputs
        if not weight_from_current:
            policy_inputs["old_per_token_logps"] = _fit(inputs[_PREFIX + "old_logps"][:, iteration], width, 0.0)
            weight = _fit(inputs[_PREFIX + "is_weight"][:, iteration], width, 1.0)
            policy_inputs["advantages"] = inputs["advantages"][:, None] * weight
        if _PREFIX + "ref_logps" in inputs:
            policy_inputs["ref_per_token_logps"] = _fit(inputs[_PREFIX + "ref_logps"][:, iteration], width, 0.0)
        self._loss_context = _LossContext(inputs, iteration, policy_inputs, weight_from_current, mode)
        try:
            loss = super().compute_loss(model, policy_inputs, return_outputs, num_items_in_batch)
        finally:
            self._loss_context = None
        if self.sampler_head_callback is not None and mode == "train":
            loss = loss + self._sampler_head_loss(inputs, mode)
        return loss

    def _sampler_head_loss(self, inputs, mode: str) -> torch.Tensor:
        decisions = {
            name: inputs[_PREFIX + name]
            for name in ("step_features", "step_threshold", "step_valid")
            if _PREFIX + name in inputs
        }
        head_loss, head_metrics = self.sampler_head_callback.head_loss(
            inputs[_PREFIX + "prompt_hidden"],
            inputs[_PREFIX + "threshold"],
            inputs[_PREFIX + "sampler_advantages"],
            **decisions,
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

    # ------------------------------------------------------------------------------ checkpoints, resume, the Hub

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """`Trainer.train`, plus: `resume_from_checkpoint` may be `True` or the strings "true" / "latest" (the CLI's
        form) for the last checkpoint; the DiFFPO state (RNG streams, generation cycle) is restored with the rest; the
        model card is written at the end (also with `save_strategy="no"`)."""
        checkpoint = resolve_resume_checkpoint(resume_from_checkpoint, self.args.output_dir)
        if checkpoint is not None:
            self._resumed_diffpo_state = load_diffpo_state(self, checkpoint)
        output = super().train(checkpoint, trial, ignore_keys_for_eval, **kwargs)
        if self.args.should_save:
            self.create_model_card()
        return output

    def _get_train_sampler(self, dataset=None):
        return resumable_train_sampler(self, super()._get_train_sampler(dataset))

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        save_diffpo_state(self, output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:  # the last restore step of `Trainer._prepare_for_training`
            logger.warning(restored_summary(self, checkpoint, self._resumed_diffpo_state))

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        copy_head_files(checkpoint_folder, self.args.output_dir)
        super()._push_from_checkpoint(checkpoint_folder)

    def create_model_card(self, model_name=None, dataset_name=None, tags=None, **kwargs):
        """Write README.md: base model, data, DiFFPO settings, end-of-training numbers and a diffusion quick start."""
        write_model_card(self, model_name, dataset_name, tags)


__all__ = ["DiffpoTrainer"]
