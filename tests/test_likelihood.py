"""The K-stage surrogate likelihood: draws, a slow reference implementation, and exactness at K >= T."""

import math

import pytest
import torch

from trl_diffpo.backbones import get_backbone
from trl_diffpo.generation import diffusion_generate, policy_log_softmax
from trl_diffpo.likelihood import (
    K_STAGE,
    MEAN_FIELD,
    TWO_STAGE,
    draw_surrogate_randomness,
    importance_weights,
    stages_for,
    surrogate_log_probs,
    token_stages,
)
from trl_diffpo.tiny import build_tiny_model

GEN_LENGTH = 8
BLOCK_LENGTH = 4


@pytest.fixture(scope="module")
def tokenizer():
    from trl_diffpo.tiny import build_char_tokenizer

    return build_char_tokenizer()


@pytest.fixture(scope="module", params=["llama", "bert"])
def model(request, tokenizer):
    return build_tiny_model(tokenizer, architecture=request.param, hidden_size=32, num_layers=1, seed=3)


def _prompts(tokenizer, texts=("1+2=", "hello world:", "7")):
    batch = tokenizer(list(texts), return_tensors="pt", padding=True)
    return batch["input_ids"], batch["attention_mask"]


def _rollout(model, tokenizer, sampler="low_confidence", temperature=0.0, threshold=None, seed=0, eos=True):
    input_ids, attention_mask = _prompts(tokenizer)
    return attention_mask, diffusion_generate(
        model,
        input_ids,
        attention_mask,
        gen_length=GEN_LENGTH,
        block_length=BLOCK_LENGTH,
        sampler=sampler,
        steps=GEN_LENGTH if sampler in ("low_confidence", "random") else None,
        threshold=threshold,
        temperature=temperature,
        generator=torch.Generator().manual_seed(seed),
        eos_token_id=tokenizer.eos_token_id if eos else None,
    )


def _reference_log_probs(model, sequences, prompt_mask, unmask_step, prompt_noise, stage_starts, temperature):
    """Obviously-correct surrogate: per row, per stage, build the latent position by position and forward it alone."""
    backbone = get_backbone(model)
    mask_id = backbone.mask_token_id
    batch, gen_length = unmask_step.shape
    prompt_length = sequences.shape[1] - gen_length
    out = torch.full((batch, gen_length), float("nan"))
    for row in range(batch):
        starts = stage_starts[row].tolist()
        for k, start in enumerate(starts):
            end = starts[k + 1] if k + 1 < len(starts) else float("inf")
            tokens = [pos for pos in range(gen_length) if start < unmask_step[row, pos].item() <= end]
            if not tokens:
                continue
            latent = sequences[row].clone()
            for pos in range(prompt_length):
                if prompt_noise[row, pos]:
                    latent[pos] = mask_id
            for pos in range(gen_length):
                if unmask_step[row, pos].item() > start:
                    latent[prompt_length + pos] = mask_id
            attention = torch.cat([prompt_mask[row], torch.ones(gen_length, dtype=torch.long)])
            with torch.no_grad():
                logits = backbone(latent[None], attention[None]).logits[0]
            log_probs = policy_log_softmax(logits[prompt_length:], mask_id, temperature)
            for pos in tokens:
                assert torch.isnan(out[row, pos]), "a token was scored by two stages"
                out[row, pos] = log_probs[pos, sequences[row, prompt_length + pos]]
    return out


def test_stages_for():
    assert stages_for(MEAN_FIELD) == 1
    assert stages_for(TWO_STAGE) == 2
    assert stages_for(K_STAGE, 5) == 5
    with pytest.raises(ValueError, match="num_stages >= 1"):
        stages_for(K_STAGE, 0)
    with pytest.raises(ValueError, match="not supported"):
        stages_for("three_stage")


def test_draws_are_local_reproducible_and_in_range():
    prompt_mask = torch.tensor([[0, 0, 1, 1, 1, 1]] * 50 + [[1] * 6] * 50)
    nfe = torch.randint(1, 12, (100,), generator=torch.Generator().manual_seed(1))
    global_state = torch.random.get_rng_state()
    first = draw_surrogate_randomness(
        prompt_mask, nfe, likelihood=K_STAGE, num_stages=4, p_mask_prompt=0.5, num_iterations=3,
        generator=torch.Generator().manual_seed(7),
    )  # fmt: skip
    again = draw_surrogate_randomness(
        prompt_mask, nfe, likelihood=K_STAGE, num_stages=4, p_mask_prompt=0.5, num_iterations=3,
        generator=torch.Generator().manual_seed(7),
    )  # fmt: skip
    assert torch.equal(torch.random.get_rng_state(), global_state), "the global RNG must not be touched"
    assert torch.equal(first.prompt_noise, again.prompt_noise)
    assert torch.equal(first.stage_starts, again.stage_starts)
    assert first.prompt_noise.shape == (100, 3, 6) and first.stage_starts.shape == (100, 3, 4)
    assert not first.prompt_noise[:50, :, :2].any(), "left padding must never be masked"
    assert 0.35 < first.prompt_noise[:, :, 2:].float().mean().item() < 0.65
    assert not torch.equal(first.stage_starts[:, 0], first.stage_starts[:, 1]), "iterations draw independently"
    for row in range(100):
        for it in range(3):
            starts = first.stage_starts[row, it].tolist()
            assert starts == sorted(starts) and starts[0] == 0
            cuts = [c for c in starts if c > 0]
            steps = nfe[row].item()
            assert len(set(cuts)) == len(cuts) == min(3, steps - 1)
            assert all(1 <= c <= steps - 1 for c in cuts)


