"""`trl-diffpo ablate`: the grid format, the summary statistics, the GPU recipe commands, and a CI smoke of the runner
(2 configurations x 2 seeds, a few steps: table and plot written, statistics equal hand-computed ones, resume)."""

import json
import os
import statistics

import numpy as np
import pytest
import yaml

from trl_diffpo.ablation import frontier, load_grid, parse_grid
from trl_diffpo.ablation.cli import main
from trl_diffpo.ablation.recipe import _evaluation as recipe_evaluation
from trl_diffpo.ablation.recipe import eval_command, train_command
from trl_diffpo.ablation.records import WARMUP_NAME, load_records
from trl_diffpo.ablation.summary import accuracy_at_nfe, markdown_table, nfe_at_accuracy, summarise
from trl_diffpo.evaluation import pareto_front

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY_BASE = {
    "num_train": 64,
    "num_held_out": 16,
    "hidden_size": 32,
    "num_layers": 1,
    "num_heads": 2,
    "sft_steps": 4,
    "sft_batch_size": 16,
    "sft_eval_every": 4,
    "num_validation": 8,
    "sft_target_accuracy": None,
    "rl_steps": 2,
    "prompts_per_step": 2,
    "num_generations": 4,
    "eval_batch_size": 16,
    "threads": 1,
}


def _grid(output_dir, **changes):
    raw = {
        "name": "smoke",
        "backend": "sudoku_cpu",
        "output_dir": str(output_dir),
        "seeds": [0, 1],
        "base": dict(TINY_BASE),
        "evaluation": {"fixed_threshold": 0.1, "thresholds": [0.5, 2.0]},
        "configurations": [
            {
                "name": "d1 top-k",
                "trainer": {
                    "likelihood": "mean_field",
                    "is_correction": "none",
                    "sampler": "low_confidence",
                    "diffusion_steps": 10,
                },
            },
            {"name": "joint", "trainer": {"likelihood": "two_stage"}, "head": "joint"},
        ],
    }
    raw.update(changes)
    return raw


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--config", "--seeds", "--only", "--dry-run", "--summarise-only", "--rerun-changed", "--kl-model"):
        assert option in text


def test_ablate_is_a_trl_diffpo_subcommand(capsys):
    from trl_diffpo.cli import main as trl_diffpo_main

    assert "ablate" in (trl_diffpo_main([]) == 0 and capsys.readouterr().out)
    with pytest.raises(SystemExit) as exit_info:
        trl_diffpo_main(["ablate", "--help"])
    assert exit_info.value.code == 0 and "trl-diffpo ablate" in capsys.readouterr().out


def test_the_shipped_grids_parse():
    cpu = load_grid(os.path.join(ROOT, "examples/ablation/sudoku_cpu.yaml"))
    assert len(cpu.configurations) == 8 and len(cpu.seeds) >= 3
    heads = {c.name: c.head for c in cpu.configurations}
    assert heads["sampler-only"] == "sampler_only" and heads["joint model + head"] == "joint"
    assert {c.trainer.get("likelihood") for c in cpu.configurations} == {"mean_field", "two_stage", "k_stage"}
    assert {c.trainer.get("is_correction") for c in cpu.configurations} == {"none", "token", "sequence"}
    assert cpu.fixed_threshold in cpu.sweep and cpu.kl_per_step["configuration"] in heads
    gpu = load_grid(os.path.join(ROOT, "examples/ablation/llada_sudoku_gpu.yaml"))
    assert gpu.backend == "recipe" and len(gpu.configurations) == 8


