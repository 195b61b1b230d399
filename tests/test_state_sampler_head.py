"""The state-dependent threshold policy (``SamplerHeadConfig(features="state")``): step features, the recorded
decisions of ``diffusion_generate(step_threshold_fn=...)``, the per-decision loss and training inside DiffpoTrainer."""

import json
import math

import pytest
import torch

from test_sampler_head import diffpo_head_callback, fake_trainer, make_diffpo_trainer, make_head
from trl_diffpo.generation import diffusion_generate, policy_log_softmax
from trl_diffpo.sampler_head import HEAD_CONFIG_NAME, SamplerHeadCallback, load_sampler_head, save_sampler_head
from trl_diffpo.step_features import NUM_STEP_FEATURES, STEP_FEATURE_NAMES
from trl_diffpo.tiny import build_tiny_model

HIDDEN = 16
PROMPTS = ["Q:1+2=\nA:", "7*3=", "hello there:", "x"]  # different lengths: left padding


@pytest.fixture(scope="module")
def model(char_tokenizer):
    return build_tiny_model(char_tokenizer, architecture="llama", hidden_size=32, num_layers=1, seed=1).eval()


def decode_options(tokenizer, **overrides):
    options = {"gen_length": 12, "block_length": 4, "sampler": "entropy_bounded"}
    options["mask_token_id"] = tokenizer.mask_token_id
    options.update(overrides)
    return options


def decode(model, batch, step_threshold_fn, **options):
    """``diffusion_generate`` of a tokenized batch with a step policy."""
    return diffusion_generate(
        model, batch.input_ids, batch.attention_mask, step_threshold_fn=step_threshold_fn, **options
    )


def state_loss(callback, prompt_hidden, step_threshold, advantages, step_features, step_valid):
    """``head_loss`` of recorded decisions (the row threshold is their mean, as in the trace)."""
    row_threshold = torch.where(step_valid, step_threshold, float("nan")).nanmean(1)
    return callback.head_loss(
        prompt_hidden,
        row_threshold,
        advantages,
        step_features=step_features,
        step_threshold=step_threshold,
        step_valid=step_valid,
    )


def vary_prompt_part(head):
    """Give the MLP's output layer weights, so different prompts get different thresholds."""
    layer = head.mlp[-1]
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(-2, 2, layer.weight.numel()).view_as(layer.weight))
    return head


def set_step_weights(head, step_weights):
    with torch.no_grad():
        head.step_layer.weight.copy_(torch.as_tensor(step_weights, dtype=torch.float32).view(1, -1))
    return head


def state_head(input_size=32, step_weights=None, **options):
    """A state head (entropy bound in [0, 20]: the tiny model's near-uniform tokens have ~4.5 nats each, so the bound
    commits 1 to 4 tokens a step) with varied prompt part and, if given, these step-layer weights."""
    head = make_head(input_size=input_size, features="state", threshold_max=20.0, init_threshold=6.0, **options)
    vary_prompt_part(head)
    return head if step_weights is None else set_step_weights(head, step_weights)


# Step-layer weights under which the rows of PROMPTS decode at different paces (rows sit in different blocks).
VARYING_STEP_WEIGHTS = [0.3, -0.6, 0.9, 0.6, -0.45, 0.3, -0.9, 0.75]


def test_feature_names_and_config_round_trip():
    assert len(STEP_FEATURE_NAMES) == NUM_STEP_FEATURES == 8
    head = state_head()
    assert head.config.features == "state" and head.config.state_dependent
    assert make_head().config.features == "prompt"
    with pytest.raises(ValueError, match="features='bogus'"):
        make_head(features="bogus")


