"""Masked-diffusion decoding: turn prompts into completions by iterative unmasking, batched, leaving a trace.

:func:`diffusion_generate` appends ``gen_length`` ``[MASK]`` tokens to each (left-padded) prompt and fills them block by
block (semi-autoregressive): at every step one batched forward predicts all positions, and a sampler
(:mod:`trl_diffpo.samplers`) commits some masked positions of each row's current block. Each row moves through its
blocks at its own pace, so rows with different thresholds finish at different times in the same batch, and a row that
has finished takes no further forward passes (and counts no further NFEs). Only the current blocks' logits are
computed; ``cache="prefix" | "dual"`` reuses keys/values across the steps of a block (:mod:`trl_diffpo.block_logits`).

The returned trace is what training needs: for every completion position the 1-based step of its row at which it was
committed (``unmask_step``), the behaviour log-probability of the committed token under the distribution that
committed it (``logprobs``), and per row the number of forward passes (``nfe``) and the threshold used. With a
state-dependent policy (``step_threshold_fn``) the threshold is decided at every step from what the step sees
(:mod:`trl_diffpo.step_features`), and every decision is recorded (``step_features``, ``step_threshold``).
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .backbones import DiffusionBackbone, get_backbone, unwrap_model
from .block_logits import CACHE_NONE, BlockLogits, check_cache_options
from .samplers import (
    ADAPTIVE_SAMPLERS,
    CONFIDENCE_THRESHOLD,
    ENTROPY_BOUNDED,
    FIXED_SCHEDULE_SAMPLERS,
    LOW_CONFIDENCE,
    RANDOM,
    SAMPLERS,
    check_threshold,
    fixed_schedule,
    select_confidence_threshold,
    select_entropy_bounded,
    select_top_k,
)
from .step_features import (
    StepDecisions,
    block_entropy,
    call_step_threshold_fn,
    check_threshold_sources,
    step_features,
)
from .token_sampling import sample_from_log_probs

logger = logging.getLogger(__name__)
_warned_generator_devices: set[tuple[str, str]] = set()
_logged_cache_modes: set[tuple[str, str]] = set()


@dataclass
class DiffusionGenerateOutput:
    """The result and trace of :func:`diffusion_generate`.

    Attributes:
        sequences: ``(batch, prompt_len + gen_length)`` prompt ids followed by the sampled canvas. Positions after a
            row's first EOS that were never decoded (early stop) hold ``eos_token_id`` (its first id).
        unmask_step: ``(batch, gen_length)`` 1-based step of the row at which each completion position was committed;
            always in ``[1, nfe[row]]``. Positions filled at an early stop carry the row's last step.
        logprobs: ``(batch, gen_length)`` float32 behaviour log-probability of each committed token under the
            distribution that committed it (softmax of ``logits / temperature``; of the plain logits when
            ``temperature == 0``). ``0`` for positions filled at an early stop.
        nfe: ``(batch,)`` forward passes each row took part in.
        threshold: ``(batch,)`` float32 threshold used by each row (``nan`` for the fixed-schedule samplers).
        completion_mask: ``(batch, gen_length)`` bool, ``True`` up to and including the first EOS (of any id; all ``True`` when
            no ``eos_token_id`` is given).
        prompt_hidden: ``(batch, hidden)`` mean-pooled last-layer hidden state of the prompt from the first forward,
            detached, when a ``threshold_fn`` or ``step_threshold_fn`` was given or ``return_prompt_hidden=True``; else
            ``None``.
        step_features: with ``step_threshold_fn``: ``(batch, gen_length, F)`` float32 features of each decision
            (:data:`trl_diffpo.step_features.STEP_FEATURE_NAMES`), the row's step ``t`` at index ``t - 1``; else
            ``None``.
        step_threshold: with ``step_threshold_fn``: ``(batch, gen_length)`` float32 threshold of each decision
            (``nan`` where there is none); ``threshold`` is then each row's mean over its decisions.
        step_valid: with ``step_threshold_fn``: ``(batch, gen_length)`` bool, ``True`` at the row's first ``nfe``
            slots (one decision per step).
    """

    sequences: torch.LongTensor
    unmask_step: torch.LongTensor
    logprobs: torch.Tensor
    nfe: torch.LongTensor
    threshold: torch.Tensor
    completion_mask: torch.BoolTensor
    prompt_hidden: torch.Tensor | None = None
    step_features: torch.Tensor | None = None
    step_threshold: torch.Tensor | None = None
    step_valid: torch.BoolTensor | None = None

    @property
    def completion_ids(self) -> torch.LongTensor:
        """``(batch, gen_length)`` the completion part of ``sequences``."""
        return self.sequences[:, -self.unmask_step.shape[1] :]

    @property
    def tokens_per_step(self) -> torch.Tensor:
        """``(batch,)`` completion tokens (up to the first EOS) committed per forward pass."""
        return self.completion_mask.sum(-1).float() / self.nfe.clamp(min=1).float()


def policy_log_softmax(logits: torch.Tensor, mask_token_id: int, temperature: float = 0.0) -> torch.Tensor:
    """Log-probabilities of the token distribution the sampler draws from (the policy, for training too).

    ``log_softmax(logits / temperature)`` in float32 (plain logits when ``temperature == 0``) with the ``[MASK]``
    token excluded: a position is never "committed" to ``[MASK]``.
    """
    return _policy_log_softmax(logits, mask_token_id, temperature, writable=False)


def _policy_log_softmax(logits: torch.Tensor, mask_token_id: int, temperature: float, writable: bool) -> torch.Tensor:
    """:func:`policy_log_softmax`; ``writable=True`` lets it work in place in ``logits`` (a fresh tensor the caller
    owns, as in the decoding loop), saving one full-vocabulary copy. Same operations, bit-identical results."""
    writable = writable or logits.dtype != torch.float32  # `.float()` below then makes a fresh copy
    logits = logits.float()
    if temperature > 0:
        logits = logits.div_(temperature) if writable and not logits.requires_grad else logits / temperature
        writable = True
    if not writable:  # never write into the caller's tensor (a fresh copy is safe to edit, even under autograd)
        logits = logits.clone()
    logits[..., mask_token_id] = float("-inf")
    return torch.log_softmax(logits, dim=-1)


def _check_options(
    gen_length: int,
    block_length: int,
    sampler: str,
    steps: int | None,
    temperature: float,
) -> tuple[int, int]:
    """Validate the options; return ``(num_blocks, steps_per_block)`` (``steps_per_block`` 0 for adaptive samplers)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is not supported; choose one of {', '.join(SAMPLERS)}.")
    if gen_length <= 0:
        raise ValueError(f"gen_length must be a positive integer, got {gen_length}.")
    if block_length <= 0 or gen_length % block_length != 0:
        raise ValueError(
            f"block_length={block_length} must be a positive divisor of gen_length={gen_length} "
            "(semi-autoregressive blocks tile the completion)."
        )
    if not (isinstance(temperature, int | float) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}.")
    num_blocks = gen_length // block_length
    if sampler in ADAPTIVE_SAMPLERS:
        return num_blocks, 0
    if steps is None:
        raise ValueError(f"sampler={sampler!r} needs `steps` (total denoising steps, a multiple of {num_blocks}).")
    if steps <= 0 or steps % num_blocks != 0:
        raise ValueError(
            f"steps={steps} must be a positive multiple of the number of blocks ({num_blocks} = gen_length "
            f"{gen_length} / block_length {block_length})."
        )
    steps_per_block = steps // num_blocks
    if steps_per_block > block_length:
        raise ValueError(
            f"steps={steps} gives {steps_per_block} steps per block, more than block_length={block_length}: every "
            f"step must commit at least one token, so steps must be at most {num_blocks * block_length}."
        )
    return num_blocks, steps_per_block


