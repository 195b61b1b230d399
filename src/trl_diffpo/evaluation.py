"""Accuracy-vs-NFE evaluation of a masked diffusion LM: samplers, thresholds and a learned sampler head.

A dLLM is judged by how often it is right **and** by how many forward passes (NFE) it needs. :func:`evaluate`
decodes a held-out set once per *setting* (a sampler with a threshold or a step count, or the learned head's
per-prompt threshold), scores the completions with the task's correctness function and reports, per setting:
accuracy, mean/std NFE, tokens committed per step, wall time and throughput. It writes ``results.json`` and a PNG
plot of accuracy against mean NFE in which the Pareto-optimal settings (no other setting is at least as accurate with
fewer NFEs) are joined and highlighted.

Python::

    from trl_diffpo.evaluation import SamplerSetting, evaluate

    results = evaluate(
        model, tokenizer, task="sudoku", dataset=test_rows,
        settings=[SamplerSetting("entropy_bounded", threshold=0.1), SamplerSetting("low_confidence", steps=16)],
        gen_length=32, block_length=32, output_dir="eval_out",
    )
    print(results.table())

Command line (``trl-diffpo eval --help`` lists every option)::

    trl-diffpo eval --model ./outputs/demo/model --task sudoku --num-samples 256 \\
        --samplers "entropy_bounded:0.1,0.5 low_confidence:steps=32" --use-head --output-dir eval_out
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .backbones import get_backbone
from .generation import diffusion_generate
from .samplers import ADAPTIVE_SAMPLERS, FIXED_SCHEDULE_SAMPLERS, SAMPLERS
from .sft import left_pad, tokenize_prompts

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
PLOT_FILE = "accuracy_vs_nfe.png"
LEARNED = "learned"  # the threshold token of a setting that uses the sampler head
RESULTS_FORMAT_VERSION = 1
PLOT_MARGIN = 3.0  # accuracy points of head room above and below the plotted results
# spreads seeds of consecutive batches apart (any odd constant works; fixed so results are reproducible)
_BATCH_SEED_STRIDE = 9_973


@dataclass(frozen=True)
class SamplerSetting:
    """One decoding setting to evaluate.

    Args:
        sampler: one of ``low_confidence``, ``random``, ``confidence_threshold``, ``entropy_bounded``.
        threshold: the adaptive samplers' threshold (confidence in (0, 1] or EB gamma >= 0).
        steps: total denoising steps of the fixed-schedule samplers.
        learned: take each prompt's threshold from the sampler head (adaptive samplers only).
    """

    sampler: str
    threshold: float | None = None
    steps: int | None = None
    learned: bool = False

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"Unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}.")
        if self.sampler in FIXED_SCHEDULE_SAMPLERS:
            if self.steps is None or self.threshold is not None or self.learned:
                raise ValueError(
                    f"Sampler {self.sampler!r} has a fixed schedule: give `steps` (e.g. '{self.sampler}:steps=64') "
                    "and no threshold."
                )
        else:
            if self.steps is not None:
                raise ValueError(f"Sampler {self.sampler!r} is adaptive: give a threshold, not steps.")
            if self.learned == (self.threshold is not None):
                raise ValueError(
                    f"Sampler {self.sampler!r} needs exactly one of a threshold (e.g. '{self.sampler}:0.1') or "
                    f"the learned head ('{self.sampler}:{LEARNED}')."
                )

    @property
    def label(self) -> str:
        """Short name, e.g. ``entropy_bounded:0.1``, ``low_confidence:steps=64``, ``entropy_bounded:learned``."""
        if self.sampler in FIXED_SCHEDULE_SAMPLERS:
            return f"{self.sampler}:steps={self.steps}"
        return f"{self.sampler}:{LEARNED if self.learned else f'{self.threshold:g}'}"


def parse_sampler_settings(spec: str | Sequence[str]) -> list[SamplerSetting]:
    """Parse settings like ``"entropy_bounded:0.1,0.5 low_confidence:steps=64,128 confidence_threshold:0.9"``.

    Groups are separated by spaces (or given as a list); each is ``sampler:values`` with comma-separated values:
    thresholds for the adaptive samplers (or ``learned`` for the sampler head), ``steps=N`` or plain integers for
    the fixed-schedule samplers.
    """
    groups = spec.split() if isinstance(spec, str) else [part for item in spec for part in item.split()]
    settings: list[SamplerSetting] = []
    for group in groups:
        sampler, sep, values = group.partition(":")
        if not sep or not values:
            raise ValueError(
                f"Cannot read sampler setting {group!r}: write 'sampler:values', e.g. 'entropy_bounded:0.1,0.5' or "
                "'low_confidence:steps=64'."
            )
        if sampler not in SAMPLERS:
            raise ValueError(f"Unknown sampler {sampler!r} in {group!r}; choose one of {', '.join(SAMPLERS)}.")
        for value in values.split(","):
            value = value.strip()
            try:
                if sampler in FIXED_SCHEDULE_SAMPLERS:
                    settings.append(SamplerSetting(sampler, steps=int(value.removeprefix("steps="))))
                elif value == LEARNED:
                    settings.append(SamplerSetting(sampler, learned=True))
                else:
                    settings.append(SamplerSetting(sampler, threshold=float(value)))
            except ValueError as err:
                raise ValueError(f"Cannot read value {value!r} of sampler setting {group!r}: {err}") from err
    if not settings:
        raise ValueError("No sampler settings given.")
    return settings


@dataclass
class SettingResult:
    """The measurements of one setting (see :func:`evaluate`)."""

    label: str
    sampler: str
    threshold: float | None
    steps: int | None
    learned: bool
    num_samples: int
    num_correct: int
    accuracy: float
    mean_nfe: float
    std_nfe: float
    tokens_per_step: float
    wall_time_s: float
    samples_per_s: float
    mean_threshold: float | None = None
    std_threshold: float | None = None
    pareto_optimal: bool = False


@dataclass
class EvaluationResults:
    """What :func:`evaluate` returns (and writes as JSON)."""

    settings: list[SettingResult]
    metadata: dict[str, Any] = field(default_factory=dict)
    completions: dict[str, list[str]] | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: ``format_version``, ``metadata``, ``settings`` (and ``completions`` when kept)."""
        payload = {
            "format_version": RESULTS_FORMAT_VERSION,
            "metadata": self.metadata,
            "settings": [asdict(result) for result in self.settings],
        }
        if self.completions is not None:
            payload["completions"] = self.completions
        return payload

    def by_label(self, label: str) -> SettingResult:
        """The result of the setting named ``label``."""
        for result in self.settings:
            if result.label == label:
                return result
        raise KeyError(f"No setting {label!r}; have {[result.label for result in self.settings]}.")

    def table(self) -> str:
        """A fixed-width text table, one row per setting (``*`` marks the Pareto-optimal ones)."""
        header = f"{'setting':<32} {'accuracy':>9} {'mean NFE':>9} {'std NFE':>8} {'tok/step':>9} {'time s':>8}"
        lines = [header, "-" * len(header)]
        for result in self.settings:
            mark = "*" if result.pareto_optimal else " "
            lines.append(
                f"{result.label:<31}{mark} {100 * result.accuracy:>8.1f}% {result.mean_nfe:>9.2f} "
                f"{result.std_nfe:>8.2f} {result.tokens_per_step:>9.2f} {result.wall_time_s:>8.1f}"
            )
        return "\n".join(lines)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For ``(mean_nfe, accuracy)`` points, whether each is Pareto-optimal: no other point has NFE <= and accuracy
    >= with at least one strict (fewer forward passes is better, higher accuracy is better)."""
    flags = []
    for index, (nfe, accuracy) in enumerate(points):
        dominated = any(
            other_nfe <= nfe and other_accuracy >= accuracy and (other_nfe < nfe or other_accuracy > accuracy)
            for other_index, (other_nfe, other_accuracy) in enumerate(points)
            if other_index != index
        )
        flags.append(not dominated)
    return flags


def _resolve_correctness(task, correctness_fn) -> tuple[Callable[..., list[bool]], str | None]:
    if correctness_fn is not None:
        return correctness_fn, getattr(task, "name", task if isinstance(task, str) else None)
    if task is None:
        raise ValueError("evaluate needs a `task` (a name or a trl_diffpo.tasks.Task) or a `correctness_fn`.")
    if isinstance(task, str):
        from .tasks import get_task

        task = get_task(task)
    return task.is_correct, task.name


def _dataset_columns(dataset, start: int, stop: int) -> dict[str, list]:
    if hasattr(dataset, "column_names") and hasattr(dataset, "__getitem__") and not isinstance(dataset, dict):
        return dict(dataset[start:stop])
    if isinstance(dataset, dict):
        return {name: list(values[start:stop]) for name, values in dataset.items()}
    rows = list(dataset[start:stop])
    return {name: [row[name] for row in rows] for name in rows[0]} if rows else {}


def _dataset_length(dataset) -> int:
    if isinstance(dataset, dict):
        lengths = {len(values) for values in dataset.values()}
        if len(lengths) != 1:
            raise ValueError(f"The dataset's columns have different lengths {sorted(lengths)}.")
        return lengths.pop()
    return len(dataset)


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - parameterless test doubles
        return torch.device("cpu")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    tokenizer,
    dataset,
    settings: Sequence[SamplerSetting | str],
    *,
    task=None,
    correctness_fn: Callable[..., list[bool]] | None = None,
    sampler_head: nn.Module | None = None,
    gen_length: int = 256,
    block_length: int = 32,
    batch_size: int = 16,
    temperature: float = 0.0,
    seed: int = 0,
    num_samples: int | None = None,
    mask_token_id: int | None = None,
    output_dir: str | os.PathLike | None = None,
    plot_title: str | None = None,
    keep_completions: bool = False,
    show_progress: bool = True,
    metadata: dict[str, Any] | None = None,
) -> EvaluationResults:
    """Decode ``dataset`` once per setting and report accuracy and decoding cost.

    Args:
        model: the dLLM (anything :func:`trl_diffpo.backbones.get_backbone` accepts, PEFT models included).
        tokenizer: its tokenizer; prompts are tokenized as TRL does (chat template for conversational prompts).
        dataset: a ``datasets.Dataset``, a dict of columns or a list of row dicts with a ``prompt`` column and the
            columns the correctness function reads.
        settings: :class:`SamplerSetting` objects or strings like ``"entropy_bounded:0.1"`` (see
            :func:`parse_sampler_settings`).
        task: a task name or :class:`trl_diffpo.tasks.Task`; accuracy is ``task.is_correct``.
        correctness_fn: instead of a task, ``fn(completions, **columns) -> list[bool]``.
        sampler_head: a :class:`trl_diffpo.sampler_head.SamplerHead` for the ``learned`` settings.
        gen_length, block_length: canvas length and semi-autoregressive block length.
        batch_size: prompts decoded together.
        temperature: 0 (greedy) or the sampling temperature.
        seed: seed of the local generators (sampling noise, random order); each setting restarts from it, so results
            are reproducible and settings see the same noise.
        num_samples: evaluate only the first ``num_samples`` rows.
        mask_token_id: the ``[MASK]`` id (default: model config, then tokenizer).
        output_dir: when given, write ``results.json`` and ``accuracy_vs_nfe.png`` there.
        plot_title: title of the plot.
        keep_completions: keep the decoded completion texts (per setting label) in the results and the JSON.
        show_progress: tqdm progress bar over settings x batches.
        metadata: extra entries for the results' metadata (e.g. the model path).

    Returns:
        :class:`EvaluationResults` (per-setting :class:`SettingResult`, Pareto flags set).
    """
    settings = [parse_sampler_settings(item)[0] if isinstance(item, str) else item for item in settings]
    if not settings:
        raise ValueError("evaluate needs at least one sampler setting.")
    if any(setting.learned for setting in settings) and sampler_head is None:
        raise ValueError(
            "A 'learned' setting needs a sampler head: pass `sampler_head=load_sampler_head(folder)` (CLI: "
            "--sampler-head FOLDER, or a model folder that contains sampler_head.safetensors)."
        )
    if sampler_head is not None:
        head_sampler = sampler_head.config.sampler
        wrong = [s.label for s in settings if s.learned and s.sampler != head_sampler]
        if wrong:
            raise ValueError(f"The sampler head sets thresholds of {head_sampler!r}, but {wrong} use another sampler.")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    is_correct, task_name = _resolve_correctness(task, correctness_fn)
    total = _dataset_length(dataset)
    total = total if num_samples is None else min(total, int(num_samples))
    if total == 0:
        raise ValueError("The evaluation dataset is empty.")

    backbone = get_backbone(model, mask_token_id=mask_token_id, tokenizer=tokenizer)
    device = _model_device(model)
    was_training = model.training
    model.eval()
    threshold_fn = None
    if sampler_head is not None:
        dtype = next(sampler_head.parameters()).dtype
        sampler_head = sampler_head.to(device).eval()

        def threshold_fn(prompt_hidden: torch.Tensor) -> torch.Tensor:
            return sampler_head.predict_threshold(prompt_hidden.to(dtype))

    batches = []
    for start in range(0, total, batch_size):
        columns = _dataset_columns(dataset, start, min(start + batch_size, total))
        if "prompt" not in columns:
            raise ValueError(f"The evaluation dataset needs a 'prompt' column; it has {sorted(columns)}.")
        prompt_ids = tokenize_prompts(tokenizer, columns["prompt"])
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        input_ids, attention_mask = left_pad(prompt_ids, pad_id)
        batches.append((columns, input_ids.to(device), attention_mask.to(device)))

    progress = None
    if show_progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=len(settings) * len(batches), desc="evaluating", dynamic_ncols=True)
    results, completions_by_label = [], {}
    try:
        for setting in settings:
            correct, nfe_values, tokens, thresholds, texts = 0, [], 0, [], []
            started = time.perf_counter()
            for batch_index, (columns, input_ids, attention_mask) in enumerate(batches):
                generator = torch.Generator(device=device).manual_seed(seed + _BATCH_SEED_STRIDE * batch_index)
                output = diffusion_generate(
                    backbone,
                    input_ids,
                    attention_mask,
                    gen_length=gen_length,
                    block_length=block_length,
                    sampler=setting.sampler,
                    steps=setting.steps,
                    threshold=setting.threshold,
                    threshold_fn=threshold_fn if setting.learned else None,
                    temperature=temperature,
                    generator=generator,
                    eos_token_id=tokenizer.eos_token_id,
                )
                batch_texts = tokenizer.batch_decode(output.completion_ids, skip_special_tokens=True)
                verdicts = is_correct(batch_texts, **{k: v for k, v in columns.items() if k != "prompt"})
                correct += sum(bool(v) for v in verdicts)
                nfe_values.append(output.nfe.cpu().double())
                tokens += int(output.completion_mask.sum())
                if setting.sampler in ADAPTIVE_SAMPLERS:
                    thresholds.append(output.threshold.cpu().double())
                texts.extend(batch_texts)
                if progress is not None:
                    progress.set_postfix(setting=setting.label, refresh=False)
                    progress.update(1)
            elapsed = time.perf_counter() - started
            nfe = torch.cat(nfe_values)
            threshold_values = torch.cat(thresholds) if thresholds else None
            results.append(
                SettingResult(
                    label=setting.label,
                    sampler=setting.sampler,
                    threshold=setting.threshold,
                    steps=setting.steps,
                    learned=setting.learned,
                    num_samples=total,
                    num_correct=correct,
                    accuracy=correct / total,
                    mean_nfe=float(nfe.mean()),
                    std_nfe=float(nfe.std(unbiased=False)),
                    tokens_per_step=tokens / max(1.0, float(nfe.sum())),
                    wall_time_s=elapsed,
                    samples_per_s=total / elapsed if elapsed > 0 else math.inf,
                    mean_threshold=None if threshold_values is None else float(threshold_values.mean()),
                    std_threshold=None if threshold_values is None else float(threshold_values.std(unbiased=False)),
                )
            )
            if keep_completions:
                completions_by_label[setting.label] = texts
    finally:
        if progress is not None:
            progress.close()
        model.train(was_training)

    for result, optimal in zip(results, pareto_front([(r.mean_nfe, r.accuracy) for r in results])):
        result.pareto_optimal = optimal
    info = {
        "task": task_name,
        "num_samples": total,
        "gen_length": gen_length,
        "block_length": block_length,
        "batch_size": batch_size,
        "temperature": temperature,
        "seed": seed,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
    }
    info.update(metadata or {})
    evaluation = EvaluationResults(results, info, completions_by_label if keep_completions else None)
    if output_dir is not None:
        write_results(evaluation, output_dir, plot_title=plot_title)
    return evaluation


def write_results(results: EvaluationResults, output_dir: str | os.PathLike, plot_title: str | None = None) -> None:
    """Write ``results.json`` and ``accuracy_vs_nfe.png`` into ``output_dir`` (created if needed)."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, RESULTS_FILE), "w", encoding="utf-8") as handle:
        json.dump(results.to_dict(), handle, indent=2)
    plot_accuracy_vs_nfe(results.settings, os.path.join(output_dir, PLOT_FILE), title=plot_title)


