"""Masked-diffusion supervised fine-tuning (SFT): a small, reusable warm-up for dLLMs.

The loss is LLaDA's SFT objective. For every example a masking ratio ``t ~ U(min_mask_ratio, 1)`` is drawn, each
completion token is replaced by ``[MASK]`` independently with probability ``t`` (the prompt is never masked), and the
model is trained with cross-entropy on the masked completion positions, weighted by ``1 / t`` and normalised by the
completion length. This is an upper bound on the negative log-likelihood of the completion under the masked diffusion
model, and it teaches exactly what :func:`trl_diffpo.generation.diffusion_generate` asks of the model: predict masked
completion tokens from the prompt and the tokens revealed so far.

Completions are padded with EOS up to a fixed ``gen_length`` and the padding is part of the target (as in LLaDA's
SFT), so the model learns to fill the unused tail of a fixed-length canvas with EOS.

Example::

    from trl_diffpo.sft import MaskedDiffusionSFTConfig, masked_diffusion_sft

    history = masked_diffusion_sft(
        model, tokenizer, prompts=["Q:1+1\\nA:"], completions=["2"],
        config=MaskedDiffusionSFTConfig(gen_length=8, num_steps=200, learning_rate=1e-3),
    )
    print(history[-1])  # the last logged loss
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .backbones import DiffusionBackbone, get_backbone
from .generation import policy_log_softmax

# the smallest masking ratio drawn (LLaDA uses 1e-3): keeps the 1/t weight bounded
DEFAULT_MIN_MASK_RATIO = 1e-3


@dataclass
class MaskedDiffusionSFTConfig:
    """Settings of :func:`masked_diffusion_sft`.

    Args:
        gen_length: completion canvas length; completions are EOS-padded to it (longer ones raise an error). Use the
            same value as for decoding.
        num_steps: optimizer steps.
        batch_size: examples per step (sampled with replacement from a shuffled epoch order).
        learning_rate: AdamW peak learning rate (linear warm-up, then cosine decay to 10%).
        weight_decay: AdamW weight decay.
        warmup_steps: linear learning-rate warm-up steps.
        max_grad_norm: gradient clipping norm (``None`` or ``0`` disables clipping).
        min_mask_ratio: lower bound of the masking ratio ``t`` (keeps ``1 / t`` bounded).
        seed: seed of the local generators (data order, masking); the global RNG is not touched.
        log_every: steps between two entries of the returned history.
        show_progress: show a tqdm progress bar.
    """

    gen_length: int = 32
    num_steps: int = 1000
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 50
    max_grad_norm: float | None = 1.0
    min_mask_ratio: float = DEFAULT_MIN_MASK_RATIO
    seed: int = 0
    log_every: int = 10
    show_progress: bool = True

    def __post_init__(self):
        if self.gen_length <= 0 or self.num_steps < 0 or self.batch_size <= 0:
            raise ValueError(
                "gen_length and batch_size must be positive and num_steps non-negative, got "
                f"gen_length={self.gen_length}, batch_size={self.batch_size}, num_steps={self.num_steps}."
            )
        if not 0 < self.min_mask_ratio < 1:
            raise ValueError(f"min_mask_ratio must lie in (0, 1), got {self.min_mask_ratio}.")


def tokenize_prompts(tokenizer, prompts: Sequence[str | list[dict[str, str]]]) -> list[list[int]]:
    """Prompt token ids exactly as TRL's ``GRPOTrainer`` makes them (so SFT, evaluation and RL see the same ids).

    Conversational prompts (lists of messages) go through ``tokenizer.apply_chat_template(add_generation_prompt=True)``;
    plain strings through ``tokenizer(text=...)``.
    """
    prompts = list(prompts)
    if not prompts:
        return []
    if all(isinstance(prompt, str) for prompt in prompts):
        return [list(ids) for ids in tokenizer(text=prompts)["input_ids"]]
    if any(isinstance(prompt, str) for prompt in prompts):
        raise ValueError("Prompts mix plain strings and conversations (lists of messages); use one format.")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "Conversational prompts need a tokenizer with a chat template; set `tokenizer.chat_template` or pass "
            "plain-text prompts."
        )
    tokenized = tokenizer.apply_chat_template(
        conversation=prompts, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return [list(ids) for ids in tokenized["input_ids"]]


def tokenize_sft_examples(
    tokenizer, prompts: Sequence[str | list[dict[str, str]]], completions: Sequence[str], gen_length: int
) -> tuple[list[list[int]], torch.LongTensor]:
    """Tokenize prompts (see :func:`tokenize_prompts`) and EOS-padded completions of exactly ``gen_length`` tokens.

    Returns ``(prompt_ids, completion_ids)``: a list of prompt id lists and a ``(n, gen_length)`` tensor.

    Raises:
        ValueError: on a length mismatch, a missing EOS token or a completion longer than ``gen_length - 1`` (one EOS
            is always kept so the model learns where the answer ends).
    """
    if len(prompts) != len(completions):
        raise ValueError(f"Got {len(prompts)} prompts but {len(completions)} completions; they must pair up.")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("The tokenizer has no eos_token; masked-diffusion SFT pads completions with EOS.")
    prompt_ids = tokenize_prompts(tokenizer, prompts)
    rows = []
    for completion in completions:
        ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        if len(ids) >= gen_length:
            raise ValueError(
                f"A completion has {len(ids)} tokens but gen_length={gen_length} leaves room for at most "
                f"{gen_length - 1} (plus one EOS): raise gen_length or shorten the completion {completion[:40]!r}."
            )
        rows.append(ids + [eos] * (gen_length - len(ids)))
    return prompt_ids, torch.tensor(rows, dtype=torch.long)


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Left-pad id lists into ``(input_ids, attention_mask)`` tensors."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        if ids:
            input_ids[row, width - len(ids) :] = torch.as_tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask


def masked_diffusion_loss(
    backbone: DiffusionBackbone,
    prompt_ids: torch.LongTensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.LongTensor,
    generator: torch.Generator,
    min_mask_ratio: float = DEFAULT_MIN_MASK_RATIO,
) -> torch.Tensor:
    """LLaDA SFT loss of one batch: ``mean_i [ sum_{l masked} -log p(o_il) / t_i ] / gen_length``.

    Args:
        backbone: the model's :class:`~trl_diffpo.backbones.DiffusionBackbone`.
        prompt_ids: ``(batch, prompt_len)`` left-padded prompts (never masked).
        prompt_mask: ``(batch, prompt_len)`` 1 for prompt tokens, 0 for padding.
        completion_ids: ``(batch, gen_length)`` EOS-padded targets.
        generator: local generator for the masking ratios and the masks (on CPU).
        min_mask_ratio: lower bound of ``t``.
    """
    batch_size, gen_length = completion_ids.shape
    mask_ratio = min_mask_ratio + (1 - min_mask_ratio) * torch.rand(batch_size, generator=generator)
    is_masked = torch.rand(batch_size, gen_length, generator=generator) < mask_ratio[:, None]
    device = completion_ids.device
    is_masked, mask_ratio = is_masked.to(device), mask_ratio.to(device)
    noisy_completion = completion_ids.masked_fill(is_masked, backbone.mask_token_id)
    input_ids = torch.cat([prompt_ids, noisy_completion], dim=1)
    attention_mask = torch.cat([prompt_mask, prompt_mask.new_ones(batch_size, gen_length)], dim=1)
    logits = backbone(input_ids, attention_mask).logits[:, prompt_ids.shape[1] :]
    token_logps = policy_log_softmax(logits, backbone.mask_token_id).gather(-1, completion_ids[..., None]).squeeze(-1)
    weighted_nll = (-token_logps * is_masked) / mask_ratio[:, None]
    return weighted_nll.sum(-1).div(gen_length).mean()


def _learning_rate_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    final_fraction = 0.1
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def masked_diffusion_sft(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str | list[dict[str, str]]],
    completions: Sequence[str],
    config: MaskedDiffusionSFTConfig | None = None,
    mask_token_id: int | None = None,
    callback: Callable[[int, nn.Module], bool | dict | None] | None = None,
) -> list[dict[str, float]]:
    """Train ``model`` in place with the masked-diffusion SFT loss on ``(prompt, completion)`` pairs.

    Prompts are plain strings or conversations (lists of messages, rendered with the tokenizer's chat template), and
    are tokenized as TRL tokenizes them (:func:`tokenize_prompts`). Deterministic for a given
    ``config.seed`` on a given machine; the model is left in eval mode.

    Args:
        callback: called as ``callback(step, model)`` every ``config.log_every`` steps, with the model in eval mode
            (e.g. to measure held-out accuracy). It may return a dict of metrics (added to that history entry; a
            truthy ``"stop"`` entry ends training early) or a bool (``True`` stops).

    Returns:
        The history: one ``{"step", "loss", "learning_rate", ...}`` dict every ``config.log_every`` steps (``loss`` is
        the mean over those steps), plus the callback's metrics.
    """
    config = config or MaskedDiffusionSFTConfig()
    backbone = get_backbone(model, mask_token_id=mask_token_id, tokenizer=tokenizer)
    prompt_ids, completion_ids = tokenize_sft_examples(tokenizer, prompts, completions, config.gen_length)
    num_examples = len(prompt_ids)
    if num_examples == 0:
        raise ValueError("masked_diffusion_sft needs at least one example.")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=config.learning_rate, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _learning_rate_factor(step, config.warmup_steps, config.num_steps)
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    history: list[dict[str, float]] = []
    order = torch.randperm(num_examples, generator=generator)
    cursor, running_loss, running_count = 0, 0.0, 0
    model.train()
    progress = _progress_bar(config.num_steps, config.show_progress, "masked-diffusion SFT")
    try:
        for step in range(config.num_steps):
            if cursor + config.batch_size > num_examples:
                order, cursor = torch.randperm(num_examples, generator=generator), 0
            batch_rows = order[cursor : cursor + config.batch_size].tolist()
            cursor += config.batch_size
            batch_prompts, batch_prompt_mask = left_pad([prompt_ids[i] for i in batch_rows], pad_id)
            loss = masked_diffusion_loss(
                backbone,
                batch_prompts.to(device),
                batch_prompt_mask.to(device),
                completion_ids[batch_rows].to(device),
                generator,
                config.min_mask_ratio,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            running_loss += loss.item()
            running_count += 1
            if (step + 1) % config.log_every == 0 or step + 1 == config.num_steps:
                entry = {
                    "step": step + 1,
                    "loss": running_loss / running_count,
                    "learning_rate": scheduler.get_last_lr()[0],
                }
                history.append(entry)
                running_loss, running_count = 0.0, 0
                stop = False
                if callback is not None:
                    model.eval()
                    reply = callback(step + 1, model)
                    model.train()
                    if isinstance(reply, dict):
                        entry.update(reply)
                        stop = bool(reply.get("stop"))
                    else:
                        stop = bool(reply)
                if progress is not None:
                    shown = {
                        name: f"{value:.4g}"
                        for name, value in entry.items()
                        if name not in ("step", "learning_rate") and isinstance(value, float)
                    }
                    progress.set_postfix(shown)
                if stop:
                    if progress is not None:
                        progress.update(1)
                    break
            if progress is not None:
                progress.update(1)
    finally:
        if progress is not None:
            progress.close()
        model.eval()
    return history


def _progress_bar(total: int, enabled: bool, description: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, dynamic_ncols=True)
