"""The offline demo: --help, a shortened run end to end (table, files, model folder with head) and the warm-up cache."""

import json

import pytest

from trl_diffpo.demo import (
    HELD_OUT_FILE,
    MODEL_FOLDER,
    PLOT_FILE,
    RESULTS_FILE,
    DemoSettings,
    check_targets,
    format_frontier_gain,
    frontier_gain,
    main,
    parse_settings,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--output-dir", "--seed", "--quick", "--sft-steps", "--rl-steps", "--fixed-threshold", "--threads"):
        assert option in text


def test_quick_shrinks_every_phase_but_keeps_explicit_values():
    settings = parse_settings(["--quick", "--rl-steps", "3", "--output-dir", "somewhere"])
    assert settings.quick and settings.rl_steps == 3 and settings.output_dir == "somewhere"
    assert settings.sft_steps == 4 and settings.hidden_size == 32
    full = parse_settings([])
    assert full.sft_steps == DemoSettings().sft_steps and not full.quick


def test_warmup_key_depends_on_warmup_settings_only():
    base = DemoSettings()
    assert DemoSettings(rl_steps=7, nfe_penalty=3.0).warmup_key() == base.warmup_key()
    assert DemoSettings(sft_steps=base.sft_steps + 1).warmup_key() != base.warmup_key()
    assert DemoSettings(seed=1).warmup_key() != base.warmup_key()


def test_validation_is_held_out_like_and_never_a_held_out_puzzle():
    from trl_diffpo.data.sudoku_generator import solution_grids_for_split
    from trl_diffpo.demo import build_sudoku_data
    from trl_diffpo.rewards.sudoku import grid_to_string
    from trl_diffpo.tiny import build_char_tokenizer

    settings = DemoSettings(num_train=64, num_held_out=256, num_validation=256, validation_split="test")
    train, validation, held_out = build_sudoku_data(settings, build_char_tokenizer())
    assert len(validation) == 256 and not set(validation["puzzle"]) & set(held_out["puzzle"])
    test_grids = {grid_to_string(grid) for grid in solution_grids_for_split("test")}
    assert set(validation["solution"]) <= test_grids and not set(train["solution"]) & test_grids
    # the default: 64 puzzles of the training grids
    old = DemoSettings(num_train=64, num_held_out=16)
    _, old_validation, _ = build_sudoku_data(old, build_char_tokenizer())
    assert len(old_validation) == 64 and not set(old_validation["solution"]) & test_grids
    with pytest.raises(ValueError, match="validation_split='dev'"):
        DemoSettings(validation_split="dev")
    assert DemoSettings(validation_split="test").warmup_key() != DemoSettings().warmup_key()
    assert DemoSettings(sft_eval_start=100).warmup_key() != DemoSettings().warmup_key()


def test_warmup_validates_from_sft_eval_start_and_stops_at_the_target(tmp_path, monkeypatch):
    """The warm-up measures validation accuracy every sft_eval_every steps from sft_eval_start, and stops there."""
    import trl_diffpo.demo as demo
    from trl_diffpo.tiny import build_char_tokenizer

    settings = DemoSettings(output_dir=str(tmp_path), sft_target_accuracy=0.5, sft_eval_start=4)
    settings.apply_quick()
    settings.sft_steps, settings.sft_eval_every, settings.sft_eval_start = 12, 2, 4
    measured = []

    def fake_evaluate(settings_, model, tokenizer, rows, sampler_settings, **kwargs):
        from types import SimpleNamespace

        measured.append(len(rows))
        accuracy = 0.6 if len(measured) == 3 else 0.1  # the target is reached at the third measurement
        return SimpleNamespace(settings=[SimpleNamespace(accuracy=accuracy)])

    monkeypatch.setattr(demo, "evaluate_held_out", fake_evaluate)
    tokenizer = build_char_tokenizer()
    train, validation, _ = demo.build_sudoku_data(settings, tokenizer)
    _, info = demo.warmup_model(settings, tokenizer, train, validation)
    steps = [(entry["step"], entry.get("val_accuracy")) for entry in info["sft_history"]]
    assert steps == [(2, None), (4, 0.1), (6, 0.1), (8, 0.6)]  # none before step 4; stopped at step 8
    assert info["sft_steps_run"] == 8 and info["validation_accuracy"] == 0.6
    assert measured == [settings.num_validation] * 3


def test_targets():
    rows = [
        {"accuracy": 0.30, "mean_nfe": 8.0},
        {"accuracy": 0.45, "mean_nfe": 8.0},
        {"accuracy": 0.46, "mean_nfe": 6.0},
    ]
    targets = check_targets(rows)
    assert targets["accuracy_gain"] == pytest.approx(0.15) and targets["accuracy_gain_met"]
    assert targets["nfe_saving"] == pytest.approx(0.25) and targets["learned_threshold_met"]
    rows[2]["accuracy"] = 0.44
    assert not check_targets(rows)["learned_threshold_met"]


def _results(*points):
    """An evaluation results stand-in: ``(accuracy, mean_nfe, learned)`` per setting, the fixed one first."""
    from types import SimpleNamespace

    settings = [SimpleNamespace(accuracy=a, mean_nfe=n, learned=learned) for a, n, learned in points]
    return SimpleNamespace(settings=settings)


def test_frontier_gain_reads_the_rl_frontier_at_the_warmup_references():
    # warm-up: fixed 20% @ 16, sweep 22% @ 20 (its best), 15% @ 9; RL: fixed 34% @ 10, 30% @ 5, 38% @ 20, and a
    # learned point 50% @ 2 that must not enter the fixed-threshold frontier
    before = _results((0.20, 16.0, False), (0.22, 20.0, False), (0.15, 9.0, False))
    after = _results((0.34, 10.0, False), (0.50, 2.0, True), (0.30, 5.0, False), (0.38, 20.0, False))
    gain = frontier_gain(before, after)
    assert gain["warmup_best_accuracy"] == 0.22 and gain["warmup_best_nfe"] == 20.0
    assert gain["nfe_to_warmup_best"] == 5.0  # the RL frontier's cheapest point already beats 22%
    assert gain["warmup_fixed_nfe"] == 16.0
    assert gain["accuracy_at_warmup_nfe"] == pytest.approx(0.34 + (0.38 - 0.34) * (16 - 10) / (20 - 10))
    assert "at 5.00 NFE (warm-up: 20.00)" in format_frontier_gain(gain)
    # an RL model that never reaches the warm-up's best, and a warm-up NFE below the RL frontier's cheapest point
    worse = _results((0.10, 18.0, False), (0.12, 19.0, False))
    gain = frontier_gain(before, worse)
    assert gain["nfe_to_warmup_best"] is None and gain["accuracy_at_warmup_nfe"] is None
    assert "not reached" in format_frontier_gain(gain)


def test_quick_demo_runs_end_to_end_and_reuses_the_warmup(tmp_path, capsys):
    output_dir = tmp_path / "demo"
    assert main(["--quick", "--output-dir", str(output_dir), "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    for row in ("(a) warm-up model", "(b) DiFFPO model, fixed", "(c) DiFFPO model, learned", "mean NFE"):
        assert row in printed
    results = json.loads((output_dir / RESULTS_FILE).read_text())
    assert [row["setting"] for row in results["summary"]] == [
        "entropy_bounded:0.1",
        "entropy_bounded:0.1",
        "entropy_bounded:learned",
    ]
    for row in results["summary"]:
        assert 0 <= row["accuracy"] <= 1 and row["mean_nfe"] >= 1
    assert set(results["targets"]) >= {"accuracy_gain", "nfe_saving", "learned_threshold_met"}
    assert results["frontier"]["warmup_fixed_nfe"] == results["summary"][0]["mean_nfe"]
    assert "frontier: the DiFFPO model reaches" in printed
    assert results["warmup"]["cached"] is False
    assert (output_dir / PLOT_FILE).read_bytes()[:8] == PNG_SIGNATURE
    assert len((output_dir / HELD_OUT_FILE).read_text().splitlines()) == results["settings"]["num_held_out"]
    model_folder = output_dir / MODEL_FOLDER
    for name in ("config.json", "model.safetensors", "sampler_head.safetensors", "sampler_head_config.json"):
        assert (model_folder / name).is_file(), name

    from trl_diffpo.sampler_head import load_sampler_head

    assert load_sampler_head(model_folder).config.threshold_max == results["settings"]["threshold_max"]

    assert main(["--quick", "--output-dir", str(output_dir), "--threads", "1"]) == 0
    assert "reusing the cached warm-up model" in capsys.readouterr().out
    assert json.loads((output_dir / RESULTS_FILE).read_text())["warmup"]["cached"] is True
