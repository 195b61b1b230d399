"""Configuration of :class:`trl_diffpo.DiffpoTrainer`: GRPO's configuration plus diffusion decoding and DiFFPO."""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field

from transformers import TrainingArguments
from trl import GRPOConfig

from .block_logits import CACHE_MODES, CACHE_NONE
from .likelihood import IS_CORRECTIONS, K_STAGE, LIKELIHOODS, TOKEN_IS, TWO_STAGE, stages_for
from .samplers import ADAPTIVE_SAMPLERS, CONFIDENCE_THRESHOLD, FIXED_SCHEDULE_SAMPLERS, LOW_CONFIDENCE, SAMPLERS

# transformers >= 5.23 renamed `gradient_checkpointing` to `activation_checkpointing` (the old name warns on every run)
_HAS_ACTIVATION_CHECKPOINTING = "activation_checkpointing" in {f.name for f in dataclasses.fields(TrainingArguments)}
DEFAULT_REWARD_TIMEOUT_S = 5.0
DEFAULT_REWARD_BATCH_BUDGET_S = 30.0
DEFAULT_REWARD_NUM_WORKERS = 4

# Sampling options of autoregressive `generate` that diffusion decoding does not implement, with their no-op value.
_UNSUPPORTED_SAMPLING_OPTIONS = {"top_p": 1.0, "top_k": 0, "min_p": None, "repetition_penalty": 1.0}


