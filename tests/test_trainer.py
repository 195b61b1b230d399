"""DiffpoTrainer on tiny CPU models: exact first-step gradient, shared draws, LoRA, sampler-head hooks, a training
matrix over samplers x likelihoods x IS modes x loss types, backbones, rewards and refusals."""

import math
import os
from collections import defaultdict

import pytest
import torch
from datasets import Dataset
from torch import nn
from transformers import TrainerCallback
from trl import GRPOConfig

from trl_diffpo import DiffpoConfig, DiffpoTrainer
from trl_diffpo.backbones import get_backbone
from trl_diffpo.likelihood import surrogate_log_probs
from trl_diffpo.tiny import build_tiny_model

PROMPTS = ["1+2=", "hello:", "abc", "7*3=", "x", "(4)", "zz:", "9-1="]
ADAPTIVE_THRESHOLDS = {"confidence_threshold": 0.05, "entropy_bounded": 5.0}


def text_reward(completions, **kwargs):
    """A deterministic reward that varies with the text (so groups have non-zero advantages)."""
    return [float(sum(ord(ch) for ch in text) % 7) for text in completions]


def tiny_args(tmp_path, **overrides):
    values = {
        "output_dir": str(tmp_path),
        "bf16": False,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1,
        "max_completion_length": 8,
        "block_length": 4,
        "diffusion_steps": 4,
        "per_device_train_batch_size": 4,
        "num_generations": 2,
        "gradient_accumulation_steps": 2,
        "num_iterations": 2,
        "max_steps": 2,
        "learning_rate": 1e-2,
        "beta": 0.0,
        "seed": 0,
    }
    values.update(overrides)
    if values.get("sampler") in ADAPTIVE_THRESHOLDS:
        values.setdefault("threshold", ADAPTIVE_THRESHOLDS[values["sampler"]])
    return DiffpoConfig(**values)


def make_trainer(tokenizer, tmp_path, model=None, architecture="llama", reward=text_reward, prompts=PROMPTS, **kw):
    trainer_kwargs = {key: kw.pop(key) for key in ("peft_config", "callbacks") if key in kw}
    model = model or build_tiny_model(tokenizer, architecture=architecture, hidden_size=32, num_layers=1, seed=1)
    return DiffpoTrainer(
        model=model,
        reward_funcs=reward,
        args=tiny_args(tmp_path, **kw),
        train_dataset=Dataset.from_dict({"prompt": list(prompts)}),
        processing_class=tokenizer,
        **trainer_kwargs,
    )


def snapshot(module):
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def changed(before, module):
    return {name for name, p in module.named_parameters() if name in before and not torch.equal(before[name], p)}


def logged(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]


class FakeHead(nn.Linear):
    """A linear 'sampler head' whose deterministic prediction is a constant threshold."""

    def __init__(self, hidden, value):
        super().__init__(hidden, 1)
        self.value = value

    def predict_threshold(self, prompt_hidden):
        return torch.full((prompt_hidden.shape[0],), self.value, device=prompt_hidden.device)


class FakeSamplerHeadCallback(TrainerCallback):
    """Implements the trainer <-> sampler-head contract with a constant threshold and a linear head."""

    is_sampler_head_callback = True

    def __init__(self, threshold=0.05):
        self.threshold = threshold
        self.calls = defaultdict(list)

    def setup(self, trainer):
        self.calls["setup"].append(trainer)
        self.head = FakeHead(trainer.model.config.hidden_size, self.threshold)
        trainer.model.diffpo_sampler_head = self.head

    def threshold_fn(self, prompt_hidden):
        self.calls["threshold_fn"].append(prompt_hidden.shape)
        return torch.full((prompt_hidden.shape[0],), self.threshold, device=prompt_hidden.device)

    def sampler_advantages(self, rewards, nfe, gen_length, num_generations):
        self.calls["sampler_advantages"].append((rewards.clone(), nfe.clone(), gen_length, num_generations))
        score = torch.nan_to_num(rewards) - nfe.float() / gen_length
        grouped = score.view(-1, num_generations)
        return (grouped - grouped.mean(1, keepdim=True)).view(-1)

    def head_loss(self, prompt_hidden, threshold, advantages):
        self.calls["head_loss"].append((prompt_hidden.shape, threshold.clone(), advantages.clone()))
        prediction = self.head(prompt_hidden.float()).squeeze(-1)
        loss = ((prediction - threshold) ** 2 * (1 + advantages.abs())).mean()
        return loss, {"fit": loss.item()}

    def save_head(self, output_dir):
        self.calls["save_head"].append(output_dir)
        torch.save(self.head.state_dict(), os.path.join(output_dir, "fake_head.pt"))


