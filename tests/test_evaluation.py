"""Evaluation: setting parsing, the Pareto front, results JSON/PNG, determinism, the learned head and the CLI."""

import json
import random

import pytest
import torch

from trl_diffpo.evaluation import (
    PLOT_FILE,
    RESULTS_FILE,
    SamplerSetting,
    evaluate,
    main,
    pareto_front,
    parse_sampler_settings,
)
from trl_diffpo.generation import diffusion_generate
from trl_diffpo.sft import left_pad, tokenize_prompts

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GEN_LENGTH = 8
PUZZLES = ["1234341221434321", "0234341221434321", "1034341221434320", "1200341221434321", "0000341221434321"]


def sudoku_rows():
    return {
        "prompt": [[{"role": "user", "content": puzzle}] for puzzle in PUZZLES],
        "puzzle": list(PUZZLES),
    }


def digits_correctness(completions, **columns):
    """Deterministic stand-in for a task: 'correct' when the completion holds an even number of digits."""
    return [sum(ch.isdigit() for ch in text) % 2 == 0 for text in completions]


def test_parse_sampler_settings():
    settings = parse_sampler_settings(
        "entropy_bounded:0.1,0.5 low_confidence:steps=64,32 confidence_threshold:learned"
    )
    assert [s.label for s in settings] == [
        "entropy_bounded:0.1",
        "entropy_bounded:0.5",
        "low_confidence:steps=64",
        "low_confidence:steps=32",
        "confidence_threshold:learned",
    ]
    assert settings[2] == SamplerSetting("low_confidence", steps=64)
    assert parse_sampler_settings(["random:8", "entropy_bounded:1"]) == [
        SamplerSetting("random", steps=8),
        SamplerSetting("entropy_bounded", threshold=1.0),
    ]
    for bad in ("entropy_bounded", "nope:1", "low_confidence:0.5", "entropy_bounded:abc", ""):
        with pytest.raises(ValueError):
            parse_sampler_settings(bad)
    with pytest.raises(ValueError, match="fixed schedule"):
        SamplerSetting("low_confidence", threshold=0.1)


