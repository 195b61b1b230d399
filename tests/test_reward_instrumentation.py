"""Reward instrumentation: per-function time and fallback metrics, and DiffpoConfig's math-verifier limits."""

from __future__ import annotations

import asyncio
import warnings
from types import SimpleNamespace

import pytest

from trl_diffpo import DiffpoConfig
from trl_diffpo.rewards import (
    REWARD_FALLBACKS,
    get_default_verifier,
    prepare_reward_funcs,
    strict_format_reward,
    sudoku_strict_reward,
    timed_reward,
)


def _logger():
    logged = []
    return logged, lambda name, value: logged.append((name, value))


def test_timed_reward_logs_time_and_fallbacks_through_log_metric():
    logged, log_metric = _logger()
    reward = timed_reward(sudoku_strict_reward)
    before = REWARD_FALLBACKS["sudoku_strict_reward"]
    scores = reward(None, ["x", "y"], None, puzzle=["not a puzzle", "1000020000344302"], log_metric=log_metric)
    assert scores == [0.0, 0.0]
    assert REWARD_FALLBACKS["sudoku_strict_reward"] == before + 1
    names = [name for name, _ in logged]
    assert names == ["rewards/sudoku_strict_reward/time_s", "rewards/sudoku_strict_reward/fallbacks"]
    assert logged[0][1] >= 0.0 and logged[1][1] == 1.0


def test_timed_reward_keeps_the_name_and_is_idempotent():
    reward = timed_reward(strict_format_reward)
    assert reward.__name__ == "strict_format_reward"
    assert timed_reward(reward) is reward
    assert reward(None, ["<reasoning>\na\n</reasoning>\n<answer>\n1\n</answer>"]) == [1.0]  # no log_metric: fine


def test_timed_reward_logs_even_when_the_function_raises():
    logged, log_metric = _logger()

    def broken_reward(prompts, completions, **kwargs):
        raise RuntimeError("user bug")

    with pytest.raises(RuntimeError, match="user bug"):
        timed_reward(broken_reward)(None, ["a"], log_metric=log_metric)
    assert [name for name, _ in logged] == ["rewards/broken_reward/time_s", "rewards/broken_reward/fallbacks"]


def test_reward_models_and_async_functions_are_left_alone():
    async def async_reward(prompts, completions, **kwargs):
        await asyncio.sleep(0)
        return [1.0] * len(completions)

    model_id = "org/reward-model"
    assert prepare_reward_funcs([model_id, async_reward]) == [model_id, async_reward]
    assert prepare_reward_funcs(strict_format_reward)[0].__name__ == "strict_format_reward"


def test_prepare_reward_funcs_applies_the_config_limits_to_the_default_verifier():
    verifier = get_default_verifier()
    saved = (verifier.timeout_s, verifier.num_workers, verifier.batch_budget_s)
    try:
        args = SimpleNamespace(reward_timeout_s=2.5, reward_num_workers=3, reward_batch_budget_s=None)
        prepare_reward_funcs([strict_format_reward], args)
        assert (verifier.timeout_s, verifier.num_workers, verifier.batch_budget_s) == (2.5, 3, None)
        verifier.configure(batch_budget_s=12.0)
        prepare_reward_funcs([strict_format_reward], SimpleNamespace(reward_timeout_s=1.5))  # a config without them
        assert (verifier.timeout_s, verifier.num_workers, verifier.batch_budget_s) == (1.5, 3, 12.0)
    finally:
        verifier.configure(timeout_s=saved[0], num_workers=saved[1], batch_budget_s=saved[2])


def _config(**kwargs) -> DiffpoConfig:
    return DiffpoConfig(output_dir="/tmp/unused", bf16=False, use_cpu=True, report_to="none", **kwargs)


def test_config_reward_limit_defaults_and_validation():
    args = _config()
    assert (args.reward_timeout_s, args.reward_batch_budget_s, args.reward_num_workers) == (5.0, 30.0, 4)
    for bad, match in (
        ({"reward_timeout_s": 0.0}, "reward_timeout_s"),
        ({"reward_batch_budget_s": -1.0}, "reward_batch_budget_s"),
        ({"reward_num_workers": 0}, "reward_num_workers"),
    ):
        with pytest.raises(ValueError, match=match):
            _config(**bad)
    assert _config(reward_batch_budget_s=None).reward_batch_budget_s is None


def test_default_config_does_not_warn_about_gradient_checkpointing():
    # before: TRL's `gradient_checkpointing=True` default made transformers >= 5.23 warn on every run
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = _config()
    assert not [w for w in caught if "gradient_checkpointing" in str(w.message)]
    assert args.activation_checkpointing is True and args.gradient_checkpointing is True
    assert _config(activation_checkpointing=False).gradient_checkpointing is False
    with pytest.warns(FutureWarning, match="gradient_checkpointing"):  # the old name still works, and says so
        assert _config(gradient_checkpointing=False).activation_checkpointing is False


def test_the_python_api_trainer_logs_reward_time_and_fallbacks(tmp_path):
    """DiffpoTrainer wraps its reward functions itself (not only the CLI does): the metrics reach the log."""
    from datasets import Dataset

    from trl_diffpo import DiffpoTrainer
    from trl_diffpo.tiny import build_char_tokenizer, build_tiny_model

    def length_reward(completions, **kwargs):
        return [float(len(text) % 3) for text in completions]

    tokenizer = build_char_tokenizer()
    args = DiffpoConfig(
        output_dir=str(tmp_path), bf16=False, report_to="none", save_strategy="no", logging_steps=1,
        max_completion_length=8, block_length=4, diffusion_steps=4, per_device_train_batch_size=4,
        num_generations=2, num_iterations=1, max_steps=1, beta=0.0, activation_checkpointing=False,
    )  # fmt: skip
    trainer = DiffpoTrainer(
        model=build_tiny_model(tokenizer, hidden_size=32, num_layers=1, seed=1),
        reward_funcs=length_reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["1+2=", "abc", "x", "zz:"]}),
        processing_class=tokenizer,
    )
    trainer.train()
    logged = {key for entry in trainer.state.log_history for key in entry}
    assert {"rewards/length_reward/time_s", "rewards/length_reward/fallbacks"} <= logged