@pytest.fixture(scope="module")
def tokenizer():
    from trl_diffpo.tiny import build_char_tokenizer

    return build_char_tokenizer()


# ------------------------------------------------------------------------------------------- the first step exactly


@pytest.mark.parametrize("bias_corrected_kl", [False, True])
def test_first_step_ratio_is_one_and_gradient_matches_hand_computation(tokenizer, tmp_path, bias_corrected_kl):
    beta = 0.04

    def alternating_reward(completions, **kwargs):  # the two completions of the group always differ in reward
        return [float(i % 2) for i in range(len(completions))]

    trainer = make_trainer(
        tokenizer, tmp_path, prompts=["1+2="], reward=alternating_reward, per_device_train_batch_size=2, gradient_accumulation_steps=1,
        num_iterations=1, max_steps=1, beta=beta, loss_type="grpo", max_grad_norm=0.0, p_mask_prompt=0.3,
        temperature=0.9, is_clamp=1.0, use_bias_correction_kl=bias_corrected_kl, seed=1,
    )  # fmt: skip
    # A fresh copy (not `deepcopy(trainer.model)`: TRL's patched `forward` would still call the trained model).
    initial = build_tiny_model(tokenizer, hidden_size=32, num_layers=1, seed=1)
    initial.load_state_dict(trainer.model.state_dict())
    with torch.no_grad():  # move the reference away from the policy so that the KL term has a gradient
        generator = torch.Generator().manual_seed(0)
        for parameter in trainer.ref_model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    seen = {}
    compute_loss = trainer.compute_loss

    def recording_compute_loss(model, inputs, *args, **kwargs):
        seen["inputs"] = inputs
        return compute_loss(model, inputs, *args, **kwargs)

    get_logps = trainer._get_per_token_logps_and_entropies

    def recording_logps(*args, **kwargs):
        result = get_logps(*args, **kwargs)
        seen["current"] = result[0].detach().clone()
        return result

    class GradientCatcher(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            seen["grads"] = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}

    trainer.compute_loss = recording_compute_loss
    trainer._get_per_token_logps_and_entropies = recording_logps
    trainer.add_callback(GradientCatcher())
    trainer.train()

    inputs = seen["inputs"]
    width = inputs["completion_ids"].shape[1]
    # One inner iteration, generation aligned with the optimizer step: the old log-probs are the detached current
    # ones, taken from the training forward itself (no separate no-grad forward, nothing stored in the batch).
    assert "diffpo_old_logps" not in inputs and "diffpo_is_weight" not in inputs
    old = seen["current"]
    mask = inputs["completion_mask"].float()
    assert inputs["advantages"].abs().sum() > 0
    assert not trainer.use_vllm and "importance_sampling_ratio" not in inputs, "TRL's vLLM IS must stay off"

    # Hand computation of the GRPO loss with the folded IS weight and the KL term, on the initial model.
    logps, _ = surrogate_log_probs(
        get_backbone(initial), inputs["diffpo_sequences"], inputs["diffpo_prompt_mask"], inputs["diffpo_unmask_step"],
        inputs["diffpo_prompt_noise"][:, 0], inputs["diffpo_stage_starts"][:, 0], temperature=0.9,
    )  # fmt: skip
    logps = logps[:, :width]
    weight = torch.exp(old - inputs["diffpo_behaviour_logps"][:, :width]).clamp(max=1.0)
    ref = inputs["diffpo_ref_logps"][:, 0, :width]
    ratio = torch.exp(logps - logps.detach())
    kl = torch.exp(ref - logps) - (ref - logps) - 1
    if bias_corrected_kl:  # TRL's option: the KL term times the (differentiable) policy ratio, not the IS weight
        kl = kl * ratio
    per_token = -ratio * weight * inputs["advantages"][:, None] + beta * kl
    loss = ((per_token * mask).sum(-1) / mask.sum(-1)).mean()
    loss.backward()
    expected = {n: p.grad for n, p in initial.named_parameters() if p.grad is not None}
    assert set(expected) == set(seen["grads"])
    for name, grad in expected.items():
        torch.testing.assert_close(seen["grads"][name], grad, atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    assert torch.isclose(torch.tensor(logged(trainer, "loss")[0]), loss.detach(), atol=1e-6)
    assert logged(trainer, "kl")[0] > 0 and (weight < 1).any() and (weight == 1.0).any(), "KL and clamp are exercised"


# --------------------------------------------------------------------------------- draws shared by old / ref / current


def test_old_reference_and_current_see_identical_masked_inputs(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, beta=0.04, p_mask_prompt=0.5, likelihood="two_stage")
    assert trainer.ref_model is not None and trainer.ref_model is not trainer.model
    phase = {}
    rows = defaultdict(list)

    def hook(module, args, kwargs):
        if "label" in phase:
            rows[phase["label"]].extend(tuple(r) for r in kwargs["input_ids"].tolist())

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in (trainer.model, trainer.ref_model)]
    surrogate = trainer._surrogate

    def labelled(model, context, iteration, *args, **kwargs):
        kind = "ref" if model is trainer.ref_model else ("current" if torch.is_grad_enabled() else "old")
        phase["label"] = (kind, iteration)
        try:
            return surrogate(model, context, iteration, *args, **kwargs)
        finally:
            phase.pop("label")

    trainer._surrogate = labelled
    trainer.train()
    for handle in handles:
        handle.remove()
    for iteration in range(2):
        old, ref, current = (sorted(rows[(kind, iteration)]) for kind in ("old", "ref", "current"))
        assert old and old == ref == current, f"iteration {iteration}: masked inputs differ"
        assert any(trainer.mask_token_id in row[:6] for row in old), "prompt noise should mask some prompt tokens"
    assert sorted(rows[("old", 0)]) != sorted(rows[("old", 1)]), "each inner iteration draws its own randomness"


