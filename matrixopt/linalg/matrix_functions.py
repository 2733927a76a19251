r"""Matrix functions of symmetric positive semi-definite matrices: inverse roots and
rank-1 inverse updates, batched over leading dims.

* :func:`inv_root`: :math:`(A + \epsilon I)^{-1/p}` by an eigendecomposition
  (``method="eigh"``, any real ``p > 0``) or by the coupled Newton iteration
  (``method="newton"``, integer ``p``; matrix products only, Guo & Higham 2006,
  "A Schur–Newton method for the matrix p-th root and its inverse", SIAM J.
  Matrix Anal. Appl. 28(3); the form of facebookresearch/optimizers'
  Distributed Shampoo, Shi et al. 2023, arXiv:2309.06497).
* :func:`sherman_morrison`: :math:`(\gamma A + c\,v v^\top)^{-1}` from
  :math:`X = A^{-1}` in :math:`O(n^2)` (the rank-1 inverse update of MKOR,
  Mozaffari et al. 2023, arXiv:2306.01685).

Both compute in at least float32 (bfloat16/float16 inputs are promoted; float64
stays float64) and return the input's dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import check_choice, check_matrix

__all__ = ["inv_root", "sherman_morrison", "INV_ROOT_METHODS", "newton_iterations"]

INV_ROOT_METHODS = ("eigh", "newton")

#: Default stopping tolerance of the adaptive Newton iteration on max|M − I|, per dtype.
_TOL = {torch.float32: 3e-6, torch.float64: 1e-12}


def _work_dtype(A: Tensor) -> torch.dtype:
    return torch.float64 if A.dtype == torch.float64 else torch.float32


def _check_square(A: object, name: str) -> Tensor:
    A = check_matrix(A, name)
    if A.shape[-1] != A.shape[-2]:
        raise ValueError(f"{name} must be square [..., n, n], got shape {tuple(A.shape)}")
    return A


def _eye_like(A: Tensor) -> Tensor:
    return torch.eye(A.shape[-1], dtype=A.dtype, device=A.device).expand_as(A)


def newton_iterations(p: int, kappa: float) -> int:
    r"""Iterations the coupled Newton iteration of :func:`inv_root` needs for an input of
    condition number ``kappa`` (after :math:`\epsilon`): the smallest eigenvalue starts at
    about :math:`z\lambda_{\min} \ge (p+1)/(2\sqrt{n}\kappa)` and grows by
    :math:`((p+1)/p)^p \ge 2` per step until it reaches the quadratic phase (≈ 6 more
    steps to float32 accuracy). A bound for choosing a fixed ``iters``, not a measurement.
    """
    if p < 1 or kappa < 1:
        raise ValueError(f"newton_iterations needs p >= 1 and kappa >= 1, got p={p}, "
                         f"kappa={kappa}")
    growth = math.log(((p + 1) / p) ** p)
    return int(math.ceil(math.log(max(kappa, 1.0) * 4.0) / growth)) + 6


def _newton(A: Tensor, p: int, iters: int | None, tol: float | None, max_iters: int
            ) -> Tensor:
    """Coupled Newton on the (already regularised, symmetric) work-dtype ``A``."""
    eye = _eye_like(A)
    # c^p = 1/z with z = (p+1)/(2‖A‖_F): the spectrum lies in (0, (p+1)c^p), where the
    # iteration converges; ‖A‖_F ≥ ‖A‖_2. A zero matrix gets z = 1 (its root is not
    # defined; the output is then not finite, as the eigh route's).
    fro = torch.linalg.matrix_norm(A, ord="fro", keepdim=True)
    z = (p + 1) / (2.0 * fro)
    X = z.pow(1.0 / p) * eye
    M = z * A
    fixed = iters is not None
    steps = iters if fixed else max_iters
    limit = tol if tol is not None else _TOL[A.dtype]
    prev = math.inf
    for _ in range(int(steps)):  # type: ignore[arg-type]
        T = ((p + 1) * eye - M) / p
        X = X @ T
        Tp = torch.linalg.matrix_power(T, p) if p > 1 else T
        M = Tp @ M
        if not fixed:
            err = float((M - eye).abs().amax())  # host read: only without a fixed count
            if not math.isfinite(err) or err <= limit or (err > 0.5 and err > prev):
                break
            # stalled at the rounding floor: no progress of a factor 2 any more
            if err < 1e-2 and err > 0.5 * prev:
                break
            prev = err
    return 0.5 * (X + X.mT)


def inv_root(A: Tensor, p: float, *, method: str = "eigh", eps: float = 0.0,
             iters: int | None = None, tol: float | None = None, max_iters: int = 100
             ) -> Tensor:
    r"""Inverse ``p``-th root :math:`(A + \epsilon I)^{-1/p}` of symmetric PSD matrices.

    Args:
        A: ``[..., n, n]`` symmetric positive semi-definite (symmetrised as
            :math:`(A + A^\top)/2`).
        p: the root; any real ``p > 0`` for ``"eigh"``, an integer ``>= 1`` for
            ``"newton"``.
        method: ``"eigh"`` (default): :math:`Q\,\mathrm{diag}(\lambda^{-1/p})Q^\top` of
            :math:`A + \epsilon I`; eigenvalues below ``eps`` (rounding makes small ones
            negative) are shifted as Distributed Shampoo does,
            :math:`\lambda \leftarrow \lambda - \lambda_{\min} + \epsilon` when
            :math:`\lambda_{\min} < \epsilon`. Cost: one batched ``eigh``
            (≈ :math:`9n^3` flops) and two products.
            ``"newton"``: the coupled Newton iteration
            :math:`z = (p+1)/(2\|A\|_F)`, :math:`X_0 = z^{1/p} I`, :math:`M_0 = zA`,
            :math:`T = ((p+1)I - M)/p`, :math:`X \leftarrow XT`,
            :math:`M \leftarrow T^p M`; :math:`M_k = X_k^p A` is an invariant, so
            :math:`M \to I` means :math:`X \to A^{-1/p}`. Matrix products only
            (``2 + ⌊log₂p⌋ + popcount(p) − 1`` per iteration: 4 for ``p = 4``).
        eps: :math:`\epsilon \ge 0` added to the diagonal first (regularisation).
        iters: ``"newton"`` only: run exactly this many iterations (no host read: what
            an optimizer step uses; :func:`newton_iterations` gives a bound). ``None``
            (default): the stopping rule below, one host read per iteration.
        tol: stopping rule of the adaptive Newton iteration: stop when
            :math:`\max_{ij}|M - I|_{ij} \le` ``tol`` (default ``3e-6`` in float32,
            ``1e-12`` in float64), when it stops shrinking by half below ``1e-2`` (the
            rounding floor) or after ``max_iters``.
        max_iters: bound of the adaptive iteration (default 100).

    Accuracy (``tests/linalg/test_matrix_functions.py``, relative Frobenius error
    against the float64 eigh route): float64 inputs 1e-9; float32 inputs with
    :math:`\kappa(A+\epsilon I) \le 10^6` and ``p`` in {1, 2, 4}: Newton ≤ 1e-2
    (measured 7e-3 for ``p = 1``, 8e-4 for ``p = 4``) while float32 eigh errs up
    to 0.15 there (measured 0.12 for ``p = 1``: its small eigenvalues carry an
    absolute error :math:`\approx u\|A\|`); at :math:`\kappa \le 10^4` both are
    within 2e-3. bfloat16 inputs are computed in float32 (a bfloat16 iteration would not
    get below its 4e-3 rounding). The output is ``A``'s dtype.

    A fixed ``iters`` too small for the conditioning errs on the safe side: per
    eigenvalue the iteration maps :math:`\mu = x^p\lambda` by
    :math:`\mu \leftarrow \mu((p+1-\mu)/p)^p`, which after the first step stays
    below 1 and rises monotonically to it, so an unconverged root of a small eigenvalue
    is too *small* (as with a larger ``eps``), never too large.
    """
    A = _check_square(A, "A")
    check_choice(method, "method", INV_ROOT_METHODS)
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not p > 0 \
            or not math.isfinite(p):
        raise ValueError(f"p must be a finite number > 0, got {p!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0 \
            or not math.isfinite(eps):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if iters is not None and (isinstance(iters, bool) or not isinstance(iters, int)
                              or iters < 1):
        raise ValueError(f"iters must be None or an int >= 1, got {iters!r}")
    if method == "newton" and float(p) != int(p):
        raise ValueError(f"method='newton' needs an integer root p, got p={p!r}; use "
                         f"method='eigh' for a fractional root")
    W = A.to(_work_dtype(A))
    W = 0.5 * (W + W.mT)
    if eps:
        W = W + eps * _eye_like(W)
    if method == "newton":
        out = _newton(W, int(p), iters, tol, max_iters)
    else:
        lam, Q = torch.linalg.eigh(W)
        lo = lam[..., :1]
        lam = torch.where(lo < eps, lam - lo + eps, lam)
        out = (Q * lam.pow(-1.0 / p).unsqueeze(-2)) @ Q.mT
    return out.to(A.dtype)


def sherman_morrison(X: Tensor, v: Tensor, *, decay: float | Tensor = 1.0,
                     weight: float | Tensor = 1.0) -> Tensor:
    r""":math:`(\gamma A + c\,v v^\top)^{-1}` given :math:`X = A^{-1}` (symmetric).

    With :math:`Y = X/\gamma`:
    :math:`(\gamma A + c\,vv^\top)^{-1} = Y - c\,(Yv)(Yv)^\top / (1 + c\,v^\top Y v)`
    (Sherman & Morrison 1950); the output is symmetrised. For a positive definite
    ``X``, ``decay > 0`` and ``weight >= 0`` the denominator is >= 1 and the result
    is positive definite; otherwise it may not be finite (callers check). Cost
    :math:`O(n^2)` per matrix, against :math:`O(n^3)` for a new inverse.

    Args:
        X: ``[..., n, n]`` symmetric inverse of the current factor.
        v: ``[..., n]`` the rank-1 vector.
        decay: :math:`\gamma` (an EMA's :math:`\beta`), a number or a tensor
            broadcasting against ``[...]``.
        weight: :math:`c` (an EMA's :math:`1-\beta`), likewise.
    """
    X = _check_square(X, "X")
    v = check_matrix(v, "v", min_ndim=1)
    if v.shape[-1] != X.shape[-1] or v.shape[:-1] != X.shape[:-2]:
        raise ValueError(f"v must have shape {tuple(X.shape[:-1])} to match X of shape "
                         f"{tuple(X.shape)}, got {tuple(v.shape)}")
    dt = _work_dtype(X)
    Xw, vw = X.to(dt), v.to(dt)
    g = decay.to(dt) if isinstance(decay, Tensor) else torch.tensor(decay, dtype=dt,
                                                                     device=X.device)
    c = weight.to(dt) if isinstance(weight, Tensor) else torch.tensor(weight, dtype=dt,
                                                                      device=X.device)
    g = g.reshape(g.shape + (1,) * 2) if g.ndim else g
    c = c.reshape(c.shape + (1,) * 2) if c.ndim else c
    Y = Xw / g
    u = (Y @ vw.unsqueeze(-1))  # [..., n, 1]
    denom = 1.0 + c * (vw.unsqueeze(-2) @ u)  # [..., 1, 1]
    out = Y - (c / denom) * (u @ u.mT)
    return (0.5 * (out + out.mT)).to(X.dtype)
