"""DiFFPO's surrogate likelihood of a sampled completion: K-stage mean-field scoring of a diffusion trajectory.

A rollout of a masked diffusion LM commits each completion token at some step ``unmask_step`` in ``1..T`` (``T`` = the
row's NFE). The exact probability of the completion is a product over all ``T`` steps, one forward each. The K-stage
surrogate scores it with ``K`` forwards instead:

- the trajectory is cut at ``0 = c_0 <= c_1 <= ... <= c_{K-1} < T`` (the **stage starts**);
- a token committed at step ``s`` belongs to the last stage ``k`` with ``c_k < s`` and is scored on the latent
  ``z_{c_k}``: completion positions committed at a step ``<= c_k`` revealed, all other completion positions
  ``[MASK]``, prompt tokens masked where the row's **prompt noise** says so (left padding untouched);
- the score is :func:`trl_diffpo.generation.policy_log_softmax` (the sampler's own distribution) read at the token.

``K = 1`` (all stage starts 0) is d1's mean-field likelihood, ``K = 2`` with ``c_1 = tau`` DiFFPO's two-stage
mean-field, and stage starts ``{0, 1, ..., T-1}`` (``K = T``) score every token on the very latent the sampler saw,
so with no prompt noise each token's log-prob equals the behaviour log-prob recorded at sampling.

What ``K = T`` is, exactly. At step ``t`` the sampler proposes a value ``y_l ~ q_l = softmax(logits_l / temperature)``
for every masked position of the block, independently, and its rule keeps a set ``S_t`` of them. The probability of
the step factorises as ``P(S_t, y_{S_t}) = prod_{l in S_t} q_l(y_l) * P(S_t | y_{S_t})``, and ``K = T`` is the sum
over steps of the log of the first factor only: the probability that the proposals at the chosen positions take the
committed values. The log-probability of choosing those positions is not in it:

- ``random`` at temperature > 0: the positions are drawn independently of the values and of theta, so the missing
  term is a theta-free constant (``log 1 / C(masked, k)``) and ``K = T`` is the exact log-likelihood of the committed
  values given the positions (and of the trajectory, up to that constant);
- temperature 0 (any rule): the values are argmaxes and the positions a function of the logits (of the generator for
  ``random``), so the trajectory has probability 1 (``random``: a theta-free constant) under the theta that produced
  it and 0 under a theta whose argmax or choice differs. ``K = T`` is then the log-likelihood of the committed tokens
  under the policy ``softmax(logits)`` that training uses, not the probability of a random event of the sampler;
- ``entropy_bounded`` at temperature > 0: entropies depend on the distributions, not on the drawn values, so the
  positions are a deterministic function of the logits: the missing term is ``log 1{S_t = EB(logits)}``, 0 at the
  sampling theta and piecewise constant in theta (no gradient where it is differentiable). ``K = T`` is the exact
  likelihood of the values given the positions;
- ``low_confidence`` and ``confidence_threshold`` at temperature > 0: the rule ranks positions by the confidence
  ``q_l(y_l)`` of the *drawn* values, so the missing term depends smoothly on theta: for top-k it is
  ``sum_{j unchosen} log Pr_{y ~ q_j}[q_j(y) < c_min]`` with ``c_min`` the lowest chosen confidence (ties by
  position), for the threshold rule ``sum_{j unchosen} log Pr_{y ~ q_j}[q_j(y) < threshold]`` (``< c`` with ``c``
  the kept confidence when no position passed and only the most confident one was kept). Given the chosen positions the committed values are tilted
  towards confident ones, so here ``K = T`` is neither the trajectory likelihood nor the likelihood of the values
  given the positions; it is the product of the proposal probabilities, which is what the behaviour log-probs
  record and what the importance weights compare against.

EOS positions filled at an early stop are no sampling event (the trace gives them the row's last step and log-prob
0). Reading a behaviour log-prob as the probability of the proposal assumes the sampler draws exactly from ``q_l``
(Gumbel-max noise with enough precision); the equality surrogate == behaviour does not depend on it.

Repeated stage starts give empty stages; only (row, stage) pairs that score at least one token are forwarded, all in
one (optionally chunked) batch. All randomness comes from :func:`draw_surrogate_randomness` with a local generator:
draw once per sample and inner iteration, then reuse the draws for the old, reference and current log-probs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .backbones import DiffusionBackbone
from .generation import policy_log_softmax

MEAN_FIELD = "mean_field"
TWO_STAGE = "two_stage"
K_STAGE = "k_stage"
LIKELIHOODS = (MEAN_FIELD, TWO_STAGE, K_STAGE)


def stages_for(likelihood: str, num_stages: int | None = None) -> int:
    """The number of stages ``K`` (forwards per sample at most) of a likelihood setting."""
    if likelihood == MEAN_FIELD:
        return 1
    if likelihood == TWO_STAGE:
        return 2
    if likelihood == K_STAGE:
        if num_stages is None or num_stages < 1:
            raise ValueError(f"likelihood='k_stage' needs num_stages >= 1, got {num_stages}.")
        return int(num_stages)
    raise ValueError(f"likelihood={likelihood!r} is not supported; choose one of {', '.join(LIKELIHOODS)}.")


@dataclass
class SurrogateDraws:
    """The randomness of the surrogate for a batch, batch-first.

    Attributes:
        prompt_noise: ``(batch, num_iterations, prompt_len)`` bool, prompt positions replaced by ``[MASK]``.
        stage_starts: ``(batch, num_iterations, K)`` long, sorted ascending, first column 0; repeated values are
            empty stages.
    """

    prompt_noise: torch.BoolTensor
    stage_starts: torch.LongTensor

    @property
    def tau(self) -> torch.Tensor:
        """``(batch, num_iterations)`` the first positive cut (0 when there is none): DiFFPO's tau for two-stage."""
        positive = self.stage_starts.masked_fill(self.stage_starts <= 0, torch.iinfo(torch.long).max)
        first = positive.min(-1).values
        return torch.where(first == torch.iinfo(torch.long).max, torch.zeros_like(first), first)


