"""Benchmark the masked-diffusion decoding engine: tokens/s, NFE/s and the sampler's overhead over pure forwards.

For each sampler the script runs :func:`trl_diffpo.generation.diffusion_generate` on random prompts and then replays
the very same sequence of forward passes (same number, same shapes: rows that finished early leave the batch, so
later forwards may carry fewer rows) as bare backbone forwards. The sampler overhead is

    overhead = (generate time - bare forward time) / bare forward time

i.e. everything the engine does besides the model itself: distributions, token draws, selection, trace bookkeeping,
host synchronisation.

``--cache`` takes one or more decoding modes: ``none``, ``prefix``, ``dual`` (``diffusion_generate(cache=...)``) and
``full-logits`` (``cache="none"`` with the logits of every position computed and the current blocks' gathered
afterwards, as the engine did before it asked the backbone for the current blocks' logits only). With more than one,
the modes run interleaved in one process (``--repeats`` rounds, each mode once per round) and a second table gives
each mode's generate time as a ratio to the first mode listed; the bare-forward replay (overhead) runs for
``none`` only. Each sampler runs once to warm up and record the forward shapes, then ``--repeats`` times the
generate and the bare forwards, interleaved; the minimum of each is reported (the least disturbed run). On CUDA the
times come from CUDA events after ``torch.cuda.synchronize()``; on a CPU from the wall clock or, with
``--clock process``, the process CPU time (use it with ``--threads 1`` on a machine shared with other jobs).

Sizes (random weights, nothing is downloaded):

- ``tiny``: the character-level test model of :mod:`trl_diffpo.tiny` (hidden 64, 2 layers, vocabulary 97);
- ``small``: a bidirectional Llama (hidden 512, 4 layers, vocabulary 32000) built like ``llada8b``: on the meta
  device, then materialised; use it to check that code path on a CPU;
- ``llada8b``: an LLaDA-8B-shaped bidirectional Llama (hidden 4096, 32 layers, 32 heads, intermediate 12288,
  vocabulary 126464, ``is_causal=False``), built on the meta device and materialised on ``--device`` in ``--dtype``
  (needs about 17 GB of accelerator memory in bf16).

Examples::

    python benchmarks/bench_generation.py --device cpu --dtype float32 --size tiny --batch 8 --prompt-len 64 \\
        --gen-len 64 --block 16 --repeats 5
    python benchmarks/bench_generation.py --device cuda --dtype bfloat16 --size llada8b --batch 8 --prompt-len 256 \\
        --gen-len 256 --block 32 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass

import torch

from trl_diffpo.backbones import BackboneOutput, DiffusionBackbone, get_backbone
from trl_diffpo.block_logits import CACHE_MODES
from trl_diffpo.generation import diffusion_generate
from trl_diffpo.samplers import SAMPLERS

BENCHMARKS_DIR = os.path.dirname(os.path.abspath(__file__))
if BENCHMARKS_DIR not in sys.path:  # loaded by file path (the tests): make the shared helpers importable
    sys.path.insert(0, BENCHMARKS_DIR)
from _common import (  # noqa: E402
    DTYPES,
    add_model_arguments,
    add_run_arguments,
    materialise_random_weights,
    setup_device,
)

# Shapes of the random-weight bidirectional Llamas (the tiny size comes from trl_diffpo.tiny).
MODEL_SHAPES = {
    "small": {
        "hidden_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "intermediate_size": 1536,
        "vocab_size": 32000,
        "mask_token_id": 31999,
        "eos_token_id": 2,
    },
    "llada8b": {  # LLaDA-8B: mask id 126336, eos 126081
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "intermediate_size": 12288,
        "vocab_size": 126464,
        "mask_token_id": 126336,
        "eos_token_id": 126081,
    },
}
FIRST_REGULAR_TOKEN = 5  # prompts avoid the low ids where special tokens usually live
FULL_LOGITS = "full-logits"  # cache="none" computing every position's logits (the engine before logits_positions)
DECODING_MODES = (*CACHE_MODES, FULL_LOGITS)


def random_tokens(shape, vocab_size: int, mask_token_id: int, generator: torch.Generator, device) -> torch.Tensor:
    """Random regular token ids (never the mask id)."""
    ids = torch.randint(FIRST_REGULAR_TOKEN, vocab_size, shape, generator=generator, device=device)
    return torch.where(ids == mask_token_id, FIRST_REGULAR_TOKEN, ids)


@dataclass
class SamplerResult:
    sampler: str
    options: str
    mean_nfe_per_row: float
    forward_passes: int
    generate_s: float
    forwards_s: float
    tokens_per_s: float
    nfe_per_s: float
    overhead: float


@dataclass
class CacheResult:
    sampler: str
    cache: str
    mean_nfe_per_row: float
    forward_calls: int
    generate_s: float
    ratio: float  # generate_s / generate_s of the first mode listed


class FullLogitsBackbone(DiffusionBackbone):
    """Computes the logits of every position and gathers the requested ones afterwards (the engine before it asked
    for the current blocks' logits only)."""

    def __init__(self, backbone: DiffusionBackbone):
        super().__init__(backbone.model, backbone.mask_token_id, logits_shift=backbone.logits_shift)

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False, logits_positions=None, **kwargs):
        output = super().forward(input_ids, attention_mask, output_hidden_states, **kwargs)
        if logits_positions is None:
            return output
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None]
        return BackboneOutput(logits=output.logits[rows, logits_positions], hidden_states=output.hidden_states)


