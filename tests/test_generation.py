"""`diffusion_generate` against a slow per-row reference, plus NFE accounting, trace invariants, EOS, padding, RNG."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from trl_diffpo.backbones import DiffusionBackbone, get_backbone
from trl_diffpo.generation import diffusion_generate, policy_log_softmax
from trl_diffpo.tiny import build_char_tokenizer, build_tiny_model

GEN_LENGTH = 12
BLOCK_LENGTH = 4
NUM_BLOCKS = GEN_LENGTH // BLOCK_LENGTH
FIXED_STEPS = 9  # 3 steps per block of 4: the uneven schedule [2, 1, 1]
WEIGHT_SCALE = 0.35  # re-initialised weights: peaked, position-dependent distributions (the default init is ~uniform)
PROMPTS = ["Q:1+1=A:", "Q:hello world A:", "Q:x"]  # different lengths: the batch is left-padded
# Per-row thresholds: each row of one batch decodes at its own pace.
ROW_THRESHOLDS = {"confidence_threshold": [1.0, 0.3, 0.12], "entropy_bounded": [0.0, 4.0, 12.0]}
FIXED_SAMPLERS = ("low_confidence", "random")
ALL_SAMPLERS = FIXED_SAMPLERS + tuple(ROW_THRESHOLDS)


def build_peaked_model(tokenizer, architecture="llama", dtype=torch.float64, seed=0):
    """A tiny model with larger random weights, so that confidences and entropies differ between positions."""
    model = build_tiny_model(
        tokenizer, architecture=architecture, hidden_size=32, num_layers=2, dtype=dtype, seed=seed
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.copy_(
                    torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * WEIGHT_SCALE
                )
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    # float64 weights: a row forwarded alone and inside a padded batch give the same float32 distributions
    return build_peaked_model(tokenizer)


@pytest.fixture(scope="module")
def batch(tokenizer):
    return tokenizer(PROMPTS, return_tensors="pt", padding=True)


def sampler_options(sampler):
    if sampler in FIXED_SAMPLERS:
        return {"steps": FIXED_STEPS}
    return {"threshold": torch.tensor(ROW_THRESHOLDS[sampler])}


# --------------------------------------------------------------------------------------------------------------------
# The slow reference: one row, one step, one position at a time, selections by Python sorting.
# --------------------------------------------------------------------------------------------------------------------


class ReferenceRow:
    """Decodes one prompt alone (no padding), with plain Python loops."""

    def __init__(self, model, prompt, *, sampler, steps, threshold, temperature, mask_id, eos_id):
        self.model, self.prompt, self.sampler = model, list(prompt), sampler
        self.threshold, self.temperature, self.mask_id, self.eos_id = threshold, temperature, mask_id, eos_id
        self.completion = [mask_id] * GEN_LENGTH
        self.unmask_step = [0] * GEN_LENGTH
        self.logprobs = [0.0] * GEN_LENGTH
        self.nfe, self.block, self.step_in_block, self.done = 0, 0, 0, False
        if steps is not None:
            per_block = steps // NUM_BLOCKS
            self.schedule = [
                BLOCK_LENGTH // per_block + (1 if s < BLOCK_LENGTH % per_block else 0) for s in range(per_block)
            ]

    def distribution(self, logits_row):
        """log p over the vocabulary at one position: logits / T, [MASK] excluded."""
        scaled = logits_row.float().clone()
        if self.temperature > 0:
            scaled = scaled / self.temperature
        scaled[self.mask_id] = float("-inf")
        return torch.log_softmax(scaled, dim=0).tolist()

    def step(self, token_uniform=None, random_scores=None):
        self.nfe += 1
        with torch.no_grad():
            logits = self.model(input_ids=torch.tensor([self.prompt + self.completion])).logits[0]
        start = self.block * BLOCK_LENGTH
        proposal = {}  # block offset -> (token, log-prob, confidence, entropy)
        for offset in range(BLOCK_LENGTH):
            position = start + offset
            if self.completion[position] != self.mask_id:
                continue
            logp = self.distribution(logits[len(self.prompt) + position])
            if self.temperature > 0:  # inverse CDF with the engine's uniform for this row / position
                token = inverse_cdf([math.exp(lp) for lp in logp], token_uniform[offset].item())
            else:
                token = max(range(len(logp)), key=lambda v: logp[v])  # first maximum, like torch.argmax
            entropy = -sum(math.exp(lp) * lp for lp in logp if lp > float("-inf"))
            proposal[offset] = (token, logp[token], math.exp(logp[token]), entropy)

        chosen = self.choose(proposal, random_scores)
        for offset in chosen:
            token, logprob, _, _ = proposal[offset]
            self.completion[start + offset] = token
            self.unmask_step[start + offset] = self.nfe
            self.logprobs[start + offset] = logprob

        if self.mask_id in self.completion[start : start + BLOCK_LENGTH]:
            self.step_in_block += 1
        else:
            self.block, self.step_in_block = self.block + 1, 0
        self.done = self.block == NUM_BLOCKS
        if self.eos_id is not None and self.eos_id in self.completion:
            first_eos = self.completion.index(self.eos_id)
            if self.mask_id not in self.completion[:first_eos]:
                for position, token in enumerate(self.completion):
                    if token == self.mask_id:
                        self.completion[position] = self.eos_id
                        self.unmask_step[position] = self.nfe
                self.done = True

    def choose(self, proposal, random_scores):
        offsets = list(proposal)
        if self.sampler == "low_confidence":
            ranked = sorted(offsets, key=lambda o: (-proposal[o][2], o))
            return ranked[: self.schedule[self.step_in_block]]
        if self.sampler == "random":
            ranked = sorted(offsets, key=lambda o: (-random_scores[o].item(), o))
            return ranked[: self.schedule[self.step_in_block]]
        if self.sampler == "confidence_threshold":
            ranked = sorted(offsets, key=lambda o: (-proposal[o][2], o))
            return {ranked[0]} | {o for o in offsets if proposal[o][2] >= self.threshold}
        ranked = sorted(offsets, key=lambda o: (proposal[o][3], o))  # entropy ascending
        longest = 1
        for length in range(1, len(ranked) + 1):
            entropies = [proposal[o][3] for o in ranked[:length]]
            if sum(entropies) - max(entropies) <= self.threshold:
                longest = length
        return ranked[:longest]


def inverse_cdf(probs, uniform):
    """The first token whose running probability sum exceeds ``uniform`` times the total."""
    target, running = uniform * sum(probs), 0.0
    for token, prob in enumerate(probs):
        running += prob
        if running > target and prob > 0:
            return token
    return max(token for token, prob in enumerate(probs) if prob > 0)


def run_reference(model, tokenizer, prompts, *, sampler, steps=None, thresholds=None, temperature, generator, eos_id):
    """Runs the reference rows, handing out the engine's random draws in the engine's order: at each step one
    ``(active rows, block)`` float64 uniform draw for the tokens (temperature > 0), then one ``(active rows, block)``
    draw of random scores (random sampler), rows in batch order."""
    rows = [
        ReferenceRow(
            model,
            tokenizer(prompt).input_ids,
            sampler=sampler,
            steps=steps,
            threshold=None if thresholds is None else float(thresholds[i]),
            temperature=temperature,
            mask_id=tokenizer.mask_token_id,
            eos_id=eos_id,
        )
        for i, prompt in enumerate(prompts)
    ]
    while True:
        active = [row for row in rows if not row.done]
        if not active:
            return rows
        uniforms = None
        if temperature > 0:
            uniforms = torch.rand((len(active), BLOCK_LENGTH, 1), generator=generator, dtype=torch.float64)
        scores = torch.rand((len(active), BLOCK_LENGTH), generator=generator) if sampler == "random" else None
        for i, row in enumerate(active):
            row.step(None if uniforms is None else uniforms[i], None if scores is None else scores[i])


@pytest.mark.parametrize("with_eos", [False, True], ids=["no_eos", "eos"])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
@pytest.mark.parametrize("sampler", ALL_SAMPLERS)
def test_engine_matches_per_row_reference(model, tokenizer, batch, sampler, temperature, with_eos):
    options = sampler_options(sampler)
    seed = 1234

    def engine(eos_id):
        return diffusion_generate(
            model,
            batch.input_ids,
            batch.attention_mask,
            gen_length=GEN_LENGTH,
            block_length=BLOCK_LENGTH,
            sampler=sampler,
            temperature=temperature,
            generator=torch.Generator().manual_seed(seed),
            eos_token_id=eos_id,
            **options,
        )

    eos_id = None
    if with_eos:  # use as EOS the token this very run produces most in the first half: the early stop must happen
        first_half = engine(None).completion_ids[:, : GEN_LENGTH // 2].flatten().tolist()
        eos_id = Counter(first_half).most_common(1)[0][0]
    output = engine(eos_id)
    rows = run_reference(
        model,
        tokenizer,
        PROMPTS,
        sampler=sampler,
        steps=options.get("steps"),
        thresholds=options.get("threshold"),
        temperature=temperature,
        generator=torch.Generator().manual_seed(seed),
        eos_id=eos_id,
    )
    assert output.completion_ids.tolist() == [row.completion for row in rows]
    assert output.unmask_step.tolist() == [row.unmask_step for row in rows]
    assert output.nfe.tolist() == [row.nfe for row in rows]
    torch.testing.assert_close(output.logprobs, torch.tensor([row.logprobs for row in rows]), atol=1e-5, rtol=0)
    assert torch.equal(output.sequences[:, : batch.input_ids.shape[1]], batch.input_ids)
    if sampler in ROW_THRESHOLDS:
        assert output.threshold.tolist() == pytest.approx(ROW_THRESHOLDS[sampler])
        assert len(set(output.nfe.tolist())) > 1  # the per-row thresholds really made the rows differ
    else:
        assert torch.isnan(output.threshold).all()
    if with_eos:
        assert not output.completion_mask.all()  # the early stop really happened somewhere


# --------------------------------------------------------------------------------------------------------------------
# NFE accounting
# --------------------------------------------------------------------------------------------------------------------


class CountingBackbone(DiffusionBackbone):
    """Records how many rows every forward pass carried."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rows_per_forward = []

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False, **kwargs):
        self.rows_per_forward.append(input_ids.shape[0])
        return super().forward(input_ids, attention_mask, output_hidden_states, **kwargs)


