"""Smoke test of benchmarks/bench_trainer.py: a one-step tiny run as a subprocess writes the documented JSON.

Only the structure is checked (no timing values): every phase key is present for every configuration, the wrapped
trainer methods actually fired (their phases are non-zero on a step that generates), and the matrix skips the sampler
head for the fixed-schedule sampler.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_trainer.py"
PHASES = ["rollout", "log_prob", "scoring", "policy_forward", "policy_backward", "optimizer", "step"]
TIMEOUT_S = 300  # generous: the run takes a few seconds, but the CPU may be shared


def run_bench(tmp_path, *options):
    output = tmp_path / "trainer.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(SCRIPT), "--device", "cpu", "--size", "tiny", "--output", str(output), *options]
    completed = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(output.read_text()), completed.stdout


def test_tiny_run_writes_every_phase_for_every_configuration(tmp_path):
    options = [
        "--max-steps",
        "1",
        "--likelihoods",
        "two_stage",
        "--finetune",
        "lora",
        "--gen-len",
        "16",
        "--block",
        "8",
    ]
    report, stdout = run_bench(tmp_path, *options, "--samplers", "low_confidence", "entropy_bounded")

    assert report["phases"] == PHASES
    configs = [(r["sampler"], r["sampler_head"]) for r in report["results"]]
    # the head learns an adaptive sampler's threshold: no head run for low_confidence
    assert configs == [("low_confidence", False), ("entropy_bounded", False), ("entropy_bounded", True)]
    for result in report["results"]:
        assert "error" not in result, result.get("error")
        assert result["likelihood"] == "two_stage" and result["is_correction"] == "token"
        assert result["finetune"] == "lora" and result["trainable_parameters"] > 0
        assert set(PHASES) <= set(result["phases"]) and result["phases"]["measured_steps"] == 1
        (step,) = result["steps"]  # one optimizer step, which generates (num_iterations=1)
        for phase in PHASES:
            assert phase in step
        for phase in ("rollout", "log_prob", "policy_forward", "policy_backward", "optimizer", "step"):
            assert step[phase] > 0, f"the {phase!r} timer never fired"
        assert result["diffusion/nfe/mean"] > 0 and result["rss_peak_mib"] > 0
        assert result["config"] in stdout  # the Markdown table lists it


def test_rollout_cache_modes_are_configurations_and_rounds_interleave(tmp_path):
    """--rollout-cache adds one configuration per mode (the trainer really decodes with it: the dual cache logs a
    non-zero behaviour/surrogate log-prob gap) and --rounds 2 merges two runs per configuration."""
    options = ["--max-steps", "2", "--likelihoods", "two_stage", "--finetune", "lora", "--samplers", "low_confidence"]
    options += ["--head", "off", "--gen-len", "16", "--block", "8", "--rollout-cache", "none", "dual"]
    report, stdout = run_bench(tmp_path, *options, "--rounds", "2")

    names = [result["config"] for result in report["results"]]
    assert names == ["two_stage/token-IS/low_confidence/lora", "two_stage/token-IS/low_confidence/lora/cache=dual"]
    assert [result["rollout_cache"] for result in report["results"]] == ["none", "dual"]
    for result in report["results"]:
        assert result["rounds"] == 2 and len(result["steps"]) == 4  # 2 steps x 2 rounds, all kept
        assert result["phases"]["measured_steps"] == 2  # each round's first step is its warm-up
        assert result["diffpo/is_weight/clamped_frac"] is not None and result["diffpo/logp_gap/mean"] is not None
        assert "cache=dual" not in stdout or result["config"] in stdout
    assert stdout.index("cache=dual, round 1") < stdout.index("lora, round 2")  # interleaved, not one after another


def test_merge_rounds_takes_the_median_over_every_measured_step():
    bench = load_bench_trainer()
    phases = dict.fromkeys(bench.PHASES, 0.0)

    def run(*step_seconds):
        return {"config": "c", "steps": [{**phases, "step": s} for s in step_seconds], "diffpo/logp_gap/mean": 0.5}

    merged = bench.merge_rounds([run(9.0, 1.0, 2.0), run(8.0, 3.0, 5.0)])
    assert merged["phases"]["step"] == 2.5  # median of [1, 2, 3, 5]: warm-ups 9 and 8 dropped
    assert merged["phases"]["measured_steps"] == 4 and merged["rounds"] == 2 and len(merged["steps"]) == 6
    assert merged["diffpo/logp_gap/mean"] == 0.5


def load_bench_trainer():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_trainer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_vocab_tokenizer_puts_specials_at_the_model_ids_and_decodes_every_id():
    bench = load_bench_trainer()
    vocab_size, mask_id, eos_id = 300, 290, 7
    tokenizer = bench.build_vocab_tokenizer(vocab_size, mask_id, eos_id)
    assert len(tokenizer) == vocab_size
    assert (tokenizer.mask_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (mask_id, eos_id, eos_id)
    ids = tokenizer("Using 3, 41 = 12")["input_ids"]
    assert len(ids) == len("Using 3, 41 = 12") and tokenizer.unk_token_id not in ids  # one token per character
    assert tokenizer.decode(ids) == "Using 3, 41 = 12"
    assert tokenizer.decode([vocab_size - 1]) == f"<t{vocab_size - 1}>"  # filler ids decode too
    assert sorted(tokenizer.get_vocab().values()) == list(range(vocab_size))


def test_meta_device_llada_builder_gives_a_working_random_model():
    import torch

    bench = load_bench_trainer()
    shape = {**bench.LLADA_SHAPES["small"], "d_model": 32, "n_heads": 4, "n_kv_heads": 4, "n_layers": 1}
    shape.update(mlp_hidden_size=64, vocab_size=300, embedding_size=300, mask_token_id=299)
    model = bench.build_random_llada(shape, torch.device("cpu"), torch.float32)
    assert all(p.device.type == "cpu" and torch.isfinite(p).all() for p in model.parameters())
    norms = [p for name, p in model.named_parameters() if p.dim() == 1]
    assert norms and all(torch.equal(p, torch.ones_like(p)) for p in norms)
    weights = model.get_input_embeddings().weight
    assert abs(weights.std().item() - bench.INIT_STD) < 0.1 * bench.INIT_STD
    logits = model(torch.randint(0, 299, (2, 5))).logits
    assert logits.shape == (2, 5, 300) and torch.isfinite(logits).all()


def test_bf16_logprobs_tiny_run_reports_every_quantity(tmp_path):
    """benchmarks/bench_bf16_logprobs.py on a tiny LLaDA: every quantity is reported per configuration, the rescaled
    logits have the asked standard deviation, and the bf16 errors are real (non-zero) but small."""
    output = tmp_path / "bf16.json"
    script = REPO / "benchmarks" / "bench_bf16_logprobs.py"
    options = ["--size", "tiny", "--vocab", "300", "--logit-std", "0", "3", "--batch", "1", "--prompt-len", "8"]
    options += ["--gen-len", "8", "--block", "8", "--steps", "4", "--output", str(output)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, str(script), *options], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=TIMEOUT_S, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-4000:]
    report = json.loads(output.read_text())
    quantities = ["logits_bf16", "logits_bf16+log_softmax_bf16"] + [
        f"surrogate/{likelihood}/{precision}"
        for likelihood in ("mean_field", "two_stage")
        for precision in ("weights_bf16", "autocast_bf16")
    ]
    assert [(r["size"], r["vocab"]) for r in report["results"]] == [("tiny", 300)] * 2
    random_scale, rescaled = report["results"]
    assert abs(rescaled["logit_std"] - 3.0) < 0.05 and random_scale["logit_std"] == random_scale["random_logit_std"]
    for result in report["results"]:
        assert list(result["errors"]) == quantities and result["tokens"] == 8
        for stats in result["errors"].values():
            assert 0 < stats["mean_abs"] <= stats["max_abs"] < 0.5
    assert "| logits_bf16 |" in completed.stdout  # the Markdown table


def test_bf16_logprobs_help():
    completed = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_bf16_logprobs.py"), "--help"],
        capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
    )  # fmt: skip
    assert completed.returncode == 0 and "--logit-std" in completed.stdout