@pytest.mark.parametrize(
    "change,message",
    [
        ({"seedz": [0]}, "unknown top-level keys"),
        ({"seeds": [0, 0]}, "distinct integers"),
        ({"evaluation": {"thresholds": [0.1]}}, "fixed_threshold"),
        ({"base": {"rl_stepz": 3}}, "unknown `base` settings"),
        ({"base": {"seed": 3}}, "may not set"),
        ({"configurations": [{"name": "a"}, {"name": "a"}]}, "names repeat"),
        ({"configurations": [{"name": "a", "head": "both"}]}, "head='both'"),
        ({"configurations": [{"name": "a", "trainer": {"sampler": "low_confidence"}}]}, "diffusion_steps"),
        (
            {
                "configurations": [
                    {"name": "a", "trainer": {"sampler": "random", "diffusion_steps": 4}, "head": "joint"}
                ]
            },
            "head: none",
        ),
        ({"backend": "recipe"}, "recipe.config"),
    ],
)
def test_grid_errors_name_the_problem(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        parse_grid(_grid(tmp_path, **change))


def test_frontier_interpolation_by_hand():
    points = [
        {"mean_nfe": 4.0, "accuracy": 0.2},
        {"mean_nfe": 8.0, "accuracy": 0.5},
        {"mean_nfe": 6.0, "accuracy": 0.1},  # dominated by (4, 0.2)
        {"mean_nfe": 12.0, "accuracy": 0.6},
    ]
    front = frontier(points)
    assert front == [(4.0, 0.2), (8.0, 0.5), (12.0, 0.6)]
    assert accuracy_at_nfe(front, 3.0) is None
    assert accuracy_at_nfe(front, 6.0) == pytest.approx(0.35)
    assert accuracy_at_nfe(front, 20.0) == pytest.approx(0.6)
    assert nfe_at_accuracy(front, 0.1) == pytest.approx(4.0)
    assert nfe_at_accuracy(front, 0.55) == pytest.approx(10.0)
    assert nfe_at_accuracy(front, 0.7) is None


def _record(name, seed, points, learned=None, seconds=10.0):
    return {
        "configuration": {"name": name},
        "seed": seed,
        "training": {"seconds": seconds},
        "evaluation": {
            "fixed_threshold": 0.1,
            "points": [{"threshold": t, "accuracy": a, "mean_nfe": n} for t, a, n in points],
            "learned": learned,
        },
    }


def test_summary_statistics_by_hand():
    """Varied synthetic records: every cell is the mean / sample std / n of values worked out here by hand."""
    records = [
        _record(WARMUP_NAME, 0, [(0.1, 0.30, 10.0), (1.0, 0.10, 4.0)], seconds=None),
        _record(WARMUP_NAME, 1, [(0.1, 0.20, 12.0), (1.0, 0.10, 6.0)], seconds=None),
        _record("rl", 0, [(0.1, 0.50, 8.0), (1.0, 0.30, 4.0)], learned={"accuracy": 0.4, "mean_nfe": 5.0}),
        _record(
            "rl", 1, [(0.1, 0.40, 10.0), (1.0, 0.10, 5.0)], learned={"accuracy": 0.2, "mean_nfe": 7.0}, seconds=20
        ),
    ]
    summary = summarise(records)
    rows = {row["name"]: row for row in summary["configurations"]}
    rl = rows["rl"]["metrics"]
    assert rl["accuracy"]["mean"] == pytest.approx(0.45) and rl["accuracy"]["std"] == pytest.approx(0.0707106781)
    assert rl["mean_nfe"]["mean"] == pytest.approx(9.0) and rl["mean_nfe"]["std"] == pytest.approx(1.4142135623)
    # seed 0: warm-up NFE 10 is beyond rl's frontier (4 -> 0.3, 8 -> 0.5): 0.5; seed 1: frontier (5, 0.1), (10, 0.4)
    # at NFE 12: beyond it, 0.4
    assert rl["accuracy_at_matched_nfe"]["mean"] == pytest.approx(0.45)
    # seed 0: accuracy 0.3 already at NFE 4; seed 1: 0.2 on (5, 0.1)-(10, 0.4) at NFE 5 + 5 * 0.1 / 0.3
    assert rl["nfe_at_matched_accuracy"]["mean"] == pytest.approx((4.0 + 5.0 + 5.0 / 3.0) / 2)
    assert rl["learned_accuracy"]["mean"] == pytest.approx(0.3) and rl["learned_nfe"]["std"] == pytest.approx(
        1.41421356
    )
    assert rl["train_seconds"]["mean"] == pytest.approx(15.0) and rl["train_seconds"]["n"] == 2
    warm = rows[WARMUP_NAME]["metrics"]
    assert warm["train_seconds"]["n"] == 0 and warm["learned_accuracy"]["mean"] is None
    assert warm["accuracy_at_matched_nfe"]["mean"] == pytest.approx(0.25)  # the reference itself
    sweep = {p["threshold"]: p for p in rows["rl"]["sweep"]}
    assert sweep[1.0]["accuracy"]["mean"] == pytest.approx(0.2) and sweep[1.0]["mean_nfe"]["mean"] == pytest.approx(
        4.5
    )
    # a frontier that never reaches the reference accuracy lowers n, and the table says so
    records.append(_record("weak", 0, [(0.1, 0.1, 3.0)]))
    records.append(_record("weak", 1, [(0.1, 0.3, 3.0)]))
    weak = {row["name"]: row for row in summarise(records)["configurations"]}["weak"]["metrics"]
    assert weak["nfe_at_matched_accuracy"]["n"] == 1 and weak["nfe_at_matched_accuracy"]["std"] is None
    assert weak["accuracy_at_matched_nfe"]["mean"] == pytest.approx(0.2)
    table = markdown_table(summarise(records))
    assert "| rl | 2 | 45.0 ± 7.1 | 9.00 ± 1.41 |" in table and "3.00 (n=1)" in table


def test_recipe_commands(tmp_path):
    grid = load_grid(os.path.join(ROOT, "examples/ablation/llada_sudoku_gpu.yaml"))
    by_name = {c.name: c for c in grid.configurations}
    command = train_command(grid, by_name["K-stage K=4 + token IS"], 2, str(tmp_path))
    text = " ".join(command)
    assert command[:2] == ["accelerate", "launch"] and "-m trl_diffpo train --config" in text
    assert "--seed 2" in text and "--likelihood k_stage" in text and "--num_stages 4" in text
    assert "--use_sampler_head false" in text and "--max_steps 200" in text
    joint = " ".join(train_command(grid, by_name["joint model + head"], 0, str(tmp_path)))
    assert "--use_sampler_head true --sampler_head_mode joint" in joint
    evaluation = eval_command(grid, str(tmp_path / "model"), 0, str(tmp_path), learned=True)
    assert evaluation[evaluation.index("--samplers") + 1] == "entropy_bounded:0.02,0.1,0.3,1,learned"
    # the record's evaluation comes from trl-diffpo eval's results.json
    (tmp_path / "eval").mkdir()
    settings = [
        {"label": "entropy_bounded:0.3", "threshold": 0.3, "learned": False, "accuracy": 0.2, "mean_nfe": 5.0},
        {"label": "entropy_bounded:learned", "threshold": None, "learned": True, "accuracy": 0.3, "mean_nfe": 6.0},
        {"label": "entropy_bounded:0.1", "threshold": 0.1, "learned": False, "accuracy": 0.4, "mean_nfe": 9.0},
    ]
    (tmp_path / "eval" / "results.json").write_text(json.dumps({"settings": settings}))
    record = recipe_evaluation(grid, str(tmp_path))
    assert [p["threshold"] for p in record["points"]] == [0.1, 0.3] and record["learned"]["accuracy"] == 0.3


def _hand_interpolate(points, x_name, y_name, x):
    """The frontier read by numpy: Pareto points (evaluation.pareto_front), linear between them."""
    flags = pareto_front([(p["mean_nfe"], p["accuracy"]) for p in points])
    front = sorted({(p[x_name], p[y_name]) for p, f in zip(points, flags) if f})
    xs, ys = [a for a, _ in front], [b for _, b in front]
    if x_name == "mean_nfe" and x < xs[0]:
        return None
    if x_name == "accuracy" and x > xs[-1]:
        return None
    return float(np.interp(x, xs, ys))


def test_smoke_two_configurations_two_seeds(tmp_path, capsys):
    output_dir = tmp_path / "ablation"
    config = tmp_path / "grid.yaml"
    raw = _grid(output_dir, kl_per_step={"configuration": "joint", "seed": 0, "num_prompts": 4})
    config.write_text(yaml.safe_dump(raw))
    assert main(["--config", str(config), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "[ablate 6/6]" in printed and "| joint | 2 |" in printed

    # files
    assert (output_dir / "frontiers.png").read_bytes()[:8] == PNG_SIGNATURE
    assert (output_dir / "kl_per_step" / "kl_per_step.png").read_bytes()[:8] == PNG_SIGNATURE
    table = (output_dir / "summary.md").read_text()
    summary = json.loads((output_dir / "summary.json").read_text())
    records = load_records(str(output_dir))
    assert len(records) == 6
    for record in records:
        assert {"configuration", "seed", "settings", "training", "evaluation", "fingerprint"} <= set(record)
        assert [p["threshold"] for p in record["evaluation"]["points"]] == [0.1, 0.5, 2.0]
    joint_records = [r for r in records if r["configuration"]["name"] == "joint"]
    assert all(r["evaluation"]["learned"] is not None for r in joint_records)
    assert all(r["training"]["curves"] for r in joint_records)

    # summary statistics = hand-computed ones from the records
    rows = {row["name"]: row for row in summary["configurations"]}
    assert list(rows) == [WARMUP_NAME, "d1 top-k", "joint"]
    warmup = {r["seed"]: r for r in records if r["configuration"]["name"] == WARMUP_NAME}

    def fixed(record):
        return next(p for p in record["evaluation"]["points"] if p["threshold"] == 0.1)

    for name in ("d1 top-k", "joint"):
        runs = sorted((r for r in records if r["configuration"]["name"] == name), key=lambda r: r["seed"])
        metrics = rows[name]["metrics"]
        accuracy = [fixed(r)["accuracy"] for r in runs]
        nfe = [fixed(r)["mean_nfe"] for r in runs]
        assert metrics["accuracy"]["mean"] == pytest.approx(statistics.fmean(accuracy))
        assert metrics["accuracy"]["std"] == pytest.approx(statistics.stdev(accuracy))
        assert metrics["mean_nfe"]["mean"] == pytest.approx(statistics.fmean(nfe))
        assert metrics["mean_nfe"]["std"] == pytest.approx(statistics.stdev(nfe))
        assert metrics["accuracy"]["n"] == metrics["mean_nfe"]["n"] == 2
        at_nfe = [
            _hand_interpolate(r["evaluation"]["points"], "mean_nfe", "accuracy", fixed(warmup[r["seed"]])["mean_nfe"])
            for r in runs
        ]
        at_accuracy = [
            _hand_interpolate(r["evaluation"]["points"], "accuracy", "mean_nfe", fixed(warmup[r["seed"]])["accuracy"])
            for r in runs
        ]
        for metric, values in (("accuracy_at_matched_nfe", at_nfe), ("nfe_at_matched_accuracy", at_accuracy)):
            defined = [v for v in values if v is not None]
            assert metrics[metric]["n"] == len(defined)
            if defined:
                assert metrics[metric]["mean"] == pytest.approx(statistics.fmean(defined))
        mean_cell = f"{100 * statistics.fmean(accuracy):.1f} ± {100 * statistics.stdev(accuracy):.1f}"
        assert f"| {name} | 2 | {mean_cell} |" in table
        for point in rows[name]["sweep"]:  # what the plot draws: per-threshold means over seeds
            nfe_at = [
                p["mean_nfe"] for r in runs for p in r["evaluation"]["points"] if p["threshold"] == point["threshold"]
            ]
            assert point["mean_nfe"]["mean"] == pytest.approx(statistics.fmean(nfe_at))
            assert point["mean_nfe"]["std"] == pytest.approx(statistics.stdev(nfe_at))
    learned = [r["evaluation"]["learned"]["accuracy"] for r in joint_records]
    assert rows["joint"]["metrics"]["learned_accuracy"]["mean"] == pytest.approx(statistics.fmean(learned))
    assert rows["d1 top-k"]["metrics"]["learned_accuracy"]["n"] == 0

    # resume: nothing is re-run, records untouched
    stamps = {path: os.path.getmtime(path) for path in (output_dir / "runs").rglob("seed-*.json")}
    assert main(["--config", str(config), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "6 finished, 0 to run" in printed and "[ablate 1/" not in printed
    assert stamps == {path: os.path.getmtime(path) for path in (output_dir / "runs").rglob("seed-*.json")}

    # a changed grid never mixes with old records silently
    raw["base"]["rl_steps"] = 3
    config.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="other settings"):
        main(["--config", str(config), "--dry-run"])


def test_every_configuration_of_the_shipped_cpu_grid_trains(tmp_path, capsys):
    """The default grid, shrunk to one step and one seed: each of its 8 configurations trains and is evaluated."""
    raw = yaml.safe_load(open(os.path.join(ROOT, "examples/ablation/sudoku_cpu.yaml")))
    raw.update(seeds=[0], output_dir=str(tmp_path / "all"), base={**TINY_BASE, "rl_steps": 1})
    raw["kl_per_step"]["num_prompts"] = 4
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["--config", str(config), "--no-progress"]) == 0
    records = load_records(str(tmp_path / "all"))
    assert len(records) == 9
    by_name = {r["configuration"]["name"]: r for r in records}
    assert by_name["d1: mean-field, no IS, top-k"]["trainer_config"]["sampler"] == "low_confidence"
    assert by_name["K-stage K=4 + token IS"]["trainer_config"]["num_stages"] == 4
    assert by_name["two-stage + sequence IS"]["trainer_config"]["is_correction"] == "sequence"
    assert by_name["sampler-only"]["evaluation"]["learned"] is not None
    assert "kl_per_step" in by_name["two-stage + token IS"]


def test_shipped_cache_grid_trains_its_second_configuration_with_cached_rollouts(tmp_path):
    """examples/ablation/sudoku_cache.yaml (issue 14): the same recipe as the CPU grid, with and without the cache."""
    raw = yaml.safe_load(open(os.path.join(ROOT, "examples/ablation/sudoku_cache.yaml")))
    main_grid = yaml.safe_load(open(os.path.join(ROOT, "examples/ablation/sudoku_cpu.yaml")))
    # the RL budget and evaluation are the main grid's; the warm-up is pinned to the recipe its study ran with
    warmup_keys = {"sft_target_accuracy", "sft_eval_every", "sft_eval_start", "num_validation", "validation_split"}
    assert {k: v for k, v in raw["base"].items() if k not in warmup_keys} == {
        k: v for k, v in main_grid["base"].items() if k not in warmup_keys
    }
    assert raw["evaluation"]["fixed_threshold"] == main_grid["evaluation"]["fixed_threshold"]
    raw.update(seeds=[0], output_dir=str(tmp_path / "cache"), base={**TINY_BASE, "rl_steps": 1})
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["--config", str(config), "--no-progress"]) == 0
    by_name = {r["configuration"]["name"]: r for r in load_records(str(tmp_path / "cache"))}
    assert by_name["two-stage + token IS"]["trainer_config"]["rollout_cache"] == "none"
    assert by_name["two-stage + token IS, prefix cache"]["trainer_config"]["rollout_cache"] == "prefix"


def test_kl_figure_of_a_saved_model(tmp_path, capsys):
    from trl_diffpo.tiny import build_char_tokenizer, build_tiny_model

    tokenizer = build_char_tokenizer()
    folder = tmp_path / "model"
    build_tiny_model(
        tokenizer, hidden_size=32, num_layers=1, num_heads=2, max_position_embeddings=128
    ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump(_grid(tmp_path / "out")))
    argv = ["--config", str(config), "--kl-model", str(folder), "--kl-prompts", "4", "--kl-threshold", "0.5"]
    assert main(argv) == 0
    assert "[kl] " in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "kl_per_step" / "kl_per_step.json").read_text())
    assert report["settings"]["num_prompts"] == 4 and report["settings"]["threshold"] == 0.5
    assert report["overall"]["num_tokens"] == sum(report["num_tokens"]) > 0
    assert not (tmp_path / "out" / "runs").exists()  # --kl-model does not run the grid


