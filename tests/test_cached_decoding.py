"""Cached block decoding (`diffusion_generate(cache="prefix" | "dual")`) and logits only where needed.

The cached modes are an approximation for a bidirectional model, so their exactness is checked on a model whose
positions cannot attend to later ones (then the keys/values before a block cannot change while it is decoded, and the
block never sees the positions after it): prefix and dual must equal exact decoding. The cache's contents are checked
against keys/values recomputed independently from the projections, and every mode runs with padding, EOS, per-row
thresholds and rows in different blocks.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from test_generation import PROMPTS, CountingBackbone, build_peaked_model
from trl_diffpo import backbones
from trl_diffpo.backbones import get_backbone
from trl_diffpo.block_logits import BlockLogits
from trl_diffpo.generation import diffusion_generate
from trl_diffpo.kv_cache import CanvasKVCache
from trl_diffpo.models import DreamConfig, DreamModel, LLaDAConfig, LLaDAModelLM
from trl_diffpo.models.layers import apply_rotary, rotary_cos_sin
from trl_diffpo.tiny import build_char_tokenizer

GEN_LENGTH, BLOCK_LENGTH = 16, 4
ROW_THRESHOLDS = torch.tensor([0.0, 3.0, 1e9])  # EB gamma per row: the rows move through their blocks at their pace
CAUSAL_ATTENTION = "trl_diffpo_test_causal"


UPDATED_CACHE = {}  # transformers' attention functions do not receive the cache: the test's update hands it over


def causal_canvas_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention in which a position sees only canvas positions up to itself. Keys are the canvas slots (with a
    CanvasKVCache) or the inputs (without); the queries' canvas positions are the cache's window, else the inputs."""
    cache = kwargs.get("cache") or UPDATED_CACHE.pop("cache", None)
    num_queries, num_keys = query.shape[2], key.shape[2]
    query_positions = torch.arange(num_queries, device=query.device)[None].expand(query.shape[0], -1)
    if cache is not None and cache.window is not None:
        query_positions = cache.window
    blocked = torch.arange(num_keys, device=query.device)[None, None, :] > query_positions[:, :, None]
    causal = torch.zeros(blocked.shape, dtype=query.dtype).masked_fill_(blocked, torch.finfo(query.dtype).min)[:, None]
    if attention_mask is not None and attention_mask.dtype == torch.bool:  # a prepared boolean mask: True = attend
        attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype).masked_fill_(
            ~attention_mask, torch.finfo(query.dtype).min
        )
    attention_mask = causal if attention_mask is None else attention_mask[..., :num_keys] + causal
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(CAUSAL_ATTENTION, causal_canvas_attention)
AttentionMaskInterface.register(CAUSAL_ATTENTION, eager_mask)  # padding masks as for eager: additive floats


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def batch(tokenizer):
    return tokenizer(PROMPTS, return_tensors="pt", padding=True)


def native_model(kind, tokenizer, attention="sdpa", seed=0):
    """A tiny native LLaDA or Dream (float64, peaked random weights)."""
    special = {"mask_token_id": tokenizer.mask_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": 0}
    if kind == "llada":
        config = LLaDAConfig(
            d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=48, vocab_size=len(tokenizer),
            embedding_size=None, **special,
        )  # fmt: skip
        model_class = LLaDAModelLM
    else:
        config = DreamConfig(
            hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=len(tokenizer), **special,
        )  # fmt: skip
        model_class = DreamModel
    config._attn_implementation = attention
    torch.manual_seed(seed)
    model = model_class(config).to(torch.float64).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * 0.35)
    return model


def generate(model, batch, **options):
    options = {"gen_length": GEN_LENGTH, "block_length": BLOCK_LENGTH, **options}
    return diffusion_generate(model, batch.input_ids, batch.attention_mask, **options)


def assert_same_decoding(result, expected, atol=1e-6):
    assert torch.equal(result.sequences, expected.sequences)
    assert torch.equal(result.unmask_step, expected.unmask_step)
    assert torch.equal(result.nfe, expected.nfe)
    assert torch.equal(result.completion_mask, expected.completion_mask)
    torch.testing.assert_close(result.logprobs, expected.logprobs, atol=atol, rtol=0)


SAMPLER_OPTIONS = {
    "random": {"sampler": "random", "steps": 8},
    "low_confidence": {"sampler": "low_confidence", "steps": 8},
    "entropy_bounded": {"sampler": "entropy_bounded", "threshold": ROW_THRESHOLDS},
    "confidence_threshold": {"sampler": "confidence_threshold", "threshold": torch.tensor([1.0, 0.3, 0.05])},
}