def draw_surrogate_randomness(
    prompt_mask: torch.Tensor,
    nfe: torch.Tensor,
    *,
    likelihood: str,
    num_stages: int | None = None,
    p_mask_prompt: float = 0.0,
    num_iterations: int = 1,
    generator: torch.Generator | None = None,
) -> SurrogateDraws:
    """Draw the prompt noise and stage starts for every sample and inner iteration.

    - prompt noise: each real prompt token (``prompt_mask == 1``) is masked independently with ``p_mask_prompt``;
    - ``mean_field``: stage starts ``[0]``;
    - ``two_stage``: ``[0, tau]`` with ``tau`` uniform in ``{0, ..., T-1}`` (``tau = 0`` is mean-field), as in DiFFPO;
    - ``k_stage``: ``0`` and ``K-1`` distinct cuts uniform from ``{1, ..., T-1}`` (all of them when ``T-1 <= K-1``),
      padded with zeros (empty stages). With all of them (``K >= T``) and ``p_mask_prompt = 0`` the surrogate equals
      the behaviour log-probs: the log-probability of the committed values at the positions the sampler chose, not
      of choosing those positions (see the module docstring for when that choice depends on theta).

    Draws are made on the generator's device (CPU by default) and returned on ``prompt_mask.device``.

    Args:
        prompt_mask: ``(batch, prompt_len)`` 1 for prompt tokens, 0 for left padding.
        nfe: ``(batch,)`` steps ``T`` of each row's trajectory (>= 1).
        generator: local ``torch.Generator``; the global RNG is never used.
    """
    num_stage_slots = stages_for(likelihood, num_stages)
    if not 0.0 <= p_mask_prompt < 1.0:
        raise ValueError(f"p_mask_prompt must be in [0, 1), got {p_mask_prompt}.")
    if num_iterations < 1:
        raise ValueError(f"num_iterations must be >= 1, got {num_iterations}.")
    device = prompt_mask.device
    draw_device = generator.device if generator is not None else torch.device("cpu")
    batch_size, prompt_length = prompt_mask.shape
    steps = nfe.to(draw_device).long().clamp(min=1)

    uniform = torch.rand((batch_size, num_iterations, prompt_length), generator=generator, device=draw_device)
    prompt_noise = (uniform < p_mask_prompt) & prompt_mask.to(draw_device).bool()[:, None, :]

    if num_stage_slots == 1:
        stage_starts = torch.zeros(batch_size, num_iterations, 1, dtype=torch.long, device=draw_device)
    elif likelihood == TWO_STAGE:
        uniform = torch.rand((batch_size, num_iterations), generator=generator, device=draw_device)
        tau = (uniform * steps[:, None]).long().clamp(max=steps[:, None] - 1)
        stage_starts = torch.stack([torch.zeros_like(tau), tau], dim=-1)
    else:
        num_cuts = num_stage_slots - 1
        max_cut = int(steps.max().item()) - 1  # candidate cuts are 1..max_cut
        if max_cut < 1:
            stage_starts = torch.zeros(batch_size, num_iterations, num_stage_slots, dtype=torch.long)
        else:
            # A uniform random subset of size min(num_cuts, T-1) of {1..T-1}: the smallest random keys win.
            keys = torch.rand((batch_size, num_iterations, max_cut), generator=generator, device=draw_device)
            candidates = torch.arange(1, max_cut + 1, device=draw_device)
            valid = candidates[None, None, :] <= (steps[:, None, None] - 1)
            keys = keys.masked_fill(~valid, float("inf"))
            take = min(num_cuts, max_cut)
            chosen_keys, chosen = torch.topk(keys, take, dim=-1, largest=False)
            cuts = torch.where(torch.isfinite(chosen_keys), chosen + 1, torch.zeros_like(chosen))
            padding = torch.zeros(batch_size, num_iterations, num_stage_slots - take, dtype=torch.long)
            stage_starts = torch.cat([padding.to(draw_device), cuts], dim=-1).sort(dim=-1).values
    return SurrogateDraws(prompt_noise=prompt_noise.to(device), stage_starts=stage_starts.to(device))


