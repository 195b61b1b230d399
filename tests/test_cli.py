"""``trl-diffpo train``: parsing (YAML, overrides, errors, help), the shipped recipes and end-to-end tiny runs."""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import ProgressCallback

from trl_diffpo.progress import CompactProgressCallback, format_progress_line
from trl_diffpo.scripts import train as train_script
from trl_diffpo.scripts.train import CliError, main, make_parser, parse_args, parse_tiny_spec

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "examples" / "configs").glob("*.yaml"))
ACCELERATE_CONFIGS = sorted((ROOT / "examples" / "accelerate_configs").glob("*.yaml"))
TINY = ROOT / "examples" / "configs" / "tiny_cpu.yaml"
FIXTURES = ROOT / "tests" / "fixtures"
# overrides that shrink any recipe to a seconds-long CPU run (the model comes from the test)
TINY_RUN_OVERRIDES = [
    "--dtype", "float32", "--bf16", "false", "--use_cpu", "true", "--max_steps", "1",
    "--max_completion_length", "16", "--block_length", "8", "--diffusion_steps", "8",
    "--num_generations", "2", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
    "--num_iterations", "1", "--max_train_samples", "2", "--lora_r", "4", "--lora_alpha", "8",
    "--sampler_head_mlp_hidden_size", "8", "--save_strategy", "no", "--logging_steps", "1",
    "--attn_implementation", "eager",
]  # fmt: skip


def _recipe_names() -> list[str]:
    return [path.stem for path in CONFIGS if path.stem != "tiny_cpu"]


# --------------------------------------------------------------------------------------------------------------------
# Shipped configs


def test_every_recipe_is_shipped():
    names = set(_recipe_names())
    for model in ("llada", "dream"):
        for task in ("gsm8k", "math", "countdown", "sudoku"):
            for setting in ("d1", "diffpo"):
                assert f"{model}_{task}_{setting}" in names


@pytest.mark.parametrize("config_path", CONFIGS, ids=lambda path: path.stem)
def test_shipped_config_parses_into_the_dataclasses(config_path):
    # `--use_cpu` because bf16 recipes are validated against the (GPU-less) machine that parses them
    script_args, training_args, model_args, _ = parse_args(["--config", str(config_path), "--use_cpu", "true"])
    raw = yaml.safe_load(config_path.read_text())
    parsed = {**vars(script_args), **vars(model_args), **training_args.to_dict()}
    for key, value in raw.items():
        if key in ("report_to", "lr_scheduler_type", "save_strategy"):
            continue  # normalised by TrainingArguments (e.g. "none" -> [], enums)
        assert parsed[key] == value, key


@pytest.mark.parametrize("name", _recipe_names())
def test_recipes_follow_d1_and_diffpo(name):
    from trl_diffpo.models import DREAM_LORA_TARGET_MODULES, LLADA_LORA_TARGET_MODULES

    model, task, setting = name.split("_")
    script_args, args, model_args, _ = parse_args(["--config", str(CONFIGS[0].parent / f"{name}.yaml"), "--use_cpu"])
    # d1's recipe (DESIGN 3.5)
    assert (model_args.use_peft, model_args.lora_r, model_args.lora_alpha) == (True, 128, 64)
    assert args.learning_rate == 3e-6 and args.num_generations == 6 and args.epsilon == 0.5 and args.beta == 0.04
    assert args.num_iterations == (8 if task in ("countdown", "sudoku") else 12)
    assert (args.max_completion_length, args.block_length, args.temperature) == (256, 32, 0.9)
    assert args.p_mask_prompt == 0.15 and args.scale_rewards == "none" and args.bf16
    expected_targets = LLADA_LORA_TARGET_MODULES if model == "llada" else DREAM_LORA_TARGET_MODULES
    assert model_args.lora_target_modules == expected_targets
    if setting == "d1":
        assert (args.sampler, args.diffusion_steps, args.likelihood) == ("low_confidence", 128, "mean_field")
        assert args.is_correction == "none" and not script_args.use_sampler_head
    else:
        assert (args.likelihood, args.is_correction) == ("two_stage", "token")
        assert script_args.use_sampler_head and script_args.sampler_head_mode == "joint"
        assert args.sampler == "entropy_bounded" and args.threshold is not None


