"""Saving and loading the sampler head (its own files beside a model or adapter), and ZeRO-3 gathering of its weights."""

from __future__ import annotations

import json
import os

import torch

from .config import HEAD_CONFIG_NAME, HEAD_FORMAT_VERSION, HEAD_WEIGHTS_NAME, SamplerHeadConfig
from .network import SamplerHead


def _zero3_gathered(head: SamplerHead, modifier_rank: int | None = None):
    """Context that materialises ZeRO-3 partitioned head parameters (a no-op otherwise). A collective under ZeRO-3.

    For reading (``modifier_rank=None``) parameters that are already whole are left alone: under
    ``unwrap_model_for_generation`` with ``ds3_gather_for_generation=True`` an outer ``GatheredParameters`` holds
    them, and a nested one over the same parameters is refused by deepspeed >= 0.19.8 (older versions re-partition
    them on exit, mid-rollout). Every rank is inside the same outer context, so all ranks skip the same ones.
    """
    import contextlib

    params = [p for p in head.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed  # only reachable when DeepSpeed partitioned the parameters
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if modifier_rank is None:
        params = [p for p in params if p.ds_status != ZeroParamStatus.AVAILABLE]
        if not params:
            return contextlib.nullcontext()
    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def head_state_dict(head: SamplerHead) -> dict[str, torch.Tensor]:
    """The head's weights as CPU tensors in their stored dtype (gathers ZeRO-3 partitions: call on every rank)."""
    with _zero3_gathered(head):
        return {name: tensor.detach().to("cpu").clone().contiguous() for name, tensor in head.state_dict().items()}


def save_sampler_head(head: SamplerHead, folder: str | os.PathLike, state_dict: dict | None = None) -> None:
    """Save ``head`` as ``folder/sampler_head.safetensors`` (weights in their stored dtype, e.g. bf16 under
    DeepSpeed) and ``folder/sampler_head_config.json`` (the :class:`SamplerHeadConfig` plus the dtype).

    These files sit beside a model's or a LoRA adapter's own files and are ignored by ``from_pretrained`` of either.
    """
    from safetensors.torch import save_file

    state_dict = head_state_dict(head) if state_dict is None else state_dict
    os.makedirs(folder, exist_ok=True)
    payload = {
        "format_version": HEAD_FORMAT_VERSION,
        "dtype": str(next(iter(state_dict.values())).dtype).removeprefix("torch."),
        "exploration_sigma": head.exploration_sigma,
        "config": head.config.to_dict(),
    }
    config_path = os.path.join(folder, HEAD_CONFIG_NAME)
    weights_path = os.path.join(folder, HEAD_WEIGHTS_NAME)
    save_file(state_dict, weights_path, metadata={"format": "pt", "trl_diffpo": "sampler_head"})
    with open(config_path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.write("\n")


def _resolve_head_file(
    folder_or_repo_id: str | os.PathLike, filename: str, subfolder: str | None, **hub_kwargs
) -> str:
    """Local path of ``filename`` from a folder, or from the Hub cache / a download for a repo id."""
    base = os.fspath(folder_or_repo_id)
    local_folder = os.path.join(base, subfolder) if subfolder else base
    if os.path.isdir(local_folder):
        path = os.path.join(local_folder, filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} does not exist: this folder holds no sampler head. Save one with "
                "`save_sampler_head(head, folder)` / `SamplerHeadCallback.save_head(folder)` (DiffpoTrainer does it "
                "in every checkpoint and in `save_model` when trained with a SamplerHeadCallback)."
            )
        return path
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return hf_hub_download(base, filename, subfolder=subfolder, **hub_kwargs)
    except LocalEntryNotFoundError as err:  # a subclass of EntryNotFoundError: catch it first
        raise FileNotFoundError(
            f"{filename} of {base!r} is not in the local Hugging Face cache and the Hub cannot be reached (offline "
            "mode or no network). Pass a local folder, or download the repository first while online."
        ) from err
    except EntryNotFoundError as err:
        raise FileNotFoundError(
            f"The Hub repository {base!r} has no {filename}: it was pushed without a sampler head."
        ) from err
    except Exception as err:  # invalid repo id, unknown repository, ...
        raise FileNotFoundError(
            f"{base!r} is neither an existing folder nor a Hub repository holding {filename} ({err})."
        ) from err


def load_sampler_head(
    folder_or_repo_id: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    subfolder: str | None = None,
    **hub_kwargs,
) -> SamplerHead:
    """Load a head saved by :func:`save_sampler_head` from a folder or a Hub repository, ready for inference.

    Args:
        folder_or_repo_id: a local folder (a checkpoint, a saved model or adapter folder) or a Hub repo id.
        dtype: cast the weights to this dtype (default: the dtype they were saved in, e.g. bf16 under DeepSpeed).
        device: move the head there (default: CPU).
        subfolder: a folder inside ``folder_or_repo_id``.
        hub_kwargs: passed to ``huggingface_hub.hf_hub_download`` (``revision``, ``token``, ``cache_dir``, ...);
            honours ``HF_HUB_OFFLINE``.

    Raises:
        FileNotFoundError: a file is missing (the message names it and how to produce it).
        ValueError: a file is corrupt or does not match the config (the message names it).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config_path = _resolve_head_file(folder_or_repo_id, HEAD_CONFIG_NAME, subfolder, **hub_kwargs)
    weights_path = _resolve_head_file(folder_or_repo_id, HEAD_WEIGHTS_NAME, subfolder, **hub_kwargs)
    fix = "re-save the head from its training checkpoint (`save_sampler_head`) or delete the folder's head files."
    try:
        with open(config_path, encoding="utf-8") as handle:
            payload = json.load(handle)
        config = SamplerHeadConfig.from_dict(payload["config"])
        saved_dtype = getattr(torch, payload.get("dtype", "float32"))
        saved_sigma = float(payload.get("exploration_sigma", config.sigma))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{config_path} is not a valid sampler head config ({err}); {fix}") from err
    if payload.get("format_version", HEAD_FORMAT_VERSION) > HEAD_FORMAT_VERSION:
        raise ValueError(
            f"{config_path} was written by a newer trl-diffpo (format {payload['format_version']}); upgrade trl-diffpo."
        )
    try:
        state_dict = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{weights_path} is not a valid safetensors file ({err}); {fix}") from err

    head = SamplerHead(config).to(saved_dtype)
    load_head_weights(head, state_dict, source=weights_path)
    head.exploration_sigma = saved_sigma
    head = head.to(dtype=dtype or saved_dtype, device=device or "cpu")
    return head.eval()


def load_head_weights(head: SamplerHead, state_dict: dict[str, torch.Tensor], source: str = "state_dict") -> None:
    """Copy ``state_dict`` into ``head``'s parameters in place (keeping optimizer references), casting to their dtype.

    Raises:
        ValueError: missing / unexpected keys or shape mismatches, naming ``source``.
    """
    expected = dict(head.state_dict())
    missing, unexpected = sorted(set(expected) - set(state_dict)), sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match the sampler head (missing keys {missing}, unexpected keys {unexpected}); the "
            "file belongs to another head layout: load it with `load_sampler_head` or re-save it."
        )
    for name, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(
                f"{source}: {name} has shape {tuple(tensor.shape)}, the head expects {tuple(expected[name].shape)} "
                "(was it saved for a backbone with another hidden size?)."
            )
    with _zero3_gathered(head, modifier_rank=0), torch.no_grad():
        for name, target in head.state_dict(keep_vars=True).items():
            target.copy_(state_dict[name].to(device=target.device, dtype=target.dtype))