@pytest.mark.parametrize("cache_refresh", [None, 2])
@pytest.mark.parametrize("sampler", list(SAMPLER_OPTIONS))
@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_cached_decoding_is_exact_when_positions_cannot_see_later_ones(
    tokenizer, batch, kind, cache, sampler, cache_refresh
):
    """Padding, per-row thresholds (rows in different blocks), sampling at a temperature and EOS: all of it equal."""
    model = native_model(kind, tokenizer, attention=CAUSAL_ATTENTION)
    eos = tokenizer.convert_tokens_to_ids("7")
    options = {**SAMPLER_OPTIONS[sampler], "temperature": 0.8, "eos_token_id": eos}
    exact = generate(model, batch, generator=torch.Generator().manual_seed(0), **options)
    cached = generate(
        model, batch, generator=torch.Generator().manual_seed(0), cache=cache, cache_refresh=cache_refresh, **options
    )
    assert_same_decoding(cached, exact)
    if "threshold" in SAMPLER_OPTIONS[sampler]:
        assert len(set(exact.nfe.tolist())) > 1  # the rows really moved at different paces


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_cached_decoding_stops_at_eos_like_exact_decoding(tokenizer, batch, kind, cache):
    model = native_model(kind, tokenizer, attention=CAUSAL_ATTENTION)
    options = {"sampler": "entropy_bounded", "threshold": ROW_THRESHOLDS}
    first_half = generate(model, batch, **options).completion_ids[:, : GEN_LENGTH // 2].flatten().tolist()
    eos = Counter(first_half).most_common(1)[0][0]  # the token this model writes most: the early stop must happen
    exact = generate(model, batch, eos_token_id=[tokenizer.eos_token_id, eos], **options)
    assert not exact.completion_mask.all()
    assert_same_decoding(
        generate(model, batch, eos_token_id=[tokenizer.eos_token_id, eos], cache=cache, **options), exact
    )


def test_cached_keys_and_values_equal_a_full_forward_at_the_block_start(tokenizer, batch):
    """After the refresh forward at a block start, every layer's stored keys/values equal keys/values recomputed from
    that layer's projections (hooks on k_proj / v_proj, RoPE at the real-token positions) of a plain forward."""
    model = native_model("llada", tokenizer)
    backbone = get_backbone(model)
    mask_id = tokenizer.mask_token_id
    prompt_length = batch.input_ids.shape[1]
    canvas = torch.cat([batch.input_ids, torch.full((len(PROMPTS), GEN_LENGTH), mask_id)], dim=1)
    canvas[:, prompt_length : prompt_length + 4] = torch.tensor([10, 11, 12, 13])  # block 0 decoded: block 1 starts
    full_mask = torch.cat([batch.attention_mask, torch.ones(len(PROMPTS), GEN_LENGTH, dtype=torch.long)], dim=1)
    block_logits = BlockLogits(backbone, "dual", None, len(PROMPTS), prompt_length, BLOCK_LENGTH, canvas.device)
    row_block, step = torch.ones(len(PROMPTS), dtype=torch.long), torch.zeros(len(PROMPTS), dtype=torch.long)
    block_logits(block_logits.plan(row_block, step), None, canvas, full_mask, row_block, False)

    projections = {}
    hooks = [
        getattr(block, name).register_forward_hook(
            lambda module, args, output, key=(index, name): projections.__setitem__(key, output)
        )
        for index, block in enumerate(model.model.transformer.blocks)
        for name in ("k_proj", "v_proj")
    ]
    with torch.no_grad():
        plain = backbone(canvas, full_mask).logits
    for hook in hooks:
        hook.remove()
    config = model.config
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    cos, sin = rotary_cos_sin(positions, config.head_dim, config.rope_theta)
    for index in range(config.n_layers):
        shape = (len(PROMPTS), canvas.shape[1], -1, config.head_dim)
        keys = apply_rotary(projections[index, "k_proj"].view(shape).transpose(1, 2).float(), cos, sin)
        values = projections[index, "v_proj"].view(shape).transpose(1, 2)
        stored_keys, stored_values = block_logits.kv_cache.layer(index)
        torch.testing.assert_close(stored_keys, keys.to(stored_keys.dtype))
        torch.testing.assert_close(stored_values, values)
    # and the refresh forward's block logits are those of the plain forward
    logits, _ = block_logits(block_logits.plan(row_block, step), None, canvas, full_mask, row_block, False)
    start = prompt_length + BLOCK_LENGTH
    torch.testing.assert_close(logits, plain[:, start : start + BLOCK_LENGTH])


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_transformers_models_cache_like_the_native_path(tokenizer, batch, architecture, attention, monkeypatch):
    """transformers' Llama / Qwen2 / Qwen3 go through their own attention with the cache object; with causal attention
    injected the same way the cached modes are exact there too, and with bidirectional attention they run."""
    model = build_peaked_model(tokenizer, architecture=architecture, dtype=torch.float64)
    model.config._attn_implementation = attention
    options = {"sampler": "entropy_bounded", "threshold": ROW_THRESHOLDS}
    bidirectional = {cache: generate(model, batch, cache=cache, **options) for cache in ("none", "prefix", "dual")}
    for output in bidirectional.values():
        assert not (output.sequences == tokenizer.mask_token_id).any()
    model.config._attn_implementation = CAUSAL_ATTENTION
    monkeypatch.setattr(backbones, "CACHEABLE_ATTENTION", backbones.CACHEABLE_ATTENTION | {CAUSAL_ATTENTION})
    update = CanvasKVCache.update

    def update_and_hand_over(self, *args, **kwargs):
        UPDATED_CACHE["cache"] = self
        return update(self, *args, **kwargs)

    monkeypatch.setattr(CanvasKVCache, "update", update_and_hand_over)
    exact = generate(model, batch, **options)
    for cache in ("prefix", "dual"):
        assert_same_decoding(generate(model, batch, cache=cache, **options), exact)


def test_rows_in_different_blocks_cost_extra_forward_calls_not_extra_nfe(tokenizer, batch):
    model = native_model("llada", tokenizer, attention=CAUSAL_ATTENTION)
    counts = {}
    for cache in ("none", "prefix", "dual"):
        backbone = CountingBackbone(model, mask_token_id=tokenizer.mask_token_id)
        output = generate(backbone, batch, sampler="entropy_bounded", threshold=ROW_THRESHOLDS, cache=cache)
        counts[cache] = (len(backbone.rows_per_forward), sum(backbone.rows_per_forward), int(output.nfe.sum()))
    for _, rows_forwarded, nfe in counts.values():
        assert rows_forwarded == nfe  # every row takes exactly one forward per step, whatever the mode
    steps = counts["none"][0]
    assert counts["dual"][0] > steps and counts["prefix"][0] >= counts["dual"][0]


def test_logits_only_for_the_current_block(tokenizer, batch):
    """The native head projects only the requested positions, and decoding equals decoding with full logits."""
    model = native_model("llada", tokenizer)
    shapes = []
    hook = model.model.transformer.ff_out.register_forward_hook(lambda m, args, out: shapes.append(tuple(out.shape)))
    output = generate(model, batch, sampler="low_confidence", steps=8)
    hook.remove()
    assert {shape[:2] for shape in shapes} == {(len(PROMPTS), BLOCK_LENGTH)}
    backbone = get_backbone(model)
    positions = torch.tensor([[0, 5], [7, 2], [3, 3]])
    canvas = torch.cat([batch.input_ids, torch.full((3, 4), tokenizer.mask_token_id)], dim=1)
    full = backbone(canvas, None).logits
    kept = backbone(canvas, None, logits_positions=positions).logits
    torch.testing.assert_close(kept, full.gather(1, positions[..., None].expand(-1, -1, full.shape[-1])))
    assert not (output.sequences == tokenizer.mask_token_id).any()


@pytest.mark.parametrize("architecture", ["llama", "bert"])
def test_logits_positions_for_transformers_models_and_shifted_models(tokenizer, batch, architecture):
    model = build_peaked_model(tokenizer, architecture=architecture, dtype=torch.float64)
    positions = torch.tensor([[0, 5], [7, 2], [3, 3]])
    dream = native_model("dream", tokenizer)
    for backbone in (get_backbone(model), get_backbone(dream)):
        full = backbone(batch.input_ids, batch.attention_mask).logits
        kept = backbone(batch.input_ids, batch.attention_mask, logits_positions=positions).logits
        torch.testing.assert_close(kept, full.gather(1, positions[..., None].expand(-1, -1, full.shape[-1])))


def test_unsupported_models_and_options_are_clear_errors(tokenizer, batch):
    bert = build_peaked_model(tokenizer, architecture="bert", dtype=torch.float32)
    with pytest.raises(ValueError, match="cache='dual' is not supported for BertForMaskedLM"):
        generate(bert, batch, sampler="low_confidence", steps=8, cache="dual")
    llama = build_peaked_model(tokenizer, architecture="llama", dtype=torch.float32)
    llama.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="attn_implementation='flex_attention'"):
        generate(llama, batch, sampler="low_confidence", steps=8, cache="prefix")
    llama.config._attn_implementation = "sdpa"
    with pytest.raises(ValueError, match="cache='full' is not supported"):
        generate(llama, batch, sampler="low_confidence", steps=8, cache="full")
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match="cache_refresh"):
            generate(llama, batch, sampler="low_confidence", steps=8, cache="dual", cache_refresh=bad)


