"""The settings of ``trl-diffpo demo`` (:class:`DemoSettings`) and their command line (one flag per field)."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from dataclasses import dataclass

from .cli import DEMO_DURATION

DEMO_FORMAT_VERSION = 1


@dataclass
class DemoSettings:
    """Every knob of the demo (the command-line options map one to one)."""

    output_dir: str = "./outputs/demo"
    seed: int = 0
    quick: bool = False
    threads: int | None = None
    # task
    num_train: int = 4096
    num_held_out: int = 512  # 1 point = 5 puzzles
    min_blanks: int = 6
    max_blanks: int = 10
    gen_length: int = 20
    # model
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    # warm-up (masked-diffusion SFT), stopped once validation accuracy reaches sft_target_accuracy: every 25 steps on 64
    # puzzles of the training grids, stopped at >= 30%. RL needs a warm-up that is far enough in training and still
    # low enough to leave RL room (its gain varies from about 0 to 14 points with seed and warm-up): docs/results.md
    # explains the choice, and what a held-out-like validation (validation_split="test", 256 puzzles, every 10 steps
    # from step 100, >= 18%) and a fixed 250-step warm-up did.
    sft_steps: int = 800
    sft_target_accuracy: float | None = 0.3  # None: no early stop (exactly sft_steps steps)
    sft_eval_every: int = 25
    sft_eval_start: int = 0  # no validation before this step
    num_validation: int = 64
    validation_split: str = "train"  # "train": the training grids; "test": grids never seen in training
    sft_batch_size: int = 64
    sft_learning_rate: float = 1e-3
    # RL (DiffpoTrainer + sampler head)
    rl_steps: int = 100
    prompts_per_step: int = 8
    num_generations: int = 8
    num_iterations: int = 1
    rl_learning_rate: float = 5e-5
    rl_temperature: float = 1.0
    epsilon: float = 0.2
    fixed_threshold: float = 0.1
    threshold_max: float = 1.0
    nfe_penalty: float = 0.3
    head_learning_rate: float = 1e-3
    head_sigma: float = 0.5
    head_scale_advantages: bool = False
    head_features: str = "prompt"  # "state": a threshold per denoising step (SamplerHeadConfig.features)
    # evaluation
    eval_batch_size: int = 64
    sweep_thresholds: tuple[float, ...] = (0.02, 0.3, 1.0)
    retrain_warmup: bool = False

    def __post_init__(self):
        from .sampler_head import FEATURES

        if self.head_features not in FEATURES:
            raise ValueError(
                f"head_features={self.head_features!r}; choose 'prompt' (one threshold per prompt) or 'state' (a "
                "threshold per denoising step)."
            )
        if self.validation_split not in ("train", "test"):
            raise ValueError(
                f"validation_split={self.validation_split!r}; choose 'test' (solution grids never seen in training, "
                "like the held-out set) or 'train' (the training grids)."
            )

    def apply_quick(self) -> None:
        """Shrink every phase to a few steps (for the test suite)."""
        self.num_train, self.num_held_out = 64, 16
        self.hidden_size, self.num_layers, self.num_heads = 32, 1, 2
        self.sft_steps, self.sft_batch_size, self.sft_eval_every, self.num_validation = 4, 16, 2, 8
        self.sft_eval_start = 0
        self.rl_steps, self.prompts_per_step, self.num_generations, self.num_iterations = 2, 2, 4, 1
        self.eval_batch_size = 16
        self.sweep_thresholds = (1.0,)

    def warmup_key(self) -> str:
        """Hash of the settings the warm-up checkpoint depends on (the cache key)."""
        fields = (
            "seed num_train min_blanks max_blanks gen_length hidden_size num_layers num_heads sft_steps "
            "sft_batch_size sft_learning_rate sft_target_accuracy sft_eval_every sft_eval_start num_validation "
            "validation_split"
        ).split()
        payload = {name: getattr(self, name) for name in fields}
        payload["format_version"] = DEMO_FORMAT_VERSION
        digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
        return digest[:12]


def build_parser() -> argparse.ArgumentParser:
    """The ``trl-diffpo demo`` argument parser (every :class:`DemoSettings` field)."""
    defaults = DemoSettings()
    parser = argparse.ArgumentParser(
        prog="trl-diffpo demo",
        description=(
            "Offline end-to-end DiFFPO demo: a tiny bidirectional model learns 4x4 Sudoku by masked-diffusion SFT, "
            "then DiFFPO RL with a jointly learned sampler threshold; prints accuracy and NFE before/after. Takes "
            f"{DEMO_DURATION}."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    helps = {
        "output_dir": "where the warm-up cache, the model folder (with sampler head), the plot and results go",
        "seed": "seed of data, model init, SFT, RL and evaluation",
        "quick": "a few steps of each phase on a smaller model (for tests; numbers are meaningless)",
        "threads": "torch CPU threads (default: torch's choice; OMP_NUM_THREADS also works)",
        "num_train": "training puzzles",
        "num_held_out": "held-out puzzles (their solution grids never occur in training)",
        "min_blanks": "fewest blank cells per puzzle",
        "max_blanks": "most blank cells per puzzle (at most 12)",
        "gen_length": "completion canvas length (16 digits + EOS padding); decoded as one block",
        "hidden_size": "model width",
        "num_layers": "transformer layers",
        "num_heads": "attention heads",
        "sft_steps": "most warm-up steps",
        "sft_target_accuracy": "the warm-up stops once validation accuracy reaches this (leaves room for RL)",
        "sft_eval_every": "warm-up steps between two validation measurements",
        "sft_eval_start": "first warm-up step with a validation measurement",
        "num_validation": "validation puzzles (never a held-out puzzle) that decide when the warm-up stops",
        "validation_split": "grids of the validation puzzles: 'test' (never seen in training, like the held-out set) "
        "or 'train'",
        "sft_batch_size": "warm-up batch size",
        "sft_learning_rate": "warm-up peak learning rate",
        "rl_steps": "DiFFPO optimizer steps",
        "prompts_per_step": "prompts per RL step (each decoded num_generations times)",
        "num_generations": "rollouts per prompt (the GRPO group size G)",
        "num_iterations": "inner iterations per generation batch (GRPO's mu)",
        "rl_learning_rate": "DiFFPO learning rate of the model",
        "rl_temperature": "rollout temperature",
        "epsilon": "PPO clip range",
        "fixed_threshold": "entropy-bounded gamma of the fixed-threshold rows, the RL rollouts' base, and the head's init",
        "threshold_max": "largest gamma the sampler head can choose",
        "nfe_penalty": "lambda of the sampler reward reward - lambda * NFE / gen_length",
        "head_learning_rate": "sampler head learning rate",
        "head_sigma": "exploration noise of the head (std in logit space)",
        "head_scale_advantages": "divide the head's group advantages by the group std (off: nfe_penalty is an exact "
        "exchange rate between reward and NFE)",
        "head_features": "what the sampler head reads: 'prompt' (one threshold per prompt) or 'state' (a threshold "
        "per denoising step from the decoding state: block entropy / confidence, progress)",
        "eval_batch_size": "evaluation batch size",
        "sweep_thresholds": "extra gammas evaluated for the accuracy-vs-NFE plot",
        "retrain_warmup": "ignore the cached warm-up model",
    }
    for field_ in dataclasses.fields(DemoSettings):
        flag = "--" + field_.name.replace("_", "-")
        default = getattr(defaults, field_.name)
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true", help=helps[field_.name])
        elif isinstance(default, tuple):
            parser.add_argument(flag, type=float, nargs="*", default=list(default), help=helps[field_.name])
        else:
            kind = int if field_.name == "threads" else type(default)
            parser.add_argument(flag, type=kind, default=default, help=helps[field_.name])
    return parser


def parse_settings(argv: list[str] | None) -> DemoSettings:
    """Settings from the command line; ``--quick`` shrinks the phases, and explicit options still override it."""
    parser = build_parser()
    namespace = parser.parse_args(argv)
    if namespace.quick:  # quick values become the defaults, then parse again so explicit flags win
        quick = DemoSettings()
        quick.apply_quick()
        parser.set_defaults(**{f.name: getattr(quick, f.name) for f in dataclasses.fields(DemoSettings)})
        namespace = parser.parse_args(argv)
    values = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(DemoSettings)}
    return DemoSettings(**{name: tuple(v) if isinstance(v, list) else v for name, v in values.items()})
