"""The ``recipe`` backend: one (configuration, seed) run of a ``trl-diffpo train`` YAML recipe (LLaDA / Dream on GPUs).

Untested on GPUs so far (the commands it builds are unit-tested). Each run is two subprocesses:

1. ``<launcher> -m trl_diffpo train --config <recipe.config> --seed S --output_dir <run>/model <trainer overrides>
   <head flags>`` (``launcher`` defaults to ``python``; e.g. ``accelerate launch --config_file zero2.yaml``);
2. ``python -m trl_diffpo eval --model <run>/model --samplers "entropy_bounded:<sweep>[,learned]" --output-dir
   <run>/eval <recipe.eval_args>``;

and the record reads the trainer's ``trainer_state.json`` (training curves) and the evaluation's ``results.json``. The
"warm-up" of a seed is the recipe's starting model (``recipe.base_model``, default the recipe's
``model_name_or_path``) evaluated the same way; the warm-up of an LLM recipe is its pretraining.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from typing import Any

from .grid import AblationGrid, Configuration
from .records import WARMUP_NAME, evaluation_record


def _flag_values(options: dict[str, Any]) -> list[str]:
    flags = []
    for name, value in options.items():
        flags += [f"--{name}", json.dumps(value) if isinstance(value, list | dict) else str(value)]
    return flags


def _launcher(grid: AblationGrid) -> list[str]:
    launcher = grid.recipe.get("launcher")
    return shlex.split(launcher) if launcher else [sys.executable]


def _samplers(grid: AblationGrid, learned: bool) -> str:
    values = [f"{t:g}" for t in grid.sweep] + (["learned"] if learned else [])
    return "entropy_bounded:" + ",".join(values)


def train_command(grid: AblationGrid, configuration: Configuration, seed: int, run_dir: str) -> list[str]:
    """The ``trl-diffpo train`` command of one run."""
    head = {"use_sampler_head": "false"}
    if configuration.head != "none":
        head = {"use_sampler_head": "true", "sampler_head_mode": configuration.head}
    options = {**grid.base, **configuration.settings, **configuration.trainer, **head}
    options.setdefault("threshold", grid.fixed_threshold)
    return [
        *_launcher(grid),
        "-m",
        "trl_diffpo",
        "train",
        "--config",
        grid.recipe["config"],
        "--seed",
        str(seed),
        "--output_dir",
        os.path.join(run_dir, "model"),
        "--save_strategy",
        "no",
        *_flag_values(options),
    ]


def eval_command(grid: AblationGrid, model: str, seed: int, run_dir: str, learned: bool) -> list[str]:
    """The ``trl-diffpo eval`` command of one run (or of the warm-up model)."""
    return [
        sys.executable,
        "-m",
        "trl_diffpo",
        "eval",
        "--model",
        model,
        "--samplers",
        _samplers(grid, learned),
        "--seed",
        str(seed),
        "--output-dir",
        os.path.join(run_dir, "eval"),
        "--no-progress",
        *shlex.split(grid.recipe.get("eval_args", "")),
    ]


def _run(command: list[str]) -> float:
    print("[ablate] $ " + shlex.join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - started


def _evaluation(grid: AblationGrid, run_dir: str) -> dict[str, Any]:
    with open(os.path.join(run_dir, "eval", "results.json"), encoding="utf-8") as handle:
        results = json.load(handle)
    return evaluation_record(results["settings"], grid.fixed_threshold)


def _base_model(grid: AblationGrid) -> str:
    if "base_model" in grid.recipe:
        return grid.recipe["base_model"]
    import yaml

    with open(grid.recipe["config"], encoding="utf-8") as handle:
        return yaml.safe_load(handle)["model_name_or_path"]


def run_warmup_reference(grid: AblationGrid, seed: int, run_dir: str) -> dict[str, Any]:
    """Evaluate the recipe's starting model (the warm-up of every configuration)."""
    seconds = _run(eval_command(grid, _base_model(grid), seed, run_dir, learned=False))
    return {
        "configuration": {"name": WARMUP_NAME, "description": "the recipe's starting model, no RL", "head": "none"},
        "seed": seed,
        "evaluation": _evaluation(grid, run_dir),
        "training": {"curves": [], "seconds": None},  # no RL
        "seconds": {"evaluation": seconds, "total": seconds},
    }


def run_configuration(grid: AblationGrid, configuration: Configuration, seed: int, run_dir: str) -> dict[str, Any]:
    """Train and evaluate one configuration through the CLI; returns its record (without fingerprint)."""
    command = train_command(grid, configuration, seed, run_dir)
    train_seconds = _run(command)
    model = os.path.join(run_dir, "model")
    evaluation_seconds = _run(eval_command(grid, model, seed, run_dir, learned=configuration.head != "none"))
    curves = []
    state_path = os.path.join(model, "trainer_state.json")
    if os.path.isfile(state_path):
        with open(state_path, encoding="utf-8") as handle:
            curves = json.load(handle).get("log_history", [])
    return {
        "configuration": {
            "name": configuration.name,
            "description": configuration.description,
            "trainer": configuration.trainer,
            "head": configuration.head,
            "settings": configuration.settings,
        },
        "seed": seed,
        "commands": {"train": shlex.join(command)},
        "training": {"curves": curves, "seconds": train_seconds},
        "evaluation": _evaluation(grid, run_dir),
        "seconds": {
            "train": train_seconds,
            "evaluation": evaluation_seconds,
            "total": train_seconds + evaluation_seconds,
        },
    }
