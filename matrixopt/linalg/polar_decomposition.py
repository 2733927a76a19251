r"""Accurate polar decomposition :math:`A = UH` (or :math:`A = HU`), batched.

Contract (scipy.linalg.polar, also jax.scipy.linalg.polar), for ``A`` of shape
``[..., m, n]``:

* ``side="right"``: :math:`A = U H`, ``U`` is ``[..., m, n]``, ``H`` is ``[..., n, n]``;
* ``side="left"``:  :math:`A = H U`, ``U`` is ``[..., m, n]``, ``H`` is ``[..., m, m]``;
* ``U`` has orthonormal columns if :math:`m \ge n` and orthonormal rows if
  :math:`m < n` (the "canonical polar decomposition" of Higham, *Functions of
  Matrices*, 2008, §8.1); ``H`` is symmetric positive semidefinite. With the thin
  SVD :math:`A = W S V^\top`: :math:`U = W V^\top` (the same for both sides),
  :math:`H = V S V^\top` (right) or :math:`W S W^\top` (left).

``H`` is unique; ``U`` is unique iff ``A`` has full rank :math:`\min(m,n)`. For a
zero matrix ``U`` is the leading ``m×n`` block of the identity, as scipy returns
(LAPACK's singular vectors of a zero matrix), and ``H = 0``.

Methods:

``"svd"``
    one thin SVD (LAPACK ``gesdd`` on CPU), then two products. Backward stable;
    handles rank-deficient input. Cost :math:`O(mn\min(m,n))` with a large
    constant and little parallelism.
``"newton_schulz"``
    matmul-only polynomial iteration :math:`X \leftarrow X(aI + bX^\top X)` on
    the short side (cubic Newton–Schulz, Higham 2008 §8.3; Kovarik 1970), with
    per-step *scaled* coefficients: each step uses the odd cubic that is
    minimax-optimal on the current interval :math:`[\ell, 1]` of singular values
    (closed form; Chen & Chow, "A stable scaling of Newton–Schulz for improving
    the sign function computation of a Hermitian matrix", 2014; the quintic
    analogue is Polar Express, Amsel et al. 2025), which grows small singular
    values by up to 2.6× per step instead of 1.5×, and reduces to the classic
    :math:`(3/2, -1/2)` step once :math:`\ell \to 1`. The input is divided by
    :math:`1.01\|A\|_F \ge \sigma_{\max}` and :math:`\ell_0 = 10^{-3}/\sqrt{k}`
    (exact for condition numbers up to 1e3; smaller singular values still grow
    at least 1.5× per step). The iteration stops when every matrix satisfies
    :math:`\|X^\top X - I\|_F \le` ``tol`` (short-side Gram, computed anyway for
    the step) or when, in the quadratic regime, round-off stops further
    progress. Cost :math:`4mnk` flops per step, :math:`k = \min(m,n)`; about
    10–20 steps for :math:`\kappa \le 10^3`. It converges for full-rank input;
    exactly rank-deficient input (e.g. a zero column) never converges and raises
    ``torch.linalg.LinAlgError`` after ``max_steps``.
``"auto"``
    :func:`select_polar_method` decides: the SVD route on CPU (as fast as or
    faster than the iteration for square and 4:1 inputs of size 256–2048 in
    ``benchmarks/bench_polar.py`` on a 2-core AVX-512 CPU, and exact for
    rank-deficient input), the iteration on CUDA for :math:`\min(m,n) \ge 64`
    (matmul-bound, where GPU SVDs are slow; not measured here, no GPU), with the
    SVD route as fallback for any matrix whose iteration did not converge.

Precision: float16/bfloat16 inputs are computed in float32 and returned in the
input dtype; each matrix is first divided by its largest entry so that inputs
near 1e30 or 1e-30 stay finite in float32.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from matrixopt.kernels.reference import gram, poly_step
from matrixopt.linalg._checks import check_choice, check_matrix, check_positive_int
from matrixopt.linalg.svd import _compute_dtype, _prepare

__all__ = ["PolarResult", "polar", "select_polar_method", "POLAR_METHODS"]

POLAR_METHODS = ("auto", "svd", "newton_schulz")

# Assumed bound on the condition number for the first iteration interval.
_KAPPA0 = 1e3
# Extra division of the Frobenius-normalised input: keeps sigma_max safely
# below the positive root sqrt(1 + l + l^2) of the first scaled polynomial.
_SAFETY = 1.01
# Smallest matrix side for which "auto" uses the iteration on CUDA.
_CUDA_NS_MIN_SIDE = 64


class PolarResult(NamedTuple):
    """Factors of the polar decomposition: ``A = U @ H`` (right) or ``A = H @ U`` (left)."""

    U: Tensor
    H: Tensor


def select_polar_method(A: Tensor) -> Literal["svd", "newton_schulz"]:
    """The method ``polar(A, method="auto")`` uses for this tensor (device, shape).

    Rule: ``"newton_schulz"`` on CUDA when ``min(m, n) >= 64``; ``"svd"``
    otherwise (on CPU the LAPACK SVD route was as fast or faster at every size
    measured, see the module docstring).
    """
    A = check_matrix(A, "A")
    if A.device.type == "cuda" and min(A.shape[-2:]) >= _CUDA_NS_MIN_SIDE:
        return "newton_schulz"
    return "svd"


def _default_tol(dtype: torch.dtype, k: int) -> float:
    # Round-off floor of ||X^T X - I||_F for an orthonormal X is about
    # eps * k (k^2 entries with errors ~ eps * sqrt(n)); allow a margin.
    eps = torch.finfo(dtype).eps
    return 10.0 * eps * max(k, 1)


def _scaled_cubic(lower: float) -> tuple[float, float, float]:
    r"""Minimax odd cubic on ``[lower, 1]``, rescaled so its maximum there is 1.

    For :math:`p(x) = a x - \beta x^3` equioscillating at ``lower``,
    :math:`x^* = \sqrt{(1+\ell+\ell^2)/3}` and 1 (error :math:`\mp E`):
    :math:`\beta = 2 / (\tfrac23(1+\ell+\ell^2)x^* + \ell + \ell^2)`,
    :math:`a = \beta(1+\ell+\ell^2)`, :math:`E = 1 - \beta(\ell+\ell^2)`.
    Returns :math:`(a/(1+E), -\beta/(1+E), \ell')` with
    :math:`\ell' = (1-E)/(1+E)`, the new lower end; ``lower = 1`` gives the
    classic :math:`(3/2, -1/2)`.
    """
    s = 1.0 + lower + lower * lower
    xs = math.sqrt(s / 3.0)
    beta = 2.0 / (2.0 / 3.0 * s * xs + lower + lower * lower)
    a = beta * s
    err = 1.0 - beta * (lower + lower * lower)
    return a / (1.0 + err), -beta / (1.0 + err), (1.0 - err) / (1.0 + err)


def _newton_schulz(X: Tensor, tol: float, max_steps: int) -> tuple[Tensor, Tensor, int]:
    """Iterate to the orthonormal polar factor.

    ``X`` is in the compute dtype with entries in range (see ``svd._prepare``).

    Returns ``(U, converged, steps)``; ``converged`` is a bool tensor ``[...]``.
    """
    m, n = X.shape[-2:]
    tall = m >= n
    k = min(m, n)
    fro = torch.linalg.matrix_norm(X)[..., None, None]
    nonzero = fro > 0
    X = X / (_SAFETY * torch.where(nonzero, fro, torch.ones_like(fro)))
    eye_k = torch.eye(k, dtype=X.dtype, device=X.device)
    lower = 1.0 / (_KAPPA0 * math.sqrt(k))
    res_prev = math.inf
    converged = torch.zeros(X.shape[:-2], dtype=torch.bool, device=X.device)
    steps = 0
    while True:
        G = gram(X, transpose=tall)
        res = torch.linalg.matrix_norm(G - eye_k)
        # Zero matrices are handled by the caller; they must not block the stop.
        res = torch.where(nonzero[..., 0, 0], res, torch.zeros_like(res))
        converged = res <= tol
        r = float(res.max()) if res.numel() else 0.0
        if r <= tol:
            converged = torch.ones_like(converged)
            break
        # Quadratic regime (all sigma^2 within 0.1 of 1, classic-like steps): a
        # residual that no longer at least halves is the round-off floor.
        if lower >= 0.9 and r < 0.1 and r > 0.5 * res_prev:
            converged = torch.ones_like(converged)
            break
        if steps >= max_steps:
            break
        res_prev = r
        hi = 1.0
        if r < 1.0:
            # ||G - I||_2 <= r bounds every sigma^2 to [1 - r, 1 + r]: a rigorous
            # interval, often much tighter than the tracked one.
            lo_r = math.sqrt((1.0 - r) / (1.0 + r))
            if lo_r > lower:
                lower, hi = lo_r, math.sqrt(1.0 + r)
        a, b, lower = _scaled_cubic(lower)
        # p(x / hi) = (a / hi) x + (b / hi^3) x^3
        a, b = a / hi, b / hi**3
        X = poly_step(X, b * G, a, right=tall)
        steps += 1
    return X, converged, steps


def _polar_svd(X: Tensor, side: str) -> tuple[Tensor, Tensor]:
    W, S, Vh = torch.linalg.svd(X, full_matrices=False)
    U = W @ Vh
    if side == "right":
        H = (Vh.mT * S[..., None, :]) @ Vh
    else:
        H = (W * S[..., None, :]) @ W.mT
    return U, H


def polar(A: Tensor, side: Literal["right", "left"] = "right", *,
          method: Literal["auto", "svd", "newton_schulz"] = "auto",
          tol: float | None = None, max_steps: int = 100,
          check_finite: bool = True) -> PolarResult:
    r"""Polar decomposition ``A = U H`` (``side="right"``) or ``A = H U`` (``side="left"``).

    See the module docstring for the contract (scipy.linalg.polar's, batched
    over leading dimensions), the methods and their cost.

    Args:
        A: ``[..., m, n]`` real floating tensor (tall, square or wide).
        side: ``"right"`` (``A = U H``, ``H`` is n×n) or ``"left"`` (``A = H U``,
            ``H`` is m×m).
        method: ``"auto"`` (:func:`select_polar_method`), ``"svd"`` or
            ``"newton_schulz"``.
        tol: stopping tolerance of the iteration on
            :math:`\|U^\top U - I\|_F` (short side); default
            :math:`10\,\epsilon\,\min(m,n)` for the compute dtype (float32 for
            half inputs). Ignored by the SVD route, which is accurate to round-off.
        max_steps: iteration cap; ``newton_schulz`` raises
            ``torch.linalg.LinAlgError`` if some matrix has not converged by then
            (``"auto"`` falls back to the SVD for those matrices instead).
        check_finite: raise ``ValueError`` if ``A`` holds NaN or Inf.

    Returns:
        :class:`PolarResult` ``(U, H)`` in ``A``'s dtype; ``H`` is exactly symmetric.

    Example:
        >>> U, H = polar(torch.tensor([[1.0, -1.0], [2.0, 4.0]]))
        >>> torch.allclose(U @ H, torch.tensor([[1.0, -1.0], [2.0, 4.0]]), atol=1e-5)
        True
    """
    A = check_matrix(A, "A")
    check_choice(side, "side", ("right", "left"))
    check_choice(method, "method", POLAR_METHODS)
    check_positive_int(max_steps, "max_steps")
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float))
                            or not tol > 0 or not math.isfinite(tol)):
        raise ValueError(f"tol must be None or a finite float > 0, got {tol!r}")
    m, n = A.shape[-2:]
    batch = A.shape[:-2]
    out_dtype = A.dtype
    cdt = _compute_dtype(A.dtype)
    hk = n if side == "right" else m
    if m == 0 or n == 0:
        return PolarResult(torch.empty_like(A),
                           torch.zeros(*batch, hk, hk, dtype=out_dtype, device=A.device))

    X, amax, scale = _prepare(A, "A", check_finite)
    chosen = select_polar_method(A) if method == "auto" else method

    if chosen == "svd":
        U, H = _polar_svd(X, side)
    else:
        k = min(m, n)
        U, converged, steps = _newton_schulz(
            X, _default_tol(cdt, k) if tol is None else float(tol), max_steps)
        if not bool(converged.all()):
            if method == "newton_schulz":
                raise torch.linalg.LinAlgError(
                    f"polar(method='newton_schulz') did not converge in max_steps={max_steps} "
                    f"for {int((~converged).sum())} of {converged.numel()} matrices of shape "
                    f"{m}x{n}; the input is rank-deficient or too ill-conditioned for the "
                    f"iteration. Use method='svd' (or 'auto', which falls back to it)."
                )
            Us, _ = _polar_svd(X, side)
            U = torch.where(converged[..., None, None], U, Us)
        # H from the polar factor: U^T A = V S V^T (right), A U^T = W S W^T (left).
        H = U.mT @ X if side == "right" else X @ U.mT

    H = 0.5 * (H + H.mT)
    # scipy (LAPACK) returns the identity block for a zero matrix; make it explicit
    # rather than depend on the SVD driver.
    # (unconditionally: no host read of `zero`)
    zero = amax == 0
    U = torch.where(zero, torch.eye(m, n, dtype=cdt, device=A.device), U)
    H = torch.where(zero, torch.zeros_like(H), H) * scale
    return PolarResult(U.to(out_dtype), H.to(out_dtype))
