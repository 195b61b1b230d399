"""``trl-diffpo demo``: the offline end-to-end DiFFPO demo on a tiny model (CPU, about 6 min on a 2-core CPU).

What it does, with no download:

1. builds a character tokenizer and a small bidirectional transformer (Llama with ``is_causal=False``) in code;
2. generates 4x4 Sudoku puzzles (unique solutions, train/held-out split by solution grid) and teaches the model the
   task with a short masked-diffusion SFT warm-up (:mod:`trl_diffpo.sft`), stopped while it is still mediocre so that
   RL has something to improve (cached under ``<output-dir>/warmup/<key>/``: a re-run with the same settings reuses
   it);
3. trains it with :class:`~trl_diffpo.DiffpoTrainer` (two-stage surrogate, token-level IS correction, entropy-bounded
   sampler) and a :class:`~trl_diffpo.SamplerHeadCallback` in joint mode, which learns a per-prompt threshold;
4. evaluates before and after on the held-out puzzles (:mod:`trl_diffpo.evaluation`) and prints accuracy and mean NFE
   for (a) the warm-up model with the fixed threshold, (b) the RL model with the same fixed threshold, (c) the RL
   model with its learned threshold; writes ``demo_results.json``, ``accuracy_vs_nfe.png``, the held-out set and the
   trained model folder (with ``sampler_head.safetensors``) under ``--output-dir``.

``--quick`` runs a few steps of each phase on a smaller model (for tests); the numbers are then meaningless.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time

import torch

from .demo_report import (  # noqa: F401  (re-exported: the demo's public names)
    TARGET_ACCURACY_GAIN,
    TARGET_NFE_SAVING,
    check_targets,
    format_frontier_gain,
    format_table,
    frontier_gain,
    summary_rows,
)
from .demo_settings import DEMO_FORMAT_VERSION, DemoSettings, build_parser, parse_settings  # noqa: F401

logger = logging.getLogger(__name__)

WARMUP_FOLDER = "warmup"
MODEL_FOLDER = "model"
HELD_OUT_FILE = "held_out.jsonl"
RESULTS_FILE = "demo_results.json"
PLOT_FILE = "accuracy_vs_nfe.png"
WARMUP_INFO_FILE = "warmup_info.json"


# --------------------------------------------------------------------------------------------------------------------
# Task data
# --------------------------------------------------------------------------------------------------------------------


def compact_prompt(puzzle: str) -> list[dict[str, str]]:
    """The demo's short conversational prompt: the 16-character puzzle (0 = blank) as the user message.

    The task registry's prompt (instructions + XML layout) is ~400 characters, too long for a tiny model on CPU; the
    char tokenizer's chat template renders this one as ``Q:<puzzle>\\nA:`` (21 tokens).
    """
    return [{"role": "user", "content": puzzle}]


def build_sudoku_data(settings: DemoSettings, tokenizer):
    """``(train, validation, held_out)`` datasets with ``prompt``, ``puzzle`` and ``solution`` columns.

    The held-out puzzles use grids that never occur in training. The validation puzzles (they only decide when the
    warm-up stops) come from ``settings.validation_split``'s grids and never repeat a held-out puzzle.
    """
    from .data import generate_sudoku

    blanks = (settings.min_blanks, settings.max_blanks)
    common = {"num_blanks": blanks, "tokenizer": tokenizer, "system_prompt": None}
    train = generate_sudoku(settings.num_train, split="train", seed=settings.seed, **common)
    held_out = generate_sudoku(settings.num_held_out, split="test", seed=settings.seed + 1, **common)
    spare = len(held_out) if settings.validation_split == "test" else 0  # room to drop puzzles the held-out set has
    validation = generate_sudoku(
        settings.num_validation + spare, split=settings.validation_split, seed=settings.seed + 2, **common
    )
    held_out_puzzles = set(held_out["puzzle"])
    keep = [i for i, puzzle in enumerate(validation["puzzle"]) if puzzle not in held_out_puzzles]
    validation = validation.select(keep[: settings.num_validation])

    def compact(row):
        return {"prompt": compact_prompt(row["puzzle"])}

    return train.map(compact), validation.map(compact), held_out.map(compact)


# --------------------------------------------------------------------------------------------------------------------
# Phase 1: warm-up
# --------------------------------------------------------------------------------------------------------------------


def warmup_model(settings: DemoSettings, tokenizer, train_rows, validation_rows):
    """Build and SFT the tiny model, or load it from the cache. Returns ``(model, info)``.

    Every ``sft_eval_every`` steps the validation accuracy (greedy, fixed entropy bound) is measured; the warm-up
    stops as soon as it reaches ``sft_target_accuracy`` (or after ``sft_steps``), leaving room for RL to improve.
    """
    from transformers import AutoModelForCausalLM

    from .sft import MaskedDiffusionSFTConfig, masked_diffusion_sft
    from .tiny import build_tiny_model

    folder = os.path.join(settings.output_dir, WARMUP_FOLDER, settings.warmup_key())
    info_path = os.path.join(folder, WARMUP_INFO_FILE)
    if os.path.isfile(info_path) and not settings.retrain_warmup:
        with open(info_path, encoding="utf-8") as handle:
            info = json.load(handle)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        info["cached"] = True
        print(f"[warm-up] reusing the cached warm-up model {folder} (delete it or pass --retrain-warmup to redo it)")
        return model, info

    model = build_tiny_model(
        tokenizer,
        architecture="llama",
        hidden_size=settings.hidden_size,
        num_layers=settings.num_layers,
        num_heads=settings.num_heads,
        max_position_embeddings=128,
        seed=settings.seed,
    )
    num_parameters = sum(p.numel() for p in model.parameters())
    until = (
        f"{settings.sft_steps} steps"
        if settings.sft_target_accuracy is None
        else f"until validation accuracy >= {100 * settings.sft_target_accuracy:.0f}% (at most {settings.sft_steps} "
        "steps)"
    )
    print(
        f"[warm-up] masked-diffusion SFT of a {num_parameters / 1e6:.2f}M-parameter bidirectional Llama on "
        f"{len(train_rows)} puzzles, {until}"
    )
    started = time.perf_counter()

    def validation_accuracy(step, model):
        if step < settings.sft_eval_start:
            return {"stop": False}
        results = evaluate_held_out(
            settings, model, tokenizer, validation_rows, [fixed_setting(settings)], show_progress=False
        )
        accuracy = results.settings[0].accuracy
        target = settings.sft_target_accuracy
        return {"val_accuracy": accuracy, "stop": target is not None and accuracy >= target}

    history = masked_diffusion_sft(
        model,
        tokenizer,
        prompts=train_rows["prompt"],
        completions=train_rows["solution"],
        config=MaskedDiffusionSFTConfig(
            gen_length=settings.gen_length,
            num_steps=settings.sft_steps,
            batch_size=settings.sft_batch_size,
            learning_rate=settings.sft_learning_rate,
            warmup_steps=min(20, max(1, settings.sft_steps // 10)),
            seed=settings.seed,
            log_every=settings.sft_eval_every,
        ),
        callback=validation_accuracy,
    )
    info = {
        "key": settings.warmup_key(),
        "num_parameters": num_parameters,
        "sft_steps_run": history[-1]["step"] if history else 0,
        "validation_accuracy": history[-1].get("val_accuracy") if history else None,
        "sft_seconds": time.perf_counter() - started,
        "sft_history": history,
        "cached": False,
    }
    print(
        f"[warm-up] stopped after {info['sft_steps_run']} steps ({info['sft_seconds']:.0f} s): validation accuracy "
        f"{100 * (info['validation_accuracy'] or 0):.1f}%"
    )
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with open(info_path, "w", encoding="utf-8") as handle:
        json.dump(info, handle, indent=2)
    return model, info


# --------------------------------------------------------------------------------------------------------------------
# Phase 2: DiFFPO
# --------------------------------------------------------------------------------------------------------------------

# metrics shown on the RL progress bar: logged name -> short name
PROGRESS_METRICS = {
    "reward": "reward",
    "rewards/sudoku_strict_reward/mean": "solved",
    "diffusion/nfe/mean": "nfe",
    "sampler_head/predicted_threshold_mean": "gamma",
    "diffpo/is_weight/clamped_frac": "is_clamped",
}


def _progress_callback(description: str = "DiFFPO"):
    """A compact RL progress bar (reward, solved fraction, NFE, learned gamma) instead of printed log dicts."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class DemoProgressCallback(TrainerCallback):
        def __init__(self):
            self.bar = None
            self.shown: dict[str, str] = {}

        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = tqdm(total=state.max_steps, desc=description, dynamic_ncols=True)

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.shown.update(
                {short: f"{logs[name]:.3g}" for name, short in PROGRESS_METRICS.items() if name in (logs or {})}
            )
            if self.shown and self.bar is not None:
                self.bar.set_postfix(self.shown, refresh=True)

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()

    return DemoProgressCallback()


