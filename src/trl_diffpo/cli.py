"""The ``trl-diffpo`` command line: ``train``, ``eval``, ``demo`` and ``ablate`` subcommands (also ``python -m trl_diffpo``)."""

from __future__ import annotations

import importlib
import sys

# how long `trl-diffpo demo` takes, measured (docs/benchmarks.md: 3.2 min idle, 4 min 05 s with scripts/demo.sh's
# install, 10.8 min with five other jobs on the cores); every place that states it uses these words
DEMO_DURATION = "about 6 min on a 2-core CPU, 7 min with scripts/demo.sh's install, up to 11 min on a busy one"

# subcommand -> (module, function, one-line help); each function takes the remaining argv list and returns an exit code
SUBCOMMANDS = {
    "demo": (
        "trl_diffpo.demo",
        "main",
        f"offline end-to-end DiFFPO demo on a tiny model (CPU, {DEMO_DURATION.split(',')[0]})",
    ),
    "train": ("trl_diffpo.scripts.train", "main", "train a dLLM with DiffpoTrainer from a YAML config / flags"),
    "eval": ("trl_diffpo.evaluation", "main", "accuracy vs NFE evaluation of a model, samplers and thresholds"),
    "ablate": (
        "trl_diffpo.ablation.cli",
        "main",
        "ablation grid (configurations x seeds) with a summary table and plot",
    ),
    "check-checkpoint": ("trl_diffpo.models", "main", "check a LLaDA / Dream checkpoint folder against our classes"),
}


def _usage() -> str:
    lines = ["usage: trl-diffpo <command> [options]", "", "commands:"]
    lines += [f"  {name:<18} {help_}" for name, (_, _, help_) in SUBCOMMANDS.items()]
    lines += ["", "Run `trl-diffpo <command> --help` for the options of a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        print(f"trl-diffpo: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, function_name, _ = SUBCOMMANDS[command]
    try:
        module = importlib.import_module(module_name)
        function = getattr(module, function_name)
    except (ModuleNotFoundError, AttributeError):
        print(f"trl-diffpo {command}: not available in this version yet.", file=sys.stderr)
        return 0 if command == "demo" else 2
    return int(function(rest) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
