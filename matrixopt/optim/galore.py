r"""GaLore: optimizer state in a low-rank gradient subspace (GaLoreAdamW, GaLoreAdafactor).

Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
Projection" (ICML 2024). For a matrix parameter :math:`W` (m×n) with gradient
:math:`G`, keep a basis :math:`P` of rank :math:`r` on one side (``proj_type``),
run the inner optimizer on the projected gradient and map its direction back:

.. math::
    R_t = P^\top G_t \ \text{(left)}\ \text{or}\ G_t P\ \text{(right)},\qquad
    N_t = \psi(R_t)\ \text{(Adam or Adafactor on } R_t),\qquad
    W_t = W_{t-1}(1 - \eta\lambda) - \eta\,\alpha\, P N_t \ \text{(or } N_t P^\top),

with :math:`\alpha` = ``scale`` and :math:`P` refreshed every ``update_proj_gap``
steps. Optimizer state per matrix: :math:`2 r \cdot \max(m, n)` moments plus the
basis (:math:`r\cdot\min(m,n)`; nothing with ``projector="random"``), against
:math:`2mn` for AdamW.

What differs from galore-torch (the reference implementation):

* **refresh** (``projector``): ``"warm"`` (default) is one block power step from
  the previous basis plus a Rayleigh–Ritz rotation
  (:func:`matrixopt.linalg.projectors.lowrank_basis`), a GEMM pair instead of a
  full SVD; ``"rsvd"`` a randomized SVD; ``"svd"`` the exact SVD (galore-torch);
  ``"random"`` a seeded Gaussian :math:`N(0, 1/r)` basis regenerated from the seed
  at every step (Flora / APOLLO), so no basis is stored.
* **moments follow the basis** (``on_refresh``): ``"transport"`` (default) maps
  the moments with :math:`Q = P_{new}^\top P_{old}` (LDAdam, Robert et al., ICLR
  2025: :math:`\tilde m = Qm`, :math:`\tilde v = |(Q\circ Q)(\hat v - \hat m^2) +
  (Q\hat m)^2|`); ``"reset"`` zeroes them and restarts bias correction;
  ``"keep"`` leaves them unchanged (galore-torch, stale after a rotation).
* **residual** (optional): ``"fira"`` (Chen et al., "Fira: Can We Achieve
  Full-rank Training of LLMs Under Low-rank Constraint?", 2024) adds the part of
  the gradient outside the subspace, :math:`S = G - P P^\top G`, scaled per
  channel by the inner optimizer's own gain :math:`\phi_j = \|N_{:,j}\| /
  \|R_{:,j}\|`; ``"apollo"`` (Zhu et al., "APOLLO: SGD-like Memory, AdamW-level
  Performance", MLSys 2025) replaces the update by the raw gradient scaled per
  channel, :math:`G\,\mathrm{diag}(s)`, :math:`s_j = \|N_{:,j}\|/\|R_{:,j}\|`
  (the low-rank state only estimates the scaling). ``residual_granularity=
  "tensor"`` uses one factor per matrix (APOLLO-Mini). Both apply the
  norm-growth limiter: if :math:`\|S_t\| > \gamma\|S_{t-1}\|` the scaled term is
  shrunk to :math:`\gamma\|S_{t-1}\|` (:math:`\gamma` = ``norm_growth_limit``,
  1.01). A channel is a column of :math:`G` for a left basis and a row for a
  right basis (the dimension the projection keeps).
* **staggered, batched refresh**: within a group, the matrices of each shape
  are spread over ``stagger`` refresh slots offset by ``update_proj_gap /
  stagger`` steps, so no single step refreshes every matrix; matrices of the
  same shape refreshing at the same step go through one batched
  ``lowrank_basis`` call.
* **the side comes from the full shape** (:func:`~matrixopt.linalg.projectors.
  projection_side`), conv weights ``[out, in, kh, kw]`` are projected as
  ``out × in·kh·kw`` matrices and 3-D stacks ``[E, m, n]`` as ``E`` matrices with
  ``E`` bases (``matrix_view``), ranks above ``min(m, n)`` are clipped to it.
* **state is tensors only** with fixed keys (``step``, ``exp_avg``, ... ,
  ``projector``, ``projector_right``, ``seed``, ``iteration``,
  ``refresh_step``, ``refresh_offset``, ``residual_norm``): ``state_dict`` loads
  with ``torch.load(weights_only=True)`` and resumes bit-identically.
* **FSDP2** (``Shard(0)`` DTensor parameters, GaLoreAdamW): every matrix is
  projected on the **right** (``proj_type`` ``std``/``reverse_std``/``right``),
  so ``G P`` and the Adam moments are row shards of the parameter's rows, the
  basis ``n × r`` is replicated, projection, Adam and transport (``r × r``)
  are local, and the refresh is
  :func:`~matrixopt.optim._distributed.sharded_right_basis` (only ``n × r``
  products and small TSQR factors are all-reduced). Other configurations use
  the whole-matrix fallback :func:`~matrixopt.optim._distributed.gathered_params`.
* the update and the weight decay are one fused GEMM
  (``W.addmm_(P, N, beta=1-ηλ, alpha=-ηα)``), no full-size temporaries.

Cost per step and matrix: two GEMMs of :math:`2mnr` flops (project, project
back) plus elementwise work on :math:`r\cdot\max(m,n)` values; at a refresh
(every ``update_proj_gap`` steps) about :math:`4mnr` flops and two QRs for
``"warm"``. Each matrix is projected with its own GEMM: stacking same-shape
gradients for one batched GEMM would copy every gradient each step, which costs
more than it saves outside the refresh.
"""

from __future__ import annotations

import abc
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..linalg.projectors import (
    basis_overlap,
    lowrank_basis,
    project,
    project_back,
    projection_side,
    transport_moments,
)
from ._adamw import (
    _bias_corrections,
    _sqrt,
    adam_direction,
    adam_moments_,
    adamw_step_states_,
    init_adam_state,
    step_value,
)
from ._common import MatrixOptimizer, SkipNonFinite, _GroupChecker, check_grad, closure_loss
from ._distributed import (
    DistContext,
    gathered_params,
    has_dtensors,
    local_tensor,
    resolve_context,
    sharded_right_basis,
)
from ._state import (
    ABSMAX,
    COUNTERS,
    check_state_dtype,
    compute_dtype,
    counters_to_cpu_,
    init_moment,
    load_moment,
    store_moment,
    zero_moment,
)
from .adafactor import (
    adafactor_lr_defaults,
    adafactor_precondition_,
    adafactor_update_,
    check_adafactor_group,
    clip_factors,
    factored_dims,
    hf_schedule_lr,
    init_adafactor_state,
    momentum_state_,
    param_scale,
    step_sizes,
)
from .routing import external_stacklevel

