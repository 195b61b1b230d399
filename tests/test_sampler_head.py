"""Tests of the sampler head (a learned per-prompt decoding threshold) and its training callback."""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import Trainer, TrainerCallback, TrainingArguments

from trl_diffpo.backbones import get_backbone
from trl_diffpo.generation import diffusion_generate
from trl_diffpo.sampler_head import (
    HEAD_ATTRIBUTE,
    HEAD_CONFIG_NAME,
    HEAD_WEIGHTS_NAME,
    U_BOUND,
    SamplerHead,
    SamplerHeadCallback,
    SamplerHeadConfig,
    load_sampler_head,
    save_sampler_head,
)
from trl_diffpo.tiny import build_tiny_model

HIDDEN = 16


def make_head(**options) -> SamplerHead:
    options.setdefault("input_size", HIDDEN)
    options.setdefault("mlp_hidden_size", 8)
    return SamplerHead(SamplerHeadConfig(**options))


def fake_trainer(model, sampler="entropy_bounded"):
    return SimpleNamespace(model=model, args=SimpleNamespace(sampler=sampler, seed=0), optimizer=None)


# ---------------------------------------------------------------------------------------------------------------------
# Config and the head's maths
# ---------------------------------------------------------------------------------------------------------------------


def test_config_defaults_per_sampler_and_json_round_trip():
    entropy = SamplerHeadConfig(sampler="entropy_bounded", input_size=4)
    assert (entropy.threshold_min, entropy.threshold_max, entropy.init_threshold) == (0.0, 1.0, 0.1)
    confidence = SamplerHeadConfig(sampler="confidence_threshold", input_size=4)
    assert (confidence.threshold_min, confidence.threshold_max, confidence.init_threshold) == (0.5, 1.0, 0.9)
    custom = SamplerHeadConfig(sampler="entropy_bounded", threshold_min=1.0, threshold_max=3.0)
    assert custom.init_threshold == 2.0  # the default 0.1 lies outside the range: the midpoint instead
    assert SamplerHeadConfig.from_dict(json.loads(json.dumps(custom.to_dict()))) == custom


@pytest.mark.parametrize(
    "options, message",
    [
        ({"sampler": "low_confidence"}, "adaptive sampler"),
        ({"sampler": "confidence_threshold", "threshold_max": 1.5}, "above 1"),
        ({"threshold_min": 0.5, "threshold_max": 0.5}, "threshold_min < threshold_max"),
        ({"threshold_min": -1.0}, "0 <= threshold_min"),
        ({"init_threshold": 1.0}, "strictly inside"),
        ({"sigma": 0.0}, "sigma must be"),
        ({"sigma_schedule": "linear"}, "set sigma_final"),
        ({"sigma_schedule": "exponential", "sigma_final": 0.1}, "sigma_schedule"),
    ],
)
def test_config_rejects_bad_values(options, message):
    with pytest.raises(ValueError, match=message):
        SamplerHeadConfig(**options)


def test_config_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="Unknown SamplerHeadConfig fields"):
        SamplerHeadConfig.from_dict({"sampler": "entropy_bounded", "gamma_max": 2.0})


def test_sigma_schedules_against_closed_form():
    linear = SamplerHeadConfig(sigma=1.0, sigma_final=0.2, sigma_schedule="linear", sigma_anneal_steps=10)
    assert [round(linear.sigma_at(step), 6) for step in (0, 5, 10, 20)] == [1.0, 0.6, 0.2, 0.2]
    cosine = SamplerHeadConfig(sigma=1.0, sigma_final=0.2, sigma_schedule="cosine")
    for step in range(0, 9):  # horizon from the run's max_steps when sigma_anneal_steps is None
        expected = 1.0 + (0.2 - 1.0) * 0.5 * (1 - math.cos(math.pi * step / 8))
        assert cosine.sigma_at(step, total_steps=8) == pytest.approx(expected)
    assert SamplerHeadConfig(sigma=0.7).sigma_at(100, 10) == 0.7


@pytest.mark.parametrize(
    "sampler, low, high, init",
    [("entropy_bounded", 0.0, 2.0, 0.3), ("confidence_threshold", 0.5, 1.0, 0.9), ("confidence_threshold", 0, 1, 0.5)],
)
def test_initial_threshold_is_the_configured_value_for_every_prompt(sampler, low, high, init):
    head = make_head(sampler=sampler, threshold_min=low, threshold_max=high, init_threshold=init)
    prompt_hidden = torch.randn(6, HIDDEN) * 50
    assert torch.allclose(head.predict_threshold(prompt_hidden), torch.full((6,), init), atol=1e-6)


def test_threshold_u_map_is_invertible_within_the_bound():
    head = make_head(sampler="confidence_threshold", threshold_min=0.5, threshold_max=1.0)
    u = torch.linspace(-U_BOUND, U_BOUND, 101)
    threshold = head.threshold_from_u(u)
    assert threshold.dtype == torch.float32
    assert bool(((threshold > 0.5) & (threshold <= 1.0)).all())
    assert torch.allclose(head.u_from_threshold(threshold), u, atol=2e-3)
    # a float32-rounded threshold at the very end of the range maps to the bound, not to +-inf
    assert head.u_from_threshold(torch.tensor([1.0, 0.5])).tolist() == [U_BOUND, -U_BOUND]
    with pytest.raises(ValueError, match="non-finite threshold"):
        head.u_from_threshold(torch.tensor([float("nan")]))


