"""The backbone adapter: mask id resolution, causal detection, logit alignment, left padding, hidden states."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from trl_diffpo.backbones import (
    DiffusionBackbone,
    check_bidirectional,
    get_backbone,
    is_shifted_logits_model,
    resolve_mask_token_id,
    unwrap_model,
)
from trl_diffpo.tiny import build_char_tokenizer, build_tiny_model

PROMPTS = ["Q:1+1=A:", "Q:hello world A:", "Q:x"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_tiny_model(tokenizer, architecture="llama", hidden_size=32, num_layers=1)


class Wrapper(nn.Module):
    """A model with its own config whose forward delegates to ``inner`` (explicit signature: no ``**kwargs``)."""

    def __init__(self, inner, config):
        super().__init__()
        self.inner, self.config = inner, config
        self.received = {}

    def forward(self, input_ids, attention_mask=None, position_ids=None, output_hidden_states=False):
        self.received = {"attention_mask": attention_mask, "position_ids": position_ids}
        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask = attention_mask[:, 0, 0, :].long()
        return self.inner(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_hidden_states=output_hidden_states,
        )


# --------------------------------------------------------------------------------------------------------------------
# Mask token id
# --------------------------------------------------------------------------------------------------------------------


def test_mask_token_id_resolution_order(model, tokenizer):
    assert model.config.mask_token_id == tokenizer.mask_token_id == 3
    config_only = Wrapper(model, SimpleNamespace(mask_token_id=11))
    no_config_mask = Wrapper(model, SimpleNamespace())
    # 1. the explicit argument wins over the config and the tokenizer
    assert resolve_mask_token_id(config_only, tokenizer, mask_token_id=42) == 42
    # 2. then the model config
    assert resolve_mask_token_id(config_only, tokenizer) == 11
    # 3. then the tokenizer
    assert resolve_mask_token_id(no_config_mask, tokenizer) == tokenizer.mask_token_id
    assert get_backbone(model, tokenizer=tokenizer).mask_token_id == 3


def test_missing_mask_token_id_is_a_clear_error(model):
    no_mask = Wrapper(model, SimpleNamespace())
    tokenizer_without_mask = SimpleNamespace(mask_token_id=None)
    with pytest.raises(ValueError, match=r"mask token id for Wrapper.*mask_token_id=") as error:
        resolve_mask_token_id(no_mask, tokenizer_without_mask)
    assert "tokenizer" in str(error.value) and "model.config.mask_token_id" in str(error.value)
    with pytest.raises(ValueError, match="mask_token_id"):
        get_backbone(no_mask)
    with pytest.raises(ValueError, match="non-negative"):
        resolve_mask_token_id(model, mask_token_id=-1)


def test_mask_token_id_seen_through_peft_and_ddp_wrappers():
    from peft import LoraConfig, get_peft_model

    base = build_tiny_model(architecture="llama", hidden_size=32, num_layers=1)
    base.config.mask_token_id = 17
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    ddp_like = nn.Module()
    ddp_like.module = peft_model
    assert unwrap_model(ddp_like) is peft_model  # PEFT wrappers are kept: the adapter must run
    assert resolve_mask_token_id(ddp_like) == 17
    backbone = get_backbone(peft_model)
    ids = torch.tensor([[5, 6, 7, 17]])
    torch.testing.assert_close(backbone(ids).logits, peft_model(input_ids=ids).logits)


def test_unwrap_model_strips_compile_and_ddp_wrappers(model):
    compiled_like = nn.Module()
    compiled_like._orig_mod = model
    ddp_like = nn.Module()
    ddp_like.module = compiled_like
    assert unwrap_model(ddp_like) is model


# --------------------------------------------------------------------------------------------------------------------
# Causal models are refused
# --------------------------------------------------------------------------------------------------------------------


def causal_llama(tokenizer, **config_overrides):
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        mask_token_id=tokenizer.mask_token_id,
        **config_overrides,
    )
    return LlamaForCausalLM(config).eval()


def test_config_is_causal_true_is_refused(tokenizer):
    model = causal_llama(tokenizer, is_causal=True)
    with pytest.raises(ValueError, match=r"LlamaForCausalLM attends causally \(its config sets `is_causal=True`\)"):
        get_backbone(model)


def test_causal_llama_without_is_causal_is_caught_by_the_probe(tokenizer):
    model = causal_llama(tokenizer)
    assert getattr(model.config, "is_causal", None) is None  # the config cannot tell: only the probe can
    model.train()
    state = torch.random.get_rng_state()
    with pytest.raises(ValueError, match="changing the last token did not change the first position's logits") as e:
        check_bidirectional(model)
    assert "is_causal=False" in str(e.value)  # the message says how to fix it
    assert model.training  # the probe restores the training mode
    assert torch.equal(torch.random.get_rng_state(), state)  # and uses its own generator


def test_probe_accepts_a_bidirectional_model_and_caches_the_answer(model):
    unknown = Wrapper(
        model, SimpleNamespace(vocab_size=model.config.vocab_size, mask_token_id=3, model_type="mystery")
    )
    calls = []
    unknown.register_forward_hook(lambda *args: calls.append(1))
    check_bidirectional(unknown)
    assert calls == [1]  # one batched probe forward (original + perturbed)
    check_bidirectional(unknown)
    get_backbone(unknown)
    assert calls == [1]  # cached on the model


def test_check_attention_can_be_skipped(tokenizer):
    get_backbone(causal_llama(tokenizer, is_causal=True), check_attention=False)


# --------------------------------------------------------------------------------------------------------------------
# Logit alignment
# --------------------------------------------------------------------------------------------------------------------


def test_shift_detection():
    def module_with(**config):
        module = nn.Linear(1, 1)
        module.config = SimpleNamespace(**config)
        return module

    assert not is_shifted_logits_model(module_with(model_type="llama"))
    assert is_shifted_logits_model(module_with(model_type="Dream"))
    assert is_shifted_logits_model(module_with(model_type="dream"))
    assert is_shifted_logits_model(module_with(model_type="llama", diffusion_logits_shift=True))
    assert not is_shifted_logits_model(module_with(model_type="dream", diffusion_logits_shift=False))


def test_aligned_backbone_returns_the_model_logits(model):
    ids = torch.tensor([[5, 6, 3, 3, 7]])
    backbone = get_backbone(model)
    assert not backbone.logits_shift
    torch.testing.assert_close(backbone(ids).logits, model(input_ids=ids).logits)


class ShiftedByOne(nn.Module):
    """Dream-style remote-code stand-in: output position i holds the aligned logits of position i + 1."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = SimpleNamespace(model_type="Dream", mask_token_id=3, vocab_size=inner.config.vocab_size)
        self.received_mask = None

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        self.received_mask = attention_mask
        mask_2d = None if attention_mask is None else attention_mask[:, 0, 0, :].long()
        logits = self.inner(input_ids=input_ids, attention_mask=mask_2d, position_ids=position_ids).logits
        return CausalLMOutputWithPast(logits=torch.cat([logits[:, 1:], logits[:, :1]], dim=1))


