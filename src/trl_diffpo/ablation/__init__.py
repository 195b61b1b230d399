"""``trl-diffpo ablate``: a rerunnable ablation of DiFFPO's components over seeds (see ``docs/ablation.md``).

- :mod:`.grid`: the YAML grid (configurations x seeds, shared base settings, evaluation sweep);
- :mod:`.records`: one JSON record per (configuration, seed), written atomically, reused on resume;
- :mod:`.sudoku_cpu` / :mod:`.recipe`: the backends that train and evaluate one run (demo task on CPU; any
  ``trl-diffpo train`` recipe through the CLI);
- :mod:`.summary` / :mod:`.plot`: mean +- std and n over seeds, matched-NFE / matched-accuracy columns, frontiers PNG;
- :mod:`.kl_per_step`: KL of the mean-field / two-stage surrogates to the true step conditional, per step;
- :mod:`.runner` / :mod:`.cli`: the loop (resume, progress) and the command line.
"""

from .grid import AblationGrid, Configuration, load_grid, parse_grid
from .kl_per_step import aggregate_by_step, kl_per_step_on_rows, trajectory_token_stats, write_kl_per_step
from .runner import run_grid, write_outputs
from .summary import accuracy_at_nfe, frontier, mean_std_n, nfe_at_accuracy, summarise

__all__ = [
    "AblationGrid",
    "Configuration",
    "accuracy_at_nfe",
    "aggregate_by_step",
    "frontier",
    "kl_per_step_on_rows",
    "load_grid",
    "mean_std_n",
    "nfe_at_accuracy",
    "parse_grid",
    "run_grid",
    "summarise",
    "trajectory_token_stats",
    "write_kl_per_step",
    "write_outputs",
]