@settings(max_examples=60, deadline=None)
@given(
    low=st.floats(0.0, 5.0),
    width=st.floats(0.1, 50.0),
    u=st.floats(-U_BOUND, U_BOUND),
)
def test_threshold_u_round_trip_property(low, width, u):
    head = make_head(threshold_min=low, threshold_max=low + width, init_threshold=low + width / 2)
    threshold = head.threshold_from_u(torch.tensor([u]))
    assert low <= threshold.item() <= low + width
    slope = width * torch.sigmoid(torch.tensor(u, dtype=torch.float64)).item() * (1 - torch.sigmoid(torch.tensor(u)))
    float32_spacing = torch.finfo(torch.float32).eps * (low + width)  # the rounding of a float32 threshold
    tolerance = 2 * float32_spacing / slope.item() + 1e-5
    assert abs(head.u_from_threshold(threshold).item() - u) <= tolerance


def test_log_prob_matches_a_normal_density_over_u():
    head = make_head(threshold_min=0.0, threshold_max=2.0, init_threshold=0.4, sigma=0.7)
    torch.nn.init.normal_(head.mlp[-1].weight, std=0.3)  # make mu depend on the prompt
    prompt_hidden = torch.randn(5, HIDDEN)
    threshold = torch.tensor([0.05, 0.4, 1.0, 1.7, 1.99])
    mu = head(prompt_hidden).detach()
    reference = []
    for row in range(5):  # slow, obviously-correct reference
        position = threshold[row].item() / 2.0
        u = math.log(position / (1 - position))
        reference.append(-0.5 * ((u - mu[row].item()) / 0.7) ** 2 - math.log(0.7) - 0.5 * math.log(2 * math.pi))
    assert torch.allclose(head.log_prob(prompt_hidden, threshold), torch.tensor(reference), atol=1e-4)


def test_sample_uses_only_the_given_generator_and_has_the_right_spread():
    head = make_head(threshold_min=0.0, threshold_max=1.0, init_threshold=0.5, sigma=0.4)
    prompt_hidden = torch.randn(4000, HIDDEN)
    global_state = torch.random.get_rng_state()
    first = head.sample(prompt_hidden, generator=torch.Generator().manual_seed(3))
    again = head.sample(prompt_hidden, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.random.get_rng_state(), global_state)
    assert torch.equal(first, again)
    u = head.u_from_threshold(first)
    assert abs(u.mean().item()) < 0.03 and abs(u.std().item() - 0.4) < 0.02  # mu = logit(0.5) = 0


# ---------------------------------------------------------------------------------------------------------------------
# Advantages and the loss
# ---------------------------------------------------------------------------------------------------------------------


def reference_advantages(rewards, nfe, gen_length, group, penalty, scale):
    out = []
    for start in range(0, len(rewards), group):
        values = [rewards[i] - penalty * nfe[i] / gen_length for i in range(start, start + group)]
        finite = [v for v in values if not math.isnan(v)]
        mean = sum(finite) / len(finite) if finite else 0.0
        std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1)) if len(finite) > 1 else 0.0
        for v in values:
            a = 0.0 if math.isnan(v) else v - mean
            out.append(a / (std + 1e-4) if scale else a)
    return out


@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("penalty", [0.0, 0.7])
def test_sampler_advantages_match_reference(scale, penalty):
    generator = torch.Generator().manual_seed(0)
    rewards = torch.rand(12, generator=generator)
    rewards[[2, 7, 8]] = float("nan")  # unscorable rows: no advantage, not in the baseline
    nfe = torch.randint(4, 64, (12,), generator=generator)
    callback = SamplerHeadCallback(nfe_penalty=penalty, scale_advantages=scale)
    advantages = callback.sampler_advantages(rewards, nfe, gen_length=64, num_generations=4)
    expected = reference_advantages(rewards.tolist(), nfe.tolist(), 64, 4, penalty, scale)
    assert torch.allclose(advantages, torch.tensor(expected), atol=1e-5)
    assert advantages[[2, 7, 8]].abs().max() == 0


def test_sampler_advantages_reject_bad_shapes():
    callback = SamplerHeadCallback()
    with pytest.raises(ValueError, match="groups of num_generations"):
        callback.sampler_advantages(torch.zeros(6), torch.zeros(6), 8, 4)
    with pytest.raises(ValueError, match="nfe has"):
        callback.sampler_advantages(torch.zeros(8), torch.zeros(6), 8, 4)


@pytest.mark.parametrize("clip", [None, 0.2])
def test_head_loss_is_the_policy_gradient_objective_and_reports_metrics(clip):
    callback = SamplerHeadCallback(mlp_hidden_size=8, sigma=0.5, head_loss_weight=0.3, head_clip_epsilon=clip)
    head = callback.init_head(HIDDEN)
    prompt_hidden = torch.randn(6, HIDDEN)
    threshold = callback.threshold_fn(prompt_hidden)
    advantages = torch.tensor([1.0, -1.0, 0.5, 0.0, 2.0, -0.5])
    loss, metrics = callback.head_loss(prompt_hidden, threshold, advantages)
    if clip is None:  # REINFORCE
        expected = -(advantages * head.log_prob(prompt_hidden, threshold)).mean()
    else:  # PPO with the head that drew the rows: ratio 1
        expected = -advantages.mean()
        assert metrics["ratio_mean"] == pytest.approx(1.0) and metrics["clipped_frac"] == 0.0
    assert torch.allclose(loss, 0.3 * expected)
    assert metrics["loss"] == pytest.approx(expected.item())  # logged unweighted
    assert metrics["threshold_mean"] == pytest.approx(threshold.mean().item())
    assert metrics["threshold_max"] == pytest.approx(threshold.max().item())
    assert metrics["predicted_threshold_mean"] == pytest.approx(0.1, abs=1e-5)
    assert set(metrics) >= {"loss", "threshold_std", "threshold_min", "sigma"}
    # the same gradient either way: d loss / d bias = -weight * mean(A * (u - mu) / sigma^2)
    loss.backward()
    u = head.u_from_threshold(threshold)
    mu = head(prompt_hidden).detach()
    expected_grad = -0.3 * (advantages * (u - mu) / 0.25).mean()
    assert head.mlp[-1].bias.grad.item() == pytest.approx(expected_grad.item(), rel=1e-4)


