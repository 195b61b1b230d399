"""One small adapter layer that hides how a masked diffusion LM is called.

Everything else in trl-diffpo is backbone-agnostic: it calls :class:`DiffusionBackbone` and always receives
**aligned** logits (position ``i`` predicts token ``i``), whatever the model's own convention:

- aligned-logits models (LLaDA style): used as they are;
- shifted-logits models (Dream style: position ``i`` predicts token ``i + 1``): the logits are shifted right by one;
- transformers-native bidirectional models (``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` with
  ``config.is_causal=False``, ``BertForMaskedLM``, ``ModernBertForMaskedLM``): aligned, called with a 2-D mask.

The adapter also resolves the mask token id, builds position ids for left-padded batches and refuses models that
attend causally. Two requests pass through it: ``logits_positions`` (logits only where needed: the native classes and
transformers' ``logits_to_keep`` project only those positions' hidden states) and a
:class:`trl_diffpo.kv_cache.CanvasKVCache` (cached block decoding, for the models :func:`check_cache_support` accepts).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

# `config.model_type` values of checkpoints whose logits are shifted by one position (position i predicts i + 1).
SHIFTED_LOGITS_MODEL_TYPES = frozenset({"Dream", "dream"})
# `config.model_type` values known to be bidirectional: no probe needed.
BIDIRECTIONAL_MODEL_TYPES = frozenset(
    {"llada", "Dream", "dream", "bert", "roberta", "xlm-roberta", "distilbert", "modernbert", "deberta-v2", "electra"}
)

_PROBE_LENGTH = 8
_PROBE_TOLERANCE = 1e-6
# transformers classes whose attention calls `cache.update(key, value, layer_idx)` after RoPE and accepts a prepared
# 4-D mask: cached block decoding works with them when `config.is_causal=False`.
CACHEABLE_TRANSFORMERS_CLASSES = frozenset({"LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"})
CACHEABLE_ATTENTION = frozenset({"eager", "sdpa"})


@dataclass
class BackboneOutput:
    """What one forward pass of a diffusion backbone returns.

    Attributes:
        logits: ``(batch, seq_len, vocab)`` logits, **aligned**: position ``i`` predicts token ``i``; ``(batch, k,
            vocab)`` at the requested ``logits_positions`` when given.
        hidden_states: ``(batch, seq_len, hidden)`` last-layer hidden states, when requested, else ``None``.
    """

    logits: torch.Tensor
    hidden_states: torch.Tensor | None = None


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / DeepSpeed / torch.compile wrappers (``.module`` / ``._orig_mod``); PEFT models are kept."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model


def _base_model(model: nn.Module) -> nn.Module:
    model = unwrap_model(model)
    get_base = getattr(model, "get_base_model", None)  # peft.PeftModel
    return get_base() if callable(get_base) else model


def resolve_mask_token_id(model: nn.Module | None = None, tokenizer=None, mask_token_id: int | None = None) -> int:
    """Resolve the ``[MASK]`` token id: explicit argument, then ``model.config.mask_token_id``, then the tokenizer.

    Raises:
        ValueError: when none of them defines a mask token.
    """
    if mask_token_id is not None:
        if int(mask_token_id) < 0:
            raise ValueError(f"mask_token_id must be a non-negative token id, got {mask_token_id}.")
        return int(mask_token_id)
    if model is not None:
        config = getattr(_base_model(model), "config", None)
        value = getattr(config, "mask_token_id", None) if config is not None else None
        if value is not None:
            return int(value)
    if tokenizer is not None:
        value = getattr(tokenizer, "mask_token_id", None)
        if value is not None:
            return int(value)
    name = type(_base_model(model)).__name__ if model is not None else "the model"
    raise ValueError(
        f"Could not find a mask token id for {name}: pass `mask_token_id=...` explicitly (DiffpoConfig.mask_token_id), "
        "set `model.config.mask_token_id`, or use a tokenizer with a mask token (`tokenizer.mask_token`). "
        "Masked diffusion decoding needs a [MASK] token (LLaDA: 126336, Dream: 151666)."
    )


def is_shifted_logits_model(model: nn.Module) -> bool:
    """Whether position ``i`` of the model's logits predicts token ``i + 1`` (Dream) rather than token ``i``."""
    config = getattr(_base_model(model), "config", None)
    explicit = getattr(config, "diffusion_logits_shift", None)
    if explicit is not None:
        return bool(explicit)
    return getattr(config, "model_type", None) in SHIFTED_LOGITS_MODEL_TYPES


def _forward_parameters(model: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(_base_model(model).forward).parameters)
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return set()


def _keeps_per_row_positions(model: nn.Module) -> bool:
    """Whether the model's ``logits_to_keep`` accepts ``(batch, k)`` positions: transformers models whose module uses
    ``slice_logits_to_keep`` (older versions would index a 2-D tensor as a 1-D one and return the wrong shape)."""
    import sys

    module = sys.modules.get(type(_base_model(model)).__module__)
    return module is not None and hasattr(module, "slice_logits_to_keep")


