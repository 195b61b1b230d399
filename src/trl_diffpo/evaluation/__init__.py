"""Accuracy-vs-NFE evaluation of a masked diffusion LM: samplers, thresholds and a learned sampler head.

A dLLM is judged by how often it is right **and** by how many forward passes (NFE) it needs. :func:`evaluate`
decodes a held-out set once per *setting* (a sampler with a threshold or a step count, or the learned head's
per-prompt threshold), scores the completions with the task's correctness function and reports, per setting:
accuracy, mean/std NFE, tokens committed per step, wall time and throughput. It writes ``results.json`` and a PNG
plot of accuracy against mean NFE in which the Pareto-optimal settings (no other setting is at least as accurate with
fewer NFEs) are joined and highlighted.

Python::

    from trl_diffpo.evaluation import SamplerSetting, evaluate

    results = evaluate(
        model, tokenizer, task="sudoku", dataset=test_rows,
        settings=[SamplerSetting("entropy_bounded", threshold=0.1), SamplerSetting("low_confidence", steps=16)],
        gen_length=32, block_length=32, output_dir="eval_out",
    )
    print(results.table())

Command line (``trl-diffpo eval --help`` lists every option)::

    trl-diffpo eval --model ./outputs/demo/model --task sudoku --num-samples 256 \\
        --samplers "entropy_bounded:0.1,0.5 low_confidence:steps=32" --use-head --output-dir eval_out
"""

from .cli import build_parser, main
from .plotting import plot_accuracy_vs_nfe
from .results import (
    PLOT_FILE,
    RESULTS_FILE,
    RESULTS_FORMAT_VERSION,
    EvaluationResults,
    SettingResult,
    pareto_front,
    write_results,
)
from .runner import evaluate
from .settings import LEARNED, SamplerSetting, parse_sampler_settings

__all__ = [
    "LEARNED",
    "PLOT_FILE",
    "RESULTS_FILE",
    "RESULTS_FORMAT_VERSION",
    "EvaluationResults",
    "SamplerSetting",
    "SettingResult",
    "build_parser",
    "evaluate",
    "main",
    "pareto_front",
    "parse_sampler_settings",
    "plot_accuracy_vs_nfe",
    "write_results",
]