__all__ = ["GaLoreAdamW", "GaLoreAdafactor", "PROJ_TYPES", "PROJECTORS", "ON_REFRESH",
           "RESIDUALS"]

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
PROJECTORS = ("warm", "rsvd", "svd", "random")
ON_REFRESH = ("transport", "reset", "keep")
RESIDUALS = (None, "fira", "apollo")
_GRANULARITY = ("channel", "tensor")
_VIEWS = ("auto", "flatten", "batch")
_HALF = (torch.float16, torch.bfloat16)
_SEED_STRIDE = 1_000_003  # mixes (matrix seed, refresh step) into one generator seed


def _float(x: float | Tensor) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def _galore_defaults(rank: int | None, update_proj_gap: int, scale: float, proj_type: str,
                     projector: str, on_refresh: str, residual: str | None,
                     residual_granularity: str, norm_growth_limit: float | None,
                     stagger: int, seed: int, matrix_view: str,
                     proj_dtype: torch.dtype | None, nonfinite: str,
                     state_dtype: str | None = None) -> dict[str, Any]:
    return dict(state_dtype=state_dtype, rank=rank, update_proj_gap=update_proj_gap,
                scale=scale, proj_type=proj_type,
                projector=projector, on_refresh=on_refresh, residual=residual,
                residual_granularity=residual_granularity, norm_growth_limit=norm_growth_limit,
                stagger=stagger, seed=seed, matrix_view=matrix_view, proj_dtype=proj_dtype,
                nonfinite=nonfinite)


def _check_galore_keys(check: _GroupChecker) -> None:
    check.integer("rank", low=1, allow_none=True)
    check.integer("update_proj_gap", low=1)
    check.number("scale", low=0.0)
    check.choice("proj_type", PROJ_TYPES)
    check.choice("projector", PROJECTORS)
    check.choice("on_refresh", ON_REFRESH)
    check.choice("residual", RESIDUALS)
    check.choice("residual_granularity", _GRANULARITY)
    check.number("norm_growth_limit", low=1.0, allow_none=True)
    check.integer("stagger", low=1)
    check.integer("seed", low=0)
    check.choice("matrix_view", _VIEWS)
    check.dtype("proj_dtype")
    check_state_dtype(check)


@dataclass
class _Item:
    """One projected parameter during a step: its matrix view and where its state is."""

    p: Tensor
    state: dict[str, Any]
    G: Tensor          # gradient as [b, m, n] (a view when possible; never written)
    b: int
    m: int
    n: int
    batched: bool      # state tensors keep the leading batch dim ([E, ...] params)
    side: str          # "left" | "right" | "both"
    rank: int          # min(group rank, m, n)
    bases: list[Tensor] = field(default_factory=list)  # [left or right] or [left, right], 3-D
    proj: Any = None   # the bases in proj_dtype for this step (converted once, used twice)
    M: int = -1        # global rows (FSDP2: ``m`` is this rank's shard of them)
    advanced: bool = False  # schedule advanced and basis refreshed before the skip guard

    def __post_init__(self) -> None:
        if self.M < 0:
            self.M = self.m