def test_clipped_head_loss_on_a_reused_batch_matches_reference():
    callback = SamplerHeadCallback(mlp_hidden_size=8, sigma=0.5, head_loss_weight=1.0, head_clip_epsilon=0.2)
    head = callback.init_head(HIDDEN)
    prompt_hidden = torch.randn(8, HIDDEN)
    threshold = callback.threshold_fn(prompt_hidden)
    behaviour = SamplerHead(head.config)
    behaviour.load_state_dict(head.state_dict())
    advantages = torch.tensor([1.0, -1.0, 0.5, 0.0, 2.0, -0.5, 1.5, -2.0])
    optimizer = torch.optim.SGD(head.parameters(), lr=0.5)
    for _ in range(3):  # three passes over the same rollouts (num_iterations = 3)
        loss, metrics = callback.head_loss(prompt_hidden, threshold, advantages)
        with torch.no_grad():  # slow reference, row by row
            terms = []
            for row in range(8):
                ratio = math.exp(
                    head.log_prob(prompt_hidden[row : row + 1], threshold[row : row + 1]).item()
                    - behaviour.log_prob(prompt_hidden[row : row + 1], threshold[row : row + 1]).item()
                )
                a = advantages[row].item()
                terms.append(min(ratio * a, min(max(ratio, 0.8), 1.2) * a))
        assert loss.item() == pytest.approx(-sum(terms) / 8, rel=1e-5, abs=1e-6)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert metrics["ratio_mean"] != pytest.approx(1.0)  # the head moved between passes


@pytest.mark.parametrize("clip", [None, 0.2])
def test_clipping_bounds_how_far_one_batch_moves_the_head(clip):
    callback = SamplerHeadCallback(mlp_hidden_size=8, sigma=0.5, head_clip_epsilon=clip, init_threshold=0.5)
    head = callback.init_head(HIDDEN)
    prompt_hidden = torch.randn(16, HIDDEN, generator=torch.Generator().manual_seed(0))
    threshold = callback.threshold_fn(prompt_hidden)
    advantages = torch.where(threshold > 0.5, 1.0, -1.0)  # larger thresholds were better in this batch
    optimizer = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(40):  # many passes over one batch
        loss, metrics = callback.head_loss(prompt_hidden, threshold, advantages)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    moved = (head.predict_threshold(prompt_hidden) - 0.5).abs().mean().item()
    if clip is None:
        assert moved > 0.4  # REINFORCE keeps fitting the one batch: its thresholds run to the ends of the range
    else:
        assert 0.02 < moved < 0.15  # moved, then stopped once the ratios hit the clip
        assert metrics["clipped_frac"] > 0.5


# ---------------------------------------------------------------------------------------------------------------------
# Bandit: the head learns what the sampler reward asks for
# ---------------------------------------------------------------------------------------------------------------------

BANDIT_GEN_LENGTH = 64
BANDIT_GROUP = 8


def run_bandit(cliffs: list[float], nfe_penalty: float = 0.5, iterations: int = 200, seed: int = 0) -> torch.Tensor:
    """Each prompt type has a feature vector; NFE falls linearly with the threshold; a completion is correct with
    probability 0.7 whatever the threshold, unless the threshold exceeds the prompt's cliff (then always wrong).
    Returns the learned deterministic threshold of each prompt type."""
    callback = SamplerHeadCallback(
        nfe_penalty=nfe_penalty, mlp_hidden_size=32, threshold_max=1.0, init_threshold=0.2, sigma=0.3, seed=seed
    )
    head = callback.init_head(HIDDEN, sampler="entropy_bounded")
    optimizer = torch.optim.Adam(head.parameters(), lr=0.02)
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(len(cliffs), HIDDEN, generator=generator) * 3
    cliff = torch.tensor(cliffs)
    for _ in range(iterations):
        prompt_type = torch.randint(0, len(cliffs), (8,), generator=generator).repeat_interleave(BANDIT_GROUP)
        prompt_hidden = features[prompt_type] + 0.1 * torch.randn(len(prompt_type), HIDDEN, generator=generator)
        threshold = callback.threshold_fn(prompt_hidden)
        nfe = torch.round(BANDIT_GEN_LENGTH * (1 - 0.8 * threshold))
        correct = (torch.rand(threshold.shape, generator=generator) < 0.7).float()
        reward = torch.where(threshold > cliff[prompt_type], 0.0, correct)
        advantages = callback.sampler_advantages(reward, nfe, BANDIT_GEN_LENGTH, BANDIT_GROUP)
        loss, _ = callback.head_loss(prompt_hidden, threshold, advantages)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return head.predict_threshold(features)


def test_bandit_threshold_rises_when_accuracy_does_not_depend_on_it():
    learned = run_bandit([2.0])  # no cliff inside the range
    assert learned.item() > 0.9  # from 0.2: fewer forward passes at no cost


def test_bandit_threshold_settles_below_an_accuracy_cliff_per_prompt():
    # Unscaled advantages (the default): the NFE term is in reward units, so it must be strong enough to matter
    # against the reward noise of a group (with group-std scaling, 0.5 sufficed).
    easy, hard = run_bandit([0.7, 0.3], nfe_penalty=2.0).tolist()
    assert 0.35 < easy < 0.7  # rose from 0.2 towards its cliff, but stays below it
    assert hard < 0.3
    assert easy - hard > 0.2  # a per-prompt threshold, not one for all


def test_bandit_threshold_stays_without_nfe_penalty_and_falls_below_a_low_cliff():
    (learned,) = run_bandit([0.1], nfe_penalty=0.0).tolist()
    assert learned < 0.1  # only correctness counts: get under the cliff


