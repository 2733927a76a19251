r"""Per-matrix GaLore ranks from the gradients' singular-value spectra.

WeLore (Jaiswal et al. 2024, "From GaLore to WeLore: How Low-Rank Weights
Non-uniformly Emerge from Low-Rank Gradients") observes that the low-rank
structure of the gradients differs across layers, so one rank for every matrix
spends state where the spectrum is flat-topped and starves matrices whose energy
is spread out. These functions choose a rank per matrix from its gradient's
singular values :math:`\sigma_{i,1} \ge \sigma_{i,2} \ge \dots`:

* :func:`energy_ranks` — the smallest :math:`r_i` capturing a fraction :math:`e`
  of the energy, :math:`\sum_{k \le r_i} \sigma_{i,k}^2 \ge e \sum_k \sigma_{i,k}^2`.
* :func:`budget_ranks` — a state budget: maximise the captured relative energy
  :math:`\sum_i \sum_{k \le r_i} \sigma_{i,k}^2 / \|G_i\|_F^2` subject to
  :math:`\sum_i c_i r_i \le B` (:math:`c_i` the state bytes one unit of rank costs
  matrix :math:`i`, :math:`B` a fraction of AdamW's state bytes of the same
  matrices), :math:`1 \le r_i \le \min(m_i, n_i)`. Greedy water-filling: every
  matrix starts at rank 1, then the next singular direction with the largest
  captured energy per byte is added while it fits. The gains of one matrix are
  non-increasing (sorted spectrum), so this is the optimum of the fractional
  relaxation up to the last direction that no longer fits; with equal
  :math:`c_i` it is the exact optimum.

Relative energy (each matrix's spectrum divided by its squared Frobenius norm)
makes the choice independent of the gradients' scales, which differ by orders of
magnitude across layers. Ties go to the lower matrix index, so the choice is a
deterministic function of the spectra: identical on every process that holds
the same (reduced) gradients. Cost: a heap over the directions, :math:`O(K \log
M)` for :math:`K` chosen directions over :math:`M` matrices, on the CPU in
float64 (the spectra are read to the host once per choice).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["adam_rank_cost", "energy_ranks", "budget_ranks"]


def adam_rank_cost(m: int, n: int) -> int:
    """State entries one unit of rank costs GaLoreAdamW on an ``m × n`` matrix
    projected on its short side: two moment rows of the long side plus a basis
    column of the short side, ``2·max(m, n) + min(m, n)``."""
    return 2 * max(m, n) + min(m, n)


def _relative(spectrum: Tensor, name: str) -> Tensor:
    s = spectrum.detach().to("cpu", torch.float64).flatten()
    if s.numel() == 0:
        raise ValueError(f"{name}: empty spectrum")
    if not torch.isfinite(s).all() or (s < 0).any():
        raise ValueError(f"{name}: singular values must be finite and >= 0, got {s.tolist()}")
    e = s.square().sort(descending=True).values
    total = e.sum()
    return e / total if total > 0 else torch.zeros_like(e)


def energy_ranks(spectra: Sequence[Tensor], energy: float) -> list[int]:
    r"""Per matrix the smallest rank whose leading singular directions capture the
    fraction ``energy`` (in ``(0, 1]``) of :math:`\|G_i\|_F^2`; 1 for a zero gradient."""
    if not 0.0 < float(energy) <= 1.0:
        raise ValueError(f"rank_energy must be in (0, 1], got {energy}")
    ranks = []
    for i, s in enumerate(spectra):
        e = _relative(s, f"spectra[{i}]")
        if not e.any():  # a zero gradient: nothing to capture
            ranks.append(1)
            continue
        cum = e.cumsum(0)
        # the smallest r with cum[r-1] >= energy (a tiny slack for float64 rounding)
        r = int((cum < float(energy) - 1e-12).sum()) + 1
        ranks.append(max(1, min(r, e.numel())))
    return ranks


def budget_ranks(spectra: Sequence[Tensor], costs: Sequence[int | float],
                 budget: float) -> list[int]:
    r"""Ranks maximising the captured relative energy under ``Σ costs[i]·r_i ≤ budget``
    (module docstring). Every matrix gets at least rank 1, even when that alone
    exceeds the budget (a GaLore matrix needs a subspace)."""
    if len(spectra) != len(costs):
        raise ValueError(f"{len(spectra)} spectra but {len(costs)} costs")
    if not budget > 0:
        raise ValueError(f"rank_budget must give a positive budget, got {budget}")
    for i, c in enumerate(costs):
        if not float(c) > 0:
            raise ValueError(f"costs[{i}] must be > 0, got {c}")
    rel = [_relative(s, f"spectra[{i}]").tolist() for i, s in enumerate(spectra)]
    ranks = [1] * len(rel)
    left = float(budget) - sum(float(c) for c in costs)
    # max-heap on energy per byte of each matrix's next direction; ties: lower index
    # (directions with zero energy are never bought)
    heap = [(-rel[i][1] / float(costs[i]), i) for i in range(len(rel))
            if len(rel[i]) > 1 and rel[i][1] > 0]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        if float(costs[i]) > left:
            continue  # this matrix's next direction does not fit; cheaper ones may
        left -= float(costs[i])
        ranks[i] += 1
        if ranks[i] < len(rel[i]) and rel[i][ranks[i]] > 0:
            heapq.heappush(heap, (-rel[i][ranks[i]] / float(costs[i]), i))
    return ranks