def test_learned_point_against_the_reference_frontier_by_hand():
    from trl_diffpo.ablation.summary import learned_vs_reference, learned_vs_reference_table

    model_only = [(0.1, 0.30, 10.0), (0.3, 0.20, 5.0), (1.0, 0.10, 2.0)]
    records = [
        _record("model-only", 0, model_only),
        _record("model-only", 1, model_only),
        # seed 0: 25% at 6 NFE; the reference reaches 25% at 5 + (25 - 20) / (30 - 20) * 5 = 7.5 NFE -> saving 20%;
        # at 6 NFE the reference frontier gives 20 + (6 - 5) / 5 * 10 = 22%: +3 points
        _record("joint, state head", 0, model_only, learned={"accuracy": 0.25, "mean_nfe": 6.0}),
        # seed 1: 35% (above the reference's best, 30% at 10 NFE) at 9 NFE -> saving 1 - 9 / 10 = 10%
        _record("joint, state head", 1, model_only, learned={"accuracy": 0.35, "mean_nfe": 9.0}),
        _record("model-only", 2, model_only),  # a seed without the head configuration is skipped
    ]
    (row,) = learned_vs_reference(records, "model-only")
    assert row["seeds"] == [0, 1] and row["target_met_seeds"] == 1
    seed0, seed1 = row["per_seed"]["0"], row["per_seed"]["1"]
    assert seed0["reference_nfe"] == pytest.approx(7.5) and seed0["nfe_saving"] == pytest.approx(0.2)
    assert seed0["accuracy_vs_reference"] == pytest.approx(0.03) and seed0["target_met"]
    assert seed1["reference_nfe"] == 10.0 and seed1["nfe_saving"] == pytest.approx(0.1) and not seed1["target_met"]
    assert seed1["accuracy_vs_reference"] == pytest.approx(0.35 - (0.20 + 0.8 * 0.10))
    assert row["metrics"]["nfe_saving"]["mean"] == pytest.approx(0.15)
    assert row["metrics"]["nfe_saving"]["std"] == pytest.approx(statistics.stdev([0.2, 0.1]))
    table = learned_vs_reference_table([row])
    assert "| joint, state head | 2 | 30.0 ± 7.1 | 7.50 ± 2.12 | 8.75 ± 1.77 | 15.0 ± 7.1 |" in table
    assert "| 1 of 2 |" in table