# ---------------------------------------------------------------------------------------------------------------------
# The decoder uses per-row thresholds
# ---------------------------------------------------------------------------------------------------------------------


def test_per_row_thresholds_reach_the_decoder(char_tokenizer):
    model = build_tiny_model(char_tokenizer, architecture="llama", hidden_size=32, num_layers=1, seed=1)
    callback = SamplerHeadCallback(threshold_max=40.0, init_threshold=10.0, sigma=1.5, mlp_hidden_size=8, seed=1)
    callback.setup(fake_trainer(model.train()))  # train mode: threshold_fn draws (eval mode uses the mean)
    prompt = char_tokenizer(["Q:1+2=\nA:"] * 6, return_tensors="pt")
    options = {"gen_length": 16, "block_length": 8, "sampler": "entropy_bounded"}
    options["mask_token_id"] = char_tokenizer.mask_token_id
    output = diffusion_generate(
        model, prompt.input_ids, prompt.attention_mask, threshold_fn=callback.threshold_fn, **options
    )
    drawn = callback._drawn_thresholds[-1]
    assert torch.equal(output.threshold, drawn)  # the decoder used exactly the sampled per-row thresholds
    assert len(set(drawn.tolist())) == 6  # identical prompts, different thresholds
    for row in range(6):  # each row decodes exactly as it would alone with its fixed threshold
        alone = diffusion_generate(
            model, prompt.input_ids[:1], prompt.attention_mask[:1], threshold=drawn[row].item(), **options
        )
        assert alone.nfe.item() == output.nfe[row].item()
        assert torch.equal(alone.sequences[0], output.sequences[row])
    order = drawn.argsort()
    assert output.nfe[order[0]] > output.nfe[order[-1]]  # the larger entropy bound took fewer forward passes
    assert len(set(output.nfe.tolist())) >= 3


# ---------------------------------------------------------------------------------------------------------------------
# Persistence
# ---------------------------------------------------------------------------------------------------------------------


def test_save_and_load_restore_identical_weights(tmp_path):
    head = make_head(sampler="confidence_threshold", init_threshold=0.8, sigma=0.3)
    torch.nn.init.normal_(head.mlp[-1].weight)
    head.exploration_sigma = 0.21
    save_sampler_head(head, tmp_path)
    assert set(os.listdir(tmp_path)) == {HEAD_CONFIG_NAME, HEAD_WEIGHTS_NAME}
    loaded = SamplerHead.from_pretrained(tmp_path)
    assert loaded.config == head.config and loaded.exploration_sigma == 0.21
    for (name, value), (other_name, other) in zip(head.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert name == other_name and torch.equal(value, other)
    prompt_hidden = torch.randn(3, HIDDEN)
    assert torch.equal(loaded.predict_threshold(prompt_hidden), head.predict_threshold(prompt_hidden))


def test_bf16_head_is_saved_as_stored_and_loaded_in_the_requested_dtype(tmp_path):
    head = make_head().to(torch.bfloat16)
    save_sampler_head(head, tmp_path)
    assert json.loads((tmp_path / HEAD_CONFIG_NAME).read_text())["dtype"] == "bfloat16"
    assert load_sampler_head(tmp_path).dtype == torch.bfloat16
    as_float = load_sampler_head(tmp_path, dtype=torch.float32)
    assert as_float.dtype == torch.float32
    assert torch.equal(as_float.mlp[0].weight, head.mlp[0].weight.float())


def test_load_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{HEAD_CONFIG_NAME} does not exist.*save_sampler_head"):
        load_sampler_head(tmp_path)
    save_sampler_head(make_head(), tmp_path)
    (tmp_path / HEAD_WEIGHTS_NAME).write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match=f"{HEAD_WEIGHTS_NAME} is not a valid safetensors file.*re-save"):
        load_sampler_head(tmp_path)
    (tmp_path / HEAD_CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match=f"{HEAD_CONFIG_NAME} is not a valid sampler head config"):
        load_sampler_head(tmp_path)
    other = tmp_path / "other"
    save_sampler_head(make_head(input_size=HIDDEN * 2), other)
    with pytest.raises(ValueError, match="expects"):  # weights of another shape behind a matching config
        config = json.loads((other / HEAD_CONFIG_NAME).read_text())
        config["config"]["input_size"] = HIDDEN
        (other / HEAD_CONFIG_NAME).write_text(json.dumps(config))
        load_sampler_head(other)


def test_a_hub_id_loads_from_the_local_cache_offline(tmp_path):
    head = make_head()
    torch.nn.init.normal_(head.mlp[-1].weight)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_cache = tmp_path / "models--some-user--sampler-head"  # the Hugging Face cache layout
    save_sampler_head(head, repo_cache / "snapshots" / commit)
    (repo_cache / "refs").mkdir()
    (repo_cache / "refs" / "main").write_text(commit)
    loaded = load_sampler_head("some-user/sampler-head", cache_dir=str(tmp_path))  # HF_HUB_OFFLINE=1 in the tests
    assert torch.equal(loaded.mlp[-1].weight, head.mlp[-1].weight)


def test_missing_hub_repo_offline_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        FileNotFoundError, match="sampler_head_config.json of .* is not in the local Hugging Face cache"
    ):
        load_sampler_head("some-user/no-such-head-repo")


# ---------------------------------------------------------------------------------------------------------------------
# Setup on a model: dtype, gradients, modes, PEFT
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["joint", "sampler_only"])
def test_setup_attaches_the_head_and_freezes_in_sampler_only(char_tokenizer, mode):
    model = build_tiny_model(char_tokenizer, architecture="llama", hidden_size=32, num_layers=1)
    callback = SamplerHeadCallback(mode=mode)
    callback.setup(fake_trainer(model))
    head = getattr(model, HEAD_ATTRIBUTE)
    assert head is callback.head and head.config.input_size == 32 and head.config.sampler == "entropy_bounded"
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    head_names = {name for name in trainable if name.startswith(HEAD_ATTRIBUTE + ".")}
    assert head_names == {f"{HEAD_ATTRIBUTE}.{name}" for name, _ in head.named_parameters()}
    if mode == "sampler_only":
        assert trainable == head_names
    else:
        assert len(trainable) > len(head_names)


