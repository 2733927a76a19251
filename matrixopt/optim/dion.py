r"""Dion: low-rank orthonormalised updates with error feedback, AdamW for the rest.

Ahn et al. 2025, "Dion: Distributed Orthonormalized Updates" (arXiv 2504.05295;
microsoft/dion). Per matrix :math:`W\in\mathbb{R}^{m\times n}` with gradient
:math:`G`, momentum :math:`M` and warm start :math:`Q\in\mathbb{R}^{m\times r}`:

.. math::
    B = M + G,\quad P = \operatorname{orth}(B^\top Q),\quad R = BP,\quad
    M \leftarrow B - (1-\mu) RP^\top,\quad Q \leftarrow R \oslash \lVert R_{:,j}\rVert,\quad
    W \leftarrow (1-\eta\lambda)W - \eta\,s\,QP^\top

(:mod:`matrixopt.optim.functional.dion`). One power-iteration step per
optimizer step, warm-started from the previous :math:`Q`, tracks the top-:math:`r`
singular subspace of the momentum; what the rank-:math:`r` update leaves out
stays in :math:`M` (error feedback). At ``rank_fraction=1`` this is an
orthonormalised update like Muon's; at ``rank_fraction=0.25`` it computes and,
sharded, communicates a fraction of Muon's.

Cost per step and matrix: four :math:`mnr` products and an :math:`O(nr^2)`
orthonormalisation (vs Newton–Schulz's :math:`\approx 20\,mn\min(m,n)`).

Distribution (:mod:`matrixopt.optim._dist`): one process; DDP with a
``process_group`` (the :math:`P` factors are split over ranks by cost and one
all-gather of the :math:`n\times r` factors shares them); FSDP2 ``Shard(0)``
(:math:`M`, :math:`Q` and the update stay on the local rows; the only
collectives are one all-reduce of the :math:`n\times r` products
:math:`B^\top Q` of a group and one of their :math:`r` column norms). All three
run the same arithmetic, so they agree to rounding.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ._adamw import adamw_states_, init_adam_state
from ._common import GroupError, MatrixOptimizer, _as_float, _GroupChecker, check_grad
from ._dist import Strategy
from ._distributed import _record, local_tensor, lpt_assign, shard_rows
from ._nonfinite import StepFlags
from ._state import check_state_dtype, init_moment, step_moment, store_moment
from ._views import VIEWS, matrix_view
from .functional.dion import (
    DION_ADJUST_LR,
    QR_METHODS,
    dion_apply_,
    dion_factors,
    dion_rank,
    dion_update_scale,
)

__all__ = ["Dion", "dion_rank", "dion_update_scale"]

# "muon" is what muon_param_groups calls the matrix path: the same routing serves Dion
_ALGORITHMS = ("auto", "dion", "muon", "adamw")
_COMM = (None, torch.float32, torch.bfloat16, torch.float16, torch.float64)


class Dion(MatrixOptimizer):
    r"""Dion for matrices and AdamW for everything else, in one optimizer.

    ::

        opt = Dion(matrixopt.optim.muon_param_groups(model), lr=0.01, rank_fraction=0.25)

    Every keyword below is a default for the parameter groups and may be set per group.

    Args:
        params: parameters or parameter groups (:func:`~matrixopt.optim.muon_param_groups`
            routes embeddings, heads, norms and biases to AdamW; Dion should not
            update embeddings or the LM head).
        lr: learning rate of both paths (default 0.01, dion's).
        weight_decay: decoupled weight decay, times the unscaled lr (default 0.01).
        momentum: μ of the error feedback :math:`M \leftarrow B-(1-\mu)RP^\top`,
            in [0, 1) (default 0.95).
        rank_fraction: :math:`r/\min(m,n)` in (0, 1] (default 1.0, dion's).
        rank: an explicit rank (clipped to :math:`\min(m,n)`; overrides
            ``rank_fraction``; default ``None``).
        rank_multiple_of: round :math:`r` up to a multiple of this (default 1).
        qr_method: ``"rcqr"`` (default: randomized Cholesky QR, dion's) or ``"qr"``
            (Householder); see :func:`~matrixopt.optim.functional.dion.orthonormalize`.
        oversample: rcqr's sketch size :math:`k = 128\lceil \text{oversample}\cdot
            r/128\rceil` (default 1.25).
        adjust_lr: update scale ``"spectral"`` (default, dion's :math:`\sqrt{m/n}`),
            ``"match_rms_adamw"`` (update RMS 0.2: AdamW's lr carries over),
            ``"original"`` or ``"none"`` (:func:`dion_update_scale`).
        eps: ε of the column normalisation and of the AdamW path (default 1e-8).
        betas: AdamW path (β1, β2) (default (0.9, 0.95), dion's).
        algorithm: ``"auto"`` (default: ≥ 2-D parameters get Dion, the rest
            AdamW), ``"dion"`` (``"muon"`` is accepted as its alias, the name
            ``muon_param_groups`` gives the matrix path) or ``"adamw"``.
        matrix_view: ``"auto"``, ``"flatten"`` or ``"batch"``, as
            :class:`~matrixopt.optim.Muon`'s (``"batch"`` of ≥ 3-D parameters is not
            supported with FSDP2).
        comm_dtype: dtype of the :math:`B^\top Q` products all-reduced under FSDP2
            (default ``None``: the momentum's, exact; ``torch.bfloat16`` halves the
            bytes at the cost of one bf16 rounding of each rank's partial sum).
        seed: seed of the initial :math:`Q` (Gaussian, identical on every rank; per
            parameter ``seed`` + its position) and of rcqr's sketch (default 0).
        process_group: DDP group to split the factor computation over (not a group
            key); FSDP2 (DTensor ``Shard(0)``) parameters are detected.
        nonfinite: ``"skip"`` (default), ``"raise"`` or ``"ignore"``, as Muon's.
        state_dtype: storage of ``momentum_buffer`` and the AdamW moments (``None``,
            ``"fp32"``, ``"bf16"``, ``"int8"``; only ``None``/``"fp32"`` under FSDP2).

    State per Dion parameter: ``momentum_buffer`` (shaped like the parameter) and
    ``Q`` (``[m, r]``, or ``[b, m, r]`` for batched views; a ``Shard(0)`` DTensor
    under FSDP2, so DCP checkpoints reshard it); per AdamW parameter ``step``,
    ``exp_avg``, ``exp_avg_sq``. Parameters whose ``grad`` is ``None`` are not
    touched. Unlike dion's DDP "compressed" mode, gradients are expected to be
    averaged already (plain DDP), so replicas never diverge.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 0.01,
        weight_decay: float = 0.01,
        momentum: float = 0.95,
        *,
        rank_fraction: float = 1.0,
        rank: int | None = None,
        rank_multiple_of: int = 1,
        qr_method: str = "rcqr",
        oversample: float = 1.25,
        adjust_lr: str = "spectral",
        eps: float = 1e-8,
        betas: tuple[float, float] = (0.9, 0.95),
        algorithm: str = "auto",
        matrix_view: str = "auto",
        comm_dtype: torch.dtype | None = None,
        seed: int = 0,
        process_group: Any | None = None,
        nonfinite: str = "skip",
        state_dtype: str | None = None,
    ) -> None:
        defaults = dict(
            lr=lr, weight_decay=weight_decay, momentum=momentum, rank_fraction=rank_fraction,
            rank=rank, rank_multiple_of=rank_multiple_of, qr_method=qr_method,
            oversample=oversample, adjust_lr=adjust_lr, eps=eps, betas=betas,
            algorithm=algorithm, matrix_view=matrix_view, comm_dtype=comm_dtype, seed=seed,
            nonfinite=nonfinite, state_dtype=state_dtype,
        )
        super().__init__(params, defaults, process_group)

    # ------------------------------------------------------------------ checks
    def _check_group(self, check: _GroupChecker) -> None:
        g = check.group
        check.number("lr", low=0.0)
        check.number("weight_decay", low=0.0)
        check.number("momentum", low=0.0, high=1.0, high_open=True)
        check.number("rank_fraction", low=0.0, high=1.0, low_open=True)
        check.integer("rank", low=1, allow_none=True)
        check.integer("rank_multiple_of", low=1)
        check.choice("qr_method", QR_METHODS)
        check.number("oversample", low=1.0)
        check.choice("adjust_lr", DION_ADJUST_LR)
        check.number("eps", low=0.0)
        check.betas("betas")
        check.choice("algorithm", _ALGORITHMS)
        check.choice("matrix_view", VIEWS)
        if g["comm_dtype"] not in _COMM:
            raise check.fail("comm_dtype", "must be None, torch.float32, torch.bfloat16, "
                                           "torch.float16 or torch.float64")
        check.integer("seed", low=0)
        check_state_dtype(check)
        for p in g["params"]:
            if g["algorithm"] in ("dion", "muon") and p.ndim < 2:
                raise GroupError(
                    f"Dion: param_groups[{check.index}]: algorithm {g['algorithm']!r} needs "
                    f"parameters with >= 2 dims, got one of shape {tuple(p.shape)}; use "
                    f"algorithm='adamw' or 'auto' for it")

    def _check_strategy(self) -> None:
        if not self._strategy.sharded:
            return
        for i, g in enumerate(self.param_groups):
            if g["state_dtype"] in ("bf16", "int8"):
                raise GroupError(f"Dion: param_groups[{i}]: state_dtype={g['state_dtype']!r} "
                                 f"is not supported with FSDP2 (DTensor) parameters; use None "
                                 f"or 'fp32'")
            for p in g["params"]:
                if self._is_dion(g, p) and matrix_view(p.shape, g["matrix_view"]).batched:
                    raise GroupError(
                        f"Dion: param_groups[{i}]: a parameter of shape {tuple(p.shape)} is a "
                        f"batch of matrices (matrix_view={g['matrix_view']!r}); with FSDP2 "
                        f"(rows sharded) use matrix_view='flatten' or route it to AdamW")

    # ----------------------------------------------------------------- routing
    @staticmethod
    def _is_dion(group: dict[str, Any], p: Tensor) -> bool:
        alg = group["algorithm"]
        return p.ndim >= 2 if alg == "auto" else alg in ("dion", "muon")

    @staticmethod
    def _shape(group: dict[str, Any], p: Tensor) -> tuple[int, int, int, int]:
        """``(b, m, n, r)`` of the parameter as Dion sees it (global shape)."""
        b, m, n, _ = matrix_view(p.shape, group["matrix_view"])
        r = dion_rank(m, n, float(group["rank_fraction"]), int(group["rank_multiple_of"]),
                      group["rank"])
        return b, m, n, r

    def _sketch(self, seed: int) -> Any:
        """rcqr's ``[k, n]`` Gaussian sketch, drawn once per shape from ``seed`` on the
        CPU (identical on every rank) and kept on the device (not state: the result
        does not depend on the sketch, see :func:`orthonormalize`)."""
        cache: dict[tuple[Any, ...], Tensor] = self.__dict__.setdefault("_sketches", {})

        def get(k: int, n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
            key = (seed, k, n, device, dtype)
            if key not in cache:
                g = torch.Generator().manual_seed(seed * 1_000_003 + k * 7_919 + n)
                cache[key] = (torch.randn(k, n, generator=g, dtype=torch.float64, device="cpu")
                              / math.sqrt(k)).to(device=device, dtype=dtype)
            return cache[key]
        return get

    def _init_q(self, group: dict[str, Any], p: Tensor, index: int) -> Tensor:
        """Gaussian ``Q`` (``[m, r]`` or ``[b, m, r]``) from the group's seed and the
        parameter's position: the same on every rank and in one process; under FSDP2
        a ``Shard(0)`` DTensor of the local rows."""
        b, m, _, r = self._shape(group, p)
        batched = matrix_view(p.shape, group["matrix_view"]).batched
        g = torch.Generator().manual_seed(int(group["seed"]) + 7_919 * index)
        full = torch.randn(b, m, r, generator=g, dtype=torch.float32, device="cpu").to(p.dtype)
        full = full if batched else full[0]
        st = self._strategy
        if not st.sharded:
            return full.to(p.device)
        from torch.distributed.tensor import DTensor, Shard
        chunk, rows = shard_rows(m, st.world)
        start = min(st.rank * chunk, m - rows[st.rank])
        mine = full[start:start + rows[st.rank]].to(local_tensor(p).device)
        return DTensor.from_local(mine, p.device_mesh, [Shard(0)], run_check=False,  # type: ignore[attr-defined]
                                  shape=full.shape, stride=full.stride())

    # -------------------------------------------------------------------- step
    def _step_group(self, index: int, group: dict[str, Any], params: list[Tensor]) -> None:
        st = self._strategy
        dion_p: list[Tensor] = []
        adam_p: list[Tensor] = []
        pos = self._positions()
        for p in params:
            check_grad(p, "Dion", index)
            state = self.state[p]
            if self._is_dion(group, p):
                if "momentum_buffer" not in state:
                    init_moment(state, "momentum_buffer", p, group["state_dtype"], signed=True)
                    state["Q"] = self._init_q(group, p, 1_000 * pos[id(p)][0] + pos[id(p)][1])
                dion_p.append(p)
            else:
                if "exp_avg" not in state:
                    init_adam_state(state, p, group["state_dtype"])
                adam_p.append(p)
        ordered = dion_p + adam_p
        local_p = [st.local(p) for p in ordered]
        flags = self._flags(group, [st.local(p.grad) for p in ordered])  # type: ignore[arg-type]
        grads = flags.safe([st.local(p.grad) for p in ordered])  # type: ignore[arg-type]
        k = len(dion_p)
        lr, wd = _as_float(group["lr"]), float(group["weight_decay"])
        if adam_p:
            beta1, beta2 = (float(b) for b in group["betas"])
            adamw_states_(local_p[k:], grads[k:], [self.state[p] for p in adam_p],
                          group["state_dtype"], lr=lr, beta1=beta1, beta2=beta2,
                          eps=float(group["eps"]), weight_decay=wd,
                          flags=flags.subset(range(k, len(ordered))))
        if dion_p:
            self._dion(group, dion_p, local_p[:k], grads[:k], lr, wd, flags.subset(range(k)))
        flags.count_([self.state[p] for p in ordered], [p.device for p in local_p])

    def _dion(self, group: dict[str, Any], keys: list[Tensor], params: list[Tensor],
              grads: list[Tensor], lr: float, wd: float, flags: StepFlags) -> None:
        st = self._strategy
        sd = group["state_dtype"]
        shapes = [self._shape(group, p) for p in keys]
        # local [b, m_loc, n] views (FSDP2: the local rows; b = 1 there)
        lviews = [(b, lp.shape[0] if st.sharded else m, n)
                  for (b, m, n, _), lp in zip(shapes, params)]
        states = [self.state[p] for p in keys]
        moms = [step_moment(s, "momentum_buffer", sd, lp) for s, lp in zip(states, params)]
        bufs = [M.view(v) for (M, _), v in zip(moms, lviews)]
        for B, G in zip(bufs, grads):  # B = M + G (a skipped gradient is zero here)
            B.add_(G.reshape(B.shape).to(B.dtype))
        qs = [local_tensor(s["Q"]).view(v[0], v[1], sh[3])
              for s, v, sh in zip(states, lviews, shapes)]
        sketch = self._sketch(int(group["seed"]))
        kw = dict(method=group["qr_method"], sketch=sketch, oversample=float(group["oversample"]))
        if st.kind == "ddp" and st.world > 1:
            factors = self._ddp_factors(st, bufs, qs, shapes, kw)
        else:
            factors = dion_factors(bufs, qs, reduce=st.reduce, comm_dtype=group["comm_dtype"],
                                   **kw)  # type: ignore[arg-type]
        dion_apply_([lp.view(v) for lp, v in zip(params, lviews)], bufs, qs, factors, lr=lr,
                    weight_decay=wd, mu=float(group["momentum"]),
                    scales=[dion_update_scale(m, n, r, group["adjust_lr"])
                            for _, m, n, r in shapes],
                    eps=float(group["eps"]), reduce=st.reduce, flags=flags)
        for s, (M, native) in zip(states, moms):
            if not native:
                store_moment(s, "momentum_buffer", M, sd, signed=True)

    @staticmethod
    def _ddp_factors(st: Strategy, bufs: list[Tensor], qs: list[Tensor],
                     shapes: list[tuple[int, int, int, int]], kw: dict[str, Any]
                     ) -> list[Tensor]:
        """DDP: each rank computes the factors :math:`P` of the matrices it owns
        (balanced by the :math:`b\\,m n r` cost) and one all-gather of a padded flat
        buffer (the ``n × r`` factors, in the momentum's dtype) shares them."""
        owner = lpt_assign([b * m * n * r for b, m, n, r in shapes], st.world)
        mine = [i for i, o in enumerate(owner) if o == st.rank]
        done = dion_factors([bufs[i] for i in mine], [qs[i] for i in mine], **kw)
        dtype, device = (done[0].dtype, done[0].device) if done else (
            torch.promote_types(bufs[0].dtype, torch.float32), bufs[0].device)
        sizes = [sum(b * n * r for i, (b, _, n, r) in enumerate(shapes) if owner[i] == q)
                 for q in range(st.world)]
        buf = torch.zeros(max(sizes), dtype=dtype, device=device)
        if done:
            torch.cat([P.reshape(-1) for P in done], out=buf[:sizes[st.rank]])
        gathered = [torch.empty_like(buf) for _ in range(st.world)]
        dist.all_gather(gathered, buf, group=st.group)  # type: ignore[attr-defined]
        _record("all_gather", (st.world - 1) * buf.numel() * buf.element_size())
        out: list[Tensor] = []
        offsets = [0] * st.world
        for i, (b, _, n, r) in enumerate(shapes):
            o = owner[i]
            out.append(gathered[o][offsets[o]:offsets[o] + b * n * r].view(b, n, r))
            offsets[o] += b * n * r
        return out
