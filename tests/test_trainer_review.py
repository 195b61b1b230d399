"""Regression tests for the line-by-line review of the trainer (issue 11): the KL reference of a PEFT model that
already carries an adapter, the off-policy mask, entropy outside the autograd graph, the frozen dLLM of
``sampler_only``, every EOS id, the old surrogate taken from the training forward, and the head's defaults."""

import pytest
import torch
from test_trainer import logged, make_trainer, snapshot, text_reward

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
    model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    )
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