def test_setup_refuses_a_sampler_without_threshold(char_tokenizer):
    model = build_tiny_model(char_tokenizer, architecture="llama", hidden_size=32, num_layers=1)
    with pytest.raises(ValueError, match="sampler='low_confidence'.*entropy_bounded"):
        SamplerHeadCallback().setup(fake_trainer(model, sampler="low_confidence"))
    with pytest.raises(ValueError, match="asks for sampler 'entropy_bounded'"):
        SamplerHeadCallback(sampler="entropy_bounded").setup(fake_trainer(model, sampler="confidence_threshold"))
    with pytest.raises(ValueError, match="mode='fast'"):
        SamplerHeadCallback(mode="fast")


@pytest.mark.parametrize("zero3", [False, True])
def test_head_is_float32_beside_a_bf16_backbone_except_under_zero3(char_tokenizer, zero3):
    model = build_tiny_model(char_tokenizer, architecture="qwen3", hidden_size=32, num_layers=1, dtype=torch.bfloat16)
    callback = SamplerHeadCallback()
    trainer = fake_trainer(model)
    trainer._dist = SimpleNamespace(is_zero3=zero3)  # ZeRO-3 refuses mixed dtypes: there the head follows the model
    callback.setup(trainer)
    head_dtype = torch.bfloat16 if zero3 else torch.float32
    assert {p.dtype for p in callback.head.parameters()} == {head_dtype}
    model.train()
    ids = char_tokenizer(["Q:2*3=\nA:", "Q:9-1=\nA:"], return_tensors="pt")
    hidden = get_backbone(model)(ids.input_ids, ids.attention_mask, output_hidden_states=True).hidden_states
    prompt_hidden = hidden.mean(1)  # NOT detached: the head must detach it
    assert prompt_hidden.requires_grad and prompt_hidden.dtype == torch.bfloat16
    threshold = callback.threshold_fn(prompt_hidden)
    loss, _ = callback.head_loss(prompt_hidden, threshold, torch.tensor([1.0, -1.0]))
    assert loss.dtype == torch.float32
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith(HEAD_ATTRIBUTE))
    assert all(p.grad is not None and p.grad.dtype == head_dtype for p in callback.head.parameters())


def test_float32_head_moves_where_a_bf16_head_is_stuck(char_tokenizer):
    """Adam at 1e-3 moves the output bias (u0 = logit(0.1) = -2.197) by about 1e-3 a step: below bf16's spacing
    (0.0156 near 2.2), so a bf16 head never moves; the default float32 head does."""
    model = build_tiny_model(char_tokenizer, architecture="qwen3", hidden_size=32, num_layers=1, dtype=torch.bfloat16)
    callback = SamplerHeadCallback()
    callback.setup(fake_trainer(model))
    prompt_hidden = torch.randn(4, 32, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)

    def bias_after_pushing_up(head):
        bias = head.mlp[-1].bias
        start = bias.detach().float().clone()
        optimizer = torch.optim.Adam(head.parameters(), lr=1e-3)
        for _ in range(50):
            optimizer.zero_grad()
            (-head(prompt_hidden).mean()).backward()  # push the threshold up
            optimizer.step()
        return (bias.detach().float() - start).item()

    assert bias_after_pushing_up(callback.head) > 0.03
    stuck = SamplerHead(callback.head.config).to(torch.bfloat16)
    assert bias_after_pushing_up(stuck) == 0.0