def reference_pareto(points):
    """Sweep by increasing NFE (ties: higher accuracy first); a point is optimal when it beats every cheaper one."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    flags, best, previous = [False] * len(points), -1.0, None
    for index in order:
        nfe, accuracy = points[index]
        if accuracy > best or (previous is not None and (nfe, accuracy) == previous):
            flags[index] = True
        if accuracy > best:
            best, previous = accuracy, (nfe, accuracy)
    return flags


def test_pareto_front_matches_a_sweep_reference():
    rng = random.Random(0)
    for _ in range(200):
        points = [(rng.randint(1, 6), rng.randint(0, 4) / 4) for _ in range(rng.randint(1, 7))]
        assert pareto_front(points) == reference_pareto(points), points


def run_eval(tokenizer, model, tmp_path, settings, **kwargs):
    return evaluate(
        model,
        tokenizer,
        sudoku_rows(),
        settings,
        gen_length=GEN_LENGTH,
        block_length=4,
        batch_size=2,
        output_dir=tmp_path,
        show_progress=False,
        **kwargs,
    )


def test_results_json_png_and_numbers(char_tokenizer, tiny_model, tmp_path):
    settings = ["entropy_bounded:0.5", "low_confidence:steps=4", "entropy_bounded:50"]
    results = run_eval(char_tokenizer, tiny_model, tmp_path, settings, task="sudoku", keep_completions=True)

    assert (tmp_path / PLOT_FILE).read_bytes()[:8] == PNG_SIGNATURE
    payload = json.loads((tmp_path / RESULTS_FILE).read_text())
    assert set(payload) == {"format_version", "metadata", "settings", "completions"}
    assert payload["metadata"]["task"] == "sudoku" and payload["metadata"]["num_samples"] == len(PUZZLES)
    rows = payload["settings"]
    assert [row["label"] for row in rows] == settings
    for row in rows:
        assert {"accuracy", "mean_nfe", "std_nfe", "tokens_per_step", "wall_time_s", "pareto_optimal"} <= set(row)
        assert 0 <= row["accuracy"] <= 1 and row["num_samples"] == len(PUZZLES)
        assert row["wall_time_s"] > 0

    # NFE and tokens per step against direct decoding of the whole set at once
    prompt_ids, mask = left_pad(tokenize_prompts(char_tokenizer, sudoku_rows()["prompt"]), char_tokenizer.pad_token_id)
    direct = diffusion_generate(
        tiny_model,
        prompt_ids,
        mask,
        gen_length=GEN_LENGTH,
        block_length=4,
        sampler="low_confidence",
        steps=4,
        eos_token_id=char_tokenizer.eos_token_id,
    )
    low_confidence = results.by_label("low_confidence:steps=4")
    assert low_confidence.mean_nfe == pytest.approx(direct.nfe.float().mean().item())
    assert low_confidence.tokens_per_step == pytest.approx(
        direct.completion_mask.sum().item() / direct.nfe.sum().item()
    )
    expected_texts = char_tokenizer.batch_decode(direct.completion_ids, skip_special_tokens=True)
    assert results.completions["low_confidence:steps=4"] == expected_texts
    # gamma = 50 nats commits a whole block per step: exactly one forward per block
    assert results.by_label("entropy_bounded:50").mean_nfe == pytest.approx(GEN_LENGTH / 4)
    # accuracy = the task's own verdicts on the kept completions
    from trl_diffpo.tasks import get_task

    for result in results.settings:
        verdicts = get_task("sudoku").is_correct(results.completions[result.label], puzzle=list(PUZZLES))
        assert result.num_correct == sum(verdicts)
    flags = pareto_front([(r.mean_nfe, r.accuracy) for r in results.settings])
    assert [r.pareto_optimal for r in results.settings] == flags


def test_custom_correctness_function(char_tokenizer, tiny_model, tmp_path):
    results = run_eval(
        char_tokenizer,
        tiny_model,
        tmp_path,
        ["low_confidence:steps=8"],
        correctness_fn=digits_correctness,
        keep_completions=True,
    )
    texts = results.completions["low_confidence:steps=8"]
    assert results.settings[0].num_correct == sum(digits_correctness(texts))


def test_sampling_is_deterministic_for_a_seed(char_tokenizer, tiny_model, tmp_path):
    kwargs = {"task": "sudoku", "temperature": 1.0, "keep_completions": True}
    first = run_eval(char_tokenizer, tiny_model, tmp_path / "a", ["random:4", "entropy_bounded:0.3"], seed=7, **kwargs)
    again = run_eval(char_tokenizer, tiny_model, tmp_path / "b", ["random:4", "entropy_bounded:0.3"], seed=7, **kwargs)
    other = run_eval(char_tokenizer, tiny_model, tmp_path / "c", ["random:4", "entropy_bounded:0.3"], seed=8, **kwargs)
    assert first.completions == again.completions
    assert [r.mean_nfe for r in first.settings] == [r.mean_nfe for r in again.settings]
    assert first.completions != other.completions


def test_learned_head_sets_the_thresholds(char_tokenizer, tiny_model, tmp_path):
    from trl_diffpo.sampler_head import SamplerHead, SamplerHeadConfig

    head = SamplerHead(SamplerHeadConfig(input_size=tiny_model.config.hidden_size, init_threshold=0.3))
    results = run_eval(
        char_tokenizer,
        tiny_model,
        tmp_path,
        ["entropy_bounded:0.3", "entropy_bounded:learned"],
        task="sudoku",
        sampler_head=head,
        keep_completions=True,
    )
    fixed, learned = results.settings
    # a fresh head predicts its initial threshold for every prompt: same decoding as the fixed setting
    assert learned.mean_threshold == pytest.approx(0.3, abs=1e-5) and learned.std_threshold < 1e-5
    assert learned.mean_nfe == fixed.mean_nfe
    assert results.completions["entropy_bounded:learned"] == results.completions["entropy_bounded:0.3"]
    with pytest.raises(ValueError, match="sampler head"):
        run_eval(char_tokenizer, tiny_model, tmp_path, ["entropy_bounded:learned"], task="sudoku")


def test_cli_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--model",
        "--adapter",
        "--sampler-head",
        "--task",
        "--split",
        "--data-file",
        "--num-samples",
        "--samplers",
        "--use-head",
        "--output-dir",
        "--gen-length",
        "--block-length",
        "--batch-size",
        "--seed",
        "--temperature",
    ):
        assert option in text


def test_cli_end_to_end_with_a_saved_model_and_head(char_tokenizer, tiny_model, tmp_path, capsys):
    from trl_diffpo.sampler_head import SamplerHead, SamplerHeadConfig

    model_dir = tmp_path / "model"
    tiny_model.save_pretrained(model_dir)
    char_tokenizer.save_pretrained(model_dir)
    SamplerHead(SamplerHeadConfig(input_size=tiny_model.config.hidden_size)).save_pretrained(model_dir)
    data_file = tmp_path / "rows.jsonl"
    rows = sudoku_rows()
    data_file.write_text(
        "\n".join(json.dumps({"prompt": p, "puzzle": z}) for p, z in zip(rows["prompt"], rows["puzzle"])) + "\n"
    )
    out = tmp_path / "out"
    code = main(
        [
            "--model",
            str(model_dir),
            "--task",
            "sudoku",
            "--data-file",
            str(data_file),
            "--raw-prompts",
            "--num-samples",
            "3",
            "--samplers",
            "entropy_bounded:0.2",
            "low_confidence:steps=2",
            "--use-head",
            "--gen-length",
            str(GEN_LENGTH),
            "--block-length",
            "4",
            "--output-dir",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    payload = json.loads((out / RESULTS_FILE).read_text())
    labels = [row["label"] for row in payload["settings"]]
    assert labels == ["entropy_bounded:0.2", "low_confidence:steps=2", "entropy_bounded:learned"]
    assert payload["metadata"]["num_samples"] == 3 and payload["metadata"]["model"] == str(model_dir)
    assert (out / PLOT_FILE).read_bytes()[:8] == PNG_SIGNATURE
    assert "entropy_bounded:learned" in capsys.readouterr().out


def test_errors_are_clear(char_tokenizer, tiny_model, tmp_path):
    with pytest.raises(ValueError, match="task"):
        run_eval(char_tokenizer, tiny_model, tmp_path, ["entropy_bounded:0.1"])
    with pytest.raises(ValueError, match="prompt"):
        evaluate(
            tiny_model,
            char_tokenizer,
            {"puzzle": PUZZLES},
            ["entropy_bounded:0.1"],
            task="sudoku",
            gen_length=GEN_LENGTH,
            block_length=4,
            show_progress=False,
        )
    assert torch.get_num_threads() >= 1


def _saved_model(tiny_model, char_tokenizer, folder):
    tiny_model.save_pretrained(folder)
    char_tokenizer.save_pretrained(folder)
    return folder


def _error_line(capsys) -> str:
    """The command's one error line (stderr may also hold progress bars of the test's own set-up)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("trl-diffpo eval: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


EVAL_BASE = ["--task", "sudoku", "--no-progress", "--gen-length", str(GEN_LENGTH), "--block-length", "4"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--block-length", "3"], "block_length=3 must be a positive divisor of gen_length=8"),
        (["--samplers", "confidence_threshold:1.5"], "threshold=1.5 is out of range"),
        (["--samplers", "low_confidence:steps=3"], "steps=3 must be a positive multiple of the number of blocks"),
        (["--samplers", "low_confidence:0.5"], "Cannot read value"),
        (["--batch-size", "0"], "--batch-size must be a positive integer"),
    ],
)
def test_cli_configuration_mistakes_are_one_line_errors(tmp_path, capsys, extra, message):
    # before: an 8-frame traceback from inside diffusion_generate, after the model had loaded
    assert main(["--model", str(tmp_path / "never_loaded"), *EVAL_BASE, *extra]) == 2
    assert message in _error_line(capsys)