@pytest.mark.parametrize("config_path", ACCELERATE_CONFIGS, ids=lambda path: path.stem)
def test_accelerate_configs_load(config_path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(config_path))
    assert config.num_processes >= 1
    if "zero" in config_path.stem:
        stage = 3 if "zero3" in config_path.stem else 2
        assert config.deepspeed_config["zero_stage"] == stage
        offload = "offload" in config_path.stem
        assert (config.deepspeed_config["offload_optimizer_device"] == "cpu") == offload
    if "multi_node" in config_path.stem:
        assert config.num_machines == 2 and config.num_processes == 16


def test_launcher_script_help_and_unknown_config():
    script = ROOT / "examples" / "train_diffpo.sh"
    shown = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "ACCELERATE_CONFIG" in shown.stdout
    refused = subprocess.run(
        ["bash", str(script), str(TINY), "no_such_config"], capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 2 and "zero2" in refused.stderr  # lists the shipped configs


def test_deepspeed_is_an_optional_extra():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    assert "deepspeed" in setup["options.extras_require"]["deepspeed"]
    assert "deepspeed" not in setup["options"]["install_requires"]


# --------------------------------------------------------------------------------------------------------------------
# Parsing rules


def test_command_line_overrides_win_over_the_yaml_file():
    _, args, model_args, _ = parse_args(["--config", str(TINY), "--max_steps", "5", "--threshold", "0.3"])
    assert args.max_steps == 5 and args.threshold == 0.3
    assert args.block_length == 8  # untouched YAML value
    assert model_args.model_name_or_path.startswith("tiny:")
    _, args, _, _ = parse_args([f"--config={TINY}", "--max_steps=7"])
    assert args.max_steps == 7


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    parser = make_parser()
    for action in parser._actions:
        assert action.help, f"--{action.dest} has no help text"
        if action.dest != "help":
            assert f"--{action.dest}" in text
    for phrase in ("--config FILE", "tiny:llama", "--accelerate_config", "docs/cli.md"):
        assert phrase in text


def test_help_leads_with_diffpo_option_groups(capsys):
    # before: 1,235 lines with the DiFFPO options from about line 993, after TrainingArguments
    with pytest.raises(SystemExit):
        main(["--help"])
    lines = capsys.readouterr().out.splitlines()
    titles = [line[:-1] for line in lines if line and not line.startswith(" ") and line.endswith(":")]
    diffpo = list(train_script.DIFFPO_OPTION_GROUPS)
    assert titles[: len(diffpo) + 1] == ["options", *diffpo]
    assert titles[len(diffpo) + 1].startswith("TRL training arguments")
    position = {line.split()[0].rstrip(","): index for index, line in enumerate(lines) if line.startswith("  --")}
    assert max(position[f"--{name}"] for names in diffpo_groups() for name in names) < position["--learning_rate"]
    assert position["--block_length"] < 40 and position["--block_length"] < position["--model_name_or_path"]
    for name in ("--stop_at_eos", "--no_stop_at_eos", "--sampler_head_sigma", "--reward_batch_budget_s", "--task"):
        assert position[name] < position["--learning_rate"]


def diffpo_groups():
    return train_script.DIFFPO_OPTION_GROUPS.values()


def test_no_arguments_points_to_config_and_help(capsys):
    assert main([]) == 2
    error = capsys.readouterr().err
    assert "nothing to train" in error and "--config" in error and "--help" in error


def test_unknown_flag_is_a_clear_error_with_a_suggestion(capsys):
    assert main(["--config", str(TINY), "--max_step", "3"]) == 2
    error = capsys.readouterr().err
    assert "unrecognized argument" in error and "--max_step" in error and "did you mean --max_steps" in error


def test_unknown_yaml_key_names_the_file_and_a_suggestion(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(TINY.read_text() + "\nblock_lenght: 4\n")
    with pytest.raises(CliError, match=r"unknown key.*bad\.yaml.*block_lenght.*did you mean --block_length"):
        parse_args(["--config", str(config)])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--config", "missing.yaml"], "does not exist"),
        (["--config"], "needs a YAML file"),
        (["--config", str(TINY), "--config", str(TINY)], "more than once"),
        (["--config", str(TINY), "--block_length", "5"], "multiple of block_length"),
        (["--config", str(TINY), "--sampler", "low_confidence"], "adaptive sampler"),
        (["--config", str(TINY), "--sampler_head_init_threshold", "5"], "invalid sampler head options"),
        (["--config", str(TINY), "--max_train_samples", "0"], "positive number"),
        (["--config", str(TINY), "--task_kwargs", "{not json"], "JSON object"),
        (["--output_dir", "x", "--per_device_train_batch_size", "6", "--use_cpu"], "no model"),
    ],
)
def test_bad_configuration_is_reported_clearly(argv, message):
    with pytest.raises(CliError, match=message):
        parse_args(argv)


