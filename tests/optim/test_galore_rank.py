"""Per-matrix rank choice (matrixopt.optim.galore._rank) against float64 brute force."""

from __future__ import annotations

import itertools

import pytest
import torch

from matrixopt.optim.galore._rank import adam_rank_cost, budget_ranks, energy_ranks


def _spectrum(gen, k, decay):
    return torch.linspace(0, 1, k, dtype=torch.float64).mul(-decay).exp() * (
        1 + torch.rand(1, generator=gen, dtype=torch.float64).item() * 100)


def _captured(spectra, ranks):
    total = 0.0
    for s, r in zip(spectra, ranks):
        e = sorted((float(x) ** 2 for x in s), reverse=True)
        total += sum(e[:r]) / sum(e)
    return total


def _brute(spectra, costs, budget):
    best, arg = -1.0, None
    for ranks in itertools.product(*[range(1, len(s) + 1) for s in spectra]):
        if sum(c * r for c, r in zip(costs, ranks)) <= budget:
            val = _captured(spectra, ranks)
            if val > best + 1e-15:
                best, arg = val, ranks
    return best, arg


@pytest.mark.parametrize("seed", range(6))
def test_budget_ranks_equal_costs_is_the_exact_optimum(seed):
    gen = torch.Generator().manual_seed(seed)
    spectra = [_spectrum(gen, 5, d) for d in (0.5, 3.0, 8.0)]
    costs = [7, 7, 7]
    budget = 7 * 8
    ranks = budget_ranks(spectra, costs, budget)
    best, _ = _brute(spectra, costs, budget)
    assert sum(c * r for c, r in zip(costs, ranks)) <= budget
    assert _captured(spectra, ranks) == pytest.approx(best, rel=1e-12)
    # the flat spectrum gets more rank than the steep one
    assert ranks[0] >= ranks[2]


@pytest.mark.parametrize("seed", range(6))
def test_budget_ranks_unequal_costs_within_one_direction_of_the_optimum(seed):
    gen = torch.Generator().manual_seed(100 + seed)
    spectra = [_spectrum(gen, k, d) for k, d in ((4, 1.0), (6, 4.0), (5, 0.2))]
    costs = [adam_rank_cost(4, 12), adam_rank_cost(6, 20), adam_rank_cost(5, 9)]
    budget = 0.5 * sum(2 * m * n for m, n in ((4, 12), (6, 20), (5, 9)))
    ranks = budget_ranks(spectra, costs, budget)
    best, _ = _brute(spectra, costs, budget)
    assert sum(c * r for c, r in zip(costs, ranks)) <= budget
    # greedy by energy per byte: optimal up to the one direction that did not fit
    largest_step = max(float(s[1] ** 2 / s.square().sum()) for s in spectra)
    assert best - largest_step - 1e-12 <= _captured(spectra, ranks) <= best + 1e-12


def test_budget_ranks_edge_cases():
    s = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    z = torch.zeros(3, dtype=torch.float64)
    assert budget_ranks([s, s], [1, 1], 1) == [1, 1]          # rank 1 even over budget
    assert budget_ranks([s, s], [1, 1], 100) == [3, 3]        # capped at min(m, n)
    assert budget_ranks([z, s], [1, 1], 100) == [1, 3]        # zero energy is never bought
    assert budget_ranks([s, s], [1, 1], 3) == [2, 1]          # ties: lower index first
    with pytest.raises(ValueError, match="rank_budget"):
        budget_ranks([s], [1], 0)
    with pytest.raises(ValueError, match=r"costs\[0\]"):
        budget_ranks([s], [0], 5)
    with pytest.raises(ValueError, match=r"spectra\[0\]"):
        budget_ranks([torch.tensor([1.0, float("nan")])], [1], 5)


def test_energy_ranks_float64():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0], dtype=torch.float64)  # energies 16, 4, 1, 1 of 22
    assert energy_ranks([s], 16 / 22) == [1]
    assert energy_ranks([s], 16 / 22 + 1e-6) == [2]
    assert energy_ranks([s], 0.95) == [3]
    assert energy_ranks([s], 1.0) == [4]
    assert energy_ranks([torch.zeros(3)], 0.9) == [1]
    with pytest.raises(ValueError, match="rank_energy"):
        energy_ranks([s], 1.5)
