"""What the benchmark scripts share: the model/device options, the device and dtype set-up, random-weight
materialisation of a model built on the meta device.

The scripts import it as ``_common``: ``python benchmarks/bench_x.py`` puts this folder on ``sys.path``, and a script
loaded by file path (the tests) adds it itself.
"""

from __future__ import annotations

import argparse

import torch

INIT_STD = 0.02  # normal init of the random weights (LLaDA's init_std)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SIZES = ["tiny", "small", "llada8b"]


def add_model_arguments(parser: argparse.ArgumentParser, dtypes: dict[str, torch.dtype]) -> None:
    """``--device`` (CUDA when available), ``--dtype`` (one of ``dtypes``) and ``--size``."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", default=None, choices=sorted(dtypes), help="default: bfloat16 on CUDA, else float32"
    )
    parser.add_argument("--size", default="tiny", choices=SIZES)


def add_run_arguments(parser: argparse.ArgumentParser, clock_help: str) -> None:
    """``--threads``, ``--seed`` and ``--clock`` (wall or process CPU time, CPU only)."""
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clock", default="wall", choices=["wall", "process"], help=clock_help)


def setup_device(args: argparse.Namespace, dtypes: dict[str, torch.dtype]) -> tuple[torch.device, torch.dtype]:
    """The ``(device, dtype)`` the options ask for (bfloat16 on CUDA, float32 elsewhere unless ``--dtype``); applies
    ``--threads`` to torch."""
    device = torch.device(args.device)
    dtype = dtypes[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    if args.threads:
        torch.set_num_threads(args.threads)
    return device, dtype


def materialise_random_weights(model, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Moves a model built on the meta device to ``device`` in ``dtype`` (uninitialised storage, no host copy), then
    fills it: unit RMSNorm scales (the 1-D parameters), N(0, ``INIT_STD``) for every other parameter. Buffers are left
    to the caller."""
    model = model.to(dtype=dtype).to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:  # RMSNorm scales
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, INIT_STD, generator=generator)
    return model
