r"""Adafactor: Adam-like steps with a factored (O(m+n)) second moment.

Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory
Cost" (ICML 2018), with the knobs of the later variants (big_vision / optax /
timm: factor the two largest dims, ``min_dim_size_to_factor``, β₂ cap,
low-precision momentum). For a gradient :math:`G` factored over dims
(row, col) — an :math:`m\times n` matrix, with any other dims kept as batch:

.. math::
    \hat\beta_{2,t} &= \min(1 - t^{c},\ \beta_{2,\max}) \qquad (c = \text{decay\_rate} = -0.8)\\
    R_t &= \hat\beta_{2,t} R_{t-1}
        + (1-\hat\beta_{2,t})\,\operatorname{mean}_{col}(G^2 + \epsilon_1)
        \quad (m)\\
    C_t &= \hat\beta_{2,t} C_{t-1}
        + (1-\hat\beta_{2,t})\,\operatorname{mean}_{row}(G^2 + \epsilon_1)
        \quad (n)\\
    \hat V_t &= R_t C_t^\top / \operatorname{mean}(R_t), \qquad U_t = G / \sqrt{\hat V_t}\\
    \hat U_t &= U_t / \max(1, \operatorname{RMS}(U_t)/d) \qquad (d = \text{clip\_threshold})\\
    \alpha_t &= \rho_t \cdot \max(\epsilon_2, \operatorname{RMS}(W_{t-1}))
        \quad\text{(parameter scaling; } \alpha_t = \rho_t \text{ without)}\\
    \rho_t &= \min(\text{lr},\ 1/\sqrt t) \quad\text{(relative step, lr = }10^{-2}
        \text{ by default; } \min(10^{-6} t, 1/\sqrt t) \text{ with warmup\_init; }
        \rho_t = \text{lr without)}\\
    M_t &= \beta_1 M_{t-1} + (1-\beta_1)\,\alpha_t \hat U_t
        \quad\text{(only if beta1 is set; } M_t = \alpha_t\hat U_t \text{ otherwise)}\\
    W_t &= W_{t-1}(1 - \lambda\alpha_t) - M_t.

Tensors that are not factored (vectors, scalars, and tensors whose second
largest dim is below ``min_dim_size_to_factor``) keep the full
:math:`V_t` (EMA of :math:`G^2 + \epsilon_1`).

Cost per step: a few elementwise passes over each gradient plus two
reductions; memory :math:`m + n` per factored matrix (times the other dims),
plus the momentum if ``beta1`` is set. No host synchronisation per
parameter: the step counters live on the CPU and are read once per group; the
RMS values and the clipping factor stay tensors.

The math is exposed as functions on lists of tensors
(:func:`adafactor_precondition_`, :func:`clip_factors`, :func:`param_scale`,
:func:`relative_step_size`) so :class:`~matrixopt.optim.GaLoreAdafactor` runs
the same code on projected gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import torch
from torch import Tensor

from ._adamw import step_value
from ._common import MatrixOptimizer, SkipNonFinite, _GroupChecker, check_grad, closure_loss
from ._distributed import (
    DistContext,
    all_reduce_sum,
    gathered_params,
    has_dtensors,
    local_tensor,
    resolve_context,
)
from ._state import (
    check_state_dtype,
    compute_dtype,
    counters_to_cpu_,
    init_moment,
    is_native,
    load_moment,
    store_moment,
)

__all__ = [
    "Adafactor",
    "hf_schedule_lr",
    "factored_dims",
    "init_adafactor_state",
    "adafactor_precondition_",
    "clip_factors",
    "param_scale",
    "relative_step_size",
    "beta2_schedule",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------
# math as functions (shared with GaLoreAdafactor)
# ----------------------------------------------------------------------------
def factored_dims(shape: Sequence[int], min_dim_size_to_factor: int = 1
                  ) -> tuple[int, int] | None:
    """The dims ``(row_dim, col_dim)`` (``row_dim < col_dim``) Adafactor factors over.

    The two largest dims, ties going to the earlier dim, so a conv weight
    ``[out, in, kh, kw]`` is factored over ``out`` and ``in`` (not over the
    kernel dims, as torch.optim.Adafactor does). ``None`` (keep the full second
    moment) for tensors with fewer than 2 dims or whose second largest dim is
    below ``min_dim_size_to_factor``.
    """
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


def init_adafactor_state(state: dict[str, Any], like: Tensor, dims: tuple[int, int] | None,
                         beta1: float | None, momentum_dtype: torch.dtype | None,
                         state_dtype: str | None = None) -> None:
    """Create Adafactor state for a gradient shaped like ``like``.

    Keys: ``step`` (float32 CPU scalar tensor); ``exp_avg_sq_row`` (size 1 at
    ``col_dim``) and ``exp_avg_sq_col`` (size 1 at ``row_dim``) when factored,
    else ``exp_avg_sq``; ``exp_avg`` (in ``momentum_dtype``, default the
    tensor's dtype; ``state_dtype``, when set, takes precedence) when ``beta1``
    is set.
    """
    sd = stat_dtype(like.dtype)
    state["step"] = torch.tensor(0.0, dtype=torch.float32, device="cpu")
    if dims is not None:
        row_dim, col_dim = dims
        rshape = list(like.shape)
        rshape[col_dim] = 1
        cshape = list(like.shape)
        cshape[row_dim] = 1
        state["exp_avg_sq_row"] = torch.zeros(rshape, dtype=sd, device=like.device)
        state["exp_avg_sq_col"] = torch.zeros(cshape, dtype=sd, device=like.device)
    else:
        state["exp_avg_sq"] = torch.zeros(like.shape, dtype=sd, device=like.device)
    if beta1 is not None and state_dtype is not None:
        init_moment(state, "exp_avg", like, state_dtype, signed=True)
    elif beta1 is not None:
        state["exp_avg"] = torch.zeros(like.shape, dtype=momentum_dtype or like.dtype,
                                       device=like.device)


def beta2_schedule(t: Any, decay_rate: float, beta2_cap: float | None) -> Any:
    r""":math:`\hat\beta_{2,t} = \min(1 - t^{c}, \beta_{2,\max})` (0 at ``t = 1``).

    ``t`` is a float, or a 0-dim tensor (then so is the result: the compiled step,
    see :func:`~matrixopt.optim._adamw.step_value`)."""
    b = 1.0 - t ** decay_rate
    if beta2_cap is None:
        return b
    return b.clamp(max=beta2_cap) if isinstance(b, Tensor) else min(b, beta2_cap)


def relative_step_size(t: Any, lr: float | None, relative_step: bool, warmup_init: bool
                       ) -> Any:
    r""":math:`\rho_t`: ``lr`` (fixed step) or the relative step
    :math:`\min(\text{lr or } 10^{-2}, 1/\sqrt t)` (:math:`\min(10^{-6}t, 1/\sqrt t)` with
    ``warmup_init``). ``t`` a float or a 0-dim tensor (as :func:`beta2_schedule`)."""
    if not relative_step:
        assert lr is not None
        return lr
    cap = 1e-6 * t if warmup_init else (1e-2 if lr is None else lr)
    if isinstance(t, Tensor):
        inv = t.rsqrt()
        return torch.minimum(cap, inv) if isinstance(cap, Tensor) else inv.clamp(max=cap)
    return min(cap, 1.0 / math.sqrt(t))


def adafactor_precondition_(grads: list[Tensor], rows: list[Tensor | None],
                            cols: list[Tensor | None], sqs: list[Tensor | None],
                            dims: list[tuple[int, int] | None], beta2s: Sequence[Any],
                            eps1: float) -> list[Tensor]:
    r"""Update the second-moment statistics in place; return :math:`G/\sqrt{\hat V}` (new tensors).

    For entry ``i``: if ``dims[i]`` is ``(row_dim, col_dim)``, ``rows[i]`` and
    ``cols[i]`` are the factored statistics (``sqs[i]`` unused); otherwise
    ``sqs[i]`` is the full second moment. ``grads`` are read, never written;
    they may have a lower precision than the statistics (computed in the
    statistics' dtype). Cost: about five elementwise passes over each factored
    tensor (square, two sums, the outer product of the factors, the product with G).
    """
    out: list[Tensor] = []
    for g, r, c, v, d, b2 in zip(grads, rows, cols, sqs, dims, beta2s):
        w = 1.0 - b2
        if d is not None:
            assert r is not None and c is not None
            row_dim, col_dim = d
            gs = g.to(r.dtype)
            # G^2 once, then two sums: vector_norm along a non-last dim is a strided
            # reduction, ~40x slower on CPU than this (2048x512: 11 ms vs 0.3 ms)
            sq = gs.square()
            r.lerp_(sq.sum(dim=col_dim, keepdim=True).div_(g.shape[col_dim]).add_(eps1), w)
            c.lerp_(sq.sum(dim=row_dim, keepdim=True).div_(g.shape[row_dim]).add_(eps1), w)
            del sq
            # V^ = R C / mean(R); its inverse root split so nothing m×n is built twice
            r_factor = (r / r.mean(dim=row_dim, keepdim=True)).rsqrt_()
            u = torch.mul(r_factor, c.rsqrt()).mul_(gs)
        else:
            assert v is not None
            gs = g.to(v.dtype)
            v.lerp_(gs.square().add_(eps1), w)
            u = v.rsqrt().mul_(gs)
        out.append(u)
    return out


def clip_factors(updates: list[Tensor], threshold: float | None) -> list[Tensor] | None:
    r""":math:`1/\max(1, \operatorname{RMS}(U)/d)` per tensor, as 0-dim tensors (no host sync).

    ``None`` when ``threshold`` is ``None`` (clipping off). The factor is folded
    into the step multiplier so the clipped update is never materialised.
    """
    if threshold is None or not updates:
        return None
    norms = torch._foreach_norm(updates)
    torch._foreach_div_(norms, [threshold * math.sqrt(max(1, u.numel())) for u in updates])
    torch._foreach_clamp_min_(norms, 1.0)
    torch._foreach_reciprocal_(norms)
    return list(norms)


def param_scale(params: list[Tensor], eps2: float) -> list[Tensor]:
    r""":math:`\max(\epsilon_2, \operatorname{RMS}(W))` per parameter, as 0-dim tensors on its
    device."""
    norms = [n.to(stat_dtype(p.dtype)) for n, p in zip(torch._foreach_norm(params), params)]
    torch._foreach_div_(norms, [math.sqrt(max(1, p.numel())) for p in params])
    torch._foreach_clamp_min_(norms, eps2)
    return list(norms)


def _float(x: float | Tensor | None) -> float | None:
    if x is None:
        return None
    return float(x.item()) if isinstance(x, Tensor) else float(x)


# ----------------------------------------------------------------------------
# the optimizer
# ----------------------------------------------------------------------------
class Adafactor(MatrixOptimizer):
    r"""Adafactor with Hugging Face's argument names and semantics.

    Replaces ``transformers.optimization.Adafactor`` (same arguments, same
    update; ``lr=1e-2`` by default where Hugging Face has ``None``, the same step)
    and covers ``torch.optim.Adafactor``::

        opt = Adafactor(model.parameters())                        # HF defaults: relative step
        opt = Adafactor(model.parameters(), lr=1e-3, relative_step=False,
                        scale_parameter=False, beta2_cap=0.999)    # "modern" fixed-lr variant

    Learning-rate schedulers: every torch scheduler (``StepLR``, ``LambdaLR``,
    ``transformers.get_linear_schedule_with_warmup``, ...) works: ``lr`` is a
    number, and with ``relative_step=True`` it caps the relative step, so a
    schedule scales the cap. Hugging Face's ``AdafactorSchedule`` (a proxy that
    overwrites ``lr`` with the step size it logs, calling ``_get_lr``) needs
    ``lr=None``, as Hugging Face's docs write it, so that ``lr`` is not read.

    Args:
        params: parameters or parameter groups.
        lr: learning rate (default 1e-2). With ``relative_step=False`` the step
            :math:`\rho_t = \text{lr}`; with ``relative_step=True`` it caps the
            relative step, :math:`\rho_t = \min(\text{lr}, 1/\sqrt t)` —
            torch.optim.Adafactor's rule; the default 1e-2 is Hugging Face's
            constant, so ``lr=1e-2`` and Hugging Face's ``lr=None`` take the same
            steps. ``lr=None`` (Hugging Face's spelling, relative step only) stores
            ``lr=1e-2, external_lr=False``: the step never reads ``lr``, so a
            scheduler writing it (``AdafactorSchedule``) does not change it.
        eps: :math:`(\epsilon_1, \epsilon_2)`: regulariser added to :math:`G^2`
            (default 1e-30) and floor of the parameter RMS in parameter scaling
            (default 1e-3).
        clip_threshold: :math:`d` in the update clipping
            :math:`U/\max(1, \operatorname{RMS}(U)/d)` (default 1.0; ``None``
            disables clipping).
        decay_rate: :math:`c` in :math:`\hat\beta_{2,t} = 1 - t^{c}` (default -0.8).
        beta1: momentum coefficient (default ``None``: no momentum, no memory for it).
        weight_decay: decoupled weight decay :math:`\lambda`, multiplied by the
            step size :math:`\alpha_t` (as Hugging Face) (default 0).
        scale_parameter: multiply the step by :math:`\max(\epsilon_2, \operatorname{RMS}(W))`
            (default True).
        relative_step: time-dependent step :math:`\rho_t` (default True).
        warmup_init: :math:`\rho_t = \min(10^{-6} t, 1/\sqrt t)` (needs
            ``relative_step=True``; ``lr`` is not read) (default False).
        min_dim_size_to_factor: factor only tensors whose second largest dim is
            at least this (default 1: every tensor with ≥ 2 dims, as Hugging
            Face; optax/big_vision use 128).
        beta2_cap: upper bound on :math:`\hat\beta_{2,t}` (default ``None``, as
            Hugging Face; 0.999 in big_vision/optax).
        momentum_dtype: dtype of the momentum buffer (default ``None``: the
            parameter's; ``torch.bfloat16`` halves its memory).
        nonfinite: ``"skip"`` (default), ``"raise"`` or ``"ignore"``: what a
            gradient with NaN/Inf does (see :class:`~matrixopt.optim.Muon`).
        state_dtype: storage of the momentum, ``None`` (default: as
            ``momentum_dtype``), ``"fp32"``, ``"bf16"`` or ``"int8"`` (block-wise
            8-bit, :mod:`matrixopt.optim._state`); the factored statistics are
            already tiny and stay float32.
        external_lr: whether the relative step reads ``lr`` as its cap
            (default True; ``False``: :math:`\rho_t = \min(10^{-2}, 1/\sqrt t)`,
            Hugging Face's rule, what ``lr=None`` selects). Ignored with
            ``relative_step=False``.

    The factored dims are the two largest (:func:`factored_dims`), so a conv
    weight ``[out, in, kh, kw]`` keeps statistics of sizes ``out·kh·kw`` and
    ``in·kh·kw``. Statistics are kept in float32 (float64 for float64
    parameters); bf16/fp16 parameters are updated through a float32 copy.

    Under FSDP2 (``Shard(0)`` DTensor parameters) the step runs on the local
    shards and only the sums that span the sharded dim are all-reduced; the
    state stays sharded DTensors (``_sharded_step``). With ``state_dtype`` set
    it falls back to whole matrices (:func:`~matrixopt.optim._distributed.gathered_params`).

    State per parameter (tensors only): ``step``, ``exp_avg_sq_row`` /
    ``exp_avg_sq_col`` (factored) or ``exp_avg_sq``, and ``exp_avg`` with
    ``beta1``. ``step()`` never modifies ``p.grad``; parameters whose grad is
    ``None`` are not touched.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor | None = 1e-2,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float | None = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        relative_step: bool = True,
        warmup_init: bool = False,
        *,
        min_dim_size_to_factor: int = 1,
        beta2_cap: float | None = None,
        momentum_dtype: torch.dtype | None = None,
        nonfinite: str = "skip",
        state_dtype: str | None = None,
        external_lr: bool = True,
    ) -> None:
        lr, external_lr = adafactor_lr_defaults(lr, external_lr, relative_step)
        defaults = dict(
            lr=lr, external_lr=external_lr, eps=eps, clip_threshold=clip_threshold,
            decay_rate=decay_rate, beta1=beta1,
            weight_decay=weight_decay, scale_parameter=scale_parameter,
            relative_step=relative_step, warmup_init=warmup_init,
            min_dim_size_to_factor=min_dim_size_to_factor, beta2_cap=beta2_cap,
            momentum_dtype=momentum_dtype, nonfinite=nonfinite, state_dtype=state_dtype,
        )
        super().__init__(params, defaults)

    @staticmethod
    def _get_lr(group: dict[str, Any], state: dict[str, Any]) -> float:
        """Hugging Face's ``AdafactorSchedule`` reads the step size here
        (:func:`hf_schedule_lr`)."""
        return hf_schedule_lr(group, state)

    # ------------------------------------------------------------------ checks
    def _check_group(self, check: _GroupChecker) -> None:
        check_adafactor_group(check)

    # -------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimisation step (``closure`` re-evaluates the loss)."""
        loss = closure_loss(closure)
        if has_dtensors(self):
            if any(g["state_dtype"] is not None for g in self.param_groups):
                # quantised/converted momentum storage is not sharded yet: whole-matrix
                # fallback (see _distributed.gathered_params)
                with gathered_params(self, "Adafactor"):
                    self.step()
            else:
                self._sharded_step()
            return loss
        self._raise_on_nonfinite()
        for index, group in enumerate(self.param_groups):
            params, grads, dims = self._collect(index, group, sharded=False)
            if params:
                states = [self.state[p] for p in params]
                guard = SkipNonFinite(group, params, grads, self.state)
                adafactor_update_(params, guard.grads, states, dims, group)
                guard.finish()
        return loss

    def _collect(self, index: int, group: dict[str, Any], *, sharded: bool
                 ) -> tuple[list[Tensor], list[Tensor], list[tuple[int, int] | None]]:
        """The group's parameters with a gradient, their gradients and factored dims;
        creates missing state (as DTensors when ``sharded``)."""
        params: list[Tensor] = []
        grads: list[Tensor] = []
        dims: list[tuple[int, int] | None] = []
        for p in group["params"]:
            if p.grad is None:
                continue
            grads.append(check_grad(p, "Adafactor", index))
            params.append(p)
            d = factored_dims(p.shape, group["min_dim_size_to_factor"])
            state = self.state[p]
            counters_to_cpu_(state, ("step",))  # e.g. loaded from a capturable optimizer
            if "step" not in state:
                if sharded:
                    _init_sharded_state(state, p, d, group["beta1"], group["momentum_dtype"])
                else:
                    init_adafactor_state(state, p, d, group["beta1"], group["momentum_dtype"],
                                         group["state_dtype"])
            elif ("exp_avg_sq_row" in state) != (d is not None):
                raise RuntimeError(
                    f"Adafactor: param_groups[{index}]: the state of a parameter of shape "
                    f"{tuple(p.shape)} was created {'with' if d is None else 'without'} "
                    f"factoring; min_dim_size_to_factor cannot change during training")
            dims.append(d)
        return params, grads, dims


    def _sharded_step(self) -> None:
        r"""FSDP2 step on local shards (parameters ``Shard(0)`` on a 1-D mesh).

        The statistics are kept where they are computed: ``exp_avg_sq_row``
        (reduced over ``col_dim`` ≥ 1) is always local to the rows this rank
        holds and stays ``Shard(0)``, like the full ``exp_avg_sq`` and the
        momentum. What spans dim 0 is summed over the mesh with one
        ``all_reduce`` of a small buffer per parameter: when ``row_dim == 0``
        the column sums :math:`\sum_{rows} G^2` (``n`` numbers; the column
        statistic is then ``Replicate``, identical on every rank) and the sums
        :math:`\sum_{rows} R` for :math:`\operatorname{mean}(R)`; with
        ``scale_parameter`` the parameter's :math:`\|W\|^2`. The update clipping
        needs :math:`\|U\|^2`, one more scalar ``all_reduce``. Means divide by the
        global sizes, so the step equals the single-process one up to the
        order of floating-point sums. State tensors are DTensors, so
        :mod:`torch.distributed.checkpoint` saves and reshards them.
        """
        self._raise_on_nonfinite()
        ctx = resolve_context("Adafactor", [p for g in self.param_groups for p in g["params"]],
                              None)
        assert ctx is not None
        for index, group in enumerate(self.param_groups):
            params, grads, dims = self._collect(index, group, sharded=True)
            if params:
                states = [self.state[p] for p in params]
                guard = SkipNonFinite(group, params, grads, self.state)
                _sharded_update_(ctx, params, guard.grads, states, dims, group)
                guard.finish()


def _init_sharded_state(state: dict[str, Any], p: Tensor, dims: tuple[int, int] | None,
                        beta1: float | None, momentum_dtype: torch.dtype | None) -> None:
    """:func:`init_adafactor_state` for a ``Shard(0)`` DTensor parameter: the same keys and
    global shapes, as DTensors (``exp_avg_sq_col`` replicated when it spans dim 0)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor import zeros as dzeros
    mesh = p.device_mesh  # type: ignore[attr-defined]
    sd = stat_dtype(p.dtype)
    state["step"] = torch.tensor(0.0, dtype=torch.float32, device="cpu")
    if dims is not None:
        row_dim, col_dim = dims
        rshape = list(p.shape)
        rshape[col_dim] = 1
        cshape = list(p.shape)
        cshape[row_dim] = 1
        state["exp_avg_sq_row"] = dzeros(rshape, dtype=sd, device_mesh=mesh,
                                         placements=[Shard(0)])
        state["exp_avg_sq_col"] = dzeros(cshape, dtype=sd, device_mesh=mesh,
                                         placements=[Replicate() if row_dim == 0 else Shard(0)])
    else:
        state["exp_avg_sq"] = dzeros(list(p.shape), dtype=sd, device_mesh=mesh,
                                     placements=[Shard(0)])
    if beta1 is not None:
        state["exp_avg"] = torch.zeros_like(p, dtype=momentum_dtype or p.dtype)


def _sharded_update_(ctx: DistContext, params: list[Tensor], grads: list[Tensor],
                     states: list[dict[str, Any]], dims: list[tuple[int, int] | None],
                     group: dict[str, Any]) -> None:
    """:func:`adafactor_update_` on the local shards of ``Shard(0)`` DTensors (see
    :meth:`Adafactor._sharded_step` for what is reduced over ``ctx``'s process group)."""
    beta2s, rhos = step_sizes([s["step"] for s in states], group)
    eps1, eps2 = float(group["eps"][0]), float(group["eps"][1])
    threshold = _float(group["clip_threshold"])
    wd = float(group["weight_decay"])
    beta1 = group["beta1"]
    scale = bool(group["scale_parameter"])
    for P, G, st, d, b2, rho in zip(params, grads, states, dims, beta2s, rhos):
        p, g = local_tensor(P), local_tensor(G)
        low = p.dtype in _LOW_PRECISION
        w = p.float() if low else p
        shape = P.shape
        wgt = 1.0 - b2
        parts: list[Tensor] = []
        if d is not None:
            row_dim, col_dim = d
            r = local_tensor(st["exp_avg_sq_row"])
            c = local_tensor(st["exp_avg_sq_col"])
            gs = g.to(r.dtype)
            sq = gs.square()
            r.lerp_(sq.sum(dim=col_dim, keepdim=True).div_(shape[col_dim]).add_(eps1), wgt)
            csum = sq.sum(dim=row_dim, keepdim=True)
            del sq
            rsum = r.sum(dim=row_dim, keepdim=True)
            if row_dim == 0:  # both sums run over the sharded dim
                parts += [csum.reshape(-1), rsum.reshape(-1)]
        else:
            v = local_tensor(st["exp_avg_sq"])
            gs = g.to(v.dtype)
        if scale:
            parts.append(w.to(stat_dtype(p.dtype)).square().sum().reshape(1))
        if parts:
            buf = torch.cat([x.to(gs.dtype) for x in parts])
            all_reduce_sum(buf, ctx)
            if d is not None and d[0] == 0:
                csum = buf[:csum.numel()].view_as(csum)
                rsum = buf[csum.numel():csum.numel() + rsum.numel()].view_as(rsum)
        if d is not None:
            c.lerp_(csum.div(shape[d[0]]).add_(eps1), wgt)
            r_factor = (r / rsum.div(shape[d[0]])).rsqrt_()
            u = torch.mul(r_factor, c.rsqrt()).mul_(gs)
        else:
            v.lerp_(gs.square().add_(eps1), wgt)
            u = v.rsqrt().mul_(gs)
        alpha: Tensor | float = rho
        if scale:
            rms = buf[-1].sqrt().div(math.sqrt(max(1, P.numel()))).clamp_min(eps2)
            alpha = rms * rho
        coef: Tensor | float = alpha
        if threshold is not None:
            usq = u.square().sum().reshape(1)
            all_reduce_sum(usq, ctx)
            clip = usq[0].sqrt().div(threshold * math.sqrt(max(1, P.numel()))).clamp_min(1.0)
            coef = clip.reciprocal() * alpha
        if beta1 is not None:
            (m,) = momentum_([local_tensor(st["exp_avg"])], [u.mul_(coef)], float(beta1))
            apply_update_([w], [m.to(w.dtype)], [1.0], [alpha], wd)
        else:
            apply_update_([w], [u.to(w.dtype)], [coef], [alpha], wd)
        if low:
            p.copy_(w)


#: The relative step's cap when ``lr`` is not read (Hugging Face's constant).
HF_RELATIVE_STEP_CAP = 1e-2


def adafactor_lr_defaults(lr: Any, external_lr: bool, relative_step: Any
                          ) -> tuple[Any, bool]:
    """``lr=None`` (Hugging Face's spelling of "the relative step alone") as stored:
    ``lr=1e-2`` (a number, so torch's schedulers work) and ``external_lr=False``
    (the step does not read it). Other values pass through; ``lr=None`` with
    ``relative_step=False`` is left for the group check to reject."""
    if lr is None and relative_step is True:
        return HF_RELATIVE_STEP_CAP, False
    return lr, external_lr


def hf_schedule_lr(group: dict[str, Any], state: dict[str, Any]) -> float:
    r"""The step size :math:`\alpha_t` Hugging Face's ``AdafactorSchedule`` logs
    (``optimizer._get_lr(group, state)``): :math:`\rho_t` at the state's ``step``,
    times :math:`\max(\epsilon_2, \operatorname{RMS}(W))` of the group's first
    parameter (the one whose state the schedule passes) with ``scale_parameter``.

    The schedule then writes that value into ``group["lr"]``; a group whose step
    reads ``lr`` (``relative_step=False``, or ``external_lr=True``) would change
    its own step size, so that raises, asking for ``lr=None``. Called by the
    scheduler, outside ``step()``: the RMS is one host read.
    """
    if not group["relative_step"] or (group["external_lr"] and not group["warmup_init"]):
        raise ValueError(
            "Adafactor: Hugging Face's AdafactorSchedule overwrites group['lr'] with the step "
            "size it logs, but this group's step reads lr (relative_step="
            f"{group['relative_step']}, external_lr={group['external_lr']}); construct the "
            "optimizer with lr=None and relative_step=True (Hugging Face's setting for "
            "AdafactorSchedule), or use a torch scheduler (docs/migration.md)")
    step = state.get("step", 0)
    t = max(1.0, float(step.item()) if isinstance(step, Tensor) else float(step))
    rho = relative_step_size(t, None, True, bool(group["warmup_init"]))
    if not group["scale_parameter"]:
        return rho
    p = local_tensor(group["params"][0]).detach()
    rms = float(p.float().norm()) / math.sqrt(max(1, p.numel()))
    return max(float(group["eps"][1]), rms) * rho


def check_adafactor_group(check: _GroupChecker, owner: str = "Adafactor") -> None:
    """Validate the Adafactor keys of a group (shared with GaLoreAdafactor)."""
    g = check.group
    if g["lr"] is None:  # Hugging Face's spelling, given in a group dict
        g["lr"], g["external_lr"] = adafactor_lr_defaults(None, g["external_lr"],
                                                          g["relative_step"])
    check.number("lr", low=0.0, allow_none=True)
    if g["lr"] is None:
        raise check.fail("lr", "must be given when relative_step=False (lr=None means the "
                               "relative step schedule)")
    check.boolean("external_lr")
    eps = g["eps"]
    if not (isinstance(eps, (tuple, list)) and len(eps) == 2
            and all(isinstance(e, (int, float)) and not isinstance(e, bool)
                    and math.isfinite(e) and e >= 0 for e in eps)):
        raise check.fail("eps", "must be a pair of finite numbers >= 0 (eps1, eps2)")
    check.number("clip_threshold", low=0.0, low_open=True, allow_none=True)
    check.number("decay_rate", high=0.0)
    check.number("beta1", low=0.0, high=1.0, high_open=True, allow_none=True)
    check.number("weight_decay", low=0.0)
    check.boolean("scale_parameter")
    check.boolean("relative_step")
    check.boolean("warmup_init")
    if g["warmup_init"] and not g["relative_step"]:
        raise check.fail("warmup_init", "needs relative_step=True")
    check.integer("min_dim_size_to_factor", low=1)
    check.number("beta2_cap", low=0.0, high=1.0, high_open=True, allow_none=True)
    check.dtype("momentum_dtype")
    check_state_dtype(check)


def step_sizes(steps: list[Tensor], group: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    """Advance the CPU step counters; return (β̂₂ per tensor, ρ per tensor).

    Eager: Python floats read from the counters (CPU tensors, as torch keeps
    ``step``: no device synchronisation). While ``torch.compile`` traces: 0-dim
    CPU tensors computed from them, so the step-dependent sizes are graph
    inputs, not constants dynamo would recompile for at every step
    (:func:`~matrixopt.optim._adamw.step_value`).
    """
    torch._foreach_add_(steps, 1.0)
    ts = ([step_value(s) for s in steps] if torch.compiler.is_compiling()
          else torch.stack(steps).tolist())
    # the relative step reads lr unless the group says not to (lr=None, Hugging Face)
    lr = _float(group["lr"]) if group["external_lr"] or not group["relative_step"] else None
    decay, cap = float(group["decay_rate"]), _float(group["beta2_cap"])
    beta2s = [beta2_schedule(t, decay, cap) for t in ts]
    rhos = [relative_step_size(t, lr, group["relative_step"], group["warmup_init"]) for t in ts]
    return beta2s, rhos


def apply_update_(params: list[Tensor], updates: list[Tensor], coefs: Sequence[Tensor | float],
                  alphas: Sequence[Tensor | float], weight_decay: float) -> None:
    r""":math:`W \leftarrow W(1 - \lambda\alpha) - c\,U` in place, one pass per tensor for the
    update.

    ``coefs`` (:math:`c`) and ``alphas`` are 0-dim tensors or floats per tensor (each list
    all tensors or all floats).
    """
    if weight_decay != 0.0:
        if isinstance(alphas[0], Tensor):
            factors = torch._foreach_mul(cast("list[Tensor]", alphas), -weight_decay)
            torch._foreach_add_(factors, 1.0)
            torch._foreach_mul_(params, [f.to(p.dtype) for f, p in zip(factors, params)])
        else:
            torch._foreach_mul_(params, [1.0 - weight_decay * a
                                         for a in cast("list[float]", alphas)])
    if isinstance(coefs[0], Tensor):
        for p, u, c in zip(params, updates, cast("list[Tensor]", coefs)):
            p.addcmul_(u, c.to(p.dtype), value=-1.0)
    elif all(c == 1.0 for c in coefs):
        torch._foreach_sub_(params, updates)
    else:
        for p, u, cf in zip(params, updates, cast("list[float]", coefs)):
            p.add_(u, alpha=-cf)


def scaled_alphas(params: list[Tensor], rhos: list[float], group: dict[str, Any]
                  ) -> list[Tensor] | list[float]:
    r""":math:`\alpha_t = \rho_t\max(\epsilon_2, \operatorname{RMS}(W))` (tensors) or
    :math:`\rho_t` (floats)."""
    if not group["scale_parameter"]:
        return rhos
    scales = param_scale(params, float(group["eps"][1]))
    torch._foreach_mul_(scales, rhos)
    return scales


def momentum_state_(state: dict[str, Any], update: Tensor, beta1: float,
                    state_dtype: str | None) -> Tensor:
    """EMA of ``update`` into ``state["exp_avg"]`` in its storage format (see
    :mod:`matrixopt.optim._state`); returns the new momentum (the state tensor
    itself when stored natively, else a transient float32 tensor)."""
    if is_native(state, "exp_avg", state["exp_avg"], state_dtype):
        return momentum_([state["exp_avg"]], [update], beta1)[0]
    buf = load_moment(state, "exp_avg", compute_dtype(update), signed=True)
    buf.lerp_(update.to(buf.dtype), 1.0 - beta1)
    store_moment(state, "exp_avg", buf, state_dtype, signed=True)
    return buf


def momentum_(exp_avgs: list[Tensor], updates: list[Tensor], beta1: float) -> list[Tensor]:
    """EMA of the (already α-scaled) updates, in the buffers' dtype; returns the buffers."""
    torch._foreach_lerp_(exp_avgs, [u.to(m.dtype) for u, m in zip(updates, exp_avgs)],
                         1.0 - beta1)
    return exp_avgs


def adafactor_update_(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]],
                      dims: list[tuple[int, int] | None], group: dict[str, Any]) -> None:
    """One Adafactor step for the given parameters of ``group`` (state created).

    Parameters are processed one at a time so only one parameter's temporaries
    are alive at once (peak memory ≈ two gradients, like torch.optim.Adafactor);
    nothing in the loop synchronises with the host.
    """
    beta2s, rhos = step_sizes([s["step"] for s in states], group)
    eps1, eps2 = float(group["eps"][0]), float(group["eps"][1])
    threshold = _float(group["clip_threshold"])
    wd = float(group["weight_decay"])
    beta1 = group["beta1"]
    for p, g, st, d, b2, rho in zip(params, grads, states, dims, beta2s, rhos):
        (u,) = adafactor_precondition_([g], [st.get("exp_avg_sq_row")],
                                       [st.get("exp_avg_sq_col")], [st.get("exp_avg_sq")],
                                       [d], [b2], eps1)
        clip = clip_factors([u], threshold)
        # bf16/fp16 parameters are updated through a float32 copy (as Hugging Face)
        low = p.dtype in _LOW_PRECISION
        w = p.float() if low else p
        alpha: Tensor | float = (param_scale([w], eps2)[0] * rho if group["scale_parameter"]
                                 else rho)
        coef = alpha if clip is None else clip[0] * alpha
        if beta1 is not None:
            buf = momentum_state_(st, u.mul_(coef), float(beta1), group["state_dtype"])
            apply_update_([w], [buf.to(w.dtype)], [1.0], [alpha], wd)
        else:
            apply_update_([w], [u.to(w.dtype)], [coef], [alpha], wd)
        if low:
            p.copy_(w)
