"""How far the surrogates are from the true step conditional, per denoising step (the paper's Figure 2c).

On trajectories sampled from a model, a token committed at step ``t`` was drawn from the **true step conditional**
``p(. | z_{t-1})`` (the latent the sampler saw). The surrogates score that same position on less context:

- mean-field: ``p(. | z_0)`` (completion fully masked);
- two-stage: ``p(. | z_tau)`` if ``tau < t`` else ``p(. | z_0)``, with ``tau`` uniform in ``{0, ..., T-1}``
  (:func:`trl_diffpo.likelihood.draw_surrogate_randomness`); the expectation over ``tau`` is exact here:
  ``(sum_{s=0}^{t-1} KL(p_{t-1} || p_s) + (T - t) KL(p_{t-1} || p_0)) / T``.

Per token we compute ``KL(true || surrogate)`` of the full distributions and the log-prob gap
``behaviour log-prob - surrogate log-prob`` of the committed token (for two-stage the surrogate log-prob is averaged
over ``tau`` the same way), then average over the tokens committed at each step index. Prompts are not noised
(``p_mask_prompt = 0``): the figure isolates the completion context. Tokens after a row's first EOS are left out.

Cost: one forward per trajectory step (descending step order, so each position's true distribution is known before
the earlier latents are compared with it) and one stored ``(rows, gen_length, vocab)`` float32 slab of true
distributions.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from ..backbones import get_backbone
from ..generation import diffusion_generate, policy_log_softmax

KL_JSON = "kl_per_step.json"
KL_PNG = "kl_per_step.png"


def _kl(true_log_probs: torch.Tensor, other_log_probs: torch.Tensor) -> torch.Tensor:
    """``KL(true || other)`` over the last dimension; entries where ``true`` has probability 0 contribute 0."""
    finite = torch.isfinite(true_log_probs)
    difference = torch.where(finite, true_log_probs - other_log_probs, torch.zeros_like(true_log_probs))
    return (true_log_probs.exp() * difference).masked_fill(~finite, 0.0).sum(-1)


@torch.no_grad()
def trajectory_token_stats(
    model,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    *,
    gen_length: int,
    block_length: int,
    sampler: str = "entropy_bounded",
    threshold: float | None = 0.1,
    steps: int | None = None,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    mask_token_id: int | None = None,
    eos_token_id=None,
) -> dict[str, torch.Tensor]:
    """Sample trajectories and return per-token statistics (one entry per completion token up to the first EOS).

    Returns a dict of 1-D tensors: ``step`` (commit step t), ``nfe`` (the row's T), ``kl_mean_field``,
    ``kl_two_stage``, ``logp_gap_mean_field``, ``logp_gap_two_stage`` and ``true_vs_behaviour`` (recomputed true
    log-prob minus the recorded behaviour log-prob: ~0, a consistency check).
    """
    backbone = get_backbone(model, mask_token_id=mask_token_id)
    mask_id = backbone.mask_token_id
    output = diffusion_generate(
        backbone,
        input_ids,
        attention_mask,
        gen_length=gen_length,
        block_length=block_length,
        sampler=sampler,
        steps=steps,
        threshold=threshold,
        temperature=temperature,
        generator=generator,
        eos_token_id=eos_token_id,
    )
    batch, prompt_length = input_ids.shape
    device = input_ids.device
    prompt_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device).long()
    attention = torch.cat([prompt_mask, prompt_mask.new_ones(batch, gen_length)], dim=1)
    sequences, unmask_step, nfe = output.sequences, output.unmask_step, output.nfe
    targets = sequences[:, prompt_length:]
    max_steps = int(nfe.max())

    true_log_probs = None  # (batch, gen_length, vocab): p(. | z_{t-1}) of each position, filled as steps descend
    kl_at = torch.zeros(batch, gen_length, max_steps, device=device)  # KL(p_{t-1} || p_s) at [b, l, s], s < t
    logp_at = torch.zeros(batch, gen_length, max_steps, device=device)  # log p_s(o_l)
    for latent_step in reversed(range(max_steps)):
        rows = (nfe > latent_step).nonzero().squeeze(1)
        hidden = unmask_step[rows] > latent_step  # still masked in z_s
        completion = targets[rows].masked_fill(hidden, mask_id)
        latent = torch.cat([sequences[rows, :prompt_length], completion], dim=1)
        logits = backbone(latent, attention[rows]).logits[:, prompt_length:]
        log_probs = policy_log_softmax(logits, mask_id, temperature)  # (rows, gen_length, vocab)
        if true_log_probs is None:
            true_log_probs = torch.zeros(batch, gen_length, log_probs.shape[-1], device=device)
        committed_next = (unmask_step[rows] == latent_step + 1)[..., None]
        true_log_probs[rows] = torch.where(committed_next, log_probs, true_log_probs[rows])
        kl = _kl(true_log_probs[rows], log_probs).masked_fill(~hidden, 0.0)
        kl_at[rows, :, latent_step] = kl
        logp_at[rows, :, latent_step] = (
            log_probs.gather(-1, targets[rows][..., None]).squeeze(-1).masked_fill(~hidden, 0.0)
        )

    step = unmask_step
    total = nfe[:, None].expand_as(step).to(kl_at.dtype)
    earlier = torch.arange(max_steps, device=device)[None, None, :] < step[..., None]  # s < t
    late_weight = total - step.to(kl_at.dtype)  # tau >= t: scored on z_0

    def two_stage(values: torch.Tensor) -> torch.Tensor:
        return ((values * earlier).sum(-1) + late_weight * values[..., 0]) / total

    true_logp = true_log_probs.gather(-1, targets[..., None]).squeeze(-1)
    keep = output.completion_mask
    behaviour = output.logprobs
    return {
        "step": step[keep],
        "nfe": nfe[:, None].expand_as(step)[keep],
        "kl_mean_field": kl_at[..., 0][keep],
        "kl_two_stage": two_stage(kl_at)[keep],
        "logp_gap_mean_field": (behaviour - logp_at[..., 0])[keep],
        "logp_gap_two_stage": (behaviour - two_stage(logp_at))[keep],
        "true_vs_behaviour": (true_logp - behaviour)[keep],
    }


STAT_NAMES = ("kl_mean_field", "kl_two_stage", "logp_gap_mean_field", "logp_gap_two_stage")


def aggregate_by_step(stats: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Mean of each statistic over the tokens committed at each step index (and over all tokens)."""
    step = stats["step"].long().cpu()
    steps = sorted(set(step.tolist()))
    report: dict[str, Any] = {"step": steps, "num_tokens": [int((step == s).sum()) for s in steps]}
    for name in STAT_NAMES:
        values = stats[name].double().cpu()
        report[name] = [float(values[step == s].mean()) for s in steps]
    report["overall"] = {name: float(stats[name].double().mean()) for name in STAT_NAMES}
    report["overall"]["num_tokens"] = int(step.numel())
    report["overall"]["mean_nfe"] = float(stats["nfe"].double().mean()) if step.numel() else float("nan")
    report["overall"]["max_abs_true_vs_behaviour"] = float(stats["true_vs_behaviour"].abs().max())
    return report


def kl_per_step_on_rows(
    model,
    tokenizer,
    rows,
    *,
    num_prompts: int = 64,
    batch_size: int = 16,
    gen_length: int,
    block_length: int,
    sampler: str = "entropy_bounded",
    threshold: float | None = 0.1,
    steps: int | None = None,
    temperature: float = 1.0,
    seed: int = 0,
) -> dict[str, Any]:
    """:func:`trajectory_token_stats` on the prompts of a dataset (``prompt`` column), aggregated per step."""
    from ..evaluation.runner import dataset_columns, dataset_length, model_device
    from ..sft import left_pad, tokenize_prompts

    device = model_device(model)
    total = min(int(num_prompts), dataset_length(rows))
    generator = torch.Generator(device=device).manual_seed(seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {}
    try:
        for start in range(0, total, batch_size):
            prompts = dataset_columns(rows, start, min(start + batch_size, total))["prompt"]
            input_ids, attention_mask = left_pad(tokenize_prompts(tokenizer, prompts), pad_id)
            stats = trajectory_token_stats(
                model,
                input_ids.to(device),
                attention_mask.to(device),
                gen_length=gen_length,
                block_length=block_length,
                sampler=sampler,
                threshold=threshold,
                steps=steps,
                temperature=temperature,
                generator=generator,
                eos_token_id=tokenizer.eos_token_id,
            )
            for name, values in stats.items():
                parts.setdefault(name, []).append(values.cpu())
    finally:
        model.train(was_training)
    report = aggregate_by_step({name: torch.cat(values) for name, values in parts.items()})
    report["settings"] = {
        "num_prompts": total,
        "gen_length": gen_length,
        "block_length": block_length,
        "sampler": sampler,
        "threshold": threshold,
        "steps": steps,
        "temperature": temperature,
        "seed": seed,
    }
    return report


def write_kl_per_step(report: dict[str, Any], folder: str) -> dict[str, str]:
    """Write ``kl_per_step.json`` and ``kl_per_step.png`` into ``folder``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    paths = {"json": os.path.join(folder, KL_JSON), "png": os.path.join(folder, KL_PNG)}
    with open(paths["json"], "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    figure, (kl_axes, gap_axes) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    try:
        for axes, prefix, label in ((kl_axes, "kl", "KL(true || surrogate)"), (gap_axes, "logp_gap", "log-prob gap")):
            for name, title in (
                ("mean_field", "mean-field p(.|z_0)"),
                ("two_stage", "two-stage p(.|z_tau), mean over tau"),
            ):
                axes.plot(report["step"], report[f"{prefix}_{name}"], marker="o", markersize=3, label=title)
            axes.set_xlabel("denoising step t of the committed token")
            axes.set_ylabel(label + (" (nats)" if prefix == "kl" else ": behaviour - surrogate (nats)"))
            axes.grid(alpha=0.3)
            axes.legend(fontsize=8)
        model = report.get("model", "")
        figure.suptitle(
            f"Surrogate vs true step conditional {('(' + model + ')') if model else ''}".strip(), fontsize=10
        )
        figure.tight_layout()
        figure.savefig(paths["png"], format="png")
    finally:
        plt.close(figure)
    return paths
