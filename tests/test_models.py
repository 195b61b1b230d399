"""Native LLaDA / Dream: checkpoint compatibility, reference equivalence, padding, logit shift, LoRA, checker."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

import trl_diffpo  # noqa: F401  (registers the native classes)
from trl_diffpo.backbones import get_backbone
from trl_diffpo.models import (
    DREAM_LORA_TARGET_MODULES,
    LLADA_LORA_TARGET_MODULES,
    CheckpointError,
    DreamConfig,
    DreamModel,
    LLaDAConfig,
    LLaDAModelLM,
    check_checkpoint,
    lora_target_modules,
    main,
    register_native_models,
)

VOCAB = 40
PADDED_VOCAB = 48  # LLaDA's embedding_size may exceed vocab_size
MASK_ID = 39
PAD_ID = 1
SEQ_LEN = 7
ATOL = 1e-5

# A tiny config.json written like the official GSAI-ML/LLaDA-8B-Instruct one (same keys, small sizes).
OFFICIAL_LLADA_CONFIG = {
    "activation_type": "silu",
    "alibi": False,
    "alibi_bias_max": 8.0,
    "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0,
    "attention_layer_norm": False,
    "attention_layer_norm_with_affine": True,
    "auto_map": {
        "AutoConfig": "configuration_llada.LLaDAConfig",
        "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
        "AutoModel": "modeling_llada.LLaDAModelLM",
    },
    "bias_for_layer_norm": False,
    "block_group_size": 1,
    "block_type": "llama",
    "d_model": 32,
    "embedding_dropout": 0.0,
    "embedding_size": PADDED_VOCAB,
    "eos_token_id": 2,
    "flash_attention": False,
    "include_bias": False,
    "include_qkv_bias": False,
    "init_cutoff_factor": None,
    "init_device": "meta",
    "init_fn": "mitchell",
    "init_std": 0.02,
    "input_emb_norm": False,
    "layer_norm_type": "rms",
    "layer_norm_with_affine": True,
    "mask_token_id": MASK_ID,
    "max_sequence_length": 64,
    "mlp_hidden_size": 48,
    "mlp_ratio": 4,
    "model_type": "llada",
    "multi_query_attention": None,
    "n_heads": 4,
    "n_kv_heads": 2,
    "n_layers": 2,
    "pad_token_id": PAD_ID,
    "precision": "amp_bf16",
    "residual_dropout": 0.0,
    "rms_norm_eps": 1e-06,  # non-default values, so a dropped field shows
    "rope": True,
    "rope_full_precision": True,
    "rope_theta": 10000.0,
    "scale_logits": False,
    "torch_dtype": "float32",
    "transformers_version": "4.46.3",
    "use_cache": False,
    "vocab_size": VOCAB,
    "weight_tying": False,
}

# A tiny config.json written like the official Dream-org/Dream-v0-Instruct-7B one.
OFFICIAL_DREAM_CONFIG = {
    "architectures": ["DreamModel"],
    "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
    "bos_token_id": 2,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 32,
    "initializer_range": 0.02,
    "intermediate_size": 48,
    "mask_token_id": MASK_ID,
    "max_position_embeddings": 64,
    "max_window_layers": 2,
    "model_type": "Dream",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "pad_token_id": PAD_ID,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 5000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "transformers_version": "4.46.2",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": VOCAB,
}


# ----------------------------------------------------------------------------------------------------------------
# Official tensor names and shapes, written out from the architecture description (not read from our classes).


def official_llada_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    d, heads, kv_heads, width = cfg["d_model"], cfg["n_heads"], cfg["n_kv_heads"], cfg["mlp_hidden_size"]
    kv_width = kv_heads * (d // heads)
    rows = cfg["embedding_size"] or cfg["vocab_size"]
    shapes = {"model.transformer.wte.weight": (rows, d), "model.transformer.ln_f.weight": (d,)}
    for i in range(cfg["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        shapes.update(
            {
                p + "attn_norm.weight": (d,),
                p + "q_proj.weight": (d, d),
                p + "k_proj.weight": (kv_width, d),
                p + "v_proj.weight": (kv_width, d),
                p + "attn_out.weight": (d, d),
                p + "ff_norm.weight": (d,),
                p + "ff_proj.weight": (width, d),
                p + "up_proj.weight": (width, d),
                p + "ff_out.weight": (d, width),
            }
        )
    if not cfg["weight_tying"]:
        shapes["model.transformer.ff_out.weight"] = (rows, d)
    return shapes


def official_dream_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    d, heads, kv_heads, width = (
        cfg["hidden_size"],
        cfg["num_attention_heads"],
        cfg["num_key_value_heads"],
        cfg["intermediate_size"],
    )
    kv_width = kv_heads * (d // heads)
    shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], d), "model.norm.weight": (d,)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (d,),
                p + "self_attn.q_proj.weight": (d, d),
                p + "self_attn.q_proj.bias": (d,),
                p + "self_attn.k_proj.weight": (kv_width, d),
                p + "self_attn.k_proj.bias": (kv_width,),
                p + "self_attn.v_proj.weight": (kv_width, d),
                p + "self_attn.v_proj.bias": (kv_width,),
                p + "self_attn.o_proj.weight": (d, d),
                p + "post_attention_layernorm.weight": (d,),
                p + "mlp.gate_proj.weight": (width, d),
                p + "mlp.up_proj.weight": (width, d),
                p + "mlp.down_proj.weight": (d, width),
            }
        )
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (cfg["vocab_size"], d)
    return shapes


def random_tensors(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights large enough that a wrong wiring changes the logits visibly; norm weights around 1."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in sorted(shapes.items()):
        noise = torch.randn(shape, generator=generator)
        is_norm = "norm" in name or name.endswith("ln_f.weight")
        tensors[name] = 1.0 + 0.1 * noise if is_norm else 0.3 * noise
    return tensors


def write_folder(path, config: dict, tensors: dict[str, torch.Tensor], shards: int = 1) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    names = sorted(tensors)
    weight_map = {}
    for shard in range(shards):
        file_name = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: tensors[name] for name in names[shard::shards]}
        save_file(part, str(path / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file_name))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture
def llada_folder(tmp_path):
    tensors = random_tensors(official_llada_shapes(OFFICIAL_LLADA_CONFIG))
    write_folder(tmp_path / "llada", OFFICIAL_LLADA_CONFIG, tensors)
    return tmp_path / "llada", tensors


@pytest.fixture
def dream_folder(tmp_path):
    tensors = random_tensors(official_dream_shapes(OFFICIAL_DREAM_CONFIG), seed=1)
    write_folder(tmp_path / "dream", OFFICIAL_DREAM_CONFIG, tensors)
    return tmp_path / "dream", tensors


def random_ids(batch: int = 2, seq_len: int = SEQ_LEN, seed: int = 0) -> torch.LongTensor:
    return torch.randint(3, VOCAB, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------------
# Deliberately simple reference forwards, written from the architecture description with explicit loops, in float64.


def ref_rms_norm(x, weight, eps):
    return weight * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def ref_rope(x, positions, theta):
    """x: (seq, head_dim) of one head; rotate each pair (j, j + head_dim/2) by position * theta^(-2j/head_dim)."""
    half = x.shape[-1] // 2
    out = x.clone()
    for t in range(x.shape[0]):
        for j in range(half):
            angle = positions[t] * theta ** (-2.0 * j / x.shape[-1])
            a, b = x[t, j], x[t, j + half]
            out[t, j] = a * math.cos(angle) - b * math.sin(angle)
            out[t, j + half] = b * math.cos(angle) + a * math.sin(angle)
    return out


def ref_attention(x, wq, wk, wv, wo, n_heads, n_kv_heads, theta, key_mask, positions, bq=None, bk=None, bv=None):
    """Bidirectional attention of one sequence x: (seq, d); key_mask: (seq,) bools of keys that may be attended."""
    seq, d = x.shape
    head_dim = d // n_heads
    q = x @ wq.T + (bq if bq is not None else 0)
    k = x @ wk.T + (bk if bk is not None else 0)
    v = x @ wv.T + (bv if bv is not None else 0)
    heads = []
    for h in range(n_heads):
        kv = h // (n_heads // n_kv_heads)  # the key/value head this query head shares
        qh = ref_rope(q[:, h * head_dim : (h + 1) * head_dim], positions, theta)
        kh = ref_rope(k[:, kv * head_dim : (kv + 1) * head_dim], positions, theta)
        vh = v[:, kv * head_dim : (kv + 1) * head_dim]
        scores = torch.einsum("qd,kd->qk", qh, kh) / math.sqrt(head_dim)
        scores = scores.masked_fill(~key_mask[None, :], float("-inf"))
        heads.append(torch.softmax(scores, dim=-1) @ vh)
    return torch.cat(heads, dim=-1) @ wo.T


def ref_llada_logits(w: dict, cfg: dict, ids: torch.LongTensor, key_mask=None) -> torch.Tensor:
    w = {k: v.double() for k, v in w.items()}
    outputs = []
    for b in range(ids.shape[0]):
        keys = key_mask[b].bool() if key_mask is not None else torch.ones(ids.shape[1], dtype=torch.bool)
        positions = (keys.long().cumsum(0) - 1).clamp(min=0).tolist()
        h = w["model.transformer.wte.weight"][ids[b]]
        for i in range(cfg["n_layers"]):
            p = f"model.transformer.blocks.{i}."
            x = ref_rms_norm(h, w[p + "attn_norm.weight"], cfg["rms_norm_eps"])
            h = h + ref_attention(
                x,
                w[p + "q_proj.weight"],
                w[p + "k_proj.weight"],
                w[p + "v_proj.weight"],
                w[p + "attn_out.weight"],
                cfg["n_heads"],
                cfg["n_kv_heads"],
                cfg["rope_theta"],
                keys,
                positions,
            )
            x = ref_rms_norm(h, w[p + "ff_norm.weight"], cfg["rms_norm_eps"])
            gate, up = x @ w[p + "ff_proj.weight"].T, x @ w[p + "up_proj.weight"].T
            h = h + (torch.nn.functional.silu(gate) * up) @ w[p + "ff_out.weight"].T
        h = ref_rms_norm(h, w["model.transformer.ln_f.weight"], cfg["rms_norm_eps"])
        head = w["model.transformer.wte.weight"] if cfg["weight_tying"] else w["model.transformer.ff_out.weight"]
        outputs.append(h @ head.T)
    return torch.stack(outputs)


def ref_dream_logits(w: dict, cfg: dict, ids: torch.LongTensor, key_mask=None) -> torch.Tensor:
    w = {k: v.double() for k, v in w.items()}
    outputs = []
    for b in range(ids.shape[0]):
        keys = key_mask[b].bool() if key_mask is not None else torch.ones(ids.shape[1], dtype=torch.bool)
        positions = (keys.long().cumsum(0) - 1).clamp(min=0).tolist()
        h = w["model.embed_tokens.weight"][ids[b]]
        for i in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{i}."
            x = ref_rms_norm(h, w[p + "input_layernorm.weight"], cfg["rms_norm_eps"])
            a = p + "self_attn."
            h = h + ref_attention(
                x,
                w[a + "q_proj.weight"],
                w[a + "k_proj.weight"],
                w[a + "v_proj.weight"],
                w[a + "o_proj.weight"],
                cfg["num_attention_heads"],
                cfg["num_key_value_heads"],
                cfg["rope_theta"],
                keys,
                positions,
                w[a + "q_proj.bias"],
                w[a + "k_proj.bias"],
                w[a + "v_proj.bias"],
            )
            x = ref_rms_norm(h, w[p + "post_attention_layernorm.weight"], cfg["rms_norm_eps"])
            gate, up = x @ w[p + "mlp.gate_proj.weight"].T, x @ w[p + "mlp.up_proj.weight"].T
            h = h + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
        h = ref_rms_norm(h, w["model.norm.weight"], cfg["rms_norm_eps"])
        outputs.append(h @ w["lm_head.weight"].T)
    return torch.stack(outputs)


# ----------------------------------------------------------------------------------------------------------------
# Loading the official layout without remote code


def test_registration_is_idempotent_and_maps_the_checkpoint_model_types():
    assert register_native_models() is True
    assert register_native_models() is True
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    assert CONFIG_MAPPING["llada"] is LLaDAConfig
    assert CONFIG_MAPPING["Dream"] is DreamConfig


@pytest.mark.parametrize("auto_class", [AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM])
def test_official_llada_layout_loads_without_remote_code(llada_folder, auto_class):
    folder, tensors = llada_folder
    config = AutoConfig.from_pretrained(folder)
    assert type(config) is LLaDAConfig
    assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers) == (32, 4, 2)
    model, info = auto_class.from_pretrained(folder, output_loading_info=True)
    assert type(model) is LLaDAModelLM
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    state = model.state_dict()
    assert set(state) == set(tensors)
    for name, tensor in tensors.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("auto_class", [AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM])
def test_official_dream_layout_loads_without_remote_code(dream_folder, auto_class):
    folder, tensors = dream_folder
    assert type(AutoConfig.from_pretrained(folder)) is DreamConfig
    model, info = auto_class.from_pretrained(folder, output_loading_info=True)
    assert type(model) is DreamModel
    assert model.config.model_type == "Dream"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    state = model.state_dict()
    assert set(state) == set(tensors)
    for name, tensor in tensors.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0, msg=name)


def test_trust_remote_code_true_still_builds_native_classes_when_registered(llada_folder):
    # transformers prefers explicitly registered classes over a config's auto_map; no .py files are needed
    model = AutoModel.from_pretrained(llada_folder[0], trust_remote_code=True)
    assert type(model) is LLaDAModelLM


def test_remote_code_path_is_used_when_native_registration_is_disabled(tmp_path):
    folder = tmp_path / "remote"
    folder.mkdir()
    config = dict(
        OFFICIAL_LLADA_CONFIG,
        auto_map={"AutoConfig": "cfg_remote.RemoteConfig", "AutoModel": "mod_remote.RemoteModel"},
    )
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "cfg_remote.py").write_text(
        "from transformers import PretrainedConfig\n\nclass RemoteConfig(PretrainedConfig):\n    model_type = 'llada'\n"
    )
    (folder / "mod_remote.py").write_text(
        textwrap.dedent(
            """
            import torch
            from transformers import PreTrainedModel
            from .cfg_remote import RemoteConfig

            class RemoteModel(PreTrainedModel):
                config_class = RemoteConfig
                def __init__(self, config):
                    super().__init__(config)
                    self.probe = torch.nn.Linear(1, 1)
                    self.post_init()
            """
        )
    )
    save_file({"probe.weight": torch.zeros(1, 1), "probe.bias": torch.zeros(1)}, str(folder / "model.safetensors"))
    script = textwrap.dedent(
        f"""
        import trl_diffpo
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True)
        print(type(model).__name__)
        """
    )
    env = dict(
        os.environ, TRL_DIFFPO_NATIVE_MODELS="0", HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules")
    )
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "RemoteModel"


# ----------------------------------------------------------------------------------------------------------------
# Equivalence with the reference forwards


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_llada_matches_reference_forward(llada_folder, attn_implementation):
    folder, tensors = llada_folder
    model = AutoModel.from_pretrained(folder, attn_implementation=attn_implementation).eval()
    ids = random_ids()
    with torch.no_grad():
        logits = model(ids).logits
    expected = ref_llada_logits(tensors, OFFICIAL_LLADA_CONFIG, ids)
    assert logits.shape == (2, SEQ_LEN, PADDED_VOCAB)
    torch.testing.assert_close(logits.double(), expected, rtol=1e-4, atol=ATOL)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_dream_matches_reference_forward(dream_folder, attn_implementation):
    folder, tensors = dream_folder
    model = AutoModel.from_pretrained(folder, attn_implementation=attn_implementation).eval()
    ids = random_ids()
    with torch.no_grad():
        logits = model(ids).logits
    expected = ref_dream_logits(tensors, OFFICIAL_DREAM_CONFIG, ids)
    assert logits.shape == (2, SEQ_LEN, VOCAB)
    torch.testing.assert_close(logits.double(), expected, rtol=1e-4, atol=ATOL)


@pytest.mark.parametrize(
    "attn_implementation",
    ["eager", "sdpa", pytest.param("flex_attention", marks=pytest.mark.slow)],  # flex compiles: ~15 s on CPU
)
def test_padded_batches_match_reference_with_key_mask(llada_folder, dream_folder, attn_implementation):
    ids = random_ids()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    ids[0, :3] = PAD_ID
    for (folder, tensors), reference, cfg in (
        (llada_folder, ref_llada_logits, OFFICIAL_LLADA_CONFIG),
        (dream_folder, ref_dream_logits, OFFICIAL_DREAM_CONFIG),
    ):
        model = AutoModel.from_pretrained(folder, attn_implementation=attn_implementation).eval()
        with torch.no_grad():
            logits = model(ids, attention_mask=mask).logits
        expected = reference(tensors, cfg, ids, key_mask=mask)
        real = mask.bool()
        torch.testing.assert_close(logits.double()[real], expected[real], rtol=1e-4, atol=ATOL)


# ----------------------------------------------------------------------------------------------------------------
# Round trip, tying, padding invariance, logit shift, hidden states


def tiny_llada(**overrides) -> LLaDAModelLM:
    config = LLaDAConfig(**{**{k: v for k, v in OFFICIAL_LLADA_CONFIG.items() if k != "auto_map"}, **overrides})
    torch.manual_seed(0)
    return LLaDAModelLM(config).eval()


def tiny_dream(**overrides) -> DreamModel:
    config = DreamConfig(**{**{k: v for k, v in OFFICIAL_DREAM_CONFIG.items() if k != "auto_map"}, **overrides})
    torch.manual_seed(0)
    return DreamModel(config).eval()


@pytest.mark.parametrize("build", [tiny_llada, tiny_dream])
def test_save_and_reload_round_trip(tmp_path, build):
    model = build()
    with torch.no_grad():
        for parameter in model.parameters():  # move away from the init so a skipped load would show
            parameter.add_(0.05 * torch.randn_like(parameter))
    model.save_pretrained(tmp_path)
    reloaded, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert type(reloaded) is type(model)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == model.config.model_type
    assert saved["architectures"] == [type(model).__name__]
    ids = random_ids()
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert check_checkpoint(tmp_path).ok


def test_llada_weight_tying_uses_the_embedding_and_saves_no_head(tmp_path):
    model = tiny_llada(weight_tying=True)
    head = model.get_output_embeddings()
    assert head.weight is model.get_input_embeddings().weight
    model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        assert "model.transformer.ff_out.weight" not in set(handle.keys())
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight
    ids = random_ids()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    report = check_checkpoint(tmp_path)
    assert report.ok and report.tied == ["model.transformer.ff_out.weight"]


@pytest.mark.parametrize("build", [tiny_llada, tiny_dream])
def test_left_padding_invariance(build):
    model = build()
    ids = random_ids(batch=1)
    pad = 3
    padded = torch.cat([torch.full((1, pad), PAD_ID), ids], dim=1)
    mask = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones_like(ids)], dim=1)
    with torch.no_grad():
        alone = model(ids).logits
        batched = model(
            torch.cat([padded, torch.cat([ids, ids[:, :pad]], 1)]),
            attention_mask=torch.cat([mask, torch.ones_like(mask)]),
        ).logits
    torch.testing.assert_close(batched[:1, pad:], alone, rtol=1e-5, atol=ATOL)


def test_dream_accepts_a_boolean_4d_mask_like_its_hub_generation_code():
    model = tiny_dream()
    ids = random_ids()
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    pairwise = mask.bool()[:, None, None, :].expand(-1, 1, SEQ_LEN, -1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        from_2d = model(ids, attention_mask=mask).logits
        from_4d = model(ids, attention_mask=pairwise, position_ids=positions).logits
    torch.testing.assert_close(from_4d, from_2d, rtol=1e-5, atol=ATOL)


def test_backbone_aligns_dream_logits_and_keeps_llada_logits():
    ids = random_ids()
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    dream, llada = tiny_dream(), tiny_llada()
    with torch.no_grad():
        dream_raw = dream(ids, attention_mask=mask).logits
        dream_aligned = get_backbone(dream)(ids, attention_mask=mask).logits
        llada_raw = llada(ids, attention_mask=mask).logits
        llada_aligned = get_backbone(llada)(ids, attention_mask=mask).logits
    assert get_backbone(dream).logits_shift and not get_backbone(llada).logits_shift
    assert get_backbone(dream).mask_token_id == MASK_ID == get_backbone(llada).mask_token_id
    # Dream: position i's prediction for token i comes from raw position i - 1
    torch.testing.assert_close(dream_aligned[:, 1:], dream_raw[:, :-1], rtol=0, atol=0)
    torch.testing.assert_close(llada_aligned, llada_raw, rtol=0, atol=0)


@pytest.mark.parametrize("build", [tiny_llada, tiny_dream])
def test_hidden_states_for_the_sampler_head(build):
    model = build()
    ids = random_ids()
    with torch.no_grad():
        outputs = model(ids, output_hidden_states=True)
        backbone = get_backbone(model)(ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    assert len(outputs.hidden_states) == model.config.num_hidden_layers + 1
    head = model.get_output_embeddings()
    torch.testing.assert_close(head(outputs.hidden_states[-1]), outputs.logits, rtol=0, atol=0)
    assert backbone.hidden_states.shape == (2, SEQ_LEN, 32)


@pytest.mark.parametrize("build", [tiny_llada, tiny_dream])
def test_gradient_checkpointing_gives_the_same_gradients(build):
    ids = random_ids()
    gradients = []
    for checkpointing in (False, True):
        model = build().train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(ids).logits.square().mean().backward()
        gradients.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert gradients[0].keys() == gradients[1].keys()
    for name in gradients[0]:
        torch.testing.assert_close(gradients[1][name], gradients[0][name], msg=name)


def test_kv_cache_is_refused():
    with pytest.raises(ValueError, match="no KV cache"):
        tiny_llada()(random_ids(), use_cache=True)


def test_unsupported_llada_variant_is_refused_with_the_field_named():
    with pytest.raises(ValueError, match="block_type='sequential'"):
        tiny_llada(block_type="sequential")
    with pytest.raises(ValueError, match="rope_scaling"):
        tiny_dream(rope_scaling={"rope_type": "linear", "factor": 2.0})


# ----------------------------------------------------------------------------------------------------------------
# LoRA


def test_llada_lora_targets_match_block_ff_out_but_not_the_head():
    import re

    assert re.fullmatch(LLADA_LORA_TARGET_MODULES, "model.transformer.blocks.0.ff_out")
    assert re.fullmatch(LLADA_LORA_TARGET_MODULES, "model.transformer.blocks.11.q_proj")
    assert not re.fullmatch(LLADA_LORA_TARGET_MODULES, "model.transformer.ff_out")
    assert not re.fullmatch(LLADA_LORA_TARGET_MODULES, "model.transformer.wte")
    assert lora_target_modules(tiny_llada()) == LLADA_LORA_TARGET_MODULES
    assert lora_target_modules(tiny_dream().config) == DREAM_LORA_TARGET_MODULES


@pytest.mark.parametrize(
    ("build", "targets", "head_name"),
    [
        (tiny_llada, LLADA_LORA_TARGET_MODULES, "model.transformer.ff_out"),
        (tiny_dream, DREAM_LORA_TARGET_MODULES, "lm_head"),
    ],
)
def test_lora_training_step_changes_only_adapters(build, targets, head_name):
    from peft import LoraConfig, get_peft_model

    base = build()
    base.gradient_checkpointing_enable()  # the usual memory setting for LoRA on the 7-8B models
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    peft_model = get_peft_model(base, lora).train()
    modules = dict(peft_model.base_model.model.named_modules())
    assert not hasattr(modules[head_name], "lora_A"), "the output head must not get an adapter"
    adapted = {name for name, module in modules.items() if hasattr(module, "lora_A")}
    layers = peft_model.base_model.model.config.num_hidden_layers
    assert len(adapted) == 7 * layers  # every attention and MLP projection of every block

    before = {name: p.detach().clone() for name, p in peft_model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
    ids = random_ids()
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    logits = get_backbone(peft_model)(ids, attention_mask=mask).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1) % VOCAB)
    loss.backward()
    optimizer.step()
    for name, parameter in peft_model.named_parameters():
        changed = not torch.equal(parameter.detach(), before[name])
        assert changed == ("lora_" in name), name


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint checker


def test_check_checkpoint_accepts_official_layouts_single_and_sharded(tmp_path, llada_folder, dream_folder):
    assert check_checkpoint(llada_folder[0]).ok
    assert check_checkpoint(dream_folder[0]).ok
    write_folder(tmp_path / "sharded", OFFICIAL_LLADA_CONFIG, llada_folder[1], shards=3)
    report = check_checkpoint(tmp_path / "sharded")
    assert report.ok and report.model_class == "LLaDAModelLM"
    assert report.num_found == report.num_expected == len(llada_folder[1])


def test_check_checkpoint_reports_missing_unexpected_and_wrong_shapes(tmp_path, llada_folder, capsys):
    tensors = dict(llada_folder[1])
    del tensors["model.transformer.blocks.1.up_proj.weight"]
    tensors["model.transformer.blocks.0.k_proj.weight"] = torch.zeros(32, 32)  # should be (16, 32): 2 kv heads
    tensors["model.transformer.extra_head.weight"] = torch.zeros(3)
    write_folder(tmp_path / "broken", OFFICIAL_LLADA_CONFIG, tensors, shards=2)
    report = check_checkpoint(tmp_path / "broken")
    assert not report.ok
    assert report.missing == ["model.transformer.blocks.1.up_proj.weight"]
    assert report.unexpected == ["model.transformer.extra_head.weight"]
    assert [(m.key, m.expected, m.found) for m in report.shape_mismatches] == [
        ("model.transformer.blocks.0.k_proj.weight", (16, 32), (32, 32))
    ]
    text = report.format()
    assert "blocks.1.up_proj.weight" in text and "expected [16, 32], found [32, 32]" in text

    assert main([str(tmp_path / "broken"), "--json"]) == 1
    printed = json.loads(capsys.readouterr().out)
    assert printed["missing"] == ["model.transformer.blocks.1.up_proj.weight"] and printed["ok"] is False
    assert main([str(llada_folder[0])]) == 0
    assert "OK" in capsys.readouterr().out


def test_check_checkpoint_errors_are_clear(tmp_path, capsys):
    with pytest.raises(CheckpointError, match="No config.json"):
        check_checkpoint(tmp_path)
    write_folder(tmp_path / "empty", OFFICIAL_DREAM_CONFIG, {"x": torch.zeros(1)})
    (tmp_path / "empty" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="Only safetensors"):
        check_checkpoint(tmp_path / "empty")
    assert main([str(tmp_path)]) == 2
    assert "No config.json" in capsys.readouterr().err


def test_cli_dispatches_check_checkpoint(llada_folder, capsys):
    from trl_diffpo.cli import main as cli_main

    assert cli_main(["check-checkpoint", str(llada_folder[0])]) == 0
    assert "LLaDAModelLM" in capsys.readouterr().out


@pytest.mark.parametrize("build", [tiny_llada, tiny_dream])
def test_generation_config_tuple_output_and_bfloat16(tmp_path, build):
    model = build()
    # TRL reads the pad / eos ids from `model.generation_config`
    assert model.generation_config.pad_token_id == PAD_ID
    assert model.generation_config.eos_token_id == 2
    ids = random_ids()
    with torch.no_grad():
        as_tuple = model(ids, return_dict=False)
        as_output = model(ids)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], as_output.logits, rtol=0, atol=0)

    model.save_pretrained(tmp_path)
    half = AutoModel.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert half.generation_config.pad_token_id == PAD_ID
    with torch.no_grad():
        logits = half(ids, attention_mask=torch.ones_like(ids)).logits
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), as_output.logits, rtol=0.05, atol=0.05)


# The full-size configs of the released checkpoints (the fields that decide names and shapes).
LLADA_8B = dict(
    OFFICIAL_LLADA_CONFIG,
    rope_theta=500000.0,
    rms_norm_eps=1e-05,
    d_model=4096,
    n_heads=32,
    n_kv_heads=32,
    n_layers=32,
    mlp_hidden_size=12288,
    vocab_size=126464,
    embedding_size=126464,
    max_sequence_length=4096,
    mask_token_id=126336,
    eos_token_id=126081,
    pad_token_id=126081,
)
DREAM_7B = dict(
    OFFICIAL_DREAM_CONFIG,
    rope_theta=1000000.0,
    rms_norm_eps=1e-06,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    vocab_size=152064,
    max_position_embeddings=131072,
    mask_token_id=151666,
    pad_token_id=151643,
    bos_token_id=151643,
    eos_token_id=151643,
)


@pytest.mark.parametrize(
    ("config_class", "model_class", "config", "official_shapes", "count"),
    [
        (LLaDAConfig, LLaDAModelLM, LLADA_8B, official_llada_shapes, 291),
        (DreamConfig, DreamModel, DREAM_7B, official_dream_shapes, 339),
    ],
)
def test_full_size_configs_build_the_released_names_and_shapes(
    config_class, model_class, config, official_shapes, count
):
    with torch.device("meta"):
        model = model_class(config_class(**{k: v for k, v in config.items() if k != "auto_map"}))
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert shapes == official_shapes(config)
    assert len(shapes) == count


@pytest.mark.parametrize("build", [tiny_llada, tiny_dream])
def test_trl_create_model_from_path_builds_native_classes(tmp_path, build, llada_folder, dream_folder):
    # TRL resolves architectures outside `transformers` through `config.auto_map`, then AutoModelForCausalLM
    from trl.trainer.utils import create_model_from_path

    model = build()
    model.save_pretrained(tmp_path)
    assert type(create_model_from_path(str(tmp_path))) is type(model)
    official = llada_folder[0] if isinstance(model, LLaDAModelLM) else dream_folder[0]
    assert type(create_model_from_path(str(official))) is type(model)


@pytest.mark.parametrize("build", [tiny_llada, tiny_dream])
def test_labels_are_refused_rather_than_silently_ignored(build):
    ids = random_ids()
    with pytest.raises(ValueError, match="no built-in loss"):
        build()(ids, labels=ids)


def test_dream_explicit_head_dim_other_than_hidden_over_heads():
    model = tiny_dream(head_dim=4)  # 4 heads of width 4 over a 32-wide residual stream
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (16, 32)
    assert model.model.layers[0].self_attn.o_proj.weight.shape == (32, 16)
    assert model(random_ids()).logits.shape == (2, SEQ_LEN, VOCAB)
    assert tiny_dream().config.head_dim == 8


def _trainer_reward(completions, **kwargs):
    return [float(sum(map(ord, text)) % 7) for text in completions]  # varies with the text: non-zero advantages


@pytest.mark.parametrize(("model_class", "use_lora"), [(LLaDAModelLM, True), (DreamModel, False)])
def test_diffpo_trainer_trains_native_models(char_tokenizer, tmp_path, model_class, use_lora):
    from datasets import Dataset
    from peft import LoraConfig

    from trl_diffpo import DiffpoConfig, DiffpoTrainer

    tok = char_tokenizer
    special = {
        "vocab_size": len(tok),
        "mask_token_id": tok.mask_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
    }
    if model_class is LLaDAModelLM:
        config = LLaDAConfig(d_model=32, n_heads=4, n_kv_heads=2, n_layers=1, mlp_hidden_size=48, embedding_size=None)
    else:
        config = DreamConfig(
            hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2
        )
    config.update(special)
    torch.manual_seed(0)
    model = model_class(config)
    args = DiffpoConfig(
        output_dir=str(tmp_path),
        bf16=False,
        report_to="none",
        save_strategy="no",
        max_completion_length=8,
        block_length=4,
        diffusion_steps=4,
        per_device_train_batch_size=4,
        num_generations=2,
        max_steps=1,
        learning_rate=1e-2,
        beta=0.04,
        seed=0,
        activation_checkpointing=True,
    )
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=lora_target_modules(model)) if use_lora else None
    trainer = DiffpoTrainer(
        model=model,
        reward_funcs=_trainer_reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["1+2=", "abc", "x", "9-1="]}),
        processing_class=tok,
        peft_config=peft_config,
    )
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    moved = {name for name, p in trainer.model.named_parameters() if not torch.equal(before[name], p)}
    assert moved
    assert all(math.isfinite(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry)
    if use_lora:
        assert all("lora_" in name for name in moved), moved


@pytest.mark.parametrize("build", [tiny_llada, tiny_dream])
def test_peft_causal_lm_task_type_wraps_native_models_and_generate_is_refused(build):
    """TRL's default LoRA config uses task_type CAUSAL_LM, whose wrapper reads `prepare_inputs_for_generation`."""
    from peft import LoraConfig, get_peft_model

    model = build()
    targets = lora_target_modules(model)
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=targets))
    logits = peft_model(input_ids=random_ids()).logits
    assert logits.shape[:2] == random_ids().shape
    with pytest.raises(NotImplementedError, match="diffusion_generate"):
        model.prepare_inputs_for_generation(random_ids())
