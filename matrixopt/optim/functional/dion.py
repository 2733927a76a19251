r"""Dion on lists of local tensors.

Ahn et al. 2025, "Dion: Distributed Orthonormalized Updates" (arXiv 2504.05295);
microsoft/dion ``dion_reference.py``. Per matrix :math:`W\in\mathbb{R}^{m\times n}`
(rows = outputs, as ``nn.Linear`` stores it) with gradient :math:`G`, momentum
:math:`M` and warm-start factor :math:`Q\in\mathbb{R}^{m\times r}`:

.. math::
    B &\leftarrow M + G \\
    P &\leftarrow \operatorname{orth}(B^\top Q) \in \mathbb{R}^{n\times r}
        \quad\text{(one power-iteration step, orthonormal columns)} \\
    R &\leftarrow B P \in \mathbb{R}^{m\times r} \\
    M &\leftarrow B - (1-\mu)\, R P^\top \quad\text{(error feedback)} \\
    Q &\leftarrow R \oslash (\lVert R_{:,j}\rVert + \varepsilon) \quad\text{(column-normalised)}\\
    W &\leftarrow (1-\eta\lambda) W - \eta\, s\, Q P^\top

This is dion's *transposed* orientation (its ``is_transposed``, which dion uses for
every matrix sharded over its rows): :math:`Q` lives on the output rows and
:math:`P` on the input columns. matrixopt uses it for every matrix, so one
process, DDP and FSDP2 run the same arithmetic: under FSDP2 (rows sharded) the
only sums over shards are the :math:`n\times r` product :math:`B^\top Q` and
the :math:`r` column norms of :math:`R`; everything else is local rows.

If :math:`B^\top Q = 0` (a zero gradient on zero momentum) :math:`P = 0`,
:math:`Q` is kept and :math:`W` only decays (dion's ``fix_all_zero_or_nan``).

``orth`` (:func:`orthonormalize`): ``"qr"`` Householder QR, or ``"rcqr"``
(dion's default) randomized Cholesky QR: :math:`R_1` from the QR of a Gaussian
sketch :math:`SP`, :math:`Q_1 = P R_1^{-1}`, one Cholesky-QR clean-up. Both in
float32 (float64 for float64 inputs) and both return the QR factor with a
positive-diagonal :math:`R` (column signs fixed), so the methods agree up to
rounding and the sketch does not change the result.

Cost per matrix: four :math:`m n r` products (:math:`B^\top Q`, :math:`BP`,
:math:`RP^\top`, :math:`QP^\top`) and an :math:`O(n r^2)` orthonormalisation —
about :math:`4r/\min(m,n)` of a dense :math:`m\times n` product per unit
rank, vs Newton–Schulz's :math:`\approx 5\cdot(4\,m n \min(m,n))`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .._nonfinite import StepFlags
from .muon import muon_update_scale

__all__ = ["DION_ADJUST_LR", "QR_METHODS", "dion_rank", "dion_update_scale", "sketch_rows",
           "orthonormalize", "dion_factors", "dion_apply_"]

#: Values of ``adjust_lr`` (see :func:`dion_update_scale`).
DION_ADJUST_LR = ("spectral", "match_rms_adamw", "original", "none")
#: Values of ``qr_method`` (see :func:`orthonormalize`).
QR_METHODS = ("rcqr", "qr")
_OFF = StepFlags.off()

Reduce = Callable[[Tensor], Tensor]
Sketch = Callable[[int, int, torch.device, torch.dtype], Tensor]


def dion_rank(m: int, n: int, rank_fraction: float, rank_multiple_of: int = 1,
              rank: int | None = None) -> int:
    r"""Low rank :math:`r` of an ``m × n`` matrix (dion's rule):
    :math:`\min(k\lceil f\min(m,n)/k\rceil, m, n)` with ``f = rank_fraction``,
    ``k = rank_multiple_of``; an explicit ``rank`` gives :math:`\min(\text{rank}, m, n)`."""
    if rank is not None:
        return max(1, min(int(rank), m, n))
    r = rank_multiple_of * math.ceil(rank_fraction * min(m, n) / rank_multiple_of)
    return max(1, min(r, m, n))


def dion_update_scale(m: int, n: int, r: int, mode: str) -> float:
    r"""Multiplier :math:`s` of Dion's update :math:`QP^\top` of an ``m × n`` matrix.

    ``"spectral"`` (default, dion's): :math:`\sqrt{m/n}`. ``"match_rms_adamw"``:
    :math:`0.2\sqrt{mn/r}` — :math:`\lVert QP^\top\rVert_F = \sqrt r` (unit columns
    times orthonormal columns), so the update's RMS is 0.2, AdamW's typical one, and
    AdamW's lr and weight decay carry over (Moonlight's rule, with the rank in
    place of Muon's :math:`\min(m,n)`). ``"original"``: :math:`\sqrt{\max(1, m/n)}`.
    ``"none"``: 1.
    """
    if mode == "match_rms_adamw":
        return 0.2 * math.sqrt(m * n / r)
    if mode in ("spectral", "original", "none"):
        return muon_update_scale(m, n, mode)
    raise ValueError(f"adjust_lr must be one of {list(DION_ADJUST_LR)}, got {mode!r}")


def sketch_rows(r: int, oversample: float) -> int:
    """Rows :math:`k` of rcqr's sketch: ``oversample·r`` rounded up to a multiple of 128."""
    return 128 * math.ceil(oversample * r / 128)


def _signs(R: Tensor) -> Tensor:
    """Signs of ``diag(R)`` as ``[..., 1, r]`` (zero counts as +1)."""
    d = R.diagonal(dim1=-2, dim2=-1)
    return torch.where(d < 0, -1.0, 1.0).to(R.dtype).unsqueeze(-2)


def orthonormalize(P: Tensor, method: str = "rcqr", sketch: Tensor | None = None) -> Tensor:
    r"""Orthonormal basis of the columns of ``P`` (``[..., n, r]``, batched), in float32
    (float64 for float64 input): the :math:`Q` of :math:`P = QR` with
    :math:`\operatorname{diag}(R) \ge 0`.

    ``"qr"``: Householder QR. ``"rcqr"`` (needs ``sketch`` ``[k, n]``, :math:`k \ge r`,
    Gaussian with variance :math:`1/k`): :math:`R_1` from the QR of :math:`SP`,
    :math:`Q_1 = P R_1^{-1}`, then :math:`Q = Q_1 \operatorname{chol}(Q_1^\top Q_1)^{-1}`;
    Householder QR is used when :math:`n \le r` (dion's rule). A rank-deficient
    :math:`P` stays finite: tiny pivots of :math:`R_1` are lifted to
    :math:`10^{-6}\max|\operatorname{diag} R_1|` and the clean-up's Gram matrix gets
    a relative shift, so the extra columns are some unit directions (as Householder's).
    Cost: Householder :math:`\approx 2nr^2`; rcqr :math:`2knr + 2nr^2` in matrix
    products (the GPU-friendly choice).
    """
    if method not in QR_METHODS:
        raise ValueError(f"qr_method must be one of {list(QR_METHODS)}, got {method!r}")
    dt = torch.float64 if P.dtype == torch.float64 else torch.float32
    P = P.to(dt)
    n, r = P.shape[-2], P.shape[-1]
    if method == "qr" or n <= r:
        Qh, Rh = torch.linalg.qr(P, mode="reduced")
        return Qh * _signs(Rh)
    if sketch is None:
        raise ValueError("orthonormalize: qr_method='rcqr' needs a sketch matrix")
    _, R1 = torch.linalg.qr(sketch.to(dt) @ P, mode="r")
    R1 = R1[..., :r, :]
    d = R1.diagonal(dim1=-2, dim2=-1)
    floor = 1e-6 * d.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(dt).tiny)
    lifted = torch.where(d.abs() < floor, torch.where(d < 0, -floor, floor), d)
    R1 = R1 - torch.diag_embed(d) + torch.diag_embed(lifted)
    Q1 = torch.linalg.solve_triangular(R1, P, upper=True, left=False)
    gram = Q1.mT @ Q1
    shift = torch.finfo(dt).eps * gram.diagonal(dim1=-2, dim2=-1).sum(-1)
    gram = gram + torch.diag_embed(shift.unsqueeze(-1).expand(*shift.shape, r))
    R2, _ = torch.linalg.cholesky_ex(gram, upper=True)
    Q = torch.linalg.solve_triangular(R2, Q1, upper=True, left=False)
    return torch.nan_to_num(Q * _signs(R1), nan=0.0, posinf=0.0, neginf=0.0)


def _work(t: Tensor) -> Tensor:
    """``t`` in the dtype the math runs in: float32, float64 kept."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def dion_factors(bufs: Sequence[Tensor], qs: Sequence[Tensor], *, method: str,
                 sketch: Sketch | None = None, oversample: float = 1.25,
                 reduce: Reduce | None = None, comm_dtype: torch.dtype | None = None
                 ) -> list[Tensor]:
    r"""The orthonormal factors :math:`P = \operatorname{orth}(B^\top Q)`, ``[b, n, r]``
    each, zero where :math:`B^\top Q = 0`.

    Args:
        bufs: :math:`B = M + G` as ``[b, m_loc, n]`` (local rows under FSDP2).
        qs: :math:`Q` as ``[b, m_loc, r]`` (the same rows).
        reduce: sums a flat tensor over the row shards in place (FSDP2; ``None``
            when the rows are whole). All products :math:`B^\top Q` of the list go
            in **one** call, as ``comm_dtype`` (default: their own dtype).
        sketch: ``sketch(k, n, device, dtype)``, the ``[k, n]`` Gaussian of rcqr
            (identical on every rank).
    """
    if not bufs:
        return []
    work = [_work(B) for B in bufs]
    prods = [Bw.mT @ Q.to(Bw.dtype) for Bw, Q in zip(work, qs)]
    if reduce is not None:
        wire = comm_dtype or prods[0].dtype
        flat = reduce(torch.cat([p.reshape(-1).to(wire) for p in prods]))
        prods = [f.view(p.shape).to(p.dtype) for f, p in
                 zip(flat.split([p.numel() for p in prods]), prods)]
    out = []
    for Y in prods:
        n, r = Y.shape[-2], Y.shape[-1]
        S = None
        if method == "rcqr" and n > r:
            assert sketch is not None, "qr_method='rcqr' needs a sketch"
            S = sketch(sketch_rows(r, oversample), n, Y.device, Y.dtype)
        P = orthonormalize(Y, method, S).to(Y.dtype)
        nonzero = (Y != 0).flatten(-2).any(-1).view(-1, 1, 1)
        out.append(torch.where(nonzero, P, 0.0))
    return out


def dion_apply_(params: Sequence[Tensor], bufs: Sequence[Tensor], qs: Sequence[Tensor],
                factors: Sequence[Tensor], *, lr: float, weight_decay: float, mu: float,
                scales: Sequence[float], eps: float = 1e-8, reduce: Reduce | None = None,
                flags: StepFlags = _OFF) -> None:
    r"""Error feedback, new :math:`Q`, weight decay and the update, in place.

    ``params`` as ``[b, m_loc, n]`` views of the local parameters, ``bufs`` the
    :math:`B = M + G` of :func:`dion_factors` (overwritten with the new momentum
    :math:`B - (1-\mu)RP^\top`), ``qs`` ``[b, m_loc, r]`` (overwritten with the new
    :math:`Q`, kept where :math:`P = 0` or the gradient was skipped), ``factors``
    the :math:`P`. ``reduce`` sums the squared column norms of :math:`R` over
    row shards (one call for the list). ``flags``: a skipped parameter keeps its
    weights, momentum and :math:`Q`.
    """
    if not params:
        return
    Rs = [_work(B) @ P.to(_work(B).dtype) for B, P in zip(bufs, factors)]
    sq = [R.square().sum(-2) for R in Rs]  # [b, r] each, float32 or float64
    if reduce is not None:
        flat = reduce(torch.cat([s.reshape(-1) for s in sq]))
        sq = [f.view(s.shape) for f, s in zip(flat.split([s.numel() for s in sq]), sq)]
    ef = flags.weights([1.0 - mu] * len(params), 0.0, list(bufs))
    sizes = flags.weights([lr * s for s in scales], 0.0, list(params))
    flags.mul_(list(params), 1.0 - lr * weight_decay)
    for i, (W, B, Q, P, R, s) in enumerate(zip(params, bufs, qs, factors, Rs, sq)):
        Pw = P.to(R.dtype)
        if B.dtype == R.dtype:
            B.sub_((R @ Pw.mT).mul_(ef[i]))
        else:
            B.copy_(_work(B) - (R @ Pw.mT).mul_(ef[i]))
        Qn = R / (s.sqrt().unsqueeze(-2) + eps)
        keep = (P == 0).flatten(-2).all(-1).view(-1, 1, 1)
        Qn = torch.where(keep, _work(Q).to(R.dtype), Qn)
        Q.copy_(flags.select(i, Qn, _work(Q).to(R.dtype)))
        upd = Qn @ Pw.mT
        if W.dtype == upd.dtype:
            W.sub_(upd.mul_(sizes[i]))
        else:
            W.copy_((_work(W) - upd.mul_(sizes[i])).to(W.dtype))