def token_stages(unmask_step: torch.Tensor, stage_starts: torch.Tensor) -> torch.LongTensor:
    """``(batch, gen_length)`` index of the stage scoring each token: the last ``k`` with ``stage_starts[k] < step``.

    Args:
        unmask_step: ``(batch, gen_length)`` 1-based commit step of each completion token.
        stage_starts: ``(batch, K)`` sorted stage starts (first 0).
    """
    starts = stage_starts.contiguous()
    steps = unmask_step.to(starts.dtype).clamp(min=1).contiguous()
    return (torch.searchsorted(starts, steps, right=False) - 1).clamp(min=0)


def build_stage_latents(
    sequences: torch.LongTensor,
    unmask_step: torch.LongTensor,
    prompt_noise: torch.BoolTensor,
    latent_rows: torch.LongTensor,
    latent_steps: torch.LongTensor,
    mask_token_id: int,
) -> torch.LongTensor:
    """The latents ``z_c`` to forward: one per (row, stage start) pair.

    Args:
        sequences: ``(batch, prompt_len + gen_length)`` prompt ids followed by the sampled canvas.
        unmask_step: ``(batch, gen_length)`` commit step of each completion token.
        prompt_noise: ``(batch, prompt_len)`` prompt positions to mask.
        latent_rows: ``(n,)`` the batch row of each latent.
        latent_steps: ``(n,)`` the step ``c`` of each latent: completion tokens committed at ``<= c`` are revealed.

    Returns:
        ``(n, prompt_len + gen_length)`` input ids.
    """
    gen_length = unmask_step.shape[1]
    prompt_length = sequences.shape[1] - gen_length
    rows = sequences[latent_rows]
    hidden_completion = unmask_step[latent_rows] > latent_steps[:, None]
    hidden = torch.cat([prompt_noise[latent_rows], hidden_completion], dim=1)
    if hidden.shape[1] != prompt_length + gen_length:  # pragma: no cover - shape guard
        raise ValueError("prompt_noise and unmask_step do not match the sequence length.")
    return rows.masked_fill(hidden, mask_token_id)