def test_learned_reference_must_name_a_configuration(tmp_path):
    from trl_diffpo.ablation.grid import parse_grid

    raw = {
        "seeds": [0],
        "evaluation": {"fixed_threshold": 0.1, "learned_reference": "nope"},
        "configurations": [{"name": "model-only", "trainer": {}}],
    }
    with pytest.raises(ValueError, match="learned_reference='nope' is not one of"):
        parse_grid(raw)
    raw["evaluation"]["learned_reference"] = "model-only"
    assert parse_grid(raw).learned_reference == "model-only"
    assert "learned_reference" not in parse_grid(raw).evaluation  # summary only: fingerprints do not change


def _comparable(record):
    """A record without what depends on the clock or the process (timings, paths of the run, the warm-up cache)."""
    curves = [{k: v for k, v in row.items() if "time" not in k} for row in record["training"]["curves"]]
    return {
        "configuration": record["configuration"]["name"],
        "seed": record["seed"],
        "fingerprint": record["fingerprint"],
        "curves": curves,
        "evaluation": record["evaluation"],
    }


def test_jobs_runs_side_by_side_and_matches_the_sequential_records(tmp_path, capsys):
    """--jobs 2: the same records as one lane (one torch thread each), every run once, warm-ups before their runs."""
    raw = _grid(tmp_path / "one-lane")
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["--config", str(config), "--no-progress", "--threads", "1"]) == 0
    sequential = sorted(map(_comparable, load_records(str(tmp_path / "one-lane"))), key=str)
    capsys.readouterr()

    parallel_dir = tmp_path / "two-lanes"
    args = [
        "--config",
        str(config),
        "--output-dir",
        str(parallel_dir),
        "--no-progress",
        "--jobs",
        "2",
        "--threads",
        "1",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert sorted(map(_comparable, load_records(str(parallel_dir))), key=str) == sequential
    assert "6 runs in" in printed and "(2 job(s))" in printed and "| joint | 2 |" in printed
    for seed in (0, 1):  # a seed's configurations start only once its warm-up reference is recorded
        warmup_done = printed.index(f"{WARMUP_NAME}, seed {seed} done")
        for name in ("d1 top-k", "joint"):
            assert printed.index(f"] {name}, seed {seed} (elapsed") > warmup_done
    assert main(args) == 0 and "6 finished, 0 to run" in capsys.readouterr().out  # resumable as before


def test_jobs_a_failing_run_is_named_and_the_others_are_recorded(tmp_path):
    raw = _grid(tmp_path / "out", seeds=[0])
    raw["configurations"][1]["trainer"] = {"likelihood": "no_such_surrogate"}  # DiffpoConfig refuses it in the worker
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump(raw))
    with pytest.raises(RuntimeError, match=r"first: joint, seed 0: .*no_such_surrogate.*run the same command again"):
        main(["--config", str(config), "--no-progress", "--jobs", "2", "--threads", "1"])
    names = {r["configuration"]["name"] for r in load_records(str(tmp_path / "out"))}
    assert names == {WARMUP_NAME, "d1 top-k"}


