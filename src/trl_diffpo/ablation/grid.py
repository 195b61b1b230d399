"""The ablation grid: configurations x seeds, declared in a YAML file (see ``docs/ablation.md`` for the format).

A grid names a **backend** (how one run is trained and evaluated), the **seeds**, the **base** settings every
configuration shares (task, model, warm-up, RL budget, evaluation), an **evaluation** block (the fixed threshold of the
headline columns and the threshold sweep that traces each configuration's frontier) and the **configurations**, each
a name plus the few settings that differ from the base. Every configuration gets the same base budget (steps,
prompts, rollouts), so the comparison is at equal training compute per configuration (in RL steps and rollouts; a
surrogate with more stages spends more forwards per step, which the table's wall time shows).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

SUDOKU_CPU = "sudoku_cpu"  # the demo's task, model and warm-up (trl_diffpo.demo), trained in process
RECIPE = "recipe"  # any `trl-diffpo train` YAML recipe (LLaDA / Dream on GPUs), run as subprocesses
BACKENDS = (SUDOKU_CPU, RECIPE)
HEAD_MODES = ("none", "joint", "sampler_only")
GRID_FORMAT_VERSION = 1
_TOP_LEVEL_KEYS = {
    "name",
    "backend",
    "output_dir",
    "seeds",
    "base",
    "evaluation",
    "configurations",
    "recipe",
    "kl_per_step",
}
_CONFIGURATION_KEYS = {"name", "description", "trainer", "head", "settings"}


@dataclass(frozen=True)
class Configuration:
    """One configuration of the grid.

    Attributes:
        name: the row name in the table (unique in the grid).
        description: one line saying what the configuration is.
        trainer: :class:`~trl_diffpo.DiffpoConfig` fields that differ from the base recipe (surrogate, IS, sampler).
        head: ``"none"`` (model only at the fixed threshold), ``"joint"`` (model + sampler head) or ``"sampler_only"``
            (frozen model, the head learns).
        settings: backend settings that differ from the grid's ``base`` (e.g. a learning rate).
    """

    name: str
    description: str = ""
    trainer: dict[str, Any] = field(default_factory=dict)
    head: str = "none"
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def slug(self) -> str:
        """A file-name-safe version of the name (the run folder)."""
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-") or "configuration"

    def fingerprint(self, base: dict[str, Any], evaluation: dict[str, Any]) -> str:
        """Hash of everything a run of this configuration depends on; a finished run is reused only if it matches."""
        payload = {
            "format_version": GRID_FORMAT_VERSION,
            "base": base,
            "evaluation": evaluation,
            "trainer": self.trainer,
            "head": self.head,
            "settings": self.settings,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class AblationGrid:
    """A parsed grid file (:func:`load_grid`)."""

    name: str
    backend: str
    output_dir: str
    seeds: list[int]
    base: dict[str, Any]
    fixed_threshold: float
    thresholds: list[float]
    configurations: list[Configuration]
    recipe: dict[str, Any] = field(default_factory=dict)
    matched_nfe: float | None = None
    matched_accuracy: float | None = None
    kl_per_step: dict[str, Any] | None = None
    learned_reference: str | None = None  # summary only: not part of the runs' fingerprints

    @property
    def evaluation(self) -> dict[str, Any]:
        """The evaluation block as a dict (part of every run's fingerprint)."""
        return {"fixed_threshold": self.fixed_threshold, "thresholds": list(self.thresholds)}

    @property
    def sweep(self) -> list[float]:
        """The evaluated thresholds: the sweep plus the fixed threshold, sorted, without repeats."""
        return sorted({float(t) for t in self.thresholds} | {float(self.fixed_threshold)})

    def runs(self) -> list[tuple[Configuration, int]]:
        """Every (configuration, seed) pair, seed-major: all configurations of seed 0 first (one warm-up at a time)."""
        return [(configuration, seed) for seed in self.seeds for configuration in self.configurations]

    def select(self, names: list[str] | None = None, seeds: list[int] | None = None) -> AblationGrid:
        """A copy restricted to some configurations (by name or slug) and/or seeds."""
        configurations = self.configurations
        if names:
            known = {c.name: c for c in self.configurations} | {c.slug: c for c in self.configurations}
            unknown = [n for n in names if n not in known]
            if unknown:
                raise ValueError(
                    f"Unknown configuration(s) {unknown}; the grid has {[c.name for c in self.configurations]}."
                )
            wanted = {known[n].name for n in names}
            configurations = [c for c in self.configurations if c.name in wanted]
        copy = AblationGrid(**{**self.__dict__, "configurations": configurations})
        if seeds is not None:
            copy.seeds = [int(s) for s in seeds]
        return copy


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _parse_configuration(raw: Any, index: int, backend: str) -> Configuration:
    where = f"configurations[{index}]"
    _require(isinstance(raw, dict), f"{where} must be a mapping with at least a `name`, got {raw!r}.")
    unknown = sorted(set(raw) - _CONFIGURATION_KEYS)
    _require(not unknown, f"{where} has unknown keys {unknown}; allowed: {sorted(_CONFIGURATION_KEYS)}.")
    _require(isinstance(raw.get("name"), str) and raw["name"].strip(), f"{where} needs a non-empty `name`.")
    head = str(raw.get("head", "none")).lower()
    _require(head in HEAD_MODES, f"{where} ({raw['name']}): head={head!r}; choose one of {', '.join(HEAD_MODES)}.")
    trainer = dict(raw.get("trainer") or {})
    settings = dict(raw.get("settings") or {})
    if backend == SUDOKU_CPU:
        from ..samplers import FIXED_SCHEDULE_SAMPLERS

        sampler = trainer.get("sampler", "entropy_bounded")
        if sampler in FIXED_SCHEDULE_SAMPLERS:
            _require(
                "diffusion_steps" in trainer,
                f"{where} ({raw['name']}): sampler={sampler!r} needs `diffusion_steps` in `trainer` (e.g. 10 for a "
                "20-token canvas: 2 tokens per step).",
            )
            _require(
                head == "none",
                f"{where} ({raw['name']}): a sampler head sets the threshold of an adaptive sampler; with "
                f"sampler={sampler!r} use head: none.",
            )
        from ..demo import DemoSettings

        known = set(DemoSettings.__dataclass_fields__)
        bad = sorted(set(settings) - known)
        _require(not bad, f"{where} ({raw['name']}): unknown settings {bad}; see trl-diffpo demo --help.")
    return Configuration(
        name=raw["name"].strip(),
        description=str(raw.get("description", "")),
        trainer=trainer,
        head=head,
        settings=settings,
    )


def parse_grid(raw: dict[str, Any], source: str = "<grid>") -> AblationGrid:
    """Validate a grid given as a dict (the parsed YAML); errors name the key and the fix."""
    _require(isinstance(raw, dict), f"{source}: the grid file must be a YAML mapping.")
    unknown = sorted(set(raw) - _TOP_LEVEL_KEYS)
    _require(not unknown, f"{source}: unknown top-level keys {unknown}; allowed: {sorted(_TOP_LEVEL_KEYS)}.")
    backend = raw.get("backend", SUDOKU_CPU)
    _require(backend in BACKENDS, f"{source}: backend={backend!r}; choose one of {', '.join(BACKENDS)}.")
    seeds = raw.get("seeds", [0])
    _require(
        isinstance(seeds, list) and seeds and all(isinstance(s, int) for s in seeds) and len(set(seeds)) == len(seeds),
        f"{source}: `seeds` must be a non-empty list of distinct integers, got {seeds!r}.",
    )
    base = dict(raw.get("base") or {})
    if backend == SUDOKU_CPU:
        from ..demo import DemoSettings

        bad = sorted(set(base) - set(DemoSettings.__dataclass_fields__))
        _require(not bad, f"{source}: unknown `base` settings {bad}; they are trl-diffpo demo's options (--help).")
        forbidden = sorted(set(base) & {"seed", "output_dir", "fixed_threshold", "sweep_thresholds", "quick"})
        _require(
            not forbidden,
            f"{source}: `base` may not set {forbidden}: seeds come from `seeds`, the output folder from `output_dir` "
            "and thresholds from `evaluation`.",
        )
    evaluation = dict(raw.get("evaluation") or {})
    _require("fixed_threshold" in evaluation, f"{source}: `evaluation.fixed_threshold` is required (e.g. 0.1).")
    thresholds = evaluation.get("thresholds", [])
    _require(
        isinstance(thresholds, list) and all(isinstance(t, int | float) and t >= 0 for t in thresholds),
        f"{source}: `evaluation.thresholds` must be a list of numbers >= 0, got {thresholds!r}.",
    )
    configurations_raw = raw.get("configurations")
    _require(
        isinstance(configurations_raw, list) and configurations_raw,
        f"{source}: `configurations` must be a non-empty list.",
    )
    configurations = [_parse_configuration(c, i, backend) for i, c in enumerate(configurations_raw)]
    names = [c.name for c in configurations]
    slugs = [c.slug for c in configurations]
    _require(len(set(names)) == len(names), f"{source}: configuration names repeat: {names}.")
    _require(len(set(slugs)) == len(slugs), f"{source}: configuration names collide as folder names: {slugs}.")
    recipe = dict(raw.get("recipe") or {})
    if backend == RECIPE:
        _require("config" in recipe, f"{source}: backend 'recipe' needs `recipe.config` (a trl-diffpo train YAML).")
    learned_reference = evaluation.get("learned_reference")
    _require(
        learned_reference is None or learned_reference in names,
        f"{source}: evaluation.learned_reference={learned_reference!r} is not one of {names} (the configuration whose "
        "frontier the learned thresholds are compared with, e.g. model-only training at a fixed gamma).",
    )
    kl = raw.get("kl_per_step")
    if kl is not None:
        _require(isinstance(kl, dict), f"{source}: `kl_per_step` must be a mapping (configuration, seed, ...).")
        _require(
            kl.get("configuration") in names,
            f"{source}: kl_per_step.configuration={kl.get('configuration')!r} is not one of {names}.",
        )
    return AblationGrid(
        name=str(raw.get("name", "ablation")),
        backend=backend,
        output_dir=str(raw.get("output_dir", "outputs/ablation")),
        seeds=list(seeds),
        base=base,
        fixed_threshold=float(evaluation["fixed_threshold"]),
        thresholds=[float(t) for t in thresholds],
        configurations=configurations,
        recipe=recipe,
        matched_nfe=evaluation.get("matched_nfe"),
        matched_accuracy=evaluation.get("matched_accuracy"),
        kl_per_step=kl,
        learned_reference=learned_reference,
    )


def load_grid(path: str) -> AblationGrid:
    """Read and validate a grid YAML file."""
    import yaml

    with open(path, encoding="utf-8") as handle:
        raw = yaml.safe_load(handle)
    return parse_grid(raw, source=path)