# ------------------------------------------------------------------------------------------------ LoRA + sampler head


def test_lora_trains_only_adapter_and_head_and_reference_is_adapter_disabled(tokenizer, tmp_path):
    from peft import LoraConfig

    head = FakeSamplerHeadCallback(threshold=0.05)
    trainer = make_trainer(
        tokenizer, tmp_path, beta=0.04, sampler="confidence_threshold", callbacks=[head],
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )  # fmt: skip
    assert len(head.calls["setup"]) == 1 and head.calls["setup"][0] is trainer
    assert trainer.ref_model is None
    before = snapshot(trainer.model)
    trainer.train()
    moved = changed(before, trainer.model)
    assert moved, "nothing trained"
    assert all("lora_" in name or "diffpo_sampler_head" in name for name in moved), moved
    assert any("diffpo_sampler_head" in name for name in moved), "the head loss must reach the head"
    assert any("lora_" in name for name in moved)

    # The hooks ran at their documented points with the documented shapes.
    assert head.calls["threshold_fn"] and all(shape == (8, 32) for shape in head.calls["threshold_fn"])
    rewards, nfe, gen_length, num_generations = head.calls["sampler_advantages"][0]
    assert rewards.shape == nfe.shape == (8,) and (gen_length, num_generations) == (8, 2)
    assert len(head.calls["head_loss"]) == 4  # one per micro-step
    for hidden_shape, threshold, advantages in head.calls["head_loss"]:
        assert hidden_shape == (4, 32) and torch.allclose(threshold, torch.full_like(threshold, 0.05))
        assert advantages.shape == (4,)
    assert logged(trainer, "sampler_head/fit") and logged(trainer, "diffusion/threshold/mean")[0] == pytest.approx(
        0.05
    )

    # The reference log-probs are those of the adapter-disabled model.
    inputs = trainer._buffered_inputs[0]
    with torch.no_grad(), trainer.model.disable_adapter():
        for iteration in range(2):
            expected, _ = surrogate_log_probs(
                get_backbone(trainer.model), inputs["diffpo_sequences"], inputs["diffpo_prompt_mask"],
                inputs["diffpo_unmask_step"], inputs["diffpo_prompt_noise"][:, iteration],
                inputs["diffpo_stage_starts"][:, iteration], temperature=trainer.temperature,
            )  # fmt: skip
            torch.testing.assert_close(inputs["diffpo_ref_logps"][:, iteration], expected, atol=1e-6, rtol=1e-6)

    trainer.save_model(str(tmp_path / "final"))
    assert head.calls["save_head"][-1] == str(tmp_path / "final")
    assert (tmp_path / "final" / "fake_head.pt").exists() and (tmp_path / "final" / "adapter_config.json").exists()