def test_bad_value_type_exits_with_argparse_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--config", str(TINY), "--max_steps", "many"])
    assert exit_info.value.code == 2
    assert "invalid int value" in capsys.readouterr().err


def test_yaml_must_be_a_mapping(tmp_path):
    config = tmp_path / "list.yaml"
    config.write_text("- a\n- b\n")
    with pytest.raises(CliError, match="mapping"):
        parse_args(["--config", str(config)])


def test_task_kwargs_accepts_json_on_the_command_line():
    script_args, *_ = parse_args(["--config", str(TINY), "--task_kwargs", '{"generated": true}'])
    assert script_args.task_kwargs == {"generated": True}


def test_sampler_head_options_reach_the_callback():
    script_args, *_ = parse_args(["--config", str(TINY), "--sampler_head_sigma", "0.25", "--nfe_penalty", "0.3"])
    callback = train_script.build_sampler_head_callback(script_args)
    assert callback.nfe_penalty == 0.3 and callback.mode == "joint"
    assert callback.head_overrides["sigma"] == 0.25 and callback.head_overrides["mlp_hidden_size"] == 16


def test_every_sampler_head_config_field_has_an_option():
    from dataclasses import fields

    from trl_diffpo.sampler_head import SamplerHeadConfig

    exposed = set(train_script.SAMPLER_HEAD_CONFIG_OPTIONS) | {"sampler", "input_size"}  # those two are derived
    assert {field.name for field in fields(SamplerHeadConfig)} == exposed
    options = {action.dest for action in make_parser()._actions}
    assert {f"sampler_head_{name}" for name in train_script.SAMPLER_HEAD_CONFIG_OPTIONS} <= options


# --------------------------------------------------------------------------------------------------------------------
# Model, LoRA and rewards helpers


def test_tiny_model_spec():
    assert parse_tiny_spec("tiny:llama") == ("llama", {})
    assert parse_tiny_spec("tiny:qwen3,hidden_size=32,num_layers=1") == ("qwen3", {"hidden_size": 32, "num_layers": 1})
    with pytest.raises(CliError, match="bad tiny-model option"):
        parse_tiny_spec("tiny:llama,width=3")
    with pytest.raises(CliError, match="must be an integer"):
        parse_tiny_spec("tiny:llama,hidden_size=big")


def test_single_regex_lora_target_is_passed_to_peft_as_a_regex():
    _, _, model_args, _ = parse_args(
        ["--config", str(TINY), "--use_peft", "--lora_target_modules", r".*\.layers\.\d+\.self_attn\.q_proj"]
    )
    peft_config = train_script.get_peft_config(model_args)
    assert peft_config.target_modules == r".*\.layers\.\d+\.self_attn\.q_proj"
    assert peft_config.task_type is None  # TRL's CAUSAL_LM default would need autoregressive generation hooks
    _, _, model_args, _ = parse_args(
        ["--config", str(TINY), "--use_peft", "--lora_target_modules", "q_proj", "v_proj"]
    )
    assert set(train_script.get_peft_config(model_args).target_modules) == {"q_proj", "v_proj"}


