"""The ``sudoku_cpu`` backend: one (configuration, seed) run on the demo's task, in process, on a CPU.

It reuses :mod:`trl_diffpo.demo` for everything: the 4x4 Sudoku data (train / held-out split by solution grid), the
tiny bidirectional Llama and its masked-diffusion SFT warm-up (cached per seed under ``<output_dir>/warmup/<key>/``,
so every configuration of a seed starts from the very same weights), :func:`~trl_diffpo.demo.train_diffpo` for RL
(with the configuration's :class:`~trl_diffpo.DiffpoConfig` overrides and head mode) and the held-out evaluation.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import torch

from .grid import AblationGrid, Configuration
from .records import WARMUP_NAME, evaluation_record

# the RL metrics kept in a record's training curves (everything else TRL logs is dropped to keep records small)
CURVE_PREFIXES = ("reward", "rewards/", "diffusion/", "diffpo/", "sampler_head/", "loss", "kl", "clip_ratio", "step")


def demo_settings(grid: AblationGrid, seed: int, configuration: Configuration | None = None):
    """The :class:`~trl_diffpo.demo.DemoSettings` of a run: the grid's base, the configuration's settings, the seed."""
    from ..demo import DemoSettings

    values = {**grid.base, **(configuration.settings if configuration else {})}
    settings = DemoSettings(
        **values,
        seed=seed,
        output_dir=grid.output_dir,
        fixed_threshold=grid.fixed_threshold,
        sweep_thresholds=tuple(grid.sweep),
    )
    return settings


def _sweep_settings(grid: AblationGrid, with_head: bool):
    from ..evaluation import SamplerSetting

    settings = [SamplerSetting("entropy_bounded", threshold=t) for t in grid.sweep]
    if with_head:
        settings.append(SamplerSetting("entropy_bounded", learned=True))
    return settings


class SudokuSeedContext:
    """What every run of one seed shares: settings, tokenizer, data, and the cached warm-up model's folder."""

    def __init__(self, grid: AblationGrid, seed: int):
        from ..demo import build_sudoku_data
        from ..tiny import build_char_tokenizer

        self.grid, self.seed = grid, seed
        self.settings = demo_settings(grid, seed)
        if self.settings.threads:
            torch.set_num_threads(self.settings.threads)
        self.tokenizer = build_char_tokenizer()
        self.train_rows, self.validation_rows, self.held_out = build_sudoku_data(self.settings, self.tokenizer)
        self._warmup_info: dict[str, Any] | None = None

    def warmup_model(self):
        """A fresh copy of this seed's warm-up model (trained once, then loaded from the cache), and its info."""
        from ..demo import warmup_model

        started = time.perf_counter()
        model, info = warmup_model(self.settings, self.tokenizer, self.train_rows, self.validation_rows)
        info = {k: v for k, v in info.items() if k != "sft_history"} | {"seconds": time.perf_counter() - started}
        self._warmup_info = info
        return model, info

    def evaluate(self, model, head=None, show_progress: bool = True) -> dict[str, Any]:
        """The held-out sweep (and the learned threshold when ``head`` is given) as a record's evaluation part."""
        from ..demo import evaluate_held_out

        results = evaluate_held_out(
            self.settings,
            model,
            self.tokenizer,
            self.held_out,
            _sweep_settings(self.grid, with_head=head is not None),
            head=head,
            show_progress=show_progress,
        )
        return evaluation_record(results.to_dict()["settings"], self.grid.fixed_threshold)


def training_curves(log_history: list[dict[str, Any]]) -> list[dict[str, float]]:
    """The logged RL metrics per logging step (numbers only; TRL's bookkeeping entries dropped)."""
    curves = []
    for entry in log_history:
        row = {
            name: float(value)
            for name, value in entry.items()
            if isinstance(value, int | float) and name.startswith(CURVE_PREFIXES)
        }
        if "step" in row and len(row) > 1:
            curves.append(row)
    return curves