def _as_row_threshold(threshold, batch_size: int, device: torch.device, sampler: str) -> torch.Tensor:
    if sampler in FIXED_SCHEDULE_SAMPLERS:
        return torch.full((batch_size,), float("nan"), device=device)
    if threshold is None:
        raise ValueError(f"sampler={sampler!r} needs a `threshold` (a float or a per-row tensor) or a `threshold_fn`.")
    threshold = torch.as_tensor(threshold, dtype=torch.float32, device=device)
    if threshold.dim() == 0:
        threshold = threshold.expand(batch_size).clone()
    if threshold.shape != (batch_size,):
        raise ValueError(
            f"threshold must be a float or a tensor of shape ({batch_size},), got {tuple(threshold.shape)}."
        )
    check_threshold(threshold, sampler)
    return threshold


def _uniform(
    shape, generator: torch.Generator, device: torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Uniform noise in ``[0, 1)`` from a local generator (created on the generator's device, then moved)."""
    return torch.rand(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


def _check_mask_in_vocabulary(backbone: DiffusionBackbone, mask_id: int) -> None:
    """A [MASK] id past the input embeddings would fail deep inside the model with an opaque index error."""
    base = unwrap_model(backbone.model)
    base = base.get_base_model() if callable(getattr(base, "get_base_model", None)) else base
    get_embeddings = getattr(base, "get_input_embeddings", None)
    try:
        embeddings = get_embeddings() if callable(get_embeddings) else None
    except (NotImplementedError, AttributeError):
        embeddings = None
    num_embeddings = getattr(embeddings, "num_embeddings", None)
    if num_embeddings is not None and not 0 <= mask_id < num_embeddings:
        raise ValueError(
            f"mask_token_id={mask_id} is outside the model's vocabulary ({num_embeddings} input embeddings): pass the "
            "[MASK] id of this model's tokenizer."
        )


def _warn_generator_device(generator_device: torch.device, device: torch.device) -> None:
    """Noise follows the generator's device (reproducibility), so a CPU generator with a GPU model draws every step's
    ``(rows, block, vocab)`` noise on the CPU and copies it over: correct, but slow. Warn once per device pair."""
    key = (generator_device.type, device.type)
    if key in _warned_generator_devices:
        return
    _warned_generator_devices.add(key)
    logger.warning(
        "diffusion_generate: the generator is on %s but the inputs are on %s; the sampling noise is drawn on %s and "
        "copied every step, which is slow for large vocabularies. Pass `torch.Generator(device=%r)` instead.",
        generator_device,
        device,
        generator_device,
        str(device),
    )


def _pool_prompt(hidden: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the prompt tokens' hidden states (padding excluded), accumulated in float32, in the hidden dtype."""
    weights = prompt_mask.float()[..., None]
    pooled = (hidden.float() * weights).sum(1) / weights.sum(1).clamp(min=1)
    return pooled.to(hidden.dtype).detach()


def _max_over_ranks(value: int, device: torch.device) -> int:
    flag = torch.tensor([float(value)], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return int(flag.item())


def _log_cache_mode(backbone: DiffusionBackbone, cache: str, cache_refresh: int | None) -> None:
    key = (type(unwrap_model(backbone.model)).__name__, f"{cache}/{cache_refresh}")
    if key not in _logged_cache_modes:
        _logged_cache_modes.add(key)
        logger.info("diffusion_generate: %s decodes with cache=%r, cache_refresh=%s.", key[0], cache, cache_refresh)


@torch.no_grad()
def diffusion_generate(
    model: nn.Module | DiffusionBackbone,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    *,
    gen_length: int = 128,
    block_length: int = 32,
    sampler: str = LOW_CONFIDENCE,
    steps: int | None = None,
    threshold: float | torch.Tensor | None = None,
    threshold_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    step_threshold_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    mask_token_id: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    stop_at_eos: bool = True,
    return_prompt_hidden: bool = False,
    synced_gpus: bool = False,
    cache: str = CACHE_NONE,
    cache_refresh: int | None = None,
) -> DiffusionGenerateOutput:
    """Generate completions with a masked diffusion LM.

    Args:
        model: the dLLM (any model :func:`trl_diffpo.backbones.get_backbone` accepts) or a ready backbone.
        input_ids: ``(batch, prompt_len)`` left-padded prompt ids.
        attention_mask: ``(batch, prompt_len)`` 1 for prompt tokens, 0 for left padding (``None``: no padding).
        gen_length: completion length (number of ``[MASK]`` tokens appended).
        block_length: semi-autoregressive block length; must divide ``gen_length``.
        sampler: ``"low_confidence"`` (top-k by confidence), ``"random"`` (top-k at random), ``"confidence_threshold"``
            (commit every position with confidence >= threshold, at least one) or ``"entropy_bounded"`` (EB: longest
            lowest-entropy prefix whose entropy sum minus its max is <= threshold, at least one).
        steps: total steps for the fixed-schedule samplers; a multiple of the block count, at most ``gen_length``.
        threshold: float or ``(batch,)`` tensor: confidence threshold in (0, 1] or EB gamma >= 0.
        threshold_fn: called once with the ``(batch, hidden)`` pooled prompt hidden state of the first forward; returns
            the ``(batch,)`` per-row thresholds (how a learned sampler head sets thresholds without an extra forward).
            When given, it takes precedence over ``threshold``.
        step_threshold_fn: a state-dependent policy: called at every step with the active rows' ``(rows, hidden)``
            pooled prompt hidden states and their ``(rows, F)`` step features
            (:func:`trl_diffpo.step_features.step_features`); returns their ``(rows,)`` thresholds for this step.
            Adaptive samplers only; excludes ``threshold`` and ``threshold_fn``. It must not issue collectives (with
            ``synced_gpus`` the ranks make different numbers of decisions). Every decision is recorded in the output.
        temperature: 0 for greedy (argmax); otherwise an exact draw from ``softmax(logits / temperature)``
            (inverse-CDF, one float64 uniform per position: :func:`sample_from_log_probs`).
        generator: local ``torch.Generator`` for all randomness (token draws, random order); the global RNG is
            never used. ``None`` creates a fresh, non-deterministically seeded one when randomness is needed. The noise
            is drawn on the generator's device: keep it on the inputs' device (a CPU generator with a GPU model is
            correct but slow, and logs a warning).
        mask_token_id: the ``[MASK]`` id; resolved from the model config / tokenizer when ``None``.
        eos_token_id: end-of-sequence id, or a sequence of ids (LLaDA: ``[126081, 126348]``), each of which ends a
            row. With ``stop_at_eos`` a row stops as soon as every position up to its first committed EOS (any of the
            ids) is decoded: its remaining masked positions become ``eos_token_id`` (the first id of a sequence)
            without further forward passes.
        return_prompt_hidden: also return the pooled prompt hidden state (needs ``output_hidden_states``).
        synced_gpus: in distributed runs where every forward is a collective (ZeRO-3 without gathering, FSDP), keep
            issuing forwards until every rank is done, so all ranks make the same number of forward passes.
        cache: ``"none"`` (every step forwards the whole canvas: exact), ``"prefix"`` (a full forward at each row's
            block start stores every position's keys/values; the other steps forward the block and what follows it,
            reusing the stored keys/values before the block) or ``"dual"`` (the other steps forward the block only,
            reusing the stored keys/values before and after it). The cached modes are an approximation: the trace
            records the log-probs of the forwards actually run (the behaviour policy). Supported by the native LLaDA /
            Dream classes and transformers' Llama / Qwen2 / Qwen3 (``is_causal=False``); other models get a
            ``ValueError`` naming their class. See :mod:`trl_diffpo.block_logits`.
        cache_refresh: with a cache, also refresh it (full forward) every this many steps inside a block; ``None``:
            only at block starts.

    Returns:
        :class:`DiffusionGenerateOutput`.
    """
    backbone = model if isinstance(model, DiffusionBackbone) else get_backbone(model, mask_token_id=mask_token_id)
    mask_id = backbone.mask_token_id if mask_token_id is None else int(mask_token_id)
    num_blocks, steps_per_block = _check_options(gen_length, block_length, sampler, steps, temperature)
    check_cache_options(backbone, cache, cache_refresh)
    _log_cache_mode(backbone, cache, cache_refresh)
    _check_mask_in_vocabulary(backbone, mask_id)
    check_threshold_sources(sampler, threshold, threshold_fn, step_threshold_fn)
    device = input_ids.device
    batch_size, prompt_length = input_ids.shape
    learned = threshold_fn is not None or step_threshold_fn is not None
    row_threshold = None if learned else _as_row_threshold(threshold, batch_size, device, sampler)
    decisions = StepDecisions(batch_size, gen_length, device) if step_threshold_fn is not None else None
    all_rows = torch.arange(batch_size, device=device)  # the rows a step records when every row is active
    eos_ids = _as_eos_ids(eos_token_id, device)
    if generator is None and (temperature > 0 or sampler == RANDOM):
        generator = torch.Generator(device=device)
        generator.seed()
    elif generator is not None and generator.device.type != device.type and (temperature > 0 or sampler == RANDOM):
        _warn_generator_device(generator.device, device)

    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    prompt_mask = attention_mask.to(device=device, dtype=torch.long)
    has_padding = bool((prompt_mask == 0).any())
    canvas = torch.cat([input_ids, input_ids.new_full((batch_size, gen_length), mask_id)], dim=1)
    full_mask = (
        torch.cat([prompt_mask, prompt_mask.new_ones((batch_size, gen_length))], dim=1) if has_padding else None
    )

    unmask_step = torch.zeros(batch_size, gen_length, dtype=torch.long, device=device)
    logprobs = torch.zeros(batch_size, gen_length, dtype=torch.float32, device=device)
    nfe = torch.zeros(batch_size, dtype=torch.long, device=device)
    block_index = torch.zeros(batch_size, dtype=torch.long, device=device)
    step_in_block = torch.zeros(batch_size, dtype=torch.long, device=device)
    done = torch.zeros(batch_size, dtype=torch.bool, device=device)
    schedule = torch.tensor(fixed_schedule(block_length, steps_per_block), device=device) if steps_per_block else None
    offsets = torch.arange(block_length, device=device)
    need_hidden = learned or return_prompt_hidden
    prompt_hidden = None
    distributed = synced_gpus and torch.distributed.is_available() and torch.distributed.is_initialized()
    block_logits_of = BlockLogits(backbone, cache, cache_refresh, batch_size, prompt_length, block_length, device)

    while True:
        active = ~done
        num_active = int(active.sum())  # a host sync per step (the row subset below needs it anyway)
        all_active = num_active == batch_size
        rows = None if all_active else active.nonzero().squeeze(1)

        def take(tensor, rows=rows):
            return tensor if rows is None else tensor[rows]

        plan = block_logits_of.plan(take(block_index), take(step_in_block)) if num_active else []
        if distributed:  # every rank issues as many forwards as the busiest one (each forward is a collective)
            most_calls = _max_over_ranks(len(plan), device)
            for _ in range(most_calls - len(plan)):
                backbone(canvas[:1], None if full_mask is None else full_mask[:1])
            if most_calls == 0:
                break
            if not num_active:
                continue
        elif not num_active:
            break
        row_canvas = take(canvas)
        row_mask = full_mask if full_mask is None else take(full_mask)
        first_step = prompt_hidden is None and need_hidden
        block_logits, hidden_states = block_logits_of(
            plan, rows, row_canvas, row_mask, take(block_index), output_hidden_states=first_step
        )
        if first_step:  # the first step runs on every row
            prompt_hidden = _pool_prompt(hidden_states[:, :prompt_length], prompt_mask)
            if threshold_fn is not None:
                row_threshold = torch.as_tensor(threshold_fn(prompt_hidden), dtype=torch.float32, device=device)
                if row_threshold.numel() != batch_size:
                    raise ValueError(
                        f"threshold_fn must return one threshold per row, shape ({batch_size},); got a tensor of "
                        f"shape {tuple(row_threshold.shape)}."
                    )
                row_threshold = row_threshold.reshape(batch_size).detach()
                check_threshold(row_threshold, sampler)

        row_nfe = take(nfe) + 1
        row_block = take(block_index)
        positions = prompt_length + row_block[:, None] * block_length + offsets  # (rows, block) canvas positions
        block_tokens = row_canvas.gather(1, positions)
        candidates = block_tokens == mask_id

        block_logprobs = _policy_log_softmax(block_logits, mask_id, temperature, writable=True)
        if temperature > 0:  # exact draw from softmax(logits / T): one float64 uniform per position
            uniforms = _uniform((*block_logprobs.shape[:-1], 1), generator, device, dtype=torch.float64)
            proposal = sample_from_log_probs(block_logprobs, uniforms).squeeze(-1)
        else:
            proposal = block_logprobs.argmax(-1)
        proposal_logprob = block_logprobs.gather(-1, proposal[..., None]).squeeze(-1)

        entropy = block_entropy(block_logprobs) if sampler == ENTROPY_BOUNDED else None
        if decisions is not None:
            features = step_features(
                block_logprobs, candidates, row_canvas[:, prompt_length:], mask_id, row_block, num_blocks, entropy
            )
            step_threshold = call_step_threshold_fn(step_threshold_fn, take(prompt_hidden), features, sampler)
            decisions.record(all_rows if rows is None else rows, row_nfe, features, step_threshold)
        else:
            step_threshold = None if row_threshold is None else take(row_threshold)

        if sampler == LOW_CONFIDENCE:
            selected = select_top_k(proposal_logprob, candidates, schedule[take(step_in_block)])
        elif sampler == RANDOM:
            scores = _uniform(candidates.shape, generator, device)
            selected = select_top_k(scores, candidates, schedule[take(step_in_block)])
        elif sampler == CONFIDENCE_THRESHOLD:
            selected = select_confidence_threshold(proposal_logprob.exp(), candidates, step_threshold)
        else:
            selected = select_entropy_bounded(entropy, candidates, step_threshold)

        completion_positions = positions - prompt_length
        new_tokens = torch.where(selected, proposal, block_tokens)
        row_canvas = row_canvas.scatter(1, positions, new_tokens)
        row_steps, row_logprobs = take(unmask_step), take(logprobs)
        row_steps = row_steps.scatter(
            1, completion_positions, torch.where(selected, row_nfe[:, None], row_steps.gather(1, completion_positions))
        )
        row_logprobs = row_logprobs.scatter(
            1,
            completion_positions,
            torch.where(selected, proposal_logprob, row_logprobs.gather(1, completion_positions)),
        )

        block_finished = ~(new_tokens == mask_id).any(-1)
        row_block = row_block + block_finished.long()
        row_step_in_block = torch.where(block_finished, 0, take(step_in_block) + 1)
        row_done = row_block >= num_blocks
        if eos_ids is not None and stop_at_eos:
            completion = row_canvas[:, prompt_length:]
            row_done = row_done | _finished_at_eos(completion, mask_id, eos_ids)
            fill = row_done[:, None] & (completion == mask_id)
            completion = torch.where(fill, eos_ids[0], completion)
            row_canvas = torch.cat([row_canvas[:, :prompt_length], completion], dim=1)
            row_steps = torch.where(fill, row_nfe[:, None], row_steps)

        if all_active:
            canvas, unmask_step, logprobs, nfe = row_canvas, row_steps, row_logprobs, row_nfe
            block_index, step_in_block, done = row_block, row_step_in_block, row_done
        else:
            canvas[rows], unmask_step[rows], logprobs[rows], nfe[rows] = row_canvas, row_steps, row_logprobs, row_nfe
            block_index[rows], step_in_block[rows], done[rows] = row_block, row_step_in_block, row_done

    completion = canvas[:, prompt_length:]
    if eos_ids is not None:
        first_eos = first_true_index(torch.isin(completion, eos_ids))
        completion_mask = torch.arange(gen_length, device=device)[None, :] <= first_eos[:, None]
    else:
        completion_mask = torch.ones_like(completion, dtype=torch.bool)
    return DiffusionGenerateOutput(
        sequences=canvas,
        unmask_step=unmask_step,
        logprobs=logprobs,
        nfe=nfe,
        threshold=row_threshold if decisions is None else decisions.row_mean_threshold(),
        completion_mask=completion_mask,
        prompt_hidden=prompt_hidden,
        step_features=None if decisions is None else decisions.features,
        step_threshold=None if decisions is None else decisions.threshold,
        step_valid=None if decisions is None else decisions.valid,
    )


def first_true_index(flags: torch.Tensor) -> torch.Tensor:
    """``(rows,)`` index of the first ``True`` along the last dimension of ``flags``; its length where there is none."""
    return torch.where(flags.any(-1), flags.int().argmax(-1), flags.shape[-1])


def _as_eos_ids(eos_token_id: int | Sequence[int] | None, device: torch.device) -> torch.Tensor | None:
    """``(num_eos,)`` long tensor of the EOS ids (``None`` when there is none); the first is the fill value."""
    if eos_token_id is None:
        return None
    try:
        values = eos_token_id.tolist() if isinstance(eos_token_id, torch.Tensor) else eos_token_id
        ids = [operator.index(values)] if not isinstance(values, Sequence) else [operator.index(i) for i in values]
    except TypeError:
        ids = []
    if not ids or min(ids) < 0:
        raise ValueError(
            f"eos_token_id must be a non-negative token id or a non-empty sequence of them, got {eos_token_id!r}."
        )
    return torch.tensor(ids, dtype=torch.long, device=device)


def _finished_at_eos(completion: torch.Tensor, mask_id: int, eos_ids: torch.Tensor) -> torch.Tensor:
    """``(rows,)`` whether every position up to and including the row's first EOS (any of ``eos_ids``) is decoded."""
    return first_true_index(torch.isin(completion, eos_ids)) < first_true_index(completion == mask_id)