def test_setup_on_a_peft_model_keeps_the_head_out_of_the_adapter(char_tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    model = build_tiny_model(char_tokenizer, architecture="llama", hidden_size=32, num_layers=1)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    callback = SamplerHeadCallback(mode="sampler_only")
    callback.setup(fake_trainer(peft_model))
    assert peft_model.diffpo_sampler_head is callback.head
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(name.startswith(HEAD_ATTRIBUTE + ".") for name in trainable)  # LoRA frozen too
    peft_model.save_pretrained(tmp_path)
    callback.save_head(tmp_path)
    adapter_keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert adapter_keys and not any("sampler_head" in key for key in adapter_keys)
    assert load_sampler_head(tmp_path).config == callback.head.config


def test_full_model_save_pretrained_leaves_the_head_to_its_own_files(char_tokenizer, tmp_path):
    from safetensors.torch import load_file

    model = build_tiny_model(char_tokenizer, architecture="llama", hidden_size=32, num_layers=1)
    callback = SamplerHeadCallback()
    callback.setup(fake_trainer(model))
    model.save_pretrained(tmp_path)
    callback.save_head(tmp_path)
    assert not any(HEAD_ATTRIBUTE in key for key in load_file(tmp_path / "model.safetensors"))
    assert load_sampler_head(tmp_path).config.input_size == 32


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints: a transformers Trainer driving the callback through the contract's methods
# ---------------------------------------------------------------------------------------------------------------------

TRAINER_GEN_LENGTH = 16
TRAINER_GROUP = 2


@dataclass
class HeadTrainingArguments(TrainingArguments):
    sampler: str = "entropy_bounded"


class HeadTrainer(Trainer):
    """Stands in for DiffpoTrainer: calls setup / threshold_fn / sampler_advantages / head_loss. It does not call
    save_head in save_model, so the head files in checkpoint-N/ come from the callback's on_save."""

    def __init__(self, *args, sampler_head_callback=None, **kwargs):
        super().__init__(*args, callbacks=[sampler_head_callback], **kwargs)
        self.sampler_head_callback = sampler_head_callback
        sampler_head_callback.setup(self)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        callback = self.sampler_head_callback
        output = get_backbone(model)(inputs["input_ids"], output_hidden_states=True)
        prompt_hidden = output.hidden_states.mean(1)
        policy_loss = 1e-2 * output.logits.float().logsumexp(-1).mean()  # something for the dLLM to learn in joint
        threshold = callback.threshold_fn(prompt_hidden.detach())
        nfe = torch.round(TRAINER_GEN_LENGTH * (1 - 0.8 * threshold))
        rewards = (inputs["input_ids"][:, -1] % 2).float()
        advantages = callback.sampler_advantages(rewards, nfe, TRAINER_GEN_LENGTH, TRAINER_GROUP)
        head_loss, _ = callback.head_loss(prompt_hidden, threshold, advantages)
        loss = policy_loss + head_loss
        return (loss, {}) if return_outputs else loss


class ResumeProbe(TrainerCallback):
    """Records the head's weights and optimizer state right when training (re)starts."""

    def __init__(self, head):
        self.head = head

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.weights = {k: v.clone() for k, v in self.head.state_dict().items()}
        self.optimizer_state = copy.deepcopy(optimizer.state_dict())  # the live state changes in place later


def make_trainer(tokenizer, output_dir, use_peft: bool, max_steps: int = 4, **arg_overrides):
    model = build_tiny_model(tokenizer, architecture="llama", hidden_size=32, num_layers=1, seed=2)
    if use_peft:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(5, len(tokenizer), (8,), generator=generator)} for _ in range(32)]
    args = HeadTrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        save_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        remove_unused_columns=False,
        logging_steps=100,
        **arg_overrides,
    )
    callback = SamplerHeadCallback(mode="joint", nfe_penalty=1.0, mlp_hidden_size=8, head_learning_rate=0.05)
    eval_data = data[:8] if args.eval_strategy != "no" else None
    trainer = HeadTrainer(
        model=model, args=args, train_dataset=data, eval_dataset=eval_data, sampler_head_callback=callback
    )
    return trainer, callback


@pytest.mark.parametrize("use_peft", [False, True])
def test_resume_restores_head_weights_and_optimizer_state(char_tokenizer, tmp_path, use_peft):
    from safetensors.torch import load_file

    trainer, callback = make_trainer(char_tokenizer, tmp_path / "run", use_peft)
    trainer.train()
    head_group = trainer.optimizer.param_groups[-1]
    assert head_group["lr"] == 0.05 and len(head_group["params"]) == len(list(callback.head.parameters()))
    uninterrupted = {k: v.clone() for k, v in callback.head.state_dict().items()}
    checkpoint = tmp_path / "run" / "checkpoint-2"
    saved_weights = load_file(checkpoint / HEAD_WEIGHTS_NAME)
    assert not torch.equal(saved_weights["mlp.2.bias"], uninterrupted["mlp.2.bias"])  # the head moved after step 2
    saved_optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)

    resumed, resumed_callback = make_trainer(char_tokenizer, tmp_path / "resumed", use_peft)
    probe = ResumeProbe(resumed_callback.head)
    resumed.add_callback(probe)
    resumed.train(resume_from_checkpoint=str(checkpoint))

    assert resumed_callback.restored_from == str(checkpoint)
    for name, value in saved_weights.items():  # weights back before training restarts
        assert torch.equal(probe.weights[name], value), name
    head_indices = probe.optimizer_state["param_groups"][-1]["params"]
    assert probe.optimizer_state["param_groups"][-1][HEAD_ATTRIBUTE]
    for index in head_indices:  # the head's Adam moments came back too
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(probe.optimizer_state["state"][index][key], saved_optimizer["state"][index][key])
        assert probe.optimizer_state["state"][index]["exp_avg"].abs().sum() > 0
    for name, value in resumed_callback.head.state_dict().items():  # and training continued identically
        assert torch.equal(value, uninterrupted[name]), name


# ---------------------------------------------------------------------------------------------------------------------
# Callback events, metrics, evaluation mode, warm start
# ---------------------------------------------------------------------------------------------------------------------


def test_sigma_anneals_on_step_begin(char_tokenizer):
    model = build_tiny_model(char_tokenizer, architecture="llama", hidden_size=32, num_layers=1)
    callback = SamplerHeadCallback(sigma=1.0, sigma_final=0.2, sigma_schedule="linear")
    callback.setup(fake_trainer(model))
    callback.on_train_begin(None, SimpleNamespace(global_step=0, max_steps=10), None)
    assert callback.head.exploration_sigma == 1.0
    callback.on_step_begin(None, SimpleNamespace(global_step=5, max_steps=10), None)
    assert callback.head.exploration_sigma == pytest.approx(0.6)
    prompt_hidden = torch.randn(3, 32)
    threshold = callback.threshold_fn(prompt_hidden)
    _, metrics = callback.head_loss(prompt_hidden, threshold, torch.zeros(3))
    assert metrics["sigma"] == pytest.approx(0.6)


def test_correlation_metrics_reach_the_trainer_metric_store(char_tokenizer):
    from collections import defaultdict

    model = build_tiny_model(char_tokenizer, architecture="llama", hidden_size=32, num_layers=1).train()
    trainer = fake_trainer(model)
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    callback = SamplerHeadCallback(sigma=1.0, nfe_penalty=0.5)
    callback.setup(trainer)
    threshold = torch.cat([callback.threshold_fn(torch.randn(4, 32)), callback.threshold_fn(torch.randn(4, 32))])
    rewards = 3 * threshold + 1  # perfectly correlated with the drawn thresholds
    nfe = 100 - 10 * threshold  # perfectly anti-correlated
    callback.sampler_advantages(rewards, nfe, gen_length=32, num_generations=4)
    store = trainer._metrics["train"]
    assert store["sampler_head/corr_threshold_reward"] == [pytest.approx(1.0)]
    assert store["sampler_head/corr_threshold_nfe"] == [pytest.approx(-1.0)]
    assert store["sampler_head/sampler_reward"] == [pytest.approx((rewards - 0.5 * nfe / 32).mean().item())]
    callback.sampler_advantages(rewards, nfe, gen_length=32, num_generations=4)  # no fresh draws: no correlation
    assert len(store["sampler_head/corr_threshold_reward"]) == 1