@dataclass
class DiffpoConfig(GRPOConfig):
    r"""
    Configuration class for the [`DiffpoTrainer`].

    [`DiffpoConfig`] inherits every parameter of [`~trl.GRPOConfig`] and adds the options of masked-diffusion decoding
    and of DiFFPO ([Diffusion Fast and Furious Policy Optimization](https://huggingface.co/papers/2510.02212)). The
    defaults reproduce DiFFPO's setting on top of d1's recipe: rollouts of 256 tokens in blocks of 32 with 128
    low-confidence steps at temperature 0.9, prompt masking 0.15, two-stage mean-field surrogate with token-level
    importance-sampling correction, `beta=0.04`, `epsilon=0.5`, 12 inner iterations, 6 generations per prompt (and 6
    completions per device and step),
    advantage = reward - group mean (`scale_rewards="none"`), sequence-normalised `loss_type="grpo"` and a plain KL
    term (`use_bias_correction_kl=False`).

    Generation reuses GRPO's `max_completion_length` (the diffusion canvas length) and `temperature` (0 = greedy, the
    policy distribution is `softmax(logits / temperature)` for sampling and training alike).

    Parameters:
        block_length (`int`, *optional*, defaults to `32`):
            Semi-autoregressive block length; must divide `max_completion_length`.
        diffusion_steps (`int` or `None`, *optional*, defaults to `128`):
            Total denoising steps of the fixed-schedule samplers (`"low_confidence"`, `"random"`): a multiple of the
            number of blocks, at most `max_completion_length`. Ignored by the adaptive samplers.
        sampler (`str`, *optional*, defaults to `"low_confidence"`):
            Unmasking rule: `"low_confidence"` (top-k by confidence, LLaDA/d1), `"random"`, `"confidence_threshold"`
            (Fast-dLLM: commit every token whose confidence is >= `threshold`) or `"entropy_bounded"` (EB sampler with
            budget `threshold` = gamma, in nats).
        threshold (`float` or `None`, *optional*, defaults to `None`):
            Threshold of the adaptive samplers: confidence in (0, 1] or EB gamma >= 0. Required for them (a sampler
            head, when present, replaces it during training rollouts).
        mask_token_id (`int` or `None`, *optional*, defaults to `None`):
            The `[MASK]` token id; `None` reads `model.config.mask_token_id`, then the tokenizer's mask token.
        p_mask_prompt (`float`, *optional*, defaults to `0.15`):
            Probability with which each prompt token is masked in the surrogate forwards (d1's prompt masking, a
            regulariser). 0 disables it.
        stop_at_eos (`bool`, *optional*, defaults to `True`):
            Stop decoding a row once every position up to its first EOS is decoded (saves NFEs; the rest is EOS).
        rollout_cache (`str`, *optional*, defaults to `"none"`):
            Cached block decoding of the rollouts (`diffusion_generate(cache=...)`): `"none"` (every step recomputes
            the whole sequence: exact), `"prefix"` (the keys/values before the current block are computed once per
            block) or `"dual"` (before and after it; each step forwards the current block only). The cached modes
            approximate the dLLM sampler; the rollout's behaviour log-probs are those of the forwards actually run and
            the IS correction accounts for the gap (watch `diffpo/logp_gap/mean` and the clamped fraction). Native
            LLaDA / Dream and transformers' bidirectional Llama / Qwen2 / Qwen3 only. See docs/generation.md.
        rollout_cache_refresh (`int` or `None`, *optional*, defaults to `None`):
            With `rollout_cache`, also recompute the cache every this many steps inside a block (`None`: at block
            starts only).
        likelihood (`str`, *optional*, defaults to `"two_stage"`):
            Surrogate likelihood of a completion: `"mean_field"` (d1: every token scored given the prompt only, one
            forward), `"two_stage"` (DiFFPO: tau uniform in {0..T-1}; tokens committed after tau are scored given the
            completion's state at step tau; two forwards) or `"k_stage"` (K-1 random cut points, K forwards; K >= T is
            the exact trajectory likelihood).
        num_stages (`int` or `None`, *optional*, defaults to `None`):
            K for `likelihood="k_stage"` (required there, >= 1). Must be unset (or 1 / 2) for `"mean_field"` /
            `"two_stage"`. Note `k_stage` with K=2 draws its cut from {1..T-1}, while `two_stage` also allows tau=0.
        is_correction (`str`, *optional*, defaults to `"token"`):
            Importance-sampling correction between the real sampler (behaviour) and the surrogate: `"token"`
            (w = min(C, pi_surrogate / pi_behaviour) per token, DiFFPO), `"sequence"` (one weight per completion from
            the mean per-token log-ratio, clamped) or `"none"`.
        is_clamp (`float`, *optional*, defaults to `2.0`):
            The clamp C of the IS weight (> 0). A large fraction of weights at C signals a surrogate/sampler mismatch.
        surrogate_seed (`int` or `None`, *optional*, defaults to `None`):
            Seed of the local generator that draws the surrogate's randomness (prompt masks, cut points); `None` uses
            `seed`. Each process offsets it by its index.
        max_prompt_length (`int` or `None`, *optional*, defaults to `None`):
            Longest prompt in tokens; longer prompts keep their last `max_prompt_length` tokens (left truncation, as
            TRL truncated before 1.16 removed the option). `None` keeps prompts whole. A prompt plus the canvas that
            exceeds a model's learned position table (BERT: 512) is refused with a message giving the largest value
            that fits.
        max_unscorable_steps (`int`, *optional*, defaults to `3`):
            Training stops with an error after this many consecutive generation batches in which every reward
            function returned `None`/NaN for every completion (they train at zero gradient: usually a broken reward
            or a missing dataset column). Each such batch is warned about and counted (`rewards/unscorable_batches`).
            0 only warns.
        reward_timeout_s (`float`, *optional*, defaults to `5.0`):
            Seconds math_verify may spend on one answer of the math rewards before it is judged wrong (> 0).
        reward_batch_budget_s (`float` or `None`, *optional*, defaults to `30.0`):
            Seconds one math-reward call may spend on its batch; answers still unjudged then are judged wrong
            (`None`: no batch limit). Bounds the reward time whatever the model writes.
        reward_num_workers (`int`, *optional*, defaults to `4`):
            Worker processes that verify the math answers of a batch in parallel (>= 1).
        activation_checkpointing (`bool` or `None`, *optional*, defaults to `None`):
            Activation (gradient) checkpointing; `None` means on (TRL's default) unless the deprecated alias
            `gradient_checkpointing` is given, which still works but warns (transformers >= 5.23 renamed it).
    """

    # Overridden GRPO defaults: DiFFPO / d1's recipe
    learning_rate: float = field(default=3e-6, metadata={"help": "The initial learning rate for AdamW (d1: 3e-6)."})
    max_completion_length: int | None = field(
        default=256,
        metadata={"help": "Length of the diffusion canvas (completion length), a multiple of block_length."},
    )
    num_generations: int | None = field(default=6, metadata={"help": "Completions per prompt (d1: 6)."})
    per_device_train_batch_size: int = field(
        default=6,
        metadata={"help": "Completions per device and step; a multiple of num_generations by default (d1: 6)."},
    )
    temperature: float = field(
        default=0.9,
        metadata={"help": "Sampling temperature of the diffusion decoder and of the trained policy; 0 is greedy."},
    )
    beta: float = field(default=0.04, metadata={"help": "KL coefficient towards the reference model (d1: 0.04)."})
    num_iterations: int = field(default=12, metadata={"help": "Inner iterations per generation batch (d1: 12)."})
    epsilon: float = field(default=0.5, metadata={"help": "Clipping range of the policy ratio (d1: 0.5)."})
    scale_rewards: str = field(
        default="none",
        metadata={"help": "Advantage scaling: 'none' (d1/DiFFPO: reward - group mean), 'group' or 'batch'."},
    )
    loss_type: str = field(
        default="grpo",
        metadata={"help": "TRL loss aggregation; 'grpo' (per-sequence mean, as d1) by default. All types work."},
    )
    disable_dropout: bool = field(
        default=True,
        metadata={
            "help": "Disable dropout, so that rollouts, old, reference and current log-probs use the same function "
            "(the IS weight compares them)."
        },
    )
    use_bias_correction_kl: bool = field(
        default=False,
        metadata={
            "help": "Multiply the KL term by the policy ratio (TRL's default, DeepSeek-V3.2). Off by default, as in d1 "
            "and DiFFPO."
        },
    )
    vllm_importance_sampling_correction: bool = field(
        default=False,
        metadata={"help": "TRL's vLLM IS correction; unused (DiFFPO applies its own correction, see is_correction)."},
    )

    # Diffusion decoding
    block_length: int = field(
        default=32, metadata={"help": "Semi-autoregressive block length; must divide max_completion_length."}
    )
    diffusion_steps: int | None = field(
        default=128,
        metadata={
            "help": "Total denoising steps of the fixed-schedule samplers: a multiple of the number of blocks, at most "
            "max_completion_length."
        },
    )
    sampler: str = field(
        default=LOW_CONFIDENCE,
        metadata={"help": f"Unmasking rule, one of {', '.join(SAMPLERS)}.", "choices": list(SAMPLERS)},
    )
    threshold: float | None = field(
        default=None,
        metadata={
            "help": "Threshold of the adaptive samplers: confidence in (0, 1] for confidence_threshold, gamma >= 0 "
            "(nats) for entropy_bounded."
        },
    )
    mask_token_id: int | None = field(
        default=None, metadata={"help": "[MASK] token id; None reads the model config, then the tokenizer."}
    )
    p_mask_prompt: float = field(
        default=0.15,
        metadata={"help": "Probability of masking each prompt token in the surrogate forwards (d1: 0.15)."},
    )
    stop_at_eos: bool = field(
        default=True, metadata={"help": "Stop decoding a row once everything up to its first EOS is decoded."}
    )
    rollout_cache: str = field(
        default=CACHE_NONE,
        metadata={
            "help": f"Cached block decoding of the rollouts, one of {', '.join(CACHE_MODES)} (none is exact).",
            "choices": list(CACHE_MODES),
        },
    )
    rollout_cache_refresh: int | None = field(
        default=None,
        metadata={
            "help": "With rollout_cache, also refresh the cache every this many steps in a block (None: never)."
        },
    )

    # DiFFPO surrogate and importance sampling
    likelihood: str = field(
        default=TWO_STAGE,
        metadata={"help": f"Surrogate likelihood, one of {', '.join(LIKELIHOODS)}.", "choices": list(LIKELIHOODS)},
    )
    num_stages: int | None = field(
        default=None, metadata={"help": "K for likelihood='k_stage' (K >= T is the exact trajectory likelihood)."}
    )
    is_correction: str = field(
        default=TOKEN_IS,
        metadata={
            "help": f"Importance-sampling correction, one of {', '.join(IS_CORRECTIONS)}.",
            "choices": list(IS_CORRECTIONS),
        },
    )
    is_clamp: float = field(default=2.0, metadata={"help": "Clamp C of the importance-sampling weight (> 0)."})
    surrogate_seed: int | None = field(
        default=None, metadata={"help": "Seed of the surrogate's prompt masks and cut points; None uses `seed`."}
    )

    # Input limits
    max_prompt_length: int | None = field(
        default=None,
        metadata={"help": "Longest prompt in tokens; longer prompts keep their last tokens. None: no truncation."},
    )
    max_unscorable_steps: int = field(
        default=3,
        metadata={
            "help": "Stop after this many consecutive generation batches where no completion got a reward (0: only "
            "warn)."
        },
    )
    # Rewards: bounds of the math verifier (see trl_diffpo.rewards.instrumentation)
    reward_timeout_s: float = field(
        default=DEFAULT_REWARD_TIMEOUT_S,
        metadata={"help": "Seconds math_verify may spend on one answer before it is judged wrong."},
    )
    reward_batch_budget_s: float | None = field(
        default=DEFAULT_REWARD_BATCH_BUDGET_S,
        metadata={
            "help": "Seconds one math-reward call may spend on its batch (unjudged answers: wrong); None: no limit."
        },
    )
    reward_num_workers: int = field(
        default=DEFAULT_REWARD_NUM_WORKERS,
        metadata={"help": "Worker processes that verify the math answers of a batch in parallel."},
    )
    if _HAS_ACTIVATION_CHECKPOINTING:
        # TRL's default (on) under transformers' new name, so that a default config no longer warns
        activation_checkpointing: bool | None = field(
            default=None,
            metadata={
                "help": "Trade compute for memory: recompute activations in the backward pass. None: on (TRL's "
                "default) unless the deprecated `gradient_checkpointing` is given.",
                "nargs": "?",
                "const": True,
            },
        )
        gradient_checkpointing: bool | None = field(
            default=None,
            metadata={"help": "Deprecated alias of `activation_checkpointing`.", "nargs": "?", "const": True},
        )

    def __post_init__(self):
        if (
            _HAS_ACTIVATION_CHECKPOINTING
            and self.activation_checkpointing is None
            and self.gradient_checkpointing is None
        ):
            self.activation_checkpointing = True  # TRL's default, without transformers' deprecation warning
        super().__post_init__()
        self._check_rewards()
        self._refuse_other_generation_backends()
        self._check_decoding()
        self._check_surrogate()
        self._check_input_limits()

    @property
    def surrogate_stages(self) -> int:
        """The number of stages K of the configured surrogate (forwards per sample at most)."""
        return stages_for(self.likelihood, self.num_stages)

    def _refuse_other_generation_backends(self) -> None:
        if self.use_vllm:
            raise ValueError(
                "DiffpoConfig does not support `use_vllm=True`: vLLM decodes autoregressively, while DiFFPO needs "
                "masked-diffusion rollouts with their trace. Set `use_vllm=False`."
            )
        if self.use_transformers_continuous_batching or self.use_transformers_paged:
            raise ValueError(
                "DiffpoConfig does not support transformers continuous batching (`use_transformers_continuous_batching`"
                " / `use_transformers_paged`): rollouts use masked-diffusion decoding. Leave both False."
            )
        for name, neutral in _UNSUPPORTED_SAMPLING_OPTIONS.items():
            if getattr(self, name) != neutral:
                raise ValueError(
                    f"`{name}={getattr(self, name)}` is not supported by masked-diffusion decoding (only `temperature` "
                    f"shapes the token distribution). Leave `{name}` at {neutral}."
                )
        if self.generation_kwargs:
            raise ValueError(
                "`generation_kwargs` configure transformers' autoregressive `generate`, which DiffpoTrainer does not "
                "use. Set the decoding through `block_length`, `diffusion_steps`, `sampler`, `threshold`, "
                "`temperature` and `stop_at_eos` instead."
            )

    def _check_decoding(self) -> None:
        length = self.max_completion_length
        if length is None or length <= 0:
            raise ValueError(f"max_completion_length must be a positive integer (the canvas length), got {length}.")
        if self.block_length <= 0 or length % self.block_length != 0:
            raise ValueError(
                f"max_completion_length={length} must be a multiple of block_length={self.block_length} "
                "(semi-autoregressive blocks tile the completion)."
            )
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler={self.sampler!r} is not supported; choose one of {', '.join(SAMPLERS)}.")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}.")
        if self.rollout_cache not in CACHE_MODES:
            raise ValueError(
                f"rollout_cache={self.rollout_cache!r} is not supported; choose one of {', '.join(CACHE_MODES)}."
            )
        refresh = self.rollout_cache_refresh
        if refresh is not None and (isinstance(refresh, bool) or not isinstance(refresh, int) or refresh <= 0):
            raise ValueError(f"rollout_cache_refresh must be None or a positive integer (steps), got {refresh!r}.")
        num_blocks = length // self.block_length
        if self.sampler in FIXED_SCHEDULE_SAMPLERS:
            steps = self.diffusion_steps
            if steps is None or steps <= 0 or steps % num_blocks != 0:
                raise ValueError(
                    f"diffusion_steps={steps} must be a positive multiple of the number of blocks ({num_blocks} = "
                    f"max_completion_length {length} / block_length {self.block_length}) for sampler={self.sampler!r}."
                )
            if steps > length:
                raise ValueError(
                    f"diffusion_steps={steps} exceeds max_completion_length={length}: every step must commit at least "
                    "one token."
                )
            if self.threshold is not None:
                warnings.warn(
                    f"`threshold={self.threshold}` has no effect with sampler={self.sampler!r} (a fixed-schedule "
                    f"sampler); it applies to {', '.join(ADAPTIVE_SAMPLERS)}.",
                    UserWarning,
                    stacklevel=3,
                )
        else:
            if self.threshold is None:
                example = "0.9" if self.sampler == CONFIDENCE_THRESHOLD else "0.1"
                raise ValueError(f"sampler={self.sampler!r} needs a `threshold` (e.g. threshold={example}).")
            if self.sampler == CONFIDENCE_THRESHOLD and not 0 < self.threshold <= 1:
                raise ValueError(
                    f"threshold={self.threshold} is out of range for sampler='confidence_threshold': a confidence in "
                    "(0, 1]."
                )
            if self.sampler != CONFIDENCE_THRESHOLD and not (math.isfinite(self.threshold) and self.threshold >= 0):
                raise ValueError(
                    f"threshold={self.threshold} is out of range for sampler='entropy_bounded': gamma must be a "
                    "finite number >= 0 (nats)."
                )
        if self.mask_token_id is not None and self.mask_token_id < 0:
            raise ValueError(f"mask_token_id must be a non-negative token id, got {self.mask_token_id}.")

    def _check_surrogate(self) -> None:
        if not 0.0 <= self.p_mask_prompt < 1.0:
            raise ValueError(f"p_mask_prompt must be in [0, 1), got {self.p_mask_prompt}.")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(
                f"likelihood={self.likelihood!r} is not supported; choose one of {', '.join(LIKELIHOODS)}."
            )
        if self.likelihood == K_STAGE:
            if self.num_stages is None or self.num_stages < 1:
                raise ValueError(
                    f"likelihood='k_stage' needs num_stages >= 1 (1 = mean-field, >= T = exact), got {self.num_stages}."
                )
        elif self.num_stages is not None and self.num_stages != stages_for(self.likelihood):
            raise ValueError(
                f"num_stages={self.num_stages} conflicts with likelihood={self.likelihood!r} "
                f"({stages_for(self.likelihood)} stage(s)); use likelihood='k_stage' to choose K."
            )
        if self.is_correction not in IS_CORRECTIONS:
            raise ValueError(
                f"is_correction={self.is_correction!r} is not supported; choose one of {', '.join(IS_CORRECTIONS)}."
            )
        if not (math.isfinite(self.is_clamp) and self.is_clamp > 0):
            raise ValueError(f"is_clamp must be a finite number > 0, got {self.is_clamp}.")

    def _check_input_limits(self) -> None:
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ValueError(
                f"max_prompt_length must be a positive number of tokens or None (no truncation), got "
                f"{self.max_prompt_length}."
            )
        if self.max_unscorable_steps < 0:
            raise ValueError(f"max_unscorable_steps must be >= 0 (0: only warn), got {self.max_unscorable_steps}.")

    def _check_rewards(self) -> None:
        if not (math.isfinite(self.reward_timeout_s) and self.reward_timeout_s > 0):
            raise ValueError(f"reward_timeout_s must be a finite number of seconds > 0, got {self.reward_timeout_s}.")
        budget = self.reward_batch_budget_s
        if budget is not None and not (math.isfinite(budget) and budget > 0):
            raise ValueError(f"reward_batch_budget_s must be > 0 seconds or None (no limit), got {budget}.")
        if self.reward_num_workers < 1:
            raise ValueError(f"reward_num_workers must be >= 1, got {self.reward_num_workers}.")
