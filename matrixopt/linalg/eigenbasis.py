r"""Eigenbases of symmetric PSD matrices, kept up to date cheaply (SOAP's preconditioner).

SOAP (Vyas et al. 2024, "SOAP: Improving and Stabilizing Shampoo using Adam",
arXiv:2409.11321) runs Adam in the eigenbasis of Shampoo's Kronecker factors
:math:`L = \mathbb{E}[GG^\top]`, :math:`R = \mathbb{E}[G^\top G]`. The basis is
computed once by a full eigendecomposition (:func:`eigh_basis`) and afterwards
refreshed by one step of warm-started subspace (power) iteration
(:func:`eigh_refresh`):

.. math::
    \hat\lambda = \operatorname{diag}(Q^\top A Q),\quad
    \pi = \operatorname{argsort}(\hat\lambda)\ \text{(descending)},\quad
    Q' = \operatorname{qr}(A\,Q_{:,\pi}).Q

Since ``A Q[:, π] = (A Q)[:, π]`` one product ``A Q`` serves both the Rayleigh
quotients and the power step: cost per ``d × d`` matrix one matmul
(:math:`2d^3` flops) and one Householder QR (:math:`\tfrac43 d^3`), against
about :math:`9d^3` for ``eigh``. All functions are batched over leading dims,
compute in at least float32, never read a device tensor on the host and never
return NaN: a non-finite or all-zero input keeps the previous basis (or the
identity) and reports it in the returned ``ok`` flag.

Eigenvector signs are arbitrary; :func:`eigh_refresh` flips each new column to
a non-negative dot product with the previous (permuted) column, as the GaLore
projectors do (:mod:`matrixopt.linalg.projectors`), so a basis that has
converged stays put between refreshes. SOAP's update does not depend on these
signs (the Adam map is odd in each rotated coordinate), only state read-outs do.

The Rayleigh quotients must come from true float32 (or float64) products: with
TF32 matmuls on a spectrum spanning many decades they misorder (NVIDIA
emerging-optimizers notes); on CUDA keep ``torch.backends.cuda.matmul.allow_tf32``
off for the optimizer step or pass float64 factors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_matrix

__all__ = ["eigh_basis", "eigh_refresh", "permute_dim"]


def _work_dtype(A: Tensor) -> torch.dtype:
    return torch.float64 if A.dtype == torch.float64 else torch.float32


def _check_square(A: Tensor, name: str) -> None:
    check_matrix(A, name)
    if A.shape[-1] != A.shape[-2]:
        raise ValueError(f"{name} must be square [..., d, d], got shape {tuple(A.shape)}")


def _usable(A: Tensor) -> Tensor:
    """Per matrix: all entries finite and a positive trace (not all-zero), as a bool
    ``[...]`` tensor on ``A``'s device (no host read)."""
    finite = torch.isfinite(A).flatten(-2).all(dim=-1)
    tr = torch.diagonal(A, dim1=-2, dim2=-1).sum(-1)
    return finite & (torch.nan_to_num(tr, nan=0.0, posinf=0.0, neginf=0.0) > 0)


def _eye_like(A: Tensor, dtype: torch.dtype) -> Tensor:
    d = A.shape[-1]
    return torch.eye(d, dtype=dtype, device=A.device).expand(A.shape).clone()


def eigh_basis(A: Tensor, *, descending: bool = True) -> tuple[Tensor, Tensor]:
    r"""Orthonormal eigenvectors of symmetric ``A [..., d, d]`` as columns, ordered by
    eigenvalue (descending by default, SOAP's order), and a per-matrix ``ok`` flag.

    Computed by ``torch.linalg.eigh`` of :math:`A + 10^{-30} I` in float32 (float64
    for float64 input); a matrix that is non-finite or all zero gets the identity
    (``ok`` false). If the float32 ``eigh`` fails to converge it is retried in
    float64 (SOAP's fallback for rank-deficient factors on CUDA). Cost: one
    ``eigh``, about :math:`9d^3` flops per matrix.

    Returns:
        ``(Q, ok)``: ``Q`` in the working dtype (float32/float64) with ``Q^T Q = I``;
        ``ok`` a bool tensor of shape ``A.shape[:-2]``.
    """
    _check_square(A, "A")
    dt = _work_dtype(A)
    ok = _usable(A)
    eye = _eye_like(A, dt)
    # a non-finite matrix is replaced by the identity before eigh (LAPACK on NaN may
    # raise or loop); its result is discarded below
    M = torch.where(ok[..., None, None], A.to(dt), eye) + 1e-30 * eye
    try:
        _, Q = torch.linalg.eigh(M)
    except RuntimeError:  # no convergence: the float64 retry (SOAP's)
        _, Q = torch.linalg.eigh(M.double())
        Q = Q.to(dt)
    if descending:
        Q = torch.flip(Q, dims=(-1,))
    Q = torch.where(ok[..., None, None] & torch.isfinite(Q), Q, eye)
    return Q, ok


