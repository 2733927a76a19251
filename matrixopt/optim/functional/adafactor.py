r"""Adafactor on local tensors: the one Adafactor update of the package.

Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory
Cost" (ICML 2018), with the knobs of the later variants (big_vision / optax /
timm). For a gradient :math:`G` factored over dims (row, col):

.. math::
    \hat\beta_{2,t} &= \min(1 - t^{c},\ \beta_{2,\max}) \\
    R_t &= \hat\beta_{2,t} R_{t-1} + (1-\hat\beta_{2,t})\,\operatorname{mean}_{col}(G^2 +
        \epsilon_1),\qquad
    C_t = \hat\beta_{2,t} C_{t-1} + (1-\hat\beta_{2,t})\,\operatorname{mean}_{row}(G^2 +
        \epsilon_1)\\
    U_t &= G \big/ \sqrt{R_t C_t^\top / \operatorname{mean}(R_t)},\qquad
    \hat U_t = U_t / \max(1, \operatorname{RMS}(U_t)/d)\\
    \alpha_t &= \rho_t \max(\epsilon_2, \operatorname{RMS}(W_{t-1}))\ \text{(or } \rho_t),\qquad
    M_t = \beta_1 M_{t-1} + (1-\beta_1)\alpha_t\hat U_t\ \text{(or } \alpha_t\hat U_t)\\
    W_t &= W_{t-1}(1 - \lambda\alpha_t) - M_t.

Unfactored tensors keep the full :math:`V_t` (EMA of :math:`G^2+\epsilon_1`).

**Sharded statistics.** Every quantity above is local to a row of :math:`G`
except four sums: the column sums :math:`\sum_{rows} G^2` (when the row dim is
the sharded dim 0), :math:`\sum R` for :math:`\operatorname{mean}(R)`, and with
parameter scaling / clipping :math:`\|W\|^2` and :math:`\|U\|^2`. With
``reduce`` given (a callable that sums a 1-D tensor over the shards in place,
the distribution strategy's), ``G``, ``W`` and the statistics are the local
rows of tensors of shape ``full_shape`` sharded over dim 0, and those sums go
through it: at most two collectives per tensor, of ``n + 2`` and 1 numbers.
Without it (one process) the same code runs on whole tensors.

``flags`` folds the ``nonfinite="skip"`` policy into every write. Cost: about
five elementwise passes over each factored gradient plus two reductions;
no host synchronisation (step counters are CPU tensors read once per group).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .._nonfinite import StepFlags
from .adam import step_values

__all__ = ["factored_dims", "beta2_schedule", "relative_step_size", "step_sizes",
           "adafactor_", "precondition_", "clip_coef", "apply_", "stat_dtype"]

_LOW = (torch.float16, torch.bfloat16)
_OFF = StepFlags.off()
Reduce = Callable[[Tensor], Tensor]


def factored_dims(shape: Sequence[int], min_dim_size_to_factor: int = 1
                  ) -> tuple[int, int] | None:
    """The dims ``(row_dim, col_dim)`` (``row_dim < col_dim``) Adafactor factors over:
    the two largest (ties to the earlier dim), so a conv weight ``[out, in, kh, kw]`` is
    factored over ``out`` and ``in``; ``None`` (full second moment) for < 2 dims or a
    second largest dim below ``min_dim_size_to_factor``."""
    if len(shape) < 2:
        return None
    order = sorted(range(len(shape)), key=lambda d: (-int(shape[d]), d))
    a, b = order[0], order[1]
    if int(shape[b]) < min_dim_size_to_factor:
        return None
    return (a, b) if a < b else (b, a)


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the second-moment statistics: at least float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def beta2_schedule(t: Any, decay_rate: float, beta2_cap: float | None) -> Any:
    r""":math:`\hat\beta_{2,t} = \min(1 - t^{c}, \beta_{2,\max})` (0 at ``t = 1``); ``t`` a
    float or a 0-dim tensor (while compiling, :func:`~.adam.step_value`)."""
    b = 1.0 - t ** decay_rate
    if beta2_cap is None:
        return b
    return b.clamp(max=beta2_cap) if isinstance(b, Tensor) else min(b, beta2_cap)


def relative_step_size(t: Any, lr: float | None, relative_step: bool, warmup_init: bool) -> Any:
    r""":math:`\rho_t`: ``lr`` (fixed step), or the relative step :math:`\min(\text{lr or }
    10^{-2}, 1/\sqrt t)` (:math:`\min(10^{-6}t, 1/\sqrt t)` with ``warmup_init``)."""
    if not relative_step:
        assert lr is not None
        return lr
    cap = 1e-6 * t if warmup_init else (1e-2 if lr is None else lr)
    if isinstance(t, Tensor):
        inv = t.rsqrt()
        return torch.minimum(cap, inv) if isinstance(cap, Tensor) else inv.clamp(max=cap)
    return min(cap, 1.0 / math.sqrt(t))


def step_sizes(steps: list[Tensor], *, lr: float | None, decay_rate: float,
               beta2_cap: float | None, relative_step: bool, warmup_init: bool
               ) -> tuple[list[Any], list[Any]]:
    """Advance the CPU step counters by one; return (β̂₂, ρ) per tensor (floats eagerly,
    0-dim tensors while compiling)."""
    torch._foreach_add_(steps, 1.0)
    ts = step_values(steps)
    return ([beta2_schedule(t, decay_rate, beta2_cap) for t in ts],
            [relative_step_size(t, lr, relative_step, warmup_init) for t in ts])


def _sum(x: Tensor, reduce: Reduce | None) -> Tensor:
    return x if reduce is None else reduce(x)


def precondition_(g: Tensor, row: Tensor | None, col: Tensor | None, sq: Tensor | None,
                  dims: tuple[int, int] | None, *, beta2: Any, eps1: float,
                  shape: Sequence[int] | None = None, reduce: Reduce | None = None,
                  extra: Tensor | None = None, flags: StepFlags = _OFF
                  ) -> tuple[Tensor, Tensor | None]:
    r"""Update one tensor's second-moment statistics in place and return
    :math:`U = G/\sqrt{\hat V}` (a new tensor, zero where ``flags`` skip it).

    ``g`` may be the local rows of a tensor of ``shape`` sharded over dim 0, with
    ``reduce`` summing over the shards; then the sums that span the rows, and
    ``extra`` (a 1-D tensor of the caller's partial sums, e.g. :math:`\|W\|^2`),
    go through one ``reduce`` call. Returns ``(U, extra summed over the shards)``.
    """
    shape = tuple(shape) if shape is not None else tuple(g.shape)
    w = 1.0 - beta2
    pieces: list[Tensor] = []
    spans = False
    if dims is not None:
        row_dim, col_dim = dims
        assert row is not None and col is not None
        gs = g.to(row.dtype)
        # G² once, then two sums: vector_norm along a non-last dim is a strided
        # reduction, ~40x slower on CPU than this
        g2 = gs.square()
        flags.lerp_([row], [g2.sum(dim=col_dim, keepdim=True).div_(shape[col_dim]).add_(eps1)], w)
        col_sum = g2.sum(dim=row_dim, keepdim=True)
        del g2
        spans = reduce is not None and row_dim == 0
        if spans:  # column sums and the sum of R run over the shards
            pieces += [col_sum.reshape(-1), row.sum(dim=row_dim, keepdim=True).reshape(-1)]
    else:
        assert sq is not None
        gs = g.to(sq.dtype)
    if extra is not None:
        pieces.append(extra.to(gs.dtype))
    if reduce is not None and pieces:
        pieces = list(reduce(torch.cat(pieces)).split([x.numel() for x in pieces]))
    if dims is not None:
        assert row is not None and col is not None
        row_dim, _ = dims
        if spans:
            col_sum = pieces[0].view_as(col_sum)
            mean_r = pieces[1].view(row.sum(dim=row_dim, keepdim=True).shape) / shape[row_dim]
        else:
            mean_r = row.mean(dim=row_dim, keepdim=True)
        flags.lerp_([col], [col_sum.div(shape[row_dim]).add_(eps1)], w)
        # V^ = R C / mean(R); its inverse root split so nothing m×n is built twice. A
        # skipped tensor's statistics may still be zero (skipped first step), so its
        # factors are zeroed (0·0·0, not inf·0): two small selects, no m×n one
        rf, cf = (row / mean_r).rsqrt_(), col.rsqrt()
        if flags.active:
            zero = torch.zeros((), dtype=rf.dtype, device=rf.device)
            rf, cf = flags.select(0, rf, zero), flags.select(0, cf, zero)
        u = torch.mul(rf, cf).mul_(gs)
    else:
        assert sq is not None
        flags.lerp_([sq], [gs.square().add_(eps1)], w)
        inv = sq.rsqrt()
        if flags.active:
            inv = flags.select(0, inv, torch.zeros((), dtype=inv.dtype, device=inv.device))
        u = inv.mul_(gs)
    return u, (pieces[-1] if extra is not None else None)


def clip_coef(u: Tensor, threshold: float | None, numel: int, reduce: Reduce | None = None
              ) -> Tensor | None:
    r""":math:`1/\max(1, \operatorname{RMS}(U)/d)` as a 0-dim tensor (``None`` when clipping
    is off); ``numel`` of the whole tensor, ``reduce`` for a sharded ``u``."""
    if threshold is None:
        return None
    usq = _sum(u.square().sum().reshape(1), reduce)[0]
    return usq.sqrt().div(threshold * math.sqrt(max(1, numel))).clamp_min(1.0).reciprocal()


def adafactor_(params: list[Tensor], grads: list[Tensor], rows: list[Tensor | None],
               cols: list[Tensor | None], sqs: list[Tensor | None],
               momenta: list[Tensor | None], dims: list[tuple[int, int] | None], *,
               beta2s: Sequence[Any], rhos: Sequence[Any], eps1: float, eps2: float,
               clip_threshold: float | None, weight_decay: float, beta1: float | None,
               scale_parameter: bool, full_shapes: Sequence[Sequence[int]] | None = None,
               reduce: Reduce | None = None, flags: StepFlags = _OFF) -> None:
    """One Adafactor step in place, one tensor at a time (peak: about two gradients).

    Args:
        params, grads: local parameters and gradients (a skipped one may hold NaN:
            it is replaced by zeros here, one tensor at a time); a half-precision
            parameter is updated through a float32 copy.
        rows, cols / sqs: factored statistics (``dims[i]`` set) or the full second
            moment, updated in place; ``momenta``: the momentum buffers (``beta1``
            set), in place (a quantised momentum's float32 transient is the caller's).
        beta2s, rhos: from :func:`step_sizes`.
        full_shapes, reduce: for tensors sharded over dim 0 (module docstring);
            ``None``: whole tensors, nothing reduced.
    """
    for i, (p, g) in enumerate(zip(params, grads)):
        shape = tuple(full_shapes[i]) if full_shapes is not None else tuple(p.shape)
        numel = max(1, math.prod(shape))
        one = flags.subset([i])
        wp = p.float() if p.dtype in _LOW else p
        sd = stat_dtype(p.dtype)
        wsq = wp.to(sd).square().sum().reshape(1) if scale_parameter else None
        # the safe copy (none with the policy off) lives only inside precondition_, in
        # place of the G² and U it does not overlap with: no extra peak over "ignore"
        u, wsq = precondition_(one.safe([g])[0], rows[i], cols[i], sqs[i], dims[i],
                               beta2=beta2s[i], eps1=eps1, shape=shape, reduce=reduce,
                               extra=wsq, flags=one)
        alpha: Any = rhos[i]
        if wsq is not None:
            alpha = wsq[0].sqrt().div(math.sqrt(numel)).clamp_min(eps2) * alpha
        clip = clip_coef(u, clip_threshold, numel, reduce)
        coef: Any = alpha if clip is None else clip * alpha
        apply_(wp, u, momenta[i], alpha=alpha, coef=coef, weight_decay=weight_decay,
               beta1=beta1, flags=one)
        if wp is not p:
            p.copy_(wp)


def apply_(w: Tensor, u: Tensor, momentum: Tensor | None, *, alpha: Any, coef: Any,
           weight_decay: float, beta1: float | None, flags: StepFlags = _OFF) -> None:
    r""":math:`W \leftarrow W(1-\lambda\alpha) - M` with :math:`M = \beta_1 M + (1-\beta_1)
    c\,U` (momentum) or :math:`M = c\,U`; ``flags`` (one entry) folded in."""
    if weight_decay != 0.0:
        if isinstance(alpha, Tensor):
            w.mul_(flags.weight(0, (alpha * -weight_decay + 1.0).to(w.dtype), 1.0, w))
        else:
            flags.mul_([w], 1.0 - weight_decay * alpha)
    if beta1 is not None:
        assert momentum is not None
        flags.lerp_([momentum], [u.mul_(coef).to(momentum.dtype)], 1.0 - beta1)
        m = momentum.to(w.dtype)
        if flags.active:  # w - 1·M = w - M exactly; a skipped M is finite (kept): w - 0·M
            w.addcmul_(m, flags.weight(0, torch.ones((), dtype=w.dtype, device=w.device),
                                       0.0, w).to(w.dtype), value=-1.0)
        else:
            w.sub_(m)
    elif isinstance(coef, Tensor) or flags.active:
        step = flags.weight(0, coef if isinstance(coef, Tensor) else
                            torch.full((), coef, dtype=w.dtype, device=w.device), 0.0, w)
        step = step.to(w.dtype)
        w.addcmul_(u.to(w.dtype), step, value=-1.0)
    else:
        w.add_(u.to(w.dtype), alpha=-coef)