def test_two_stage_tau_is_uniform_over_0_to_T_minus_1():
    nfe = torch.full((4000,), 4)
    draws = draw_surrogate_randomness(
        torch.ones(4000, 3), nfe, likelihood=TWO_STAGE, generator=torch.Generator().manual_seed(0)
    )
    assert draws.stage_starts.shape == (4000, 1, 2)
    assert (draws.stage_starts[..., 0] == 0).all()
    counts = torch.bincount(draws.stage_starts[:, 0, 1], minlength=4)
    assert counts.shape[0] == 4, "tau must stay below T"
    assert ((counts.float() / 4000 - 0.25).abs() < 0.04).all()
    assert torch.equal(draws.tau[:, 0], draws.stage_starts[:, 0, 1])
    mean_field = draw_surrogate_randomness(torch.ones(2, 3), nfe[:2], likelihood=MEAN_FIELD)
    assert (mean_field.stage_starts == 0).all() and not mean_field.prompt_noise.any()


def test_token_stages_matches_a_loop():
    generator = torch.Generator().manual_seed(0)
    unmask_step = torch.randint(1, 9, (5, 7), generator=generator)
    stage_starts = torch.tensor([[0, 0, 3], [0, 2, 5], [0, 7, 7], [0, 0, 0], [0, 1, 2]])
    result = token_stages(unmask_step, stage_starts)
    for row in range(5):
        for pos in range(7):
            starts = stage_starts[row].tolist()
            expected = max(k for k, start in enumerate(starts) if start < unmask_step[row, pos].item())
            assert result[row, pos].item() == expected