def eigh_refresh(A: Tensor, Q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""One warm-started power-iteration step + QR towards the eigenvectors of ``A``.

    For symmetric PSD ``A [..., d, d]`` and the previous orthonormal basis ``Q``
    (same shape), returns ``(Q', perm, ok)``:

    * ``perm [..., d]`` (int64): the columns of ``Q`` ordered by their Rayleigh
      quotients :math:`q_i^\top A q_i`, largest first;
    * :math:`Q' = \operatorname{qr}(A Q_{:,\pi}).Q`, each column sign-aligned with
      the matching column of :math:`Q_{:,\pi}`;
    * ``ok [...]`` (bool): false where ``A`` is non-finite or all zero, or the QR
      produced a non-finite value; there ``Q' = Q`` and ``perm`` is the identity.

    Computed in float32 (float64 for float64 input). The power step converges to
    the eigenvectors at the rate of the eigenvalue ratios; repeated calls with a
    slowly changing ``A`` track its eigenbasis (SOAP, Algorithm 4). Cost: one
    ``d × d`` matmul and one QR per matrix. No host read of a device tensor.
    """
    _check_square(A, "A")
    _check_square(Q, "Q")
    if A.shape != Q.shape:
        raise ValueError(f"A and Q must have the same shape, got {tuple(A.shape)} and "
                         f"{tuple(Q.shape)}")
    dt = _work_dtype(A)
    ok = _usable(A)
    Qw = Q.to(dt)
    Aw = torch.where(ok[..., None, None], A.to(dt), torch.zeros((), dtype=dt, device=A.device))
    # (A Q)^T = Q^T A (A symmetric): the columns of A Q as contiguous rows, so the
    # column permutation is a row gather (index_select), not an elementwise gather
    Qt = Qw.mT.contiguous()
    QtA = Qt @ Aw
    rayleigh = (QtA * Qt).sum(dim=-1)
    perm = torch.argsort(rayleigh, dim=-1, descending=True, stable=True)
    d = A.shape[-1]
    base = torch.arange(perm.numel() // d, device=perm.device) * d
    rows = (perm + base.view(*perm.shape[:-1], 1)).reshape(-1)

    def pick(X: Tensor) -> Tensor:  # rows of every matrix of X reordered by perm
        return torch.index_select(X.reshape(-1, d), 0, rows).view(X.shape)

    Qn = torch.linalg.qr(pick(QtA).mT).Q
    dots = (Qn.mT * pick(Qt)).sum(dim=-1).unsqueeze(-2)
    Qn = Qn * torch.where(dots < 0, -1.0, 1.0).to(dt)
    ok = ok & torch.isfinite(Qn).flatten(-2).all(dim=-1)
    Qn = torch.where(ok[..., None, None], Qn, Qw)
    ident = torch.arange(A.shape[-1], device=A.device).expand(perm.shape)
    perm = torch.where(ok[..., None], perm, ident)
    return Qn, perm, ok


def permute_dim(x: Tensor, perm: Tensor, dim: int) -> Tensor:
    """``x`` with its entries along ``dim`` reordered by ``perm`` (a 1-D index of
    length ``x.shape[dim]``): ``out.select(dim, i) = x.select(dim, perm[i])``. Used
    to carry SOAP's second moment, whose coordinates follow the basis columns."""
    if perm.ndim != 1 or perm.shape[0] != x.shape[dim]:
        raise ValueError(f"perm must be 1-D of length x.shape[{dim}] = {x.shape[dim]}, got "
                         f"shape {tuple(perm.shape)}")
    return torch.index_select(x, dim, perm)