def test_jobs_refuses_the_recipe_backend_and_bad_counts(tmp_path, capsys):
    from trl_diffpo.ablation.parallel import run_parallel

    gpu = load_grid(os.path.join(ROOT, "examples/ablation/llada_sudoku_gpu.yaml"))
    with pytest.raises(ValueError, match="--jobs 1"):
        run_parallel(gpu, [], 2, None, on_record=print, on_start=print)
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump(_grid(tmp_path / "out")))
    assert main(["--config", str(config), "--jobs", "0"]) == 2
    assert "--jobs must be >= 1" in capsys.readouterr().err


def test_a_worker_ends_when_its_parent_is_killed(tmp_path):
    """--jobs workers watch their parent: killed (e.g. Ctrl-C twice, SIGKILL), it leaves no orphan computing on."""
    import signal
    import subprocess
    import sys
    import time

    ready = tmp_path / "ready"  # written once the worker has imported the package (seconds on a loaded CI machine)
    worker = (
        "import pathlib, sys; from trl_diffpo.ablation.parallel import _exit_with_parent; "
        "pathlib.Path(sys.argv[2]).write_text('ready'); _exit_with_parent(int(sys.argv[1]), every=0.05)"
    )
    parent = (
        "import os, subprocess, sys, time; "
        f"child = subprocess.Popen([sys.executable, '-c', {worker!r}, str(os.getpid()), {str(ready)!r}]); "
        "print(child.pid, flush=True); time.sleep(600)"
    )
    middle = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    child_pid = int(middle.stdout.readline())

    def running(pid):
        try:
            with open(f"/proc/{pid}/status") as status:
                return "\nState:\tZ" not in status.read()  # a zombie has exited (nobody reaped it yet)
        except FileNotFoundError:
            return False

    def wait_until(condition, seconds):
        deadline = time.monotonic() + seconds
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.05)
        return condition()

    try:
        assert wait_until(ready.exists, 300), "the worker never finished importing trl_diffpo"
        time.sleep(0.2)
        assert running(child_pid)  # watching its (alive) parent, not exiting on its own
        middle.send_signal(signal.SIGKILL)
        middle.wait()
        assert wait_until(lambda: not running(child_pid), 30)
    finally:
        middle.kill()
        if running(child_pid):
            os.kill(child_pid, signal.SIGKILL)