class CallCounter(DiffusionBackbone):
    """Counts forward calls (a cached step may take several: see trl_diffpo.block_logits)."""

    def __init__(self, backbone: DiffusionBackbone):
        super().__init__(backbone.model, backbone.mask_token_id, logits_shift=backbone.logits_shift)
        self.inner, self.calls = backbone, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.inner.forward(*args, **kwargs)


def bench_cache_modes(sampler, backbone, prompts, args, device) -> list[CacheResult]:
    """Generate time of every ``--cache`` mode, interleaved (``--repeats`` rounds), as ratios to the first mode."""
    options = sampler_options(sampler, args)
    common = {"gen_length": args.gen_len, "block_length": args.block, "sampler": sampler}
    common["temperature"] = args.temperature
    targets = {mode: FullLogitsBackbone(backbone) if mode == FULL_LOGITS else backbone for mode in args.cache}

    def run(mode, target):
        generator = torch.Generator(device=device).manual_seed(args.seed)
        cache = "none" if mode == FULL_LOGITS else mode
        return diffusion_generate(target, prompts, generator=generator, cache=cache, **common, **options)

    outputs, calls, times = {}, {}, {mode: [] for mode in args.cache}
    for _ in range(args.repeats):  # the forward calls are counted in the timed runs (no separate warm-up run)
        for mode, target in targets.items():
            counter = CallCounter(target)

            def timed_run(mode=mode, counter=counter):
                outputs[mode] = run(mode, counter)

            times[mode].append(timed(timed_run, device, args.clock))
            calls[mode] = counter.calls
    base = min(times[args.cache[0]])
    return [
        CacheResult(
            sampler=sampler,
            cache=mode,
            mean_nfe_per_row=float(outputs[mode].nfe.float().mean()),
            forward_calls=calls[mode],
            generate_s=min(times[mode]),
            ratio=min(times[mode]) / base,
        )
        for mode in args.cache
    ]


def cache_table(results: list[CacheResult]) -> str:
    header = ["sampler", "cache", "mean NFE/row", "forward calls", "generate (s)", "ratio"]
    rows = [
        [
            r.sampler,
            r.cache,
            f"{r.mean_nfe_per_row:.1f}",
            str(r.forward_calls),
            f"{r.generate_s:.3f}",
            f"{r.ratio:.3f}x",
        ]
        for r in results
    ]
    return table(header, rows)


def table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table: the first two columns left-aligned, the numbers right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def build_random_bidirectional_llama(shape: dict, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A random-weight bidirectional Llama: built on the meta device (no host memory), then materialised."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **shape,
        num_key_value_heads=shape["num_attention_heads"],
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        is_causal=False,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = materialise_random_weights(model, device, dtype, seed)
    # Non-persistent buffers (the rotary frequencies) are not parameters: rebuild them on the device in float32.
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config).to(device)
    return model.eval()


def build_model(size: str, device: torch.device, dtype: torch.dtype):
    """Returns ``(model, mask_token_id, vocab_size)``."""
    if size == "tiny":
        from trl_diffpo.tiny import build_char_tokenizer, build_tiny_model

        tokenizer = build_char_tokenizer()
        model = build_tiny_model(tokenizer, architecture="llama", dtype=dtype).to(device)
        return model, tokenizer.mask_token_id, len(tokenizer)
    shape = MODEL_SHAPES[size]
    return build_random_bidirectional_llama(shape, device, dtype), shape["mask_token_id"], shape["vocab_size"]


class RecordingBackbone(DiffusionBackbone):
    """Remembers the number of rows of every forward pass, to replay them as bare forwards."""

    def __init__(self, backbone: DiffusionBackbone):
        super().__init__(backbone.model, backbone.mask_token_id, logits_shift=backbone.logits_shift)
        self.rows_per_forward: list[int] = []

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False, **kwargs):
        self.rows_per_forward.append(input_ids.shape[0])
        return super().forward(input_ids, attention_mask, output_hidden_states, **kwargs)


