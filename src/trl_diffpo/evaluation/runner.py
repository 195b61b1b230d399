"""``evaluate``: decode a held-out set once per setting and measure accuracy, NFE, throughput."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..backbones import get_backbone
from ..generation import diffusion_generate
from ..samplers import ADAPTIVE_SAMPLERS
from ..sft import left_pad, tokenize_prompts
from .results import EvaluationResults, SettingResult, pareto_front, write_results
from .settings import SamplerSetting, parse_sampler_settings

logger = logging.getLogger(__name__)

# spreads seeds of consecutive batches apart (any odd constant works; fixed so results are reproducible)
_BATCH_SEED_STRIDE = 9_973


def _resolve_correctness(task, correctness_fn) -> tuple[Callable[..., list[bool]], str | None]:
    if correctness_fn is not None:
        return correctness_fn, getattr(task, "name", task if isinstance(task, str) else None)
    if task is None:
        raise ValueError("evaluate needs a `task` (a name or a trl_diffpo.tasks.Task) or a `correctness_fn`.")
    if isinstance(task, str):
        from ..tasks import get_task

        task = get_task(task)
    return task.is_correct, task.name


def dataset_columns(dataset, start: int, stop: int) -> dict[str, list]:
    if hasattr(dataset, "column_names") and hasattr(dataset, "__getitem__") and not isinstance(dataset, dict):
        return dict(dataset[start:stop])
    if isinstance(dataset, dict):
        return {name: list(values[start:stop]) for name, values in dataset.items()}
    rows = list(dataset[start:stop])
    return {name: [row[name] for row in rows] for name in rows[0]} if rows else {}


def dataset_length(dataset) -> int:
    if isinstance(dataset, dict):
        lengths = {len(values) for values in dataset.values()}
        if len(lengths) != 1:
            raise ValueError(f"The dataset's columns have different lengths {sorted(lengths)}.")
        return lengths.pop()
    return len(dataset)


def model_device(model: nn.Module) -> torch.device:
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
    total = dataset_length(dataset)
    total = total if num_samples is None else min(total, int(num_samples))
    if total == 0:
        raise ValueError("The evaluation dataset is empty.")

    backbone = get_backbone(model, mask_token_id=mask_token_id, tokenizer=tokenizer)
    device = model_device(model)
    was_training = model.training
    model.eval()
    learned_kwargs = {}  # how a `learned` setting decodes: the head's mean policy
    if sampler_head is not None:
        dtype = next(sampler_head.parameters()).dtype
        sampler_head = sampler_head.to(device).eval()

        def threshold_fn(prompt_hidden: torch.Tensor) -> torch.Tensor:
            return sampler_head.predict_threshold(prompt_hidden.to(dtype))

        def step_threshold_fn(prompt_hidden: torch.Tensor, step_features: torch.Tensor) -> torch.Tensor:
            return sampler_head.predict_threshold(prompt_hidden.to(dtype), step_features)

        state_dependent = sampler_head.config.state_dependent  # a threshold per denoising step
        learned_kwargs = (
            {"step_threshold_fn": step_threshold_fn} if state_dependent else {"threshold_fn": threshold_fn}
        )

    batches = []
    for start in range(0, total, batch_size):
        columns = dataset_columns(dataset, start, min(start + batch_size, total))
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
                    **(learned_kwargs if setting.learned else {}),
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
