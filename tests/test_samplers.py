"""The vectorised selection rules of :mod:`trl_diffpo.samplers` against brute force written in plain Python."""

import itertools
import random

import pytest
import torch

from trl_diffpo.samplers import (
    fixed_schedule,
    rank_descending,
    select_confidence_threshold,
    select_entropy_bounded,
    select_top_k,
    sort_candidates,
)

NUM_RANDOM_CASES = 200
BLOCK = 6  # small enough to enumerate every subset of a block


def random_case(rng: random.Random, rows: int = 4, block: int = BLOCK, with_ties: bool = True):
    """Scores drawn from a handful of values (many ties) or continuous; some rows without any candidate."""
    if with_ties:
        scores = [[rng.choice([0.0, 0.25, 0.5, 0.5, 1.0, 2.0]) for _ in range(block)] for _ in range(rows)]
    else:
        scores = [[rng.uniform(0, 3) for _ in range(block)] for _ in range(rows)]
    candidates = [[rng.random() < 0.6 for _ in range(block)] for _ in range(rows)]
    candidates[rng.randrange(rows)] = [False] * block  # always one row with nothing left to commit
    return scores, candidates


def as_tensors(scores, candidates):
    return torch.tensor(scores, dtype=torch.float32), torch.tensor(candidates)


def python_order(scores_row, candidates_row, descending=True):
    """Candidate positions sorted by score (descending or ascending), ties by position."""
    positions = [p for p, c in enumerate(candidates_row) if c]
    sign = -1.0 if descending else 1.0
    return sorted(positions, key=lambda p: (sign * scores_row[p], p))


def chosen_positions(mask_row):
    return {p for p, m in enumerate(mask_row.tolist()) if m}


def test_sort_candidates_matches_python_sort_with_ties():
    rng = random.Random(0)
    for _ in range(NUM_RANDOM_CASES):
        scores, candidates = random_case(rng)
        order, ranks = sort_candidates(*as_tensors(scores, candidates))
        for row in range(len(scores)):
            expected = python_order(scores[row], candidates[row])
            assert order[row, : len(expected)].tolist() == expected
            assert sorted(order[row].tolist()) == list(range(BLOCK))  # a permutation
            for rank, position in enumerate(order[row].tolist()):
                assert ranks[row, position] == rank
        assert torch.equal(rank_descending(*as_tensors(scores, candidates)), ranks)


def test_sort_candidates_puts_candidates_first_even_with_minus_inf_scores():
    scores = torch.tensor([[3.0, float("-inf"), 5.0, 1.0]])
    candidates = torch.tensor([[False, True, False, True]])
    order, _ = sort_candidates(scores, candidates)
    assert order[0, :2].tolist() == [3, 1]


@pytest.mark.parametrize("with_ties", [True, False])
def test_select_top_k_matches_brute_force(with_ties):
    rng = random.Random(1)
    for _ in range(NUM_RANDOM_CASES):
        scores, candidates = random_case(rng, with_ties=with_ties)
        num_tokens = [rng.randint(1, BLOCK + 1) for _ in scores]
        selected = select_top_k(*as_tensors(scores, candidates), torch.tensor(num_tokens))
        for row in range(len(scores)):
            order = python_order(scores[row], candidates[row])
            assert chosen_positions(selected[row]) == set(order[: num_tokens[row]])


@pytest.mark.parametrize("with_ties", [True, False])
def test_select_confidence_threshold_matches_brute_force(with_ties):
    rng = random.Random(2)
    for _ in range(NUM_RANDOM_CASES):
        scores, candidates = random_case(rng, with_ties=with_ties)
        thresholds = [rng.choice([0.25, 0.5, 1.0, 5.0]) for _ in scores]
        selected = select_confidence_threshold(*as_tensors(scores, candidates), torch.tensor(thresholds))
        for row in range(len(scores)):
            order = python_order(scores[row], candidates[row])
            expected = {p for p in order if scores[row][p] >= thresholds[row]}
            if order:
                expected.add(order[0])  # always at least the most confident (first by position among ties)
            assert chosen_positions(selected[row]) == expected


