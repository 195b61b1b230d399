"""Benchmark one DiffpoTrainer optimizer step, split into rollout, log-prob, policy forward/backward and optimizer.

For every configuration of the matrix (likelihood x sampler x sampler head x fine-tuning mode, token IS correction)
the script builds a fresh random-weight policy, a :class:`trl_diffpo.DiffpoTrainer` on a small offline Countdown-style
prompt set with a cheap text reward, and trains ``--max-steps`` optimizer steps. The trainer is not changed: its
methods are wrapped *on the instance* with timers (``torch.cuda.synchronize`` around each on CUDA) and a callback
times the optimizer step. On a CPU the timer is the wall clock or, with ``--clock process``, the process CPU time
(use it with ``OMP_NUM_THREADS=1`` on a machine shared with other jobs). Phases, in seconds per optimizer step:

- ``rollout``: ``_generate_single_turn`` (masked-diffusion decoding of the generation batch);
- ``log_prob``: ``_log_probs_per_iteration`` (the old / reference surrogate forwards at generation time, one set per
  inner iteration);
- ``scoring``: the rest of ``_generate_and_score_completions`` (decoding to text, rewards, advantages, IS weights,
  metrics);
- ``policy_forward``: ``compute_loss`` (the surrogate forward with gradients, plus the sampler-head loss);
- ``policy_backward``: ``accelerator.backward``;
- ``optimizer``: ``optimizer.step()`` (between the ``on_pre_optimizer_step`` and ``on_optimizer_step`` events);
- ``step``: ``on_step_begin`` to ``on_step_end`` (everything above plus gradient clipping and the callbacks).

The summary is the median over the measured steps (every step is kept in the JSON); the first step is a warm-up and
is excluded when more than one step runs. With ``--num-iterations k > 1`` rollouts (and their log-probs) happen on
one step in ``k``: look at the per-step records, or use ``--num-iterations 1`` (the default) to see every phase in
every step. Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the run and per phase (the peak
counter is reset at the start of every leaf phase); on a CPU the process's RSS high-water mark
(``resource.getrusage``), which never decreases: it is a process-wide figure, exact only for the first configuration
of a run (run one configuration per process for per-configuration CPU memory).

Sizes (random weights, nothing is downloaded):

- ``tiny``: the character-level test model of :mod:`trl_diffpo.tiny` (bidirectional Llama, hidden 64, 2 layers);
- ``small``: a native LLaDA (:class:`trl_diffpo.models.LLaDAModelLM`; d_model 512, 4 layers, 8 heads, MLP 1536,
  vocabulary 32000) built like ``llada8b``, to check that path on a CPU;
- ``llada8b``: LLaDA-8B-shaped (the official 8B config values, :class:`trl_diffpo.models.LLaDAConfig`'s defaults),
  built on the meta device and materialised on ``--device`` in ``--dtype``; LoRA r=128 on the block linears.

The tokenizer of ``small`` / ``llada8b`` is a character-level WordLevel tokenizer padded with filler tokens to the
model's vocabulary, with ``[MASK]`` / EOS at the model's ids (LLaDA's 126336 / 126081 for ``llada8b``).

Examples::

    OMP_NUM_THREADS=1 python benchmarks/bench_trainer.py --device cpu --size tiny --clock process \\
        --output trainer_tiny.json
    python benchmarks/bench_trainer.py --device cuda --dtype bfloat16 --size llada8b --finetune lora \\
        --prompt-len 256 --gen-len 256 --block 32 --steps 128 --batch 8 --num-generations 8 \\
        --gradient-checkpointing --max-steps 3 --output trainer_llada8b_lora.json
"""

from __future__ import annotations

import argparse
import functools
import gc
import itertools
import json
import math
import os
import platform
import random
import resource
import statistics
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402

BENCHMARKS_DIR = os.path.dirname(os.path.abspath(__file__))
if BENCHMARKS_DIR not in sys.path:  # loaded by file path (the tests): make the shared helpers importable
    sys.path.insert(0, BENCHMARKS_DIR)
