"""K = T, the hard case: stage starts ``{0..T-1}`` reproduce the behaviour log-probs of ``diffusion_generate``.

The surrogate with a stage start at every step scores each committed token on the very latent the sampler saw, so its
log-prob must equal the behaviour log-prob recorded at sampling (IS weight 1). ``test_likelihood.py`` checks this for
one token per step on one-layer models; here the trajectories are the ones where a bookkeeping slip would show:

- deeper models of three families: a 4-layer bidirectional Llama (:mod:`trl_diffpo.tiny`), a 3-layer native LLaDA
  with grouped-query attention and a 3-layer native Dream (logits shifted one position);
- up to 8 tokens per step: fixed schedules with fewer steps than tokens (2 steps for 16 tokens: 8 per step; 6 steps:
  3, 3, 2 per block) and adaptive thresholds, per row, that commit anything from 1 to a whole block at once;
- early stops: the model is made to end its answer at completion position 5 for prompts that end in ``!`` (rows
  stop in the first block, their second block is never decoded), plus a mild EOS bias elsewhere for EOS at varied
  positions; the tail after the first EOS that *was* decoded is compared too (only positions filled at the stop,
  which no distribution committed, are left out);
- left padding (prompts of different lengths), rows that leave the batch early (later forwards carry fewer rows);
- all four samplers, temperature 0 and > 0, in float32 and under CPU bf16 autocast.

bf16 tolerance (``BF16_ATOL = 0.07``): under ``torch.autocast("cpu", bfloat16)`` the logits are bf16 values (8
significant bits). The sampler's forward and the surrogate's forward of the same latent differ only in batch shape
(rows leave the decoding batch; the surrogate batches (row, stage) latents), so they disagree only where a kernel
rounds differently for a different shape. Outside the biased EOS column the logits stay below 16 in magnitude
(checked; measured max 8.4), where one bf16 ulp is at most ``2**-4 = 0.0625``, and a log-softmax value moves by at
most about one ulp when its inputs do (the EOS logit biased to ~48, whose ulp is 0.25, only appears where EOS has
probability ~1 and moves nothing). 0.07 admits a one-ulp disagreement of the logits and nothing larger (a latent one
step stale misses by more than 0.7, last test). On this CPU the
two agree bit for bit (measured difference 0, as in float32); GPU GEMMs choose tiles by shape and need not.
"""

import itertools
import math

import pytest
import torch

from trl_diffpo.backbones import get_backbone
from trl_diffpo.generation import diffusion_generate
from trl_diffpo.likelihood import K_STAGE, draw_surrogate_randomness, surrogate_log_probs
from trl_diffpo.tiny import build_char_tokenizer, build_tiny_model

GEN_LENGTH = 16
BLOCK_LENGTH = 8
PROMPTS = ("1+2=", "hello world:", "stop!", "7", "abc, then stop now!")
STOP_POSITION = 5  # completion position at which prompts ending in "!" get their EOS
STOP_BIAS = 40.0  # EOS logit bias there: EOS is certain (greedy or sampled) and the most confident candidate
EOS_BIAS = 4.0  # mild EOS bias at every completion position: natural EOS at varied positions
LOGIT_SCALE = 20.0  # sharpen the random output head: confidences spread over (0, 1), entropies over (0, log V)
FLOAT32_ATOL = 1e-5
BF16_ATOL = 0.07  # one bf16 ulp of a logit in [8, 16) is 0.0625: see the module docstring
BF16_MAX_LOGIT = 16.0  # the logits (EOS column aside) stay below it, so BF16_ATOL covers a one-ulp disagreement

# (sampler, steps, per-row thresholds): fixed schedules with fewer steps than tokens, adaptive thresholds from
# one-token-per-step to whole-block steps (confidence in (0, 1], EB gamma in nats; one per prompt row).
CASES = {  # name: (sampler, steps, thresholds, most tokens committed in one step by a row)
    "low_confidence-8-per-step": ("low_confidence", 2, None, 8),
    "low_confidence-3-3-2": ("low_confidence", 6, None, 3),
    "random-3-3-2": ("random", 6, None, 3),
    "confidence_threshold": ("confidence_threshold", None, [0.05, 0.3, 0.6, 0.9, 1.0], None),
    "entropy_bounded": ("entropy_bounded", None, [0.3, 1.0, 3.0, 10.0, 100.0], None),
}
TEMPERATURES = (0.0, 0.9)


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def _special_ids(tokenizer) -> dict:
    return {
        "vocab_size": len(tokenizer),
        "mask_token_id": tokenizer.mask_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }


def _build(family: str, tokenizer):
    from trl_diffpo.models import DreamConfig, DreamModel, LLaDAConfig, LLaDAModelLM

    if family == "llama":
        return build_tiny_model(tokenizer, "llama", hidden_size=32, num_layers=4, seed=3)
    torch.manual_seed(0)
    if family == "llada":
        config = LLaDAConfig(
            d_model=32, n_heads=4, n_kv_heads=2, n_layers=3, mlp_hidden_size=48, max_sequence_length=128,
            embedding_size=len(tokenizer), **_special_ids(tokenizer),
        )  # fmt: skip
        return LLaDAModelLM(config).eval()
    config = DreamConfig(
        hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3, intermediate_size=48,
        max_position_embeddings=128, **_special_ids(tokenizer),
    )  # fmt: skip
    return DreamModel(config).eval()


def _add_eos_behaviour(model, tokenizer, prompt_length: int) -> None:
    """Sharpen the output head and add the EOS biases (a forward hook: part of the model for both forwards)."""
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(LOGIT_SCALE)
    eos, stop_char = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("!")
    shift = 1 if get_backbone(model).logits_shift else 0  # Dream: output position i predicts token i + 1

    def add_bias(module, args, kwargs, output):
        input_ids = kwargs["input_ids"]
        stops = input_ids[:, prompt_length - 1] == stop_char  # left padding: the prompt's last token is last
        bias = torch.zeros(input_ids.shape[0], input_ids.shape[1], dtype=output.logits.dtype)
        bias[:, prompt_length - shift : input_ids.shape[1] - shift] = EOS_BIAS
        bias[stops, prompt_length + STOP_POSITION - shift] += STOP_BIAS
        keep = kwargs.get("logits_to_keep")
        if isinstance(keep, torch.Tensor) and keep.dim() == 2:  # logits of the requested positions only
            bias = bias.gather(1, keep.to(bias.device))
        logits = output.logits.clone()
        logits[..., eos] += bias
        output.logits = logits
        return output

    model.register_forward_hook(add_bias, with_kwargs=True)


@pytest.fixture(scope="module", params=["llama", "llada", "dream"])
def model(request, tokenizer):
    model = _build(request.param, tokenizer)
    _add_eos_behaviour(model, tokenizer, _prompts(tokenizer)[0].shape[1])
    return model


def _prompts(tokenizer):
    batch = tokenizer(list(PROMPTS), return_tensors="pt", padding=True)
    return batch["input_ids"], batch["attention_mask"]


def _decoded_positions(rollout, eos_token_id: int) -> torch.Tensor:
    """``(batch, gen_length)`` positions some distribution committed: all but those filled with EOS at an early stop
    (after the first EOS, at the row's last step, behaviour log-prob exactly 0)."""
    completion = rollout.completion_ids
    first_eos = (completion == eos_token_id).int().argmax(-1)
    after_first = torch.arange(completion.shape[1])[None, :] > first_eos[:, None]
    filled = after_first & (completion == eos_token_id) & (rollout.unmask_step == rollout.nfe[:, None])
    return ~(filled & (rollout.logprobs == 0))