def test_cli_missing_local_model_path_is_named_as_such(tmp_path, capsys):
    # before: huggingface_hub's "Repo id must be in the form 'repo_name' or 'namespace/repo_name'"
    for missing in (str(tmp_path / "outputs" / "model"), "./outputs/demo/model"):
        assert main(["--model", missing, *EVAL_BASE]) == 2
        error = _error_line(capsys)
        assert f"--model {missing!r}: no such file or folder (it is a local path, not a Hub id)" in error
        assert "Repo id" not in error


def test_cli_truncated_safetensors_names_the_file(char_tokenizer, tiny_model, tmp_path, capsys):
    # before: "SafetensorError: Error while deserializing header: incomplete metadata" without the file
    model_dir = _saved_model(tiny_model, char_tokenizer, tmp_path / "model")
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    assert main(["--model", str(model_dir), *EVAL_BASE]) == 2
    error = _error_line(capsys)
    assert str(weights) in error and "truncated or corrupt" in error


def test_cli_empty_data_file_is_a_one_line_error(char_tokenizer, tiny_model, tmp_path, capsys):
    model_dir = _saved_model(tiny_model, char_tokenizer, tmp_path / "model")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code = main(["--model", str(model_dir), *EVAL_BASE, "--data-file", str(empty), "--raw-prompts"])
    assert code == 2 and _error_line(capsys)