def generate(model, batch, **options):
    """Shorthand: 16 positions in blocks of 4 unless told otherwise."""
    options.setdefault("gen_length", 16)
    options.setdefault("block_length", 4)
    return diffusion_generate(model, batch.input_ids, batch.attention_mask, **options)


def commits_per_step(output, row):
    return Counter(output.unmask_step[row].tolist())


def test_low_confidence_with_half_steps_takes_exactly_that_many_nfe(model, batch):
    output = generate(model, batch, sampler="low_confidence", steps=8)
    assert output.nfe.tolist() == [8] * len(PROMPTS)
    for row in range(len(PROMPTS)):
        assert commits_per_step(output, row) == dict.fromkeys(range(1, 9), 2)


def test_entropy_bounded_threshold_zero_commits_one_token_per_step(model, batch):
    output = generate(model, batch, sampler="entropy_bounded", threshold=0.0)
    assert output.nfe.tolist() == [16] * len(PROMPTS)
    for row in range(len(PROMPTS)):
        assert commits_per_step(output, row) == dict.fromkeys(range(1, 17), 1)


def test_entropy_bounded_huge_threshold_commits_a_block_per_step(model, batch):
    output = generate(model, batch, sampler="entropy_bounded", threshold=1e9)
    assert output.nfe.tolist() == [4] * len(PROMPTS)
    block_of_position = torch.arange(16) // 4
    assert torch.equal(output.unmask_step, (block_of_position + 1).expand(len(PROMPTS), -1))