def test_reward_functions_resolve_by_name_and_import_path():
    from trl_diffpo.rewards import countdown_reward

    resolved = train_script.resolve_reward_funcs(["countdown_reward", "trl_diffpo.rewards.sudoku_reward"])
    assert resolved[0] is countdown_reward and resolved[1].__name__ == "sudoku_reward"
    with pytest.raises(CliError, match="did you mean --countdown_reward"):
        train_script.resolve_reward_funcs(["countdown_rewards"])
    with pytest.raises(CliError, match="cannot import"):
        train_script.resolve_reward_funcs(["no_such_module.reward"])


def test_math500_needs_training_data(tmp_path):
    script_args, args, _, dataset_args = parse_args(["--config", str(TINY), "--task", "math500"])
    with pytest.raises(CliError, match="no training split"):
        train_script.load_datasets(script_args, args, dataset_args)


def test_task_data_from_local_files():
    script_args, args, _, dataset_args = parse_args(
        ["--config", str(TINY), "--task", "gsm8k", "--task_kwargs", "{}",
         "--dataset_train_files", str(FIXTURES / "gsm8k_train.jsonl"), "--max_train_samples", "2"]
    )  # fmt: skip
    train, evaluation, task = train_script.load_datasets(script_args, args, dataset_args)
    assert task.name == "gsm8k" and evaluation is None
    assert len(train) == 2 and {"prompt", "answer"} <= set(train.column_names)


def test_accelerate_config_relaunches_through_accelerate(monkeypatch):
    monkeypatch.setattr("trl_diffpo.scripts.cpu_deepspeed.has_accelerator", lambda: True)  # the GPU route
    launched = []
    argv = ["--config", str(TINY), "--accelerate_config", "zero2", "--num_processes", "4", "--max_steps", "3"]
    assert train_script.launch_with_accelerate(argv, launch_command_fn=launched.append) == 0
    (accelerate_args,) = launched
    assert accelerate_args.config_file.endswith("zero2.yaml") and accelerate_args.num_processes == 4
    assert accelerate_args.module and accelerate_args.training_script == "trl_diffpo.scripts.train"
    assert accelerate_args.training_script_args == ["--config", str(TINY), "--max_steps", "3"]


# --------------------------------------------------------------------------------------------------------------------
# End to end


def test_tiny_cpu_config_trains_end_to_end(tmp_path):
    output_dir = tmp_path / "tiny"
    trainer = train_script.train(*parse_args(["--config", str(TINY), "--output_dir", str(output_dir)]))
    saved = {path.name for path in output_dir.iterdir()}
    assert {"model.safetensors", "config.json", "sampler_head.safetensors", "sampler_head_config.json"} <= saved
    logs = [log for log in trainer.state.log_history if "reward" in log]
    assert len(logs) == trainer.args.max_steps
    # before: the Sudoku smoke run scored 0 on every completion, so no advantage and no real gradient step
    # (a step whose group rewards all tie has no gradient; the run as a whole must take real steps)
    assert any(log["frac_reward_zero_std"] < 1.0 and log["grad_norm"] > 0 for log in logs)
    # per-function reward time and fallback counts are training metrics (rewards/instrumentation.py)
    assert all(
        log["rewards/countdown_reward/time_s"] >= 0 and log["rewards/countdown_reward/fallbacks"] == 0 for log in logs
    )
    # one short progress line per log instead of the whole metrics dict
    progress = [callback for callback in trainer.callback_handler.callbacks if isinstance(callback, ProgressCallback)]
    assert [type(callback) for callback in progress] == [CompactProgressCallback]


