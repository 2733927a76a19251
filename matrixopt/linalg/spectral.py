r"""Spectral weight constraints: cap the singular values of a matrix by odd polynomials.

From "Training Transformers with Enforced Lipschitz Constants" (Newhouse, Hess,
Cesista, Zahorodnii, Bernstein, Isola 2025, arXiv 2507.13338; code
phess2/lipschitz-transformers ``modula/atom.py``): after each optimizer step every
weight :math:`W = U\Sigma V^\top` is mapped to :math:`U\,f(\Sigma)\,V^\top` with
:math:`f(\sigma) \approx \min(\sigma, \sigma_{\max})`. An odd polynomial
:math:`p(x) = x\,q(x^2)` acts on singular values without an SVD,
:math:`X\,q(X^\top X) = U\,p(\Sigma)\,V^\top`, and a composition of quintic steps
:math:`X \leftarrow X(aI + bA + cA^2)`, :math:`A = X^\top X` (the short side), is the
same machinery as :func:`~matrixopt.linalg.orthogonalize` (which approximates
:math:`\operatorname{sign}` instead of :math:`\min(1, \cdot)`).

Hard cap (``soft=False``). With :math:`X = W/\sigma_{\max}` the target is
:math:`\min(1, x)` on the singular values. The paper's four quintic steps
(Cesista) reach a worst-case error of 3.4 % on :math:`[0, 3.5]` and overshoot
1 by 1.1 %, and shrink small singular values by 4.9 % (slope 0.951 at 0), which
repeated after every step compounds like weight decay. :data:`HARD_CAP` are five
quintic steps fitted here (``benchmarks/design_spectral_cap.py``: minimax of the
relative error :math:`|p(x) - \min(1,x)| / \max(\min(x, 1), 0.05)` on
:math:`[10^{-4}, 4]`, then divided by their maximum on :math:`[0, 4]` so that
:math:`p \le 1` there): the error is at most :data:`HARD_CAP_ERROR` relative,
equi-rippled over the whole range, and the cap is never exceeded (up to
round-off). Domain: the singular values of :math:`X` must lie in
:math:`[0, 4]`; :math:`\|X\|_{S_8} = \|(X^\top X)^2\|_F^{1/4} \ge \sigma_1(X)`
(free: the first step needs :math:`A` and :math:`A^2` anyway) decides it:

* :math:`\|X\|_{S_8} \le 1`: every singular value is already under the cap and
  ``W`` is returned unchanged (bitwise; so applying the cap after every step does
  not drift matrices that are inside);
* :math:`\|X\|_{S_8} > 4`: ``X`` is first scaled by :math:`4/\|X\|_{S_8}` into the
  domain: the cap still holds, singular values under it shrink by that factor
  (the Schatten-8 norm over-estimates :math:`\sigma_1` by at most
  :math:`\operatorname{rank}^{1/8}`, 2.3 at rank 768).

Soft cap (``soft=True``; the paper's coupling of a weight bound with Muon): with
:math:`k \ge \sigma_1(W)` a bound,
:math:`p(\sigma) = q + \alpha q^3`, :math:`q = \sigma - \alpha\sigma^3`, i.e.
:math:`p(\sigma) = \sigma - 3\alpha^2\sigma^5 + 3\alpha^3\sigma^7 - \alpha^4\sigma^9`
(identity up to :math:`O(\sigma^5)`), with α the root of :math:`p(k) = \sigma_{\max}`
(the paper's quartic :math:`-k^9\alpha^4 + 3k^7\alpha^3 - 3k^5\alpha^2 + k - w = 0`;
in :math:`a = \alpha k^2`: :math:`1 - 3a^2 + 3a^3 - a^4 = \sigma_{\max}/k`, solved by
bisection on the device, the left side is decreasing). :math:`p` is increasing on
:math:`[0, k]` while :math:`a \le 1/3`, i.e. :math:`\sigma_{\max}/k \ge 0.7654`; so
:math:`k` is the Schatten-8 bound, and a matrix with :math:`k > \sigma_{\max}/0.7654`
is first scaled to that bound. Two degree-9 steps: four products.

Cost: per matrix of short side ``s`` and long side ``l``, each quintic step is
:math:`2s^2l` (Gram) + :math:`2s^3` (:math:`A^2`) + :math:`2s^2l` flops; the hard cap
is five steps, as ``orthogonalize``'s default ``polar_express`` schedule. No host
synchronisation (the domain decisions are ``torch.where`` on device scalars).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import check_dtype, check_matrix
from .norms import spectral_norm

__all__ = ["spectral_cap", "spectral_normalize", "HARD_CAP", "HARD_CAP_ERROR",
           "HARD_CAP_DOMAIN"]

#: Five quintic steps ``(a, b, c)``: ``X ← X(aI + bXᵀX + c(XᵀX)²)``, whose composition
#: :math:`p` satisfies :math:`|p(x) - \min(1, x)| \le` ``HARD_CAP_ERROR``
#: :math:`\cdot\min(x, 1)` (for :math:`x \ge 0.05`; absolute ``0.05·HARD_CAP_ERROR``
#: below) and :math:`p(x) \le 1` on :math:`[0,` ``HARD_CAP_DOMAIN`` :math:`]`
#: (``benchmarks/design_spectral_cap.py``; ``tests/linalg/test_spectral.py`` checks both
#: on a fine float64 grid).
HARD_CAP: tuple[tuple[float, float, float], ...] = (
    (0.6958143622996625, 0.06689922565046509, -0.0059538333810978256),
    (1.9660092766841928, -0.5063579809801274, 0.047928348303282985),
    (1.8631434842268426, 0.5983520537845999, -0.24413186239274462),
    (1.025999695919869, -0.08967985405016221, 0.009849633131524312),
    (2.3198891532473955 / 6.142487511911864, 0.11194628938025405 / 6.142487511911864,
     -0.016333599169483837 / 6.142487511911864),
)
HARD_CAP_ERROR = 0.0135
HARD_CAP_DOMAIN = 4.0
_SOFT_RATIO = 0.7654  # σ_max/k ≥ this keeps a = αk² ≤ 1/3 (p increasing on [0, k])


def _sides(W: Tensor) -> tuple[Tensor, bool]:
    """``W`` as ``[..., l, s]`` (short side last, so the Gram is ``s × s``), transposed?"""
    return (W.mT, True) if W.shape[-2] < W.shape[-1] else (W, False)


def _max_sv(max_sv: float | Tensor, W: Tensor) -> Tensor:
    if isinstance(max_sv, Tensor):
        c = max_sv.to(device=W.device, dtype=torch.float64 if W.dtype == torch.float64
                      else torch.float32)
        c = c.reshape(*c.shape, 1, 1)
    else:
        if isinstance(max_sv, bool) or not isinstance(max_sv, (int, float)):
            raise TypeError(f"max_sv must be a positive number or tensor, got {max_sv!r}")
        c = torch.tensor(float(max_sv), device=W.device,
                         dtype=torch.float64 if W.dtype == torch.float64 else torch.float32)
    if not isinstance(max_sv, Tensor) and not (math.isfinite(float(max_sv)) and max_sv > 0):
        raise ValueError(f"max_sv must be a finite number > 0, got {max_sv!r}")
    return c


def _gram_and_bound(X: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``A = XᵀX``, ``A²`` and the Schatten-8 norm ``‖A²‖_F^{1/4} ≥ σ₁(X)`` (``[..., 1, 1]``)."""
    A = X.mT @ X
    A2 = A @ A
    acc = torch.float64 if X.dtype == torch.float64 else torch.float32
    s8 = torch.linalg.vector_norm(A2, dim=(-2, -1), keepdim=True, dtype=acc).sqrt().sqrt()
    return A, A2, s8


