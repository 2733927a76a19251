r"""Cheap alternatives to :func:`~matrixopt.linalg.orthogonalize`: AuON, Hybrid-AuON, RACS.

Each maps a batch of matrices ``G`` (``[..., m, n]``) to an update direction of
the same shape with **unit Frobenius norm** per matrix (up to AuON's
:math:`1/r \le 1` factor below), so an optimizer rescales it like an
orthogonalised update (:class:`~matrixopt.optim.Muon` multiplies by
:math:`\sqrt{\min(m, n)}`, the Frobenius norm of a full-rank
:math:`\operatorname{msign}`, so its ``lr`` and ``adjust_lr`` carry over).

* :func:`auon` (Maity 2025, "AuON: a linear-time alternative to orthogonal
  momentum updates", arXiv 2509.24320; first code version):
  :math:`Y = G/\|G\|_F`, :math:`r = \sqrt{\operatorname{mean}\cosh^2(\gamma Y)}`,
  :math:`U = Y / r`. Elementwise plus two sums: :math:`O(mn)`.
  With :math:`\|Y\|_F = 1` and :math:`N = mn` entries,
  :math:`1 \le r^2 \le 1 + \sinh^2(\gamma)/N`: the "cosh brake" is inert at
  realistic sizes (:math:`r < 1.003` for :math:`N \ge 1000`, :math:`\gamma = 1.5`),
  so AuON is a Frobenius-normalised momentum step.
* :func:`hybrid_auon` (same paper, Hybrid-AuON): ``steps`` quintic
  Newton–Schulz steps with Keller Jordan's coefficients (3.4445, −4.7750,
  2.0315) from :math:`G/\|G\|_F` (the paper's abstract: one step; the
  repository's default: five), then the AuON normalisation of the result.
  Cost per step :math:`4k^2 l + 2k^3` flops (:math:`k = \min(m,n)`, :math:`l = \max(m,n)`).
* :func:`racs` (row-and-column scaling; Gong et al. 2025, "Alice/RACS",
  arXiv 2502.07752, the operator behind REG, Liu et al. 2025, arXiv 2510.03691),
  without the optimizer's EMA of the statistics:
  :math:`\hat G = G \oslash (\sqrt{s + \epsilon}\,\sqrt{q + \epsilon}^\top)`,
  :math:`s = \operatorname{rowmean}(G \odot G)`, :math:`q = \operatorname{colmean}(G \odot G)`,
  repeated ``iters`` times, then :math:`\hat G/\|\hat G\|_F`. :math:`O(mn)` per
  iteration. ``G`` is first divided by its RMS, so the result is invariant to
  positive rescaling of ``G`` and ``eps`` is relative. Whether REG iterates the
  scaling to a fixed point is not stated in the abstracts; ``iters`` exposes it.

Zero matrices give zeros (no ``eps`` in the normalisations). Computation is in
float32 or better; the output has ``G``'s dtype. No host synchronisation.
:func:`auon` and :func:`racs` also accept a matrix held as row blocks over
workers (``shards``, FSDP2 ``Shard(0)``): their sums over rows go through
``shards.reduce_sum`` and the result equals the whole-matrix one up to rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._checks import check_dtype, check_matrix, check_positive_int
from ._checks import check_finite as _check_finite
from .coefficients import Coefficients
from .orthogonalization import orthogonalize
from .svd import RowShards, _check_shards

__all__ = ["auon", "hybrid_auon", "racs", "OPERATORS"]

#: The operators an optimizer may use in place of Newton–Schulz.
OPERATORS = ("newton_schulz", "auon", "hybrid_auon", "racs")


def _work(G: Tensor) -> Tensor:
    return G if G.dtype == torch.float64 else G.to(torch.float32)


def _sum(T: Tensor, dims: tuple[int, ...], shards: RowShards | None) -> Tensor:
    """Sum over ``dims`` (kept), then over the row blocks when the rows are sharded."""
    s = T.sum(dim=dims, keepdim=True)
    return s if shards is None else shards.reduce_sum(s.contiguous())


def _check_gamma(gamma: object) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma > 0 \
            or gamma == float("inf"):
        raise ValueError(f"gamma must be a finite number > 0, got {gamma!r}")
    return float(gamma)


def _prepare(G: object, shards: RowShards | None, check_finite: bool) -> tuple[Tensor, int]:
    """Validated ``G`` and the number of rows of the whole matrix."""
    G = check_matrix(G, "G")
    if shards is not None:
        _check_shards(shards, G.shape[-2])
    if check_finite:
        _check_finite(G, "G")
    return G, (G.shape[-2] if shards is None else shards.rows)


def _unit(X: Tensor, shards: RowShards | None = None) -> Tensor:
    """``X / ‖X‖_F`` per matrix (divided by its largest magnitude first, so squares
    neither overflow nor underflow); zero matrices stay zero."""
    big = X.abs().amax(dim=(-2, -1), keepdim=True) if X.shape[-2] * X.shape[-1] else X.new_zeros(
        (*X.shape[:-2], 1, 1))
    if shards is not None:
        big = shards.reduce_max(big.contiguous())
    X = X * torch.where(big > 0, big.reciprocal(), torch.zeros_like(big))
    nrm = _sum(X.square(), (-2, -1), shards).sqrt()
    return X * torch.where(nrm > 0, nrm.reciprocal(), torch.zeros_like(nrm))


def _cosh_brake(Y: Tensor, gamma: float, rows: int, shards: RowShards | None) -> Tensor:
    r"""``Y / sqrt(mean(cosh(γY)²))`` over each whole matrix (``rows × n`` entries)."""
    mean = _sum(torch.cosh(gamma * Y).square(), (-2, -1), shards) / (rows * Y.shape[-1])
    return Y / mean.sqrt()


def auon(G: Tensor, *, gamma: float = 1.5, shards: RowShards | None = None,
         check_finite: bool = False) -> Tensor:
    r"""AuON direction :math:`U = Y/\sqrt{\operatorname{mean}\cosh^2(\gamma Y)}`,
    :math:`Y = G/\|G\|_F`, per matrix of ``G`` (``[..., m, n]``).

    Maity 2025, arXiv 2509.24320 (the first code version's unit-Frobenius
    form; the current repository multiplies by :math:`\|G\|_F` instead). The
    result is :math:`G` rescaled: :math:`\|U\|_F = 1/r \in [(1 + \sinh^2\gamma/N)^{-1/2}, 1]`.
    Cost: :math:`O(mn)` (elementwise and two sums).

    Args:
        G: real floating tensor ``[..., m, n]``.
        gamma: the cosh scale γ (> 0; default 1.5, the repository's).
        shards: ``G`` is this worker's rows of a matrix held as row blocks
            (:class:`~matrixopt.linalg.svd.RowShards`); the two sums are reduced.
        check_finite: raise ``ValueError`` if ``G`` holds NaN/Inf (one host sync).

    Returns:
        A tensor of ``G``'s shape and dtype.
    """
    G, rows = _prepare(G, shards, check_finite)
    g = _check_gamma(gamma)
    Y = _unit(_work(G), shards)
    return _cosh_brake(Y, g, rows, shards).to(G.dtype)


def hybrid_auon(G: Tensor, *, steps: int = 1, gamma: float = 1.5,
                coefficients: str | Coefficients | Sequence[Coefficients] = "keller",
                dtype: torch.dtype | None = None, check_finite: bool = False) -> Tensor:
    r"""Hybrid-AuON: ``steps`` Newton–Schulz steps, then the AuON normalisation.

    :math:`O = p^{(steps)}(G/\|G\|_F)` by :func:`~matrixopt.linalg.orthogonalize`
    (``coefficients``, default Keller Jordan's quintic (3.4445, −4.7750, 2.0315),
    Frobenius normalisation), then :math:`U = \mathrm{auon}(O)` (unit Frobenius
    direction divided by the cosh brake). Maity 2025, arXiv 2509.24320: the
    abstract describes one Newton–Schulz step (the default here), the
    repository's ``HybridAuON`` five. Whether the repository normalises
    :math:`O` before the cosh brake is not documented; here it does, so the
    result has :func:`auon`'s scale.

    Cost: ``steps`` × (:math:`4k^2 l + 2k^3`) flops, :math:`k = \min(m,n)`,
    :math:`l = \max(m,n)`, plus :math:`O(mn)`.

    Args:
        G: real floating tensor ``[..., m, n]``.
        steps: Newton–Schulz steps (≥ 1, default 1).
        gamma: the cosh scale γ (> 0, default 1.5).
        coefficients: schedule of :func:`~matrixopt.linalg.orthogonalize`.
        dtype: dtype of the Newton–Schulz iteration (``None``: ``G``'s).
        check_finite: raise ``ValueError`` if ``G`` holds NaN/Inf (one host sync).
    """
    G = check_matrix(G, "G")
    check_positive_int(steps, "steps")
    g = _check_gamma(gamma)
    check_dtype(dtype, "dtype")
    O = orthogonalize(G, steps=steps, coefficients=coefficients, normalization="frobenius",
                      dtype=dtype, check_finite=check_finite)
    Y = _unit(_work(O))
    return _cosh_brake(Y, g, G.shape[-2], None).to(G.dtype)


def racs(G: Tensor, *, iters: int = 1, eps: float = 1e-8, shards: RowShards | None = None,
         check_finite: bool = False) -> Tensor:
    r"""Row-and-column scaling :math:`\hat G = G \oslash (\sqrt{s+\epsilon}\sqrt{q+\epsilon}^\top)`,
    normalised to unit Frobenius norm, per matrix of ``G`` (``[..., m, n]``).

    :math:`s_i = \frac1n\sum_j G_{ij}^2` (row mean squares), :math:`q_j =
    \frac1m\sum_i G_{ij}^2` (column mean squares), both from the same
    :math:`G`, the scaling repeated ``iters`` times on its own output (Gong et
    al. 2025, arXiv 2502.07752, RACS with :math:`\beta = 0`; REG, arXiv
    2510.03691). ``G`` is divided by its RMS first, so ``eps`` is relative to
    the matrix's scale and the result is invariant to positive rescaling.
    Cost: :math:`O(mn)` per iteration.

    Args:
        G: real floating tensor ``[..., m, n]``.
        iters: scaling passes (≥ 1, default 1).
        eps: ε added to the mean squares (≥ 0, default 1e-8, relative to unit RMS).
        shards: ``G`` is this worker's rows of a matrix held as row blocks; column
            sums and norms are reduced (``iters + 2`` reductions).
        check_finite: raise ``ValueError`` if ``G`` holds NaN/Inf (one host sync).
    """
    G, rows = _prepare(G, shards, check_finite)
    check_positive_int(iters, "iters")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < float("inf"):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    n = G.shape[-1]
    X = _unit(_work(G), shards) * (rows * n) ** 0.5  # unit RMS
    for _ in range(iters):
        sq = X.square()
        s = sq.mean(dim=-1, keepdim=True)  # rows are whole on every worker
        q = _sum(sq, (-2,), shards) / rows
        X = X / ((s + eps).sqrt() * (q + eps).sqrt())
    return _unit(X, shards).to(G.dtype)
