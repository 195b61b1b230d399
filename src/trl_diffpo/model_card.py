"""The model card of a DiFFPO run: base model, data, DiFFPO settings, end-of-training numbers, a working quick start.

TRL's card describes an autoregressive fine-tune (a ``pipeline("text-generation")`` quick start, no method settings,
a dataset link built from any name). This one is written by :meth:`DiffpoTrainer.create_model_card`: at every
checkpoint (TRL), at the end of ``train()`` (also with ``save_strategy="no"``) and by ``push_to_hub``.
"""

from __future__ import annotations

import os
import textwrap

from accelerate.utils import is_peft_model
from huggingface_hub import ModelCard, ModelCardData
from trl.trainer.utils import get_config_model_id

from .data.hub import COUNTDOWN_PATH, GSM8K_PATH, MATH500_PATH
from .samplers import ADAPTIVE_SAMPLERS, FIXED_SCHEDULE_SAMPLERS

# Task names (the CLI's --task) -> the Hub dataset they load; None: generated offline, no Hub page.
TASK_DATASETS = {"gsm8k": GSM8K_PATH, "math500": MATH500_PATH, "countdown": COUNTDOWN_PATH, "sudoku": None}
# Logged training metrics reported at the start and the end of training: (log key, label).
REPORTED_METRICS = (
    ("reward", "reward (weighted sum of the reward functions)"),
    ("diffusion/nfe/mean", "NFE per completion (forward passes)"),
    ("diffusion/threshold/mean", "decoding threshold (mean over rollouts)"),
    ("sampler_head/predicted_threshold_mean", "sampler head's predicted threshold"),
    ("diffpo/is_weight/clamped_frac", "fraction of IS weights at the clamp"),
)
_EXAMPLE_PROMPT_MAX_CHARS = 300


def _is_hub_id(name: str | None) -> bool:
    return bool(name) and name.count("/") == 1 and not os.path.exists(name) and not name.startswith((".", "/"))