def test_a_window_forward_before_a_full_one_is_an_error():
    cache = CanvasKVCache(2).reuse(None, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(RuntimeError, match="before any full forward"):
        cache.update(torch.zeros(2, 1, 3, 4), torch.zeros(2, 1, 3, 4), 0)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_the_trainer_trains_with_cached_rollouts(tokenizer, tmp_path, monkeypatch, cache):
    import trl_diffpo.trainer_rollouts as trainer_module  # where the rollouts call diffusion_generate
    from test_trainer import changed, logged, make_trainer, snapshot

    seen = []
    real_generate = trainer_module.diffusion_generate

    def recording_generate(*args, **kwargs):
        seen.append((kwargs["cache"], kwargs["cache_refresh"]))
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "diffusion_generate", recording_generate)
    trainer = make_trainer(
        tokenizer, tmp_path, max_steps=1, sampler="entropy_bounded", rollout_cache=cache, rollout_cache_refresh=2
    )
    before = snapshot(trainer.model)
    trainer.train()
    assert seen and set(seen) == {(cache, 2)}
    assert changed(before, trainer.model)
    for key in ("loss", "diffpo/logp_gap/mean", "diffpo/is_weight/clamped_frac"):
        assert logged(trainer, key) and all(math.isfinite(v) for v in logged(trainer, key)), key