def test_zero_step_layer_gives_exactly_the_prompt_heads_thresholds(model, char_tokenizer):
    prompt = make_head(input_size=32, threshold_max=20.0, init_threshold=6.0, init_seed=3)
    vary_prompt_part(prompt)  # a trained-looking prompt part, the same in both heads
    state = state_head(init_seed=3)
    batch = char_tokenizer(PROMPTS, return_tensors="pt", padding=True)
    options = decode_options(char_tokenizer)
    by_prompt = diffusion_generate(
        model, batch.input_ids, batch.attention_mask, threshold_fn=prompt.predict_threshold, **options
    )
    by_state = decode(model, batch, state.predict_threshold, **options)
    assert len(set(by_prompt.threshold.tolist())) == len(PROMPTS)  # the prompts do get different thresholds
    for name in ("sequences", "unmask_step", "logprobs", "nfe"):
        assert torch.equal(getattr(by_prompt, name), getattr(by_state, name)), name
    valid = by_state.step_valid
    expected = by_prompt.threshold[:, None].expand_as(valid)
    assert torch.equal(by_state.step_threshold[valid], expected[valid])
    torch.testing.assert_close(by_state.threshold, by_prompt.threshold)
    assert by_prompt.step_features is None and by_prompt.step_threshold is None and by_prompt.step_valid is None


