"""LLaDA (``GSAI-ML/LLaDA-8B-Instruct`` / ``-Base``, LLaDA 1.5) as a native transformers-5 model.

Architecture of the released dense checkpoints (``block_type="llama"``): token embedding ``wte``; ``n_layers``
pre-norm blocks, each

    h = x + attn_out(Attention(RoPE(q_proj(n)), RoPE(k_proj(n)), v_proj(n)))      with n = attn_norm(x)
    y = h + ff_out(act(ff_proj(m)) * up_proj(m))                                  with m = ff_norm(h)

(``ff_proj`` is the SwiGLU gate, ``up_proj`` the up projection, the block's ``ff_out`` the down projection,
``act`` = SiLU); then ``ln_f`` and an untied output layer ``transformer.ff_out`` (or the transposed embedding
when ``weight_tying``). Attention is bidirectional (no causal mask) and logits are **aligned**: position ``i``
predicts token ``i``. Parameter names and config keys match the official checkpoint, so its ``config.json`` and
safetensors load unchanged, without ``trust_remote_code``.
"""

from __future__ import annotations

import math
from dataclasses import field

import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
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

LLADA_MODEL_TYPE = "llada"
LLADA_MASK_TOKEN_ID = 126336
LLADA_EOS_TOKEN_ID = 126081
LLADA_END_OF_TURN_TOKEN_ID = 126348

# PEFT `target_modules` for LLaDA: every projection inside the transformer blocks. A regex (PEFT full-matches a
# string against module names) because the block's down projection and the output head share the name `ff_out`:
# `model.transformer.blocks.3.ff_out` matches, `model.transformer.ff_out` (the head) does not.
LLADA_LORA_TARGET_MODULES = r".*\.blocks\.\d+\.(q_proj|k_proj|v_proj|attn_out|ff_proj|up_proj|ff_out)"

_SUPPORTED_ACTIVATIONS = {"silu": nn.functional.silu, "gelu": nn.functional.gelu, "relu": nn.functional.relu}