def test_full_finetune_reference_is_a_frozen_copy(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, beta=0.1, save_strategy="steps", save_steps=2)
    reference_before = snapshot(trainer.ref_model)
    policy_before = snapshot(trainer.model)
    trainer.train()
    assert (tmp_path / "checkpoint-2" / "model.safetensors").exists()
    assert "DiFFPO" in (tmp_path / "README.md").read_text()
    assert not changed(reference_before, trainer.ref_model)
    assert changed(policy_before, trainer.model)
    assert all(math.isfinite(k) for k in logged(trainer, "kl")) and max(logged(trainer, "kl")) > 0


# ---------------------------------------------------------------------------------------------- training matrix

SAMPLERS = ["low_confidence", "random", "confidence_threshold", "entropy_bounded"]
LIKELIHOODS = [("mean_field", None), ("two_stage", None), ("k_stage", 3)]
IS_MODES = ["token", "sequence", "none"]
LOSS_TYPES = ["grpo", "dapo", "dr_grpo"]
# Full cross-product of sampler x likelihood x IS mode; the loss type follows a Latin square so that every loss type
# meets every sampler, every likelihood and every IS mode.
MATRIX = [
    (sampler, likelihood, num_stages, is_mode, LOSS_TYPES[(s + k + i) % 3])
    for s, sampler in enumerate(SAMPLERS)
    for k, (likelihood, num_stages) in enumerate(LIKELIHOODS)
    for i, is_mode in enumerate(IS_MODES)
]


@pytest.mark.parametrize(("sampler", "likelihood", "num_stages", "is_correction", "loss_type"), MATRIX)
def test_training_matrix(tokenizer, tmp_path, sampler, likelihood, num_stages, is_correction, loss_type):
    trainer = make_trainer(
        tokenizer, tmp_path, sampler=sampler, likelihood=likelihood, num_stages=num_stages,
        is_correction=is_correction, loss_type=loss_type, temperature=0.9,
    )  # fmt: skip
    before = snapshot(trainer.model)
    trainer.train()
    losses = logged(trainer, "loss")
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert changed(before, trainer.model), "parameters did not move"
    for key in (
        "diffusion/nfe/mean", "diffusion/nfe/min", "diffusion/nfe/max", "diffusion/tokens_per_step",
        "diffpo/is_weight/mean", "diffpo/is_weight/max", "diffpo/is_weight/clamped_frac", "diffpo/logp_gap/mean",
        "diffpo/tau/mean", "diffpo/surrogate_forwards", "entropy",
    ):  # fmt: skip
        values = logged(trainer, key)
        assert values and all(math.isfinite(v) for v in values), key
    weights = logged(trainer, "diffpo/is_weight/max")[0]
    if is_correction == "none":
        assert weights == 1.0
    assert 0 < weights <= trainer.args.is_clamp + 1e-6
    if sampler in ADAPTIVE_THRESHOLDS:
        assert logged(trainer, "diffusion/threshold/mean")[0] == pytest.approx(ADAPTIVE_THRESHOLDS[sampler])
    else:
        assert not logged(trainer, "diffusion/threshold/mean"), "fixed samplers have no threshold to log"
        assert 1 <= logged(trainer, "diffusion/nfe/min")[0] <= logged(trainer, "diffusion/nfe/max")[0] <= 4
        assert logged(trainer, "diffusion/nfe/max")[0] == 4 or trainer.args.stop_at_eos  # 4 steps unless an EOS
    if likelihood == "mean_field":
        assert logged(trainer, "diffpo/tau/mean")[0] == 0 and logged(trainer, "diffpo/surrogate_forwards")[0] == 1


@pytest.mark.parametrize("bf16", [False, True])
def test_exact_surrogate_in_the_trainer_has_unit_is_weights(tokenizer, tmp_path, bf16):
    """k_stage with K >= T and no prompt noise: the old surrogate equals the behaviour log-probs, so w == 1 (also
    under CPU bf16 autocast: rollout and surrogate forwards round alike)."""
    trainer = make_trainer(
        tokenizer, tmp_path, likelihood="k_stage", num_stages=8, p_mask_prompt=0.0, max_steps=1,
        gradient_accumulation_steps=1, num_iterations=1, sampler="entropy_bounded", threshold=3.0,
        bf16=bf16, use_cpu=True,
    )  # fmt: skip
    trainer.train()
    assert logged(trainer, "diffpo/is_weight/mean")[0] == pytest.approx(1.0, abs=1e-5)
    assert abs(logged(trainer, "diffpo/logp_gap/mean")[0]) < 1e-5