def test_threshold_fn_is_deterministic_in_eval_mode(char_tokenizer):
    model = build_tiny_model(char_tokenizer, architecture="llama", hidden_size=32, num_layers=1).eval()
    callback = SamplerHeadCallback(sigma=2.0)
    callback.setup(fake_trainer(model))
    prompt_hidden = torch.randn(5, 32)
    assert torch.equal(callback.threshold_fn(prompt_hidden), callback.head.predict_threshold(prompt_hidden))
    model.train()
    assert not torch.equal(callback.threshold_fn(prompt_hidden), callback.head.predict_threshold(prompt_hidden))


def test_pretrained_head_warm_start_and_mismatch(char_tokenizer, tmp_path):
    model = build_tiny_model(char_tokenizer, architecture="llama", hidden_size=32, num_layers=1)
    trained = make_head(input_size=32, mlp_hidden_size=256)
    torch.nn.init.normal_(trained.mlp[-1].weight)
    save_sampler_head(trained, tmp_path)
    callback = SamplerHeadCallback(mode="sampler_only", pretrained_head=tmp_path, sigma=0.1)
    callback.setup(fake_trainer(model))
    assert torch.equal(callback.head.mlp[-1].weight, trained.mlp[-1].weight)
    assert callback.head.exploration_sigma == 0.1
    with pytest.raises(ValueError, match="does not match"):
        SamplerHeadCallback(pretrained_head=tmp_path, threshold_max=3.0).setup(fake_trainer(model))


# ---------------------------------------------------------------------------------------------------------------------
# DiffpoTrainer integration (joint mode, checkpoints, resume)
# ---------------------------------------------------------------------------------------------------------------------

DIFFPO_PROMPTS = ["1+2=", "hello:", "abc", "7*3=", "x", "(4)", "zz:", "9-1="]


def constant_reward(completions, **kwargs):
    """Every completion is 'correct': only the NFE penalty distinguishes the rollouts of a group."""
    return [1.0 for _ in completions]


def make_diffpo_trainer(tokenizer, output_dir, callback, use_peft=False, **overrides):
    from datasets import Dataset

    from trl_diffpo import DiffpoConfig, DiffpoTrainer

    values = {
        "output_dir": str(output_dir),
        "bf16": False,
        "report_to": "none",
        "save_strategy": "steps",
        "save_steps": 2,
        "logging_steps": 1,
        "max_completion_length": 8,
        "block_length": 4,
        "sampler": "entropy_bounded",
        "threshold": 5.0,
        "per_device_train_batch_size": 4,
        "num_generations": 2,
        "gradient_accumulation_steps": 1,
        "num_iterations": 1,
        "max_steps": 4,
        "learning_rate": 1e-3,
        "lr_scheduler_type": "constant",
        "beta": 0.0,
        "seed": 0,
        "disable_tqdm": True,
    }
    values.update(overrides)
    model = build_tiny_model(tokenizer, architecture="llama", hidden_size=32, num_layers=1, seed=1)
    peft_config = None
    if use_peft:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    return DiffpoTrainer(
        model=model,
        reward_funcs=constant_reward,
        args=DiffpoConfig(**values),
        train_dataset=Dataset.from_dict({"prompt": DIFFPO_PROMPTS}),
        processing_class=tokenizer,
        callbacks=[callback],
        peft_config=peft_config,
    )


def diffpo_head_callback(**overrides):
    options = {
        "mode": "joint",
        "nfe_penalty": 1.0,
        "threshold_max": 40.0,
        "init_threshold": 5.0,
        "sigma": 1.0,
        "mlp_hidden_size": 8,
        "head_learning_rate": 0.05,
    }
    options.update(overrides)
    return SamplerHeadCallback(**options)


def test_diffpo_joint_training_raises_the_threshold_when_reward_ignores_it(char_tokenizer, tmp_path):
    callback = diffpo_head_callback(head_learning_rate=0.2)
    trainer = make_diffpo_trainer(
        char_tokenizer, tmp_path, callback, max_steps=8, save_strategy="no", per_device_train_batch_size=8,
        num_generations=4,
    )  # fmt: skip
    assert trainer.model.diffpo_sampler_head is callback.head
    probe = torch.randn(16, 32)
    before = callback.head.predict_threshold(probe).mean().item()
    model_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "sampler_head" not in n}
    trainer.train()
    after = callback.head.predict_threshold(probe).mean().item()
    assert before == pytest.approx(5.0, abs=1e-4)
    assert after > before + 4.0  # fewer forward passes at no cost in reward: a larger entropy bound
    history = trainer.state.log_history
    assert any("sampler_head/loss" in h for h in history)
    assert any("sampler_head/corr_threshold_nfe" in h for h in history)
    corr = [h["sampler_head/corr_threshold_nfe"] for h in history if "sampler_head/corr_threshold_nfe" in h]
    assert sum(corr) / len(corr) < 0  # a larger entropy bound decodes in fewer forward passes
    # joint mode: the dLLM trains too (its loss is zero with a constant reward, so only check it is trainable)
    assert all(p.requires_grad for n, p in trainer.model.named_parameters() if n in model_before)


