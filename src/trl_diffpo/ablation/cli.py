"""``trl-diffpo ablate``: run an ablation grid (configurations x seeds) from a YAML file, resumably, and summarise it."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys

EXAMPLE = "examples/ablation/sudoku_cpu.yaml"


def build_parser() -> argparse.ArgumentParser:
    """The ``trl-diffpo ablate`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="trl-diffpo ablate",
        description=(
            "Run an ablation grid declared in a YAML file: every configuration x seed trains from the seed's shared "
            "warm-up and is evaluated on the held-out set over a threshold sweep. Writes one JSON record per run "
            "(runs/<configuration>/seed-<n>.json), summary.md / summary.json (mean ± std and n over seeds) and "
            "frontiers.png. Finished runs are skipped: run the same command again to resume. See docs/ablation.md."
        ),
        epilog=f"example: trl-diffpo ablate --config {EXAMPLE} --seeds 0 1 2",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", help=f"the grid YAML file (e.g. {EXAMPLE}); required unless --kl-model only")
    parser.add_argument("--output-dir", help="override the grid's output_dir")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the grid's seeds")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these configurations (names or slugs)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs still to do and stop")
    parser.add_argument("--summarise-only", action="store_true", help="only rebuild the table and plot from records")
    parser.add_argument(
        "--rerun-changed", action="store_true", help="re-run (overwrite) records made with other settings"
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs side by side, each in its own worker process (sudoku_cpu backend; e.g. 2 on a 2-core machine with "
        "--threads 1: the default CPU study in about half the wall time)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (per worker with --jobs; default: torch's choice / OMP_NUM_THREADS, with --jobs the "
        "cores shared evenly)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no evaluation progress bars")
    kl = parser.add_argument_group("KL per timestep (the paper's Figure 2c)")
    kl.add_argument(
        "--kl-model",
        metavar="FOLDER",
        help="a saved model folder (e.g. outputs/demo/model): sample held-out trajectories from it and write "
        "kl_per_step.{json,png} (mean KL of the mean-field / two-stage surrogates to the true step conditional, per "
        "step). With --config, the grid is not run: it only supplies the task settings (demo defaults otherwise).",
    )
    kl.add_argument("--kl-prompts", type=int, default=64, help="held-out prompts to sample trajectories from")
    kl.add_argument(
        "--kl-threshold", type=float, help="EB gamma of the sampled trajectories (default: fixed threshold)"
    )
    kl.add_argument("--kl-temperature", type=float, default=1.0, help="temperature of the sampled trajectories")
    kl.add_argument("--kl-output-dir", help="where kl_per_step.* go (default: <output-dir>/kl_per_step)")
    return parser


def _kl_figure(args, grid) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..demo import DemoSettings, build_sudoku_data
    from .kl_per_step import kl_per_step_on_rows, write_kl_per_step

    if grid is not None:
        from .sudoku_cpu import demo_settings

        settings = demo_settings(grid, grid.seeds[0])
        threshold = grid.fixed_threshold
        output_dir = grid.output_dir
    else:
        settings, output_dir = DemoSettings(), "outputs/ablation"
        threshold = settings.fixed_threshold
    threshold = args.kl_threshold if args.kl_threshold is not None else threshold
    tokenizer = AutoTokenizer.from_pretrained(args.kl_model)
    model = AutoModelForCausalLM.from_pretrained(args.kl_model, dtype=torch.float32).eval()
    _, _, held_out = build_sudoku_data(settings, tokenizer)
    report = kl_per_step_on_rows(
        model,
        tokenizer,
        held_out,
        num_prompts=args.kl_prompts,
        gen_length=settings.gen_length,
        block_length=settings.gen_length,
        threshold=threshold,
        temperature=args.kl_temperature,
        seed=settings.seed,
    )
    report["model"] = args.kl_model
    paths = write_kl_per_step(report, args.kl_output_dir or os.path.join(output_dir, "kl_per_step"))
    overall = report["overall"]
    print(
        f"[kl] {overall['num_tokens']} tokens, mean NFE {overall['mean_nfe']:.2f}: mean KL mean-field "
        f"{overall['kl_mean_field']:.4f}, two-stage {overall['kl_two_stage']:.4f} nats; log-prob gap mean-field "
        f"{overall['logp_gap_mean_field']:.4f}, two-stage {overall['logp_gap_two_stage']:.4f}; wrote {paths['png']}"
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``trl-diffpo ablate``."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.WARNING)
    if args.config is None and args.kl_model is None:
        print("trl-diffpo ablate: give --config GRID.yaml (and/or --kl-model FOLDER); see --help.", file=sys.stderr)
        return 2
    if args.jobs < 1:
        print(f"trl-diffpo ablate: --jobs must be >= 1 (got {args.jobs}).", file=sys.stderr)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    grid = None
    if args.config is not None:
        from .grid import load_grid
        from .runner import run_grid, write_outputs

        grid = load_grid(args.config).select(args.only, args.seeds)
        if args.output_dir:
            grid.output_dir = args.output_dir
        if args.summarise_only:
            write_outputs(grid)
        elif args.kl_model is None:  # with --kl-model the grid only supplies the task settings
            os.makedirs(grid.output_dir, exist_ok=True)
            shutil.copyfile(args.config, os.path.join(grid.output_dir, "grid.yaml"))
            run_grid(
                grid,
                rerun_changed=args.rerun_changed,
                show_progress=not args.no_progress,
                dry_run=args.dry_run,
                jobs=args.jobs,
                threads=args.threads,
            )
    if args.kl_model is not None:
        _kl_figure(args, grid)
    return 0