def plot_accuracy_vs_nfe(
    results: Sequence[SettingResult], path: str | os.PathLike, title: str | None = None, group_by=None
) -> None:
    """Scatter accuracy (%) against mean NFE, one marker per setting, with the Pareto frontier as a step line.

    Args:
        results: the settings to draw (their ``pareto_optimal`` flags are recomputed over this list).
        path: the PNG to write.
        title: the plot title.
        group_by: ``fn(result) -> str`` legend group of each point (default: the sampler, with "learned" apart).
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    group_by = group_by or (lambda r: f"{r.sampler} (learned)" if r.learned else r.sampler)
    flags = pareto_front([(r.mean_nfe, r.accuracy) for r in results])
    figure, axes = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    try:
        groups: dict[str, list[SettingResult]] = {}
        for result in results:
            groups.setdefault(group_by(result), []).append(result)
        for name, members in groups.items():
            members = sorted(members, key=lambda r: r.mean_nfe)
            axes.plot(
                [r.mean_nfe for r in members],
                [100 * r.accuracy for r in members],
                marker="*" if any(r.learned for r in members) else "o",
                markersize=11 if any(r.learned for r in members) else 6,
                linestyle="-" if len(members) > 1 else "none",
                alpha=0.85,
                label=name,
            )
            for result in members:
                axes.annotate(
                    result.label.split(":", 1)[1],
                    (result.mean_nfe, 100 * result.accuracy),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=7,
                )
        front = sorted((r for r, flag in zip(results, flags) if flag), key=lambda r: r.mean_nfe)
        if front:
            axes.step(
                [r.mean_nfe for r in front],
                [100 * r.accuracy for r in front],
                where="post",
                color="black",
                linewidth=2.2,
                alpha=0.35,
                label="Pareto frontier",
                zorder=0,
            )
            axes.scatter(
                [r.mean_nfe for r in front],
                [100 * r.accuracy for r in front],
                s=160,
                facecolors="none",
                edgecolors="black",
                linewidths=1.2,
                zorder=3,
            )
        percents = [100 * r.accuracy for r in results]
        if percents:  # at least a few points of range, so a flat set of results does not zoom into noise
            axes.set_ylim(max(-2.0, min(percents) - PLOT_MARGIN), min(102.0, max(percents) + PLOT_MARGIN))
        axes.set_xlabel("mean NFE (forward passes per sample)")
        axes.set_ylabel("accuracy (%)")
        axes.set_title(title or "accuracy vs decoding cost")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8, loc="best")
        figure.tight_layout()
        figure.savefig(path, format="png")
    finally:
        plt.close(figure)


# --------------------------------------------------------------------------------------------------------------------
# Command line: trl-diffpo eval
# --------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``trl-diffpo eval`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="trl-diffpo eval",
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


def _load_for_cli(args):
    from transformers import AutoTokenizer
    from trl.trainer.utils import create_model_from_path

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = create_model_from_path(args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
    model = model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(
        args.tokenizer or args.adapter or args.model, padding_side="left", trust_remote_code=args.trust_remote_code
    )
    head = None
    head_source = args.sampler_head
    if head_source is None and args.use_head:
        for candidate in (args.adapter, args.model):
            if candidate and os.path.isfile(os.path.join(candidate, "sampler_head.safetensors")):
                head_source = candidate
                break
        if head_source is None:
            raise SystemExit("--use-head needs a sampler head: pass --sampler-head FOLDER (none found in the model).")
    if head_source is not None:
        from .sampler_head import load_sampler_head

        head = load_sampler_head(head_source, device=device)
    return model, tokenizer, head, head_source


def _load_rows(args, tokenizer):
    from .tasks import get_task

    task = get_task(args.task)
    if args.raw_prompts:
        if not args.data_file:
            raise SystemExit("--raw-prompts reads the prompts of a --data-file; pass one.")
        from .data import load_raw

        rows = load_raw(args.data_file, "train", data_files=args.data_file)
        if "prompt" not in rows.column_names:
            raise SystemExit(f"--raw-prompts: {args.data_file} has no 'prompt' column (found {rows.column_names}).")
        return task, rows
    chat = {"auto": None, "yes": True, "no": False}[args.chat]
    kwargs: dict[str, Any] = {"tokenizer": tokenizer, "chat": chat}
    if args.data_file:
        kwargs["data_files"] = args.data_file
    if args.num_samples is not None:
        kwargs["num_examples"] = args.num_samples
    return task, task.load(args.split or task.eval_split, **kwargs)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``trl-diffpo eval``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = parse_sampler_settings(args.samplers)
    except ValueError as err:
        parser.error(str(err))
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