@pytest.mark.parametrize(
    ("likelihood", "num_stages", "temperature"),
    [(MEAN_FIELD, None, 0.0), (TWO_STAGE, None, 0.7), (K_STAGE, 3, 0.0), (K_STAGE, 6, 1.3)],
)
def test_matches_slow_reference(model, tokenizer, likelihood, num_stages, temperature):
    prompt_mask, rollout = _rollout(model, tokenizer, temperature=0.8, seed=1)
    draws = draw_surrogate_randomness(
        prompt_mask, rollout.nfe, likelihood=likelihood, num_stages=num_stages, p_mask_prompt=0.3,
        generator=torch.Generator().manual_seed(5),
    )  # fmt: skip
    noise, starts = draws.prompt_noise[:, 0], draws.stage_starts[:, 0]
    backbone = get_backbone(model)
    with torch.no_grad():
        fast, entropy = surrogate_log_probs(
            backbone, rollout.sequences, prompt_mask, rollout.unmask_step, noise, starts,
            temperature=temperature, compute_entropy=True,
        )  # fmt: skip
        chunked, _ = surrogate_log_probs(
            backbone, rollout.sequences, prompt_mask, rollout.unmask_step, noise, starts,
            temperature=temperature, batch_size=2,
        )  # fmt: skip
    slow = _reference_log_probs(model, rollout.sequences, prompt_mask, rollout.unmask_step, noise, starts, temperature)
    assert not torch.isnan(slow).any(), "every token must be scored"
    torch.testing.assert_close(fast, slow, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(chunked, fast, atol=2e-5, rtol=1e-5)
    assert entropy.shape == fast.shape and (entropy >= 0).all() and (entropy > 0).any()


@pytest.mark.parametrize(
    ("sampler", "temperature", "threshold"),
    [
        ("low_confidence", 0.0, None),
        ("low_confidence", 0.9, None),
        ("random", 0.7, None),
        ("confidence_threshold", 0.0, 0.05),
        ("entropy_bounded", 1.1, 2.0),
    ],
)
def test_exact_trajectory_likelihood_equals_behaviour_log_probs(model, tokenizer, sampler, temperature, threshold):
    """K >= T: every token is scored on the latent the sampler saw, so surrogate == behaviour (IS weight 1)."""
    prompt_mask, rollout = _rollout(model, tokenizer, sampler=sampler, temperature=temperature, threshold=threshold)
    assert (prompt_mask == 0).any(), "the batch must be left-padded"
    draws = draw_surrogate_randomness(
        prompt_mask, rollout.nfe, likelihood=K_STAGE, num_stages=GEN_LENGTH, generator=torch.Generator()
    )
    assert not draws.prompt_noise.any()
    with torch.no_grad():
        logps, _ = surrogate_log_probs(
            get_backbone(model), rollout.sequences, prompt_mask, rollout.unmask_step,
            draws.prompt_noise[:, 0], draws.stage_starts[:, 0], temperature=temperature,
        )  # fmt: skip
    scored = rollout.completion_mask
    torch.testing.assert_close(logps[scored], rollout.logprobs[scored], atol=1e-5, rtol=1e-5)
    is_weight = torch.exp(logps - rollout.logprobs)[scored]
    torch.testing.assert_close(is_weight, torch.ones_like(is_weight), atol=1e-4, rtol=0)


def test_fewer_stages_lose_context(tokenizer):
    """Sanity: the mean-field surrogate differs from the behaviour log-probs (otherwise the IS test proves nothing)."""
    model = build_tiny_model(tokenizer, hidden_size=32, num_layers=1, seed=3)
    prompt_mask, rollout = _rollout(model, tokenizer, eos=False)
    draws = draw_surrogate_randomness(prompt_mask, rollout.nfe, likelihood=MEAN_FIELD)
    with torch.no_grad():
        logps, _ = surrogate_log_probs(
            get_backbone(model), rollout.sequences, prompt_mask, rollout.unmask_step,
            draws.prompt_noise[:, 0], draws.stage_starts[:, 0],
        )  # fmt: skip
    assert (logps - rollout.logprobs).abs().max() > 1e-3


def test_gradient_reaches_the_model(tokenizer):
    model = build_tiny_model(tokenizer, hidden_size=32, num_layers=1, seed=3)
    prompt_mask, rollout = _rollout(model, tokenizer, eos=False)
    draws = draw_surrogate_randomness(prompt_mask, rollout.nfe, likelihood=TWO_STAGE, p_mask_prompt=0.2)
    logps, entropy = surrogate_log_probs(
        get_backbone(model), rollout.sequences, prompt_mask, rollout.unmask_step,
        draws.prompt_noise[:, 0], draws.stage_starts[:, 0], compute_entropy=True,
    )  # fmt: skip
    (logps.sum() + entropy.sum()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_importance_weights():
    surrogate = torch.tensor([[-1.0, -2.0, -0.1, -5.0], [-1.0, -1.0, -1.0, -1.0]], requires_grad=True)
    behaviour = torch.tensor([[-2.0, -1.0, -0.1, -0.0], [-1.0, -3.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    token = importance_weights(surrogate, behaviour, mask, "token", clamp=2.0)
    expected = torch.tensor([[2.0, math.exp(-1.0), 1.0, 1.0], [1.0, 2.0, 1.0, 1.0]])
    torch.testing.assert_close(token, expected)
    assert not token.requires_grad
    sequence = importance_weights(surrogate, behaviour, mask, "sequence", clamp=2.0)
    # row 0: mean log-ratio (1 - 1 + 0) / 3 = 0; row 1: (0 + 2) / 2 = 1 -> exp(1) = 2.72 clamped to 2
    torch.testing.assert_close(sequence, torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 1.0, 1.0]]))
    assert torch.equal(importance_weights(surrogate, behaviour, mask, "none"), torch.ones(2, 4))
    with pytest.raises(ValueError, match="is_correction"):
        importance_weights(surrogate, behaviour, mask, "trajectory")


def test_every_stage_fixes_the_forward_count_without_changing_the_result(model, tokenizer):
    """Under ZeRO-3 / FSDP every forward is a collective: the count must not depend on the random cut points."""
    prompt_mask, rollout = _rollout(model, tokenizer, temperature=0.8, seed=3)
    batch = rollout.nfe.shape[0]
    noise = torch.zeros_like(prompt_mask, dtype=torch.bool)
    backbone = get_backbone(model)
    latents_seen = []
    handle = model.register_forward_pre_hook(lambda _m, args, kwargs: latents_seen.append(kwargs["input_ids"].shape[0]),
                                             with_kwargs=True)  # fmt: skip
    try:
        results = {}
        for name, starts in {"degenerate": torch.zeros(batch, 2, dtype=torch.long),
                             "split": torch.stack([torch.zeros(batch, dtype=torch.long), rollout.nfe // 2], 1)}.items():  # fmt: skip
            for every_stage in (False, True):
                latents_seen.clear()
                with torch.no_grad():
                    logps, _ = surrogate_log_probs(
                        backbone, rollout.sequences, prompt_mask, rollout.unmask_step, noise, starts,
                        batch_size=batch, every_stage=every_stage,
                    )  # fmt: skip
                results[name, every_stage] = (logps, sum(latents_seen), len(latents_seen))
    finally:
        handle.remove()
    # Without the flag, a draw whose second stage scores nothing skips its latents: fewer rows forwarded.
    assert results["degenerate", False][1] == batch
    assert results["split", False][1] == 2 * batch
    # With it, every draw forwards all batch x K latents in the same number of calls.
    assert results["degenerate", True][1:] == results["split", True][1:] == (2 * batch, 2)
    for name in ("degenerate", "split"):
        torch.testing.assert_close(results[name, True][0], results[name, False][0])
