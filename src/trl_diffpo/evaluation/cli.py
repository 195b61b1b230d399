"""``trl-diffpo eval``: the command line over :func:`~trl_diffpo.evaluation.evaluate`."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch

from ..generation import _check_options as check_decoding_options
from ..samplers import check_threshold
from ..scripts.errors import CliError
from ..scripts.local_files import check_data_files, check_model_source
from .results import PLOT_FILE, RESULTS_FILE
from .runner import evaluate
from .settings import SamplerSetting, parse_sampler_settings

PROG = "trl-diffpo eval"


def build_parser() -> argparse.ArgumentParser:
    """The ``trl-diffpo eval`` argument parser."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Accuracy vs decoding cost (NFE) of a masked diffusion LM on a task, for a list of samplers and thresholds "
            "and optionally its learned sampler head. Writes results.json and accuracy_vs_nfe.png (Pareto frontier)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    model = parser.add_argument_group("model")
    model.add_argument("--model", required=True, help="model folder or Hub id (LLaDA, Dream, a bidirectional LM)")
    model.add_argument("--adapter", default=None, help="a PEFT (LoRA) adapter folder or Hub id applied on --model")
    model.add_argument("--tokenizer", default=None, help="tokenizer folder or Hub id (default: --adapter or --model)")
    model.add_argument(
        "--sampler-head",
        default=None,
        help="folder or Hub id holding sampler_head.safetensors (default: --adapter or --model when they hold one)",
    )
    model.add_argument("--mask-token-id", type=int, default=None, help="[MASK] id (default: model config, tokenizer)")
    model.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights dtype")
    model.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    model.add_argument("--trust-remote-code", action="store_true", help="allow Hub remote code (LLaDA/Dream Hub code)")

    data = parser.add_argument_group("data")
    data.add_argument("--task", required=True, help="task name: gsm8k, math500, countdown, sudoku (or registered)")
    data.add_argument("--split", default=None, help="dataset split (default: the task's evaluation split)")
    data.add_argument("--data-file", default=None, help="a local JSON/JSONL/CSV/Parquet file with the task's columns")
    data.add_argument("--num-samples", type=int, default=None, help="evaluate the first N rows (default: all)")
    data.add_argument(
        "--raw-prompts",
        action="store_true",
        help="use the --data-file's own 'prompt' column as is instead of the task's prompt template (e.g. the demo's "
        "held_out.jsonl)",
    )
    data.add_argument(
        "--chat",
        choices=["auto", "yes", "no"],
        default="auto",
        help="conversational prompts (auto: when the tokenizer has a chat template)",
    )

    decoding = parser.add_argument_group("decoding")
    decoding.add_argument(
        "--samplers",
        nargs="+",
        default=["entropy_bounded:0.1,0.5,1.0"],
        help="settings 'sampler:v1,v2'; thresholds for entropy_bounded / confidence_threshold (or 'learned'), "
        "steps=N for low_confidence / random. Example: 'entropy_bounded:0.1,0.5 low_confidence:steps=64'",
    )
    decoding.add_argument(
        "--use-head",
        action="store_true",
        help="also evaluate the learned per-prompt threshold of the sampler head (adds '<head sampler>:learned')",
    )
    decoding.add_argument("--gen-length", type=int, default=256, help="completion canvas length")
    decoding.add_argument("--block-length", type=int, default=32, help="semi-autoregressive block length")
    decoding.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; >0 samples")
    decoding.add_argument("--batch-size", type=int, default=16, help="prompts decoded together")
    decoding.add_argument("--seed", type=int, default=0, help="seed of the sampling noise (determinism)")

    output = parser.add_argument_group("output")
    output.add_argument("--output-dir", default="eval_results", help="where results.json and the PNG go")
    output.add_argument("--keep-completions", action="store_true", help="store the decoded completions in the JSON")
    output.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def check_options(args, settings: list[SamplerSetting]) -> None:
    """Refuse inconsistent options before any model is loaded (:class:`CliError`, one line)."""
    for name in ("gen_length", "block_length", "batch_size"):
        if getattr(args, name) <= 0:
            raise CliError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}.")
    if args.num_samples is not None and args.num_samples <= 0:
        raise CliError(f"--num-samples must be a positive number of rows, got {args.num_samples}.")
    for setting in settings:
        try:
            check_decoding_options(
                args.gen_length, args.block_length, setting.sampler, setting.steps, args.temperature
            )
            if setting.threshold is not None:
                check_threshold(torch.tensor([setting.threshold]), setting.sampler)
        except ValueError as error:
            raise CliError(
                f"setting {setting.label!r}: {error} (see --gen-length, --block-length, --samplers)"
            ) from None


