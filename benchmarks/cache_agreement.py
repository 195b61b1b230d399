"""Accuracy, NFE and token agreement of cached decoding against exact decoding on a trained demo model.

Decodes the demo's held-out 4x4 Sudoku puzzles (``trl_diffpo.demo``: same task data, chat template, gen length 20)
with ``diffusion_generate(cache="none" | "prefix" | "dual")`` at the same entropy-bounded thresholds, through
:func:`trl_diffpo.evaluation.evaluate`, and reports per (cache, threshold): accuracy, mean NFE and the fraction of
completion tokens (up to the exact run's first EOS) equal to the exact run's.

Example (a warm-up or trained model folder written by ``trl-diffpo demo`` / ``trl-diffpo ablate``)::

    python benchmarks/cache_agreement.py outputs/demo/warmup/<key> --block 20 --thresholds 0.02 0.3 1.0
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import trl_diffpo.evaluation.runner as evaluation  # the module whose diffusion_generate evaluate() calls
from trl_diffpo.block_logits import CACHE_MODES
from trl_diffpo.demo import DemoSettings, build_sudoku_data
from trl_diffpo.evaluation import SamplerSetting, evaluate


def token_agreement(exact_outputs, cached_outputs) -> float:
    same = total = 0
    for exact, cached in zip(exact_outputs, cached_outputs, strict=True):
        mask = exact.completion_mask
        same += int(((exact.completion_ids == cached.completion_ids) & mask).sum())
        total += int(mask.sum())
    return same / total


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="folder of a demo model (warm-up or after RL)")
    parser.add_argument("--block", type=int, default=20, help="block length (the demo decodes one block of 20)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.02, 0.3, 1.0], help="EB gammas")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--num-held-out", type=int, default=DemoSettings.num_held_out, help="held-out puzzles")
    args = parser.parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    settings = DemoSettings(num_held_out=args.num_held_out, num_train=1, num_validation=1)  # only held-out is used
    held_out = build_sudoku_data(settings, tokenizer)[2]
    sampler_settings = [SamplerSetting("entropy_bounded", threshold=gamma) for gamma in args.thresholds]
    real_generate, outputs, rows = evaluation.diffusion_generate, {}, []
    try:
        for cache in CACHE_MODES:
            outputs[cache] = []

            def recording(*call_args, cache=cache, **kwargs):
                output = real_generate(*call_args, cache=cache, **kwargs)
                outputs[cache].append(output)
                return output

            evaluation.diffusion_generate = recording
            results = evaluate(
                model, tokenizer, held_out, sampler_settings, task="sudoku", gen_length=settings.gen_length,
                block_length=args.block, batch_size=args.batch, seed=0, show_progress=False,
            )  # fmt: skip
            per_setting = len(outputs[cache]) // len(sampler_settings)
            for index, result in enumerate(results.settings):
                calls = slice(index * per_setting, (index + 1) * per_setting)
                agreement = token_agreement(outputs["none"][calls], outputs[cache][calls])
                rows.append(
                    {"cache": cache, "threshold": result.threshold, "accuracy": result.accuracy}
                    | {"mean_nfe": result.mean_nfe, "token_agreement": agreement}
                )
    finally:
        evaluation.diffusion_generate = real_generate
    print(f"# model={args.model} block={args.block} held_out={len(held_out)} gen_length={settings.gen_length}")
    print("| cache | EB gamma | accuracy | mean NFE | token agreement with none |\n|---|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['cache']} | {row['threshold']} | {100 * row['accuracy']:.1f}% | {row['mean_nfe']:.2f} | "
            f"{100 * row['token_agreement']:.1f}% |"
        )
    return rows


if __name__ == "__main__":
    main()
