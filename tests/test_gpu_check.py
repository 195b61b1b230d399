"""benchmarks/gpu_check.sh in its CPU dry run: every step runs at tiny size and leaves its results under $OUT.

The GPU run itself cannot be tested here; this checks the script's logic (sizes, flags, cache-mode loop, budget,
summary) and that the three benchmarks it calls accept its flags and write what docs/benchmarks.md reads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
TIMEOUT_S = 400  # three tiny benchmark processes on a shared 2-core machine


def _run(tmp_path, **env):
    out = tmp_path / "out"
    env = {**os.environ, "GPU_CHECK_DRY_RUN": "1", "OUT": str(out), "PYTHON": sys.executable, **env}
    completed = subprocess.run(
        ["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in (out / "summary.md").read_text().splitlines() if line.startswith("| ")]
    return out, {name.strip(): status.strip() for name, status, _ in rows[1:]}


@pytest.mark.slow
def test_dry_run_runs_every_step_and_writes_its_results(tmp_path):
    out, steps = _run(tmp_path)
    assert steps == {"generation": "0", "trainer": "0", "precision": "0"}
    generation = json.loads((out / "generation.json").read_text())  # the cache modes, interleaved in one run
    assert sorted({result["cache"] for result in generation["cache_results"]}) == ["dual", "none", "prefix"]
    trainer = json.loads((out / "trainer.json").read_text())
    (config,) = trainer["results"]
    assert config["likelihood"] == "two_stage" and config["sampler_head"] and config["finetune"] == "lora"
    precision = json.loads((out / "precision.json").read_text())
    for key in ("target_logp_abs_error", "argmax_logp_abs_error", "row_sum_logp_abs_error"):
        stats = precision[key]
        assert 0 < stats["mean"] <= stats["p99"] <= stats["max"] < 0.1, key  # bf16 moves log-probs, a little
    assert 0 <= precision["kl_fp32_to_bf16"]["mean"] <= precision["kl_fp32_to_bf16"]["max"]
    assert 0.9 <= precision["argmax_agreement"] <= 1
    assert (out / "environment.txt").is_file()


def test_spent_budget_skips_every_step(tmp_path):
    _, steps = _run(tmp_path, BUDGET_S="0", CACHE_MODES="none dual")
    assert steps == {
        "generation": "skipped (budget spent)",
        "trainer": "skipped (budget spent)",
        "precision": "skipped (budget spent)",
    }