TOKEN_IS = "token"
SEQUENCE_IS = "sequence"
NO_IS = "none"
IS_CORRECTIONS = (TOKEN_IS, SEQUENCE_IS, NO_IS)


def importance_weights(
    surrogate_logps: torch.Tensor,
    behaviour_logps: torch.Tensor,
    mask: torch.Tensor,
    mode: str = TOKEN_IS,
    clamp: float = 2.0,
) -> torch.Tensor:
    """The detached IS weight correcting rollouts of the real sampler (behaviour) towards the surrogate policy.

    - ``token``: ``w_l = min(C, exp(surrogate_l - behaviour_l))`` per token (DiFFPO);
    - ``sequence``: one weight per sequence, ``min(C, exp(mean_l(surrogate_l - behaviour_l)))`` over the masked
      tokens (the length-normalised, geometric-mean ratio: the plain product underflows to 0 on long completions);
    - ``none``: 1.

    Args:
        surrogate_logps, behaviour_logps: ``(..., gen_length)`` log-probs of the same tokens.
        mask: ``(..., gen_length)`` 1 for tokens that count.
        clamp: ``C > 0``.

    Returns:
        ``(..., gen_length)`` float32 weights (1 outside ``mask``), no gradient.
    """
    if mode not in IS_CORRECTIONS:
        raise ValueError(f"is_correction={mode!r} is not supported; choose one of {', '.join(IS_CORRECTIONS)}.")
    mask = mask.bool()
    log_ratio = (surrogate_logps.detach().float() - behaviour_logps.detach().float()).masked_fill(~mask, 0.0)
    if mode == NO_IS:
        return torch.ones_like(log_ratio)
    if mode == SEQUENCE_IS:
        mean = log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
        log_ratio = mean.expand_as(log_ratio)
    weights = torch.exp(log_ratio).clamp(max=clamp)
    return weights.masked_fill(~mask, 1.0)


def masked_entropy(log_probs: torch.Tensor) -> torch.Tensor:
    """Entropy of distributions given as log-probs that may hold ``-inf`` (the excluded ``[MASK]``); grad-safe."""
    finite = torch.isfinite(log_probs)
    safe = torch.where(finite, log_probs, torch.zeros_like(log_probs))
    return -(safe.exp() * safe).masked_fill(~finite, 0.0).sum(-1)


