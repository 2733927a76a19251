r"""GaLoreAdamW: AdamW whose matrices keep their moments in a low-rank gradient subspace.

See :mod:`matrixopt.optim.galore` for the algorithm and what differs from
galore-torch; the inner optimizer here is Adam (:mod:`matrixopt.optim.functional.adam`)
on the projected gradient.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ...linalg.projectors import transport_moments
from .._adamw import adamw_states_, init_adam_state
from .._common import _as_float, _GroupChecker
from .._distributed import local_tensor
from .._nonfinite import StepFlags
from .._state import compute_dtype, load_moment, store_moment, zero_moment
from ..functional.adam import adam_direction, adam_moments_
from ._base import GaLoreBase, galore_defaults, like_param
from ._item import Item
from ._natural import (
    check_natural_keys,
    clear_natural_window,
    init_natural_state,
    natural_defaults,
    natural_gradient,
)

__all__ = ["GaLoreAdamW"]

_HALF = (torch.float16, torch.bfloat16)


class GaLoreAdamW(GaLoreBase):
    r"""AdamW whose matrices keep their moments in a low-rank gradient subspace.

    Drop-in for :class:`torch.optim.AdamW` (same defaults) and for galore-torch's
    ``GaLoreAdamW`` (same group keys)::

        opt = GaLoreAdamW([{"params": other},
                           {"params": mats, "rank": 128, "update_proj_gap": 200,
                            "scale": 0.25, "proj_type": "std"}], lr=1e-3)

    Groups without ``rank`` (``None``) and parameters with fewer than 2 dims are
    plain AdamW (the same code as :class:`torch.optim.AdamW`'s update,
    :func:`~matrixopt.optim.functional.adamw_`). See the module docstring for
    the algorithm and what differs from galore-torch.

    Args:
        params: parameters or parameter groups.
        lr, betas, eps, weight_decay: AdamW's (defaults 1e-3, (0.9, 0.999), 1e-8,
            1e-2, as torch.optim.AdamW). Decay is decoupled, ``W ← W(1 - lr·wd)``.
        rank: subspace rank (``None``: no projection); clipped to ``min(m, n)``.
        update_proj_gap: steps between basis refreshes (default 200).
        scale: multiplier α of the projected-back update (default 0.25, the paper's).
        proj_type: ``"std"`` (default: project the short side), ``"reverse_std"``,
            ``"left"``, ``"right"``, ``"full"`` (both sides).
        projector: ``"warm"`` (default), ``"rsvd"``, ``"svd"``, ``"random"``.
        on_refresh: ``"transport"`` (default), ``"reset"``, ``"keep"``.
        residual: ``None`` (default), ``"fira"``, ``"apollo"``.
        residual_granularity: ``"channel"`` (default) or ``"tensor"``.
        norm_growth_limit: γ of the residual's norm-growth limiter (default 1.01;
            ``None`` disables it).
        stagger: number of refresh slots per gap (default 4; 1 refreshes every
            matrix at the same step, as galore-torch).
        seed: base seed of the random sketches and random bases (default 0); the
            matrix at position ``i`` of the optimizer gets ``seed + i``.
        matrix_view: ``"auto"`` (default: 3-D → batch of matrices, ≥ 4-D →
            flatten), ``"flatten"``, ``"batch"``.
        proj_dtype: dtype of the two projection GEMMs (default ``None``: the
            gradient's, fused with the update). ``torch.bfloat16`` runs them on
            bf16 units (AVX512-BF16 / AMX / tensor cores; GEMMs 2.3x faster than
            float32 on the AVX512-BF16 CPU of the benchmark) with float32 moments
            and basis; the projected gradient then carries bf16 rounding
            (relative 2^-8).
        nonfinite: ``"skip"`` (default), ``"raise"`` or ``"ignore"``: what a
            gradient with NaN/Inf does (see :class:`~matrixopt.optim.Muon`).
        natural: Natural GaLore (Das 2024): Adam runs on the natural gradient
            :math:`(\lambda I + \Gamma\Gamma^\top)^{-1} g` of each projected
            gradient over a window :math:`\Gamma` of its ``natural_window`` most
            recent ones (default 20), damped by ``natural_damping`` :math:`\lambda`
            (default 1e-3); see :mod:`._natural`. State ``natural_window``,
            ``natural_count``.

    State of a projected parameter: ``step`` (Adam's counter), ``exp_avg``,
    ``exp_avg_sq`` (projected shape), ``projector`` (and ``projector_right`` for
    ``"full"``; none for ``"random"``), ``iteration``, ``refresh_step``,
    ``refresh_offset``, ``seed`` (int64), ``residual_norm`` (with a residual).
    ``state_dtype`` (``None``, ``"fp32"``, ``"bf16"``, ``"int8"``; see
    :mod:`matrixopt.optim._state`) sets the storage of the moments and of the
    basis: with ``"int8"`` the basis is block-wise int8 (signed code, float32
    ``projector_absmax``; bases under 4096 entries stay float32), with ``"bf16"``
    bfloat16, dequantised only while a step projects, maps back, transports or
    warm-starts the refresh with it.
    ``step()`` never modifies ``p.grad``; parameters without grad are untouched.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        rank: int | None = None,
        update_proj_gap: int = 200,
        scale: float = 0.25,
        proj_type: str = "std",
        projector: str = "warm",
        on_refresh: str = "transport",
        residual: str | None = None,
        residual_granularity: str = "channel",
        norm_growth_limit: float | None = 1.01,
        stagger: int = 4,
        seed: int = 0,
        matrix_view: str = "auto",
        proj_dtype: torch.dtype | None = None,
        nonfinite: str = "skip",
        state_dtype: str | None = None,
        natural: bool = False,
        natural_window: int = 20,
        natural_damping: float = 1e-3,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        **galore_defaults(rank, update_proj_gap, scale, proj_type, projector,
                                           on_refresh, residual, residual_granularity,
                                           norm_growth_limit, stagger, seed, matrix_view,
                                           proj_dtype, nonfinite, state_dtype),
                        **natural_defaults(natural, natural_window, natural_damping))
        super().__init__(params, defaults)

    def _check_inner(self, check: _GroupChecker) -> None:
        check.number("lr", low=0.0)
        check.betas("betas")
        check.number("eps", low=0.0)
        check.number("weight_decay", low=0.0)
        check_natural_keys(check)

    def _adam_kw(self, group: dict[str, Any]) -> dict[str, float]:
        beta1, beta2 = (float(b) for b in group["betas"])
        return dict(lr=_as_float(group["lr"]), beta1=beta1, beta2=beta2, eps=float(group["eps"]),
                    weight_decay=float(group["weight_decay"]))

    def _plain_step(self, group: dict[str, Any], keys: list[Tensor], params: list[Tensor],
                    grads: list[Tensor], flags: StepFlags) -> None:
        states = [self.state[k] for k in keys]
        for k, st in zip(keys, states):
            if "exp_avg" in st:
                continue
            if group["state_dtype"] is not None and self._strategy.sharded:
                # a format other than the parameter's: created on the local shard,
                # sharded like the parameter
                init_adam_state(st, self._strategy.local(k), group["state_dtype"])
                for key in [x for x in st if x != "step"]:
                    st[key] = like_param(st[key], k, self._strategy.world)
            else:  # like the parameter: a DTensor under FSDP2
                init_adam_state(st, k, group["state_dtype"])
        if group["state_dtype"] is not None and self._strategy.sharded:
            # local views (sharing storage: the formats' in-place writes land in the shards)
            states = [{key: local_tensor(v) if isinstance(v, Tensor) else v
                       for key, v in st.items()} for st in states]
        adamw_states_(params, grads, states, group["state_dtype"], flags=flags,
                      **self._adam_kw(group))

    def _init_inner(self, group: dict[str, Any], state: dict[str, Any], like: Tensor,
                    whole: tuple[int, ...]) -> None:
        init_adam_state(state, like, group["state_dtype"])
        init_natural_state(group, state, like)

    def _moments(self, item: Item, like: Tensor) -> tuple[Tensor, Tensor]:
        """3-D working views of the moments: the stored tensors when native, else
        transient float32 copies (bf16 / int8 state, see :mod:`.._state`)."""
        st = item.state
        native = "exp_avg_absmax" not in st and st["exp_avg"].dtype not in _HALF
        dt = st["exp_avg"].dtype if native else compute_dtype(like)
        return (self._w(load_moment(st, "exp_avg", dt, signed=True)),
                self._w(load_moment(st, "exp_avg_sq", dt, signed=False)))

    def _store(self, group: dict[str, Any], item: Item, m: Tensor, v: Tensor) -> None:
        for key, x, signed in (("exp_avg", m, True), ("exp_avg_sq", v, False)):
            x = self._st(x, item)
            stored = item.state[key]
            if x.data_ptr() == stored.data_ptr() and x.dtype == stored.dtype:
                x = stored  # the stored tensor, updated in place
            store_moment(item.state, key, x, group["state_dtype"], signed)

    def _inner_direction(self, group: dict[str, Any], item: Item, R: Tensor, flags: StepFlags
                         ) -> tuple[Tensor, Any, Any]:
        kw = self._adam_kw(group)
        m, v = self._moments(item, R)
        if group.get("natural", False):
            R = natural_gradient(group, item, R, flags)
        step = item.state["step"]
        step.add_(1.0)
        adam_moments_([R.to(m.dtype)], [m], [v], kw["beta1"], kw["beta2"], flags)
        # the bias corrections go into the multiplier (two elementwise passes fewer);
        # Fira's gain φ = ||N||/||R|| and its norm-growth limiter then see the official
        # code's uncorrected direction m/(√v + ε√b₂); APOLLO's gain sees the true one
        (N,), (c,) = adam_direction([m], [v], [step], kw["beta1"], kw["beta2"], kw["eps"],
                                    folded=group["residual"] != "apollo")
        self._store(group, item, m, v)
        return N, kw["lr"] * c, 1.0 - kw["lr"] * kw["weight_decay"]

    def _inner_transport(self, group: dict[str, Any], item: Item, Q: Any, flags: StepFlags
                         ) -> None:
        clear_natural_window(item, flags)
        step = item.state["step"]
        if float(step) == 0:  # a CPU counter: no device read
            return
        beta1, beta2 = (float(b) for b in group["betas"])
        t = float(step)  # a CPU counter (refresh steps only): linalg takes numbers
        m0, v0 = self._moments(item, item.G)
        m, v = transport_moments(m0, v0, Q, item.side,  # type: ignore[arg-type]
                                 bias_correction1=1.0 - beta1 ** t,
                                 bias_correction2=1.0 - beta2 ** t)
        if flags.active:  # a skipped matrix keeps its moments (and its basis)
            m, v = flags.select(0, m, m0), flags.select(0, v, v0)
        self._store(group, item, m, v)

    def _inner_reset(self, group: dict[str, Any], item: Item, flags: StepFlags) -> None:
        clear_natural_window(item, flags)
        # not conditioned on the flags: the CPU step counter restarts with the moments
        zero_moment(item.state, "exp_avg", signed=True)
        zero_moment(item.state, "exp_avg_sq", signed=False)
        item.state["step"].zero_()
