"""How far bf16 moves the log-probs DiFFPO trains on: the native LLaDA forward in bfloat16 vs float32.

Builds a random-weight :class:`trl_diffpo.models.LLaDAModelLM` (the shapes of ``bench_trainer.py``) in float32, runs
one forward on a mid-decoding canvas ([random prompt | completion with half of its positions masked]), then casts
the same weights to bfloat16 and runs it again. At the masked completion positions (the ones the surrogate scores)
it reports, against the float32 reference:

- the absolute error of ``log p(token)`` for a random target token and for the float32 argmax token (mean, p99,
  max), and of the per-row sum over the masked positions (what enters a sequence-level ratio);
- the KL divergence ``KL(p_fp32 || p_bf16)`` per position (mean, max) and how often the argmax agrees.

Random N(0, 0.02) weights give near-uniform predictions; trained weights give peaked ones, whose errors differ. The
figure bounds what the dtype alone does to the forward at this shape, not what a trained checkpoint shows.

Examples::

    python benchmarks/bench_precision.py --device cpu --size small --batch 2 --prompt-len 32 --gen-len 32
    python benchmarks/bench_precision.py --device cuda --size llada8b --batch 4 --prompt-len 256 --gen-len 256 \\
        --json precision.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

BENCHMARKS_DIR = os.path.dirname(os.path.abspath(__file__))
if BENCHMARKS_DIR not in sys.path:  # loaded by file path (the tests): make the shared helpers importable
    sys.path.insert(0, BENCHMARKS_DIR)
from bench_trainer import LLADA_SHAPES, build_random_llada  # noqa: E402

MASKED_FRACTION = 0.5  # of the completion positions; the rest carry committed tokens
FIRST_REGULAR_TOKEN = 5  # random tokens avoid the low ids where special tokens usually live


def canvas(config, batch: int, prompt_len: int, gen_len: int, generator: torch.Generator):
    """``(input_ids, scored)``: random prompt and completion tokens, half of the completion masked."""
    vocab = config.vocab_size
    tokens = torch.randint(FIRST_REGULAR_TOKEN, vocab, (batch, prompt_len + gen_len), generator=generator)
    tokens[tokens == config.mask_token_id] = FIRST_REGULAR_TOKEN
    scored = torch.zeros_like(tokens, dtype=torch.bool)
    scored[:, prompt_len:] = torch.rand(batch, gen_len, generator=generator) < MASKED_FRACTION
    return torch.where(scored, config.mask_token_id, tokens), scored


def _stats(errors: torch.Tensor) -> dict:
    errors = errors.double()
    return {
        "mean": errors.mean().item(),
        "p99": errors.quantile(0.99).item() if errors.numel() > 1 else errors.max().item(),
        "max": errors.max().item(),
    }


@torch.no_grad()
def compare(args) -> dict:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_random_llada(LLADA_SHAPES[args.size], device, torch.float32, args.seed).eval()
    generator = torch.Generator().manual_seed(args.seed)
    input_ids, scored = canvas(model.config, args.batch, args.prompt_len, args.gen_len, generator)
    targets = torch.randint(FIRST_REGULAR_TOKEN, model.config.vocab_size, input_ids.shape, generator=generator)
    input_ids, scored, targets = input_ids.to(device), scored.to(device), targets.to(device)

    def log_probs():
        start = time.perf_counter()
        logits = model(input_ids=input_ids).logits[..., : model.config.vocab_size]
        result = torch.log_softmax(logits.float(), dim=-1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return result, time.perf_counter() - start

    reference, fp32_seconds = log_probs()
    model.to(torch.bfloat16)
    low, bf16_seconds = log_probs()

    # (batch, seq) log p(target) difference; rows' sums over their scored positions
    target_gap = (reference.gather(-1, targets[..., None]) - low.gather(-1, targets[..., None])).squeeze(-1)
    row_sum_error = (target_gap * scored).sum(-1).abs()
    ref, lo = reference[scored], low[scored]  # (scored positions, vocab)
    argmax = ref.argmax(-1, keepdim=True)
    argmax_error = (ref.gather(-1, argmax) - lo.gather(-1, argmax)).abs().squeeze(-1)
    kl = (ref.exp() * (ref - lo)).sum(-1)
    return {
        "args": vars(args),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "scored_positions": int(scored.sum()),
        "target_logp_abs_error": _stats(target_gap[scored].abs()),
        "argmax_logp_abs_error": _stats(argmax_error),
        "row_sum_logp_abs_error": _stats(row_sum_error),
        "kl_fp32_to_bf16": {"mean": kl.double().mean().item(), "max": kl.max().item()},
        "argmax_agreement": (ref.argmax(-1) == lo.argmax(-1)).double().mean().item(),
        "forward_seconds": {"float32": fp32_seconds, "bfloat16": bf16_seconds},
    }


def markdown(report: dict) -> str:
    lines = ["| quantity | mean | p99 | max |", "|---|---|---|---|"]
    for key in ("target_logp_abs_error", "argmax_logp_abs_error", "row_sum_logp_abs_error"):
        stats = report[key]
        lines.append(f"| {key} | {stats['mean']:.3g} | {stats['p99']:.3g} | {stats['max']:.3g} |")
    kl = report["kl_fp32_to_bf16"]
    lines.append(f"| kl_fp32_to_bf16 | {kl['mean']:.3g} | | {kl['max']:.3g} |")
    lines.append(f"| argmax_agreement | {report['argmax_agreement']:.4f} | | |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", default="small", choices=sorted(LLADA_SHAPES))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--gen-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    report = compare(args)
    print(f"# size={args.size} device={report['device']} scored positions={report['scored_positions']}")
    print(markdown(report))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    return report


if __name__ == "__main__":
    main()