# ---------------------------------------------------------------------------------------------------- backbones


@pytest.mark.parametrize("architecture", ["bert", "qwen3", "modernbert"])
def test_other_backbones_train(tokenizer, tmp_path, architecture):
    model = build_tiny_model(tokenizer, architecture=architecture, hidden_size=32, num_layers=1, seed=1)
    if architecture == "bert":  # no generation_config, no gradient checkpointing support, no lm_head
        model.generation_config = None
        model.supports_gradient_checkpointing = False
        assert not hasattr(model, "lm_head")
    trainer = make_trainer(tokenizer, tmp_path, model=model, max_steps=1, num_iterations=1, beta=0.04)
    if architecture == "bert":
        assert not trainer.args.gradient_checkpointing
    before = snapshot(trainer.model)
    trainer.train()
    assert changed(before, trainer.model)
    assert all(math.isfinite(v) for v in logged(trainer, "loss"))


# ------------------------------------------------------------------------------------------------------ rewards


def test_nfe_and_threshold_reach_reward_functions(tokenizer, tmp_path):
    seen = []

    def reward(completions, nfe, threshold, **kwargs):
        seen.append((list(nfe), list(threshold)))
        return text_reward(completions)

    trainer = make_trainer(
        tokenizer, tmp_path, reward=reward, sampler="entropy_bounded", max_steps=1, num_iterations=1,
        gradient_accumulation_steps=1,
    )  # fmt: skip
    trainer.train()
    nfe, threshold = seen[0]
    assert len(nfe) == 4 and all(isinstance(n, int) and 2 <= n <= 8 for n in nfe)
    assert threshold == [pytest.approx(ADAPTIVE_THRESHOLDS["entropy_bounded"])] * 4


def test_raising_reward_names_the_function(tokenizer, tmp_path):
    def broken_reward(completions, **kwargs):
        raise KeyError("answer")

    trainer = make_trainer(tokenizer, tmp_path, reward=broken_reward, max_steps=1)
    with pytest.raises(RuntimeError, match="broken_reward.*KeyError"):
        trainer.train()


def test_infinite_reward_is_refused(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, reward=lambda completions, **kw: [math.inf] * len(completions))
    with pytest.raises(ValueError, match="infinite reward"):
        trainer.train()


def test_missing_rewards_are_counted(tokenizer, tmp_path):
    def partial_reward(completions, **kwargs):
        return [float("nan") if i % 2 else None if i % 4 == 2 else 1.0 for i in range(len(completions))]

    trainer = make_trainer(tokenizer, tmp_path, reward=partial_reward, max_steps=1, num_iterations=1)
    trainer.train()
    assert logged(trainer, "rewards/partial_reward/missing_frac")[0] == pytest.approx(0.75)
    assert logged(trainer, "rewards/unscorable_frac")[0] == pytest.approx(0.75)
    assert all(math.isfinite(v) for v in logged(trainer, "loss"))


# ----------------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tools": [print]}, "`tools`"),
        ({"rollout_func": lambda prompts, trainer: {}}, "`rollout_func`"),
        ({"environment_factory": object}, "`environment_factory`"),
    ],
)
def test_refused_trainer_arguments(tokenizer, tmp_path, kwargs, message):
    model = build_tiny_model(tokenizer, hidden_size=32, num_layers=1)
    with pytest.raises(ValueError, match=message):
        DiffpoTrainer(model=model, reward_funcs=text_reward, args=tiny_args(tmp_path), **kwargs)


def test_refuses_a_grpo_config(tokenizer, tmp_path):
    model = build_tiny_model(tokenizer, hidden_size=32, num_layers=1)
    args = GRPOConfig(output_dir=str(tmp_path), bf16=False, per_device_train_batch_size=4, num_generations=2)
    with pytest.raises(TypeError, match="DiffpoConfig"):
        DiffpoTrainer(model=model, reward_funcs=text_reward, args=args)


