"""Masked-diffusion SFT: the loss against a slow reference, tokenization, determinism, and that training lowers it."""

import math

import pytest
import torch

from trl_diffpo.backbones import get_backbone
from trl_diffpo.sft import (
    MaskedDiffusionSFTConfig,
    left_pad,
    masked_diffusion_loss,
    masked_diffusion_sft,
    tokenize_prompts,
    tokenize_sft_examples,
)

PROMPTS = ["Q:1+1\nA:", "Q:2+2\nA:", "Q:3+3\nA:", "Q:4+4\nA:"]
COMPLETIONS = ["2", "4", "6", "8"]


def reference_loss(model, mask_id, prompt_ids, prompt_mask, completion_ids, ratios, masked):
    """Row by row, position by position: sum over masked completion tokens of -log p / t, / gen_length, mean."""
    total = 0.0
    for row in range(completion_ids.shape[0]):
        noisy = completion_ids[row].clone()
        noisy[masked[row]] = mask_id
        keep = prompt_mask[row].bool()
        ids = torch.cat([prompt_ids[row][keep], noisy])[None]
        logits = model(input_ids=ids).logits[0, int(keep.sum()) :].float()
        logits[:, mask_id] = -math.inf
        logps = torch.log_softmax(logits, -1)
        row_sum = sum(
            -logps[pos, completion_ids[row, pos]].item() for pos in range(completion_ids.shape[1]) if masked[row, pos]
        )
        total += row_sum / ratios[row].item() / completion_ids.shape[1]
    return total / completion_ids.shape[0]


def test_loss_matches_slow_reference(char_tokenizer, tiny_model):
    backbone = get_backbone(tiny_model)
    prompt_lists, completion_ids = tokenize_sft_examples(char_tokenizer, PROMPTS[:3], ["2", "44", "666"], 6)
    prompt_lists[1] = prompt_lists[1][2:]  # different prompt lengths -> left padding
    prompt_ids, prompt_mask = left_pad(prompt_lists, char_tokenizer.pad_token_id)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        loss = masked_diffusion_loss(backbone, prompt_ids, prompt_mask, completion_ids, generator, 1e-3)
    replay = torch.Generator().manual_seed(3)
    ratios = 1e-3 + (1 - 1e-3) * torch.rand(3, generator=replay)
    masked = torch.rand(3, 6, generator=replay) < ratios[:, None]
    assert masked.any()
    with torch.no_grad():
        expected = reference_loss(
            tiny_model, char_tokenizer.mask_token_id, prompt_ids, prompt_mask, completion_ids, ratios, masked
        )
    assert loss.item() == pytest.approx(expected, rel=1e-4)


def test_completions_are_eos_padded_and_length_checked(char_tokenizer):
    _, completion_ids = tokenize_sft_examples(char_tokenizer, ["Q:x\nA:"], ["12"], 5)
    eos = char_tokenizer.eos_token_id
    assert completion_ids.tolist() == [[*char_tokenizer("12")["input_ids"], eos, eos, eos]]
    with pytest.raises(ValueError, match="gen_length"):
        tokenize_sft_examples(char_tokenizer, ["Q:x\nA:"], ["12345"], 5)
    with pytest.raises(ValueError, match="pair up"):
        tokenize_sft_examples(char_tokenizer, ["a", "b"], ["1"], 5)


def test_conversational_prompts_tokenize_like_their_rendered_text(char_tokenizer):
    chat = tokenize_prompts(char_tokenizer, [[{"role": "user", "content": "1+1"}]])
    text = tokenize_prompts(char_tokenizer, ["Q:1+1\nA:"])
    assert chat == text
    with pytest.raises(ValueError, match="mix"):
        tokenize_prompts(char_tokenizer, ["a", [{"role": "user", "content": "b"}]])


def test_training_lowers_the_loss_and_is_deterministic(char_tokenizer):
    from trl_diffpo.tiny import build_tiny_model

    config = MaskedDiffusionSFTConfig(
        gen_length=4, num_steps=60, batch_size=4, learning_rate=3e-3, warmup_steps=5, log_every=10, show_progress=False
    )
    runs = []
    for _ in range(2):
        model = build_tiny_model(char_tokenizer, hidden_size=32, num_layers=1, seed=0)
        history = masked_diffusion_sft(model, char_tokenizer, PROMPTS, COMPLETIONS, config)
        runs.append((history, [p.detach().clone() for p in model.parameters()]))
        assert not model.training
    history = runs[0][0]
    assert [entry["step"] for entry in history] == list(range(10, 61, 10))
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert [entry["loss"] for entry in runs[0][0]] == [entry["loss"] for entry in runs[1][0]]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def test_config_validation():
    with pytest.raises(ValueError, match="min_mask_ratio"):
        MaskedDiffusionSFTConfig(min_mask_ratio=0.0)
    with pytest.raises(ValueError, match="batch_size"):
        MaskedDiffusionSFTConfig(batch_size=0)


def test_callback_metrics_and_early_stop(char_tokenizer):
    from trl_diffpo.tiny import build_tiny_model

    model = build_tiny_model(char_tokenizer, hidden_size=32, num_layers=1, seed=0)
    calls = []

    def callback(step, model_):
        calls.append((step, model_.training))
        return {"val_accuracy": step / 100, "stop": step >= 6}

    config = MaskedDiffusionSFTConfig(gen_length=4, num_steps=50, batch_size=2, log_every=3, show_progress=False)
    history = masked_diffusion_sft(model, char_tokenizer, PROMPTS, COMPLETIONS, config, callback=callback)
    assert calls == [(3, False), (6, False)]
    assert [entry["step"] for entry in history] == [3, 6]
    assert history[-1]["val_accuracy"] == pytest.approx(0.06)
