"""The callback that trains the sampler head inside ``DiffpoTrainer``: rollout thresholds, advantages, loss, events."""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Callable
from dataclasses import fields

import torch
from torch import nn
from transformers import TrainerCallback

from ..backbones import unwrap_model
from ..samplers import ADAPTIVE_SAMPLERS, ENTROPY_BOUNDED
from .checkpoints import SamplerHeadCheckpoints
from .config import (
    DEFAULT_THRESHOLD_RANGES,
    HEAD_ATTRIBUTE,
    MODES,
    SamplerHeadConfig,
)
from .decisions import check_decisions, decision_metrics
from .network import SamplerHead
from .objective import clipped_surrogate, group_relative_sampler_advantages, pearson
from .persistence import head_state_dict, load_head_weights, load_sampler_head
from .training_hooks import (
    disable_ddp_unused_parameter_search,
    exclude_head_from_model_files,
    hook_head_optimizer_group,
    hook_head_resume,
    is_zero3,
    model_dtype_and_device,
    model_hidden_size,
)

logger = logging.getLogger(__name__)

# Threshold batches remembered for the correlation metrics until the next `sampler_advantages` call.
_MAX_BUFFERED_DRAWS = 1024


def _noise_seed(*parts: int) -> int:
    """A 63-bit seed derived from integers (stable across processes and Python runs)."""
    digest = hashlib.sha256("-".join(str(int(part)) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class SamplerHeadCallback(SamplerHeadCheckpoints, TrainerCallback):
    """Trains a :class:`SamplerHead` inside ``DiffpoTrainer``: one learned decoding threshold per prompt.

    Modes: ``"joint"`` (the dLLM and the head train on the same rollouts) and ``"sampler_only"`` (the dLLM is frozen,
    only the head trains). Model-only training is ``DiffpoTrainer`` without this callback (a fixed threshold).

    The trainer drives it through five methods (see ``notes/CONTRACT.md``): :meth:`setup` at the end of its
    ``__init__``, :meth:`threshold_fn` as ``diffusion_generate(threshold_fn=...)`` for training rollouts,
    :meth:`sampler_advantages` on the gathered rewards/NFE, :meth:`head_loss` in ``compute_loss``, and
    :meth:`save_head` in ``save_model``. The callback events save the head into every ``checkpoint-N/``
    (:meth:`on_save`) and anneal the exploration noise. A state-dependent head (``features="state"``) decodes with
    ``diffusion_generate(step_threshold_fn=callback.step_policy())`` instead, and :meth:`head_loss` then also takes
    the rollouts' recorded decisions (see :attr:`state_dependent`).

    Args:
        mode: ``"joint"`` or ``"sampler_only"``.
        nfe_penalty: lambda in the sampler reward ``reward - lambda * nfe / gen_length`` (0: reward only; ties in
            reward are then not broken in favour of speed).
        head_config: a :class:`SamplerHeadConfig` or a dict of its fields (``sampler`` and ``input_size`` are filled
            in from the trainer). Fields can also be given as keyword arguments (``threshold_max=2.0``).
        scale_advantages: divide the group-centred sampler reward by the group std (+1e-4), as TRL's
            ``scale_rewards="group"``. Off by default: in a group whose task rewards tie, the std is that of the NFE
            term alone, so any ``nfe_penalty > 0`` would become a unit-size push to decode faster.
        head_learning_rate: learning rate of the head's own optimizer parameter group (no weight decay; it follows
            the run's LR schedule). The dLLM's learning rate (e.g. 3e-6 for LoRA on LLaDA) would barely move the head.
            ``None`` leaves the head in the trainer's groups at the run's learning rate.
        head_loss_weight: factor on the head's loss before the trainer adds it to the policy loss. The run's
            gradient-norm clipping (``max_grad_norm``) acts on the dLLM and the head together, and the head's raw
            REINFORCE gradient (which scales like ``1 / sigma``) can be larger than the dLLM's: at weight 1 it would
            silently shrink the dLLM's updates. Adam-type optimizers are invariant to this factor for the head's own
            step (``head_learning_rate`` sets that), so the default 0.01 only keeps the head out of the clipping.
            The logged ``loss`` metric is the unweighted loss.
        head_clip_epsilon: PPO clipping of the head's update: the loss is
            ``-mean(min(rho_i A_i, clip(rho_i, 1 - eps, 1 + eps) A_i))`` with ``rho_i`` the ratio of the head's
            current density of ``u_i`` to the density of the head that drew it (a frozen copy taken when the rollouts
            are drawn). Its gradient equals REINFORCE's on the first pass over a batch and stops the head from
            drifting further once it has moved ``eps`` away on the later passes (TRL's ``num_iterations > 1``).
            ``None``: plain REINFORCE ``-mean(A_i log N(u_i; mu, sigma^2))``.
        pretrained_head: a folder or Hub id of a saved head to start from (e.g. ``sampler_only`` after ``joint``).
        seed: seed of the exploration noise (default: the trainer's ``args.seed``). The noise of each threshold draw is
            derived from ``(seed, process index, global step, draw index)``: a resumed run draws what the
            uninterrupted run would have drawn.
        head_kwargs: :class:`SamplerHeadConfig` fields.
    """

    is_sampler_head_callback = True

    def __init__(
        self,
        mode: str = "joint",
        nfe_penalty: float = 0.0,
        head_config: SamplerHeadConfig | dict | None = None,
        *,
        scale_advantages: bool = False,
        head_learning_rate: float | None = 1e-3,
        head_loss_weight: float = 0.01,
        head_clip_epsilon: float | None = 0.2,
        pretrained_head: str | os.PathLike | None = None,
        seed: int | None = None,
        **head_kwargs,
    ):
        if mode not in MODES:
            raise ValueError(
                f"SamplerHeadCallback(mode={mode!r}): choose 'joint' (model and head train) or 'sampler_only' (model "
                "frozen); for model-only training with a fixed threshold, do not add the callback."
            )
        if not (math.isfinite(nfe_penalty) and nfe_penalty >= 0):
            raise ValueError(f"nfe_penalty must be a finite number >= 0, got {nfe_penalty}.")
        if head_learning_rate is not None and not (math.isfinite(head_learning_rate) and head_learning_rate > 0):
            raise ValueError(f"head_learning_rate must be a number > 0 or None, got {head_learning_rate}.")
        if not (math.isfinite(head_loss_weight) and head_loss_weight > 0):
            raise ValueError(f"head_loss_weight must be a finite number > 0, got {head_loss_weight}.")
        if head_clip_epsilon is not None and not (math.isfinite(head_clip_epsilon) and 0 < head_clip_epsilon < 1):
            raise ValueError(f"head_clip_epsilon must be in (0, 1) or None, got {head_clip_epsilon}.")
        if isinstance(head_config, SamplerHeadConfig):
            head_config = head_config.to_dict()
        overrides = dict(head_config or {})
        overrides.update(head_kwargs)
        unknown = sorted(set(overrides) - {f.name for f in fields(SamplerHeadConfig)})
        if unknown:
            raise TypeError(f"SamplerHeadCallback got unknown head options {unknown}; see SamplerHeadConfig.")
        self.mode = mode
        self.nfe_penalty = float(nfe_penalty)
        self.scale_advantages = bool(scale_advantages)
        self.head_learning_rate = head_learning_rate
        self.head_loss_weight = float(head_loss_weight)
        self.head_clip_epsilon = head_clip_epsilon
        self.pretrained_head = pretrained_head
        self.seed = seed
        self.head_overrides = overrides
        self.head: SamplerHead | None = None
        self.trainer = None
        self.process_index = 0
        self.restored_from: str | None = None  # checkpoint the head weights were restored from on resume
        self.fallback_counts: dict[str, int] = {}
        self._noise_step = -1
        self._noise_draws = 0
        self._drawn_thresholds: list[torch.Tensor] = []
        self._behaviour_head: SamplerHead | None = None  # frozen copy of the head that drew the current rollouts
        self._behaviour_sigma: float | None = None
        self._scored_since_snapshot = True

    # -- building the head -------------------------------------------------------------------------------------------

    def init_head(
        self,
        input_size: int,
        sampler: str | None = None,
        dtype: torch.dtype = torch.float32,
        device=None,
        default_threshold: float | None = None,
    ) -> SamplerHead:
        """Build (or load, with ``pretrained_head``) the head without a trainer; :meth:`setup` calls this.

        ``default_threshold`` (the trainer's fixed ``DiffpoConfig.threshold``) is where the head starts when the head
        config sets no ``init_threshold``; an entropy bound above the default range widens ``threshold_max`` to twice
        it (unless ``threshold_max`` is set), so the head starts from the model-only setting and can move both ways.
        """
        options = dict(self.head_overrides)
        requested = options.pop("sampler", None)
        sampler = sampler or requested or ENTROPY_BOUNDED
        if requested is not None and requested != sampler:
            raise ValueError(
                f"The head config asks for sampler {requested!r} but the trainer decodes with {sampler!r}: the head "
                "sets the threshold of the trainer's sampler; drop `sampler` from the head config."
            )
        if default_threshold is not None and math.isfinite(default_threshold) and "init_threshold" not in options:
            low, high, _ = DEFAULT_THRESHOLD_RANGES[sampler]
            low, high = options.get("threshold_min", low), options.get("threshold_max", high)
            if sampler == ENTROPY_BOUNDED and "threshold_max" not in options and default_threshold >= high:
                high = options["threshold_max"] = 2.0 * default_threshold
            if low < default_threshold < high:
                options["init_threshold"] = float(default_threshold)
        options.setdefault("input_size", input_size)
        if options["input_size"] != input_size:
            raise ValueError(f"head input_size={options['input_size']} but the backbone hidden size is {input_size}.")
        config = SamplerHeadConfig(sampler=sampler, **options)
        if self.pretrained_head is not None:
            head = load_sampler_head(self.pretrained_head)
            if not head.config.same_head_shape(config):
                raise ValueError(
                    f"pretrained_head={self.pretrained_head!r} has config {head.config.to_dict()}, which does not match "
                    f"{config.to_dict()} (sampler, input_size, mlp_hidden_size, threshold range must agree)."
                )
            head.config = config  # keep the requested exploration settings
        else:
            head = SamplerHead(config)
        self.head = head.to(dtype=dtype, device=device or "cpu").train()
        self.head.exploration_sigma = config.sigma
        return self.head

    def setup(self, trainer) -> None:
        """Build the head for ``trainer``'s backbone and attach it as ``trainer.model.diffpo_sampler_head``.

        Called by ``DiffpoTrainer`` at the end of its ``__init__`` (before the optimizer and any DeepSpeed engine
        exist, so the head joins both). Checks that the trainer decodes with an adaptive sampler, creates the head on
        the backbone's device in float32 (in the backbone's dtype under ZeRO-3), freezes every other parameter in ``sampler_only`` mode, keeps the head's
        weights out of the model's own ``save_pretrained`` files (they go to ``sampler_head.safetensors``), gives the
        head its own optimizer parameter group and hooks checkpoint resumption.
        """
        args = getattr(trainer, "args", None)
        sampler = getattr(args, "sampler", None)
        if sampler not in ADAPTIVE_SAMPLERS:
            raise ValueError(
                f"SamplerHeadCallback learns a per-prompt decoding threshold, but the trainer decodes with "
                f"sampler={sampler!r}, which has no threshold. Set DiffpoConfig(sampler='entropy_bounded') or "
                "DiffpoConfig(sampler='confidence_threshold'), or remove the callback for model-only training."
            )
        model = unwrap_model(trainer.model)
        get_base = getattr(model, "get_base_model", None)  # peft.PeftModel
        backbone = get_base() if callable(get_base) else model
        hidden_size = self.head_overrides.get("input_size") or model_hidden_size(backbone)
        backbone_dtype, device = model_dtype_and_device(backbone)
        # float32 by default: in bf16 an Adam step of 1e-3 cannot move a bias near 2.2 (bf16 spacing 0.0156 there).
        # ZeRO-3 refuses a module of mixed dtypes, so there the head takes the backbone's dtype.
        dtype = backbone_dtype if is_zero3(trainer) else torch.float32
        if isinstance(getattr(model, HEAD_ATTRIBUTE, None), nn.Module):
            logger.warning("The model already carries a %s; SamplerHeadCallback replaces it.", HEAD_ATTRIBUTE)
        head = self.init_head(
            hidden_size,
            sampler=sampler,
            dtype=dtype,
            device=device,
            default_threshold=getattr(args, "threshold", None),
        )
        setattr(model, HEAD_ATTRIBUTE, head)  # a submodule: the main optimizer trains it, DDP/ZeRO reduce its grads
        exclude_head_from_model_files(model, head)
        if self.mode == "sampler_only":
            frozen = 0
            for name, parameter in model.named_parameters():
                if not name.startswith(HEAD_ATTRIBUTE + ".") and parameter.requires_grad:
                    parameter.requires_grad_(False)
                    frozen += parameter.numel()
            logger.info("sampler_only: froze %d dLLM parameters; only the sampler head trains.", frozen)
        for parameter in head.parameters():
            parameter.requires_grad_(True)

        self.trainer = trainer
        self.seed = int(getattr(args, "seed", 0) if self.seed is None else self.seed)
        accelerator = getattr(trainer, "accelerator", None)
        self.process_index = int(getattr(accelerator, "process_index", 0) or 0)
        hook_head_optimizer_group(trainer, head, self.head_learning_rate)
        hook_head_resume(trainer, self.restore_head)
        disable_ddp_unused_parameter_search(trainer)

    def _count_fallback(self, name: str) -> None:
        self.fallback_counts[name] = self.fallback_counts.get(name, 0) + 1

    # -- rollouts ----------------------------------------------------------------------------------------------------

    def _require_head(self) -> SamplerHead:
        if self.head is None:
            raise RuntimeError(
                "The SamplerHeadCallback has no head yet: DiffpoTrainer calls `setup(trainer)` in its __init__ "
                "(or call `init_head(hidden_size)` when using the callback by hand)."
            )
        return self.head

    def _global_step(self) -> int:
        state = getattr(self.trainer, "state", None)
        return int(getattr(state, "global_step", 0) or 0)

    def _training(self) -> bool:
        model = getattr(self.trainer, "model", None)
        return True if model is None else bool(model.training)

    def threshold_fn(self, prompt_hidden: torch.Tensor) -> torch.Tensor:
        """``(batch,)`` float32 per-row thresholds for ``diffusion_generate(threshold_fn=...)`` (no gradient).

        In training, each row draws its own threshold ``u ~ N(mu(c), sigma^2)``; when the trainer's model is in eval
        mode the deterministic :meth:`SamplerHead.predict_threshold` is used instead.
        """
        head = self._require_head()
        if not self._training():
            return head.predict_threshold(prompt_hidden)
        step = self._global_step()
        if step != self._noise_step:
            self._noise_step, self._noise_draws = step, 0
        generator = torch.Generator().manual_seed(
            _noise_seed(self.seed or 0, self.process_index, step, self._noise_draws)
        )
        self._noise_draws += 1
        if self._scored_since_snapshot or self._behaviour_head is None:
            self._snapshot_behaviour_head()
        threshold = head.sample(prompt_hidden, generator=generator)
        self._drawn_thresholds.append(threshold.detach().float().cpu())
        del self._drawn_thresholds[:-_MAX_BUFFERED_DRAWS]  # used outside a trainer: keep the buffer bounded
        return threshold

    @property
    def state_dependent(self) -> bool:
        """Whether the head decides a threshold at every denoising step (``features="state"``): the trainer then
        decodes with ``step_threshold_fn=`` :meth:`step_policy` and passes the recorded decisions to :meth:`head_loss`."""
        return self.head is not None and self.head.config.state_dependent

    def step_policy(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The ``step_threshold_fn`` of one ``diffusion_generate`` call, for a state-dependent head.

        Call it on every process before decoding: it freezes a local copy of the head (gathering ZeRO-3 partitions,
        a collective, once), so the per-step decisions issue no collective (ranks make different numbers of them).
        In training each decision draws ``u ~ N(mu(c, s), sigma^2)``, with noise seeded from ``(seed, process index,
        global step, draw index)``; when the trainer's model is in eval mode the policy's mean is used.
        """
        head = self._require_head()
        if not head.config.state_dependent:
            raise ValueError("step_policy needs a state-dependent head (features='state'); use threshold_fn.")
        if not self._training():
            return self._frozen_copy(head).predict_threshold
        step = self._global_step()
        if step != self._noise_step:
            self._noise_step, self._noise_draws = step, 0
        if self._scored_since_snapshot or self._behaviour_head is None:
            self._snapshot_behaviour_head()
        # the behaviour snapshot is the head as it is now; without clipping there is none, so copy it
        policy = self._behaviour_head if self._behaviour_head is not None else self._frozen_copy(head)
        sigma = head.exploration_sigma

        def draw(prompt_hidden: torch.Tensor, step_features: torch.Tensor) -> torch.Tensor:
            seed = _noise_seed(self.seed or 0, self.process_index, step, self._noise_draws)
            self._noise_draws += 1
            generator = torch.Generator().manual_seed(seed)
            return policy.sample(prompt_hidden, generator=generator, sigma=sigma, step_features=step_features)

        return draw

    @staticmethod
    def _frozen_copy(head: SamplerHead) -> SamplerHead:
        """A plain (never ZeRO-partitioned), gradient-free copy of ``head``'s current weights on its device."""
        snapshot = SamplerHead(head.config).to(head.dtype)
        load_head_weights(snapshot, head_state_dict(head), source="the live sampler head")
        snapshot.exploration_sigma = head.exploration_sigma
        return snapshot.to(head.device).eval().requires_grad_(False)

    def _snapshot_behaviour_head(self) -> None:
        """Freeze a copy of the head as it is when rollouts are drawn (the behaviour policy of the PPO ratio).

        Taken at the first draw after the head was last scored: the head only changes through :meth:`head_loss` and
        an optimizer step, so every draw until then comes from the same policy.
        """
        if self.head_clip_epsilon is None:
            return
        head = self.head
        self._behaviour_head = self._frozen_copy(head)
        self._behaviour_sigma = head.exploration_sigma
        self._scored_since_snapshot = False

    def sampler_advantages(
        self,
        rewards: torch.Tensor,
        nfe: torch.Tensor,
        gen_length: int,
        num_generations: int,
        row_thresholds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Group-relative advantage of the sampler reward ``reward - nfe_penalty * nfe / gen_length``.

        Args:
            rewards: ``(N,)`` rewards of all rollouts (gathered across processes, groups of ``num_generations``
                consecutive rows as in TRL); NaN rows (unscorable) get advantage 0 and do not enter the baseline.
            nfe: ``(N,)`` forward passes of each rollout.
            gen_length: completion length (normalises NFE to "forward passes per token").
            num_generations: G, the group size.
            row_thresholds: this process's ``(n,)`` per-row thresholds for the correlation metrics (a state head: the
                rollouts' mean step thresholds); ``None``: the thresholds :meth:`threshold_fn` drew since the last call.

        Returns:
            ``(N,)`` float32 advantages: group mean subtracted, divided by the group std + 1e-4 when
            ``scale_advantages``.
        """
        rewards = torch.as_tensor(rewards).float().flatten()
        nfe = torch.as_tensor(nfe).to(rewards.device).float().flatten()
        advantages, sampler_reward = group_relative_sampler_advantages(
            rewards, nfe, gen_length, num_generations, self.nfe_penalty, self.scale_advantages
        )
        self._log_rollout_metrics(rewards, nfe, sampler_reward, row_thresholds)
        return advantages

    def _log_rollout_metrics(
        self, rewards: torch.Tensor, nfe: torch.Tensor, sampler_reward: torch.Tensor, row_thresholds=None
    ) -> None:
        """Correlation of the drawn thresholds with reward and NFE (on this process's rows), via ``trainer._metrics``."""
        drawn = torch.cat(self._drawn_thresholds) if self._drawn_thresholds else torch.empty(0)
        if row_thresholds is not None:
            drawn = torch.as_tensor(row_thresholds).detach().float().flatten().cpu()
        self._drawn_thresholds = []
        metrics = {"sampler_reward": float(torch.nanmean(sampler_reward))}
        total, local = rewards.numel(), drawn.numel()
        if local and total % local == 0 and (self.process_index + 1) * local <= total:
            rows = (
                slice(self.process_index * local, (self.process_index + 1) * local) if local != total else slice(None)
            )
            for name, values in (("reward", rewards[rows]), ("nfe", nfe[rows])):
                correlation = pearson(drawn, values.cpu())
                if correlation is not None:
                    metrics[f"corr_threshold_{name}"] = correlation
        elif local:
            self._count_fallback("correlation_rows_mismatch")
            logger.debug(
                "sampler head: %d drawn thresholds for %d rewards; correlation metrics skipped.", local, total
            )
        self.log_metrics(metrics)

    def log_metrics(self, metrics: dict[str, float]) -> None:
        """Append ``metrics`` to the trainer's metric store under ``sampler_head/<name>`` (no-op without trainer)."""
        store = getattr(self.trainer, "_metrics", None)
        if not isinstance(store, dict):
            return
        mode = "train" if self._training() else "eval"
        if mode not in store:
            return
        for name, value in metrics.items():
            store[mode][f"sampler_head/{name}"].append(float(value))

    # -- the head's loss ---------------------------------------------------------------------------------------------

    def head_loss(
        self,
        prompt_hidden: torch.Tensor,
        threshold: torch.Tensor,
        advantages: torch.Tensor,
        step_features: torch.Tensor | None = None,
        step_threshold: torch.Tensor | None = None,
        step_valid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Policy-gradient loss of the head on a (micro-)batch's rows, times ``head_loss_weight``.

        With ``head_clip_epsilon`` (default) the PPO-clipped ``-mean(min(rho_i A_i, clip(rho_i, 1-eps, 1+eps) A_i))``,
        ``rho_i = N(u_i; mu(c_i), sigma^2) / N(u_i; mu_old(c_i), sigma_old^2)`` against the head that drew the rows;
        otherwise (or when no draw was seen, e.g. the first batch after a resume; counted) REINFORCE
        ``-mean(A_i * log N(u_i; mu(c_i), sigma^2))``. Both have the same gradient while the head has not moved.

        A state-dependent head is scored per decision: ``rho_it`` of each step ``t`` of row ``i`` (its features and
        threshold as recorded by ``diffusion_generate``), weighted by the row's advantage ``A_i``, averaged over the
        row's decisions and then over the rows.

        Args:
            prompt_hidden: ``(b, hidden)`` pooled prompt hidden states the rows were decoded with (detached here).
            threshold: ``(b,)`` thresholds the rows were decoded with (from :meth:`threshold_fn`; for a state head
                the mean of each row's decisions, only checked for its size).
            advantages: ``(b,)`` from :meth:`sampler_advantages` (detached here).
            step_features, step_threshold, step_valid: a state head's recorded decisions, ``(b, L, F)``, ``(b, L)``
                and ``(b, L)`` bool (``DiffusionGenerateOutput.step_*``); required for a state head, refused otherwise.

        Returns:
            ``(loss, metrics)``: a float32 scalar with gradient into the head only, and floats ``loss``
            (unweighted), ``threshold_mean/std/min/max`` (of the rows, or of the decisions), ``predicted_threshold_mean``
            (the policy mean), ``sigma`` and, with clipping, ``ratio_mean`` and ``clipped_frac``. A state head adds
            ``decisions_per_row``, ``threshold_row_std`` (the spread of a row's thresholds over its steps, averaged)
            and ``step_weight/<feature>`` (the step layer's weights, in u-space per unit of feature).
        """
        head = self._require_head()
        threshold = torch.as_tensor(threshold).float().flatten()
        advantages = torch.as_tensor(advantages).detach().float().flatten()
        if threshold.numel() != prompt_hidden.shape[0] or advantages.numel() != prompt_hidden.shape[0]:
            raise ValueError(
                f"head_loss got {prompt_hidden.shape[0]} prompt rows, {threshold.numel()} thresholds and "
                f"{advantages.numel()} advantages; they must match."
            )
        decisions = check_decisions(head, prompt_hidden, step_features, step_threshold, step_valid)
        if prompt_hidden.shape[0] == 0:  # keep every head parameter in the graph (DDP expects gradients)
            loss = sum(parameter.sum() for parameter in head.parameters()) * 0.0
            return loss.float(), {"loss": 0.0, "sigma": head.exploration_sigma}
        self._scored_since_snapshot = True
        if decisions is None:
            decided, features, valid = threshold, {}, None
        else:
            step_features, valid = decisions
            # slots without a decision get a placeholder in range; their terms are masked out below
            decided = torch.where(valid, step_threshold.float().to(valid.device), head.config.init_threshold)
            features = {"step_features": step_features}
        log_prob = head.log_prob(prompt_hidden, decided, **features)
        advantages = advantages.to(log_prob.device)
        extra: dict[str, float] = {}
        if self.head_clip_epsilon is not None and self._behaviour_head is None:
            self._count_fallback("head_loss_without_behaviour_head")
        behaviour = None
        if self.head_clip_epsilon is not None and self._behaviour_head is not None:
            with torch.no_grad():
                behaviour = self._behaviour_head.log_prob(
                    prompt_hidden, decided, sigma=self._behaviour_sigma, **features
                )
        if valid is None:
            objective, diagnostics = clipped_surrogate(log_prob, behaviour, advantages, self.head_clip_epsilon)
            unweighted_loss = -objective.mean()
        else:
            objective, diagnostics = clipped_surrogate(
                log_prob, behaviour, advantages[:, None], self.head_clip_epsilon
            )
            valid = valid.to(objective.device)
            weights = valid.float()
            unweighted_loss = -((objective * weights).sum(1) / weights.sum(1).clamp(min=1)).mean()
            diagnostics = {name: value[valid] for name, value in diagnostics.items()}
        if diagnostics:
            extra = {
                "ratio_mean": float(diagnostics["ratio"].mean()),
                "clipped_frac": float(diagnostics["is_clipped"].float().mean()),
            }
        with torch.no_grad():
            predicted = head.predict_threshold(prompt_hidden, **features)
        if valid is not None:
            extra.update(decision_metrics(head, decided, valid))
            decided, predicted = decided[valid], predicted[valid]
        metrics = {
            "loss": float(unweighted_loss.detach()),
            "threshold_mean": float(decided.mean()),
            "threshold_std": float(decided.std()) if decided.numel() > 1 else 0.0,
            "threshold_min": float(decided.min()),
            "threshold_max": float(decided.max()),
            "predicted_threshold_mean": float(predicted.mean()),
            "sigma": head.exploration_sigma,
            **extra,
        }
        return self.head_loss_weight * unweighted_loss, metrics

    def _update_sigma(self, state) -> None:
        if self.head is not None:
            self.head.exploration_sigma = self.head.config.sigma_at(state.global_step, state.max_steps)

    def on_train_begin(self, args, state, control, **kwargs):
        self._update_sigma(state)
        self._check_resumed_head(state)

    def on_step_begin(self, args, state, control, **kwargs):
        self._update_sigma(state)