def test_confidence_threshold_one_commits_one_token_per_step(model, batch):
    output = generate(model, batch, sampler="confidence_threshold", threshold=1.0)
    assert output.nfe.tolist() == [16] * len(PROMPTS)


class ForcedLogits(nn.Module):
    """Wraps a model and replaces or edits its logits (a model whose preferences a test controls)."""

    def __init__(self, inner, edit):
        super().__init__()
        self.inner, self.edit, self.config = inner, edit, inner.config

    def forward(self, input_ids, attention_mask=None, position_ids=None, output_hidden_states=False):
        output = self.inner(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_hidden_states=output_hidden_states,
        )
        return CausalLMOutputWithPast(logits=self.edit(output.logits.clone()), hidden_states=output.hidden_states)


def test_confidence_threshold_one_commits_a_block_when_the_model_is_certain(model, batch, tokenizer):
    certain_token = tokenizer.convert_tokens_to_ids("7")

    def make_certain(logits):
        logits[..., certain_token] += 1e4  # softmax probability exactly 1.0 in float32
        return logits

    output = generate(ForcedLogits(model, make_certain), batch, sampler="confidence_threshold", threshold=1.0)
    assert output.nfe.tolist() == [4] * len(PROMPTS)
    assert (output.completion_ids == certain_token).all()


