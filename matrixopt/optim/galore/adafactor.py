r"""GaLoreAdafactor: Adafactor on the projected gradient.

See :mod:`matrixopt.optim.galore` for the projection; the inner optimizer is the
same Adafactor code as :class:`~matrixopt.optim.Adafactor`
(:mod:`matrixopt.optim.functional.adafactor`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .._common import _GroupChecker, optional_float
from .._nonfinite import StepFlags
from .._signature import bind, combined_signature
from .._state import load_moment, step_moment, store_moment, zero_moment
from ..adafactor import (
    Adafactor,
    adafactor_defaults,
    adafactor_states_,
    check_adafactor_group,
    group_step_sizes,
    hf_schedule_lr,
    init_adafactor_state,
    init_group_state,
)
from ..functional.adafactor import clip_coef, factored_dims, precondition_, stat_dtype
from ._base import GaLoreBase, galore_defaults
from ._item import Item
from .adamw import GaLoreAdamW

__all__ = ["GaLoreAdafactor"]

_HALF = (torch.float16, torch.bfloat16)


class GaLoreAdafactor(GaLoreBase):
    r"""Adafactor (:class:`~matrixopt.optim.Adafactor`) on the projected gradient.

    The projected gradient :math:`R` (r×n, m×r or r×r per matrix) goes through
    the same functions as :class:`~matrixopt.optim.Adafactor`: factored second
    moment over its two matrix dims (unless its short dim is below
    ``min_dim_size_to_factor``), RMS clipping, relative step and parameter
    scaling (with the RMS of the *full* parameter), optional momentum (kept in
    the low-rank space), decoupled weight decay with the step size
    :math:`\alpha_t`. The direction is mapped back and multiplied by ``scale``.

    On refresh with ``on_refresh="transport"`` the momentum is rotated,
    :math:`\tilde M = Q M`, and the second moment follows the same linear map as
    LDAdam's variance term, :math:`\tilde V = (Q\circ Q) V`, which keeps the
    factored form exactly: :math:`\tilde R = (Q\circ Q)R` on the projected side
    and the other factor rescaled by :math:`\operatorname{mean}(\tilde R) /
    \operatorname{mean}(R)` (Adafactor's momentum averages updates, not
    gradients, so there is no :math:`m^2` correction). ``"reset"`` zeroes the
    statistics and restarts the step count.

    Args: Adafactor's (``lr``, ``eps``, ``clip_threshold``, ``decay_rate``,
    ``beta1``, ``weight_decay``, ``scale_parameter``, ``relative_step``,
    ``warmup_init``, ``min_dim_size_to_factor``, ``beta2_cap``,
    ``momentum_dtype``, ``external_lr``; same defaults, ``lr=1e-2``, ``lr=None``
    meaning Hugging Face's relative step that never reads ``lr``) and GaLore's
    (see :class:`GaLoreAdamW`).
    Groups without ``rank`` are plain Adafactor.
    """

    def __init__(self, params: Iterable[Any], *args: Any, **kwargs: Any) -> None:
        a = bind(_SIGNATURE, self, params, *args, **kwargs)
        defaults = dict(
            **adafactor_defaults(**{k: a[k] for k in (*_ADAFACTOR_ARGS, "external_lr")}),
            **galore_defaults(**{k: a[k] for k in _GALORE_ARGS}))
        super().__init__(params, defaults)

    def _check_inner(self, check: _GroupChecker) -> None:
        check_adafactor_group(check)

    @staticmethod
    def _get_lr(group: dict[str, Any], state: dict[str, Any]) -> float:
        """Hugging Face's ``AdafactorSchedule`` reads the step size here
        (:func:`~matrixopt.optim.adafactor.hf_schedule_lr`)."""
        return hf_schedule_lr(group, state)

    def _plain_step(self, group: dict[str, Any], keys: list[Tensor], params: list[Tensor],
                    grads: list[Tensor], flags: StepFlags) -> None:
        dims = [factored_dims(k.shape, group["min_dim_size_to_factor"]) for k in keys]
        for k, d in zip(keys, dims):
            if "step" not in self.state[k]:  # like the parameter: a DTensor under FSDP2
                init_group_state(self.state[k], k, d, group, self._strategy.sharded)
        adafactor_states_(params, grads, [self.state[k] for k in keys], dims, group, flags,
                          self._strategy.reduce, [k.shape for k in keys])

    @staticmethod
    def _factored(group: dict[str, Any], shape: tuple[int, ...]) -> bool:
        return min(shape[-2:]) >= int(group["min_dim_size_to_factor"])

    def _init_inner(self, group: dict[str, Any], state: dict[str, Any], like: Tensor,
                    whole: tuple[int, ...]) -> None:
        nd = like.ndim
        dims = (nd - 2, nd - 1) if self._factored(group, whole) else None
        init_adafactor_state(state, like, dims, group["beta1"], group["momentum_dtype"],
                             group["state_dtype"])

    def _inner_direction(self, group: dict[str, Any], item: Item, R: Tensor, flags: StepFlags
                         ) -> tuple[Tensor, Any, Any]:
        st = item.state
        (beta2,), (rho,) = group_step_sizes([st["step"]], group)

        def w(k: str) -> Tensor | None:
            return self._w(st[k]) if k in st else None

        factored = "exp_avg_sq_row" in st
        strategy = self._strategy
        if item.reduce is not None and item.side == "right":
            # R holds this rank's rows of [M, r]: Adafactor's row-spanning sums (column
            # statistics, mean of the row statistics, clipping) over the shards
            u2, _ = precondition_(R[0], st.get("exp_avg_sq_row"), st.get("exp_avg_sq_col"),
                                  st.get("exp_avg_sq"), (0, 1) if factored else None,
                                  beta2=beta2, eps1=float(group["eps"][0]),
                                  shape=(item.M, R.shape[-1]), reduce=item.reduce, flags=flags)
            u = u2.unsqueeze(0)
        else:
            u, _ = precondition_(R, w("exp_avg_sq_row"), w("exp_avg_sq_col"), w("exp_avg_sq"),
                                 (1, 2) if factored else None, beta2=beta2,
                                 eps1=float(group["eps"][0]), flags=flags)
        # sums over the whole projected gradient / parameter: over the shards when
        # this rank holds only some of the rows or matrices (FSDP2)
        spans = strategy.reduce if (item.layout == "batch" or (
            item.layout == "rows" and item.side == "right")) else None
        numel = u.numel() if spans is None else (
            item.B * u[0].numel() if item.layout == "batch" else item.M * u.shape[-1])
        clip = clip_coef(u, optional_float(group["clip_threshold"]), numel, spans)
        alpha: Any = rho
        if group["scale_parameter"]:  # the RMS of the *full* parameter
            p = item.p.float() if item.p.dtype in _HALF else item.p
            sq = p.to(stat_dtype(p.dtype)).square().sum()
            total = p.numel()
            if item.layout is not None:
                sq = strategy.reduce(sq.reshape(1))[0]  # type: ignore[misc]
                total = item.key.numel()
            rms = sq.sqrt().div(math.sqrt(max(1, total)))
            alpha = rms.clamp_min(float(group["eps"][1])) * rho
        coef: Any = alpha if clip is None else clip * alpha
        wd = float(group["weight_decay"])
        decay = alpha * -wd + 1.0 if isinstance(alpha, Tensor) else 1.0 - wd * alpha
        if group["beta1"] is not None:
            sd = group["state_dtype"]
            buf, native = step_moment(st, "exp_avg", sd, u)
            buf = self._w(buf)
            flags.lerp_([buf], [u.mul_(coef).to(buf.dtype)], 1.0 - float(group["beta1"]))
            if not native:
                store_moment(st, "exp_avg", self._st(buf, item), sd, signed=True)
            return buf.to(u.dtype), 1.0, decay
        if clip is not None or group["scale_parameter"]:
            # the clipped / parameter-scaled step (data-dependent, a tensor in every
            # mode) is part of the direction: the residual gain and the limiter see
            # coef·u. The plain step size rho stays a multiplier: folding by its type
            # (a number eagerly, a tensor under torch.compile) made compiled runs
            # differ from eager ones
            return u * coef.to(u.dtype), 1.0, decay
        return u, coef, decay

    def _inner_transport(self, group: dict[str, Any], item: Item, Q: Any, flags: StepFlags
                         ) -> None:
        r"""Momentum :math:`\tilde M = Q M`; second moment :math:`\tilde V = (Q\circ Q) V`,
        which keeps the factored form: :math:`\tilde R = (Q\circ Q) R` on the projected side
        and the other factor rescaled by :math:`\operatorname{mean}(\tilde R) /
        \operatorname{mean}(R)`. A skipped matrix keeps its state."""
        st = item.state
        if float(st["step"]) == 0:
            return
        QL, QR = (Q if item.side == "both" else
                  (Q, None) if item.side == "left" else (None, Q))

        def both(T: Tensor, L: Tensor | None, Rm: Tensor | None) -> Tensor:
            if L is not None:
                T = L.to(T.dtype) @ T
            if Rm is not None:
                T = T @ Rm.to(T.dtype).mT
            return T

        AL = QL * QL if QL is not None else None
        AR = QR * QR if QR is not None else None
        if "exp_avg" in st:
            buf = self._w(load_moment(st, "exp_avg", torch.float32, signed=True))
            store_moment(st, "exp_avg", self._st(flags.select(0, both(buf, QL, QR), buf), item),
                         group["state_dtype"], signed=True)
        if "exp_avg_sq_row" in st:
            r = self._w(st["exp_avg_sq_row"])   # [b, r1, 1]
            c = self._w(st["exp_avg_sq_col"])   # [b, 1, r2]
            r_new = both(r, AL, None)
            c_new = both(c, None, AR)
            ratio = self._row_mean(item, r_new) / self._row_mean(item, r).clamp_min(1e-38)
            st["exp_avg_sq_row"].copy_(self._st(flags.select(0, r_new, r), item))
            st["exp_avg_sq_col"].copy_(self._st(flags.select(0, c_new * ratio, c), item))
        else:
            v = self._w(st["exp_avg_sq"])
            st["exp_avg_sq"].copy_(self._st(flags.select(0, both(v, AL, AR), v), item))

    @staticmethod
    def _row_mean(item: Item, r: Tensor) -> Tensor:
        """Mean of the row statistics ``[b, r1, 1]`` over the rows (over the shards when
        they are this rank's rows of a right projection)."""
        if item.reduce is None or item.side != "right":
            return r.mean(dim=-2, keepdim=True)
        return item.reduce(r.sum(dim=-2, keepdim=True).contiguous()) / item.M

    def _inner_reset(self, group: dict[str, Any], item: Item, flags: StepFlags) -> None:
        # not conditioned on the flags: the CPU step counter restarts with the statistics
        for k in ("exp_avg", "exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col"):
            if k in item.state:
                zero_moment(item.state, k, signed=True)
        item.state["step"].zero_()


# Adafactor's arguments, then GaLore's: the signature help() shows, taken from
# Adafactor.__init__ and GaLoreAdamW.__init__ (one argument list per family)
_ADAFACTOR_ARGS = ("lr", "eps", "clip_threshold", "decay_rate", "beta1", "weight_decay",
                   "scale_parameter", "relative_step", "warmup_init", "min_dim_size_to_factor",
                   "beta2_cap", "momentum_dtype")
_GALORE_ARGS = ("rank", "update_proj_gap", "scale", "proj_type", "projector", "on_refresh",
                "residual", "residual_granularity", "norm_growth_limit", "stagger", "seed",
                "matrix_view", "proj_dtype", "nonfinite", "state_dtype")
_SIGNATURE = combined_signature([
    (Adafactor.__init__, (*_ADAFACTOR_ARGS, "state_dtype")),
    (GaLoreAdamW.__init__, _GALORE_ARGS[:-1]),  # rank ... nonfinite
    (Adafactor.__init__, ("external_lr",))])
GaLoreAdafactor.__init__.__signature__ = _SIGNATURE  # type: ignore[attr-defined]
