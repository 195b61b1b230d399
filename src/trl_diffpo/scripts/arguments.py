"""The script arguments of ``trl-diffpo train`` (data, rewards, sampler head) and TRL's model / mixture groups."""

import dataclasses
import inspect
import json
from dataclasses import dataclass, field

from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments

from ..sampler_head import FEATURES, SIGMA_SCHEDULES, SamplerHeadCallback, SamplerHeadConfig
from ..sampler_head import MODES as SAMPLER_HEAD_MODES
from .errors import CliError

SAMPLER_HEAD_PREFIX = "sampler_head_"
# SamplerHeadConfig fields exposed as `--sampler_head_<field>` (`sampler` comes from DiffpoConfig.sampler and
# `input_size` from the model)
SAMPLER_HEAD_CONFIG_OPTIONS = (
    "mlp_hidden_size",
    "threshold_min",
    "threshold_max",
    "init_threshold",
    "sigma",
    "sigma_final",
    "sigma_schedule",
    "sigma_anneal_steps",
    "init_seed",
    "features",
)
_HEAD_CONFIG_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SamplerHeadConfig)}
_HEAD_CALLBACK_DEFAULTS = {
    name: parameter.default for name, parameter in inspect.signature(SamplerHeadCallback).parameters.items()
}


@dataclass
class DiffpoScriptArguments(ScriptArguments):
    """Script arguments of ``trl-diffpo train``: data, rewards and the sampler head.

    Args:
        task (`str`, *optional*):
            A registered task (``gsm8k``, ``math500``, ``countdown``, ``sudoku``): loads its train/test data with the
            task's prompt format and uses its reward functions unless ``reward_funcs`` is given. With a task,
            ``dataset_name`` is ignored; ``dataset_train_files`` / ``dataset_test_files`` replace the Hub download
            with local files in the Hub schema (offline machines).
        dataset_train_files (`list[str]`, *optional*):
            Local JSON/JSONL/CSV/Parquet files of the training split.
        dataset_test_files (`list[str]`, *optional*):
            Local files of the evaluation split.
        task_kwargs (`dict` or JSON `str`, *optional*):
            Extra keyword arguments of the task's loader (``{"generated": true}``, ``{"path": ...}``).
        max_train_samples (`int`, *optional*):
            Keep only the first N training examples.
        max_eval_samples (`int`, *optional*):
            Keep only the first N evaluation examples.
        reward_funcs (`list[str]`, *optional*):
            Reward functions by name: any ``*_reward`` function of :mod:`trl_diffpo.rewards`, TRL's
            ``accuracy_reward`` / ``think_format_reward`` / ``reasoning_accuracy_reward``, or a dotted import path.
        reward_model_name_or_path (`str`, *optional*):
            A sequence-classification reward model (Hub id or local folder), added before the reward functions.
        use_sampler_head (`bool`, defaults to `False`):
            Learn a per-prompt threshold of the adaptive sampler jointly with the model (DiFFPO's "fast" part).
        sampler_head_mode (`str`, defaults to `"joint"`):
            ``joint`` trains model and head; ``sampler_only`` freezes the model and trains only the head.
        nfe_penalty (`float`, defaults to `0.0`):
            lambda in the head's reward ``task reward - lambda * NFE / completion length``.
        sampler_head_learning_rate, sampler_head_scale_advantages, sampler_head_pretrained:
            The :class:`~trl_diffpo.SamplerHeadCallback` options ``head_learning_rate``, ``scale_advantages`` and
            ``pretrained_head``.
        sampler_head_<field>:
            One option per :class:`~trl_diffpo.sampler_head.SamplerHeadConfig` field (``mlp_hidden_size``,
            ``threshold_min``, ``threshold_max``, ``init_threshold``, ``sigma``, ``sigma_final``, ``sigma_schedule``,
            ``sigma_anneal_steps``, ``init_seed``, ``features``); ``None`` keeps the head's default.
    """

    _argument_group_name = "script arguments (trl.ScriptArguments)"

    task: str | None = field(
        default=None,
        metadata={
            "help": "A registered task: gsm8k, math500, countdown or sudoku. Loads its data, prompt format and reward "
            "functions (unless --reward_funcs is given); --dataset_name is then ignored."
        },
    )
    dataset_train_files: list[str] | None = field(
        default=None,
        metadata={
            "help": "Local JSON/JSONL/CSV/Parquet file(s) of the training split (with --task: files in the task's "
            "Hub schema, for offline machines)."
        },
    )
    dataset_test_files: list[str] | None = field(
        default=None, metadata={"help": "Local file(s) of the evaluation split (see --dataset_train_files)."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N training examples (quick runs)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N evaluation examples (quick runs)."}
    )
    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Reward functions by name: a `*_reward` function of trl_diffpo.rewards (e.g. gsm8k_accuracy_reward, "
            "countdown_reward, sudoku_reward, strict_format_reward, xml_count_reward), TRL's accuracy_reward / "
            "think_format_reward / reasoning_accuracy_reward, or a dotted import path (my_module.my_reward). "
            "Default: the task's rewards."
        },
    )
    reward_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A sequence-classification reward model (Hub id or folder), used before --reward_funcs."},
    )
    task_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": "Extra keyword arguments of the task's loader, as a YAML mapping or a JSON string, e.g. "
            '\'{"generated": true}\' (countdown: procedural instances instead of the Hub) or \'{"path": "..."}\' '
            "(another Hub dataset with the same columns)."
        },
    )
    use_sampler_head: bool = field(
        default=False,
        metadata={
            "help": "Learn a per-prompt threshold for the adaptive sampler (--sampler entropy_bounded or "
            "confidence_threshold, with --threshold as the fixed fallback) jointly with the model: DiFFPO's joint "
            "training. The other sampler_head_* options only apply with it."
        },
    )
    sampler_head_mode: str = field(
        default="joint",
        metadata={
            "help": "joint: train model and head; sampler_only: freeze the model, train only the head.",
            "choices": list(SAMPLER_HEAD_MODES),
        },
    )
    nfe_penalty: float = field(
        default=0.0,
        metadata={
            "help": "lambda of the head's reward `task reward - lambda * NFE / completion length` (0: correctness only)."
        },
    )
    sampler_head_learning_rate: float | None = field(
        default=_HEAD_CALLBACK_DEFAULTS["head_learning_rate"],
        metadata={
            "help": "Learning rate of the head's own parameter group (the dLLM's LoRA rate would barely move it); "
            "None: the run's learning rate."
        },
    )
    sampler_head_scale_advantages: bool = field(
        default=_HEAD_CALLBACK_DEFAULTS["scale_advantages"],
        metadata={"help": "Divide the head's group-centred reward by the group std (as scale_rewards='group')."},
    )
    sampler_head_pretrained: str | None = field(
        default=None,
        metadata={"help": "Folder or Hub id of a saved sampler head to start from (e.g. sampler_only after joint)."},
    )
    sampler_head_mlp_hidden_size: int = field(
        default=_HEAD_CONFIG_DEFAULTS["mlp_hidden_size"],
        metadata={"help": "Width of the head's MLP hidden layer; 0 makes the head linear."},
    )
    sampler_head_threshold_min: float | None = field(
        default=None,
        metadata={"help": "Lowest threshold the head can output (None: 0.0 for EB gamma, 0.5 for confidence)."},
    )
    sampler_head_threshold_max: float | None = field(
        default=None,
        metadata={"help": "Highest threshold the head can output (None: 1.0 for EB gamma and for confidence)."},
    )
    sampler_head_init_threshold: float | None = field(
        default=None,
        metadata={
            "help": "Threshold the head outputs at initialisation (None: 0.1 for EB gamma, 0.9 for confidence)."
        },
    )
    sampler_head_sigma: float = field(
        default=_HEAD_CONFIG_DEFAULTS["sigma"],
        metadata={"help": "Exploration noise: std of the Gaussian over the head's pre-sigmoid output u."},
    )
    sampler_head_sigma_final: float | None = field(
        default=None, metadata={"help": "Exploration std at the end of annealing (None: no annealing)."}
    )
    sampler_head_sigma_schedule: str = field(
        default=_HEAD_CONFIG_DEFAULTS["sigma_schedule"],
        metadata={
            "help": "Annealing of the exploration std from sampler_head_sigma to sampler_head_sigma_final.",
            "choices": list(SIGMA_SCHEDULES),
        },
    )
    sampler_head_sigma_anneal_steps: int | None = field(
        default=None, metadata={"help": "Optimizer steps over which the std anneals (None: the run's max_steps)."}
    )
    sampler_head_init_seed: int = field(
        default=_HEAD_CONFIG_DEFAULTS["init_seed"], metadata={"help": "Seed of the head's initial weights."}
    )
    sampler_head_features: str = field(
        default=_HEAD_CONFIG_DEFAULTS["features"],
        metadata={
            "help": "What the head reads: 'prompt' (one threshold per prompt) or 'state' (a threshold per denoising "
            "step from the prompt and the decoding state: block entropy / confidence, progress).",
            "choices": list(FEATURES),
        },
    )

    def __post_init__(self):
        if isinstance(self.task_kwargs, str):
            try:
                self.task_kwargs = json.loads(self.task_kwargs)
            except json.JSONDecodeError as error:
                raise ValueError(f"--task_kwargs must be a JSON object, got {self.task_kwargs!r}: {error}") from None
        if self.task_kwargs is not None and not isinstance(self.task_kwargs, dict):
            raise ValueError(f"task_kwargs must be a mapping of loader keyword arguments, got {self.task_kwargs!r}.")

    def sampler_head_options(self) -> dict:
        """The ``SamplerHeadConfig`` fields set by the ``sampler_head_*`` options (unset ones keep their defaults)."""
        options = {name: getattr(self, f"{SAMPLER_HEAD_PREFIX}{name}") for name in SAMPLER_HEAD_CONFIG_OPTIONS}
        return {name: value for name, value in options.items() if value is not None}