def _base_model(trainer) -> tuple[str | None, str]:
    """``(hub id or None, sentence naming the base model)``."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    base = model.get_base_model() if is_peft_model(model) else model
    name = get_config_model_id(base.config)
    architecture = type(base).__name__
    if _is_hub_id(name):
        return name, f"[{name}](https://huggingface.co/{name}) ({architecture})"
    if name:
        return None, f"a local model (`{name}`, {architecture})"
    return None, f"a model built in memory ({architecture}, no Hub id)"


def _data_sentence(trainer, dataset_name: str | None) -> tuple[str | None, str]:
    """``(hub dataset id or None, sentence naming the training data)``."""
    dataset = trainer.train_dataset
    size = f"{len(dataset):,} prompts" if dataset is not None and hasattr(dataset, "__len__") else "prompts"
    columns = getattr(dataset, "column_names", None)
    details = f"{size}, columns {', '.join(f'`{c}`' for c in columns)}" if columns else size
    hub_id = TASK_DATASETS.get(dataset_name, dataset_name) if dataset_name else None
    if dataset_name in TASK_DATASETS and hub_id is None:
        return None, f"the `{dataset_name}` task, generated offline by trl-diffpo ({details})"
    if _is_hub_id(hub_id):
        task = f"the `{dataset_name}` task: " if dataset_name in TASK_DATASETS else ""
        return hub_id, f"{task}[{hub_id}](https://huggingface.co/datasets/{hub_id}) ({details})"
    if dataset_name:
        return None, f"`{dataset_name}` ({details})"
    return None, f"a dataset passed to the trainer ({details})"


def _settings(trainer) -> list[tuple[str, str]]:
    args = trainer.args
    head = trainer.sampler_head_callback
    likelihood = args.likelihood + (f" (K={args.num_stages})" if args.num_stages else "")
    rows = [
        ("surrogate likelihood", likelihood),
        ("prompt masking in the surrogate (p_mask_prompt)", f"{args.p_mask_prompt}"),
        ("importance-sampling correction / clamp", f"{args.is_correction} / {args.is_clamp}"),
        ("sampler", args.sampler),
    ]
    if args.sampler in FIXED_SCHEDULE_SAMPLERS:
        rows.append(("denoising steps", f"{args.diffusion_steps}"))
    elif head is None:
        rows.append(("threshold (fixed)", f"{args.threshold}"))
    config = getattr(getattr(head, "head", None), "config", None)
    if config is not None:
        rows += [
            ("sampler head", f"{head.mode} training, MLP hidden size {config.mlp_hidden_size}"),
            (
                "head threshold range / initial",
                f"[{config.threshold_min}, {config.threshold_max}] / {config.init_threshold}",
            ),
            (
                "head exploration sigma",
                f"{config.sigma}" + (f" -> {config.sigma_final}" if config.sigma_final else ""),
            ),
            ("head NFE penalty (lambda)", f"{head.nfe_penalty}"),
        ]
    rows += [
        ("completion length / block length", f"{args.max_completion_length} / {args.block_length}"),
        ("temperature", f"{args.temperature}"),
        ("generations per prompt / inner iterations", f"{args.num_generations} / {args.num_iterations}"),
        ("beta (KL) / epsilon (clip)", f"{args.beta} / {args.epsilon}"),
        ("learning rate / loss type", f"{args.learning_rate} / {args.loss_type}"),
        ("optimizer steps trained", f"{trainer.state.global_step}"),
    ]
    model = trainer.accelerator.unwrap_model(trainer.model)
    if is_peft_model(model):
        peft = model.peft_config[model.active_adapter]
        targets = sorted(peft.target_modules) if isinstance(peft.target_modules, set) else peft.target_modules
        rows.insert(0, ("adapter", f"{peft.peft_type.value} r={peft.r}, alpha={peft.lora_alpha}, targets {targets}"))
    return rows


def _results(log_history: list[dict]) -> list[tuple[str, str, str]]:
    """``(label, first logged, last logged)`` of the reported training metrics that were logged."""
    rows = []
    for key, label in REPORTED_METRICS:
        values = [
            (entry["step"], entry[key]) for entry in log_history if entry.get(key) is not None and "step" in entry
        ]
        if values:
            (first_step, first), (last_step, last) = values[0], values[-1]
            rows.append((label, f"{first:.4g} (step {first_step})", f"{last:.4g} (step {last_step})"))
    return rows


def _example_prompt(trainer) -> str | list | None:
    dataset = trainer.train_dataset
    try:
        prompt = dataset[0]["prompt"]
    except Exception:  # noqa: BLE001 (no indexable dataset: a placeholder prompt)
        return None
    return prompt if len(str(prompt)) <= _EXAMPLE_PROMPT_MAX_CHARS else None


def quick_start(trainer, repo_id: str) -> str:
    """Python code that loads the pushed model (or adapter) and its head and decodes one prompt as in training."""
    args = trainer.args
    model = trainer.accelerator.unwrap_model(trainer.model)
    peft = is_peft_model(model)
    base = model.get_base_model() if peft else model
    auto_class = "AutoModelForMaskedLM" if type(base).__name__.endswith("ForMaskedLM") else "AutoModelForCausalLM"
    head = (
        trainer.sampler_head_callback is not None and getattr(trainer.sampler_head_callback, "head", None) is not None
    )
    example = _example_prompt(trainer)
    lines = [
        "import trl_diffpo  # registers the native LLaDA / Dream classes",
        f"from transformers import {auto_class}, AutoTokenizer",
    ]
    lines.append("from trl_diffpo import diffusion_generate" + (", load_sampler_head" if head else ""))
    if peft:
        lines.append("from peft import PeftModel")
    lines += ["", f"repo_id = {repo_id!r}", "tokenizer = AutoTokenizer.from_pretrained(repo_id)"]
    if peft:
        base_id = get_config_model_id(base.config) or "<the base model's id or path>"
        lines += [
            f"base = {auto_class}.from_pretrained({base_id!r}, dtype='auto')",
            "model = PeftModel.from_pretrained(base, repo_id).eval()",
        ]
    else:
        lines.append(f"model = {auto_class}.from_pretrained(repo_id, dtype='auto').eval()")
    if isinstance(example, list):
        lines += [
            f"messages = {example!r}",
            "input_ids = tokenizer.apply_chat_template(",
            "    messages, add_generation_prompt=True, return_dict=True, return_tensors='pt'",
            ")['input_ids'].to(model.device)",
        ]
    else:
        lines += [
            f"prompt = {example if example is not None else 'Your prompt here'!r}",
            "input_ids = tokenizer(prompt, return_tensors='pt')['input_ids'].to(model.device)",
        ]
    decoding = [
        f"gen_length={args.max_completion_length}",
        f"block_length={args.block_length}",
        f"sampler={args.sampler!r}",
    ]
    if args.sampler in FIXED_SCHEDULE_SAMPLERS:
        decoding.append(f"steps={args.diffusion_steps}")
    if head:
        if getattr(trainer.sampler_head_callback, "state_dependent", False):
            lines.append("head = load_sampler_head(repo_id, device=model.device)  # the learned per-step threshold")
            decoding.append("step_threshold_fn=head.predict_threshold")
        else:
            lines.append("head = load_sampler_head(repo_id, device=model.device)  # the learned per-prompt threshold")
            decoding.append("threshold_fn=head.predict_threshold")
    elif args.sampler in ADAPTIVE_SAMPLERS:
        decoding.append(f"threshold={args.threshold}")
    decoding += [
        "temperature=0.0",
        f"mask_token_id={trainer.mask_token_id}",
        f"eos_token_id={trainer.eos_token_ids[0]}",
    ]
    call = "output = diffusion_generate(model, input_ids, " + ", ".join(decoding) + ")"
    lines += textwrap.wrap(call, 116, subsequent_indent="    ", break_long_words=False, break_on_hyphens=False)
    lines += [
        "print(tokenizer.decode(output.completion_ids[0], skip_special_tokens=True))",
        "print('forward passes:', output.nfe.tolist()"
        + (", 'threshold:', output.threshold.tolist())" if head else ")"),
    ]
    return "\n".join(lines)


def build_model_card(trainer, model_name: str | None = None, dataset_name: str | None = None, tags=None) -> ModelCard:
    """The card of ``trainer``'s run, as a :class:`huggingface_hub.ModelCard`."""
    args = trainer.args
    hub_model_id = getattr(trainer, "hub_model_id", None)
    model_name = model_name or (hub_model_id or os.path.normpath(args.output_dir)).split("/")[-1]
    repo_id = hub_model_id or args.output_dir
    base_id, base_sentence = _base_model(trainer)
    data_id, data_sentence = _data_sentence(trainer, dataset_name)
    tags = [tags] if isinstance(tags, str) else list(tags or [])
    model = trainer.accelerator.unwrap_model(trainer.model)
    card_data = ModelCardData(
        base_model=base_id,
        datasets=[data_id] if data_id else None,
        library_name="peft" if is_peft_model(model) else "transformers",
        model_name=model_name,
        tags=sorted({*trainer._tag_names, "masked-diffusion", *tags}),
    )
    kind = "a LoRA adapter" if is_peft_model(model) else "a model"
    has_head = getattr(trainer.sampler_head_callback, "head", None) is not None
    head_sentence = (
        " It comes with a **sampler head** (`sampler_head.safetensors`, `sampler_head_config.json`): a small MLP that "
        "sets each prompt's decoding threshold, trained jointly with the model (DiFFPO's 'fast' half)."
        if has_head
        else ""
    )
    settings = "\n".join(f"| {name} | {value} |" for name, value in _settings(trainer))
    results = _results(trainer.state.log_history)
    results_text = (
        "Training rollouts (sampled at the training temperature; these are not evaluation scores):\n\n"
        "| metric | first logged | last logged |\n|---|---|---|\n"
        + "\n".join(f"| {label} | {first} | {last} |" for label, first, last in results)
        if results
        else "No training metrics were logged yet."
    )
    paper = trainer._paper
    content = f"""---
{card_data.to_yaml()}
---

# {model_name}

{kind.capitalize()} fine-tuned from {base_sentence} with [DiFFPO]({f"https://huggingface.co/papers/{paper['id']}"})
({paper["title"]}), reinforcement learning for masked diffusion language models, using
trl-diffpo on top of [TRL](https://github.com/huggingface/trl)'s `GRPOTrainer`. Training data: {data_sentence}.{head_sentence}

It is a masked diffusion LM: it generates with `trl_diffpo.diffusion_generate`, not with `generate` or a
`text-generation` pipeline.

## Quick start

```python
{quick_start(trainer, repo_id)}
```

## DiFFPO settings

| setting | value |
|---|---|
{settings}

## Training results

{results_text}

## Citation

```bibtex
{paper["citation"]}
```
"""
    return ModelCard(content)


def write_model_card(trainer, model_name: str | None = None, dataset_name: str | None = None, tags=None) -> str | None:
    """Write ``README.md`` into ``output_dir`` (main process only); returns its path."""
    if not trainer.is_world_process_zero():
        return None
    os.makedirs(trainer.args.output_dir, exist_ok=True)
    path = os.path.join(trainer.args.output_dir, "README.md")
    build_model_card(trainer, model_name, dataset_name, tags).save(path)
    return path
