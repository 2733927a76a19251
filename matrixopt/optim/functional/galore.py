r"""GaLore's per-step update on local tensors: map back, residuals, decay and apply.

Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
Projection" (ICML 2024). Given a matrix (stack) :math:`W` ``[b, m, n]``, its
gradient :math:`G`, the projected gradient :math:`R` and the inner optimizer's
low-rank direction :math:`N` (Adam or Adafactor on :math:`R`):

.. math::
    W \leftarrow d\,W - c\,\alpha\,\big(\mathrm{back}(N) + \text{residual}\big)

with :math:`d` the decay factor, :math:`c` the step multiplier and
:math:`\alpha` = ``scale``. Residuals: ``"fira"`` (Chen et al. 2024) adds
:math:`c\,\phi\,S` with :math:`S = G - \alpha\,\mathrm{back}(R)`, scaled per
channel by the inner optimizer's gain :math:`\phi_j = \|N_{:,j}\|/\|R_{:,j}\|`
and not by :math:`\alpha`, exactly as Fira's official code (whose projector's
map back carries :math:`\alpha`; ``tests/optim/test_fira_official.py``);
``"apollo"`` (Zhu et al. 2025)
replaces the update by :math:`G\,\mathrm{diag}(\phi)`. Both apply the norm-growth
limiter :math:`\|S_t\| \le \gamma\|S_{t-1}\|`. A channel is a column of
:math:`G` for a left basis and a row for a right basis.

Everything here is pure tensor math on local tensors; the basis products are
callables (``back``), so the same code serves one process and row shards.
**Row shards** (FSDP2): with ``reduce`` given (a callable summing a tensor over
the shards in place), :math:`W`, :math:`G` and :math:`S` are the local rows of
the matrices, and so are :math:`R`, :math:`N` for a right basis (a left or full
basis gives replicated ``r × n`` / ``r × r`` ones); every norm whose sum runs
over the rows (column norms, whole-matrix norms) sums its squares through
``reduce``: at most three small all-reduces per matrix per step, none without a
residual.
``flags`` folds the ``nonfinite="skip"`` policy into the writes (a skipped
matrix gets :math:`d = 1`, :math:`c = 0` and keeps its limiter state).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._nonfinite import StepFlags

__all__ = ["channel_norms", "growth_factor", "galore_apply_"]

_OFF = StepFlags.off()


Reduce = Callable[[Tensor], Tensor]


def channel_norms(X: Tensor, side: str, granularity: str, reduce: Reduce | None = None
                  ) -> Tensor:
    """Norms of ``X`` ``[b, m, n]`` over the projected dim per channel (``[b, 1, n]``
    for a left basis, ``[b, m, 1]`` for a right one) or per matrix (``"tensor"``).
    ``reduce``: ``X`` holds the local rows, and sums over rows run through it."""
    if reduce is not None:
        if granularity == "tensor" or side == "both":
            return reduce(X.square().sum(dim=(-2, -1), keepdim=True)).sqrt_()
        if side == "right":  # a row's norm is local
            return X.square().sum(dim=-1, keepdim=True).sqrt_()
        return reduce(X.square().sum(dim=-2, keepdim=True)).sqrt_()
    if granularity == "tensor" or side == "both":
        return torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True)
    if side == "right":
        return torch.linalg.vector_norm(X, dim=-1, keepdim=True)
    # column norms: vector_norm along a non-last dim is a strided reduction, ~40x
    # slower on CPU than squaring and summing
    return X.square().sum(dim=-2, keepdim=True).sqrt_()


def growth_factor(norm: Tensor, previous: Tensor, gamma: float | None) -> Tensor:
    r"""Norm-growth limiter: the factor (``[b]``) keeping :math:`\|S_t\| \le
    \gamma\|S_{t-1}\|`; 1 without a previous norm (first step), a zero norm, or
    ``gamma=None``."""
    if gamma is None:
        return torch.ones_like(norm)
    capped = (float(gamma) * previous / norm).clamp(max=1.0)
    return torch.where((previous > 0) & (norm > 0), capped, torch.ones_like(norm))


def galore_apply_(p: Tensor, G: Tensor, R: Tensor, N: Tensor, *, shape3: tuple[int, int, int],
                  side: str, back: Callable[[Tensor], Tensor], c: Any, d: Any, scale: float,
                  residual: str | None = None, granularity: str = "channel",
                  gamma: float | None = None, residual_norm: Tensor | None = None,
                  basis: Tensor | None = None, flags: StepFlags = _OFF,
                  reduce: Reduce | None = None) -> None:
    r""":math:`W \leftarrow d\,W - c\,\alpha(\mathrm{back}(N) [+ \text{residual}])` in place.

    Args:
        p: the local parameter (any shape with ``b·m·n`` entries).
        G, R, N: gradient ``[b, m, n]`` (safe), projected gradient, low-rank direction.
        shape3: ``(b, m, n)`` of ``p``'s local matrices.
        side: ``"left"``, ``"right"`` or ``"both"``.
        back: maps a low-rank tensor to ``[b, m, n]`` (the basis products).
        c, d: step multiplier and decay factor (numbers or 0-dim tensors). ``c`` is
            never part of the direction: the residual gain and the limiter see ``N``
            alone, whatever ``c``'s type (a step-count multiplier is a number eagerly
            and a tensor under ``torch.compile``, and both must give the same update);
            a data-dependent multiplier the gain should see (Adafactor's clipping) is
            folded into ``N`` by the caller.
        residual_norm: the limiter's previous norms ``[b]`` (updated in place).
        basis: the basis when one GEMM can add ``P N`` / ``N Pᵀ`` into ``p`` directly
            (same dtype, one side), else ``None`` (``back`` is used).
        flags: one entry (this matrix).
        reduce: row shards (module docstring): sums over the rows run through it;
            ``None``: whole matrices.
    """
    b, m, n = shape3
    p3 = p.view(b, m, n) if p.is_contiguous() else None
    alpha = flags.weight(0, -c * scale, 0.0, N)
    decay = flags.weight(0, d, 1.0, p)
    gain = None
    # R and N are row-sharded only for a right basis (else replicated: nothing to sum)
    low = reduce if side == "right" else None
    if residual is not None:
        Rn = channel_norms(R, side, granularity, low)
        gain = torch.where(Rn > 0, channel_norms(N, side, granularity, low) / Rn,
                           torch.zeros_like(Rn))

    def norm2(X: Tensor, rows: bool) -> Tensor:
        """||X|| per matrix ``[b]``; ``rows``: X holds local rows (summed over shards)."""
        if reduce is None:
            return torch.linalg.vector_norm(X, dim=(-2, -1))
        sq = X.square().sum(dim=(-2, -1))
        return (reduce(sq) if rows else sq).sqrt_()

    def limited(norm: Tensor) -> Tensor:
        assert residual_norm is not None
        prev = residual_norm.to(norm.dtype)
        factor = growth_factor(norm, prev, gamma)
        residual_norm.copy_(flags.select(0, norm * factor, prev))
        return factor.view(-1, 1, 1)

    if not (isinstance(decay, float) and decay == 1.0):
        p.mul_(decay if not isinstance(decay, Tensor) else decay.to(p.dtype))
    if residual == "apollo":
        assert gain is not None
        Gd = G.to(N.dtype)
        # ||G diag(s)|| from G's channel norms: the scaled gradient is never built
        cn = channel_norms(Gd, side, granularity, reduce)
        # only a right basis' per-row norms are still local rows here
        norm = norm2(cn * gain, rows=side == "right" and granularity == "channel")
        s = gain * limited(norm) * alpha
        if p3 is not None and p.dtype == Gd.dtype:
            p3.addcmul_(Gd, s)
        else:
            p.add_((Gd * s).reshape(p.shape).to(p.dtype))
        return
    Ns = N * alpha  # the step folded into the small factor
    if basis is not None and p3 is not None:
        if side == "left":
            p3.baddbmm_(basis.expand(b, -1, -1), Ns)
        else:
            p3.baddbmm_(Ns, basis.mT.expand(b, -1, -1))
    else:
        U = back(Ns)
        if p3 is not None:
            p3.add_(U)
        else:
            p.add_(U.reshape(p.shape).to(p.dtype))
    if residual == "fira":
        assert gain is not None
        # as Fira's official code: S = G - α·back(R) (its project_back carries α), and
        # the residual's step is c·φ·S, without α
        S = torch.sub(G.to(N.dtype), back(R), alpha=scale)
        S.mul_(gain)
        S.mul_(limited(norm2(S, rows=True)) * flags.weight(0, -c, 0.0, N))
        if p3 is not None and p.dtype == S.dtype:
            p3.add_(S)
        else:
            p.add_(S.reshape(p.shape).to(p.dtype))