# the demo's RL recipe: two-stage surrogate, token IS, entropy-bounded rollouts at the fixed gamma (the ablation runner
# overrides these per configuration)
DEMO_TRAINER_RECIPE = {
    "sampler": "entropy_bounded",
    "likelihood": "two_stage",
    "is_correction": "token",
    "p_mask_prompt": 0.0,
}
JOINT_HEAD = "joint"


def train_diffpo(
    settings: DemoSettings,
    model,
    tokenizer,
    train_rows,
    *,
    trainer_overrides: dict | None = None,
    head_mode: str | None = JOINT_HEAD,
    progress_description: str = "DiFFPO",
):
    """Train ``model`` with DiffpoTrainer (+ a SamplerHeadCallback unless ``head_mode`` is None).

    Returns ``(trainer, callback, info)`` (``callback`` is None without a head).

    Args:
        trainer_overrides: :class:`~trl_diffpo.DiffpoConfig` fields replacing the demo's recipe
            (:data:`DEMO_TRAINER_RECIPE`), e.g. ``{"likelihood": "mean_field", "is_correction": "none"}``.
        head_mode: ``"joint"`` (the demo), ``"sampler_only"`` (frozen model, the head learns) or None (model only).
        progress_description: the label of the progress bar.
    """
    from .config import DiffpoConfig
    from .rewards import sudoku_reward, sudoku_strict_reward
    from .sampler_head import SamplerHeadCallback
    from .samplers import FIXED_SCHEDULE_SAMPLERS
    from .trainer import DiffpoTrainer

    batch = settings.prompts_per_step * settings.num_generations
    recipe = {**DEMO_TRAINER_RECIPE, "threshold": settings.fixed_threshold, **(trainer_overrides or {})}
    if recipe["sampler"] in FIXED_SCHEDULE_SAMPLERS:  # top-k rollouts have no threshold
        recipe["threshold"] = None
    args = DiffpoConfig(
        output_dir=os.path.join(settings.output_dir, "rl_run"),
        max_steps=settings.rl_steps,
        per_device_train_batch_size=batch,
        num_generations=settings.num_generations,
        gradient_accumulation_steps=1,
        num_iterations=settings.num_iterations,
        learning_rate=settings.rl_learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        beta=0.0,
        epsilon=settings.epsilon,
        temperature=settings.rl_temperature,
        max_completion_length=settings.gen_length,
        block_length=settings.gen_length,
        reward_weights=[1.0, 1.0],
        bf16=False,
        activation_checkpointing=False,
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        save_strategy="no",
        logging_steps=max(1, settings.rl_steps // 12),
        seed=settings.seed,
        disable_tqdm=True,
        log_completions=False,
        **recipe,
    )
    callback = (
        None
        if head_mode is None
        else SamplerHeadCallback(
            mode=head_mode,
            nfe_penalty=settings.nfe_penalty,
            head_learning_rate=settings.head_learning_rate,
            threshold_min=0.0,
            threshold_max=settings.threshold_max,
            init_threshold=settings.fixed_threshold,
            sigma=settings.head_sigma,
            scale_advantages=settings.head_scale_advantages,
            mlp_hidden_size=64,
            features=settings.head_features,
            seed=settings.seed,
        )
    )
    trainer = DiffpoTrainer(
        model=model,
        reward_funcs=[sudoku_reward, sudoku_strict_reward],
        args=args,
        train_dataset=train_rows,
        processing_class=tokenizer,
        callbacks=[] if callback is None else [callback],
    )
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for default_callback in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(default_callback)
    trainer.add_callback(_progress_callback(progress_description))
    head = "no sampler head" if head_mode is None else f"{head_mode.replace('_', '-')} sampler head"
    print(
        f"[{progress_description}] {settings.rl_steps} steps x {settings.prompts_per_step} prompts x "
        f"{settings.num_generations} rollouts ({args.likelihood} surrogate, IS {args.is_correction}, {args.sampler} "
        f"sampler, {head})"
    )
    started = time.perf_counter()
    trainer.train()
    info = {"rl_seconds": time.perf_counter() - started, "log_history": trainer.state.log_history}
    try:  # the trainer's scratch folder stays empty (save_strategy="no"); the model goes to <output_dir>/model
        os.rmdir(args.output_dir)
    except OSError:
        pass
    return trainer, callback, info


# --------------------------------------------------------------------------------------------------------------------
# Evaluation and report
# --------------------------------------------------------------------------------------------------------------------


def fixed_setting(settings: DemoSettings):
    """The entropy-bounded setting at the demo's fixed gamma."""
    from .evaluation import SamplerSetting

    return SamplerSetting("entropy_bounded", threshold=settings.fixed_threshold)


def evaluate_held_out(settings: DemoSettings, model, tokenizer, rows, sampler_settings, head=None, show_progress=True):
    """:func:`trl_diffpo.evaluation.evaluate` of ``model`` on Sudoku ``rows`` with the demo's decoding settings."""
    from .evaluation import evaluate

    return evaluate(
        model,
        tokenizer,
        rows,
        sampler_settings,
        task="sudoku",
        sampler_head=head,
        gen_length=settings.gen_length,
        block_length=settings.gen_length,
        batch_size=settings.eval_batch_size,
        seed=settings.seed,
        show_progress=show_progress,
    )


def _relabel(results, prefix: str):
    return [dataclasses.replace(result, label=f"{prefix} {result.label}") for result in results.settings]


def run_demo(settings: DemoSettings) -> dict:
    """Run every phase; returns the results dict (also written to ``<output_dir>/demo_results.json``)."""
    from .evaluation import SamplerSetting, plot_accuracy_vs_nfe
    from .tiny import build_char_tokenizer

    if settings.threads:
        torch.set_num_threads(settings.threads)
    started = time.perf_counter()
    os.makedirs(settings.output_dir, exist_ok=True)
    tokenizer = build_char_tokenizer()
    train_rows, validation_rows, held_out = build_sudoku_data(settings, tokenizer)
    held_out.to_json(os.path.join(settings.output_dir, HELD_OUT_FILE))
    print(
        f"[data] 4x4 Sudoku, {settings.min_blanks}-{settings.max_blanks} blanks: {len(train_rows)} training and "
        f"{len(held_out)} held-out puzzles (disjoint solution grids); torch threads: {torch.get_num_threads()}"
    )

    model, warmup_info = warmup_model(settings, tokenizer, train_rows, validation_rows)
    fixed = fixed_setting(settings)
    sweep = [SamplerSetting("entropy_bounded", threshold=t) for t in settings.sweep_thresholds]
    sweep = [s for s in sweep if s != fixed]
    print(f"[eval] warm-up model on {len(held_out)} held-out puzzles")
    before = evaluate_held_out(settings, model, tokenizer, held_out, [fixed, *sweep])

    trainer, callback, rl_info = train_diffpo(settings, model, tokenizer, train_rows)
    rl_model = trainer.model
    head = callback.head
    model_folder = os.path.join(settings.output_dir, MODEL_FOLDER)
    trainer.save_model(model_folder)
    tokenizer.save_pretrained(model_folder)
    print(f"[eval] DiFFPO model on {len(held_out)} held-out puzzles")
    eval_started = time.perf_counter()
    after = evaluate_held_out(
        settings,
        rl_model,
        tokenizer,
        held_out,
        [fixed, SamplerSetting("entropy_bounded", learned=True), *sweep],
        head=head,
    )
    eval_seconds = time.perf_counter() - eval_started

    rows = summary_rows(before, after)
    targets = check_targets(rows)
    frontier = frontier_gain(before, after)
    plot_settings = _relabel(before, "warm-up") + _relabel(after, "DiFFPO")
    plot_accuracy_vs_nfe(
        plot_settings,
        os.path.join(settings.output_dir, PLOT_FILE),
        title="4x4 Sudoku, held-out: accuracy vs NFE (entropy-bounded sampler)",
        group_by=lambda r: r.label.split(" ", 1)[0] + (" learned" if r.learned else " fixed gamma"),
    )
    total_seconds = time.perf_counter() - started
    results = {
        "format_version": DEMO_FORMAT_VERSION,
        "settings": dataclasses.asdict(settings),
        "summary": rows,
        "targets": targets,
        "frontier": frontier,
        "warmup": {k: v for k, v in warmup_info.items() if k != "sft_history"},
        "sft_history": warmup_info.get("sft_history"),
        "before": before.to_dict(),
        "after": after.to_dict(),
        "rl_seconds": rl_info["rl_seconds"],
        "rl_log_history": rl_info["log_history"],
        "final_eval_seconds": eval_seconds,
        "total_seconds": total_seconds,
        "torch_threads": torch.get_num_threads(),
    }
    with open(os.path.join(settings.output_dir, RESULTS_FILE), "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2, default=str)

    print("\n" + "=" * 72)
    print(f"DiFFPO demo: 4x4 Sudoku, {len(held_out)} held-out puzzles, greedy decoding, entropy-bounded sampler")
    print("=" * 72)
    print(format_table(rows))
    print("-" * 72)
    print(
        f"RL accuracy gain (b - a): {100 * targets['accuracy_gain']:+.1f} points "
        f"(target >= {100 * TARGET_ACCURACY_GAIN:.0f}: {'met' if targets['accuracy_gain_met'] else 'missed'})"
    )
    print(
        f"learned vs fixed threshold (c vs b): accuracy {100 * targets['learned_vs_fixed_accuracy']:+.1f} points, "
        f"{100 * targets['nfe_saving']:.0f}% fewer NFEs (target: no accuracy loss and >= "
        f"{100 * TARGET_NFE_SAVING:.0f}% fewer: {'met' if targets['learned_threshold_met'] else 'missed'})"
    )
    print(format_frontier_gain(frontier))
    warmup_time = "cached" if warmup_info.get("cached") else f"{warmup_info['sft_seconds']:.0f} s"
    print(
        f"time: total {total_seconds / 60:.1f} min (warm-up {warmup_time}, DiFFPO {rl_info['rl_seconds']:.0f} s), "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"wrote {settings.output_dir}/{{{RESULTS_FILE}, {PLOT_FILE}, {HELD_OUT_FILE}, {MODEL_FOLDER}/}}")
    print(
        f"re-evaluate: trl-diffpo eval --model {model_folder} --task sudoku --data-file "
        f"{os.path.join(settings.output_dir, HELD_OUT_FILE)} --raw-prompts --gen-length {settings.gen_length} "
        f"--block-length {settings.gen_length} --use-head --samplers entropy_bounded:{settings.fixed_threshold:g}"
    )
    return results


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``trl-diffpo demo``."""
    settings = parse_settings(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.WARNING)
    run_demo(settings)
    return 0