def spectral_cap(W: Tensor, max_sv: float | Tensor = 1.0, *, soft: bool = False,
                 dtype: torch.dtype | None = None) -> Tensor:
    r"""Cap the singular values of ``W`` (``[..., m, n]``) at ``max_sv``, by odd polynomials.

    ``soft=False`` (default): :math:`\sigma \mapsto \approx\min(\sigma, \sigma_{\max})`
    (relative error ≤ ``HARD_CAP_ERROR`` = 1.35 %, never above the cap up to
    round-off); ``soft=True``: the paper's soft cap :math:`p(\sigma) = q + \alpha q^3`,
    exact at the bound. Matrices already under the cap (Schatten-8 norm ≤ ``max_sv``)
    are returned unchanged. See the module docstring for the math, the domain
    rule, the cost, and the paper (Newhouse et al. 2025, arXiv 2507.13338).

    Args:
        W: real floating tensor ``[..., m, n]`` (batched over the leading dims).
        max_sv: the cap, a number > 0 or a tensor broadcastable to ``W.shape[:-2]``.
        soft: soft cap instead of the hard cap.
        dtype: dtype the polynomial steps and the Gram of the bound run in (default
            ``W``'s; norms and scalars are accumulated in float32, float64 for float64
            input; the bound gets a relative margin of 2 ulps of ``dtype``).

    Returns:
        a new tensor like ``W``.
    """
    W = check_matrix(W, "W")
    work = check_dtype(dtype) or W.dtype
    c = _max_sv(max_sv, W)
    X, transposed = _sides(W)
    X = X.to(work)
    # everything in the units of W (no full-matrix casts): the polynomial in x = σ/c is
    # rewritten for σ, the scalars (b/c², c/c⁴, ...) are per-matrix tensors
    A, A2, s8 = _gram_and_bound(X)
    # round-off of the Gram in the working dtype: a relative margin on the bound
    s8 = s8 / c * (1 + 2 * torch.finfo(work).eps)  # ≥ σ₁/c
    inside = s8 <= 1
    if soft:
        # y = σ/(c·s8) ∈ [0, 1]; the bound used is k = min(s8, 1/0.7654) (a larger s8 is
        # scaled down to it): target p(1) = 1/k, result c·k·p(y), i.e. Y' = (k/s8)·W and
        # the coefficient a/(c·k)² in W's units
        k = torch.clamp(s8, max=1.0 / _SOFT_RATIO)
        a = _soft_a(1.0 / k)
        f = torch.where(s8 > 0, k / s8, 1.0)
        Y = _soft_poly(X * f.to(work), A * (f**2).to(work), (a / (c * k) ** 2).to(work))
    else:
        shrink = torch.clamp(HARD_CAP_DOMAIN / s8, max=1.0)
        Y = _hard_poly(X, A, A2, shrink, c, None if isinstance(max_sv, Tensor)
                       else float(max_sv))
    Y = Y.to(W.dtype)
    if transposed:
        Y = Y.mT
    return torch.where(inside, W, Y)


