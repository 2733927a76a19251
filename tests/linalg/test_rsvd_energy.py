"""randomized_svd and lowrank_basis(method="rsvd") capture at least torch.svd_lowrank's
energy at equal oversampling and iterations (issue 13 item 10).

Captured energy, float64 ground truth: for a rank-r factor U (left) or Vh (right)
of A, ‖UᵀA‖²_F / Σ_{i≤r} σ_i² and ‖A Vhᵀ‖²_F / Σ_{i≤r} σ_i² (1 = the optimal
rank-r subspace, from torch.linalg.svdvals of A in float64). Before the fix,
sketching the short side of a wide matrix captured 0.677 of the energy in U at
n_iter=0 against torch's 0.836 (1024×2048, log-uniform spectrum, rank 64).
The sketches' random numbers differ from torch's, so "at least" allows 0.01.
"""

from __future__ import annotations

import pytest
import torch

from matrixopt.linalg import lowrank_basis, randomized_svd

F64 = torch.float64
RANK, OVERSAMPLE = 16, 8
TOL = 0.01


def _matrix(m: int, n: int, spectrum: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=F64)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=F64)).Q
    i = torch.arange(1, k + 1, dtype=F64)
    s = torch.logspace(0, -4, k, dtype=F64) if spectrum == "loguniform" else i.pow(-0.5)
    return ((U * s) @ V.mT).float()


def _energy(A: torch.Tensor, U: torch.Tensor | None = None,
            Vh: torch.Tensor | None = None) -> float:
    A = A.to(F64)
    r = (U if U is not None else Vh.mT).shape[-1]  # type: ignore[union-attr]
    best = torch.linalg.svdvals(A)[:r].square().sum()
    got = (U.to(F64).mT @ A) if U is not None else (A @ Vh.to(F64).mT)  # type: ignore[union-attr]
    return float(got.square().sum() / best)


@pytest.mark.parametrize("spectrum", ["loguniform", "powerlaw"])
@pytest.mark.parametrize("shape", [(128, 320), (320, 128), (192, 192)])
def test_at_least_torch_svd_lowrank_energy(shape: tuple[int, int], spectrum: str) -> None:
    m, n = shape
    A = _matrix(m, n, spectrum, seed=m + n)
    for n_iter in (0, 1, 2):
        torch.manual_seed(0)  # svd_lowrank draws from the global generator
        Ut, _, Vt = torch.svd_lowrank(A, q=RANK + OVERSAMPLE, niter=n_iter)
        t_u, t_v = _energy(A, U=Ut[:, :RANK]), _energy(A, Vh=Vt[:, :RANK].mT)
        U, S, Vh = randomized_svd(A, RANK, oversample=OVERSAMPLE, n_iter=n_iter)
        o_u, o_v = _energy(A, U=U), _energy(A, Vh=Vh)
        where = f"{shape} {spectrum} n_iter={n_iter}"
        assert o_u >= t_u - TOL, f"{where}: U energy {o_u:.4f} < torch {t_u:.4f}"
        assert o_v >= t_v - TOL, f"{where}: Vh energy {o_v:.4f} < torch {t_v:.4f}"
        # the projector's basis gets the extra multiplication on either side: at least
        # the better of torch's two factors
        best = max(t_u, t_v)
        P_left = lowrank_basis(A, RANK, method="rsvd", side="left", n_iter=n_iter,
                               oversample=OVERSAMPLE)
        P_right = lowrank_basis(A, RANK, method="rsvd", side="right", n_iter=n_iter,
                                oversample=OVERSAMPLE)
        b_l, b_r = _energy(A, U=P_left), _energy(A, Vh=P_right.mT)
        assert b_l >= best - TOL, f"{where}: left basis {b_l:.4f} < torch best {best:.4f}"
        assert b_r >= best - TOL, f"{where}: right basis {b_r:.4f} < torch best {best:.4f}"