def test_shifted_backbone_realigns_logits_and_gets_a_4d_mask(model, tokenizer):
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    shifted = ShiftedByOne(model)
    backbone = get_backbone(shifted)
    assert backbone.logits_shift
    output = backbone(batch.input_ids, batch.attention_mask)
    reference = get_backbone(model)(batch.input_ids, batch.attention_mask)
    torch.testing.assert_close(output.logits[:, 1:], reference.logits[:, 1:])
    mask = shifted.received_mask  # Dream's remote code wants (batch, 1, query, key) booleans
    assert mask.shape == (len(PROMPTS), 1, batch.input_ids.shape[1], batch.input_ids.shape[1])
    assert mask.dtype == torch.bool and torch.equal(mask[:, 0, -1, :], batch.attention_mask.bool())


# --------------------------------------------------------------------------------------------------------------------
# Left padding and hidden states
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "qwen3", "bert", "modernbert"])
def test_left_padded_rows_match_the_row_alone(tokenizer, architecture):
    model = build_tiny_model(tokenizer, architecture=architecture, hidden_size=32, num_layers=1)
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    backbone = get_backbone(model)
    together = backbone(batch.input_ids, batch.attention_mask, output_hidden_states=True)
    for row, prompt in enumerate(PROMPTS):
        ids = tokenizer([prompt], return_tensors="pt").input_ids
        alone = backbone(ids, output_hidden_states=True)
        torch.testing.assert_close(together.logits[row, -ids.shape[1] :], alone.logits[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            together.hidden_states[row, -ids.shape[1] :], alone.hidden_states[0], atol=1e-5, rtol=1e-5
        )


def test_position_ids_follow_left_padding(model, tokenizer):
    wrapper = Wrapper(model, model.config)
    batch = tokenizer(["abc", "a"], return_tensors="pt", padding=True)
    get_backbone(wrapper)(batch.input_ids, batch.attention_mask)
    assert wrapper.received["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    assert torch.equal(wrapper.received["attention_mask"], batch.attention_mask)


def test_hidden_states_are_the_last_layer(model):
    ids = torch.tensor([[5, 6, 3, 7]])
    output = get_backbone(model)(ids, output_hidden_states=True)
    expected = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(output.hidden_states, expected)
    assert get_backbone(model)(ids).hidden_states is None


def test_model_without_hidden_states_is_a_clear_error(model):
    class LogitsOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace(mask_token_id=3, is_causal=False)

        def forward(self, input_ids, attention_mask=None, output_hidden_states=False):
            return CausalLMOutputWithPast(logits=model(input_ids=input_ids).logits)

    backbone = get_backbone(LogitsOnly())
    assert isinstance(backbone, DiffusionBackbone)
    with pytest.raises(ValueError, match="did not return hidden states"):
        backbone(torch.tensor([[5, 6]]), output_hidden_states=True)