@pytest.mark.parametrize(
    ("overrides", "named"),
    [({"rollout_cache": "full"}, "rollout_cache"), ({"rollout_cache": "dual", "rollout_cache_refresh": 0}, "refresh")],
)
def test_config_refuses_bad_cache_options(tmp_path, overrides, named):
    from test_trainer import tiny_args

    with pytest.raises(ValueError, match=named):
        tiny_args(tmp_path, **overrides)


def test_benchmark_compares_cache_modes_in_one_process(capsys):
    from test_generation import load_benchmark

    bench = load_benchmark()
    argv = (
        "--device cpu --size tiny --batch 2 --prompt-len 4 --gen-len 8 --block 4 --repeats 1 --samplers low_confidence"
    )
    results = bench.main([*argv.split(), "--cache", "none", "prefix", "dual", "full-logits"])
    assert [result.cache for result in results] == ["none", "prefix", "dual", "full-logits"]
    assert results[0].ratio == 1.0 and all(result.generate_s > 0 and result.forward_calls == 4 for result in results)
    assert "| low_confidence | dual | 4.0 | 4 |" in capsys.readouterr().out
    assert bench.main([*argv.split(), "--cache", "dual"])[0].cache == "dual"  # a single mode name works too


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_threshold_fn_gets_the_same_prompt_state_with_a_cache(tokenizer, batch, cache):
    """The first step is a full forward in every mode: the sampler head sees the same pooled prompt state."""
    model = native_model("llada", tokenizer, attention=CAUSAL_ATTENTION)
    received = {}

    def threshold_fn(prompt_hidden, cache_mode):
        received[cache_mode] = prompt_hidden.clone()
        return ROW_THRESHOLDS

    exact = generate(model, batch, sampler="entropy_bounded", threshold_fn=lambda h: threshold_fn(h, "none"))
    cached = generate(
        model, batch, sampler="entropy_bounded", threshold_fn=lambda h: threshold_fn(h, cache), cache=cache
    )
    torch.testing.assert_close(received[cache], received["none"], atol=0, rtol=0)
    assert_same_decoding(cached, exact)
    torch.testing.assert_close(cached.prompt_hidden, exact.prompt_hidden, atol=0, rtol=0)


def test_cache_agreement_script_runs_on_a_saved_demo_shaped_model(tokenizer, tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    from trl_diffpo.tiny import build_tiny_model

    build_tiny_model(tokenizer, hidden_size=32, num_layers=1).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "cache_agreement.py"
    spec = importlib.util.spec_from_file_location("cache_agreement", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rows = script.main([str(tmp_path), "--block", "5", "--thresholds", "1.0", "--num-held-out", "8"])
    assert [row["cache"] for row in rows] == ["none", "prefix", "dual"]
    assert rows[0]["token_agreement"] == 1.0 and all(0 <= row["token_agreement"] <= 1 for row in rows)
    assert "| dual | 1.0 |" in capsys.readouterr().out