class _LocalState:
    """Plain-tensor view of a state dict holding DTensors (FSDP2): ``local`` maps each key
    to its local shard (sharing storage, so in-place updates land in the DTensor);
    :meth:`write_back` copies entries the step replaced back into the shards and adds new
    plain entries (a replicated basis) to the state."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state
        self.local: dict[str, Any] = {k: local_tensor(v) if isinstance(v, Tensor) else v
                                      for k, v in state.items()}
        self._seen = dict(self.local)

    def write_back(self) -> None:
        for k, v in self.local.items():
            old = self.state.get(k)
            if old is not None and old is not v and local_tensor(old) is not old:
                if self._seen.get(k) is not v:
                    local_tensor(old).copy_(v)
            elif old is not v:
                self.state[k] = v
        for k in [k for k in self.state if k not in self.local]:
            del self.state[k]  # dropped by the step (e.g. a converted basis's ``_absmax``)


class _GaLoreBase(MatrixOptimizer, metaclass=abc.ABCMeta):
    """Projection, refresh, transport, residuals and the fused apply; the inner
    optimizer (Adam / Adafactor) is supplied by the subclasses."""

    # ------------------------------------------------------------ subclass API
    @abc.abstractmethod
    def _check_inner(self, check: _GroupChecker) -> None:
        ...

    @abc.abstractmethod
    def _plain_step(self, index: int, group: dict[str, Any], params: list[Tensor],
                    grads: list[Tensor]) -> None:
        ...

    @abc.abstractmethod
    def _init_inner(self, group: dict[str, Any], state: dict[str, Any], like: Tensor) -> None:
        ...

    @abc.abstractmethod
    def _inner_direction(self, group: dict[str, Any], items: list[_Item], Rs: list[Tensor]
                         ) -> tuple[list[Tensor], list[Any], list[Any]]:
        """Return (low-rank directions N, step multipliers c, decay factors d) per item."""
        ...

    @abc.abstractmethod
    def _inner_transport(self, group: dict[str, Any], item: _Item, Q: Any) -> None:
        ...

    @abc.abstractmethod
    def _inner_reset(self, group: dict[str, Any], item: _Item) -> None:
        ...

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        super().__init__(params, defaults)
        self._galore_built = True
        self._warn_no_rank()

    # ------------------------------------------------------------------ checks
    def _check_group(self, check: _GroupChecker) -> None:
        _check_galore_keys(check)
        self._check_inner(check)
        self._warn_rank_clipped(check)
        if getattr(self, "_galore_built", False):  # add_param_group after construction
            self._warn_no_rank()

    def _warn_no_rank(self) -> None:
        """Warn (once per optimizer) when no group sets ``rank``: every matrix then runs
        the plain inner optimizer, which is a silent no-op of GaLore."""
        if getattr(self, "_warned_no_rank", False):
            return
        if any(g["rank"] is not None for g in self.param_groups):
            return
        mats = [(i, tuple(p.shape)) for i, g in enumerate(self.param_groups)
                for p in g["params"] if p.ndim >= 2]
        if not mats:
            return
        self._warned_no_rank = True
        name = type(self).__name__
        groups = sorted({i for i, _ in mats})
        warnings.warn(
            f"{name}: no parameter group sets rank, so none of the {len(mats)} matrices "
            f"(param_groups{groups}, e.g. shape {mats[0][1]}) is projected: {name} runs as "
            f"plain {'AdamW' if 'AdamW' in name else 'Adafactor'}. Give the matrices a "
            f"rank, e.g. {name}(matrixopt.optim.galore_param_groups(model, rank=128))",
            stacklevel=external_stacklevel())

    def _warn_rank_clipped(self, check: _GroupChecker) -> None:
        """Warn once per group when ``rank`` exceeds ``min(m, n)`` of a matrix: it is
        clipped, and at full rank the projected state (moments plus basis) is larger
        than the plain optimizer's."""
        g = check.group
        if g["rank"] is None:
            return
        r = int(g["rank"])
        over = []
        for p in g["params"]:
            if p.ndim >= 2:
                _, m, n, _ = self._view(g, p)
                if r > min(m, n):
                    over.append((tuple(p.shape), min(m, n)))
        if over:
            warnings.warn(
                f"{check.owner}: param_groups[{check.index}]: rank={r} exceeds min(m, n) of "
                f"{len(over)} matrix(es) (e.g. shape {over[0][0]}, min(m, n) = {over[0][1]}): "
                f"the rank is clipped to min(m, n), where the projected state (moments plus "
                f"an m x r or r x n basis) is larger than unprojected "
                f"{'AdamW' if 'AdamW' in check.owner else 'Adafactor'}'s. Use a smaller rank, "
                f"or put these parameters in a group without rank",
                stacklevel=external_stacklevel())

    # ------------------------------------------------------------------ shapes
    @staticmethod
    def _view(group: dict[str, Any], p: Tensor) -> tuple[int, int, int, bool]:
        """(b, m, n, batched) of the matrices a parameter is projected as."""
        view = group["matrix_view"]
        if view == "auto":
            view = "batch" if p.ndim == 3 else "flatten"
        if p.ndim == 2:
            return 1, p.shape[0], p.shape[1], False
        if view == "flatten":
            return 1, p.shape[0], math.prod(p.shape[1:]), False
        return math.prod(p.shape[:-2]), p.shape[-2], p.shape[-1], True

    @staticmethod
    def _st(t: Tensor, item: _Item) -> Tensor:
        """A 3-D working tensor in the shape it is stored with."""
        return t if item.batched else t.squeeze(0)

    @staticmethod
    def _w(t: Tensor) -> Tensor:
        """A stored tensor as a 3-D working view."""
        return t if t.ndim == 3 else t.unsqueeze(0)

    @staticmethod
    def _basis_dtype(p: Tensor) -> torch.dtype:
        return torch.float32 if p.dtype in _HALF else p.dtype

    def _low_rank_shape(self, item: _Item) -> tuple[int, int, int]:
        r = item.rank
        if item.side == "left":
            return item.b, r, item.n
        if item.side == "right":
            return item.b, item.m, r
        return item.b, r, r

    # -------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimisation step (``closure`` re-evaluates the loss)."""
        loss = closure_loss(closure)
        ctx: DistContext | None = None
        if has_dtensors(self):
            ctx = self._sharding()
            if ctx is None:  # whole-matrix fallback, see _distributed.gathered_params
                with gathered_params(self, type(self).__name__):
                    self.step()
                return loss
        self._ctx = ctx
        self._raise_on_nonfinite()
        ordinal = 0
        for index, group in enumerate(self.param_groups):
            plain_p: list[Tensor] = []
            plain_g: list[Tensor] = []
            items: list[_Item] = []
            fresh: list[_Item] = []
            keys: list[Tensor] = []   # the parameters (state keys) of the items
            grads: list[Tensor] = []  # their gradients as given (DTensors under FSDP2)
            for p in group["params"]:
                ordinal += 1
                if p.grad is None:
                    continue
                grad = check_grad(p, type(self).__name__, index)
                if group["rank"] is None or p.ndim < 2:
                    plain_p.append(p)
                    plain_g.append(grad)
                    continue
                b, m, n, batched = self._view(group, p)
                lg = local_tensor(grad)
                item = _Item(p=local_tensor(p), state=self.state[p],
                             G=lg.reshape(b, lg.shape[0] if ctx else m, n), b=b,
                             m=lg.shape[0] if ctx else m, n=n, batched=batched,
                             side="right" if ctx else projection_side((m, n), group["proj_type"]),
                             rank=min(int(group["rank"]), m, n), M=m)
                if "iteration" not in item.state:
                    self._init_state(group, item, seed=int(group["seed"]) + ordinal - 1, key=p)
                    fresh.append(item)
                items.append(item)
                keys.append(p)
                grads.append(grad)
            if fresh:
                self._assign_offsets(group, fresh)
            for it in items:
                counters_to_cpu_(it.state, (*COUNTERS, "step"))
            item_views = [_LocalState(it.state) for it in items] if ctx else []
            for it, v in zip(items, item_views):
                it.state = v.local
            # a random basis does not depend on the gradient: its refresh (and the
            # moments' move into it) happens before the skip guard copies the state, so
            # a skipped step never leaves moments and basis in different subspaces
            self._refresh_gradient_free(group, items)
            guard = SkipNonFinite(group, plain_p + keys, plain_g + grads, self.state)
            plain_g = guard.grads[:len(plain_p)]
            for it, g in zip(items, guard.grads[len(plain_p):]):
                it.G = local_tensor(g).reshape(it.b, it.m, it.n)
            if plain_p and ctx is not None:
                for p in plain_p:
                    if "exp_avg" not in self.state[p]:
                        self._init_inner_plain(group, self.state[p], p)
                views = [_LocalState(self.state[p]) for p in plain_p]
                self._plain_step_states(index, group, [local_tensor(p) for p in plain_p],
                                        [local_tensor(g) for g in plain_g],
                                        [v.local for v in views])
                for v in views:
                    v.write_back()
            elif plain_p:
                self._plain_step(index, group, plain_p, plain_g)
            if items:
                self._projected_step(group, items)
            for v in item_views:
                v.write_back()
            guard.finish()
        self._ctx = None  # holds a process group: not kept beyond the step
        return loss

    def _sharding(self) -> DistContext | None:
        """FSDP2 context when every group runs on local shards, else ``None`` (fallback).

        Sharded: GaLoreAdamW, ``Shard(0)`` DTensors, every projected parameter a
        single matrix (2-D, or flattened to ``out × rest``), ``proj_type`` in
        ``std``/``reverse_std``/``right`` (projected on the **right** under FSDP2:
        the basis ``n × r`` is replicated, ``G P`` and the Adam moments are
        row-sharded like the parameter; a left basis would need a distributed
        QR of the sharded side every step), no ``residual``, ``state_dtype`` and
        ``proj_dtype`` ``None``, ``projector`` ``warm``/``rsvd``/``svd``/``random``.
        """
        params = [p for g in self.param_groups for p in g["params"]]
        ctx = resolve_context(type(self).__name__, params, None)
        if ctx is None or not isinstance(self, GaLoreAdamW):
            return None
        for group in self.param_groups:
            if (group["proj_type"] not in ("std", "reverse_std", "right")
                    or group["residual"] is not None or group["state_dtype"] is not None
                    or group["proj_dtype"] is not None):
                return None
            if group["rank"] is not None and any(
                    p.ndim >= 2 and self._view(group, p)[3] for p in group["params"]):
                return None
        return ctx

    def _init_inner_plain(self, group: dict[str, Any], state: dict[str, Any], p: Tensor
                          ) -> None:
        """State of an unprojected parameter (FSDP2: DTensors like ``p``)."""
        init_adam_state(state, p, group["state_dtype"])

    def _plain_step_states(self, index: int, group: dict[str, Any], params: list[Tensor],
                           grads: list[Tensor], states: list[dict[str, Any]]) -> None:
        """The unprojected AdamW step on local shards with local views of the state."""
        beta1, beta2 = (float(b) for b in group["betas"])
        adamw_step_states_(params, grads, states, group["state_dtype"],
                           lr=_float(group["lr"]), beta1=beta1, beta2=beta2,
                           eps=float(group["eps"]), weight_decay=float(group["weight_decay"]))

    def _init_state(self, group: dict[str, Any], item: _Item, seed: int,
                    key: Tensor | None = None) -> None:
        st = item.state
        # CPU counters whatever the default device (see _state.COUNTERS)
        st["iteration"] = torch.tensor(0, dtype=torch.int64, device="cpu")
        st["refresh_step"] = torch.tensor(0, dtype=torch.int64, device="cpu")
        st["refresh_offset"] = torch.tensor(0, dtype=torch.int64, device="cpu")
        st["seed"] = torch.tensor(seed, dtype=torch.int64, device="cpu")
        b, r1, r2 = self._low_rank_shape(item)
        dt = torch.promote_types(item.G.dtype, self._basis_dtype(item.p))
        like: Tensor
        if getattr(self, "_ctx", None) is not None and key is not None:
            # FSDP2 (right side, b == 1): the moments G P are [M, r], row-sharded like p
            from torch.distributed.tensor import Shard
            from torch.distributed.tensor import empty as dempty
            like = dempty((item.M, r2), dtype=dt, device_mesh=key.device_mesh,  # type: ignore[attr-defined]
                          placements=[Shard(0)])
        else:
            like = torch.empty((b, r1, r2) if item.batched else (r1, r2), dtype=dt,
                               device=item.p.device)
        self._init_inner(group, st, like)
        if group["residual"] is not None:
            st["residual_norm"] = torch.zeros(item.b, dtype=torch.float32, device=item.p.device)

    @staticmethod
    def _assign_offsets(group: dict[str, Any], fresh: list[_Item]) -> None:
        """Spread each shape's matrices over ``stagger`` refresh slots (stored, so a
        resumed run keeps the schedule)."""
        gap = int(group["update_proj_gap"])
        slots = max(1, min(int(group["stagger"]), gap))
        count: dict[tuple[int, int], int] = {}
        for it in fresh:
            j = count.get((it.M, it.n), 0)
            count[(it.M, it.n)] = j + 1
            it.state["refresh_offset"].fill_(((j % slots) * gap) // slots)

    @staticmethod
    def _due(group: dict[str, Any], st: dict[str, Any], t: int) -> bool:
        """Whether the matrix refreshes its basis at iteration ``t`` (a CPU counter)."""
        has_basis = "projector" in st or (group["projector"] == "random" and t > 1)
        gap = int(group["update_proj_gap"])
        return not has_basis or (t - 1 - int(st["refresh_offset"])) % gap == 0

    def _refresh_gradient_free(self, group: dict[str, Any], items: list[_Item]) -> None:
        """``projector="random"``: advance the schedule of the matrices due for a refresh
        and refresh them now, before the non-finite guard copies the state.

        The random basis is a function of (seed, refresh step) only, and those are
        CPU counters that a skip guard on an accelerator cannot restore without a
        host synchronisation. So such a refresh is not undone by a skipped step on
        any device: the moments are moved into the new basis (``on_refresh``) and
        only the gradient's contribution is skipped. Moments and basis then always
        describe the same subspace, and the parameters and moments after a skipped
        refresh step followed by clean steps equal those of a run without that step
        (until the next refresh, which comes one step earlier: ``iteration`` advanced).
        """
        if group["projector"] != "random":
            return
        due: list[_Item] = []
        for it in items:
            if self._due(group, it.state, int(it.state["iteration"]) + 1):
                it.state["iteration"].add_(1)
                it.advanced = True
                due.append(it)
        if due:
            self._refresh(group, due)

    def _projected_step(self, group: dict[str, Any], items: list[_Item]) -> None:
        refresh: list[_Item] = []
        for it in items:
            if it.advanced:  # already refreshed (see _refresh_gradient_free)
                continue
            st = it.state
            st["iteration"].add_(1)
            if self._due(group, st, int(st["iteration"])):
                refresh.append(it)
        if refresh:
            self._refresh(group, refresh)
        pd = group["proj_dtype"]
        # one matrix at a time: only one matrix's projected gradient, direction and
        # temporaries are alive at once (lists over all matrices held 3/4 of the
        # parameters' size at rank d/4, 3x galore-torch's peak)
        for it in items:
            if not it.bases:
                it.bases = self._load_bases(group, it)
            R = project(it.G if pd is None else it.G.to(pd), self._proj_bases(group, it),
                        self._ptype(group, it))
            (N,), (c,), (d,) = self._inner_direction(group, [it], [R])
            self._apply(group, it, R, N, c, d)
            it.bases, it.proj, it.advanced = [], None, False

    # ----------------------------------------------------------------- refresh
    def _sides(self, item: _Item) -> list[str]:
        return ["left", "right"] if item.side == "both" else [item.side]

    @staticmethod
    def _generator(seed: int, device: torch.device) -> torch.Generator:
        """The generator of a refresh's random draws: ``torch.Generator`` on ``device``
        seeded with ``seed`` (what :func:`~matrixopt.linalg.lowrank_basis` builds from an
        int seed). ``seed`` comes from CPU counters, so nothing is read from the device.
        A hook: a caller may return another generator (the CUDA-claiming dry run in
        ``tests/optim/test_fake_cuda.py`` returns a CPU one, since fake tensor mode
        cannot build a CUDA generator)."""
        g = torch.Generator(device=device)
        g.manual_seed(seed)
        return g

    def _random_bases(self, item: _Item, refresh_step: int) -> list[Tensor]:
        seed = (int(item.state["seed"]) * _SEED_STRIDE + refresh_step) % (2 ** 62)
        dt = self._basis_dtype(item.p)
        # the basis depends on the full shape only (G is not read): a row shard stands in
        G = item.G if item.M == item.m else item.G.new_zeros(()).expand(item.b, item.M, item.n)
        return [lowrank_basis(G, item.rank, method="random", side=s,  # type: ignore[arg-type]
                              seed=self._generator(seed + i, G.device), dtype=dt,
                              check_finite=False)
                for i, s in enumerate(self._sides(item))]

    def _load_bases(self, group: dict[str, Any], item: _Item) -> list[Tensor]:
        st = item.state
        if group["projector"] == "random":
            return self._random_bases(item, int(st["refresh_step"]))
        dt = self._basis_dtype(item.p)
        keys = ["projector", "projector_right"] if item.side == "both" else ["projector"]
        # int8 / bf16 bases are dequantised here, transiently (the stored tensor itself
        # when it already has the basis dtype)
        return [self._w(load_moment(st, k, dt, signed=True)) for k in keys]

    def _store_bases(self, group: dict[str, Any], item: _Item, bases: list[Tensor]) -> None:
        """Store a refreshed basis (``projector``, ``projector_right``) in the group's
        ``state_dtype``: ``"int8"`` is the signed block-wise code plus a float32
        ``<key>_absmax`` (bases of ≥ 4096 entries, :mod:`._state`), ``"bf16"``
        bfloat16, ``None`` / ``"fp32"`` the basis dtype. The refresh step itself
        projects with the full-precision ``bases``; later steps dequantise the
        stored one (:meth:`_load_bases`). Adam's first steps are nearly sign
        updates, so projecting them with the rounded basis would amplify its
        rounding (5x larger parameter error after 5 steps in the state_dtype tests)."""
        st = item.state
        sd = group["state_dtype"]
        keys = ["projector", "projector_right"] if item.side == "both" else ["projector"]
        for key, P in zip(keys, bases):
            P = self._st(P.contiguous(), item)
            st.pop(key + ABSMAX, None)  # a quantised basis of an earlier format
            if sd in ("bf16", "int8"):
                # new tensors: the previous basis may still be read (the transport's overlap)
                st.pop(key, None)
                init_moment(st, key, P, sd, signed=True)
                store_moment(st, key, P, sd, signed=True)
            else:
                st[key] = P

    @torch.compiler.disable
    def _refresh(self, group: dict[str, Any], items: list[_Item]) -> None:
        """New bases for ``items`` and the moments moved into them (``on_refresh``).

        Runs eagerly under ``torch.compile``: it happens once per ``update_proj_gap``
        steps, and its Python control flow on CPU counters (seeds, which matrices
        refresh) and its random generators would otherwise make the compiled step
        recompile at every refresh.
        """
        method = group["projector"]
        old: list[list[Tensor] | None] = []
        for it in items:
            st = it.state
            if method == "random":
                old.append(self._random_bases(it, int(st["refresh_step"]))
                           if int(st["iteration"]) > 1 else None)
            elif "projector" in st:
                old.append(self._load_bases(group, it))
            else:
                old.append(None)
        new: list[list[Tensor]] = [[] for _ in items]
        if method == "random":
            for i, it in enumerate(items):
                new[i] = self._random_bases(it, int(it.state["iteration"]))
        else:
            # one lowrank_basis call per bucket of same-shape matrices
            buckets: dict[tuple[Any, ...], list[int]] = {}
            for i, it in enumerate(items):
                key = (it.M, it.m, it.n, it.side, it.rank, it.G.dtype, it.p.device,
                       old[i] is not None)
                buckets.setdefault(key, []).append(i)
            for (rows, _m, _n, _, rank, _, _, warm), idx in buckets.items():
                first = items[idx[0]]
                G = torch.cat([items[i].G for i in idx], dim=0) if len(idx) > 1 else first.G
                seed = (int(first.state["seed"]) * _SEED_STRIDE
                        + int(first.state["iteration"])) % (2 ** 62)
                sizes = [items[i].b for i in idx]
                for k, side in enumerate(self._sides(first)):
                    prev = None
                    if warm:
                        prevs = [old[i][k] for i in idx]  # type: ignore[index]
                        prev = torch.cat(prevs, dim=0) if len(prevs) > 1 else prevs[0]
                    ctx = getattr(self, "_ctx", None)
                    if ctx is not None:  # FSDP2: row shards, right side, small all-reduces
                        P = sharded_right_basis(ctx, G, rows, rank, method=method,
                                                previous=prev,
                                                seed=self._generator(seed + k, G.device),
                                                dtype=self._basis_dtype(first.p))
                    else:
                        P = lowrank_basis(G, rank, method=method,
                                          side=side,  # type: ignore[arg-type]
                                          previous=prev,
                                          seed=self._generator(seed + k, G.device),
                                          dtype=self._basis_dtype(first.p), check_finite=False)
                    for i, chunk in zip(idx, P.split(sizes, dim=0)):
                        new[i].append(chunk)
        on_refresh = group["on_refresh"]
        for it, o, nb in zip(items, old, new):
            st = it.state
            st["refresh_step"].copy_(st["iteration"])
            if method != "random":
                self._store_bases(group, it, nb)
            it.bases = nb
            if o is None or on_refresh == "keep":
                continue
            if on_refresh == "reset":
                self._inner_reset(group, it)
            else:
                if it.side == "both":
                    Q: Any = (basis_overlap(nb[0], o[0], "left"),
                              basis_overlap(nb[1], o[1], "right"))
                else:
                    Q = basis_overlap(nb[0], o[0], it.side)  # type: ignore[arg-type]
                self._inner_transport(group, it, Q)

    # ------------------------------------------------------------------- apply
    @staticmethod
    def _proj_bases(group: dict[str, Any], item: _Item) -> Any:
        """The basis (or pair) in the dtype the projection GEMMs run in (cached per step)."""
        if item.proj is None:
            pd = group["proj_dtype"]
            bs = item.bases if pd is None else [P.to(pd) for P in item.bases]
            item.proj = bs[0] if item.side != "both" else (bs[0], bs[1])
        return item.proj

    def _back(self, group: dict[str, Any], item: _Item, X: Tensor, alpha: float = 1.0
              ) -> Tensor:
        """``project_back(alpha·X)``; scaling and the cast to ``proj_dtype`` are one pass."""
        pd = group["proj_dtype"]
        if pd is not None and X.dtype != pd:
            X = torch.mul(X, alpha, out=torch.empty_like(X, dtype=pd))
        elif alpha != 1.0:
            X = X * alpha
        return project_back(X, self._proj_bases(group, item), self._ptype(group, item),
                            (item.b, item.m, item.n))

    @staticmethod
    def _ptype(group: dict[str, Any], item: _Item) -> str:
        """``proj_type`` naming the item's side (the side of the full matrix, also for a
        row shard whose own shape would pick another)."""
        return group["proj_type"] if item.side == "both" else item.side

    @staticmethod
    def _channel_norms(X: Tensor, side: str, granularity: str) -> Tensor:
        """Norms over the projected dim per channel (``[b,1,n]`` / ``[b,m,1]``) or per matrix."""
        if granularity == "tensor" or side == "both":
            return torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True)
        if side == "right":
            return torch.linalg.vector_norm(X, dim=-1, keepdim=True)
        # column norms: vector_norm along a non-last dim is a strided reduction,
        # ~40x slower on CPU than squaring and summing
        return X.square().sum(dim=-2, keepdim=True).sqrt_()

    @staticmethod
    def _limit(group: dict[str, Any], item: _Item, norm: Tensor) -> Tensor:
        """Norm-growth limiter: factor (``[b,1,1]``) keeping ``norm <= γ · previous``."""
        gamma = group["norm_growth_limit"]
        st = item.state
        if "residual_norm" not in st:
            st["residual_norm"] = torch.zeros(item.b, dtype=torch.float32, device=item.p.device)
        prev = st["residual_norm"].to(norm.dtype)
        if gamma is None:
            factor = torch.ones_like(norm)
        else:
            capped = (float(gamma) * prev / norm).clamp(max=1.0)
            # no previous norm (first step) or a zero norm: nothing to limit
            factor = torch.where((prev > 0) & (norm > 0), capped, torch.ones_like(norm))
        st["residual_norm"].copy_(norm * factor)
        return factor.view(-1, 1, 1)

    def _apply(self, group: dict[str, Any], item: _Item, R: Tensor, N: Tensor, c: Any,
               d: Any) -> None:
        r"""W ← d·W − c·scale·(back(N) [+ residual]) for one matrix (stack)."""
        p = item.p
        scale = float(group["scale"])
        residual = group["residual"]
        if isinstance(d, Tensor):
            p.mul_(d.to(p.dtype))
            d = 1.0
        if isinstance(c, Tensor):
            N = N * c.to(N.dtype)
            c = 1.0
        alpha = -float(c) * scale
        gain = None
        if residual is not None:
            gran = group["residual_granularity"]
            Rn = self._channel_norms(R, item.side, gran)
            gain = torch.where(Rn > 0, self._channel_norms(N, item.side, gran) / Rn,
                               torch.zeros_like(Rn))
        p3 = p.view(item.b, item.m, item.n) if p.is_contiguous() else None
        fused = (p3 is not None and p.dtype == N.dtype and item.side != "both"
                 and group["proj_dtype"] in (None, p.dtype))
        if residual == "apollo":
            assert gain is not None
            G = item.G.to(N.dtype)
            # ||G diag(s)|| from G's channel norms: the scaled gradient is never built
            gn = self._channel_norms(G, item.side, group["residual_granularity"])
            norm = torch.linalg.vector_norm(gn * gain, dim=(-2, -1))
            s = gain * self._limit(group, item, norm)
            if d != 1.0:
                p.mul_(d)
            if p3 is not None and p.dtype == G.dtype:
                p3.addcmul_(G, s, value=alpha)
            else:
                p.add_((G * s).mul_(alpha).reshape(p.shape).to(p.dtype))
            return
        if fused:
            assert p3 is not None
            P = item.bases[0]
            if item.side == "left":
                p3.baddbmm_(P.expand(item.b, -1, -1), N, beta=d, alpha=alpha)
            else:
                p3.baddbmm_(N, P.mT.expand(item.b, -1, -1), beta=d, alpha=alpha)
        else:
            U = self._back(group, item, N, alpha)  # alpha folded into the small factor
            if p3 is not None and d != 1.0:
                # W <- d·W + U in one pass (U may be bf16: promoted inside the kernel)
                torch.addcmul(U, p3, torch.tensor(d, dtype=p.dtype), out=p3)
            else:
                if d != 1.0:
                    p.mul_(d)
                (p3 if p3 is not None else p).add_(U if p3 is not None else U.reshape(p.shape))
        if residual == "fira":
            assert gain is not None
            G = item.G.to(N.dtype)
            S = G - self._back(group, item, R)
            S.mul_(gain)
            factor = self._limit(group, item, torch.linalg.vector_norm(S, dim=(-2, -1)))
            S.mul_(factor)
            if p3 is not None and p.dtype == S.dtype:
                p3.add_(S, alpha=alpha)
            else:
                p.add_(S.mul_(alpha).reshape(p.shape).to(p.dtype))


