"""matrixopt.optim.functional.natural against a dense float64 reference: the explicit
inverse of F̂ = λI + ΓΓᵀ, the one-vector limit, row shards and the ring write."""

from __future__ import annotations

import pytest
import torch

from matrixopt.optim._nonfinite import StepFlags
from matrixopt.optim.functional.natural import natural_direction, window_push_


def _dense(g: torch.Tensor, window: torch.Tensor, lam: float) -> torch.Tensor:
    """solve(λI_k + ΓΓᵀ, g) per matrix, with the k × k matrix built explicitly."""
    b, r1, r2, s = window.shape
    out = []
    for i in range(b):
        G = window[i].reshape(r1 * r2, s).double()
        F = lam * torch.eye(r1 * r2, dtype=torch.float64) + G @ G.T
        out.append(torch.linalg.solve(F, g[i].reshape(-1).double()).reshape(r1, r2))
    return torch.stack(out)


@pytest.mark.parametrize("lam", [1e-3, 0.5, 30.0])
@pytest.mark.parametrize("filled", [1, 3, 4])
def test_equals_the_dense_inverse(lam: float, filled: int) -> None:
    gen = torch.Generator().manual_seed(filled)
    b, r1, r2, s = 2, 3, 5, 4
    window = torch.zeros(b, r1, r2, s, dtype=torch.float64)
    window[..., :filled] = torch.randn(b, r1, r2, filled, generator=gen, dtype=torch.float64)
    g = window[..., 0].clone()  # the current gradient is in the window
    want = _dense(g, window, lam)
    torch.testing.assert_close(natural_direction(g, window, lam), want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(natural_direction(g, window, lam, slot=0), want,
                               rtol=1e-10, atol=1e-12)
    # a gradient outside the window too
    h = torch.randn(b, r1, r2, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(natural_direction(h, window, lam), _dense(h, window, lam),
                               rtol=1e-10, atol=1e-10)


def test_one_vector_window_is_a_scaled_gradient() -> None:
    """Γ = [g] (derived): F̂⁻¹g = g/(λ + ‖g‖²)."""
    g = torch.randn(1, 4, 6, dtype=torch.float64)
    window = torch.zeros(1, 4, 6, 5, dtype=torch.float64)
    window[..., 2] = g
    lam = 0.3
    torch.testing.assert_close(natural_direction(g, window, lam),
                               g / (lam + g.square().sum()), rtol=1e-12, atol=0)


def test_float32_in_window_form_avoids_cancellation() -> None:
    """λ = 1e-3 ≪ ‖Γ‖² (the paper's setting): the ``slot`` form stays accurate in
    float32 where g − Γw cancels almost all digits."""
    gen = torch.Generator().manual_seed(3)
    window = torch.randn(1, 8, 16, 5, generator=gen)
    g = window[..., 1].clone()
    got = natural_direction(g, window, 1e-3, slot=1)
    assert got.dtype == torch.float32
    want = _dense(g.double(), window.double(), 1e-3)
    err = (got.double() - want).norm() / want.norm()
    assert err < 1e-4, float(err)


@pytest.mark.parametrize("slot", [None, 2])
def test_row_shards_sum_through_reduce(slot: int | None) -> None:
    """Two row blocks whose ΓᵀΓ | Γᵀg are summed by ``reduce`` give the whole result."""
    gen = torch.Generator().manual_seed(5)
    window = torch.randn(1, 10, 3, 4, generator=gen, dtype=torch.float64)
    g = (torch.randn(1, 10, 3, generator=gen, dtype=torch.float64) if slot is None
         else window[..., slot].clone())
    parts = [(g[:, :6], window[:, :6]), (g[:, 6:], window[:, 6:])]
    seen: list[torch.Tensor] = []
    for gi, wi in parts:  # each block's partial products
        natural_direction(gi, wi, 0.1, reduce=lambda t: seen.append(t.clone()) or t, slot=slot)
    total = seen[0] + seen[1]
    got = torch.cat([natural_direction(gi, wi, 0.1, reduce=lambda t: total.clone(), slot=slot)
                     for gi, wi in parts], dim=1)
    torch.testing.assert_close(got, _dense(g, window, 0.1), rtol=1e-10, atol=1e-12)


def test_ring_write_keeps_the_slot_on_a_skipped_step() -> None:
    window = torch.randn(2, 3, 4, 3)
    before = window.clone()
    g = torch.randn(2, 3, 4)
    skip = StepFlags([torch.tensor(False)])
    window_push_(window, g, 1, skip)
    torch.testing.assert_close(window, before, rtol=0, atol=0)
    window_push_(window, g, 1, StepFlags([torch.tensor(True)]))
    torch.testing.assert_close(window[..., 1], g, rtol=0, atol=0)
    torch.testing.assert_close(window[..., [0, 2]], before[..., [0, 2]], rtol=0, atol=0)