def _result(label, sampler, accuracy, mean_nfe, threshold=None, steps=None, learned=False, mean_threshold=None):
    from trl_diffpo.evaluation import SettingResult

    return SettingResult(
        label=label, sampler=sampler, threshold=threshold, steps=steps, learned=learned, num_samples=4,
        num_correct=int(4 * accuracy), accuracy=accuracy, mean_nfe=mean_nfe, std_nfe=1.0, tokens_per_step=2.0,
        wall_time_s=0.5, samples_per_s=8.0, mean_threshold=mean_threshold,
        std_threshold=None if mean_threshold is None else 0.05, pareto_optimal=learned,
    )  # fmt: skip


def test_table_shows_the_learned_threshold_and_explains_the_star():
    from trl_diffpo.evaluation import EvaluationResults

    results = EvaluationResults(
        [
            _result("entropy_bounded:0.1", "entropy_bounded", 0.5, 20.0, threshold=0.1, mean_threshold=0.1),
            _result("low_confidence:steps=16", "low_confidence", 0.25, 16.0, steps=16),
            _result("entropy_bounded:learned", "entropy_bounded", 0.75, 12.0, learned=True, mean_threshold=0.4321),
        ]
    )
    lines = results.table().splitlines()
    assert "threshold" in lines[0]
    learned_row = next(line for line in lines if line.startswith("entropy_bounded:learned"))
    assert "0.432 +- 0.05" in learned_row and learned_row[31] == "*"
    assert "0.1" in next(line for line in lines if line.startswith("entropy_bounded:0.1"))
    assert any(line.startswith("* Pareto-optimal") for line in lines)
    assert any("mean +- std of the per-prompt thresholds" in line for line in lines)


def test_all_zero_results_plot_without_a_negative_accuracy_axis(tmp_path, monkeypatch):
    import matplotlib.axes

    from trl_diffpo.evaluation import plot_accuracy_vs_nfe
    from trl_diffpo.evaluation.plotting import accuracy_axis_limits

    limits = []
    original = matplotlib.axes.Axes.set_ylim
    monkeypatch.setattr(
        matplotlib.axes.Axes, "set_ylim", lambda self, *args, **kw: limits.append(args) or original(self, *args, **kw)
    )
    zeros = [_result("entropy_bounded:0.1", "entropy_bounded", 0.0, 20.0, threshold=0.1),
             _result("low_confidence:steps=16", "low_confidence", 0.0, 16.0, steps=16)]  # fmt: skip
    plot_accuracy_vs_nfe(zeros, tmp_path / "zeros.png")
    assert [args for args in limits if len(args) == 2] == [(0.0, 3.0)]  # set_ylim(low, high); before: (-2.0, 3.0)
    assert (tmp_path / "zeros.png").read_bytes()[:8] == PNG_SIGNATURE
    assert accuracy_axis_limits([100.0]) == (97.0, 100.0) and accuracy_axis_limits([50.0, 60.0]) == (47.0, 63.0)
