"""Dream (``Dream-org/Dream-v0-Instruct-7B`` / ``-Base-7B``) as a native transformers-5 model.

Dream is Qwen2.5 run bidirectionally: token embedding, ``num_hidden_layers`` pre-norm decoder layers (attention with
bias on q/k/v, no bias on o, grouped-query heads, RoPE "rotate half"; SwiGLU MLP ``down(silu(gate(x)) * up(x))``),
final RMSNorm and an untied ``lm_head``. Attention has no causal mask. Its logits are **shifted**: position ``i``
predicts token ``i + 1`` (it was adapted from an autoregressive model); :class:`trl_diffpo.DiffusionBackbone` undoes
the shift, detecting it from ``config.model_type == "Dream"``.

Parameter names (``model.embed_tokens``, ``model.layers.N.self_attn.{q,k,v,o}_proj``,
``model.layers.N.mlp.{gate,up,down}_proj``, ``model.layers.N.{input,post_attention}_layernorm``, ``model.norm``,
``lm_head``) and config keys match the released checkpoint, whose ``architectures`` entry is ``DreamModel`` (the
class with the LM head; the trunk is :class:`DreamBaseModel`, as in the original code).
"""

from __future__ import annotations

from dataclasses import field

import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput

from .layers import (
    MaskedLMHeadMixin,
    NoAutoregressiveGenerationMixin,
    RMSNorm,
    apply_rotary,
    attention_function,
    cached_key_value,
    check_trunk_inputs,
    run_bidirectional_layers,
    special_token_generation_config,
)

DREAM_MODEL_TYPE = "Dream"
DREAM_MASK_TOKEN_ID = 151666
DREAM_PAD_TOKEN_ID = 151643  # <|endoftext|>, also the end-of-sequence token of the base model
DREAM_END_OF_TURN_TOKEN_ID = 151645  # <|im_end|>

# PEFT `target_modules` for Dream: every attention and MLP projection; `lm_head` is not matched.
DREAM_LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class DreamConfig(PreTrainedConfig):
    """Configuration of a Dream model; keys and meanings are those of the official ``config.json``.

    Defaults are the Dream-v0-7B values. Only plain RoPE is implemented (``rope_scaling`` must be ``None``, as in the
    released checkpoints) and sliding-window attention is not (``use_sliding_window`` must be false); both are
    rejected with a clear error when a model is built.
    """

    model_type = DREAM_MODEL_TYPE
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int | None = 4
    head_dim: int | None = None  # None: hidden_size // num_attention_heads (the released checkpoints)
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = False
    tie_word_embeddings: bool = False
    rope_theta: float = 1000000.0
    rope_scaling: dict | None = None  # a plain field here (the base class has a deprecated property of this name)
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int = 28
    attention_dropout: float = 0.0
    mask_token_id: int | None = DREAM_MASK_TOKEN_ID
    pad_token_id: int | None = DREAM_PAD_TOKEN_ID
    bos_token_id: int | None = DREAM_PAD_TOKEN_ID
    eos_token_id: int | list[int] | None = DREAM_PAD_TOKEN_ID
    # The released config.json names its Hub code here; it is ignored because the native class is registered. Always
    # present (empty by default): TRL's `create_model_from_path` reads `config.auto_map` for non-transformers classes.
    auto_map: dict = field(default_factory=dict)

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)


def check_dream_config_supported(config: DreamConfig) -> None:
    """Raise ``ValueError`` naming the field if ``config`` asks for a variant this implementation does not build."""
    problems = []
    if config.rope_scaling:
        problems.append(f"rope_scaling={config.rope_scaling!r} (only plain RoPE, rope_scaling=None)")
    if config.use_sliding_window:
        problems.append("use_sliding_window=True")
    if config.hidden_act not in ACT2FN:
        problems.append(f"hidden_act={config.hidden_act!r}")
    if config.num_attention_heads % config.num_key_value_heads:
        problems.append(
            f"num_attention_heads={config.num_attention_heads}, num_key_value_heads={config.num_key_value_heads} "
            "(query heads must divide evenly among the key/value heads)"
        )
    if problems:
        raise ValueError(
            "This Dream config is not supported by trl_diffpo's native implementation: "
            + "; ".join(problems)
            + ". Load it with the checkpoint's own code instead (docs/models.md, 'Using the Hub code instead')."
        )