# ============================================================================
# GaLoreAdamW
# ============================================================================
class GaLoreAdamW(_GaLoreBase):
    r"""AdamW whose matrices keep their moments in a low-rank gradient subspace.

    Drop-in for :class:`torch.optim.AdamW` (same defaults) and for galore-torch's
    ``GaLoreAdamW`` (same group keys)::

        opt = GaLoreAdamW([{"params": other},
                           {"params": mats, "rank": 128, "update_proj_gap": 200,
                            "scale": 0.25, "proj_type": "std"}], lr=1e-3)

    Groups without ``rank`` (``None``) and parameters with fewer than 2 dims are
    plain AdamW (the same code as :class:`torch.optim.AdamW`'s update,
    :func:`~matrixopt.optim._adamw.adamw_step_`). See the module docstring for
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
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        **_galore_defaults(rank, update_proj_gap, scale, proj_type, projector,
                                           on_refresh, residual, residual_granularity,
                                           norm_growth_limit, stagger, seed, matrix_view,
                                           proj_dtype, nonfinite, state_dtype))
        super().__init__(params, defaults)

    def _check_inner(self, check: _GroupChecker) -> None:
        check.number("lr", low=0.0)
        check.betas("betas")
        check.number("eps", low=0.0)
        check.number("weight_decay", low=0.0)

    def _plain_step(self, index: int, group: dict[str, Any], params: list[Tensor],
                    grads: list[Tensor]) -> None:
        states = [self.state[p] for p in params]
        for p, st in zip(params, states):
            if "exp_avg" not in st:
                init_adam_state(st, p, group["state_dtype"])
        beta1, beta2 = (float(b) for b in group["betas"])
        adamw_step_states_(params, grads, states, group["state_dtype"],
                    lr=_float(group["lr"]), beta1=beta1, beta2=beta2, eps=float(group["eps"]),
                    weight_decay=float(group["weight_decay"]))

    def _init_inner(self, group: dict[str, Any], state: dict[str, Any], like: Tensor) -> None:
        init_adam_state(state, like, group["state_dtype"])

    def _inner_direction(self, group: dict[str, Any], items: list[_Item], Rs: list[Tensor]
                         ) -> tuple[list[Tensor], list[Any], list[Any]]:
        beta1, beta2 = (float(b) for b in group["betas"])
        ms, vs = self._load_moments(items, Rs)
        steps = [it.state["step"] for it in items]
        adam_moments_([R.to(m.dtype) for R, m in zip(Rs, ms)], ms, vs, steps, beta1, beta2)
        lr = _float(group["lr"])
        decay = 1.0 - lr * float(group["weight_decay"])
        eps = float(group["eps"])
        if group["residual"] is not None:  # the residual gain needs the true direction
            Ns = adam_direction(ms, vs, steps, beta1, beta2, eps)
            cs = [lr] * len(items)
        else:
            # only c·N is used: m̂/(√v̂ + ε) = (√bc₂/bc₁)·m/(√v + ε√bc₂), the bias
            # corrections go into the step multiplier (two elementwise passes fewer)
            bc1, bc2 = _bias_corrections(steps, beta1, beta2)
            denom = torch._foreach_sqrt(vs)
            torch._foreach_add_(denom, [eps * _sqrt(b) for b in bc2])
            Ns = list(torch._foreach_div(ms, denom))
            cs = [lr * _sqrt(b2) / b1 for b1, b2 in zip(bc1, bc2)]
        self._store_moments(group, items, ms, vs)
        return Ns, cs, [decay] * len(items)

    def _inner_transport(self, group: dict[str, Any], item: _Item, Q: Any) -> None:
        st = item.state
        if float(st["step"]) == 0:  # a CPU counter: no device read
            return
        t = step_value(st["step"])
        beta1, beta2 = (float(b) for b in group["betas"])
        bc1, bc2 = 1.0 - beta1 ** t, 1.0 - beta2 ** t
        (m0,), (v0,) = self._load_moments([item], [item.G])
        if isinstance(t, Tensor):  # compiling: tensor corrections, applied around the call
            m, v = transport_moments(m0 / bc1, v0 / bc2, Q,
                                     item.side)  # type: ignore[arg-type]
            m, v = (m * bc1).to(m0.dtype), (v * bc2).to(v0.dtype)
        else:
            m, v = transport_moments(m0, v0, Q,
                                     item.side,  # type: ignore[arg-type]
                                     bias_correction1=float(bc1),
                                     bias_correction2=float(bc2))
        self._store_moments(group, [item], [m], [v])

    def _load_moments(self, items: list[_Item], Rs: list[Tensor]
                      ) -> tuple[list[Tensor], list[Tensor]]:
        """3-D working views of the moments: the stored tensors when native, else
        transient float32 copies (bf16 / int8 state, see :mod:`._state`)."""
        ms, vs = [], []
        for it, R in zip(items, Rs):
            st = it.state
            t = st["exp_avg"]
            native = "exp_avg_absmax" not in st and t.dtype not in _HALF
            dt = t.dtype if native else compute_dtype(R)
            ms.append(self._w(load_moment(st, "exp_avg", dt, signed=True)))
            vs.append(self._w(load_moment(st, "exp_avg_sq", dt, signed=False)))
        return ms, vs

    def _store_moments(self, group: dict[str, Any], items: list[_Item], ms: list[Tensor],
                       vs: list[Tensor]) -> None:
        sd = group["state_dtype"]
        for it, m, v in zip(items, ms, vs):
            for key, x, signed in (("exp_avg", m, True), ("exp_avg_sq", v, False)):
                x = self._st(x, it)
                if x.data_ptr() == it.state[key].data_ptr() and x.dtype == it.state[key].dtype:
                    x = it.state[key]  # the stored tensor, updated in place
                store_moment(it.state, key, x, sd, signed)

    def _inner_reset(self, group: dict[str, Any], item: _Item) -> None:
        st = item.state
        zero_moment(st, "exp_avg", signed=True)
        zero_moment(st, "exp_avg_sq", signed=False)
        st["step"].zero_()


# ============================================================================
# GaLoreAdafactor
# ============================================================================
class GaLoreAdafactor(_GaLoreBase):
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
        state_dtype: str | None = None,
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
        external_lr: bool = True,
    ) -> None:
        lr, external_lr = adafactor_lr_defaults(lr, external_lr, relative_step)
        defaults = dict(
            lr=lr, external_lr=external_lr, eps=eps, clip_threshold=clip_threshold,
            decay_rate=decay_rate, beta1=beta1,
            weight_decay=weight_decay, scale_parameter=scale_parameter,
            relative_step=relative_step, warmup_init=warmup_init,
            min_dim_size_to_factor=min_dim_size_to_factor, beta2_cap=beta2_cap,
            momentum_dtype=momentum_dtype,
            **_galore_defaults(rank, update_proj_gap, scale, proj_type, projector, on_refresh,
                               residual, residual_granularity, norm_growth_limit, stagger, seed,
                               matrix_view, proj_dtype, nonfinite, state_dtype))
        super().__init__(params, defaults)

    def _check_inner(self, check: _GroupChecker) -> None:
        check_adafactor_group(check)

    @staticmethod
    def _get_lr(group: dict[str, Any], state: dict[str, Any]) -> float:
        """Hugging Face's ``AdafactorSchedule`` reads the step size here
        (:func:`~matrixopt.optim.adafactor.hf_schedule_lr`)."""
        return hf_schedule_lr(group, state)

    def _plain_step(self, index: int, group: dict[str, Any], params: list[Tensor],
                    grads: list[Tensor]) -> None:
        dims = [factored_dims(p.shape, group["min_dim_size_to_factor"]) for p in params]
        for p, d in zip(params, dims):
            if "step" not in self.state[p]:
                init_adafactor_state(self.state[p], p, d, group["beta1"], group["momentum_dtype"],
                                     group["state_dtype"])
        adafactor_update_(params, grads, [self.state[p] for p in params], dims, group)

    @staticmethod
    def _factored(group: dict[str, Any], shape: tuple[int, ...]) -> bool:
        return min(shape[-2:]) >= int(group["min_dim_size_to_factor"])

    def _init_inner(self, group: dict[str, Any], state: dict[str, Any], like: Tensor) -> None:
        nd = like.ndim
        dims = (nd - 2, nd - 1) if self._factored(group, tuple(like.shape)) else None
        init_adafactor_state(state, like, dims, group["beta1"], group["momentum_dtype"],
                             group["state_dtype"])

    def _inner_direction(self, group: dict[str, Any], items: list[_Item], Rs: list[Tensor]
                         ) -> tuple[list[Tensor], list[Any], list[Any]]:
        sts = [it.state for it in items]
        beta2s, rhos = step_sizes([s["step"] for s in sts], group)

        def w(s: dict[str, Any], k: str) -> Tensor | None:
            return self._w(s[k]) if k in s else None

        dims: list[tuple[int, int] | None] = [(1, 2) if "exp_avg_sq_row" in s else None
                                               for s in sts]
        us = adafactor_precondition_(Rs, [w(s, "exp_avg_sq_row") for s in sts],
                                     [w(s, "exp_avg_sq_col") for s in sts],
                                     [w(s, "exp_avg_sq") for s in sts], dims, beta2s,
                                     float(group["eps"][0]))
        clip = clip_factors(us, None if group["clip_threshold"] is None
                            else float(group["clip_threshold"]))
        params = [it.p.float() if it.p.dtype in _HALF else it.p for it in items]
        if group["scale_parameter"]:
            alphas: list[Any] = param_scale(params, float(group["eps"][1]))
            torch._foreach_mul_(alphas, rhos)
        else:
            alphas = list(rhos)
        coefs: list[Any] = alphas if clip is None else list(torch._foreach_mul(clip, alphas))
        wd = float(group["weight_decay"])
        decays = [1.0 - wd * a for a in alphas]
        if group["beta1"] is not None:
            beta1 = float(group["beta1"])
            Ns = []
            for s, u, c, it in zip(sts, us, coefs, items):
                buf = momentum_state_(s, self._st(u * c, it), beta1, group["state_dtype"])
                Ns.append(self._w(buf).to(u.dtype))
            return Ns, [1.0] * len(items), decays
        return us, coefs, decays

    def _inner_transport(self, group: dict[str, Any], item: _Item, Q: Any) -> None:
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

        sq = (lambda X: X * X)
        AL = sq(QL) if QL is not None else None
        AR = sq(QR) if QR is not None else None
        if "exp_avg" in st:
            buf = self._w(load_moment(st, "exp_avg", torch.float32, signed=True))
            store_moment(st, "exp_avg", self._st(both(buf, QL, QR), item),
                         group["state_dtype"], signed=True)
        if "exp_avg_sq_row" in st:
            r = self._w(st["exp_avg_sq_row"])   # [b, r1, 1]
            c = self._w(st["exp_avg_sq_col"])   # [b, 1, r2]
            r_new = both(r, AL, None)
            c_new = both(c, None, AR)
            # keep R Cᵀ / mean(R) equal to the transported V (see the class docstring)
            ratio = r_new.mean(dim=-2, keepdim=True) / r.mean(dim=-2, keepdim=True).clamp_min(1e-38)
            st["exp_avg_sq_row"].copy_(self._st(r_new, item))
            st["exp_avg_sq_col"].copy_(self._st(c_new * ratio, item))
        else:
            v = self._w(st["exp_avg_sq"])
            st["exp_avg_sq"].copy_(self._st(both(v, AL, AR), item))

    def _inner_reset(self, group: dict[str, Any], item: _Item) -> None:
        for k in ("exp_avg", "exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col"):
            if k in item.state:
                zero_moment(item.state, k, signed=True)
        item.state["step"].zero_()