def test_records_name_the_code_that_made_them(tmp_path):
    """Every record carries the package version and, in a git checkout, the commit and whether files differed."""
    import shutil
    import subprocess

    from trl_diffpo import __version__
    from trl_diffpo.ablation.records import code_revision, read_record, write_record

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / "module.py").write_text("x = 1\n")

    def git(*args):
        return subprocess.run(["git", "-C", str(checkout), *args], capture_output=True, text=True, check=True).stdout

    git("init", "-q")
    git("add", "module.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    head = git("rev-parse", "HEAD").strip()
    assert code_revision(str(checkout)) == {"version": __version__, "git_revision": head, "git_dirty": False}
    (checkout / "module.py").write_text("x = 2\n")
    code_revision.cache_clear()
    assert code_revision(str(checkout))["git_dirty"] is True
    outside = tmp_path / "not-a-checkout"
    outside.mkdir()
    assert code_revision(str(outside)) == {"version": __version__, "git_revision": None, "git_dirty": None}

    code_revision.cache_clear()
    path = str(tmp_path / "runs" / "x" / "seed-0.json")
    write_record(path, {"seed": 0})
    assert read_record(path)["code"] == code_revision()
    assert read_record(path)["code"]["version"] == __version__


@pytest.mark.parametrize(
    "grid_file, committed", [("sudoku_cpu.yaml", "sudoku_cpu"), ("sudoku_cpu_60.yaml", "sudoku_cpu_60")]
)
def test_committed_studies_are_what_their_grid_and_records_give(tmp_path, grid_file, committed, capsys):
    """docs/results/<study>: every planned run has a record made with its grid's settings (same fingerprint), and
    the committed summary table is the one the runner rebuilds from those records (the numbers docs/results.md
    quotes)."""
    import dataclasses
    import shutil

    from trl_diffpo.ablation import records
    from trl_diffpo.ablation.runner import _fingerprint, planned_runs, write_outputs

    root = os.path.join(os.path.dirname(__file__), "..")
    study = os.path.join(root, "docs", "results", committed)
    grid = load_grid(os.path.join(root, "examples", "ablation", grid_file))
    grid = dataclasses.replace(grid, output_dir=str(tmp_path))
    shutil.copytree(os.path.join(study, records.RUNS_FOLDER), tmp_path / records.RUNS_FOLDER)
    plan = planned_runs(grid)
    assert len(plan) == len(grid.seeds) * (len(grid.configurations) + 1)
    for configuration, _, path in plan:
        assert records.finished_record(path, _fingerprint(grid, configuration)) is not None, path
    write_outputs(grid)
    capsys.readouterr()
    with open(os.path.join(study, "summary.md"), encoding="utf-8") as handle:
        committed_table = handle.read()
    assert (tmp_path / "summary.md").read_text(encoding="utf-8") == committed_table