@pytest.mark.parametrize("use_peft", [False, True])
def test_diffpo_checkpoint_resume_restores_head_weights_and_optimizer_state(char_tokenizer, tmp_path, use_peft):
    from safetensors.torch import load_file

    callback = diffpo_head_callback()
    trainer = make_diffpo_trainer(char_tokenizer, tmp_path / "run", callback, use_peft=use_peft)
    trainer.train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert (checkpoint / HEAD_WEIGHTS_NAME).is_file() and (checkpoint / HEAD_CONFIG_NAME).is_file()
    saved_weights = load_file(checkpoint / HEAD_WEIGHTS_NAME)
    saved_optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    final = {k: v.clone() for k, v in callback.head.state_dict().items()}
    assert not torch.equal(final["mlp.2.bias"], saved_weights["mlp.2.bias"])

    trainer.save_model(str(tmp_path / "final"))  # the final folder reloads the head with one call
    reloaded = load_sampler_head(tmp_path / "final")
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in final.items())

    resumed_callback = diffpo_head_callback()
    resumed = make_diffpo_trainer(char_tokenizer, tmp_path / "resumed", resumed_callback, use_peft=use_peft)
    probe = ResumeProbe(resumed_callback.head)
    resumed.add_callback(probe)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed_callback.restored_from == str(checkpoint)
    for name, value in saved_weights.items():
        assert torch.equal(probe.weights[name], value), name
    head_group = probe.optimizer_state["param_groups"][-1]
    assert head_group[HEAD_ATTRIBUTE] and head_group["lr"] == 0.05
    for index in head_group["params"]:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(probe.optimizer_state["state"][index][key], saved_optimizer["state"][index][key])
    assert not torch.equal(resumed_callback.head.state_dict()["mlp.2.bias"], saved_weights["mlp.2.bias"])


def test_diffpo_sampler_only_trains_the_head_and_leaves_the_dllm_untouched(char_tokenizer, tmp_path):
    callback = diffpo_head_callback(mode="sampler_only")
    trainer = make_diffpo_trainer(char_tokenizer, tmp_path, callback, max_steps=2, save_strategy="no")
    dllm_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if HEAD_ATTRIBUTE not in n}
    head_before = {n: p.detach().clone() for n, p in callback.head.named_parameters()}
    trainer.train()
    assert all(torch.equal(p, dllm_before[n]) for n, p in trainer.model.named_parameters() if n in dllm_before)
    assert any(not torch.equal(p, head_before[n]) for n, p in callback.head.named_parameters())


def test_load_best_model_at_end_restores_the_best_checkpoints_head(char_tokenizer, tmp_path):
    from safetensors.torch import load_file

    trainer, callback = make_trainer(
        char_tokenizer, tmp_path, use_peft=False, max_steps=6, eval_strategy="steps", eval_steps=2,
        load_best_model_at_end=True, metric_for_best_model="score", greater_is_better=True,
    )  # fmt: skip
    trainer.evaluate = lambda *args, **kwargs: {"eval_score": -float(trainer.state.global_step)}  # best: step 2
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-6")  # the test needs a best that is not the last
    assert callback.restored_from == best
    for name, value in load_file(os.path.join(best, HEAD_WEIGHTS_NAME)).items():
        assert torch.equal(callback.head.state_dict()[name], value), name


def test_setup_switches_off_ddp_unused_parameter_search(char_tokenizer):
    # DDP with find_unused_parameters=True fails with "marked as ready twice" on the head's gradients (checked with a
    # 2-process gloo run); the Trainer turns the search on by default when gradient checkpointing is off.
    model = build_tiny_model(char_tokenizer, architecture="llama", hidden_size=32, num_layers=1)
    trainer = fake_trainer(model)
    trainer.accelerator = SimpleNamespace(ddp_handler=SimpleNamespace(find_unused_parameters=True), process_index=0)
    trainer.args.ddp_find_unused_parameters = None  # the default: the Trainer decided
    SamplerHeadCallback().setup(trainer)
    assert trainer.accelerator.ddp_handler.find_unused_parameters is False
    trainer.accelerator.ddp_handler.find_unused_parameters = True
    trainer.args.ddp_find_unused_parameters = True  # the user asked for it
    with pytest.raises(ValueError, match="ddp_find_unused_parameters=False"):
        SamplerHeadCallback().setup(trainer)


@pytest.mark.parametrize(
    ("sampler", "fixed", "overrides", "expected_init", "expected_max"),
    [
        ("entropy_bounded", 0.3, {}, 0.3, 1.0),  # starts where model-only training decodes
        ("entropy_bounded", 2.0, {}, 2.0, 4.0),  # above the default range: the range widens to 2x
        ("entropy_bounded", 2.0, {"threshold_max": 1.5}, 0.1, 1.5),  # an explicit range wins: default init
        ("entropy_bounded", 0.3, {"init_threshold": 0.6}, 0.6, 1.0),  # an explicit init wins
        ("confidence_threshold", 0.8, {}, 0.8, 1.0),
        ("confidence_threshold", 0.2, {}, 0.9, 1.0),  # outside (0.5, 1): the default init
        ("entropy_bounded", None, {}, 0.1, 1.0),
    ],
)
def test_head_starts_at_the_trainers_fixed_threshold(char_tokenizer, sampler, fixed, overrides, expected_init,
                                                     expected_max):  # fmt: skip
    model = build_tiny_model(char_tokenizer, architecture="llama", hidden_size=32, num_layers=1)
    trainer = fake_trainer(model, sampler=sampler)
    trainer.args.threshold = fixed
    callback = SamplerHeadCallback(**overrides)
    callback.setup(trainer)
    config = callback.head.config
    assert config.init_threshold == pytest.approx(expected_init)
    assert config.threshold_max == pytest.approx(expected_max)
    predicted = callback.head.predict_threshold(torch.randn(3, 32))
    torch.testing.assert_close(predicted.float(), torch.full((3,), expected_init), atol=1e-5, rtol=1e-5)