def _check_k_equals_t(model, tokenizer, case, temperature, bf16):
    sampler, steps, thresholds, most_per_step = CASES[case]
    input_ids, prompt_mask = _prompts(tokenizer)
    backbone = get_backbone(model)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        rollout = diffusion_generate(
            backbone, input_ids, prompt_mask, gen_length=GEN_LENGTH, block_length=BLOCK_LENGTH, sampler=sampler,
            steps=steps, threshold=None if thresholds is None else torch.tensor(thresholds), temperature=temperature,
            generator=torch.Generator().manual_seed(0), eos_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
        draws = draw_surrogate_randomness(prompt_mask, rollout.nfe, likelihood=K_STAGE, num_stages=GEN_LENGTH)
        stage_starts = draws.stage_starts[:, 0]
        for row, steps_taken in enumerate(rollout.nfe.tolist()):  # K = T: a stage starts at every step
            assert set(stage_starts[row].tolist()) == set(range(steps_taken))
        with torch.no_grad():
            logps, _ = surrogate_log_probs(
                backbone, rollout.sequences, prompt_mask, rollout.unmask_step, draws.prompt_noise[:, 0],
                stage_starts, temperature=temperature,
            )  # fmt: skip
            logits = backbone(rollout.sequences, None).logits
    assert logits.dtype == (torch.bfloat16 if bf16 else torch.float32)

    decoded = _decoded_positions(rollout, tokenizer.eos_token_id)
    if bf16:
        other_logits = torch.cat(
            [logits[..., : tokenizer.eos_token_id], logits[..., tokenizer.eos_token_id + 1 :]], -1
        )
        assert other_logits.abs().max() < BF16_MAX_LOGIT
    atol = BF16_ATOL if bf16 else FLOAT32_ATOL
    torch.testing.assert_close(logps[decoded], rollout.logprobs[decoded], atol=atol, rtol=0)

    # What the trajectory covered (so that the equality above is about the hard case).
    assert (prompt_mask == 0).any(), "the batch must be left-padded"
    stop_rows = input_ids[:, -1] == tokenizer.convert_tokens_to_ids("!")
    assert stop_rows.sum() == 2 and not decoded[stop_rows, BLOCK_LENGTH:].any(), "rows ending in '!' stop early"
    if steps is not None:
        assert (rollout.nfe[stop_rows] <= steps // 2).all(), "an early stop saves the second block's steps"
    tokens_per_step = [torch.bincount(rollout.unmask_step[row][decoded[row]]) for row in range(len(PROMPTS))]
    most = max(int(counts.max()) for counts in tokens_per_step)
    if most_per_step is not None:
        assert most == most_per_step
    else:
        assert most > 1, "the adaptive thresholds must commit several tokens in some step"
    return rollout, decoded


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("case", CASES)
def test_k_equals_t_reproduces_behaviour_log_probs(model, tokenizer, case, temperature):
    rollout, decoded = _check_k_equals_t(model, tokenizer, case, temperature, bf16=False)
    assert (decoded & ~rollout.completion_mask).any(), "some decoded tokens after the first EOS must be compared"


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize(
    "case", ["low_confidence-8-per-step", "random-3-3-2", "confidence_threshold", "entropy_bounded"]
)
def test_k_equals_t_under_bf16_autocast(tokenizer, case, temperature):
    model = _build("llada", tokenizer)
    _add_eos_behaviour(model, tokenizer, _prompts(tokenizer)[0].shape[1])
    _check_k_equals_t(model, tokenizer, case, temperature, bf16=True)


def test_a_latent_one_step_stale_breaks_the_equality(tokenizer):
    """Sanity: scoring the tokens of step ``s`` on ``z_{s-2}`` instead of ``z_{s-1}`` (stage starts ``{0, 0, 1, ...,
    T-2}``) must miss the behaviour log-probs by far more than the bf16 tolerance, so the tests above can fail."""
    model = _build("llada", tokenizer)
    _add_eos_behaviour(model, tokenizer, _prompts(tokenizer)[0].shape[1])
    input_ids, prompt_mask = _prompts(tokenizer)
    rollout = diffusion_generate(
        model, input_ids, prompt_mask, gen_length=GEN_LENGTH, block_length=BLOCK_LENGTH, sampler="entropy_bounded",
        threshold=torch.tensor(CASES["entropy_bounded"][2]), eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    draws = draw_surrogate_randomness(prompt_mask, rollout.nfe, likelihood=K_STAGE, num_stages=GEN_LENGTH)
    exact_starts = draws.stage_starts[:, 0]
    scores = {}
    for name, stage_starts in {"exact": exact_starts, "stale": (exact_starts - 1).clamp(min=0)}.items():
        with torch.no_grad():
            scores[name], _ = surrogate_log_probs(
                get_backbone(model), rollout.sequences, prompt_mask, rollout.unmask_step, draws.prompt_noise[:, 0],
                stage_starts,
            )  # fmt: skip
    decoded = _decoded_positions(rollout, tokenizer.eos_token_id)
    torch.testing.assert_close(scores["exact"][decoded], rollout.logprobs[decoded], atol=FLOAT32_ATOL, rtol=0)
    assert (scores["stale"] - rollout.logprobs)[decoded].abs().max() > 10 * BF16_ATOL


def _one_step_probabilities(distributions, rule):
    """Enumerate every joint proposal of one sampler step: ``{(S, y_S): P}`` where ``S`` is the chosen position set.

    ``distributions``: ``(positions, vocab)`` proposal distributions ``q_l`` (independent across positions);
    ``rule(confidence, entropy) -> (positions,) bool`` the selection, given the drawn values' confidences."""
    positions, vocab = distributions.shape
    entropy = -(distributions * distributions.log()).sum(-1)
    outcomes: dict = {}
    for values in itertools.product(range(vocab), repeat=positions):
        values = torch.tensor(values)
        confidence = distributions[torch.arange(positions), values]
        chosen = rule(confidence, entropy)
        key = (tuple(chosen.nonzero()[:, 0].tolist()), tuple(values[chosen].tolist()))
        outcomes[key] = outcomes.get(key, 0.0) + confidence.prod().item()
    return outcomes


def _value_probability(distributions, chosen, values):
    """``prod_{l in S} q_l(y_l)``: what K = T (and the behaviour log-prob) scores for the step."""
    return math.prod(distributions[pos, y].item() for pos, y in zip(chosen, values, strict=True))


def test_what_k_equals_t_leaves_out_of_one_step():
    """The module docstring of trl_diffpo.likelihood, checked by enumeration with the real selection rules: K = T is
    ``prod_{l in S} q_l(y_l)``; the choice of positions is the missing factor ``P(S | y_S)``, which is 1 for a rule
    that ignores the drawn values (EB: given S, the values have exactly the K = T probability) and depends on theta
    for the confidence rules: ``prod_{j not in S} Pr[q_j(y) < cut]``, so that given S the values are tilted."""
    from trl_diffpo.samplers import select_confidence_threshold, select_entropy_bounded, select_top_k

    distributions = torch.softmax(
        torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2, -1
    )
    candidates = torch.ones(1, 3, dtype=torch.bool)
    threshold = 0.375  # exact in float32 and float64

    def below(cut, chosen):  # prod over unchosen j of Pr_{y ~ q_j}[q_j(y) < cut]
        return math.prod(distributions[j][distributions[j] < cut].sum().item() for j in range(3) if j not in chosen)

    rules = {
        "entropy_bounded": lambda conf, ent: select_entropy_bounded(ent[None], candidates, torch.tensor([1.0]))[0],
        "low_confidence": lambda conf, ent: select_top_k(conf[None], candidates, torch.tensor([2]))[0],
        "confidence_threshold": lambda conf, ent: select_confidence_threshold(
            conf[None], candidates, torch.tensor([threshold])
        )[0],
    }
    for name, rule in rules.items():
        outcomes = _one_step_probabilities(distributions, rule)
        assert abs(sum(outcomes.values()) - 1) < 1e-12
        position_probability: dict = {}
        for (chosen, _), probability in outcomes.items():
            position_probability[chosen] = position_probability.get(chosen, 0.0) + probability
        tilted = 0.0
        for (chosen, values), probability in outcomes.items():
            k_equals_t = _value_probability(distributions, chosen, values)
            if name == "entropy_bounded":  # positions fixed by the entropies: P(S, y_S) = P(y_S), P(y_S | S) = P(y_S)
                assert len(position_probability) == 1
                assert abs(probability - k_equals_t) < 1e-12
                continue
            confidences = [distributions[pos, y].item() for pos, y in zip(chosen, values, strict=True)]
            cut = min(confidences) if name == "low_confidence" or min(confidences) < threshold else threshold
            assert abs(probability - k_equals_t * below(cut, chosen)) < 1e-12  # the factor K = T leaves out
            tilted = max(tilted, abs(probability / position_probability[chosen] - k_equals_t))
        if name != "entropy_bounded":
            assert tilted > 1e-2, f"{name}: given the positions, the values should not have the K = T probability"