def reference_features(model, tokenizer, input_ids, attention_mask, trace, row, step, block_length, temperature):
    """The step features of ``row`` at its 1-based ``step``, by hand from a full forward of the canvas before it."""
    mask_id = tokenizer.mask_token_id
    prompt_length = input_ids.shape[1]
    gen_length = trace.unmask_step.shape[1]
    completion = trace.sequences[row, prompt_length:].clone()
    completion[trace.unmask_step[row] >= step] = mask_id  # what was still masked before this step
    canvas = torch.cat([input_ids[row], completion])[None]
    mask = torch.cat([attention_mask[row], torch.ones(gen_length, dtype=attention_mask.dtype)])[None]
    with torch.no_grad():
        logits = model(input_ids=canvas, attention_mask=mask).logits[0, prompt_length:]
    logprobs = policy_log_softmax(logits, mask_id, temperature).double()
    masked = [i for i in range(gen_length) if completion[i] == mask_id]
    block = masked[0] // block_length
    in_block = [i for i in masked if i // block_length == block]
    vocab = logprobs.shape[-1]
    entropies, confidences = [], []
    for i in in_block:
        probs = logprobs[i].exp()
        entropies.append(float(-(probs[probs > 0] * logprobs[i][probs > 0]).sum()) / math.log(vocab - 1))
        confidences.append(float(probs.max()))
    return [
        (gen_length - len(masked)) / gen_length,
        block / (gen_length // block_length),
        len(in_block) / block_length,
        sum(entropies) / len(entropies),
        max(entropies),
        min(entropies),
        sum(confidences) / len(confidences),
        max(confidences),
    ]


def test_step_features_match_a_slow_reference_from_a_full_forward(model, char_tokenizer):
    batch = char_tokenizer(PROMPTS, return_tensors="pt", padding=True)
    head = state_head(step_weights=VARYING_STEP_WEIGHTS)
    temperature = 0.3
    trace = decode(
        model,
        batch,
        head.predict_threshold,
        temperature=temperature,
        generator=torch.Generator().manual_seed(0),
        **decode_options(char_tokenizer),
    )
    checked = 0
    for row in range(len(PROMPTS)):
        for step in range(1, int(trace.nfe[row]) + 1):
            expected = reference_features(
                model, char_tokenizer, batch.input_ids, batch.attention_mask, trace, row, step, 4, temperature
            )
            torch.testing.assert_close(
                trace.step_features[row, step - 1].double(),
                torch.tensor(expected, dtype=torch.float64),
                atol=2e-5,
                rtol=1e-4,
            )
            checked += 1
    assert checked == int(trace.nfe.sum()) and checked > 3 * len(PROMPTS)  # several steps per block on average
    assert not trace.step_features[~trace.step_valid].any()  # slots without a decision stay empty


def test_every_decision_is_recorded_at_its_step_with_its_log_prob(model, char_tokenizer):
    """The step policy sees the active rows in order; the trace stores each decision at the row's step - 1, and the
    behaviour head's log-prob of the recorded decisions equals the one of the decisions as drawn."""
    torch.manual_seed(0)
    model_for_head = build_tiny_model(char_tokenizer, architecture="llama", hidden_size=32, num_layers=1, seed=1)
    callback = SamplerHeadCallback(
        features="state", threshold_max=20.0, init_threshold=6.0, sigma=0.8, mlp_hidden_size=8, seed=1
    )
    callback.setup(fake_trainer(model_for_head.train()))
    set_step_weights(vary_prompt_part(callback.head), VARYING_STEP_WEIGHTS)
    policy = callback.step_policy()
    calls = []

    def recording_policy(prompt_hidden, step_features):
        threshold = policy(prompt_hidden, step_features)
        log_prob = callback._behaviour_head.log_prob(prompt_hidden, threshold, step_features=step_features)
        calls.append((step_features.clone(), threshold.clone(), log_prob))
        return threshold

    batch = char_tokenizer(PROMPTS, return_tensors="pt", padding=True)
    trace = decode(
        model,
        batch,
        recording_policy,
        **decode_options(char_tokenizer),
    )
    assert torch.equal(trace.step_valid.sum(1), trace.nfe)
    assert all(bool(trace.step_valid[row, : trace.nfe[row]].all()) for row in range(len(PROMPTS)))
    assert len(calls) == int(trace.nfe.max())
    recomputed = callback.head.log_prob(
        trace.prompt_hidden,
        torch.where(trace.step_valid, trace.step_threshold, 6.0),
        step_features=trace.step_features,
    ).detach()
    for call, (features, threshold, log_prob) in enumerate(calls):
        active = (trace.nfe > call).nonzero().squeeze(1)  # rows still decoding at their step call + 1
        assert torch.equal(trace.step_features[active, call], features)
        assert torch.equal(trace.step_threshold[active, call], threshold)
        torch.testing.assert_close(recomputed[active, call], log_prob, atol=1e-3, rtol=1e-4)
    drawn = torch.cat([threshold for _, threshold, _ in calls])
    assert drawn.unique().numel() == drawn.numel()  # one draw per decision
    mean = torch.where(trace.step_valid, trace.step_threshold, 0.0).sum(1) / trace.nfe
    torch.testing.assert_close(trace.threshold, mean)


@pytest.mark.parametrize("cache", ["none", "dual", "prefix"])
def test_rows_at_different_blocks_with_padding_eos_and_a_cache(model, char_tokenizer, cache):
    batch = char_tokenizer(PROMPTS, return_tensors="pt", padding=True)
    head = state_head(step_weights=VARYING_STEP_WEIGHTS)
    options = decode_options(char_tokenizer, gen_length=16, cache=cache)
    free = decode(model, batch, head.predict_threshold, **options)
    block_position = STEP_FEATURE_NAMES.index("block_position")
    positions = free.step_features[..., block_position]
    common = int(free.nfe.min())
    assert any(positions[:, call].unique().numel() > 1 for call in range(common))  # rows at different blocks
    # an EOS id the rows commit early makes them stop early; the decisions still match the steps taken
    eos = int(free.completion_ids[0, 1])
    stopped = decode(
        model,
        batch,
        head.predict_threshold,
        eos_token_id=eos,
        **options,
    )
    assert bool((stopped.nfe < free.nfe).any())
    for trace in (free, stopped):
        assert torch.equal(trace.step_valid.sum(1), trace.nfe)
        assert trace.step_features.dtype == torch.float32 and trace.step_threshold.shape == (len(PROMPTS), 16)
        features = trace.step_features[trace.step_valid]
        assert bool(((features >= 0) & (features <= 1 + 1e-6)).all())
        assert bool(torch.isnan(trace.step_threshold[~trace.step_valid]).all())


def test_step_threshold_fn_is_exclusive_and_adaptive_only(model, char_tokenizer):
    batch = char_tokenizer(PROMPTS[:1], return_tensors="pt")
    head = state_head()
    with pytest.raises(ValueError, match="pass it alone"):
        diffusion_generate(
            model,
            batch.input_ids,
            step_threshold_fn=head.predict_threshold,
            threshold=0.5,
            **decode_options(char_tokenizer),
        )
    with pytest.raises(ValueError, match="only applies to the adaptive samplers"):
        diffusion_generate(
            model,
            batch.input_ids,
            step_threshold_fn=head.predict_threshold,
            **decode_options(char_tokenizer, sampler="low_confidence", steps=12),
        )
    with pytest.raises(ValueError, match="one threshold per active row"):
        diffusion_generate(
            model,
            batch.input_ids,
            step_threshold_fn=lambda hidden, features: torch.ones(3),
            **decode_options(char_tokenizer),
        )
    with pytest.raises(ValueError, match="features='state'.*step_threshold_fn"):
        diffusion_generate(
            model, batch.input_ids, threshold_fn=head.predict_threshold, **decode_options(char_tokenizer)
        )
    assert head.generate_kwargs() == {"step_threshold_fn": head.predict_threshold}
    assert make_head().generate_kwargs().keys() == {"threshold_fn"}


def test_head_loss_pushes_mu_towards_the_drawn_decisions_and_matches_reference(char_tokenizer):
    model = build_tiny_model(char_tokenizer, architecture="llama", hidden_size=32, num_layers=1, seed=1)
    callback = SamplerHeadCallback(
        features="state", threshold_max=4.0, init_threshold=0.5, sigma=0.5, mlp_hidden_size=8, head_clip_epsilon=None
    )
    callback.setup(fake_trainer(model))
    head = callback.head
    generator = torch.Generator().manual_seed(0)
    prompt_hidden = torch.randn(3, 32, generator=generator)
    features = torch.rand(3, 5, NUM_STEP_FEATURES, generator=generator)
    valid = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        mu = head(prompt_hidden, features)
    drawn = head.threshold_from_u(mu + 1.0)  # every decision drew u one unit above the mean
    recorded = torch.where(valid, drawn, float("nan"))  # the trace's placeholder where there is no decision
    advantages = torch.tensor([1.0, 0.5, 2.0])
    loss, metrics = state_loss(callback, prompt_hidden, recorded, advantages, features, valid)
    log_prob = head.log_prob(prompt_hidden, torch.where(valid, drawn, 0.5), step_features=features)
    per_row = [(advantages[r] * log_prob[r][valid[r]]).mean() for r in range(3)]
    reference = -torch.stack(per_row).mean() * callback.head_loss_weight
    torch.testing.assert_close(loss, reference)
    loss.backward()
    assert head.step_layer.bias.grad.item() < 0  # descending the loss raises mu: towards the drawn u
    assert metrics["decisions_per_row"] == pytest.approx(3.0)
    assert {f"step_weight/{name}" for name in STEP_FEATURE_NAMES} <= metrics.keys()
    assert metrics["threshold_mean"] == pytest.approx(drawn[valid].mean().item())
    head.zero_grad()
    negative, _ = state_loss(callback, prompt_hidden, recorded, -advantages, features, valid)
    negative.backward()
    assert head.step_layer.bias.grad.item() > 0
    with pytest.raises(ValueError, match="needs the rollouts' step_features"):
        callback.head_loss(prompt_hidden, recorded.nanmean(1), advantages)


def test_clipped_state_loss_has_reinforce_gradient_against_a_fresh_snapshot(char_tokenizer):
    model = build_tiny_model(char_tokenizer, architecture="llama", hidden_size=32, num_layers=1, seed=1)
    clipped = SamplerHeadCallback(features="state", threshold_max=4.0, init_threshold=0.5, mlp_hidden_size=8)
    plain = SamplerHeadCallback(
        features="state", threshold_max=4.0, init_threshold=0.5, mlp_hidden_size=8, head_clip_epsilon=None
    )
    for callback in (clipped, plain):
        callback.setup(fake_trainer(model.train()))
    clipped.step_policy()  # draws snapshot the behaviour head
    generator = torch.Generator().manual_seed(1)
    prompt_hidden = torch.randn(2, 32, generator=generator)
    features = torch.rand(2, 4, NUM_STEP_FEATURES, generator=generator)
    threshold = torch.rand(2, 4, generator=generator) * 2 + 0.5
    valid = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    advantages = torch.tensor([1.0, -0.5])
    gradients = []
    for callback in (clipped, plain):
        loss, metrics = state_loss(callback, prompt_hidden, threshold, advantages, features, valid)
        loss.backward()
        gradients.append(torch.cat([p.grad.flatten() for p in callback.head.parameters()]))
    assert metrics.get("ratio_mean") is None  # the plain one
    torch.testing.assert_close(gradients[0], gradients[1])


def test_step_policy_draws_are_seeded_and_eval_uses_the_mean(char_tokenizer):
    model = build_tiny_model(char_tokenizer, architecture="llama", hidden_size=32, num_layers=1, seed=1)
    callback = SamplerHeadCallback(features="state", threshold_max=4.0, init_threshold=0.5, mlp_hidden_size=8, seed=3)
    callback.setup(fake_trainer(model.train()))
    prompt_hidden, features = torch.randn(4, 32), torch.rand(4, NUM_STEP_FEATURES)
    first = callback.step_policy()(prompt_hidden, features)
    callback._noise_step = -1  # a new global step restarts the draw index: the same draws again
    again = callback.step_policy()(prompt_hidden, features)
    assert torch.equal(first, again) and first.unique().numel() == 4
    model.eval()
    mean = callback.step_policy()(prompt_hidden, features)
    assert torch.equal(mean, callback.head.predict_threshold(prompt_hidden, features))


def test_state_head_save_load_round_trip_and_old_files_load_as_prompt_heads(tmp_path):
    head = state_head(input_size=HIDDEN, step_weights=VARYING_STEP_WEIGHTS)
    save_sampler_head(head, tmp_path / "state")
    loaded = load_sampler_head(tmp_path / "state")
    assert loaded.config == head.config and loaded.config.features == "state"
    for name, value in head.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    prompt = make_head(input_size=HIDDEN)
    save_sampler_head(prompt, tmp_path / "old")
    config_path = tmp_path / "old" / HEAD_CONFIG_NAME
    payload = json.loads(config_path.read_text())
    del payload["config"]["features"]  # a file written before the field existed
    config_path.write_text(json.dumps(payload))
    old = load_sampler_head(tmp_path / "old")
    assert old.config.features == "prompt" and old.step_layer is None
    torch.testing.assert_close(old.predict_threshold(torch.randn(3, HIDDEN)), torch.full((3,), 0.1))
    with pytest.raises(ValueError, match="does not match"):  # a prompt checkpoint does not warm-start a state head
        SamplerHeadCallback(features="state", pretrained_head=tmp_path / "old", mlp_hidden_size=8).init_head(HIDDEN)


@pytest.mark.parametrize("mode", ["joint", "sampler_only"])
def test_diffpo_trainer_trains_a_state_head(char_tokenizer, tmp_path, mode):
    callback = diffpo_head_callback(features="state", head_learning_rate=0.2, mode=mode)
    trainer = make_diffpo_trainer(
        char_tokenizer,
        tmp_path,
        callback,
        max_steps=3,
        save_strategy="no",
        per_device_train_batch_size=8,
        num_generations=4,
        num_iterations=2,
    )
    before = {name: value.clone() for name, value in callback.head.state_dict().items()}
    trainer.train()
    assert not torch.equal(callback.head.step_layer.weight, before["step_layer.weight"])  # the step layer learned
    history = trainer.state.log_history
    for metric in (
        "loss",
        "decisions_per_row",
        "threshold_row_std",
        "step_weight/entropy_mean",
        "ratio_mean",
        "corr_threshold_nfe",
    ):
        assert any(f"sampler_head/{metric}" in entry for entry in history), metric
    decisions = [
        entry["sampler_head/decisions_per_row"] for entry in history if "sampler_head/decisions_per_row" in entry
    ]
    assert all(value >= 2 for value in decisions)  # 8 tokens in blocks of 4: at least one decision per block
    trainer.save_model(str(tmp_path / "final"))
    loaded = load_sampler_head(tmp_path / "final")
    assert loaded.config.features == "state"
    assert torch.equal(loaded.step_layer.weight, callback.head.step_layer.weight)


def test_evaluation_decodes_learned_settings_with_the_step_policy(char_tokenizer, model, tmp_path):
    from test_evaluation import GEN_LENGTH, run_eval, sudoku_rows
    from trl_diffpo.sft import left_pad, tokenize_prompts

    head = state_head(step_weights=VARYING_STEP_WEIGHTS)
    results = run_eval(
        char_tokenizer,
        model,
        tmp_path,
        ["entropy_bounded:learned"],
        task="sudoku",
        sampler_head=head,
        keep_completions=True,
    )
    rows = sudoku_rows()
    prompt_ids = tokenize_prompts(char_tokenizer, rows["prompt"][:2])  # the first evaluation batch, by hand
    input_ids, attention_mask = left_pad(prompt_ids, char_tokenizer.pad_token_id)
    direct = diffusion_generate(
        model,
        input_ids,
        attention_mask,
        gen_length=GEN_LENGTH,
        block_length=4,
        sampler="entropy_bounded",
        step_threshold_fn=head.predict_threshold,
        eos_token_id=char_tokenizer.eos_token_id,
    )
    texts = char_tokenizer.batch_decode(direct.completion_ids, skip_special_tokens=True)
    assert results.completions["entropy_bounded:learned"][:2] == texts
    learned = results.settings[0]
    assert learned.std_threshold > 0  # per-step thresholds: the rows' means differ


def test_demo_and_ablation_select_the_state_head(tmp_path):
    import os

    import yaml

    from trl_diffpo.ablation import load_grid
    from trl_diffpo.ablation.sudoku_cpu import demo_settings
    from trl_diffpo.demo import DemoSettings, parse_settings

    assert DemoSettings().head_features == "prompt"
    assert parse_settings(["--head-features", "state"]).head_features == "state"
    with pytest.raises(ValueError, match="head_features='step'"):
        DemoSettings(head_features="step")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    grid = load_grid(os.path.join(root, "examples/ablation/sudoku_state_head.yaml"))
    by_name = {c.name: c for c in grid.configurations}
    assert by_name["joint, state head"].head == "joint" and len(grid.seeds) >= 3
    features = {name: demo_settings(grid, 0, c).head_features for name, c in by_name.items()}
    assert features == {
        "model-only": "prompt",
        "sampler-only, per-prompt head": "prompt",
        "joint, per-prompt head": "prompt",
        "joint, state head": "state",
    }

    def base(name):
        with open(os.path.join(root, "examples/ablation", name)) as handle:
            return yaml.safe_load(handle)["base"]

    assert base("sudoku_state_head.yaml") == base("sudoku_cpu.yaml")  # the budget of the component ablation


def test_ablation_runs_a_joint_state_head_configuration(tmp_path, capsys):
    import yaml

    from test_ablation import TINY_BASE
    from trl_diffpo.ablation.cli import main
    from trl_diffpo.ablation.records import load_records

    raw = {
        "name": "state-smoke",
        "backend": "sudoku_cpu",
        "output_dir": str(tmp_path / "ablation"),
        "seeds": [0],
        "base": dict(TINY_BASE),
        "evaluation": {"fixed_threshold": 0.1, "thresholds": [0.5]},
        "configurations": [{"name": "joint state", "head": "joint", "settings": {"head_features": "state"}}],
    }
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["--config", str(config), "--no-progress"]) == 0
    record = next(r for r in load_records(str(tmp_path / "ablation")) if r["configuration"]["name"] == "joint state")
    assert record["evaluation"]["learned"] is not None
    saved = next((tmp_path / "ablation").rglob("sampler_head_config.json"), None)
    if saved is not None:  # the runner keeps the trained head: it is a state head
        assert json.loads(saved.read_text())["config"]["features"] == "state"
