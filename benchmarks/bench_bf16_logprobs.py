"""Measure the bf16 error of the policy log-probs: ``policy_log_softmax`` and the surrogate, against float32.

Training scores completion tokens with :func:`trl_diffpo.generation.policy_log_softmax` (the log-softmax is always
computed in float32: bf16 logits are cast first) inside :func:`trl_diffpo.likelihood.surrogate_log_probs`. With a bf16
model the logits themselves are bf16. This script measures how far the resulting per-token log-probs are from a
float32 run of the same model, on the completion tokens of a float32 rollout:

- ``logits_bf16``: the float32 model's logits rounded to bf16, then the float32 log-softmax (the error of storing
  the logits in bf16, nothing else);
- ``logits_bf16+log_softmax_bf16``: the same, with the log-softmax in bf16 too (what skipping the cast would cost);
- ``surrogate/<likelihood>/weights_bf16``: the whole surrogate with the model's weights in bf16 (a checkpoint loaded
  with ``torch_dtype=torch.bfloat16``, as LLaDA-8B usually is);
- ``surrogate/<likelihood>/autocast_bf16``: float32 weights under ``torch.autocast(bfloat16)`` (the Trainer's
  ``bf16=True`` mixed precision).

The printed table has one row per configuration and, per quantity, the mean and max absolute log-prob error (nats)
over the completion tokens; the JSON (``--output``) also has the worst relative change of a per-token IS weight it
causes, ``max |exp(error) - 1|``.

The model is a native :class:`trl_diffpo.models.LLaDAModelLM` with random N(0, 0.02) weights (built on the meta
device, nothing is downloaded). Random weights give nearly flat logits (std about ``0.02 * sqrt(d_model)``), far
smaller than a trained model's, and bf16 rounding error grows with the logits' magnitude; ``--logit-std`` therefore
rescales the output layer so that the logits over the vocabulary have the given standard deviation (0 keeps the
random scale). The tokens scored are sampled from the float32 model at ``--temperature``, so at a large logit std they
are the model's likely tokens, as in a real rollout.

Sizes: ``tiny`` (d_model 64, 2 layers, 4 heads, MLP 128) and ``small`` (d_model 512, 4 layers, 8 heads, MLP 1536, the
``small`` LLaDA of ``bench_trainer.py``), each with every vocabulary of ``--vocab`` (LLaDA-8B's is 126464; [MASK] is
``vocab - 128``, LLaDA's 126336 at that size).

Example::

    OMP_NUM_THREADS=1 python benchmarks/bench_bf16_logprobs.py --size small --vocab 32000 126464 \\
        --logit-std 0 3 10 --output bf16_logprobs.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch

from trl_diffpo.backbones import get_backbone
from trl_diffpo.generation import diffusion_generate, policy_log_softmax
from trl_diffpo.likelihood import MEAN_FIELD, TWO_STAGE, draw_surrogate_randomness, surrogate_log_probs

BENCHMARKS_DIR = os.path.dirname(os.path.abspath(__file__))
if BENCHMARKS_DIR not in sys.path:  # loaded by file path (the tests): make the shared helpers importable
    sys.path.insert(0, BENCHMARKS_DIR)
from _common import materialise_random_weights  # noqa: E402

LLADA_SHAPES = {
    "tiny": {"d_model": 64, "n_heads": 4, "n_kv_heads": 4, "n_layers": 2, "mlp_hidden_size": 128},
    "small": {"d_model": 512, "n_heads": 8, "n_kv_heads": 8, "n_layers": 4, "mlp_hidden_size": 1536},
}
MASK_OFFSET = 128  # [MASK] = vocab - 128 (LLaDA-8B: 126464 - 128 = 126336)
FIRST_REGULAR_TOKEN = 5  # prompts avoid the low ids where special tokens usually live
LIKELIHOODS = (MEAN_FIELD, TWO_STAGE)


def build_llada(size: str, vocab_size: int, seed: int):
    """A random float32 :class:`LLaDAModelLM` of ``size`` with a ``vocab_size`` vocabulary, on the CPU."""
    from trl_diffpo.models import LLaDAConfig, LLaDAModelLM

    config = LLaDAConfig(
        **LLADA_SHAPES[size],
        vocab_size=vocab_size,
        embedding_size=vocab_size,
        mask_token_id=vocab_size - MASK_OFFSET,
        eos_token_id=2,
        pad_token_id=2,
    )
    with torch.device("meta"):
        model = LLaDAModelLM(config)
    return materialise_random_weights(model, torch.device("cpu"), torch.float32, seed).eval()


def rescale_logits(model, input_ids: torch.Tensor, target_std: float) -> float:
    """Scale the output layer so that the logits of ``input_ids`` have standard deviation ``target_std`` over the
    vocabulary (averaged over positions); returns the standard deviation before (``target_std <= 0``: unchanged)."""
    with torch.no_grad():
        before = model(input_ids=input_ids).logits.float().std(-1).mean().item()
        if target_std > 0:
            model.get_output_embeddings().weight.mul_(target_std / before)
    return before


def error_stats(approx: torch.Tensor, exact: torch.Tensor) -> dict:
    """Mean / max absolute error of log-probs and the worst relative change of an IS weight it causes."""
    error = (approx.double() - exact.double()).abs()
    return {
        "mean_abs": error.mean().item(),
        "max_abs": error.max().item(),
        "max_is_weight_change": (error.max().exp() - 1).item(),
    }


def bf16_copy(model):
    import copy

    return copy.deepcopy(model).to(torch.bfloat16)


def measure(args, size: str, vocab_size: int, logit_std: float) -> dict:
    generator = torch.Generator().manual_seed(args.seed)
    model = build_llada(size, vocab_size, args.seed)
    mask_id = vocab_size - MASK_OFFSET
    prompts = torch.randint(
        FIRST_REGULAR_TOKEN, mask_id, (args.batch, args.prompt_len), generator=generator, dtype=torch.long
    )
    prompt_mask = torch.ones_like(prompts)
    first_latent = torch.cat([prompts, torch.full((args.batch, args.gen_len), mask_id)], 1)
    random_std = rescale_logits(model, first_latent, logit_std)
    rollout = diffusion_generate(
        model, prompts, prompt_mask, gen_length=args.gen_len, block_length=args.block, sampler="low_confidence",
        steps=args.steps, temperature=args.temperature, generator=torch.Generator().manual_seed(args.seed),
    )  # fmt: skip
    tokens = rollout.completion_ids
    with torch.no_grad():
        logits = get_backbone(model)(first_latent, None).logits[:, args.prompt_len :]  # the mean-field latent z_0
    exact = policy_log_softmax(logits, mask_id, args.temperature).gather(-1, tokens[..., None])[..., 0]
    rounded = logits.bfloat16()
    via_cast = policy_log_softmax(rounded, mask_id, args.temperature).gather(-1, tokens[..., None])[..., 0]
    in_bf16 = rounded / args.temperature if args.temperature > 0 else rounded.clone()
    in_bf16[..., mask_id] = float("-inf")
    in_bf16 = torch.log_softmax(in_bf16, -1).gather(-1, tokens[..., None])[..., 0]
    rows = {
        "logits_bf16": error_stats(via_cast, exact),
        "logits_bf16+log_softmax_bf16": error_stats(in_bf16, exact),
    }

    low_precision = bf16_copy(model)
    for likelihood in LIKELIHOODS:
        draws = draw_surrogate_randomness(
            prompt_mask, rollout.nfe, likelihood=likelihood, p_mask_prompt=args.p_mask_prompt,
            generator=torch.Generator().manual_seed(args.seed + 1),
        )  # fmt: skip
        scored = {}
        for name, scorer, autocast in (
            ("float32", model, False),
            ("weights_bf16", low_precision, False),
            ("autocast_bf16", model, True),
        ):
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                scored[name], _ = surrogate_log_probs(
                    get_backbone(scorer), rollout.sequences, prompt_mask, rollout.unmask_step,
                    draws.prompt_noise[:, 0], draws.stage_starts[:, 0], temperature=args.temperature,
                    batch_size=args.batch,
                )  # fmt: skip
        for name in ("weights_bf16", "autocast_bf16"):
            rows[f"surrogate/{likelihood}/{name}"] = error_stats(scored[name], scored["float32"])
    return {
        "size": size,
        "vocab": vocab_size,
        "logit_std": round(rescale_logits(model, first_latent, 0.0), 3),
        "random_logit_std": round(random_std, 3),
        "mean_token_logp": exact.mean().item(),
        "tokens": tokens.numel(),
        "errors": rows,
    }


def markdown(results: list[dict]) -> str:
    """One row per configuration; each quantity's cell is ``mean / max`` absolute log-prob error over the tokens."""
    quantities = list(results[0]["errors"]) if results else []
    header = ["size", "vocab", "logit std", "mean log-p", *quantities]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for result in results:
        cells = [
            result["size"],
            str(result["vocab"]),
            f"{result['logit_std']:.2f}",
            f"{result['mean_token_logp']:.2f}",
        ]
        cells += [f"{stats['mean_abs']:.4f} / {stats['max_abs']:.4f}" for stats in result["errors"].values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", nargs="+", default=["tiny"], choices=sorted(LLADA_SHAPES))
    parser.add_argument("--vocab", nargs="+", type=int, default=[32000], help="vocabulary sizes (> 128)")
    parser.add_argument(
        "--logit-std", nargs="+", type=float, default=[0.0, 3.0], help="target logit std; 0 keeps the random scale"
    )
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--gen-len", type=int, default=32)
    parser.add_argument("--block", type=int, default=16)
    parser.add_argument("--steps", type=int, default=16, help="low_confidence steps of the float32 rollout")
    parser.add_argument("--temperature", type=float, default=1.0, help="rollout and scoring temperature")
    parser.add_argument("--p-mask-prompt", type=float, default=0.15, help="surrogate prompt masking (d1: 0.15)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if min(args.vocab) <= MASK_OFFSET:
        parser.error(f"--vocab sizes must exceed {MASK_OFFSET} ([MASK] is vocab - {MASK_OFFSET}).")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [
        measure(args, size, vocab, logit_std)
        for size in args.size
        for vocab in args.vocab
        for logit_std in args.logit_std
    ]
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "threads": torch.get_num_threads(),
        "options": vars(args),
        "results": results,
    }
    print(markdown(results))
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(report, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