from _common import DTYPES as ALL_DTYPES  # noqa: E402
from _common import (  # noqa: E402
    INIT_STD,  # noqa: F401 (the random weights' std; the tests read it as bench_trainer.INIT_STD)
    add_model_arguments,
    add_run_arguments,
    materialise_random_weights,
    setup_device,
)

# float16 is left out: the Trainer's fp16 mode needs float32 master weights (it refuses to unscale fp16 gradients)
DTYPES = {name: ALL_DTYPES[name] for name in ("float32", "bfloat16")}
LIKELIHOODS = ("mean_field", "two_stage")
SAMPLERS = ("low_confidence", "entropy_bounded")
FINETUNE_MODES = ("lora", "full")
HEAD_MODES = ("off", "on", "sampler_only")  # "on": joint training of model and head
ROLLOUT_CACHES = ("none", "prefix", "dual")
LORA_RANKS = {"tiny": 8, "small": 32, "llada8b": 128}
LORA_ALPHA = 64  # d1's LoRA alpha for r=128
TINY_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NUM_PROMPTS = 64  # rows of the offline prompt set
LEAF_PHASES = ("rollout", "log_prob", "policy_forward", "policy_backward", "optimizer")
PHASES = ("rollout", "log_prob", "scoring", "policy_forward", "policy_backward", "optimizer", "step")
MIB = 2**20

# Native LLaDA shapes. ``llada8b`` is LLaDAConfig's defaults (the released 8B config); ``small`` keeps its layout.
LLADA_SHAPES = {
    "small": {
        "d_model": 512,
        "n_heads": 8,
        "n_kv_heads": 8,
        "n_layers": 4,
        "mlp_hidden_size": 1536,
        "vocab_size": 32000,
        "embedding_size": 32000,
        "mask_token_id": 31999,
        "eos_token_id": 2,
        "pad_token_id": 2,
    },
    "llada8b": {},
}


# ----------------------------------------------------------------------------------------------- model and data


def build_vocab_tokenizer(vocab_size: int, mask_token_id: int, eos_token_id: int):
    """A character-level tokenizer covering ``vocab_size`` ids: ``[MASK]`` and EOS (also the pad, as in LLaDA) at the
    given ids, the characters of :mod:`trl_diffpo.tiny` at the lowest free ids, filler tokens ``<tN>`` elsewhere (so
    that every id the random model samples decodes)."""
    from trl_diffpo.tiny import DEFAULT_CHARACTERS, char_level_tokenizer

    if not (0 <= mask_token_id < vocab_size and 0 <= eos_token_id < vocab_size and mask_token_id != eos_token_id):
        raise ValueError(
            f"mask_token_id={mask_token_id} and eos_token_id={eos_token_id} must be distinct ids below "
            f"vocab_size={vocab_size}."
        )
    special = {mask_token_id: "<mask>", eos_token_id: "<eos>"}
    characters = iter(["<unk>", *dict.fromkeys(DEFAULT_CHARACTERS)])
    vocab = {}
    for token_id in range(vocab_size):
        token = special.get(token_id) or next(characters, None) or f"<t{token_id}>"
        vocab[token] = token_id
    return char_level_tokenizer(vocab, pad_token="<eos>", eos_token="<eos>", mask_token="<mask>")