def _hard_poly(X: Tensor, A: Tensor, A2: Tensor, shrink: Tensor, c: Tensor,
               c_host: float | None) -> Tensor:
    """:data:`HARD_CAP` on ``shrink·X`` in the units of ``W`` (cap ``c``: ``b → b/c²``,
    ``c → c/c⁴``); ``A = XᵀX`` and ``A2 = A²`` of the unshrunk ``X``. With a host cap
    (``c_host``) the later steps are fused ``baddbmm`` calls, as in ``orthogonalize``."""
    inv2 = 1.0 / c**2
    s2 = shrink**2
    (a, b, cc), rest = HARD_CAP[0], HARD_CAP[1:]
    B = A * (b * inv2 * s2).to(X.dtype) + A2 * (cc * inv2**2 * s2**2).to(X.dtype)
    X = (a * X + X @ B) * shrink.to(X.dtype)
    if c_host is None:
        for a, b, cc in rest:
            A = X.mT @ X
            B = A * (b * inv2).to(X.dtype) + (A @ A) * (cc * inv2**2).to(X.dtype)
            X = a * X + X @ B
        return X
    shape = X.shape
    X = X.reshape(-1, *shape[-2:])
    i2 = 1.0 / c_host**2
    for a, b, cc in rest:
        A = torch.bmm(X.mT, X)
        B = torch.baddbmm(A, A, A, beta=b * i2, alpha=cc * i2 * i2)
        X = torch.baddbmm(X, X, B, beta=a)
    return X.reshape(shape)


def _soft_a(r: Tensor) -> Tensor:
    """Root ``a ∈ [0, 1/3]`` of ``1 - 3a² + 3a³ - a⁴ = r`` (decreasing in a), by bisection
    (40 halvings: below float32 resolution)."""
    lo = torch.zeros_like(r)
    hi = torch.full_like(r, 1.0 / 3.0)
    for _ in range(40):
        mid = (lo + hi) / 2
        h = 1 - 3 * mid**2 + 3 * mid**3 - mid**4
        above = h > r  # root further right
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    return (lo + hi) / 2


def _soft_poly(X: Tensor, A: Tensor, a: Tensor) -> Tensor:
    """``Q = X − aX·A``, then ``Q + aQ·(QᵀQ)`` (``a`` already in ``X``'s units)."""
    Q = X - a * (X @ A)
    return Q + a * (Q @ (Q.mT @ Q))


def spectral_normalize(W: Tensor, max_sv: float | Tensor = 1.0, *, n_iter: int = 16,
                       generator: int | torch.Generator | None = None) -> Tensor:
    r"""``W / max(1, σ̂₁/max_sv)``: the paper's spectral normalisation.

    :math:`\hat\sigma_1` is :func:`~matrixopt.linalg.spectral_norm` (``n_iter``
    power-iteration steps, the paper uses 16): a lower bound of
    :math:`\sigma_1`, so the result's norm is ``max_sv`` only up to the power
    iteration's error (geometric in :math:`(\sigma_2/\sigma_1)^{4k}`). Matrices
    with :math:`\hat\sigma_1 \le` ``max_sv`` are returned unchanged. Cost
    ``n_iter + 1`` matrix–vector pairs, :math:`O(mn)` each.
    """
    W = check_matrix(W, "W")
    c = _max_sv(max_sv, W)
    sigma = spectral_norm(W, n_iter, generator=generator, check_finite=False)
    sigma = sigma.to(c.dtype).reshape(*sigma.shape, 1, 1)
    scale = torch.where(sigma > c, c / torch.where(sigma > 0, sigma, 1.0), 1.0)
    return torch.where(scale < 1, (W.to(c.dtype) * scale).to(W.dtype), W)