def eb_prefix_brute_force(entropies, candidates_row, gamma):
    """Longest prefix of the entropy-ascending order with sum - max <= gamma (at least one)."""
    order = python_order(entropies, candidates_row, descending=False)
    best = 0
    for length in range(1, len(order) + 1):
        prefix = [entropies[p] for p in order[:length]]
        if sum(prefix) - max(prefix) <= gamma:
            best = length
    return set(order[: max(best, 1)]) if order else set()


def largest_valid_subset_size(entropies, candidates_row, gamma):
    """Size of the largest subset U of the candidates with sum(U) - max(U) <= gamma (every subset enumerated)."""
    positions = [p for p, c in enumerate(candidates_row) if c]
    best = 0
    for size in range(1, len(positions) + 1):
        for subset in itertools.combinations(positions, size):
            values = [entropies[p] for p in subset]
            if sum(values) - max(values) <= gamma:
                best = size
                break
    return best


@pytest.mark.parametrize("with_ties", [True, False])
def test_select_entropy_bounded_matches_brute_force(with_ties):
    rng = random.Random(3)
    for _ in range(NUM_RANDOM_CASES):
        entropies, candidates = random_case(rng, with_ties=with_ties)
        gammas = [rng.choice([0.0, 0.3, 0.75, 1.5, 100.0]) for _ in entropies]
        selected = select_entropy_bounded(*as_tensors(entropies, candidates), torch.tensor(gammas))
        for row in range(len(entropies)):
            expected = eb_prefix_brute_force(entropies[row], candidates[row], gammas[row])
            assert chosen_positions(selected[row]) == expected
            # The prefix is optimal: no subset of the candidates with a larger size satisfies the bound.
            if expected:
                assert len(expected) == max(1, largest_valid_subset_size(entropies[row], candidates[row], gammas[row]))


def test_entropy_bounded_edge_thresholds():
    entropy = torch.tensor([[0.5, 0.1, 0.2, 0.4]])
    candidates = torch.ones_like(entropy, dtype=torch.bool)
    one = select_entropy_bounded(entropy, candidates, torch.tensor([0.0]))
    assert one.tolist() == [[False, True, False, False]]  # gamma 0: only the lowest entropy
    everything = select_entropy_bounded(entropy, candidates, torch.tensor([1e9]))
    assert everything.all()


def test_rows_without_candidates_commit_nothing():
    scores = torch.rand(3, 5)
    candidates = torch.zeros(3, 5, dtype=torch.bool)
    assert not select_top_k(scores, candidates, torch.tensor([2, 2, 2])).any()
    assert not select_confidence_threshold(scores, candidates, torch.tensor([0.0, 0.5, 1.0])).any()
    assert not select_entropy_bounded(scores, candidates, torch.tensor([0.0, 1.0, 1e9])).any()


def test_selection_is_a_subset_of_candidates_and_commits_at_least_one():
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(64, 8, generator=generator)
    candidates = torch.rand(64, 8, generator=generator) < 0.5
    has_candidate = candidates.any(-1)
    for selected in (
        select_top_k(scores, candidates, torch.ones(64, dtype=torch.long)),
        select_confidence_threshold(scores, candidates, torch.ones(64)),
        select_entropy_bounded(scores, candidates, torch.zeros(64)),
    ):
        assert not (selected & ~candidates).any()
        assert torch.equal(selected.any(-1), has_candidate)


@pytest.mark.parametrize("block_length", [1, 4, 7, 32])
def test_fixed_schedule_is_even_and_covers_the_block(block_length):
    for steps_per_block in range(1, block_length + 1):
        schedule = fixed_schedule(block_length, steps_per_block)
        assert len(schedule) == steps_per_block
        assert sum(schedule) == block_length
        assert max(schedule) - min(schedule) <= 1
        assert schedule == sorted(schedule, reverse=True)  # the larger steps come first
