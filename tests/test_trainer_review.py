"""Regression tests for the line-by-line review of the trainer (issue 11): the KL reference of a PEFT model that
already carries an adapter, the off-policy mask, entropy outside the autograd graph, the frozen dLLM of
``sampler_only``, every EOS id, the old surrogate taken from the training forward, and the head's defaults."""

import pytest
import torch

from test_trainer import logged, make_trainer, snapshot
from trl_diffpo.backbones import get_backbone
from trl_diffpo.likelihood import surrogate_log_probs
from trl_diffpo.tiny import build_char_tokenizer, build_tiny_model


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


# ------------------------------------------------------------------------------ 1. KL reference of an existing adapter


def _model_with_trained_adapter(tokenizer):
    from peft import LoraConfig, get_peft_model

    model = build_tiny_model(tokenizer, architecture="llama", hidden_size=32, num_layers=1, seed=1)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # a non-trivial adapter: the policy differs from the adapter-disabled base
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return model


def test_existing_adapter_is_its_own_frozen_reference(tokenizer, tmp_path):
    model = _model_with_trained_adapter(tokenizer)
    trainer = make_trainer(tokenizer, tmp_path, model=model, beta=0.04, max_steps=2)
    assert sorted(trainer.model.peft_config) == ["default", "ref"]
    reference_before = {name: p.clone() for name, p in snapshot(trainer.model).items() if ".ref." in name}
    policy_before = {name: p.clone() for name, p in snapshot(trainer.model).items() if ".default." in name}
    assert reference_before and policy_before

    trainer.train()
    kl = logged(trainer, "kl")
    # Step 1 uses the rollouts' first inner iteration before any update: the policy is its own reference.
    assert kl[0] == 0.0
    assert kl[1] > 0.0  # the policy moved away from the reference
    after = snapshot(trainer.model)
    assert all(torch.equal(after[name], value) for name, value in reference_before.items()), "reference moved"
    assert any(not torch.equal(after[name], value) for name, value in policy_before.items()), "policy did not train"


# ------------------------------------------------------------------------------------------- 2. the off-policy mask


def test_off_policy_mask_sees_no_staleness_on_fresh_rollouts(tokenizer, tmp_path):
    """At zero staleness the mask must keep every sequence: the loss equals the loss without the mask. It used to
    compare the behaviour log-probs of the sampler with the surrogate (mean-field: a large structural gap)."""
    settings = {"likelihood": "mean_field", "num_iterations": 1, "max_steps": 2, "learning_rate": 0.0}
    plain = make_trainer(tokenizer, tmp_path / "plain", **settings)
    plain.train()
    masked = make_trainer(tokenizer, tmp_path / "masked", off_policy_mask_threshold=1e-6, **settings)
    masked.train()
    assert logged(plain, "loss") == logged(masked, "loss")
    assert any(value != 0.0 for value in logged(plain, "loss"))
    assert "sampling_per_token_logps" not in masked._buffered_inputs[0]


# ----------------------------------------------------------------------------------- 4. entropy outside the graph


