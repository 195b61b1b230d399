"""Building blocks shared by the native LLaDA and Dream implementations.

Both are pre-norm transformers with RMSNorm, rotary position embeddings (the "rotate half" convention: the head
dimension is split into two halves, not interleaved pairs), SwiGLU feed-forward layers and **bidirectional**
attention. Attention goes through transformers' attention interface (``eager`` / ``sdpa`` / ``flash_attention_2`` /
...), always with ``is_causal=False``; padding is expressed by a key mask built with
:func:`transformers.masking_utils.create_bidirectional_mask`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import GenerationConfig
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, normalising in float32 and scaling in the input dtype.

    ``weight`` is absent when ``elementwise_affine=False`` and ``bias`` is only created when ``bias=True``
    (LLaDA's ``bias_for_layer_norm``); the released checkpoints use a weight and no bias.
    """

    def __init__(self, hidden_size: int, eps: float, elementwise_affine: bool = True, bias: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.zeros(hidden_size)) if (bias and elementwise_affine) else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        normed = hidden_states.float()
        normed = normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True) + self.eps)
        normed = normed.to(input_dtype)
        if self.weight is not None:
            normed = self.weight * normed
        if self.bias is not None:
            normed = normed + self.bias
        return normed

    def extra_repr(self) -> str:
        shape = tuple(self.weight.shape) if self.weight is not None else None
        return f"{shape}, eps={self.eps}"


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 ``cos`` / ``sin`` tables of shape ``(batch, seq_len, head_dim)`` for the given positions.

    The inverse frequencies are recomputed on every call (``head_dim / 2`` numbers) instead of living in a buffer, so
    nothing has to be re-initialised after ``from_pretrained`` builds the model on the meta device.
    """
    exponents = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (float(theta) ** exponents)
    with torch.autocast(device_type=position_ids.device.type, enabled=False):
        angles = position_ids.float()[..., None] * inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``(x1, x2) -> (-x2, x1)`` over the two halves of the last dimension."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` of shape ``(batch, heads, seq_len, head_dim)`` by tables of shape ``(batch, seq_len, head_dim)``."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def default_position_ids(
    input_shape: tuple[int, int], attention_mask: torch.Tensor | None, device: torch.device
) -> torch.LongTensor:
    """Positions ``0..n-1`` counted over real tokens only when a 2-D padding mask is given, else ``arange``.

    With left padding this makes a sequence's positions, and so its logits, independent of how much padding
    precedes it. Padding positions get position 0 (their outputs are meaningless anyway).
    """
    batch_size, seq_len = input_shape
    if attention_mask is not None and attention_mask.dim() == 2:
        return (attention_mask.to(device).long().cumsum(-1) - 1).clamp(min=0)
    return torch.arange(seq_len, device=device).unsqueeze(0).expand(batch_size, -1)


def bidirectional_attention_mask(config, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None):
    """The mask the configured attention implementation expects, from a 2-D ``(batch, seq_len)`` 0/1 padding mask.

    ``None`` stays ``None`` (full attention) and a 2-D mask of all ones is dropped. A 4-D boolean mask
    ``(batch, 1, q_len, kv_len)`` (the form Dream's Hub generation code passes) is turned into an additive float mask
    that both ``eager`` and ``sdpa`` understand; a 4-D float mask is passed on as it is.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() == 4:
        if attention_mask.dtype == torch.bool:
            blocked = torch.finfo(inputs_embeds.dtype).min
            zeros = torch.zeros((), dtype=inputs_embeds.dtype, device=inputs_embeds.device)
            return torch.where(attention_mask.to(inputs_embeds.device), zeros, blocked)
        return attention_mask
    if attention_mask.dim() != 2:
        raise ValueError(
            f"attention_mask must be a 2-D (batch, seq_len) padding mask or a prepared 4-D mask, "
            f"got shape {tuple(attention_mask.shape)}."
        )
    return create_bidirectional_mask(config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask)


def repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    """Repeat each key/value head ``groups`` times: ``(b, kv_heads, t, d) -> (b, kv_heads * groups, t, d)``."""
    if groups == 1:
        return states
    return states.repeat_interleave(groups, dim=1)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention (no causal mask); returns ``(batch, seq_len, heads, head_dim)`` and the weights."""
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


def attention_function(config) -> Callable:
    """The attention kernel selected by ``config._attn_implementation`` (``eager`` falls back to ours)."""
    return ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)


def special_token_generation_config(config) -> GenerationConfig:
    """A ``GenerationConfig`` carrying the config's bos / eos / pad ids.

    These models cannot run ``generate()`` (decoding is masked diffusion, see :mod:`trl_diffpo.generation`), but TRL
    reads ``model.generation_config`` for the pad and eos ids, so the LM classes always have one.
    """
    return GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )


def refuse_labels(labels) -> None:
    """The LM classes have no built-in loss: a masked diffusion loss depends on which positions were masked."""
    if labels is not None:
        raise ValueError(
            "`labels` is not supported: masked diffusion models have no built-in loss (it depends on the masking and "
            "its weighting). Compute the loss from `outputs.logits`, e.g. through trl_diffpo's trainers."
        )


class NoAutoregressiveGenerationMixin:
    """Marks a masked diffusion LM: ``prepare_inputs_for_generation`` exists (PEFT's ``task_type="CAUSAL_LM"`` wrapper
    and TRL's default LoRA config read it) but autoregressive ``generate`` is refused with the way to decode."""

    def prepare_inputs_for_generation(self, *args, **kwargs):
        raise NotImplementedError(
            f"{type(self).__name__} is a masked diffusion LM: it does not generate left to right. Decode with "
            "`trl_diffpo.diffusion_generate(model, input_ids, attention_mask, ...)`."
        )


def keep_positions(hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """The positions of ``hidden_states`` ``(batch, seq_len, hidden)`` whose logits are wanted, before the output
    layer (transformers' ``logits_to_keep`` convention): an ``int`` keeps the last that many (``0``: all), a 1-D
    tensor the same positions of every row, a 2-D ``(batch, k)`` integer tensor per-row positions."""
    if isinstance(logits_to_keep, torch.Tensor):
        if logits_to_keep.dim() == 2:
            index = logits_to_keep.to(hidden_states.device)[..., None].expand(-1, -1, hidden_states.shape[-1])
            return hidden_states.gather(1, index)
        return hidden_states[:, logits_to_keep.to(hidden_states.device)]
    return hidden_states[:, -logits_to_keep:] if logits_to_keep else hidden_states


def cached_key_value(kwargs: dict, key: torch.Tensor, value: torch.Tensor, layer_idx: int):
    """Keys/values to attend to: ``cache.update(key, value, layer_idx)`` when a ``cache`` (a
    :class:`trl_diffpo.kv_cache.CanvasKVCache`, for cached block decoding) is passed, else the layer's own."""
    cache = kwargs.get("cache")
    return (key, value) if cache is None else cache.update(key, value, layer_idx)


class MaskedLMHeadMixin:
    """``forward`` of the LM classes: run the trunk ``self.model`` and project its last hidden state with
    :meth:`output_logits` (each class defines how). Returns a ``MaskedLMOutput`` (or its tuple with
    ``return_dict=False``); ``labels`` are refused (see :func:`refuse_labels`). ``logits_to_keep`` selects the
    positions projected (see :func:`keep_positions`); a ``cache`` (:class:`trl_diffpo.kv_cache.CanvasKVCache`) lets
    cached block decoding record or reuse the keys/values of every layer."""

    supports_canvas_kv_cache = True

    def output_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> MaskedLMOutput:
        """Logits ``(batch, kept, vocab)`` from :meth:`output_logits` at the ``logits_to_keep`` positions (all by
        default); the other arguments are the trunk's."""
        refuse_labels(labels)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states,
            use_cache=use_cache,
            **kwargs,
        )
        kept = keep_positions(outputs.last_hidden_state, logits_to_keep)
        output = MaskedLMOutput(logits=self.output_logits(kept), hidden_states=outputs.hidden_states)
        return output if return_dict is not False else output.to_tuple()


def check_trunk_inputs(name: str, input_ids, inputs_embeds, use_cache: bool | None) -> None:
    """Refuse an autoregressive KV cache and require exactly one of ``input_ids`` / ``inputs_embeds``."""
    if use_cache:
        raise ValueError(
            f"{name} is a bidirectional diffusion model and has no KV cache for autoregressive decoding: pass "
            "use_cache=False (cached block decoding passes a trl_diffpo.kv_cache.CanvasKVCache as `cache=` instead)."
        )
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of input_ids or inputs_embeds.")


def run_bidirectional_layers(
    config,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.LongTensor | None,
    layers: nn.ModuleList,
    final_norm: nn.Module,
    output_hidden_states: bool | None,
    return_dict: bool | None,
    **kwargs,
):
    """The trunk after the embeddings, shared by LLaDA and Dream: RoPE tables, the bidirectional padding mask, every
    layer, the final norm. Returns a ``BaseModelOutput`` (a tuple with ``return_dict=False``); with
    ``output_hidden_states`` its ``hidden_states`` are every layer's input and the final-norm output."""
    if output_hidden_states is None:
        output_hidden_states = config.output_hidden_states
    if position_ids is None:
        position_ids = default_position_ids(hidden_states.shape[:2], attention_mask, hidden_states.device)
    position_embeddings = rotary_cos_sin(position_ids, config.head_dim, config.rope_theta)
    mask = bidirectional_attention_mask(config, hidden_states, attention_mask)

    all_hidden_states = [] if output_hidden_states else None
    for layer in layers:
        if all_hidden_states is not None:
            all_hidden_states.append(hidden_states)
        hidden_states = layer(hidden_states, attention_mask=mask, position_embeddings=position_embeddings, **kwargs)
    hidden_states = final_norm(hidden_states)
    if all_hidden_states is not None:
        all_hidden_states.append(hidden_states)
    output = BaseModelOutput(
        last_hidden_state=hidden_states,
        hidden_states=tuple(all_hidden_states) if all_hidden_states is not None else None,
    )
    return output if return_dict is not False else output.to_tuple()