class DreamAttention(nn.Module):
    """Bidirectional grouped-query attention with RoPE; q/k/v projections have a bias, o does not."""

    def __init__(self, config: DreamConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        kv_width = config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, kv_width, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, kv_width, bias=True)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, hidden_states, position_embeddings, attention_mask, **kwargs) -> torch.Tensor:
        batch_size, seq_len, _ = hidden_states.shape
        query = self.q_proj(hidden_states).view(batch_size, seq_len, -1, self.head_dim).transpose(1, 2)
        key = self.k_proj(hidden_states).view(batch_size, seq_len, -1, self.head_dim).transpose(1, 2)
        value = self.v_proj(hidden_states).view(batch_size, seq_len, -1, self.head_dim).transpose(1, 2)
        cos, sin = (table.to(query.dtype) for table in position_embeddings)
        query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        key, value = cached_key_value(kwargs, key, value, self.layer_idx)
        attention = attention_function(self.config)
        output, _ = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.config.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        return self.o_proj(output.reshape(batch_size, seq_len, -1).contiguous())


class DreamMLP(nn.Module):
    """SwiGLU feed-forward: ``down_proj(act(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, config: DreamConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


class DreamRMSNorm(RMSNorm):
    """RMSNorm with a weight and no bias (the Qwen2 norm)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__(hidden_size, eps)


class DreamDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm layer: ``h = x + attn(input_layernorm(x))``; ``y = h + mlp(post_attention_layernorm(h))``."""

    def __init__(self, config: DreamConfig, layer_idx: int):
        super().__init__()
        self.self_attn = DreamAttention(config, layer_idx)
        self.mlp = DreamMLP(config)
        self.input_layernorm = DreamRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = DreamRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, **kwargs
        )
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class DreamPreTrainedModel(NoAutoregressiveGenerationMixin, PreTrainedModel):
    """Common ``PreTrainedModel`` settings of the Dream classes."""

    config: DreamConfig
    config_class = DreamConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DreamDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False


class DreamBaseModel(DreamPreTrainedModel):
    """The Dream trunk: embeddings, decoder layers and final norm; returns final-norm hidden states."""

    def __init__(self, config: DreamConfig):
        super().__init__(config)
        check_dream_config_supported(config)
        pad = config.pad_token_id
        padding_idx = pad if isinstance(pad, int) and 0 <= pad < config.vocab_size else None
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx)
        self.layers = nn.ModuleList(DreamDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = DreamRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutput:
        """Bidirectional forward.

        Args:
            input_ids: ``(batch, seq_len)`` token ids (or pass ``inputs_embeds``).
            attention_mask: ``(batch, seq_len)`` 1 for real tokens, 0 for padding, or a prepared 4-D mask (a boolean
                ``(batch, 1, seq_len, seq_len)`` mask as Dream's own generation code builds is accepted too).
            position_ids: ``(batch, seq_len)`` RoPE positions; by default counted over real tokens of a 2-D mask, else
                ``0..seq_len-1``.
            output_hidden_states: also return the input of every layer and the final-norm output.
            use_cache: accepted for API compatibility; there is no KV cache and ``True`` is an error.
            return_dict: ``False`` returns a tuple instead of the output object.
        """
        check_trunk_inputs("Dream", input_ids, inputs_embeds, use_cache)
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        return run_bidirectional_layers(
            self.config, hidden_states, attention_mask, position_ids, self.layers, self.norm,
            output_hidden_states, return_dict, **kwargs,
        )  # fmt: skip


class DreamModel(MaskedLMHeadMixin, DreamPreTrainedModel):
    """Dream with its LM head; logits are shifted (position ``i`` predicts token ``i + 1``).

    The class name is the ``architectures`` entry of the official checkpoints. Loading them needs no remote code::

        model = AutoModel.from_pretrained("Dream-org/Dream-v0-Instruct-7B", dtype=torch.bfloat16)
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DreamConfig):
        super().__init__(config)
        self.model = DreamBaseModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.generation_config = special_token_generation_config(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    def get_decoder(self) -> DreamBaseModel:
        return self.model

    def output_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Shifted logits: position ``i`` predicts token ``i + 1`` (as Dream was trained)."""
        return self.lm_head(hidden_states)