def build_random_llada(shape: dict, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A random-weight :class:`LLaDAModelLM`: built on the meta device (no host memory), materialised on ``device``
    in ``dtype``, then initialised with N(0, 0.02) weights and unit RMSNorm scales."""
    from trl_diffpo.models import LLaDAConfig, LLaDAModelLM

    config = LLaDAConfig(**shape)
    with torch.device("meta"):
        model = LLaDAModelLM(config)
    model = materialise_random_weights(model, device, dtype, seed)
    if any(True for _ in model.buffers()):  # LLaDA computes its rotary tables on the fly: nothing to rebuild
        raise RuntimeError("The LLaDA model has buffers that the meta-device build leaves uninitialised.")
    return model


def build_policy(size: str, device: torch.device, dtype: torch.dtype):
    """Returns ``(model, tokenizer, lora_target_modules)`` for ``size``."""
    if size == "tiny":
        from trl_diffpo.tiny import build_char_tokenizer, build_tiny_model

        tokenizer = build_char_tokenizer(chat_template=False)
        model = build_tiny_model(tokenizer, architecture="llama", dtype=dtype).to(device)
        return model, tokenizer, TINY_LORA_TARGETS
    from trl_diffpo.models import LLADA_LORA_TARGET_MODULES

    model = build_random_llada(LLADA_SHAPES[size], device, dtype)
    config = model.config
    tokenizer = build_vocab_tokenizer(config.padded_vocab_size, config.mask_token_id, config.eos_token_id)
    return model, tokenizer, LLADA_LORA_TARGET_MODULES


def countdown_prompts(num_prompts: int, prompt_len: int, seed: int) -> list[str]:
    """Countdown task texts (random numbers and target) cut or repeated to exactly ``prompt_len`` characters, so that
    every prompt is ``prompt_len`` tokens with the character-level tokenizers."""
    from trl_diffpo.data.prompts import countdown_question

    rng = random.Random(seed)
    prompts = []
    for _ in range(num_prompts):
        text = countdown_question([rng.randint(1, 99) for _ in range(3)], rng.randint(1, 99))
        prompts.append((text * (prompt_len // len(text) + 1))[:prompt_len])
    return prompts


def digit_fraction_reward(completions, **kwargs) -> list[float]:
    """A cheap reward that varies with the text: the fraction of digits in the completion (0 for an empty one)."""
    return [sum(ch.isdigit() for ch in text) / max(len(text), 1) for text in completions]


# --------------------------------------------------------------------------------------------------- timing


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (Linux), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def rss_peak_mib() -> float:
    """The process's RSS high-water mark in MiB (``ru_maxrss`` is in KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak / 1024


class PhaseProfiler(TrainerCallback):
    """Times the trainer's phases by wrapping its methods on the instance; a callback for the optimizer and step.

    ``steps`` holds one dict per optimizer step: seconds per phase, and on CUDA the peak allocated MiB per leaf phase.
    """

    def __init__(self, device: torch.device, clock: str = "wall"):
        self.device = device
        # process CPU time is robust on a CPU shared with other jobs when torch runs on one thread
        self.now = time.process_time if clock == "process" and device.type == "cpu" else time.perf_counter
        self.steps: list[dict] = []
        self._current: dict = defaultdict(float)
        self._step_start = None
        self._optimizer_start = None
        self.peak_allocated_mib = 0.0

    # wrapping ------------------------------------------------------------------------------------------------

    def attach(self, trainer) -> None:
        self._wrap(trainer, "_generate_single_turn", "rollout")
        self._wrap(trainer, "_log_probs_per_iteration", "log_prob")
        self._wrap(trainer, "_generate_and_score_completions", "generate_and_score")
        self._wrap(trainer, "compute_loss", "policy_forward")
        self._wrap(trainer.accelerator, "backward", "policy_backward")
        trainer.add_callback(self)

    def _wrap(self, owner, method_name: str, phase: str) -> None:
        method = getattr(owner, method_name)

        @functools.wraps(method)
        def timed(*args, **kwargs):
            self._begin_leaf(phase)
            start = self.now()
            try:
                return method(*args, **kwargs)
            finally:
                _synchronize(self.device)
                self._current[phase] += self.now() - start
                self._end_leaf(phase)

        setattr(owner, method_name, timed)

    def _begin_leaf(self, phase: str) -> None:
        _synchronize(self.device)
        if self.device.type == "cuda" and phase in LEAF_PHASES:
            self.peak_allocated_mib = max(self.peak_allocated_mib, torch.cuda.max_memory_allocated(self.device) / MIB)
            torch.cuda.reset_peak_memory_stats(self.device)

    def _end_leaf(self, phase: str) -> None:
        if self.device.type == "cuda" and phase in LEAF_PHASES:
            peak = torch.cuda.max_memory_allocated(self.device) / MIB
            key = f"peak_mib/{phase}"
            self._current[key] = max(self._current.get(key, 0.0), peak)
            self.peak_allocated_mib = max(self.peak_allocated_mib, peak)

    # callback events -----------------------------------------------------------------------------------------

    def on_step_begin(self, args, state, control, **kwargs):
        _synchronize(self.device)
        self._current = defaultdict(float)
        self._step_start = self.now()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._begin_leaf("optimizer")
        self._optimizer_start = self.now()

    def on_optimizer_step(self, args, state, control, **kwargs):
        _synchronize(self.device)
        self._current["optimizer"] += self.now() - self._optimizer_start
        self._end_leaf("optimizer")

    def on_step_end(self, args, state, control, **kwargs):
        _synchronize(self.device)
        record = dict(self._current)
        record["step"] = self.now() - self._step_start
        generate_and_score = record.pop("generate_and_score", 0.0)
        record["scoring"] = max(generate_and_score - record.get("rollout", 0.0) - record.get("log_prob", 0.0), 0.0)
        for phase in PHASES:
            record.setdefault(phase, 0.0)
        self.steps.append(record)


# ------------------------------------------------------------------------------------------------ the matrix


@dataclass(frozen=True)
class BenchConfig:
    likelihood: str
    sampler: str
    sampler_head: bool
    finetune: str
    is_correction: str = "token"
    head_mode: str = "joint"
    rollout_cache: str = "none"

    @property
    def name(self) -> str:
        head = ("+head" if self.head_mode == "joint" else f"+head({self.head_mode})") if self.sampler_head else ""
        cache = "" if self.rollout_cache == "none" else f"/cache={self.rollout_cache}"
        return f"{self.likelihood}/{self.is_correction}-IS/{self.sampler}{head}/{self.finetune}{cache}"


def config_matrix(args) -> list[BenchConfig]:
    """Every requested combination; the sampler head only with the adaptive sampler (it learns its threshold)."""
    configs = []
    for likelihood, sampler, head, finetune, cache in itertools.product(
        args.likelihoods, args.samplers, args.head, args.finetune, args.rollout_cache
    ):
        if head != "off" and sampler == "low_confidence":
            continue
        head_mode = "sampler_only" if head == "sampler_only" else "joint"
        configs.append(
            BenchConfig(likelihood, sampler, head != "off", finetune, head_mode=head_mode, rollout_cache=cache)
        )
    return configs


def default_eb_threshold(vocab_size: int) -> float:
    """2 ln(V) nats: a random-weight model's per-token entropy is close to ln(V), so the entropy-bounded sampler then
    unmasks about two tokens per step, the rate of low_confidence with ``steps = gen_len / 2``."""
    return 2.0 * math.log(vocab_size)


def build_trainer(config: BenchConfig, args, device: torch.device, dtype: torch.dtype, output_dir: str):
    from datasets import Dataset
    from peft import LoraConfig

    from trl_diffpo import DiffpoConfig, DiffpoTrainer, SamplerHeadCallback

    model, tokenizer, lora_targets = build_policy(args.size, device, dtype)
    vocab_size = model.get_input_embeddings().weight.shape[0]
    eb_threshold = args.eb_threshold if args.eb_threshold is not None else default_eb_threshold(vocab_size)
    training_args = DiffpoConfig(
        output_dir=output_dir,
        use_cpu=device.type == "cpu",
        bf16=dtype == torch.bfloat16,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch,
        num_generations=args.num_generations,
        num_iterations=args.num_iterations,
        gradient_accumulation_steps=1,
        activation_checkpointing=args.gradient_checkpointing,  # transformers 5 name of gradient_checkpointing
        max_completion_length=args.gen_len,
        block_length=args.block,
        diffusion_steps=args.steps or args.gen_len // 2,
        sampler=config.sampler,
        threshold=eb_threshold if config.sampler == "entropy_bounded" else None,
        likelihood=config.likelihood,
        is_correction=config.is_correction,
        rollout_cache=config.rollout_cache,
        rollout_cache_refresh=args.rollout_cache_refresh,
        mask_token_id=model.config.mask_token_id,
        beta=args.beta,
        learning_rate=1e-5,
        seed=args.seed,
    )
    peft_config = None
    if config.finetune == "lora":
        rank = args.lora_r or LORA_RANKS[args.size]
        peft_config = LoraConfig(
            r=rank, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=lora_targets, task_type="CAUSAL_LM"
        )
    callbacks = []
    if config.sampler_head:
        # a range around the fixed threshold, starting from it, so rollouts stay comparable with the head off
        callbacks.append(
            SamplerHeadCallback(
                mode=config.head_mode, threshold_min=0.0, threshold_max=2 * eb_threshold, init_threshold=eb_threshold
            )
        )
    dataset = Dataset.from_dict({"prompt": countdown_prompts(NUM_PROMPTS, args.prompt_len, args.seed)})
    trainer = DiffpoTrainer(
        model=model,
        reward_funcs=digit_fraction_reward,
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # keep the per-step log dicts out of the benchmark's output
    return trainer


def summarise(steps: list[dict], skip_first: bool = True) -> dict:
    """Median seconds per phase over the measured steps (all but the first when there are several): the median
    keeps a step disturbed by another job on a shared machine from moving the figure; every step is in the JSON."""
    measured = steps[1:] if skip_first and len(steps) > 1 else steps
    summary = {phase: statistics.median(step[phase] for step in measured) for phase in PHASES}
    peaks = {key for step in steps for key in step if key.startswith("peak_mib/")}
    for key in sorted(peaks):
        summary[key] = max(step.get(key, 0.0) for step in steps)
    summary["measured_steps"] = len(measured)
    return summary


def merge_rounds(runs: list[dict]) -> dict:
    """One result per configuration from its interleaved rounds: phases are the median over every measured step of
    every round (each round's first step excluded, as in :func:`summarise`), logged metrics the mean over rounds."""
    if len(runs) == 1 or any("error" in run for run in runs):
        return runs[0] if len(runs) == 1 else next(run for run in runs if "error" in run)
    measured = [step for run in runs for step in (run["steps"][1:] if len(run["steps"]) > 1 else run["steps"])]
    merged = {**runs[-1], "rounds": len(runs), "steps": [step for run in runs for step in run["steps"]]}
    merged["phases"] = summarise(measured, skip_first=False) if measured else runs[-1]["phases"]
    for key, value in runs[-1].items():
        if key.startswith(("diffusion/", "diffpo/")) and value is not None:
            values = [run[key] for run in runs if run.get(key) is not None]
            merged[key] = sum(values) / len(values)
    return merged


def logged_mean(trainer, key: str) -> float | None:
    values = [entry[key] for entry in trainer.state.log_history if key in entry]
    return sum(values) / len(values) if values else None


def run_config(config: BenchConfig, args, device: torch.device, dtype: torch.dtype) -> dict:
    result = {"config": config.name, **asdict(config)}
    trainer = profiler = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with tempfile.TemporaryDirectory(prefix="bench_trainer_") as output_dir:
            trainer = build_trainer(config, args, device, dtype, output_dir)
            profiler = PhaseProfiler(device, args.clock)
            profiler.attach(trainer)
            trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
            if device.type == "cuda":
                # weights (+ reference copy for full fine-tuning with beta > 0, + adapters and head) before training
                result["allocated_after_init_mib"] = torch.cuda.memory_allocated(device) / MIB
            trainer.train()
        result["trainable_parameters"] = trainable
        result["phases"] = summarise(profiler.steps)
        result["steps"] = profiler.steps
        for metric in (
            "diffusion/nfe/mean",
            "diffusion/tokens_per_step",
            "diffpo/is_weight/mean",
            "diffpo/is_weight/clamped_frac",
            "diffpo/logp_gap/mean",
            "diffpo/surrogate_forwards",
        ):
            result[metric] = logged_mean(trainer, metric)
        if device.type == "cuda":
            result["peak_allocated_mib"] = max(
                profiler.peak_allocated_mib, torch.cuda.max_memory_allocated(device) / MIB
            )
    except torch.OutOfMemoryError as err:
        result["error"] = f"out of memory: {str(err).splitlines()[0]}"
    finally:
        del trainer, profiler  # the wrapped methods hold the trainer too
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result["rss_peak_mib"] = rss_peak_mib()
    return result


def markdown_table(results: list[dict], device: torch.device) -> str:
    memory = "peak alloc (MiB)" if device.type == "cuda" else "RSS high-water (MiB)"
    lines = [
        f"| config | NFE/row | rollout (s) | log-prob (s) | scoring (s) | policy fwd (s) | policy bwd (s) | optimizer (s) "
        f"| step (s) | {memory} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['config']} | {r['error']} |||||||||")
            continue
        p = r["phases"]
        nfe = r["diffusion/nfe/mean"]
        mem = r["peak_allocated_mib"] if device.type == "cuda" else r["rss_peak_mib"]
        lines.append(
            f"| {r['config']} | {nfe:.1f} | {p['rollout']:.3f} | {p['log_prob']:.3f} | {p['scoring']:.3f} | "
            f"{p['policy_forward']:.3f} | {p['policy_backward']:.3f} | {p['optimizer']:.3f} | {p['step']:.3f} | "
            f"{mem:.0f} |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser, DTYPES)
    parser.add_argument("--prompt-len", type=int, default=64, help="prompt tokens (characters)")
    parser.add_argument("--gen-len", type=int, default=32, help="completion (canvas) length")
    parser.add_argument("--block", type=int, default=16, help="semi-autoregressive block length")
    parser.add_argument("--steps", type=int, default=None, help="low_confidence denoising steps; default gen-len / 2")
    parser.add_argument(
        "--eb-threshold", type=float, default=None, help="entropy_bounded gamma in nats; default 2 ln(vocab size)"
    )
    parser.add_argument("--batch", type=int, default=4, help="per_device_train_batch_size (completions per step)")
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--num-iterations", type=int, default=1, help="inner iterations per generation batch")
    parser.add_argument(
        "--beta", type=float, default=0.04, help="KL coefficient (DiFFPO's 0.04; 0 skips the reference)"
    )
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--max-steps", type=int, default=4, help="optimizer steps per configuration (first = warm-up)")
    parser.add_argument("--likelihoods", nargs="+", default=list(LIKELIHOODS), choices=LIKELIHOODS)
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    parser.add_argument(
        "--head",
        nargs="+",
        default=["off", "on"],
        choices=HEAD_MODES,
        help="SamplerHeadCallback: off, on (joint) or sampler_only (frozen dLLM)",
    )
    parser.add_argument("--finetune", nargs="+", default=list(FINETUNE_MODES), choices=FINETUNE_MODES)
    parser.add_argument(
        "--rollout-cache",
        nargs="+",
        default=["none"],
        choices=ROLLOUT_CACHES,
        help="DiffpoConfig.rollout_cache modes to compare (each is one more configuration of the matrix)",
    )
    parser.add_argument("--rollout-cache-refresh", type=int, default=None, help="DiffpoConfig.rollout_cache_refresh")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the whole matrix this many times, interleaved (config A, B, A, B, ...); the summary is the median "
        "over every measured step of every round (each round's first step is its warm-up)",
    )
    parser.add_argument("--lora-r", type=int, default=None, help="LoRA rank; default 8 / 32 / 128 by size")
    add_run_arguments(
        parser,
        clock_help="CPU only: wall time, or process CPU time (use it with one thread on a machine shared with other "
        "jobs; with several threads it adds up their CPU time, spin-waits included)",
    )
    parser.add_argument("--output", default=None, help="write the results to this JSON file")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device, dtype = setup_device(args, DTYPES)
    import transformers

    transformers.logging.set_verbosity_error()
    # transformers 5 renames gradient -> activation checkpointing; TRL still reads the old name internally
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*gradient_checkpointing.*")
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    header = {
        "device": str(device),
        "hardware": hardware,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "clock": "cuda-synchronized wall" if device.type == "cuda" else args.clock,
        "dtype": str(dtype),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    print("# " + " ".join(f"{key}={value}" for key, value in header.items()), flush=True)
    configs = config_matrix(args)
    rounds: dict[str, list[dict]] = {config.name: [] for config in configs}
    for round_index in range(args.rounds):
        for config in configs:
            start = time.perf_counter()
            rounds[config.name].append(run_config(config, args, device, dtype))
            print(f"# done: {config.name}, round {round_index + 1} ({time.perf_counter() - start:.1f} s)", flush=True)
    results = [merge_rounds(runs) for runs in rounds.values()]
    print(markdown_table(results, device))
    report = {"args": vars(args), "environment": header, "phases": list(PHASES), "results": results}
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(report, handle, indent=2)
    return report


if __name__ == "__main__":
    main()
