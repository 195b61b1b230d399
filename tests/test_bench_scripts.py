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