def _saved_bytes(function):
    """Bytes of the tensors autograd saves for backward while ``function`` runs."""
    total = [0]

    def pack(tensor):
        total[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = function()
    return total[0], result


def test_entropy_is_computed_without_graph_unless_asked(tokenizer):
    model = build_tiny_model(tokenizer, architecture="llama", hidden_size=32, num_layers=1, seed=1)
    backbone = get_backbone(model)
    generator = torch.Generator().manual_seed(0)
    batch, prompt_length, gen_length = 3, 4, 6
    sequences = torch.randint(5, len(tokenizer), (batch, prompt_length + gen_length), generator=generator)
    unmask_step = torch.randint(1, 4, (batch, gen_length), generator=generator)
    inputs = (
        backbone,
        sequences,
        torch.ones(batch, prompt_length, dtype=torch.long),
        unmask_step,
        torch.zeros(batch, prompt_length, dtype=torch.bool),
        torch.tensor([[0, 1]] * batch),
    )
    without, (logps, entropy) = _saved_bytes(lambda: surrogate_log_probs(*inputs, temperature=0.9))
    assert entropy is None and logps.requires_grad
    metric, (_, entropy) = _saved_bytes(lambda: surrogate_log_probs(*inputs, temperature=0.9, compute_entropy=True))
    assert metric == without, "the entropy metric must not keep tensors alive for backward"
    assert not entropy.requires_grad and (entropy > 0).all()
    bonus, (_, graph_entropy) = _saved_bytes(
        lambda: surrogate_log_probs(*inputs, temperature=0.9, compute_entropy=True, entropy_requires_grad=True)
    )
    assert graph_entropy.requires_grad and bonus > without
    torch.testing.assert_close(graph_entropy.detach(), entropy)


@pytest.mark.parametrize("entropy_coef", [0.0, 0.01])
def test_trainer_keeps_the_entropy_graph_only_for_the_entropy_bonus(tokenizer, tmp_path, entropy_coef):
    trainer = make_trainer(tokenizer, tmp_path, max_steps=1, entropy_coef=entropy_coef)
    seen = []
    original = trainer._surrogate

    def recording(*args, **kwargs):
        logps, entropy = original(*args, **kwargs)
        if entropy is not None:
            seen.append(entropy.requires_grad)
        return logps, entropy

    trainer._surrogate = recording
    trainer.train()
    assert seen and all(flag == (entropy_coef != 0.0) for flag in seen)


# -------------------------------------------------------------------- 5. sampler_only skips the frozen dLLM's surrogate


def _count_surrogate_calls(trainer):
    calls = {"no_grad": 0, "grad": 0}
    original = trainer._surrogate

    def counting(*args, **kwargs):
        calls["grad" if torch.is_grad_enabled() else "no_grad"] += 1
        return original(*args, **kwargs)

    trainer._surrogate = counting
    return calls


def test_sampler_only_runs_no_surrogate_forward_and_trains_the_head(tokenizer, tmp_path):
    from trl_diffpo import SamplerHeadCallback

    callback = SamplerHeadCallback(mode="sampler_only", nfe_penalty=0.5, mlp_hidden_size=8, threshold_max=2.0)
    trainer = make_trainer(
        tokenizer, tmp_path, sampler="entropy_bounded", beta=0.04, num_iterations=2, callbacks=[callback]
    )
    calls = _count_surrogate_calls(trainer)
    dllm_before = {n: p for n, p in snapshot(trainer.model).items() if "sampler_head" not in n}
    head_before = snapshot(callback.head)
    trainer.train()
    assert calls == {"no_grad": 0, "grad": 0}
    after = snapshot(trainer.model)
    assert all(torch.equal(after[n], p) for n, p in dllm_before.items())
    assert any(not torch.equal(p, head_before[n]) for n, p in snapshot(callback.head).items())
    assert logged(trainer, "sampler_head/loss") and logged(trainer, "diffusion/nfe/mean")


# ------------------------------------------------------------ 7. the old surrogate from the training forward, exactly


def test_old_logps_come_from_the_training_forward_when_the_policy_has_not_moved(tokenizer, tmp_path):
    """One inner iteration with generation at the optimizer step: the old log-probs are the detached current ones.
    The trainer then skips their no-grad forward and takes the IS weight from the training forward; the run is the
    same as with the separate forward."""
    settings = {"num_iterations": 1, "gradient_accumulation_steps": 2, "max_steps": 3, "beta": 0.04}
    fast = make_trainer(tokenizer, tmp_path / "fast", **settings)
    fast_calls = _count_surrogate_calls(fast)
    fast.train()
    slow = make_trainer(tokenizer, tmp_path / "slow", **settings)
    slow._old_logps_are_current = lambda mode: False  # the former behaviour: a separate no-grad forward
    slow_calls = _count_surrogate_calls(slow)
    slow.train()
    assert fast_calls["grad"] == slow_calls["grad"] == 6  # 3 steps x 2 micro-batches
    assert fast_calls["no_grad"] == 3 and slow_calls["no_grad"] == 6  # reference only / reference + old
    for name, value in snapshot(slow.model).items():
        torch.testing.assert_close(snapshot(fast.model)[name], value, atol=1e-6, rtol=1e-6)
    for key in ("loss", "kl"):
        assert logged(fast, key) == pytest.approx(logged(slow, key), abs=1e-6), key
    # The IS metrics are then logged per micro-batch (averaged per logging step), not once per generation batch.
    assert len(logged(fast, "diffpo/is_weight/mean")) == 3 and len(logged(fast, "diffpo/is_weight/clamped_frac")) == 3


def test_old_logps_are_stored_when_the_policy_moves_in_between(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, num_iterations=2, max_steps=2)
    calls = _count_surrogate_calls(trainer)
    trainer.train()
    inputs = trainer._buffered_inputs[0]
    assert inputs["diffpo_old_logps"].shape[1] == 2 and inputs["diffpo_is_weight"].shape[1] == 2
    assert calls["no_grad"] == 2  # old log-probs of both inner iterations, one batch


# ------------------------------------------------------------------------------------ 6. every EOS id stops a rollout


def test_rollouts_stop_at_every_eos_id_of_the_model(tokenizer, tmp_path, monkeypatch):
    import trl_diffpo.trainer_rollouts as trainer_module  # where the rollouts call diffusion_generate

    model = build_tiny_model(tokenizer, architecture="llama", hidden_size=32, num_layers=1, seed=1)
    end_of_turn = tokenizer.convert_tokens_to_ids("#")
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, end_of_turn]
    seen = []
    original = trainer_module.diffusion_generate

    def recording(*args, **kwargs):
        seen.append(kwargs["eos_token_id"])
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "diffusion_generate", recording)
    trainer = make_trainer(tokenizer, tmp_path, model=model, max_steps=1)
    trainer.train()
    assert seen and all(list(ids) == [tokenizer.eos_token_id, end_of_turn] for ids in seen)