def timed(fn, device: torch.device, clock: str = "wall") -> float:
    """Time of ``fn()`` in seconds: CUDA events on a GPU; on a CPU the wall clock, or with ``clock="process"`` the
    process CPU time (robust on a shared machine when torch runs on one thread)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000.0
    now = time.process_time if clock == "process" else time.perf_counter
    start_time = now()
    fn()
    return now() - start_time


def sampler_options(sampler: str, args) -> dict:
    if sampler in ("low_confidence", "random"):
        return {"steps": args.steps or args.gen_len // 2}
    if sampler == "confidence_threshold":
        return {"threshold": args.confidence_threshold}
    return {"threshold": args.entropy_threshold}


def bench_sampler(sampler, backbone, prompts, vocab_size, args, device) -> SamplerResult:
    options = sampler_options(sampler, args)
    common = dict(
        gen_length=args.gen_len,
        block_length=args.block,
        sampler=sampler,
        temperature=args.temperature,
        **options,
    )

    def run(target):
        # same seed every run: the same trajectory, hence the same forward shapes
        generator = torch.Generator(device=device).manual_seed(args.seed)
        return diffusion_generate(target, prompts, generator=generator, **common)

    recorder = RecordingBackbone(backbone)
    output = run(recorder)  # warm-up, and the forward shapes to replay
    rows_per_forward = recorder.rows_per_forward

    canvas_length = prompts.shape[1] + args.gen_len
    token_generator = torch.Generator(device=device).manual_seed(args.seed + 1)
    bare_ids = random_tokens(
        (prompts.shape[0], canvas_length), vocab_size, backbone.mask_token_id, token_generator, device
    )

    def bare_forwards():
        with torch.no_grad():
            for rows in rows_per_forward:
                backbone(bare_ids[:rows])

    bare_forwards()  # warm-up
    generate_times, forward_times = [], []
    for _ in range(args.repeats):  # interleaved, so that both see the same machine load
        generate_times.append(timed(lambda: run(backbone), device, args.clock))
        forward_times.append(timed(bare_forwards, device, args.clock))

    generate_s, forwards_s = min(generate_times), min(forward_times)
    return SamplerResult(
        sampler=sampler,
        options=", ".join(f"{key}={value}" for key, value in options.items()),
        mean_nfe_per_row=float(output.nfe.float().mean()),
        forward_passes=len(rows_per_forward),
        generate_s=generate_s,
        forwards_s=forwards_s,
        tokens_per_s=prompts.shape[0] * args.gen_len / generate_s,
        nfe_per_s=len(rows_per_forward) / generate_s,
        overhead=(generate_s - forwards_s) / forwards_s,
    )


def markdown_table(results: list[SamplerResult]) -> str:
    header = ["sampler", "options", "mean NFE/row", "forwards", "generate (s)", "bare forwards (s)", "tokens/s"]
    header += ["NFE/s", "overhead"]
    rows = [
        [r.sampler, r.options, f"{r.mean_nfe_per_row:.1f}", str(r.forward_passes), f"{r.generate_s:.3f}"]
        + [f"{r.forwards_s:.3f}", f"{r.tokens_per_s:.1f}", f"{r.nfe_per_s:.1f}", f"{100 * r.overhead:+.1f}%"]
        for r in results
    ]
    return table(header, rows)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser, DTYPES)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--gen-len", type=int, default=256)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--steps", type=int, default=None, help="fixed-schedule samplers; default gen-len / 2")
    parser.add_argument("--confidence-threshold", type=float, default=0.9)
    parser.add_argument("--entropy-threshold", type=float, default=1.0, help="EB gamma, in nats")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--cache",
        nargs="+",
        default=["none"],
        choices=list(DECODING_MODES),
        help="decoding mode(s): none, prefix, dual, full-logits; several run interleaved, as ratios to the first",
    )
    add_run_arguments(
        parser, clock_help="CPU only: wall time, or process CPU time (use with --threads 1 on a shared machine)"
    )
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    return parser.parse_args(argv)


def main(argv=None) -> list[SamplerResult]:
    args = parse_args(argv)
    device, dtype = setup_device(args, DTYPES)
    model, mask_token_id, vocab_size = build_model(args.size, device, dtype)
    backbone = get_backbone(model, mask_token_id=mask_token_id)
    prompt_generator = torch.Generator(device=device).manual_seed(args.seed)
    prompts = random_tokens((args.batch, args.prompt_len), vocab_size, mask_token_id, prompt_generator, device)
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(
        f"# size={args.size} device={device} ({hardware}) dtype={dtype} batch={args.batch} "
        f"prompt_len={args.prompt_len} gen_len={args.gen_len} block={args.block} temperature={args.temperature} "
        f"repeats={args.repeats} clock={args.clock if device.type == 'cpu' else 'cuda-events'} torch={torch.__version__} threads={torch.get_num_threads()} vocab={vocab_size}"
    )
    compare_modes = args.cache != ["none"]
    results = []
    for sampler in args.samplers:
        if compare_modes:
            results.extend(bench_cache_modes(sampler, backbone, prompts, args, device))
        else:
            results.append(bench_sampler(sampler, backbone, prompts, vocab_size, args, device))
        print(f"# done: {sampler}", flush=True)
    print(cache_table(results) if compare_modes else markdown_table(results))
    if args.json:
        with open(args.json, "w") as handle:
            key = "cache_results" if compare_modes else "results"
            json.dump({"args": vars(args), key: [asdict(r) for r in results]}, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
