"""Check a LLaDA / Dream checkpoint folder against the native classes, without loading any weights.

``check_checkpoint(folder)`` reads ``config.json``, builds the matching native class on the meta device (no memory
for weights), reads only the safetensors *headers* (names and shapes) of ``model.safetensors`` or of every shard
listed in ``model.safetensors.index.json``, and reports every missing, unexpected and shape-mismatched key. The
command line form is ``trl-diffpo check-checkpoint FOLDER``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
_LIST_LIMIT = 20  # keys listed per category in the text report


class CheckpointError(ValueError):
    """The folder cannot be checked at all (no config, unknown model type, no safetensors, unreadable index)."""


@dataclass
class ShapeMismatch:
    """A key present on both sides with different shapes."""

    key: str
    expected: tuple[int, ...]
    found: tuple[int, ...]


@dataclass
class CheckpointReport:
    """The result of :func:`check_checkpoint`.

    Attributes:
        folder: the checked folder.
        model_class: name of the native class built from the config (e.g. ``LLaDAModelLM``).
        num_expected: parameters the class has (tied copies excluded).
        num_found: tensors in the checkpoint.
        missing: keys the class needs that the checkpoint lacks.
        unexpected: keys in the checkpoint the class does not have.
        shape_mismatches: keys whose shapes differ.
        tied: keys the class ties to another weight; they may be absent from the checkpoint.
        missing_from_shards: keys the index lists whose shard does not contain them.
    """

    folder: str
    model_class: str
    num_expected: int = 0
    num_found: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatches: list[ShapeMismatch] = field(default_factory=list)
    tied: list[str] = field(default_factory=list)
    missing_from_shards: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every key and shape matches."""
        return not (self.missing or self.unexpected or self.shape_mismatches or self.missing_from_shards)

    def to_dict(self) -> dict:
        return {
            "folder": self.folder,
            "model_class": self.model_class,
            "ok": self.ok,
            "num_expected": self.num_expected,
            "num_found": self.num_found,
            "missing": self.missing,
            "unexpected": self.unexpected,
            "shape_mismatches": [
                {"key": m.key, "expected": list(m.expected), "found": list(m.found)} for m in self.shape_mismatches
            ],
            "tied": self.tied,
            "missing_from_shards": self.missing_from_shards,
        }

    def format(self) -> str:
        """A human-readable report."""
        lines = [
            f"checkpoint: {self.folder}",
            f"class:      {self.model_class} ({self.num_expected} parameters expected, {self.num_found} tensors found)",
        ]
        if self.tied:
            lines.append(f"tied (may be absent): {', '.join(self.tied)}")
        sections = [
            ("missing (the class needs them, the checkpoint lacks them)", self.missing),
            ("unexpected (in the checkpoint, not in the class)", self.unexpected),
            ("listed in the index but absent from their shard", self.missing_from_shards),
        ]
        for title, keys in sections:
            if keys:
                lines.append(f"{title}: {len(keys)}")
                lines += [f"  - {key}" for key in keys[:_LIST_LIMIT]]
                if len(keys) > _LIST_LIMIT:
                    lines.append(f"  ... and {len(keys) - _LIST_LIMIT} more")
        if self.shape_mismatches:
            lines.append(f"shape mismatches: {len(self.shape_mismatches)}")
            for mismatch in self.shape_mismatches[:_LIST_LIMIT]:
                lines.append(f"  - {mismatch.key}: expected {list(mismatch.expected)}, found {list(mismatch.found)}")
            if len(self.shape_mismatches) > _LIST_LIMIT:
                lines.append(f"  ... and {len(self.shape_mismatches) - _LIST_LIMIT} more")
        lines.append("OK: every key and shape matches." if self.ok else "MISMATCH: see above.")
        return "\n".join(lines)


def _native_class_for(config):
    from .dream import DreamConfig, DreamModel
    from .llada import LLaDAConfig, LLaDAModelLM

    if isinstance(config, LLaDAConfig):
        return LLaDAModelLM
    if isinstance(config, DreamConfig):
        return DreamModel
    raise CheckpointError(
        f"config.json has model_type={getattr(config, 'model_type', None)!r}; the native classes cover "
        f"{LLaDAConfig.model_type!r} (LLaDA) and {DreamConfig.model_type!r} (Dream)."
    )


def _checkpoint_shapes(folder: Path) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """Names and shapes of the tensors in the folder's safetensors, read from the headers only."""
    from safetensors import safe_open

    index_path = folder / SAFETENSORS_INDEX
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(
                f"{index_path} is not a safetensors index (no readable 'weight_map'): {err}"
            ) from err
        shards = sorted(set(weight_map.values()))
    elif (folder / SAFETENSORS_SINGLE).is_file():
        weight_map, shards = None, [SAFETENSORS_SINGLE]
    else:
        raise CheckpointError(
            f"No {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX} in {folder}. Only safetensors checkpoints can be "
            "checked; convert a pytorch_model.bin with `model.save_pretrained(folder)`."
        )
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in shards:
        path = folder / shard
        if not path.is_file():
            raise CheckpointError(f"The index lists shard {shard!r}, which is not in {folder}.")
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                shapes[key] = tuple(handle.get_slice(key).get_shape())
    missing_from_shards = sorted(set(weight_map) - set(shapes)) if weight_map is not None else []
    return shapes, missing_from_shards


def check_checkpoint(folder: str | Path) -> CheckpointReport:
    """Compare every key and shape of a checkpoint folder with the native class built from its ``config.json``.

    Nothing is materialised: the model is built on the meta device and only safetensors headers are read, so this
    is fast even for the 8B checkpoints.

    Raises:
        CheckpointError: when the folder has no ``config.json`` / safetensors, or is not a LLaDA / Dream checkpoint.
    """
    from transformers import AutoConfig

    from . import register_native_models

    register_native_models()
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"No config.json in {folder}: pass a checkpoint folder (the one from_pretrained takes).")
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    model_class = _native_class_for(config)
    with torch.device("meta"):
        model = model_class(config)
    tied = sorted(model.get_expanded_tied_weights_keys(all_submodels=True))
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    found, missing_from_shards = _checkpoint_shapes(folder)

    report = CheckpointReport(
        folder=str(folder),
        model_class=model_class.__name__,
        num_expected=len(set(expected) - set(tied)),
        num_found=len(found),
        tied=tied,
        missing_from_shards=missing_from_shards,
    )
    report.missing = sorted(key for key in expected if key not in found and key not in tied)
    report.unexpected = sorted(key for key in found if key not in expected)
    report.shape_mismatches = [
        ShapeMismatch(key, expected[key], found[key])
        for key in sorted(set(expected) & set(found))
        if expected[key] != found[key]
    ]
    return report


def main(argv: list[str] | None = None) -> int:
    """``trl-diffpo check-checkpoint FOLDER [--json]``: 0 when everything matches, 1 on a mismatch, 2 on an error."""
    parser = argparse.ArgumentParser(
        prog="trl-diffpo check-checkpoint",
        description="Check a LLaDA / Dream checkpoint folder's keys and shapes against trl_diffpo's native classes "
        "(no weights are loaded).",
    )
    parser.add_argument("folder", help="checkpoint folder with config.json and safetensors")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    try:
        report = check_checkpoint(args.folder)
    except (CheckpointError, OSError, ValueError) as err:
        print(f"trl-diffpo check-checkpoint: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    return 0 if report.ok else 1