class LLaDAConfig(PreTrainedConfig):
    """Configuration of a LLaDA model; keys and meanings are those of the official ``config.json``.

    Defaults are the LLaDA-8B values. Only the dense ``block_type="llama"`` layout with RoPE and RMSNorm is
    implemented (what every released LLaDA checkpoint uses); other values of ``block_type``, ``alibi``, ``rope``,
    ``layer_norm_type``, ``attention_layer_norm`` or ``block_group_size`` are kept in the config but rejected with a
    clear error when a model is built. Training-time fields of the original code (``init_device``, ``init_fn``,
    ``precision``, ``flash_attention``, ...) are kept so configs round-trip; they do not change the forward pass
    (choose the attention kernel with ``attn_implementation`` instead of ``flash_attention``).

    transformers-standard names are aliases: ``hidden_size`` = ``d_model``, ``num_attention_heads`` = ``n_heads``,
    ``num_hidden_layers`` = ``n_layers``, ``max_position_embeddings`` = ``max_sequence_length``,
    ``tie_word_embeddings`` = ``weight_tying``.
    """

    model_type = LLADA_MODEL_TYPE
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "num_hidden_layers": "n_layers",
        "max_position_embeddings": "max_sequence_length",
        "tie_word_embeddings": "weight_tying",
        "num_key_value_heads": "n_kv_heads",
    }

    d_model: int = 4096
    n_heads: int = 32
    n_kv_heads: int | None = 32
    n_layers: int = 32
    mlp_ratio: int = 4
    mlp_hidden_size: int | None = 12288
    activation_type: str = "silu"
    block_type: str = "llama"
    block_group_size: int = 1
    alibi: bool = False
    alibi_bias_max: float = 8.0
    rope: bool = True
    rope_full_precision: bool = True
    rope_theta: float = 500000.0
    flash_attention: bool = False
    attention_dropout: float = 0.0
    multi_query_attention: bool | None = None
    attention_layer_norm: bool = False
    attention_layer_norm_with_affine: bool = True
    residual_dropout: float = 0.0
    embedding_dropout: float = 0.0
    input_emb_norm: bool = False
    layer_norm_type: str = "rms"
    layer_norm_with_affine: bool = True
    rms_norm_eps: float = 1e-5
    bias_for_layer_norm: bool | None = None
    max_sequence_length: int = 4096
    include_bias: bool = False
    include_qkv_bias: bool | None = False
    scale_logits: bool = False
    vocab_size: int = 126464
    embedding_size: int | None = 126464
    weight_tying: bool = False
    eos_token_id: int | None = LLADA_EOS_TOKEN_ID
    pad_token_id: int | None = LLADA_EOS_TOKEN_ID
    bos_token_id: int | None = None
    mask_token_id: int | None = LLADA_MASK_TOKEN_ID
    init_device: str | None = None
    init_fn: str = "mitchell"
    init_std: float = 0.02
    init_cutoff_factor: float | None = None
    precision: str | None = None
    use_cache: bool = False
    # The released config.json names its Hub code here; it is ignored because the native class is registered. Always
    # present (empty by default): TRL's `create_model_from_path` reads `config.auto_map` for non-transformers classes.
    auto_map: dict = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def effective_n_kv_heads(self) -> int:
        """Key/value heads: ``n_kv_heads``, or 1 / ``n_heads`` from ``multi_query_attention`` when it is unset."""
        if self.n_kv_heads is not None:
            return self.n_kv_heads
        return 1 if self.multi_query_attention else self.n_heads

    @property
    def mlp_width(self) -> int:
        """Width of the feed-forward layer: ``mlp_hidden_size``, else ``mlp_ratio * d_model``."""
        return self.mlp_hidden_size if self.mlp_hidden_size is not None else self.mlp_ratio * self.d_model

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and the output layer: ``embedding_size`` (a multiple of 128), else ``vocab_size``."""
        return self.embedding_size or self.vocab_size


def check_llada_config_supported(config: LLaDAConfig) -> None:
    """Raise ``ValueError`` naming the field if ``config`` asks for a variant this implementation does not build."""
    problems = []
    if config.block_type != "llama":
        problems.append(f"block_type={config.block_type!r} (only 'llama', the layout of the released checkpoints)")
    if config.alibi or not config.rope:
        problems.append("positions other than RoPE (alibi=True or rope=False)")
    if config.layer_norm_type != "rms":
        problems.append(f"layer_norm_type={config.layer_norm_type!r} (only 'rms')")
    if config.attention_layer_norm:
        problems.append("attention_layer_norm=True (query/key norms)")
    if config.block_group_size != 1:
        problems.append(f"block_group_size={config.block_group_size} (changes parameter names; only 1)")
    if config.activation_type not in _SUPPORTED_ACTIVATIONS:
        problems.append(f"activation_type={config.activation_type!r} (one of {sorted(_SUPPORTED_ACTIVATIONS)})")
    if config.d_model % config.n_heads or config.n_heads % config.effective_n_kv_heads:
        problems.append(
            f"d_model={config.d_model}, n_heads={config.n_heads}, n_kv_heads={config.effective_n_kv_heads} "
            "(d_model must divide into n_heads heads and n_heads into the key/value heads)"
        )
    if config.padded_vocab_size < config.vocab_size:
        problems.append(f"embedding_size={config.embedding_size} smaller than vocab_size={config.vocab_size}")
    if problems:
        raise ValueError(
            "This LLaDA config is not supported by trl_diffpo's native implementation: "
            + "; ".join(problems)
            + ". Load it with the checkpoint's own code instead (docs/models.md, 'Using the Hub code instead')."
        )


class LLaDALlamaBlock(GradientCheckpointingLayer):
    """One LLaDA block; its projections are direct children so the names match the checkpoint
    (``blocks.N.q_proj``, ``blocks.N.attn_out``, ``blocks.N.ff_proj``, ...)."""

    def __init__(self, config: LLaDAConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        head_dim = config.head_dim
        kv_width = config.effective_n_kv_heads * head_dim
        qkv_bias = bool(config.include_bias or config.include_qkv_bias)
        norm_bias = config.include_bias if config.bias_for_layer_norm is None else config.bias_for_layer_norm
        affine = config.layer_norm_with_affine

        self.attn_norm = RMSNorm(config.d_model, config.rms_norm_eps, affine, norm_bias)
        self.q_proj = nn.Linear(config.d_model, config.d_model, bias=qkv_bias)
        self.k_proj = nn.Linear(config.d_model, kv_width, bias=qkv_bias)
        self.v_proj = nn.Linear(config.d_model, kv_width, bias=qkv_bias)
        self.attn_out = nn.Linear(config.d_model, config.d_model, bias=config.include_bias)
        self.ff_norm = RMSNorm(config.d_model, config.rms_norm_eps, affine, norm_bias)
        self.ff_proj = nn.Linear(config.d_model, config.mlp_width, bias=config.include_bias)
        self.up_proj = nn.Linear(config.d_model, config.mlp_width, bias=config.include_bias)
        self.ff_out = nn.Linear(config.mlp_width, config.d_model, bias=config.include_bias)
        self.act = _SUPPORTED_ACTIVATIONS[config.activation_type]
        self.dropout = nn.Dropout(config.residual_dropout)
        # Read by transformers' attention functions, which receive this block as `module`.
        self.is_causal = False
        self.num_key_value_groups = config.n_heads // config.effective_n_kv_heads
        self.scaling = head_dim**-0.5

    def _self_attention(self, normed, position_embeddings, attention_mask, **kwargs):
        batch_size, seq_len, _ = normed.shape
        head_dim = self.config.head_dim
        query = self.q_proj(normed).view(batch_size, seq_len, -1, head_dim).transpose(1, 2)
        key = self.k_proj(normed).view(batch_size, seq_len, -1, head_dim).transpose(1, 2)
        value = self.v_proj(normed).view(batch_size, seq_len, -1, head_dim).transpose(1, 2)

        cos, sin = position_embeddings
        if self.config.rope_full_precision:
            query = apply_rotary(query.float(), cos, sin).to(value.dtype)
            key = apply_rotary(key.float(), cos, sin).to(value.dtype)
        else:
            cos, sin = cos.to(value.dtype), sin.to(value.dtype)
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
        return self.attn_out(output.reshape(batch_size, seq_len, -1).contiguous())

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        attended = self._self_attention(self.attn_norm(hidden_states), position_embeddings, attention_mask, **kwargs)
        hidden_states = hidden_states + self.dropout(attended)
        normed = self.ff_norm(hidden_states)
        feed_forward = self.ff_out(self.act(self.ff_proj(normed)) * self.up_proj(normed))
        return hidden_states + self.dropout(feed_forward)


class LLaDAPreTrainedModel(NoAutoregressiveGenerationMixin, PreTrainedModel):
    """Common ``PreTrainedModel`` settings of the LLaDA classes."""

    config: LLaDAConfig
    config_class = LLaDAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LLaDALlamaBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False


class LLaDAModel(LLaDAPreTrainedModel):
    """The LLaDA trunk, ``transformer = {wte, blocks, ln_f[, ff_out]}`` as in the checkpoint.

    The output layer ``transformer.ff_out`` lives here (that is where the checkpoint stores it) but is applied by
    :class:`LLaDAModelLM`; this module returns the final-norm hidden states.
    """

    def __init__(self, config: LLaDAConfig):
        super().__init__(config)
        check_llada_config_supported(config)
        norm_bias = config.include_bias if config.bias_for_layer_norm is None else config.bias_for_layer_norm
        modules = {
            "wte": nn.Embedding(config.padded_vocab_size, config.d_model),
            "emb_drop": nn.Dropout(config.embedding_dropout),
            "blocks": nn.ModuleList(LLaDALlamaBlock(config, i) for i in range(config.n_layers)),
            "ln_f": RMSNorm(config.d_model, config.rms_norm_eps, config.layer_norm_with_affine, norm_bias),
            # Always present so PEFT / `get_output_embeddings` see a head; tied to `wte` when `weight_tying`
            # (then the checkpoint has no `transformer.ff_out.weight`, as with the original code).
            "ff_out": nn.Linear(
                config.d_model, config.padded_vocab_size, bias=config.include_bias and not config.weight_tying
            ),
        }
        self.transformer = nn.ModuleDict(modules)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.wte = value

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
            attention_mask: ``(batch, seq_len)`` 1 for real tokens, 0 for padding (keys at 0 are not attended to),
                or a prepared 4-D mask.
            position_ids: ``(batch, seq_len)`` RoPE positions; by default counted over real tokens of a 2-D mask
                (so left padding does not move positions), else ``0..seq_len-1`` as in the original code.
            output_hidden_states: also return the input of every block and the final-norm output.
            use_cache: accepted for API compatibility; LLaDA has no KV cache and ``True`` is an error.
            return_dict: ``False`` returns a tuple instead of the output object.
        """
        check_trunk_inputs("LLaDA", input_ids, inputs_embeds, use_cache)
        hidden_states = self.transformer.wte(input_ids) if inputs_embeds is None else inputs_embeds
        if self.config.input_emb_norm:
            hidden_states = hidden_states * math.sqrt(self.config.d_model)
        hidden_states = self.transformer.emb_drop(hidden_states)
        return run_bidirectional_layers(
            self.config, hidden_states, attention_mask, position_ids, self.transformer.blocks, self.transformer.ln_f,
            output_hidden_states, return_dict, **kwargs,
        )  # fmt: skip


class LLaDAModelLM(MaskedLMHeadMixin, LLaDAPreTrainedModel):
    """LLaDA with its output layer: returns aligned logits (position ``i`` predicts token ``i``).

    The class name is the ``architectures`` entry of the official checkpoints. Loading them needs no remote code::

        model = AutoModel.from_pretrained("GSAI-ML/LLaDA-8B-Instruct", dtype=torch.bfloat16)
    """

    _tied_weights_keys = {"model.transformer.ff_out.weight": "model.transformer.wte.weight"}

    def __init__(self, config: LLaDAConfig):
        super().__init__(config)
        self.model = LLaDAModel(config)
        self.generation_config = special_token_generation_config(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.transformer.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.model.transformer.ff_out

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.model.transformer.ff_out = new_embeddings

    def get_decoder(self) -> LLaDAModel:
        return self.model

    def output_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Aligned logits ``(batch, seq_len, embedding_size)``: position ``i`` predicts token ``i``."""
        logits = self.model.transformer.ff_out(hidden_states)
        if self.config.scale_logits:
            logits = logits * (1.0 / math.sqrt(self.config.d_model))
        return logits