def test_missing_local_model_path_and_truncated_checkpoint_are_named(tmp_path, capsys):
    assert main(["--config", str(TINY), "--model_name_or_path", "./no/such/model"]) == 2
    assert "--model_name_or_path './no/such/model': no such file or folder" in capsys.readouterr().err
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")  # cut short
    argv = ["--config", str(TINY), "--output_dir", str(tmp_path / "out"), "--resume_from_checkpoint", str(checkpoint)]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert f"{checkpoint / 'model.safetensors'} cannot be read" in error and "truncated or corrupt" in error


@pytest.mark.parametrize("content", [None, ""])
def test_missing_or_empty_train_data_file_is_a_one_line_error(tmp_path, capsys, content):
    """datasets raised a bare StopIteration on an empty JSONL."""
    data_file = tmp_path / "train.jsonl"
    if content is not None:
        data_file.write_text(content)
    argv = ["--config", str(TINY), "--task", "gsm8k", "--task_kwargs", "{}", "--dataset_train_files", str(data_file)]
    assert main([*argv, "--output_dir", str(tmp_path / "out")]) == 2
    expected = "is empty: it holds no rows" if content is not None else "no such file"
    error = capsys.readouterr().err
    assert f"--dataset_train_files {str(data_file)!r}" in error and expected in error


def test_progress_line_is_short():
    logs = {f"metric_{index}": float(index) for index in range(50)}
    logs.update({"loss": 0.25, "reward": 0.5, "diffusion/nfe/mean": 12.0, "learning_rate": 1e-3})
    line = format_progress_line(3, logs)
    assert line == "step 3 | loss 0.25 | reward 0.5 | NFE 12 | lr 0.001"
    assert format_progress_line(4, {"eval_reward": 1.0, "eval_loss": 0.5}) == "eval step 4 | loss 0.5 | reward 1"


def _save_tiny_native_model(folder: Path, family: str) -> None:
    from trl_diffpo.models import DreamConfig, DreamModel, LLaDAConfig, LLaDAModelLM
    from trl_diffpo.tiny import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    special = {
        "vocab_size": len(tokenizer),
        "mask_token_id": tokenizer.mask_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }
    if family == "llada":
        config = LLaDAConfig(
            d_model=32, n_heads=4, n_kv_heads=4, n_layers=1, mlp_hidden_size=48, max_sequence_length=128,
            embedding_size=len(tokenizer), **special,
        )  # fmt: skip
        model_class = LLaDAModelLM
    else:
        config = DreamConfig(
            hidden_size=32, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=1, intermediate_size=48,
            max_position_embeddings=128, **special,
        )  # fmt: skip
        model_class = DreamModel
    torch.manual_seed(0)
    model_class(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["llada_sudoku_diffpo", "dream_gsm8k_d1"])
def test_recipe_runs_on_a_tiny_model_of_its_family(tmp_path, recipe):
    """The recipe as shipped (LoRA targets, surrogate, head, beta>0 with the adapter-disabled reference) on a tiny
    random model of the same family saved to disk, shrunk by command-line overrides."""
    family, task, _ = recipe.split("_")
    model_dir = tmp_path / "model"
    _save_tiny_native_model(model_dir, family)
    extra = ["--dataset_train_files", str(FIXTURES / "gsm8k_train.jsonl")] if task == "gsm8k" else []
    argv = ["--config", str(ROOT / "examples" / "configs" / f"{recipe}.yaml"), "--model_name_or_path", str(model_dir)]
    output_dir = tmp_path / "out"
    assert main([*argv, *TINY_RUN_OVERRIDES, *extra, "--output_dir", str(output_dir)]) == 0
    assert (output_dir / "adapter_model.safetensors").is_file()  # LoRA: the adapter is what gets saved
    assert (output_dir / "sampler_head.safetensors").is_file() == recipe.endswith("diffpo")


@pytest.mark.slow
def test_module_entry_point_prints_help():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "trl_diffpo", "train", "--help"], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "usage: trl-diffpo train" in result.stdout and "--use_sampler_head" in result.stdout