def test_rows_with_different_thresholds_finish_at_different_times(model, batch):
    backbone = CountingBackbone(model, mask_token_id=model.config.mask_token_id)
    thresholds = torch.tensor([0.0, 1e9, 5.0])
    output = generate(backbone, batch, sampler="entropy_bounded", threshold=thresholds)
    assert output.nfe[0] == 16 and output.nfe[1] == 4
    assert 4 < output.nfe[2] < 16
    # A row's NFE is its own number of steps: every one of its steps 1..nfe committed something.
    for row in range(len(PROMPTS)):
        assert set(output.unmask_step[row].tolist()) == set(range(1, int(output.nfe[row]) + 1))
    # Finished rows left the batch: the forwards carried exactly sum(nfe) rows, and shrank as rows finished.
    assert sum(backbone.rows_per_forward) == int(output.nfe.sum())
    assert backbone.rows_per_forward == sorted(backbone.rows_per_forward, reverse=True)
    assert backbone.rows_per_forward[0] == 3 and backbone.rows_per_forward[-1] == 1


# --------------------------------------------------------------------------------------------------------------------
# Trace invariants
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, 0.9])
@pytest.mark.parametrize("sampler", ALL_SAMPLERS)
def test_trace_invariants_and_logprobs_recomputed_from_the_latents(model, tokenizer, batch, sampler, temperature):
    mask_id = tokenizer.mask_token_id
    output = generate(
        model,
        batch,
        sampler=sampler,
        temperature=temperature,
        generator=torch.Generator().manual_seed(7),
        gen_length=GEN_LENGTH,
        **sampler_options(sampler),
    )
    completion, steps = output.completion_ids, output.unmask_step
    assert not (output.sequences == mask_id).any()  # every position committed
    assert (steps >= 1).all() and (steps <= output.nfe[:, None]).all()
    assert torch.isfinite(output.logprobs).all() and (output.logprobs <= 0).all()
    # blocks are decoded left to right: every step of block b comes before every step of block b + 1
    block_steps = steps.view(len(PROMPTS), NUM_BLOCKS, BLOCK_LENGTH)
    assert (block_steps[:, :-1].amax(-1) < block_steps[:, 1:].amin(-1)).all()

    # The behaviour log-prob is log_softmax(logits / T) at the committed token, from the forward on the latent
    # z_{t-1} (positions committed before step t revealed, the rest [MASK]).
    backbone = get_backbone(model)
    prompt = output.sequences[:, : -completion.shape[1]]
    full_mask = torch.cat([batch.attention_mask, torch.ones_like(completion)], dim=1)
    for row in range(len(PROMPTS)):
        nfe = int(output.nfe[row])
        step_index = torch.arange(1, nfe + 1)[:, None]
        latents = torch.where(steps[row] < step_index, completion[row], mask_id)  # (nfe, gen): z_0 .. z_{nfe-1}
        canvas = torch.cat([prompt[row].expand(nfe, -1), latents], dim=1)
        logits = backbone(canvas, full_mask[row].expand(nfe, -1)).logits[:, prompt.shape[1] :]
        logps = policy_log_softmax(logits, mask_id, temperature)
        expected = logps[steps[row] - 1, torch.arange(completion.shape[1]), completion[row]]
        torch.testing.assert_close(output.logprobs[row], expected, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------------------------
# EOS handling
# --------------------------------------------------------------------------------------------------------------------

EOS_FROM = 3  # completion positions >= 3 strongly prefer EOS
EOS_BIAS = 12.0  # large, yet the EOS probability stays below 1 in float32 (entropy > 0, log-prob < 0)


def eos_loving(model, eos_id, gen_length=16):
    def prefer_eos(logits):
        logits[:, logits.shape[1] - gen_length + EOS_FROM :, eos_id] += EOS_BIAS
        return logits

    return ForcedLogits(model, prefer_eos)


@pytest.mark.parametrize("sampler", ["low_confidence", "entropy_bounded"])
def test_eos_stops_the_row_early(model, tokenizer, batch, sampler):
    eos = tokenizer.eos_token_id
    options = {"steps": 8} if sampler == "low_confidence" else {"threshold": 0.0}
    full = generate(eos_loving(model, eos), batch, sampler=sampler, **options)
    stopped = generate(eos_loving(model, eos), batch, sampler=sampler, eos_token_id=eos, **options)
    expected_nfe = 2 if sampler == "low_confidence" else 4  # the first block only
    assert full.nfe.tolist() == [8 if sampler == "low_confidence" else 16] * len(PROMPTS)
    assert stopped.nfe.tolist() == [expected_nfe] * len(PROMPTS)
    completion = stopped.completion_ids
    assert (completion[:, :EOS_FROM] != eos).all() and (completion[:, EOS_FROM:] == eos).all()
    # the completion mask covers everything up to and including the first EOS
    expected_mask = torch.arange(16)[None, :] <= EOS_FROM
    assert torch.equal(stopped.completion_mask, expected_mask.expand(len(PROMPTS), -1))
    # positions never decoded: EOS, the row's last step, log-prob 0; the decoded ones match the full run
    assert (stopped.unmask_step[:, EOS_FROM + 1 :] == expected_nfe).all()
    assert (stopped.logprobs[:, EOS_FROM + 1 :] == 0).all()
    assert torch.equal(stopped.unmask_step[:, : EOS_FROM + 1], full.unmask_step[:, : EOS_FROM + 1])
    assert torch.equal(completion[:, : EOS_FROM + 1], full.completion_ids[:, : EOS_FROM + 1])


def test_every_eos_id_ends_a_row(model, tokenizer, batch):
    """A model that ends its rows with a second EOS id (LLaDA's end-of-turn): with only the first id the row decodes
    every block (extra forward passes); with both ids it stops after the first block like with a single EOS."""
    eos, end_of_turn = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("#")
    options = {"sampler": "low_confidence", "steps": 8}
    first_only = generate(eos_loving(model, end_of_turn), batch, eos_token_id=eos, **options)
    assert first_only.nfe.tolist() == [8] * len(PROMPTS) and first_only.completion_mask.all()
    for eos_ids in ([eos, end_of_turn], (end_of_turn,), torch.tensor([eos, end_of_turn])):
        both = generate(eos_loving(model, end_of_turn), batch, eos_token_id=eos_ids, **options)
        assert both.nfe.tolist() == [2] * len(PROMPTS)
        expected_mask = (torch.arange(16)[None, :] <= EOS_FROM).expand(len(PROMPTS), -1)
        assert torch.equal(both.completion_mask, expected_mask)
        completion = both.completion_ids
        assert (completion[:, EOS_FROM] == end_of_turn).all()
        fill = eos_ids[0] if not isinstance(eos_ids, torch.Tensor) else int(eos_ids[0])
        assert (completion[:, EOS_FROM + 1 :] == fill).all()  # never decoded: the first id of the sequence
        assert torch.equal(completion[:, : EOS_FROM + 1], first_only.completion_ids[:, : EOS_FROM + 1])


@pytest.mark.parametrize("bad", [[], [-1], "2", 2.5])
def test_bad_eos_token_id_is_a_clear_error(model, batch, bad):
    with pytest.raises(ValueError, match="eos_token_id"):
        generate(model, batch, sampler="low_confidence", steps=8, eos_token_id=bad)


def test_without_stop_at_eos_every_position_is_decoded(model, tokenizer, batch):
    eos = tokenizer.eos_token_id
    output = generate(
        eos_loving(model, eos), batch, sampler="low_confidence", steps=8, eos_token_id=eos, stop_at_eos=False
    )
    assert output.nfe.tolist() == [8] * len(PROMPTS)
    assert torch.equal(output.completion_mask, (torch.arange(16)[None, :] <= EOS_FROM).expand(len(PROMPTS), -1))
    assert (output.logprobs < 0).all()


def test_completion_mask_is_all_true_without_eos(model, batch):
    output = generate(model, batch, sampler="low_confidence", steps=8)
    assert output.completion_mask.all()
    assert torch.equal(output.tokens_per_step, torch.full((len(PROMPTS),), 2.0))


# --------------------------------------------------------------------------------------------------------------------
# Padding invariance, across architectures
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "bert"])
@pytest.mark.parametrize("sampler", ["low_confidence", "entropy_bounded"])
def test_left_padded_batch_matches_each_row_alone(tokenizer, batch, architecture, sampler):
    model = build_peaked_model(tokenizer, architecture=architecture, dtype=torch.float32)
    options = {"steps": 8} if sampler == "low_confidence" else {"threshold": 3.0}
    together = generate(model, batch, sampler=sampler, **options)
    for row, prompt in enumerate(PROMPTS):
        alone = generate(model, tokenizer([prompt], return_tensors="pt"), sampler=sampler, **options)
        assert torch.equal(together.completion_ids[row], alone.completion_ids[0])
        assert torch.equal(together.unmask_step[row], alone.unmask_step[0])
        torch.testing.assert_close(together.logprobs[row], alone.logprobs[0], atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------------------------------------------
# Shifted-logits (Dream style) adapter
# --------------------------------------------------------------------------------------------------------------------


class ShiftedLogitsModel(nn.Module):
    """Presents an aligned model the Dream way: position i of the output predicts token i + 1."""

    def __init__(self, inner, model_type=None):
        super().__init__()
        self.inner = inner
        self.config = inner.config.__class__.from_dict(inner.config.to_dict())
        if model_type is None:
            self.config.diffusion_logits_shift = True
        else:
            self.config.model_type = model_type

    def forward(self, input_ids, attention_mask=None, position_ids=None, output_hidden_states=False):
        if attention_mask is not None and attention_mask.dim() == 4:  # Dream-style remote code gets a 4-D mask
            attention_mask = attention_mask[:, 0, 0, :].long()
        output = self.inner(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_hidden_states=output_hidden_states,
        )
        shifted = torch.cat([output.logits[:, 1:], torch.zeros_like(output.logits[:, :1])], dim=1)
        return CausalLMOutputWithPast(logits=shifted, hidden_states=output.hidden_states)


@pytest.mark.parametrize("model_type", [None, "dream"], ids=["diffusion_logits_shift", "model_type_dream"])
def test_shifted_adapter_gives_the_same_completions_as_aligned(model, batch, model_type):
    shifted = ShiftedLogitsModel(model, model_type=model_type)
    assert get_backbone(shifted).logits_shift
    for sampler in ALL_SAMPLERS:
        options = dict(sampler=sampler, temperature=0.5, gen_length=GEN_LENGTH, **sampler_options(sampler))
        aligned = generate(model, batch, generator=torch.Generator().manual_seed(3), **options)
        result = generate(shifted, batch, generator=torch.Generator().manual_seed(3), **options)
        assert torch.equal(result.sequences, aligned.sequences)
        assert torch.equal(result.unmask_step, aligned.unmask_step)
        torch.testing.assert_close(result.logprobs, aligned.logprobs, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------------------------------
# Options, RNG, threshold_fn
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"block_length": 5, "sampler": "low_confidence", "steps": 4}, "block_length"),
        ({"block_length": 0, "sampler": "low_confidence", "steps": 4}, "block_length"),
        ({"gen_length": 0, "sampler": "low_confidence", "steps": 4}, "gen_length"),
        ({"sampler": "low_confidence", "steps": 6}, "steps"),  # 4 blocks do not divide 6 steps
        ({"sampler": "low_confidence", "steps": 32}, "steps"),  # more steps than positions
        ({"sampler": "random"}, "steps"),
        ({"sampler": "confidence_threshold", "threshold": 0.0}, "threshold"),
        ({"sampler": "confidence_threshold", "threshold": 1.5}, "threshold"),
        ({"sampler": "confidence_threshold", "threshold": torch.tensor([0.5, float("nan"), 0.5])}, "threshold"),
        ({"sampler": "entropy_bounded", "threshold": -0.1}, "threshold"),
        ({"sampler": "entropy_bounded", "threshold": torch.tensor([1.0, 2.0])}, "threshold"),
        ({"sampler": "entropy_bounded"}, "threshold"),
        ({"sampler": "low_confidence", "steps": 8, "temperature": -0.5}, "temperature"),
        ({"sampler": "low_confidence", "steps": 8, "temperature": float("inf")}, "temperature"),
        ({"sampler": "beam_search"}, "sampler"),
        ({"sampler": "low_confidence", "steps": 8, "threshold_fn": lambda hidden: hidden[:, 0]}, "threshold_fn"),
    ],
)
def test_bad_options_raise_a_value_error_naming_the_option(model, batch, options, named):
    with pytest.raises(ValueError, match=named):
        generate(model, batch, **options)


