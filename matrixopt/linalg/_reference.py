r"""Float64 ground truths for the accurate linear algebra (used by tests and benchmarks).

Deliberately plain: everything goes through one float64 ``torch.linalg.svd``
(LAPACK) and the textbook formulas, with no scaling tricks, iteration or
randomness, so a test comparing :mod:`matrixopt.linalg` against these checks the
production code against an independent computation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "polar_reference",
    "top_basis",
    "singular_values",
    "captured_energy",
    "principal_angle_sines",
    "halko_spectral_factor",
    "transport_moments_reference",
]


def _f64(A: Tensor) -> Tensor:
    return A.detach().to(dtype=torch.float64, device="cpu")


def polar_reference(A: Tensor, side: str = "right") -> tuple[Tensor, Tensor]:
    r"""Float64 polar factors from the thin SVD :math:`A = W S V^\top`.

    ``U = W Vᵀ``; ``H = V S Vᵀ`` (right, ``A = U H``) or ``W S Wᵀ`` (left,
    ``A = H U``) -- scipy.linalg.polar's formulas, batched.
    """
    X = _f64(A)
    W, S, Vh = torch.linalg.svd(X, full_matrices=False)
    U = W @ Vh
    if side == "right":
        H = Vh.mT @ torch.diag_embed(S) @ Vh
    elif side == "left":
        H = W @ torch.diag_embed(S) @ W.mT
    else:
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    return U, H


def singular_values(A: Tensor) -> Tensor:
    """Float64 singular values, descending, ``[..., min(m, n)]``."""
    return torch.linalg.svdvals(_f64(A))


def top_basis(G: Tensor, rank: int, side: str) -> Tensor:
    """Exact top-``rank`` singular vectors of ``G`` on ``side`` ("left": m×r, "right": n×r)."""
    W, _, Vh = torch.linalg.svd(_f64(G), full_matrices=False)
    if side == "left":
        return W[..., :rank]
    if side == "right":
        return Vh[..., :rank, :].mT
    raise ValueError(f"side must be 'left' or 'right', got {side!r}")


def captured_energy(P: Tensor, G: Tensor, side: str) -> Tensor:
    r"""Fraction of the optimal rank-r energy an orthonormal basis ``P`` captures.

    :math:`\|P^\top G\|_F^2 / \sum_{i \le r} \sigma_i(G)^2` (left) or
    :math:`\|G P\|_F^2 / \sum_{i \le r}\sigma_i^2` (right), ``r = P.shape[-1]``;
    1 for the exact top-r singular subspace, < 1 otherwise (Eckart–Young), per
    matrix ``[...]``. Zero matrices give 1.
    """
    Pd, Gd = _f64(P), _f64(G)
    R = Pd.mT @ Gd if side == "left" else Gd @ Pd
    r = P.shape[-1]
    best = (torch.linalg.svdvals(Gd)[..., :r] ** 2).sum(-1)
    got = (R ** 2).sum(dim=(-2, -1))
    return torch.where(best > 0, got / torch.where(best > 0, best, torch.ones_like(best)),
                       torch.ones_like(best))


def principal_angle_sines(P: Tensor, Q: Tensor) -> Tensor:
    r"""Sines of the principal angles between ``span(Q)`` and ``span(P)`` (orthonormal columns).

    Computed as the singular values of :math:`(I - PP^\top)Q` (Björck & Golub
    1973), accurate for tiny angles where :math:`\sqrt{1-\cos^2}` is not;
    largest first. Requires ``Q.shape[-1] <= P.shape[-1]``.
    """
    Pd, Qd = _f64(P), _f64(Q)
    return torch.linalg.svdvals(Qd - Pd @ (Pd.mT @ Qd))


def halko_spectral_factor(k: int, p: int, m: int, n: int, q: int) -> float:
    r"""Halko–Martinsson–Tropp 2011 spectral-error factor for the range finder.

    Eq. (1.9)/(1.11) and Corollary 10.10: with a Gaussian test matrix of
    :math:`k+p` columns (:math:`p \ge 4`) and ``q`` power iterations,
    :math:`\|A - QQ^\top A\|_2 \le [1 + 11\sqrt{k+p}\,\sqrt{\min(m,n)}]^{1/(2q+1)}\sigma_{k+1}`
    with probability at least :math:`1 - 6p^{-p}`. Returns the bracket to the
    power :math:`1/(2q+1)`.
    """
    return (1.0 + 11.0 * math.sqrt(k + p) * math.sqrt(min(m, n))) ** (1.0 / (2 * q + 1))


def transport_moments_reference(m: Tensor, v: Tensor, QL: Tensor | None, QR: Tensor | None
                                ) -> tuple[Tensor, Tensor]:
    r"""LDAdam's moment transport written out entry by entry in float64 (2-D only).

    New entry :math:`(a, b)`: mean :math:`\sum_{ij} L_{ai} m_{ij} R_{bj}`, variance
    :math:`\sum_{ij} L_{ai}^2 R_{bj}^2 (v_{ij} - m_{ij}^2)`; returns the mean and
    ``|variance + mean²|``. ``QL``/``QR`` ``None`` means identity on that side.
    """
    md, vd = _f64(m), _f64(v)
    L = _f64(QL) if QL is not None else torch.eye(md.shape[0], dtype=torch.float64)
    R = _f64(QR) if QR is not None else torch.eye(md.shape[1], dtype=torch.float64)
    out_m = torch.zeros(L.shape[0], R.shape[0], dtype=torch.float64)
    out_v = torch.zeros_like(out_m)
    for a in range(L.shape[0]):
        for b in range(R.shape[0]):
            mean = 0.0
            var = 0.0
            for i in range(md.shape[0]):
                for j in range(md.shape[1]):
                    w = float(L[a, i] * R[b, j])
                    mean += w * float(md[i, j])
                    var += w * w * float(vd[i, j] - md[i, j] ** 2)
            out_m[a, b] = mean
            out_v[a, b] = abs(var + mean * mean)
    return out_m, out_v
