"""Exact resume: a run resumed from any checkpoint (a generation boundary or inside a generation cycle) reproduces
the uninterrupted run bit for bit on CPU: same rollouts, same logged metrics, same final weights."""

import json
import logging
import os

import pytest
import torch
from datasets import Dataset

from test_trainer import PROMPTS, text_reward, tiny_args
from trl_diffpo import DiffpoTrainer, SamplerHeadCallback
from trl_diffpo.checkpointing import DIFFPO_STATE_NAME, resolve_resume_checkpoint
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
        features = "state" if with_head == "state" else "prompt"  # "state": a threshold per denoising step
        callbacks.append(SamplerHeadCallback(nfe_penalty=0.5, mlp_hidden_size=8, features=features))
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


def assert_same_run(full, resumed, label):
    _, full_rollouts, full_steps, full_weights = full
    _, rollouts, steps, weights = resumed
    assert rollouts == full_rollouts[len(full_rollouts) - len(rollouts) :], label
    assert sorted(steps) == sorted(full_steps), label  # the checkpoint's log history, then the resumed steps
    for step, entry in steps.items():
        for key, value in entry.items():
            if key not in _UNCOMPARED and not key.endswith("/time_s"):  # wall-clock reward timings
                assert value == full_steps[step][key], (label, step, key)
    for name, value in full_weights.items():
        assert torch.equal(weights[name], value), (label, name)


# 6 steps over 2 epochs of 4 steps; a generation every 2 steps (at steps 1, 3, 5). checkpoint-N is written after
# step N: 1, 3 and 5 fall inside a generation cycle, 2 on a boundary, 4 at the end of an epoch.
@pytest.mark.parametrize(
    ("with_head", "checkpoints"),
    [(False, (1, 2, 4, 5)), (True, (1, 2)), ("state", (1, 2))],
    ids=["fixed_sampler", "sampler_head", "state_sampler_head"],
)
def test_resume_from_any_checkpoint_reproduces_the_run(tokenizer, tmp_path, with_head, checkpoints):
    max_steps = 6 if not with_head else 4
    full = run(tokenizer, tmp_path / "full", with_head, max_steps=max_steps)
    assert len(full[1]) == max_steps // 2
    for number in checkpoints:
        folder = tmp_path / "full" / f"checkpoint-{number}"
        state = torch.load(folder / DIFFPO_STATE_NAME, weights_only=True)
        assert (state["buffered_inputs"] is None) == (number % 2 == 0)  # a boundary buffers nothing
        resumed = run(tokenizer, tmp_path / f"resumed-{number}", with_head, str(folder), max_steps=max_steps)
        assert len(resumed[1]) == (max_steps - number) // 2  # no regeneration inside a cycle
        assert_same_run(full, resumed, f"checkpoint-{number}")


def test_resume_checkpoint_words(tmp_path):
    assert resolve_resume_checkpoint(None, str(tmp_path)) is None
    for word in (False, "", "false", "None"):
        assert resolve_resume_checkpoint(word, str(tmp_path)) is None
    with pytest.raises(ValueError, match=r"resumes the last checkpoint-N folder in output_dir=.*but there is none"):
        resolve_resume_checkpoint("true", str(tmp_path))
    for number in (3, 12):
        (tmp_path / f"checkpoint-{number}").mkdir()
    for word in (True, "true", "True", "latest", "LAST"):
        assert resolve_resume_checkpoint(word, str(tmp_path)) == str(tmp_path / "checkpoint-12")
    assert resolve_resume_checkpoint(str(tmp_path / "checkpoint-3"), "elsewhere") == str(tmp_path / "checkpoint-3")
    with pytest.raises(ValueError, match=r"resume_from_checkpoint='nowhere' is not a folder.*true/latest/last"):
        resolve_resume_checkpoint("nowhere", str(tmp_path))


def test_true_resumes_the_last_checkpoint_and_one_line_names_what_was_restored(tokenizer, tmp_path, caplog):
    run(tokenizer, tmp_path, with_head=True, max_steps=3)  # checkpoints 1, 2, 3; 3 is inside a generation cycle
    with caplog.at_level(logging.WARNING):
        trainer, rollouts, _, _ = run(tokenizer, tmp_path, with_head=True, resume_from_checkpoint="true", max_steps=4)
    assert trainer.state.global_step == 4 and rollouts == []  # step 4 finishes the cycle from the buffered batch
    lines = [r.getMessage() for r in caplog.records if "Resumed from" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].endswith(
        f"Resumed from {tmp_path / 'checkpoint-3'} at global step 3 (TRL micro-step 6): restored model weights "
        "(model.safetensors), optimizer, LR scheduler, sampler head, global RNGs (python, numpy, torch), surrogate "
        "RNG, rollout RNG, data order, buffered generation batch (micro-step 2), sampler-head rollout state."
    )


def test_a_checkpoint_without_diffpo_state_resumes_and_says_what_is_missing(tokenizer, tmp_path, caplog):
    run(tokenizer, tmp_path / "full", with_head=False, max_steps=2)
    checkpoint = tmp_path / "full" / "checkpoint-2"
    os.remove(checkpoint / DIFFPO_STATE_NAME)  # as written by an older trl-diffpo
    with caplog.at_level(logging.WARNING):
        run(tokenizer, tmp_path / "resumed", with_head=False, resume_from_checkpoint=str(checkpoint), max_steps=3)
    messages = [r.getMessage() for r in caplog.records]
    assert any("has no diffpo_state.pt: the rollout and surrogate random streams restart" in m for m in messages)
    assert any(m.endswith("not in the checkpoint: DiFFPO RNG streams and generation cycle.") for m in messages)


def test_cli_resume_from_checkpoint_true(tmp_path):
    from test_cli import TINY
    from trl_diffpo.scripts.train import main

    argv = ["--config", str(TINY), "--output_dir", str(tmp_path), "--save_strategy", "steps", "--save_steps", "1"]
    assert main([*argv, "--max_steps", "1"]) == 0
    assert main([*argv, "--max_steps", "2", "--resume_from_checkpoint", "true"]) == 0  # was: "Can't find a valid
    state = json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())  # checkpoint at true"
    assert state["global_step"] == 2 and [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2]