def run_warmup_reference(context: SudokuSeedContext, show_progress: bool = True) -> dict[str, Any]:
    """The record of the seed's warm-up model, evaluated with the same sweep (the reference of matched columns)."""
    started = time.perf_counter()
    model, warmup_info = context.warmup_model()
    evaluation_started = time.perf_counter()
    evaluation = context.evaluate(model, show_progress=show_progress)
    return {
        "configuration": {"name": WARMUP_NAME, "description": "the shared warm-up model, no RL", "head": "none"},
        "seed": context.seed,
        "settings": dataclasses.asdict(context.settings),
        "warmup": warmup_info,
        "training": {"curves": [], "seconds": None},  # no RL
        "evaluation": evaluation,
        "seconds": {
            "evaluation": time.perf_counter() - evaluation_started,
            "total": time.perf_counter() - started,
        },
        "torch_threads": torch.get_num_threads(),
    }


def run_configuration(
    context: SudokuSeedContext, configuration: Configuration, show_progress: bool = True
) -> dict[str, Any]:
    """Train one configuration from the seed's warm-up and evaluate it; returns its record (without fingerprint)."""
    from ..demo import train_diffpo

    started = time.perf_counter()
    settings = demo_settings(context.grid, context.seed, configuration)
    model, warmup_info = context.warmup_model()
    head_mode = None if configuration.head == "none" else configuration.head
    trainer, callback, rl_info = train_diffpo(
        settings,
        model,
        context.tokenizer,
        context.train_rows,
        trainer_overrides=configuration.trainer,
        head_mode=head_mode,
        progress_description=configuration.name,
    )
    evaluation_started = time.perf_counter()
    head = callback.head if callback is not None else None
    evaluation = context.evaluate(trainer.model, head=head, show_progress=show_progress)
    record = {
        "configuration": dataclasses.asdict(configuration),
        "seed": context.seed,
        "settings": dataclasses.asdict(settings),
        "trainer_config": {
            name: getattr(trainer.args, name)
            for name in ("likelihood", "num_stages", "is_correction", "is_clamp", "sampler", "threshold")
            + ("diffusion_steps", "p_mask_prompt", "temperature", "num_iterations", "learning_rate", "max_steps")
            + ("rollout_cache", "rollout_cache_refresh")
        },
        "warmup": warmup_info,
        "training": {"curves": training_curves(rl_info["log_history"]), "seconds": rl_info["rl_seconds"]},
        "evaluation": evaluation,
        "seconds": {
            "train": rl_info["rl_seconds"],
            "evaluation": time.perf_counter() - evaluation_started,
            "total": time.perf_counter() - started,
        },
        "torch_threads": torch.get_num_threads(),
    }
    kl = context.grid.kl_per_step
    if (
        kl
        and kl.get("configuration") == configuration.name
        and int(kl.get("seed", context.grid.seeds[0])) == context.seed
    ):
        record["kl_per_step"] = _kl_figure(context, trainer.model, kl, configuration)
    return record


def _kl_figure(context: SudokuSeedContext, model, options: dict[str, Any], configuration: Configuration) -> dict:
    """The KL-per-timestep figure on this run's trained model (files next to the summary); returns its summary."""
    from .kl_per_step import kl_per_step_on_rows, write_kl_per_step

    report = kl_per_step_on_rows(
        model,
        context.tokenizer,
        context.held_out,
        num_prompts=int(options.get("num_prompts", 64)),
        gen_length=context.settings.gen_length,
        block_length=context.settings.gen_length,
        sampler=options.get("sampler", "entropy_bounded"),
        threshold=options.get("threshold", context.grid.fixed_threshold),
        steps=options.get("steps"),
        temperature=float(options.get("temperature", context.settings.rl_temperature)),
        seed=context.seed,
    )
    report["model"] = f"{configuration.name}, seed {context.seed} (after RL)"
    paths = write_kl_per_step(report, os.path.join(context.grid.output_dir, "kl_per_step"))
    return {"files": paths, "model": report["model"]}
