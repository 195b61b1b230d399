"""``trl-diffpo train --accelerate_config zero2|zero3`` on a machine without a GPU (the flags it adds; the real
two-process launch is ``test_cli_accelerate_config_zero3_trains_on_two_cpu_processes`` in test_deepspeed.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from trl_diffpo.scripts import cpu_deepspeed
from trl_diffpo.scripts import train as train_script

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "configs" / "tiny_cpu.yaml"  # bf16: false, no ddp_backend
ZERO3 = ROOT / "examples" / "accelerate_configs" / "zero3.yaml"  # mixed_precision: bf16


def _launch(argv: list[str], monkeypatch, accelerator: bool):
    monkeypatch.setattr(cpu_deepspeed, "has_accelerator", lambda: accelerator)
    launched = []
    assert train_script.launch_with_accelerate(["--config", str(TINY), *argv], launch_command_fn=launched.append) == 0
    (accelerate_args,) = launched
    return accelerate_args


@pytest.mark.parametrize("config", ["zero2", "zero3", str(ZERO3)])
def test_cpu_deepspeed_launch_gets_gloo_and_matching_precision(monkeypatch, config):
    accelerate_args = _launch(["--accelerate_config", config, "--num_processes", "2"], monkeypatch, False)
    assert accelerate_args.training_script_args == ["--config", str(TINY), "--ddp_backend", "gloo"]
    assert accelerate_args.mixed_precision == "no"  # the config's bf16 would contradict bf16: false


def test_cpu_deepspeed_launch_keeps_the_users_mixed_precision(monkeypatch):
    accelerate_args = _launch(["--accelerate_config", "zero2", "--mixed_precision", "bf16"], monkeypatch, False)
    assert accelerate_args.mixed_precision == "bf16"
    assert accelerate_args.training_script_args == ["--config", str(TINY), "--ddp_backend", "gloo"]


@pytest.mark.parametrize(
    ("argv", "accelerator"),
    [
        (["--accelerate_config", "zero3"], True),  # a GPU machine: the usual route
        (["--accelerate_config", "multi_gpu"], False),  # not DeepSpeed: DDP on CPU needs none of it
        (["--accelerate_config", "zero2", "--cpu"], False),  # accelerate's own --cpu turns DeepSpeed off
    ],
)
def test_other_launches_are_left_alone(monkeypatch, argv, accelerator):
    accelerate_args = _launch(argv, monkeypatch, accelerator)
    assert accelerate_args.training_script_args == ["--config", str(TINY)]
    assert accelerate_args.mixed_precision is None


def test_cpu_deepspeed_launch_is_announced(monkeypatch, caplog):
    with caplog.at_level("WARNING", logger=cpu_deepspeed.__name__):
        _launch(["--accelerate_config", "zero3", "--num_processes", "2"], monkeypatch, False)
    assert "No GPU found: running DeepSpeed on 2 CPU processes with the gloo backend" in caplog.text
