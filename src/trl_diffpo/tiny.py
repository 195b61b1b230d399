"""Tiny bidirectional models and a character-level tokenizer, built in code (no downloads).

Used by the tests, the offline demo and the CPU benchmarks. The tokenizer is a ``tokenizers`` WordLevel model over
single characters wrapped in ``PreTrainedTokenizerFast``, with ``<pad>``, ``<eos>``, ``<bos>``, ``<mask>`` and
``<unk>`` special tokens and a minimal chat template, so TRL's conversational code paths work with it.
"""

from __future__ import annotations

import string

import torch
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<mask>", "<unk>")
DEFAULT_CHARACTERS = string.digits + string.ascii_letters + " +-*/=()<>[]{}.,:;!?_|\n'\"\\^%#&"

# A chat template that renders a conversation as plain text; the assistant turn is opened by "A:".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}Q:{{ message['content'] }}\n"
    "{% elif message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% else %}A:{{ message['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}A:{% endif %}"
)


def char_level_tokenizer(vocab: dict[str, int], **special_tokens: str) -> PreTrainedTokenizerFast:
    """A tokenizer over a given vocabulary (token -> id) that splits text into single characters: a ``tokenizers``
    WordLevel model (unknown characters map to ``<unk>``, which ``vocab`` must hold) with left padding, wrapped in
    ``PreTrainedTokenizerFast``. ``special_tokens`` are its keyword arguments, e.g. ``pad_token="<pad>"``.

    Example:
        >>> tokenizer = char_level_tokenizer({"<unk>": 0, "<eos>": 1, "a": 2, "b": 3}, eos_token="<eos>")
        >>> tokenizer("ab")["input_ids"]
        [2, 3]
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", padding_side="left", **special_tokens)


def build_char_tokenizer(characters: str = DEFAULT_CHARACTERS, chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one token per character, special tokens first (``<pad>`` = 0)."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in dict.fromkeys(characters):
        vocab.setdefault(char, len(vocab))
    tokenizer = char_level_tokenizer(
        vocab, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", mask_token="<mask>"
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast | None = None,
    architecture: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_position_embeddings: int = 512,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """A small randomly initialised bidirectional LM whose config knows the tokenizer's special ids.

    Args:
        architecture: ``"llama"`` / ``"qwen2"`` / ``"qwen3"`` (transformers-native with ``is_causal=False``),
            ``"bert"`` (``BertForMaskedLM``) or ``"modernbert"`` (``ModernBertForMaskedLM``).
    """
    import transformers
    from transformers import GenerationConfig

    tokenizer = tokenizer or build_char_tokenizer()
    vocab_size = len(tokenizer)
    special = {
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }
    common = {"vocab_size": vocab_size, "hidden_size": hidden_size, "num_attention_heads": num_heads}
    if architecture in ("llama", "qwen2", "qwen3"):
        config_cls, model_cls = {
            "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
            "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
            "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        }[architecture]
        extra = {"head_dim": hidden_size // num_heads} if architecture == "qwen3" else {}
        config = config_cls(
            **common,
            **special,
            **extra,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=num_layers,
            num_key_value_heads=num_heads,
            max_position_embeddings=max_position_embeddings,
            tie_word_embeddings=False,
            is_causal=False,
        )
    elif architecture == "bert":
        config_cls, model_cls = transformers.BertConfig, transformers.BertForMaskedLM
        config = config_cls(
            **common,
            **special,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=num_layers,
            max_position_embeddings=max_position_embeddings,
        )
    elif architecture == "modernbert":
        config_cls, model_cls = transformers.ModernBertConfig, transformers.ModernBertForMaskedLM
        config = config_cls(
            **common,
            **special,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=num_layers,
            max_position_embeddings=max_position_embeddings,
            mask_token_id=tokenizer.mask_token_id,
            cls_token_id=tokenizer.bos_token_id,
            sep_token_id=tokenizer.eos_token_id,
        )
    else:
        raise ValueError(
            f"Unknown tiny architecture {architecture!r}; choose from 'llama', 'qwen2', 'qwen3', 'bert', 'modernbert'."
        )
    config.mask_token_id = tokenizer.mask_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    model = model.to(dtype)
    if getattr(model, "generation_config", None) is None:
        model.generation_config = GenerationConfig(**special)
    return model.eval()