def _needs_4d_mask(model: nn.Module) -> bool:
    """Dream's Hub remote code expects a 4-D attention mask; our native classes and transformers' take 2-D."""
    base = _base_model(model)
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    return model_type in SHIFTED_LOGITS_MODEL_TYPES and not type(base).__module__.startswith(
        ("trl_diffpo", "transformers")
    )


class DiffusionBackbone:
    """Calls a masked diffusion LM and returns aligned logits.

    Args:
        model: the (possibly PEFT- / DDP-wrapped) model; it is called as given so that gradients and collectives
            flow through the wrapper.
        mask_token_id: the ``[MASK]`` token id (see :func:`resolve_mask_token_id`).
        logits_shift: ``True`` if position ``i`` predicts token ``i + 1``; ``None`` detects it from the config.
    """

    def __init__(self, model: nn.Module, mask_token_id: int, logits_shift: bool | None = None):
        self.model = model
        self.mask_token_id = int(mask_token_id)
        self.logits_shift = is_shifted_logits_model(model) if logits_shift is None else bool(logits_shift)
        params = _forward_parameters(model)
        self._accepts_position_ids = "position_ids" in params
        self._needs_4d_mask = _needs_4d_mask(model)
        self._native = bool(getattr(_base_model(model), "supports_canvas_kv_cache", False))
        # transformers' `logits_to_keep` takes per-row (batch, k) positions since `slice_logits_to_keep` (5.2x)
        self._accepts_logits_to_keep = "logits_to_keep" in params and _keeps_per_row_positions(model)
        self._cache_argument = "cache" if "cache" in params else "past_key_values"

    @property
    def config(self):
        return getattr(_base_model(self.model), "config", None)

    def __call__(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        **kwargs,
    ) -> BackboneOutput:
        return self.forward(input_ids, attention_mask, output_hidden_states, **kwargs)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        logits_positions: torch.LongTensor | None = None,
        cache=None,
        window: torch.LongTensor | None = None,
    ) -> BackboneOutput:
        """One bidirectional forward. ``attention_mask`` is a 2-D ``(batch, seq_len)`` 0/1 mask (left padding).

        Args:
            logits_positions: ``(batch, k)`` positions of ``input_ids`` whose (aligned) logits to return; ``None``:
                all. The native classes and models with transformers' ``logits_to_keep`` then project only those
                hidden states; other models compute every position's logits and the adapter gathers.
            cache: a :class:`trl_diffpo.kv_cache.CanvasKVCache` (cached block decoding; see
                :func:`check_cache_support`) already set up with ``record`` or ``reuse``.
            window: with a cache, the ``(batch, window_len)`` canvas positions ``input_ids`` sit at (``None``: the
                full canvas); ``attention_mask`` then covers the full canvas (the keys).
        """
        if cache is not None:
            return self._cached_forward(
                input_ids, attention_mask, output_hidden_states, logits_positions, cache, window
            )
        kwargs: dict = {"input_ids": input_ids}
        if attention_mask is not None:
            attention_mask = attention_mask.to(input_ids.device)
            if self._accepts_position_ids:
                kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            if self._needs_4d_mask:
                keys = attention_mask.bool()
                kwargs["attention_mask"] = keys[:, None, None, :].expand(-1, 1, keys.shape[1], -1)
            else:
                kwargs["attention_mask"] = attention_mask
        return self._call(kwargs, output_hidden_states, logits_positions)

    def _call(self, kwargs: dict, output_hidden_states: bool, logits_positions) -> BackboneOutput:
        if output_hidden_states:
            kwargs["output_hidden_states"] = True
        keep = None
        if logits_positions is not None:
            # aligned position i is the model's position i - 1 for a shifted model (position 0: its own logits)
            keep = (logits_positions - 1).clamp(min=0) if self.logits_shift else logits_positions
            if self._native or self._accepts_logits_to_keep:
                kwargs["logits_to_keep"] = keep
        outputs = self.model(**kwargs)
        logits = outputs.logits if hasattr(outputs, "logits") else outputs[0]
        if keep is not None and "logits_to_keep" not in kwargs:
            logits = logits.gather(1, keep[..., None].expand(-1, -1, logits.shape[-1]))
        elif keep is None and self.logits_shift:
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        hidden = None
        if output_hidden_states:
            hidden_states = getattr(outputs, "hidden_states", None)
            if hidden_states is None:
                raise ValueError(
                    f"{type(_base_model(self.model)).__name__} did not return hidden states with "
                    "`output_hidden_states=True`; the sampler head needs them."
                )
            hidden = hidden_states[-1]
        return BackboneOutput(logits=logits, hidden_states=hidden)

    def _cached_forward(self, input_ids, attention_mask, output_hidden_states, logits_positions, cache, window):
        """A forward with a :class:`~trl_diffpo.kv_cache.CanvasKVCache`: explicit RoPE positions of the inputs and a
        prepared 4-D ``(batch, 1, inputs, canvas)`` key mask (the keys are the whole canvas)."""
        batch_size, length = input_ids.shape
        if window is None:
            window = torch.arange(length, device=input_ids.device).expand(batch_size, -1)
        if attention_mask is not None:
            attention_mask = attention_mask.to(input_ids.device)
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0).gather(1, window)
            keys = attention_mask.bool()
        else:
            position_ids = window
            canvas_length = length if cache.window is None else cache.canvas_length
            keys = torch.ones(batch_size, canvas_length, dtype=torch.bool, device=input_ids.device)
        mask = keys[:, None, None, :].expand(-1, 1, length, -1)
        if self._native and attention_mask is None:
            mask = None  # no padding: full attention (transformers models need a prepared mask to skip their own)
        elif not self._native and getattr(self.config, "_attn_implementation", "eager") == "eager":
            # transformers' eager attention adds the mask to the scores: an additive float mask
            mask = torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, torch.finfo(torch.float32).min)
        kwargs = {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": mask}
        kwargs[self._cache_argument if not self._native else "cache"] = cache
        return self._call(kwargs, output_hidden_states, logits_positions)


def check_bidirectional(model: nn.Module, vocab_size: int | None = None) -> None:
    """Raise a clear error if ``model`` attends causally.

    The config decides where it can (``config.is_causal``, known bidirectional ``model_type`` values); otherwise a
    perturbation probe changes the last token of a short random input and checks that the first position's logits
    move. The result is cached on the model.
    """
    base = _base_model(model)
    if getattr(base, "_trl_diffpo_bidirectional", False):
        return
    config = getattr(base, "config", None)
    is_causal = getattr(config, "is_causal", None)
    model_type = getattr(config, "model_type", None)
    name = type(base).__name__
    if is_causal is True:
        raise ValueError(_causal_message(name, "its config sets `is_causal=True`"))
    if is_causal is False or model_type in BIDIRECTIONAL_MODEL_TYPES:
        base._trl_diffpo_bidirectional = True
        return
    vocab_size = vocab_size or getattr(config, "vocab_size", None) or 2
    device = next(base.parameters()).device
    generator = torch.Generator().manual_seed(0)
    probe = torch.randint(0, vocab_size, (1, _PROBE_LENGTH), generator=generator)
    perturbed = probe.clone()
    perturbed[0, -1] = (perturbed[0, -1] + 1) % vocab_size
    was_training = base.training
    base.eval()
    try:
        with torch.no_grad():
            outputs = base(input_ids=torch.cat([probe, perturbed]).to(device))
    finally:
        base.train(was_training)
    logits = outputs.logits if hasattr(outputs, "logits") else outputs[0]
    if (logits[0, 0] - logits[1, 0]).abs().max().item() <= _PROBE_TOLERANCE:
        raise ValueError(_causal_message(name, "changing the last token did not change the first position's logits"))
    base._trl_diffpo_bidirectional = True


def _causal_message(name: str, evidence: str) -> str:
    return (
        f"{name} attends causally ({evidence}), but masked diffusion decoding needs bidirectional attention. "
        "Use a masked diffusion LM (LLaDA, Dream) or a bidirectional encoder (BertForMaskedLM, "
        "ModernBertForMaskedLM), or build a transformers-native Llama/Qwen2/Qwen3 with `config.is_causal=False`."
    )


def get_backbone(
    model: nn.Module,
    mask_token_id: int | None = None,
    tokenizer=None,
    logits_shift: bool | None = None,
    check_attention: bool = True,
) -> DiffusionBackbone:
    """Build the :class:`DiffusionBackbone` for ``model``: resolve the mask id, detect logit shift, check attention."""
    resolved = resolve_mask_token_id(model, tokenizer, mask_token_id)
    if check_attention:
        check_bidirectional(model)
    return DiffusionBackbone(model, resolved, logits_shift=logits_shift)


def check_cache_support(backbone: DiffusionBackbone, cache_mode: str) -> None:
    """Raise a ``ValueError`` naming the model's class if cached block decoding (``cache="prefix"`` / ``"dual"``)
    cannot run on it: it must call ``cache.update`` in every attention layer and accept a prepared 4-D mask."""
    base = _base_model(backbone.model)
    name = type(base).__name__
    if backbone._native:
        return
    reason = None
    if name not in CACHEABLE_TRANSFORMERS_CLASSES or not type(base).__module__.startswith("transformers"):
        reason = (
            "only trl_diffpo's native LLaDA / Dream classes and transformers' "
            f"{', '.join(sorted(CACHEABLE_TRANSFORMERS_CLASSES))} (with config.is_causal=False) support it"
        )
    elif getattr(base.config, "_attn_implementation", "eager") not in CACHEABLE_ATTENTION:
        reason = (
            f"attn_implementation={base.config._attn_implementation!r} cannot take the prepared 4-D mask; load the "
            f"model with attn_implementation in {sorted(CACHEABLE_ATTENTION)}"
        )
    if reason is not None:
        raise ValueError(
            f"cache={cache_mode!r} is not supported for {name}: {reason}. Use cache='none' for this model (or load "
            "LLaDA / Dream checkpoints with trl_diffpo's native classes, the default)."
        )
