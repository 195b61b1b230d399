"""Inputs the Python API used to accept silently: datasets without prompts or rows, sequences longer than the model
holds (and the prompt-length limit), reward functions returning non-numbers, and runs where nothing is scorable."""

import logging
import math

import numpy as np
import pytest
import torch
from datasets import Dataset

from test_trainer import PROMPTS, logged, text_reward, tiny_args
from trl_diffpo import DiffpoConfig, DiffpoTrainer
from trl_diffpo.tiny import build_char_tokenizer, build_tiny_model
from trl_diffpo.validation import PromptLengthGuard, UnscorableStreak, check_reward_output, position_limit


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def trainer_for(tokenizer, tmp_path, dataset=None, model=None, reward=text_reward, eval_dataset=None, **overrides):
    model = model or build_tiny_model(tokenizer, architecture="llama", hidden_size=32, num_layers=1, seed=1)
    return DiffpoTrainer(
        model=model,
        reward_funcs=reward,
        args=tiny_args(tmp_path, **overrides),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}) if dataset is None else dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )


# ------------------------------------------------------------------------------------------------------- datasets


def test_dataset_without_prompt_column_is_refused_at_construction(tokenizer, tmp_path):
    data = Dataset.from_dict({"question": PROMPTS, "answer": ["1"] * len(PROMPTS)})
    with pytest.raises(
        ValueError,
        match=r"train_dataset has no 'prompt' column \(columns: question, answer\).*"
        r"rename_column\('question', 'prompt'\)",
    ):
        trainer_for(tokenizer, tmp_path, dataset=data)
    good = Dataset.from_dict({"prompt": PROMPTS})
    with pytest.raises(ValueError, match=r"eval_dataset\['dev'\] has no 'prompt' column"):
        trainer_for(tokenizer, tmp_path, eval_dataset={"dev": data, "ok": good})


def test_empty_and_too_small_datasets_are_refused(tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"train_dataset is empty \(0 rows\)"):
        trainer_for(tokenizer, tmp_path, dataset=Dataset.from_dict({"prompt": []}))
    # 4 completions per device x 2 steps per generation / 2 generations = 4 distinct prompts per generation batch
    with pytest.raises(ValueError, match=r"train_dataset has 3 prompt\(s\), but one generation batch takes 4 "):
        trainer_for(tokenizer, tmp_path, dataset=Dataset.from_dict({"prompt": PROMPTS[:3]}))


# ------------------------------------------------------------------------------------------------ sequence length


def test_max_prompt_length_keeps_the_end_of_longer_prompts(tokenizer, tmp_path):
    long_prompts = [prompt * 4 for prompt in PROMPTS]
    trainer = trainer_for(
        tokenizer,
        tmp_path,
        dataset=Dataset.from_dict({"prompt": long_prompts}),
        max_prompt_length=3,
        max_steps=1,
        num_iterations=1,
        learning_rate=0.0,
    )
    trainer.train()
    batch = trainer._buffered_inputs[0]
    assert batch["prompt_ids"].shape[1] == 3
    full = {tuple(ids[-3:]) for ids in tokenizer(text=long_prompts)["input_ids"]}
    seen = {tuple(row[mask.bool()].tolist()) for row, mask in zip(batch["prompt_ids"], batch["prompt_mask"])}
    assert seen <= full
    assert logged(trainer, "prompts/truncated_frac") == [1.0]


def test_sequences_beyond_a_learned_position_table_are_refused_with_the_fix(tokenizer, tmp_path):
    bert = build_tiny_model(tokenizer, architecture="bert", hidden_size=32, num_layers=1, max_position_embeddings=12)
    assert position_limit(bert) == (12, True)
    long_prompts = [prompt * 3 for prompt in PROMPTS]  # 6+ tokens + the 8-token canvas > 12 positions
    trainer = trainer_for(tokenizer, tmp_path, dataset=Dataset.from_dict({"prompt": long_prompts}), model=bert)
    with pytest.raises(
        ValueError,
        match=r"needs \d+ positions, but BertForMaskedLM holds 12\. Set "
        r"DiffpoConfig\(max_prompt_length=4\)",
    ):
        trainer.train()
    with pytest.raises(ValueError, match=r"max_prompt_length=5 \+ max_completion_length=8 exceeds the 12 positions"):
        trainer_for(tokenizer, tmp_path, model=bert, max_prompt_length=5)
    trainer = trainer_for(
        tokenizer,
        tmp_path,
        dataset=Dataset.from_dict({"prompt": long_prompts}),
        model=bert,
        max_prompt_length=4,
        max_steps=1,
        num_iterations=1,
    )
    trainer.train()  # fits once truncated
    assert math.isfinite(logged(trainer, "loss")[0])


