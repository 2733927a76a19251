r"""Muon on lists of local tensors.

Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks";
Liu et al. 2025, "Muon is Scalable for LLM Training". Per matrix :math:`W`
(:math:`m\times n` as orthogonalised) with gradient :math:`G`:

.. math::
    M &\leftarrow \mu M + (1-\mu) G \\
    D &\leftarrow (1-\mu) G + \mu M \quad\text{(Nesterov; } D = M \text{ otherwise)}\\
    O &\leftarrow \operatorname{orthogonalize}(D) \approx U V^\top \\
    W &\leftarrow W (1 - \eta\lambda) - \eta\, s(m, n)\, O

:func:`muon_` is that update; the orthogonalisation of all directions is a
callable (:meth:`~matrixopt.optim._dist.Strategy.orthogonalize`: one batched
call per shape in one process, split over ranks under DDP/FSDP2), so this code
is the same everywhere. Options: NorMuon (:func:`normuon_`), cautious weight
decay. ``flags`` folds the ``nonfinite="skip"`` policy into every write.
Cost: the orthogonalisation (about :math:`k(4m^2n + 2m^3)` flops for ``k``
steps, short side ``m``) plus a few elementwise passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .._nonfinite import StepFlags

__all__ = ["ADJUST_LR_MODES", "muon_update_scale", "momentum_", "normuon_", "muon_"]

ADJUST_LR_MODES = ("match_rms_adamw", "original", "spectral", "none")
_OFF = StepFlags.off()


def muon_update_scale(m: int, n: int, mode: str) -> float:
    r"""Multiplier :math:`s(m, n)` of the orthogonalised update of an ``m × n`` matrix.

    ``"match_rms_adamw"``: :math:`0.2\sqrt{\max(m,n)}` (Moonlight; AdamW's lr and
    weight decay carry over). ``"original"``: :math:`\sqrt{\max(1, m/n)}` (Keller
    Jordan). ``"spectral"``: :math:`\sqrt{m/n}` (unit spectral-norm change per
    unit RMS of input; dion's ``spectral_norm``). ``"none"``: 1.

    ``m, n`` are the shape of the matrix *as orthogonalised* — for a conv weight
    ``[out, in, kh, kw]`` that is ``(out, in·kh·kw)``, never ``(out, in)``.
    """
    if mode == "match_rms_adamw":
        return 0.2 * math.sqrt(max(m, n))
    if mode == "original":
        return math.sqrt(max(1.0, m / n))
    if mode == "spectral":
        return math.sqrt(m / n)
    if mode == "none":
        return 1.0
    raise ValueError(f"adjust_lr must be one of {list(ADJUST_LR_MODES)}, got {mode!r}")


def momentum_(bufs: list[Tensor], grads: list[Tensor], mu: float, nesterov: bool,
              flags: StepFlags = _OFF) -> list[Tensor]:
    r"""Advance :math:`M \leftarrow \mu M + (1-\mu)G` in place; return the directions
    (Nesterov: :math:`(1-\mu)G + \mu M` as new tensors, else the buffers themselves).

    ``grads`` are read, never written, and cast to the buffers' dtype. With active
    ``flags`` they may hold NaN/Inf where a flag is false: each is made safe
    (``where(ok, g, 0)``) one parameter at a time, and with Nesterov that safe copy
    becomes the direction in place, so the policy keeps no copy of all gradients.
    """
    if not flags.active:
        grads = [g if g.dtype == b.dtype else g.to(b.dtype) for g, b in zip(grads, bufs)]
        torch._foreach_lerp_(bufs, grads, 1.0 - mu)
        if not nesterov:
            return list(bufs)
        return list(torch._foreach_lerp(grads, bufs, mu)) if grads else []
    dirs = []
    for i, (b, g) in enumerate(zip(bufs, grads)):
        one = flags.subset([i])
        d = one.safe([g])[0]
        if d.dtype != b.dtype:
            d = d.to(b.dtype)
        one.lerp_([b], [d], 1.0 - mu)
        dirs.append(d.lerp_(b, mu) if nesterov else b)
        del d  # only one parameter's safe gradient is alive at a time
    return dirs


def normuon_(row_stats: list[Tensor], updates: list[Tensor], beta2: float,
             flags: StepFlags = _OFF) -> list[Tensor]:
    r"""NorMuon (Li et al. 2025): normalise each row of the orthogonalised update by
    the root of an EMA of its mean square, keeping each matrix's Frobenius norm.

    ``updates[i]`` is ``[b, m, n]``; ``row_stats[i]`` (``[b, m]``) is updated in
    place, :math:`V \leftarrow \beta_2 V + (1-\beta_2)\operatorname{mean}_j O_{ij}^2`.
    Returns new tensors in the updates' dtypes.
    """
    out = []
    for i, (v, O) in enumerate(zip(row_stats, updates)):
        Of = O.float()
        flags.subset([i]).lerp_([v], [Of.square().mean(dim=-1).to(v.dtype)], 1.0 - beta2)
        normed = Of / (v.float().unsqueeze(-1).sqrt() + 1e-8)
        ratio = (Of.norm(dim=(-2, -1), keepdim=True)
                 / normed.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-30))
        out.append((normed * ratio).to(O.dtype))
    return out


def muon_(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor], *,
          views: Sequence[tuple[int, int, int]], lr: float, weight_decay: float, mu: float,
          nesterov: bool, scales: Sequence[float],
          orthogonalize: Callable[[list[Tensor]], list[Tensor]],
          unview: Callable[[int, Tensor], Tensor] | None = None,
          cautious_wd: bool = False, row_stats: list[Tensor] | None = None,
          normuon_beta2: float = 0.95, flags: StepFlags = _OFF) -> None:
    r"""One Muon step in place (``grads`` read, never written).

    Args:
        params: local parameters, updated in their own dtype.
        grads, bufs: gradients (made safe and cast to the buffers' dtype per parameter,
            see :func:`momentum_`) and momentum buffers.
        views: ``(b, m, n)`` of each parameter as a batch of matrices.
        scales: :func:`muon_update_scale` of each parameter's ``(m, n)``.
        orthogonalize: maps the directions (parameter-shaped) to their
            orthogonalised updates (shaped like the directions or like ``views[i]``);
            batching and any communication are its business.
        unview: maps update ``i`` from ``views[i]`` back to the parameter's shape
            (default: a reshape; a column split permutes its blocks back).
        row_stats: NorMuon statistics ``[b, m]`` per parameter (``None``: off).
    """
    if not params:
        return
    dirs = momentum_(bufs, grads, mu, nesterov, flags)
    # a momentum kept in another precision (state_dtype) steers in the parameter's
    dirs = [d if d.dtype == p.dtype else d.to(p.dtype) for d, p in zip(dirs, params)]
    ortho = orthogonalize(dirs)
    if row_stats is not None:
        ortho = normuon_(row_stats, [O.reshape(v) for O, v in zip(ortho, views)],
                         normuon_beta2, flags)
    ortho = [unview(i, O) if unview is not None else O.reshape(p.shape)
             for i, (O, p) in enumerate(zip(ortho, params))]
    sizes = flags.weights([lr * s for s in scales], 0.0, params)
    updates = [O.reshape(p.shape).mul(c) for O, p, c in zip(ortho, params, sizes)]
    if weight_decay != 0.0:
        if cautious_wd:
            for p, u in zip(params, updates):
                # decay only where the update pushes the weight toward zero (a skipped
                # parameter's update is zero, so it is not decayed either)
                p.sub_(p * (u * p > 0), alpha=lr * weight_decay)
        else:
            flags.mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_sub_(params, updates)