class DiffpoModelConfig(ModelConfig):
    """:class:`trl.ModelConfig`, shown as its own group in ``--help``; ``model_name_or_path`` also takes ``tiny:``."""

    _argument_group_name = "model arguments (trl.ModelConfig)"


class DiffpoDatasetMixtureConfig(DatasetMixtureConfig):
    """:class:`trl.DatasetMixtureConfig`, shown as its own group in ``--help``."""

    _argument_group_name = "dataset mixture (trl.DatasetMixtureConfig; a `datasets:` list in the YAML file)"


def build_sampler_head_callback(script_args: DiffpoScriptArguments) -> SamplerHeadCallback | None:
    """The :class:`~trl_diffpo.SamplerHeadCallback` for ``--use_sampler_head`` (``None`` without it)."""
    if not script_args.use_sampler_head:
        return None
    try:
        return SamplerHeadCallback(
            mode=script_args.sampler_head_mode,
            nfe_penalty=script_args.nfe_penalty,
            scale_advantages=script_args.sampler_head_scale_advantages,
            head_learning_rate=script_args.sampler_head_learning_rate,
            pretrained_head=script_args.sampler_head_pretrained,
            **script_args.sampler_head_options(),
        )
    except (TypeError, ValueError) as error:
        raise CliError(f"invalid sampler head options: {error}") from error
