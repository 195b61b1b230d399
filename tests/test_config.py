"""DiffpoConfig: DiFFPO's defaults and every refused configuration."""

import dataclasses

import pytest

from trl_diffpo import DiffpoConfig

TINY = {"bf16": False, "report_to": "none", "per_device_train_batch_size": 4, "num_generations": 2}


def make(tmp_path, **overrides):
    return DiffpoConfig(output_dir=str(tmp_path), **{**TINY, **overrides})


def test_defaults_reproduce_diffpo_on_d1(tmp_path):
    config = DiffpoConfig(output_dir=str(tmp_path), bf16=False)
    assert (config.max_completion_length, config.block_length, config.diffusion_steps) == (256, 32, 128)
    assert config.sampler == "low_confidence" and config.temperature == 0.9
    assert config.likelihood == "two_stage" and config.surrogate_stages == 2
    assert config.is_correction == "token" and config.is_clamp > 0
    assert config.p_mask_prompt == 0.15 and config.beta == 0.04 and config.epsilon == 0.5
    assert config.num_iterations == 12 and config.num_generations == 6 and config.learning_rate == 3e-6
    assert config.per_device_train_batch_size == 6
    assert config.scale_rewards == "none" and config.loss_type == "grpo" and not config.use_bias_correction_kl
    assert config.disable_dropout and not config.vllm_importance_sampling_correction and not config.use_vllm


def test_every_field_has_help():
    own = {f.name for f in dataclasses.fields(DiffpoConfig)} - {
        f.name for f in dataclasses.fields(DiffpoConfig.__base__)
    }
    assert own >= {"block_length", "diffusion_steps", "sampler", "threshold", "mask_token_id", "p_mask_prompt"}
    for f in dataclasses.fields(DiffpoConfig):
        if f.name in own:
            assert f.metadata.get("help"), f.name
            assert f"{f.name} (" in DiffpoConfig.__doc__, f"{f.name} is not documented in the docstring"


@pytest.mark.parametrize(
    ("likelihood", "num_stages", "expected"),
    [("mean_field", None, 1), ("mean_field", 1, 1), ("two_stage", 2, 2), ("k_stage", 5, 5)],
)
def test_surrogate_stages(tmp_path, likelihood, num_stages, expected):
    assert make(tmp_path, likelihood=likelihood, num_stages=num_stages).surrogate_stages == expected


def test_adaptive_sampler_accepts_threshold(tmp_path):
    config = make(tmp_path, sampler="entropy_bounded", threshold=0.0, diffusion_steps=None)
    assert config.threshold == 0.0


def test_threshold_on_fixed_sampler_warns(tmp_path):
    with pytest.warns(UserWarning, match="has no effect"):
        make(tmp_path, threshold=0.5)


REFUSED = [
    ({"use_vllm": True}, "use_vllm"),
    ({"use_transformers_continuous_batching": True}, "continuous batching"),
    ({"use_transformers_paged": True}, "continuous batching"),
    ({"top_p": 0.9}, "top_p"),
    ({"top_k": 5}, "top_k"),
    ({"min_p": 0.1}, "min_p"),
    ({"repetition_penalty": 1.2}, "repetition_penalty"),
    ({"generation_kwargs": {"do_sample": False}}, "generation_kwargs"),
    ({"max_completion_length": 250}, "multiple of block_length"),
    ({"block_length": 0}, "multiple of block_length"),
    ({"max_completion_length": None}, "positive integer"),
    ({"diffusion_steps": 100}, "multiple of the number of blocks"),
    ({"diffusion_steps": None}, "multiple of the number of blocks"),
    ({"diffusion_steps": 512}, "exceeds max_completion_length"),
    ({"sampler": "top_p"}, "not supported"),
    ({"temperature": -1.0}, "temperature"),
    ({"sampler": "confidence_threshold"}, "needs a `threshold`"),
    ({"sampler": "confidence_threshold", "threshold": 1.5}, r"\(0, 1\]"),
    ({"sampler": "confidence_threshold", "threshold": 0.0}, r"\(0, 1\]"),
    ({"sampler": "entropy_bounded", "threshold": -0.1}, "gamma"),
    ({"sampler": "entropy_bounded", "threshold": float("inf")}, "gamma"),
    ({"mask_token_id": -3}, "mask_token_id"),
    ({"p_mask_prompt": 1.0}, "p_mask_prompt"),
    ({"p_mask_prompt": -0.1}, "p_mask_prompt"),
    ({"likelihood": "exact"}, "likelihood='exact' is not supported"),
    ({"likelihood": "k_stage"}, "num_stages >= 1"),
    ({"likelihood": "k_stage", "num_stages": 0}, "num_stages >= 1"),
    ({"likelihood": "two_stage", "num_stages": 3}, "conflicts"),
    ({"is_correction": "trajectory"}, "is_correction"),
    ({"is_clamp": 0.0}, "is_clamp"),
    ({"is_clamp": float("nan")}, "is_clamp"),
]


@pytest.mark.parametrize(("overrides", "message"), REFUSED, ids=[str(o) for o, _ in REFUSED])
def test_refused_configurations(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make(tmp_path, **overrides)
