r"""Spectral-norm estimation by power iteration."""

from __future__ import annotations

import torch
from torch import Tensor

from matrixopt.linalg._checks import check_matrix, check_positive_int
from matrixopt.linalg.svd import GeneratorLike, _gaussian, _prepare, _resolve_generator

__all__ = ["spectral_norm"]


def spectral_norm(A: Tensor, n_iter: int = 10, *, generator: GeneratorLike = None,
                  check_finite: bool = True) -> Tensor:
    r"""Estimate :math:`\sigma_{\max}(A) = \|A\|_2` of each matrix in a batch by power iteration.

    From a Gaussian start :math:`x_0` on the short side (length
    :math:`k = \min(m, n)`), ``n_iter`` steps of :math:`x \leftarrow M x / \|Mx\|`
    with :math:`M = A^\top A` (or :math:`AA^\top` for wide ``A``; never formed),
    then returns :math:`\|A x\|` (resp. :math:`\|A^\top x\|`), the square root of
    the Rayleigh quotient of ``M``.

    Accuracy: the result is a **lower bound**, :math:`\hat\sigma \le \sigma_{\max}`
    (up to round-off), for any start vector. Its error decays geometrically,
    roughly like :math:`(\sigma_2/\sigma_1)^{4k}` after ``k`` steps, when the top
    singular value is separated; without a gap, for a Gaussian start the
    expected relative error of :math:`\hat\sigma^2` is at most about
    :math:`0.871\,\ln(k)/(\text{n\_iter}-1)` (Kuczyński & Woźniakowski,
    "Estimating the largest eigenvalue by the power and Lanczos algorithms
    with a random start", SIAM J. Matrix Anal. Appl. 13(4), 1992). Multiply by
    a safety factor (e.g. 1.05) when an upper bound is needed, or use the
    Frobenius norm, which is a guaranteed (but up to :math:`\sqrt{\mathrm{rank}}`
    loose) upper bound.

    Cost: ``n_iter + 1`` products with ``A`` and ``A^T`` (:math:`4mn` flops per
    step); memory :math:`O(m + n)` per matrix beyond ``A``.

    Args:
        A: ``[..., m, n]`` real floating tensor.
        n_iter: power-iteration steps (>= 0).
        generator: start-vector randomness: ``None`` (fixed seed, reproducible,
            global RNG untouched), an int seed, or a ``torch.Generator`` on
            ``A``'s device.
        check_finite: raise ``ValueError`` on NaN/Inf (one host sync).

    Returns:
        ``[...]`` tensor of estimates in ``A``'s dtype (computed in at least
        float32); 0 for zero matrices.
    """
    A = check_matrix(A, "A")
    check_positive_int(n_iter, "n_iter", allow_zero=True)
    m, n = A.shape[-2:]
    batch = A.shape[:-2]
    if m == 0 or n == 0:
        return torch.zeros(batch, dtype=A.dtype, device=A.device)
    gen = _resolve_generator(generator, A.device)
    X, _, scale = _prepare(A, "A", check_finite)
    # Iterate on the short side so the vector (and its normalisation) is smallest.
    if m < n:
        X = X.mT
    x = _gaussian((*batch, X.shape[-1], 1), gen, X.device, X.dtype)
    x = x / torch.linalg.vector_norm(x, dim=-2, keepdim=True)
    for _ in range(n_iter):
        y = X.mT @ (X @ x)
        nrm = torch.linalg.vector_norm(y, dim=-2, keepdim=True)
        # A zero matrix gives y = 0; keep x instead of dividing by zero.
        x = torch.where(nrm > 0, y / torch.where(nrm > 0, nrm, torch.ones_like(nrm)), x)
    sigma = torch.linalg.vector_norm(X @ x, dim=(-2, -1))
    sigma = sigma * scale[..., 0, 0]
    return sigma.to(A.dtype)