def _loaded(what: str, name: str, load):
    """``load()``, with an ``OSError`` (not found, offline, no such files) turned into a one-line :class:`CliError`."""
    try:
        return load()
    except OSError as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CliError(f"cannot load {what} {name!r}: {first_line}") from error


def _load_for_cli(args):
    from transformers import AutoTokenizer
    from trl.trainer.utils import create_model_from_path

    for option, name in (("--model", args.model), ("--adapter", args.adapter), ("--tokenizer", args.tokenizer)):
        check_model_source(name, option)
    check_model_source(args.sampler_head, "--sampler-head")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = _loaded(
        "--model",
        args.model,
        lambda: create_model_from_path(args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code),
    )
    if args.adapter:
        from peft import PeftModel

        model = _loaded("--adapter", args.adapter, lambda: PeftModel.from_pretrained(model, args.adapter))
    model = model.to(device).eval()
    tokenizer_name = args.tokenizer or args.adapter or args.model
    tokenizer = _loaded(
        "the tokenizer",
        tokenizer_name,
        lambda: AutoTokenizer.from_pretrained(
            tokenizer_name, padding_side="left", trust_remote_code=args.trust_remote_code
        ),
    )
    head = None
    head_source = args.sampler_head
    if head_source is None and args.use_head:
        for candidate in (args.adapter, args.model):
            if candidate and os.path.isfile(os.path.join(candidate, "sampler_head.safetensors")):
                head_source = candidate
                break
        if head_source is None:
            raise CliError("--use-head needs a sampler head: pass --sampler-head FOLDER (none found in the model).")
    if head_source is not None:
        from ..sampler_head import load_sampler_head

        head = _loaded("--sampler-head", head_source, lambda: load_sampler_head(head_source, device=device))
    return model, tokenizer, head, head_source


def _load_rows(args, tokenizer):
    from ..tasks import get_task

    try:
        task = get_task(args.task)
    except KeyError as error:
        raise CliError(error.args[0]) from None
    if args.raw_prompts:
        if not args.data_file:
            raise CliError("--raw-prompts reads the prompts of a --data-file; pass one.")
        from ..data import load_raw

        rows = load_raw(args.data_file, "train", data_files=args.data_file)
        if "prompt" not in rows.column_names:
            raise CliError(f"--raw-prompts: {args.data_file} has no 'prompt' column (found {rows.column_names}).")
        return task, rows
    chat = {"auto": None, "yes": True, "no": False}[args.chat]
    kwargs: dict[str, Any] = {"tokenizer": tokenizer, "chat": chat}
    if args.data_file:
        kwargs["data_files"] = args.data_file
    if args.num_samples is not None:
        kwargs["num_examples"] = args.num_samples
    return task, task.load(args.split or task.eval_split, **kwargs)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``trl-diffpo eval``: 0 on success, 2 (one ``trl-diffpo eval: error: ...`` line) on a user
    error: an inconsistent option, a missing path, an unreadable file, data the task cannot use."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except (CliError, ValueError) as error:  # evaluate's ValueErrors are about the inputs, and name the fix
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2


def _run(args) -> int:
    settings = parse_sampler_settings(args.samplers)
    check_options(args, settings)
    check_data_files(args.data_file, "--data-file")
    model, tokenizer, head, head_source = _load_for_cli(args)
    if args.use_head and head is not None:
        learned = SamplerSetting(head.config.sampler, learned=True)
        if learned not in settings:
            settings.append(learned)
    task, rows = _load_rows(args, tokenizer)
    results = evaluate(
        model,
        tokenizer,
        rows,
        settings,
        task=task,
        sampler_head=head,
        gen_length=args.gen_length,
        block_length=args.block_length,
        batch_size=args.batch_size,
        temperature=args.temperature,
        seed=args.seed,
        num_samples=args.num_samples,
        mask_token_id=args.mask_token_id,
        output_dir=args.output_dir,
        keep_completions=args.keep_completions,
        show_progress=not args.no_progress,
        metadata={"model": args.model, "adapter": args.adapter, "sampler_head": head_source},
    )
    print(results.table())
    print(f"\nwrote {os.path.join(args.output_dir, RESULTS_FILE)} and {os.path.join(args.output_dir, PLOT_FILE)}")
    return 0
