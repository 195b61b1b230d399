"""The KL-per-timestep statistics against a slow, obviously-correct loop (one latent, one forward, one token at a time)."""

import math

import pytest
import torch

from trl_diffpo.ablation.kl_per_step import aggregate_by_step, trajectory_token_stats, write_kl_per_step
from trl_diffpo.generation import diffusion_generate
from trl_diffpo.sft import left_pad, tokenize_prompts
from trl_diffpo.tiny import build_char_tokenizer, build_tiny_model

GEN_LENGTH, BLOCK_LENGTH, TEMPERATURE = 8, 4, 1.0


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=3).eval()
    input_ids, attention_mask = left_pad(
        tokenize_prompts(tokenizer, ["12", "3401", "0", "221"]), tokenizer.pad_token_id
    )
    return tokenizer, model, input_ids, attention_mask


def _reference(model, tokenizer, input_ids, attention_mask, output):
    """Per token, in row-major order: (step, kl_mf, kl_2mf, gap_mf, gap_2mf), by explicit loops in float64."""
    mask_id = tokenizer.mask_token_id
    prompt_length = input_ids.shape[1]
    rows = []
    for b in range(input_ids.shape[0]):
        steps_of_row = int(output.nfe[b])
        tokens = output.sequences[b, prompt_length:].tolist()
        commit = output.unmask_step[b].tolist()
        cache = {}

        def log_probs_at(latent_step, position, b=b, tokens=tokens, commit=commit, cache=cache):
            if latent_step not in cache:
                completion = [tok if commit[j] <= latent_step else mask_id for j, tok in enumerate(tokens)]
                ids = torch.tensor([input_ids[b].tolist() + completion])
                attention = torch.tensor([attention_mask[b].tolist() + [1] * GEN_LENGTH])
                with torch.no_grad():
                    logits = model(input_ids=ids, attention_mask=attention).logits[0, prompt_length:].double()
                cache[latent_step] = logits
            logits = cache[latent_step][position] / TEMPERATURE
            logits[mask_id] = -math.inf
            return torch.log_softmax(logits, -1)

        def kl(p_log, q_log):
            return sum(
                math.exp(p) * (p - q) for p, q in zip(p_log.tolist(), q_log.tolist(), strict=True) if p > -math.inf
            )

        for position in range(GEN_LENGTH):
            if not output.completion_mask[b, position]:
                continue
            step = commit[position]
            true = log_probs_at(step - 1, position)
            behaviour = float(output.logprobs[b, position])
            token = tokens[position]
            scored_on = [tau if tau < step else 0 for tau in range(steps_of_row)]  # two-stage: z_tau if tau < t
            kl_two = sum(kl(true, log_probs_at(s, position)) for s in scored_on) / steps_of_row
            logp_two = sum(float(log_probs_at(s, position)[token]) for s in scored_on) / steps_of_row
            rows.append(
                (
                    step,
                    kl(true, log_probs_at(0, position)),
                    kl_two,
                    behaviour - float(log_probs_at(0, position)[token]),
                    behaviour - logp_two,
                )
            )
    return rows


@pytest.mark.parametrize(
    "sampler,options", [("entropy_bounded", {"threshold": 0.8}), ("low_confidence", {"steps": 4})]
)
def test_token_stats_match_the_reference_loop(tiny, sampler, options):
    tokenizer, model, input_ids, attention_mask = tiny
    common = dict(
        gen_length=GEN_LENGTH, block_length=BLOCK_LENGTH, sampler=sampler, temperature=TEMPERATURE, **options
    )
    stats = trajectory_token_stats(
        model,
        input_ids,
        attention_mask,
        generator=torch.Generator().manual_seed(11),
        eos_token_id=tokenizer.eos_token_id,
        **common,
    )
    output = diffusion_generate(  # the same trajectories: same generator seed
        model,
        input_ids,
        attention_mask,
        generator=torch.Generator().manual_seed(11),
        eos_token_id=tokenizer.eos_token_id,
        **common,
    )
    reference = _reference(model, tokenizer, input_ids, attention_mask, output)
    assert len(reference) == len(stats["step"]) > 0
    assert int(output.nfe.max()) > 1  # several steps, so two-stage and mean-field differ
    expected = torch.tensor(reference, dtype=torch.float64)
    assert stats["step"].tolist() == [int(s) for s in expected[:, 0].tolist()]
    for column, name in enumerate(("kl_mean_field", "kl_two_stage", "logp_gap_mean_field", "logp_gap_two_stage"), 1):
        torch.testing.assert_close(stats[name].double(), expected[:, column], atol=2e-5, rtol=1e-4, msg=name)
    assert stats["true_vs_behaviour"].abs().max() < 1e-4  # the recomputed true conditional is the sampler's
    assert (stats["kl_mean_field"] > 1e-6).any()  # not a vacuous comparison of zeros
    first_step = stats["step"] == 1  # committed from z_0: both surrogates are the true conditional
    assert first_step.any() and stats["kl_mean_field"][first_step].abs().max() < 1e-5

    report = aggregate_by_step(stats)
    for index, step in enumerate(report["step"]):
        chosen = [row for row in reference if row[0] == step]
        assert report["num_tokens"][index] == len(chosen)
        assert report["kl_two_stage"][index] == pytest.approx(sum(r[2] for r in chosen) / len(chosen), abs=2e-5)
    assert report["overall"]["num_tokens"] == len(reference)


def test_write_kl_per_step(tmp_path, tiny):
    tokenizer, model, input_ids, attention_mask = tiny
    stats = trajectory_token_stats(
        model,
        input_ids,
        attention_mask,
        gen_length=GEN_LENGTH,
        block_length=BLOCK_LENGTH,
        threshold=0.8,
        generator=torch.Generator().manual_seed(0),
    )
    paths = write_kl_per_step(aggregate_by_step(stats), str(tmp_path))
    assert open(paths["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert '"kl_two_stage"' in open(paths["json"]).read()