def test_threshold_fn_with_a_wrong_shape_raises(model, batch):
    with pytest.raises(ValueError, match="threshold_fn"):
        generate(model, batch, sampler="entropy_bounded", threshold_fn=lambda hidden: torch.ones(2))


@pytest.mark.parametrize("sampler", ["random", "confidence_threshold"])
def test_global_rng_untouched_and_local_generator_reproducible(model, batch, sampler):
    options = dict(sampler=sampler, temperature=1.0, gen_length=GEN_LENGTH, **sampler_options(sampler))
    torch.manual_seed(99)
    state = torch.random.get_rng_state()
    first = generate(model, batch, generator=torch.Generator().manual_seed(5), **options)
    generate(model, batch, **options)  # no generator: a fresh local one
    assert torch.equal(torch.random.get_rng_state(), state)
    again = generate(model, batch, generator=torch.Generator().manual_seed(5), **options)
    other = generate(model, batch, generator=torch.Generator().manual_seed(6), **options)
    assert torch.equal(first.sequences, again.sequences) and torch.equal(first.unmask_step, again.unmask_step)
    assert torch.equal(first.logprobs, again.logprobs)
    assert not torch.equal(first.sequences, other.sequences)


def test_threshold_fn_gets_pooled_prompt_hidden_states_and_sets_per_row_thresholds(model, batch):
    received = []
    per_row = torch.tensor([1e9, 0.0, 1e9])

    def threshold_fn(prompt_hidden):
        received.append(prompt_hidden.clone())
        return per_row

    output = generate(model, batch, sampler="entropy_bounded", threshold=5.0, threshold_fn=threshold_fn)
    assert len(received) == 1 and received[0].shape == (len(PROMPTS), model.config.hidden_size)
    assert output.threshold.tolist() == per_row.tolist()
    assert output.nfe.tolist() == [4, 16, 4]  # the per-row output decided each row's pace

    # The pooled state is the mean over the prompt's real tokens of the last hidden layer at the first forward.
    mask_id = model.config.mask_token_id
    canvas = torch.cat([batch.input_ids, torch.full((len(PROMPTS), 16), mask_id)], dim=1)
    full_mask = torch.cat([batch.attention_mask, torch.ones(len(PROMPTS), 16, dtype=torch.long)], dim=1)
    hidden = get_backbone(model)(canvas, full_mask, output_hidden_states=True).hidden_states
    for row in range(len(PROMPTS)):
        real = batch.attention_mask[row].bool()
        expected = hidden[row, : batch.input_ids.shape[1]][real].mean(0)
        torch.testing.assert_close(received[0][row], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(output.prompt_hidden, received[0])


def test_prompt_hidden_only_on_request(model, batch):
    plain = generate(model, batch, sampler="low_confidence", steps=8)
    assert plain.prompt_hidden is None
    with_hidden = generate(model, batch, sampler="low_confidence", steps=8, return_prompt_hidden=True)
    assert with_hidden.prompt_hidden.shape == (len(PROMPTS), model.config.hidden_size)
    assert torch.equal(with_hidden.sequences, plain.sequences)


# --------------------------------------------------------------------------------------------------------------------
# The policy distribution
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_policy_log_softmax_definition_and_no_side_effects(dtype, temperature):
    from trl_diffpo.generation import _policy_log_softmax

    logits = (torch.randn(2, 3, 11, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    untouched = logits.clone()
    logps = policy_log_softmax(logits, 4, temperature)
    assert torch.equal(logits, untouched)  # the caller's logits are not edited in place
    assert logps.dtype == torch.float32
    scaled = logits.double() / (temperature if temperature > 0 else 1.0)
    scaled[..., 4] = float("-inf")
    torch.testing.assert_close(logps, torch.log_softmax(scaled, -1).float(), atol=1e-5, rtol=1e-6)
    assert (logps[..., 4] == float("-inf")).all()
    # The decoding loop's in-place variant is bit-identical: the K=T surrogate reproduces behaviour log-probs exactly.
    assert torch.equal(_policy_log_softmax(logits.clone(), 4, temperature, writable=True), logps)
    # Gradients flow (training calls it on logits that require grad).
    trainable = logits.float().requires_grad_()
    policy_log_softmax(trainable, 4, temperature)[..., 0].sum().backward()
    assert torch.isfinite(trainable.grad).all() and (trainable.grad[..., 4] == 0).all()


# A head/tail distribution at a LLaDA-like vocabulary: one token of probability 0.998, the rest spread evenly over the
# tail (1e-8 each, 20 below the head in log space: float32 Gumbel noise is capped near 16.6, so Gumbel-max with float32
# uniforms draws this tail ~0.03% of the time instead of 0.2%). The vocabulary is not a multiple of the CDF bucket and
# its last id is the excluded [MASK], so the partial last bucket and zero-probability tokens are exercised.
HEAD_TAIL_VOCAB = 100_003
HEAD_PROBABILITY = 0.998
HEAD_TAIL_DRAWS = 100_000


def head_tail_log_probs():
    tail = math.log((1 - HEAD_PROBABILITY) / (HEAD_TAIL_VOCAB - 2))
    log_probs = torch.full((HEAD_TAIL_VOCAB,), tail, dtype=torch.float64)
    log_probs[17] = math.log(HEAD_PROBABILITY)
    log_probs[-1] = float("-inf")  # [MASK]
    return log_probs.float()


def test_sampling_matches_the_softmax_in_the_tail():
    from trl_diffpo.token_sampling import sample_from_log_probs

    log_probs = head_tail_log_probs()
    generator = torch.Generator().manual_seed(0)
    draws = torch.cat(
        [
            sample_from_log_probs(log_probs[None], torch.rand(1, 25_000, generator=generator, dtype=torch.float64))
            for _ in range(HEAD_TAIL_DRAWS // 25_000)
        ],
        dim=1,
    )[0]
    assert draws.min() >= 0 and draws.max() < HEAD_TAIL_VOCAB - 1  # [MASK] (probability 0) is never drawn
    probs = log_probs.double().exp()
    # Frequencies of the head, the tail's first half and the tail's second half, within 4 standard errors.
    classes = [draws == 17, (draws != 17) & (draws < HEAD_TAIL_VOCAB // 2), draws >= HEAD_TAIL_VOCAB // 2]
    expected = [probs[17], probs[: HEAD_TAIL_VOCAB // 2].sum() - probs[17], probs[HEAD_TAIL_VOCAB // 2 :].sum()]
    for drawn, p in zip(classes, expected, strict=True):
        standard_error = math.sqrt(p * (1 - p) / HEAD_TAIL_DRAWS)
        assert abs(drawn.double().mean() - p) < 4 * standard_error, (drawn.double().mean().item(), p.item())


def test_sampling_draws_every_token_in_proportion_on_a_small_vocabulary():
    """A chi-square check over every token of a 700-token vocabulary (several CDF buckets, a partial last one)."""
    from trl_diffpo.token_sampling import sample_from_log_probs

    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(700, generator=generator) * 2
    logits[[0, 300, 699]] = float("-inf")
    log_probs = torch.log_softmax(logits, -1)
    draws = sample_from_log_probs(log_probs[None], torch.rand(1, 60_000, generator=generator, dtype=torch.float64))
    counts = torch.bincount(draws[0], minlength=700).double()
    assert counts[[0, 300, 699]].sum() == 0
    expected = log_probs.double().exp() * draws.numel()
    kept = expected > 0
    chi_square = ((counts[kept] - expected[kept]) ** 2 / expected[kept]).sum().item()
    degrees = int(kept.sum()) - 1
    assert chi_square < degrees + 5 * math.sqrt(2 * degrees)


def test_generator_on_another_device_warns_once(model, batch, caplog, monkeypatch):
    import trl_diffpo.generation as generation

    class MetaLikeGenerator:  # a generator that claims another device; draws come from a real CPU generator
        device = torch.device("meta")

        def __init__(self):
            self.inner = torch.Generator().manual_seed(0)

    real_uniform = generation._uniform
    monkeypatch.setattr(
        generation, "_uniform", lambda shape, gen, device, **kwargs: real_uniform(shape, gen.inner, device, **kwargs)
    )
    monkeypatch.setattr(generation, "_warned_generator_devices", set())
    with caplog.at_level("WARNING", logger="trl_diffpo.generation"):
        for _ in range(2):
            generate(model, batch, sampler="random", steps=8, generator=MetaLikeGenerator())
    warnings = [record for record in caplog.records if "generator is on meta" in record.getMessage()]
    assert len(warnings) == 1 and "torch.Generator(device='cpu')" in warnings[0].getMessage()


def test_mask_token_id_outside_the_vocabulary_is_a_clear_error(model, batch):
    with pytest.raises(ValueError, match="mask_token_id=500 is outside the model's vocabulary"):
        generate(model, batch, sampler="low_confidence", steps=8, mask_token_id=500)


# --------------------------------------------------------------------------------------------------------------------
# The benchmark script (a smoke run, and its meta-device model builder)
# --------------------------------------------------------------------------------------------------------------------


def load_benchmark():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_generation.py"
    spec = importlib.util.spec_from_file_location("bench_generation", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_benchmark_smoke_run(capsys):
    bench = load_benchmark()
    argv = "--device cpu --size tiny --batch 2 --prompt-len 4 --gen-len 8 --block 4 --repeats 1 --temperature 0.5"
    results = bench.main(argv.split())
    assert [result.sampler for result in results] == list(ALL_SAMPLERS)
    for result in results:
        assert result.forward_passes >= result.mean_nfe_per_row > 0
        assert result.generate_s > 0 and result.forwards_s > 0
    assert "| low_confidence | steps=4 |" in capsys.readouterr().out


def test_benchmark_meta_device_builder_matches_a_regular_model():
    from transformers import LlamaForCausalLM

    bench = load_benchmark()
    shape = {
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "vocab_size": 50,
        "mask_token_id": 49,
        "eos_token_id": 2,
    }
    built = bench.build_random_bidirectional_llama(shape, torch.device("cpu"), torch.float32)
    regular = LlamaForCausalLM(built.config).eval()
    regular.load_state_dict(built.state_dict())  # same weights; the rotary buffers are the regular model's own
    ids = torch.randint(5, 49, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(built(input_ids=ids).logits, regular(input_ids=ids).logits)
    get_backbone(built)  # bidirectional (config.is_causal=False) and the mask id comes from the config
