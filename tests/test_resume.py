"""Exact resume: a run resumed from any checkpoint (a generation boundary or inside a generation cycle) reproduces
the uninterrupted run bit for bit on CPU: same rollouts, same logged metrics, same final weights."""

import pytest
import torch
from datasets import Dataset

from test_trainer import PROMPTS, text_reward, tiny_args
from trl_diffpo import DiffpoTrainer, SamplerHeadCallback
from trl_diffpo.checkpointing import DIFFPO_STATE_NAME
from trl_diffpo.tiny import build_char_tokenizer, build_tiny_model

# Timing and bookkeeping keys that legitimately differ between two runs.
_UNCOMPARED = {"step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos"}


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def run(tokenizer, output_dir, with_head, resume_from_checkpoint=None, **overrides):
    """Train 4 optimizer steps (GA 2, num_iterations 2: one generation every 2 steps), saving every step."""
    rollouts = []

    def recorded_reward(completions, **kwargs):
        rollouts.append(list(completions))
        return text_reward(completions)

    options = {"save_strategy": "steps", "save_steps": 1, "max_steps": 4}
    callbacks = []
    if with_head:
        options.update(sampler="entropy_bounded", threshold=1.0)
        callbacks.append(SamplerHeadCallback(nfe_penalty=0.5, mlp_hidden_size=8))
    options.update(overrides)
    trainer = DiffpoTrainer(
        model=build_tiny_model(tokenizer, architecture="llama", hidden_size=32, num_layers=1, seed=1),
        reward_funcs=recorded_reward,
        args=tiny_args(output_dir, **options),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    steps = {entry["step"]: entry for entry in trainer.state.log_history if "loss" in entry}
    weights = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    return trainer, rollouts, steps, weights


@pytest.mark.parametrize("with_head", [False, True], ids=["fixed_sampler", "sampler_head"])
def test_resume_from_boundary_and_mid_cycle_reproduces_the_run(tokenizer, tmp_path, with_head):
    full, full_rollouts, full_steps, full_weights = run(tokenizer, tmp_path / "full", with_head)
    assert len(full_rollouts) == 2  # generations at steps 1 and 3
    assert sorted(full_steps) == [1, 2, 3, 4]
    for checkpoint, generations_after in (("checkpoint-2", 1), ("checkpoint-1", 1)):
        folder = tmp_path / "full" / checkpoint
        assert (folder / DIFFPO_STATE_NAME).exists()
        state = torch.load(folder / DIFFPO_STATE_NAME, weights_only=True)
        assert (state["buffered_inputs"] is None) == (checkpoint == "checkpoint-2")  # boundary: nothing buffered
        _, rollouts, steps, weights = run(tokenizer, tmp_path / checkpoint, with_head, str(folder))
        assert rollouts == full_rollouts[-generations_after:], checkpoint  # no regeneration mid-cycle
        assert sorted(steps) == [1, 2, 3, 4]  # the checkpoint's log history, then the resumed steps
        for step, entry in steps.items():
            for key, value in entry.items():
                if key not in _UNCOMPARED:
                    assert value == full_steps[step][key], (checkpoint, step, key)
        for name, value in full_weights.items():
            assert torch.equal(weights[name], value), (checkpoint, name)