def surrogate_log_probs(
    backbone: DiffusionBackbone,
    sequences: torch.LongTensor,
    prompt_mask: torch.Tensor,
    unmask_step: torch.LongTensor,
    prompt_noise: torch.BoolTensor,
    stage_starts: torch.LongTensor,
    *,
    temperature: float = 0.0,
    batch_size: int | None = None,
    compute_entropy: bool = False,
    entropy_requires_grad: bool = False,
    every_stage: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token surrogate log-probs of a sampled canvas (and optionally the entropy of each scoring distribution).

    Every completion token is scored exactly once, on the latent of its stage (see the module docstring). With
    stage starts ``{0..T-1}`` per row and no prompt noise, this is ``K = T``: every token's log-prob equals the
    behaviour log-prob :func:`trl_diffpo.generation.diffusion_generate` recorded for it, i.e. the log-likelihood of
    the committed values at the positions the sampler chose; the probability of choosing those positions is not
    included (it is theta-free for ``random``, a deterministic function of the logits at temperature 0 and for
    ``entropy_bounded``, and theta-dependent for ``low_confidence`` / ``confidence_threshold`` at temperature > 0).
    The forwards of all (row, stage) pairs that score at least one token run as one batch, in chunks of ``batch_size``
    latents (``None``: one chunk). Gradients flow to the backbone's parameters unless called under ``no_grad``.

    Args:
        backbone: the model to score with (policy, reference, adapter-disabled policy, ...).
        sequences: ``(batch, prompt_len + gen_length)`` prompt ids followed by the raw sampled canvas.
        prompt_mask: ``(batch, prompt_len)`` 1 for prompt tokens, 0 for left padding.
        unmask_step: ``(batch, gen_length)`` commit step (``>= 1``) of every completion position.
        prompt_noise: ``(batch, prompt_len)`` prompt positions to mask.
        stage_starts: ``(batch, K)`` sorted stage starts, first 0.
        temperature: the sampling temperature (``0``: plain logits), as in :func:`policy_log_softmax`.
        compute_entropy: also return the entropy of each scoring distribution. It is computed outside the autograd
            graph (a metric, or TRL's ``top_entropy_quantile`` mask) unless ``entropy_requires_grad``: its graph would
            keep about ``4.5 x tokens x vocab x 4`` bytes alive for backward (3.5 GB at 6 x 256 tokens x 126k).
        entropy_requires_grad: keep the entropy differentiable (TRL's entropy bonus, ``entropy_coef != 0``).
        every_stage: forward the latent of every (row, stage) pair, also those that score no token, so that the
            number of forwards depends on the batch shape only. Needed where every forward is a collective (DeepSpeed
            ZeRO-3, FSDP): otherwise ranks whose random draws need fewer forwards would leave the others hanging.

    Returns:
        ``(logps, entropy)``: ``(batch, gen_length)`` float32 log-probs, and entropies or ``None``.
    """
    batch, gen_length = unmask_step.shape
    prompt_length = sequences.shape[1] - gen_length
    mask_token_id = backbone.mask_token_id
    device = sequences.device
    unmask_step = unmask_step.to(device)
    stage_starts = stage_starts.to(device)
    stage_of_token = token_stages(unmask_step, stage_starts)  # (batch, gen_length)
    num_stages = stage_starts.shape[1]
    used = torch.zeros(batch, num_stages, dtype=torch.bool, device=device)
    used.scatter_(1, stage_of_token, True)
    if every_stage:
        used.fill_(True)
    latent_rows, latent_stage = used.nonzero(as_tuple=True)  # row-major: all stages of row 0, then row 1, ...
    latent_steps = stage_starts[latent_rows, latent_stage]
    latents = build_stage_latents(
        sequences, unmask_step, prompt_noise.to(device), latent_rows, latent_steps, mask_token_id
    )
    attention = torch.cat(
        [prompt_mask.to(device).long(), prompt_mask.new_ones(batch, gen_length).long().to(device)], 1
    )
    targets = sequences[:, prompt_length:]

    logps = torch.zeros(batch, gen_length, dtype=torch.float32, device=device)
    entropy = torch.zeros(batch, gen_length, dtype=torch.float32, device=device) if compute_entropy else None
    num_latents = latents.shape[0]
    chunk = batch_size or num_latents
    for start in range(0, num_latents, chunk):
        rows = latent_rows[start : start + chunk]
        scored = stage_of_token[rows] == latent_stage[start : start + chunk, None]  # (n, gen_length)
        output = backbone(latents[start : start + chunk], attention[rows])
        token_logits = output.logits[:, prompt_length:][scored]  # (m, vocab): only the tokens this latent scores
        token_log_probs = policy_log_softmax(token_logits, mask_token_id, temperature)
        position = scored.nonzero(as_tuple=True)[1]
        row_index = rows[:, None].expand_as(scored)[scored]
        picked = token_log_probs.gather(-1, targets[row_index, position][:, None]).squeeze(-1)
        logps = logps.index_put((row_index, position), picked)
        if entropy is not None:
            with torch.set_grad_enabled(entropy_requires_grad and torch.is_grad_enabled()):
                token_entropy = masked_entropy(token_log_probs)
            entropy = entropy.index_put((row_index, position), token_entropy)
    return logps, entropy