def test_rope_models_past_their_trained_length_warn_once(tokenizer, caplog):
    llama = build_tiny_model(tokenizer, architecture="llama", hidden_size=32, num_layers=1, max_position_embeddings=10)
    assert position_limit(llama) == (10, False)
    guard = PromptLengthGuard(llama, None, completion_length=8)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            assert guard([[5] * 4, [6] * 2]) == [[5] * 4, [6] * 2]  # unchanged: RoPE runs past the range
    warnings = [r for r in caplog.records if "beyond the 10 LlamaForCausalLM was trained for" in r.getMessage()]
    assert len(warnings) == 1


def test_input_limit_options_are_validated():
    with pytest.raises(ValueError, match="max_prompt_length must be a positive number of tokens or None"):
        DiffpoConfig(output_dir="x", bf16=False, max_prompt_length=0)
    with pytest.raises(ValueError, match=r"max_unscorable_steps must be >= 0"):
        DiffpoConfig(output_dir="x", bf16=False, max_unscorable_steps=-1)


# ----------------------------------------------------------------------------------------------------- rewards


def test_reward_values_are_checked_per_completion():
    assert check_reward_output("f", [1.0, None, np.float32(0.5), torch.tensor(2.0), True, 3], 6)
    with pytest.raises(
        TypeError, match=r"Reward function 'f' returned '1\.0' \(str\) for completion 1; .*float\(\.\.\.\)"
    ):
        check_reward_output("f", [0.0, "1.0"], 2)
    with pytest.raises(TypeError, match=r"'f' returned \[1\.0\] \(list\) for completion 0"):
        check_reward_output("f", [[1.0], [0.0]], 2)
    with pytest.raises(TypeError, match=r"'f' returned float 1\.0; it must return a list"):
        check_reward_output("f", 1.0, 2)
    with pytest.raises(TypeError, match=r"'f' returned str"):
        check_reward_output("f", "10", 2)
    with pytest.raises(ValueError, match=r"'f' returned 1 rewards for 2 completions"):
        check_reward_output("f", [1.0], 2)


def test_a_reward_returning_strings_names_the_function_and_the_value(tokenizer, tmp_path):
    def string_reward(completions, **kwargs):
        return ["1.0" for _ in completions]

    trainer = trainer_for(tokenizer, tmp_path, reward=string_reward, max_steps=1)
    with pytest.raises(TypeError, match=r"Reward function 'string_reward' returned '1\.0' \(str\) for completion 0"):
        trainer.train()


def nan_reward(completions, **kwargs):
    return [float("nan")] * len(completions)


def test_consecutive_unscorable_batches_stop_training(tokenizer, tmp_path, caplog):
    trainer = trainer_for(
        tokenizer,
        tmp_path,
        reward=nan_reward,
        max_steps=4,
        num_iterations=1,
        gradient_accumulation_steps=1,
        max_unscorable_steps=2,
    )
    with caplog.at_level(logging.WARNING):
        with pytest.raises(
            RuntimeError,
            match=r"'nan_reward' returned None or NaN for all 4 completions.*2 such "
            r"batch\(es\) in a row: stopping \(max_unscorable_steps=2\)",
        ):
            trainer.train()
    assert trainer.state.global_step == 1
    assert any("1 such batch(es) in a row of max_unscorable_steps=2" in r.getMessage() for r in caplog.records)


def test_unscorable_batches_are_counted_and_only_warned_with_zero(tokenizer, tmp_path):
    trainer = trainer_for(
        tokenizer,
        tmp_path,
        reward=nan_reward,
        max_steps=3,
        num_iterations=1,
        gradient_accumulation_steps=1,
        max_unscorable_steps=0,
    )
    trainer.train()
    assert trainer.state.global_step == 3
    assert logged(trainer, "rewards/unscorable_batches") == [1.0, 2.0, 3.0]


def test_a_scorable_batch_resets_the_streak():
    streak = UnscorableStreak(limit=2)
    nothing, something = torch.full((4, 2), float("nan")), torch.tensor([[float("nan"), 1.0]] * 4)
    streak.update(nothing, ["a", "b"], 0)
    streak.update(something, ["a", "b"], 1)
    streak.update(nothing, ["a", "b"], 2)
    assert (streak.consecutive, streak.total) == (1, 2)
    with pytest.raises(RuntimeError, match="max_unscorable_steps=2"):
        streak.update(nothing, ["a", "b"], 3)
    restored = UnscorableStreak(limit=2)
    restored.load_state_dict(streak.state_dict())
    assert (restored.consecutive, restored.total) == (2, 3)