def test_refuses_a_sampler_head_with_a_fixed_sampler(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="adaptive sampler"):
        make_trainer(tokenizer, tmp_path, callbacks=[FakeSamplerHeadCallback()])


def test_refuses_fp32_head_cast_without_lm_head(tokenizer, tmp_path):
    model = build_tiny_model(tokenizer, architecture="bert", hidden_size=32, num_layers=1)
    with pytest.raises(ValueError, match="lm_head"):
        make_trainer(tokenizer, tmp_path, model=model, cast_lm_head_to_fp32=True)


def test_refuses_a_causal_model(tokenizer, tmp_path):
    model = build_tiny_model(tokenizer, hidden_size=32, num_layers=1)
    model.config.is_causal = True
    with pytest.raises(ValueError, match="attends causally"):
        make_trainer(tokenizer, tmp_path, model=model)


# ------------------------------------------------------------------------------- eval, loading by path, padding


def test_evaluation_uses_one_draw_and_logs_diffusion_metrics(tokenizer, tmp_path):
    model = build_tiny_model(tokenizer, hidden_size=32, num_layers=1, seed=1)
    trainer = DiffpoTrainer(
        model=model,
        reward_funcs=text_reward,
        args=tiny_args(
            tmp_path, max_steps=1, eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=4, beta=0.04
        ),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        eval_dataset=Dataset.from_dict({"prompt": PROMPTS[:4]}),
        processing_class=tokenizer,
    )
    batches = []
    generate_and_score = trainer._generate_and_score_completions

    def recording(inputs):
        batches.append(generate_and_score(inputs))
        return batches[-1]

    trainer._generate_and_score_completions = recording
    metrics = trainer.evaluate()
    assert batches and all(b["diffpo_stage_starts"].shape[1] == 1 for b in batches), (
        "eval draws once, not per iteration"
    )
    assert all(b["diffpo_ref_logps"].shape[1] == 1 for b in batches)
    assert math.isfinite(metrics["eval_loss"])
    assert metrics["eval_diffusion/nfe/mean"] == 4 and "eval_diffpo/is_weight/mean" in metrics


@pytest.mark.parametrize("architecture", ["llama", "bert"])
def test_model_given_by_path(tokenizer, tmp_path, architecture):
    """A model id / folder is loaded as GRPOTrainer does; a BERT-style model gets a generation config."""
    folder = tmp_path / "model"
    build_tiny_model(tokenizer, architecture=architecture, hidden_size=32, num_layers=1).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    trainer = DiffpoTrainer(
        model=str(folder),
        reward_funcs=text_reward,
        args=tiny_args(tmp_path / "out", max_steps=1, num_iterations=1, beta=0.04),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
    )
    assert trainer.ref_model is not None and trainer.model.generation_config is not None
    trainer.train()
    assert all(math.isfinite(v) for v in logged(trainer, "loss"))


def test_completion_tensors_padded_beyond_the_canvas(tokenizer, tmp_path):
    """With pad_to_multiple_of, TRL's completion tensors are wider than the canvas: log-probs are padded to fit."""
    trainer = make_trainer(tokenizer, tmp_path, pad_to_multiple_of=16, max_steps=1, num_iterations=1, beta=0.04)
    trainer.train()
    inputs = trainer._buffered_inputs[0]
    assert inputs["completion_ids"].shape[1] == 16 and inputs["diffpo_unmask_step"].shape[1] == 8
    assert all(math.isfinite(v) for v in logged(trainer, "loss"))


def test_rollouts_and_draws_are_reproducible_from_the_seeds(tokenizer, tmp_path):
    def first_batch(**overrides):
        trainer = make_trainer(tokenizer, tmp_path, max_steps=1, num_iterations=2, learning_rate=0.0, **overrides)
        trainer.train()
        return trainer._buffered_inputs[0]

    first, again = first_batch(), first_batch()
    for key in ("diffpo_sequences", "diffpo_unmask_step", "diffpo_stage_starts", "diffpo_prompt_noise"):
        assert torch.equal(first[key], again[key]), key
    other = first_batch(surrogate_seed=123)
    assert torch.equal(first["diffpo_sequences"], other["diffpo_sequences"]), (
        "the surrogate seed must not move rollouts"
    )
    assert not torch.equal(first["diffpo_stage_starts"], other["diffpo_stage_starts"])
