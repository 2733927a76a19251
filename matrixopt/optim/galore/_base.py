"""GaLore's shared machinery: state layout, refresh schedule, refresh, projection.

The inner optimizer (Adam or Adafactor on the projected gradient) is supplied by
the subclasses (:mod:`.adamw`, :mod:`.adafactor`); the per-step math is
:func:`matrixopt.optim.functional.galore_apply_`; the distribution strategy
decides where matrices live (:meth:`GaLoreBase._items`).
"""

from __future__ import annotations

import abc
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ...linalg.projectors import (
    basis_overlap,
    lowrank_basis,
    project,
    project_back,
    projection_side,
)
from .._common import MatrixOptimizer, _GroupChecker, check_grad
from .._distributed import local_tensor, shard_rows, sharded_right_basis
from .._nonfinite import StepFlags
from .._state import (
    ABSMAX,
    COUNTERS,
    check_state_dtype,
    counters_to_cpu_,
    init_moment,
    load_moment,
    store_moment,
)
from .._views import VIEWS, matrix_view
from ..functional.galore import galore_apply_
from ..routing import external_stacklevel

__all__ = ["PROJ_TYPES", "PROJECTORS", "ON_REFRESH", "RESIDUALS", "galore_defaults"]

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
PROJECTORS = ("warm", "rsvd", "svd", "random")
ON_REFRESH = ("transport", "reset", "keep")
RESIDUALS = (None, "fira", "apollo")
_GRANULARITY = ("channel", "tensor")
_HALF = (torch.float16, torch.bfloat16)
_SEED_STRIDE = 1_000_003  # mixes (matrix seed, refresh step) into one generator seed


def galore_defaults(rank: int | None, update_proj_gap: int, scale: float, proj_type: str,
                    projector: str, on_refresh: str, residual: str | None,
                    residual_granularity: str, norm_growth_limit: float | None, stagger: int,
                    seed: int, matrix_view: str, proj_dtype: torch.dtype | None, nonfinite: str,
                    state_dtype: str | None = None) -> dict[str, Any]:
    return dict(state_dtype=state_dtype, rank=rank, update_proj_gap=update_proj_gap,
                scale=scale, proj_type=proj_type, projector=projector, on_refresh=on_refresh,
                residual=residual, residual_granularity=residual_granularity,
                norm_growth_limit=norm_growth_limit, stagger=stagger, seed=seed,
                matrix_view=matrix_view, proj_dtype=proj_dtype, nonfinite=nonfinite)


def check_galore_keys(check: _GroupChecker) -> None:
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
    check.choice("matrix_view", VIEWS)
    check.dtype("proj_dtype")
    check_state_dtype(check)


@dataclass
class Item:
    """One projected parameter during a step: its matrix view and where its state is.

    ``p``/``G`` are what the math runs on: the local rows (FSDP2, right side: ``m``
    local rows of ``M``), or whole tensors."""

    key: Tensor        # the parameter (state key)
    p: Tensor
    state: dict[str, Any]
    G: Tensor          # [b, m, n] safe gradient (set after the flags), never written
    b: int
    m: int
    n: int
    batched: bool      # state tensors keep the leading batch dim ([E, ...] params)
    side: str          # "left" | "right" | "both"
    rank: int          # min(group rank, m, n)
    M: int             # global rows
    index: int         # position among the step's flags
    bases: list[Tensor] = field(default_factory=list)  # 3-D working bases
    proj: Any = None   # the bases in proj_dtype for this step
    sharded: bool = False
    advanced: bool = False  # random refresh done before the flags (see _refresh_random)
    whole: Tensor | None = None  # the gathered parameter of the whole-matrix fallback


class _LocalState(dict):  # type: ignore[type-arg]
    """Plain-tensor view of a state dict holding DTensors (FSDP2): each key maps to its
    local shard (sharing storage, so in-place updates land in the DTensor);
    :meth:`write_back` copies replaced entries into the shards, adds new plain entries
    (a replicated basis) and drops removed ones."""

    def __init__(self, state: dict[str, Any]) -> None:
        super().__init__({k: local_tensor(v) if isinstance(v, Tensor) else v
                          for k, v in state.items()})
        self.origin = state
        self.seen = dict(self)

    def write_back(self) -> None:
        for k, v in self.items():
            old = self.origin.get(k)
            if old is not None and old is not v and local_tensor(old) is not old:
                if self.seen.get(k) is not v:
                    local_tensor(old).copy_(v)
            elif old is not v:
                self.origin[k] = v
        for k in [k for k in self.origin if k not in self]:
            del self.origin[k]


class GaLoreBase(MatrixOptimizer, metaclass=abc.ABCMeta):
    """Projection, refresh, transport and residuals; the inner optimizer comes from the
    subclasses."""

    # ------------------------------------------------------------ subclass API
    @abc.abstractmethod
    def _check_inner(self, check: _GroupChecker) -> None: ...

    @abc.abstractmethod
    def _plain_step(self, group: dict[str, Any], keys: list[Tensor], params: list[Tensor],
                    grads: list[Tensor], flags: StepFlags) -> None:
        """Step unprojected parameters ``keys`` (state keys; DTensors under FSDP2, whose
        state is then created as DTensors) on their local ``params`` with (safe) local
        ``grads``."""

    @abc.abstractmethod
    def _init_inner(self, group: dict[str, Any], state: dict[str, Any], like: Tensor) -> None: ...

    @abc.abstractmethod
    def _inner_direction(self, group: dict[str, Any], item: Item, R: Tensor, flags: StepFlags
                         ) -> tuple[Tensor, Any, Any]:
        """(low-rank direction N, step multiplier c, decay factor d) of one item."""

    @abc.abstractmethod
    def _inner_transport(self, group: dict[str, Any], item: Item, Q: Any, flags: StepFlags
                         ) -> None: ...

    @abc.abstractmethod
    def _inner_reset(self, group: dict[str, Any], item: Item, flags: StepFlags) -> None: ...

    # ------------------------------------------------------------ construction
    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        if not GaLoreBase._refresh_is_eager:
            # A refresh (QR/SVD, seeds and bucket plans from CPU counters) runs eagerly
            # under torch.compile: a graph break once per update_proj_gap steps instead of
            # a recompilation. Wrapped here, not at import: torch.compiler.disable imports
            # dynamo, which `import matrixopt` must not pay for.
            GaLoreBase._refresh = torch.compiler.disable(GaLoreBase._refresh)  # type: ignore[method-assign]
            GaLoreBase._refresh_is_eager = True
        super().__init__(params, defaults)
        self._galore_built = True
        self._warn_no_rank()

    def _check_strategy(self) -> None:
        self._warned_whole = False

    def _check_group(self, check: _GroupChecker) -> None:
        check_galore_keys(check)
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
                v = matrix_view(p.shape, g["matrix_view"])
                if r > min(v.m, v.n):
                    over.append((tuple(p.shape), min(v.m, v.n)))
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
    def _basis_dtype(p: Tensor) -> torch.dtype:
        return torch.float32 if p.dtype in _HALF else p.dtype

    @staticmethod
    def _st(t: Tensor, item: Item) -> Tensor:
        """A 3-D working tensor in the shape it is stored with."""
        return t if item.batched else t.squeeze(0)

    @staticmethod
    def _w(t: Tensor) -> Tensor:
        """A stored tensor as a 3-D working view."""
        return t if t.ndim == 3 else t.unsqueeze(0)

    def _on_shards(self, group: dict[str, Any], p: Tensor) -> bool:
        """Under FSDP2: whether this matrix runs on its row shard (GaLoreAdamW, one matrix
        projected on the right, no residual/state_dtype/proj_dtype), else on the gathered
        whole matrix."""
        view = matrix_view(p.shape, group["matrix_view"])
        side = projection_side((view.m, view.n), group["proj_type"])
        return (self._shardable_inner and side == "right" and not view.batched
                and group["residual"] is None and group["state_dtype"] is None
                and group["proj_dtype"] is None)

    _shardable_inner = False
    _refresh_is_eager = False

    # -------------------------------------------------------------------- step
    def _step_group(self, index: int, group: dict[str, Any], params: list[Tensor]) -> None:
        owner = type(self).__name__
        strategy = self._strategy
        plain: list[Tensor] = []
        items: list[Item] = []
        for p in params:
            check_grad(p, owner, index)
            (plain if group["rank"] is None or p.ndim < 2 else items).append(p)  # type: ignore[arg-type]
        its = self._items(group, items)  # type: ignore[arg-type]
        self._refresh_random(group, its)
        grads = [strategy.local(p.grad) for p in plain]  # type: ignore[arg-type]
        grads += [it.G for it in its]
        flags = self._flags(group, grads)
        safe = flags.safe(grads)
        k = len(plain)
        if plain:
            self._plain_step(group, plain, [strategy.local(p) for p in plain], safe[:k],
                             flags.subset(range(k)))
        for it, g in zip(its, safe[k:]):
            it.G = g
        if its:
            self._projected_step(group, its, flags.subset(range(k, len(grads))))
        for it in its:
            if isinstance(it.state, _LocalState):
                it.state.write_back()
            if it.whole is not None:  # the fallback: write this rank's rows back
                local = local_tensor(it.key)
                chunk, _ = shard_rows(it.key.shape[0], strategy.world)
                start = strategy.rank * chunk
                local.copy_(it.whole[start:start + local.shape[0]])
        flags.count_([self.state[p] for p in plain] + [self.state[it.key] for it in its],
                     [strategy.local(p).device for p in plain] + [it.p.device for it in its])

    def _items(self, group: dict[str, Any], params: list[Tensor]) -> list[Item]:
        """The step's view of each projected parameter; creates missing state."""
        strategy = self._strategy
        pos = self._positions()
        items: list[Item] = []
        fresh: list[Item] = []
        for p in params:
            view = matrix_view(p.shape, group["matrix_view"])
            b, m, n = view.b, view.m, view.n
            state: dict[str, Any] = self.state[p]
            on_shards = strategy.sharded and self._on_shards(group, p)
            whole = None
            if strategy.sharded and not on_shards:
                self._warn_whole(group)
                whole = p.full_tensor()  # type: ignore[attr-defined]
                wp, wg = whole, p.grad.full_tensor()  # type: ignore[union-attr]
            else:
                wp, wg = strategy.local(p), strategy.local(p.grad)  # type: ignore[arg-type]
            rows = wg.shape[0] if on_shards else m
            side = "right" if on_shards else projection_side((m, n), group["proj_type"])
            item = Item(key=p, p=wp, state=state, G=wg.reshape(b, rows, n), b=b, m=rows, n=n,
                        batched=view.batched, side=side, rank=min(int(group["rank"]), m, n),
                        M=m, index=len(items), sharded=on_shards, whole=whole)
            counters_to_cpu_(state, COUNTERS + ("step",))  # a converted checkpoint's
            if "iteration" not in state:
                gi, j = pos[id(p)]
                ordinal = sum(len(g["params"]) for g in self.param_groups[:gi]) + j
                self._init_state(group, item, seed=int(group["seed"]) + ordinal)
                fresh.append(item)
            if on_shards:  # DTensor state: the step works on plain local views
                item.state = _LocalState(state)
            items.append(item)
        if fresh:
            self._assign_offsets(group, fresh)
        return items

    def _warn_whole(self, group: dict[str, Any]) -> None:
        if self._warned_whole:
            return
        self._warned_whole = True
        warnings.warn(
            f"{type(self).__name__}: this configuration (proj_type={group['proj_type']!r}, "
            f"residual={group['residual']!r}, state_dtype={group['state_dtype']!r}, "
            f"proj_dtype={group['proj_dtype']!r}, stacked matrices or an Adafactor inner "
            f"optimizer) does not run on FSDP2 row shards yet: each such matrix and its "
            f"gradient are all-gathered every step and its state is replicated",
            stacklevel=4)

    def _init_state(self, group: dict[str, Any], item: Item, seed: int) -> None:
        st = item.state
        for k in ("iteration", "refresh_step", "refresh_offset"):
            st[k] = torch.tensor(0, dtype=torch.int64, device="cpu")
        st["seed"] = torch.tensor(seed, dtype=torch.int64, device="cpu")
        r1, r2 = {"left": (item.rank, item.n), "right": (item.m, item.rank),
                  "both": (item.rank, item.rank)}[item.side]
        dt = torch.promote_types(item.G.dtype, self._basis_dtype(item.p))
        like: Tensor
        if item.sharded:
            # FSDP2 (right side, b == 1): the moments G P are [M, r], row-sharded like p
            from torch.distributed.tensor import Shard
            from torch.distributed.tensor import empty as dempty
            like = dempty((item.M, r2), dtype=dt,
                          device_mesh=item.key.device_mesh,  # type: ignore[attr-defined]
                          placements=[Shard(0)])
        else:
            like = torch.empty((item.b, r1, r2) if item.batched else (r1, r2), dtype=dt,
                               device=item.p.device)
        self._init_inner(group, st, like)
        if group["residual"] is not None:
            st["residual_norm"] = torch.zeros(item.b, dtype=torch.float32, device=item.p.device)

    def _assign_offsets(self, group: dict[str, Any], fresh: list[Item]) -> None:
        """Spread each shape's matrices over ``stagger`` refresh slots by their position
        among the group's matrices of that shape (stored, so a resumed run keeps the
        schedule; the same slots whether the group steps at once or parameter by
        parameter)."""
        gap = int(group["update_proj_gap"])
        slots = max(1, min(int(group["stagger"]), gap))
        order: dict[int, int] = {}
        count: dict[tuple[int, ...], int] = {}
        for q in group["params"]:
            if q.ndim >= 2:
                v = matrix_view(q.shape, group["matrix_view"])
                order[id(q)] = count.get((v.m, v.n), 0)
                count[(v.m, v.n)] = order[id(q)] + 1
        for it in fresh:
            j = order[id(it.key)]
            it.state["refresh_offset"].fill_(((j % slots) * gap) // slots)

    @staticmethod
    def _due(group: dict[str, Any], st: dict[str, Any], t: int) -> bool:
        """Whether a matrix refreshes at iteration ``t`` (CPU counters: no device read)."""
        has_basis = "projector" in st or (group["projector"] == "random" and t > 1)
        return not has_basis or (t - 1 - int(st["refresh_offset"])) % int(
            group["update_proj_gap"]) == 0

    def _refresh_random(self, group: dict[str, Any], items: list[Item]) -> None:
        """``projector="random"``: refresh before the flags are computed.

        A random basis is a function of (seed, refresh step) only, CPU counters that
        a device flag cannot condition without a host sync; so such a refresh is not
        undone by a skipped step on any device: the moments move into the new basis
        (``on_refresh``) and only the gradient's contribution is skipped. Moments and
        basis always describe the same subspace.
        """
        if group["projector"] != "random":
            return
        due = []
        for it in items:
            if self._due(group, it.state, int(it.state["iteration"]) + 1):
                it.state["iteration"].add_(1)
                it.advanced = True
                due.append(it)
        if due:
            self._refresh(group, due, StepFlags.off())

    def _projected_step(self, group: dict[str, Any], items: list[Item], flags: StepFlags
                        ) -> None:
        refresh = []
        for it in items:
            if not it.advanced:
                it.state["iteration"].add_(1)
                if self._due(group, it.state, int(it.state["iteration"])):
                    refresh.append(it)
        if refresh:
            self._refresh(group, refresh, flags.subset([it.index for it in refresh]))
        pd = group["proj_dtype"]
        # one matrix at a time: only one matrix's projected gradient, direction and
        # temporaries are alive at once
        for it in items:
            one = flags.subset([it.index])
            if not it.bases:
                it.bases = self._load_bases(group, it)
            R = project(it.G if pd is None else it.G.to(pd), self._proj_bases(group, it),
                        self._ptype(group, it))
            N, c, d = self._inner_direction(group, it, R, one)
            fused = (it.p.dtype == N.dtype and it.side != "both" and pd in (None, it.p.dtype))

            def back(X: Tensor, it: Item = it) -> Tensor:
                return self._back(group, it, X)

            galore_apply_(it.p, it.G, R, N, shape3=(it.b, it.m, it.n), side=it.side,
                          back=back, c=c, d=d,
                          scale=float(group["scale"]), residual=group["residual"],
                          granularity=group["residual_granularity"],
                          gamma=group["norm_growth_limit"],
                          residual_norm=it.state.get("residual_norm"),
                          basis=it.bases[0] if fused else None, flags=one)
            it.bases, it.proj = [], None

    # ----------------------------------------------------------------- refresh
    @staticmethod
    def _sides(item: Item) -> list[str]:
        return ["left", "right"] if item.side == "both" else [item.side]

    @staticmethod
    def _generator(seed: int, device: torch.device) -> torch.Generator:
        """The generator of a refresh's random draws: a ``torch.Generator`` on ``device``
        seeded from CPU counters (nothing read from the device). A hook: the
        CUDA-claiming dry run substitutes a CPU one (fake tensors cannot build a CUDA
        generator)."""
        g = torch.Generator(device=device)
        g.manual_seed(seed)
        return g

    def _random_bases(self, item: Item, refresh_step: int) -> list[Tensor]:
        seed = (int(item.state["seed"]) * _SEED_STRIDE + refresh_step) % (2 ** 62)
        dt = self._basis_dtype(item.p)
        # the basis depends on the full shape only (G is not read): a row shard stands in
        G = item.G if item.M == item.m else item.G.new_zeros(()).expand(item.b, item.M, item.n)
        return [lowrank_basis(G, item.rank, method="random", side=s,  # type: ignore[arg-type]
                              seed=self._generator(seed + i, G.device), dtype=dt,
                              check_finite=False)
                for i, s in enumerate(self._sides(item))]

    def _basis_keys(self, item: Item) -> list[str]:
        return ["projector", "projector_right"] if item.side == "both" else ["projector"]

    def _load_bases(self, group: dict[str, Any], item: Item) -> list[Tensor]:
        if group["projector"] == "random":
            return self._random_bases(item, int(item.state["refresh_step"]))
        dt = self._basis_dtype(item.p)
        # int8 / bf16 bases are dequantised here, transiently
        return [self._w(load_moment(item.state, k, dt, signed=True))
                for k in self._basis_keys(item)]

    def _store_bases(self, group: dict[str, Any], item: Item, bases: list[Tensor]) -> None:
        """Store a refreshed basis in the group's ``state_dtype`` (int8: signed block-wise
        code + float32 ``<key>_absmax``; bf16; else the basis dtype). The refresh step
        itself projects with the full-precision ``bases``."""
        st, sd = item.state, group["state_dtype"]
        for key, P in zip(self._basis_keys(item), bases):
            P = self._st(P.contiguous(), item)
            st.pop(key + ABSMAX, None)  # a quantised basis of an earlier format
            if sd in ("bf16", "int8"):
                st.pop(key, None)  # new tensors: the old basis may still be read
                init_moment(st, key, P, sd, signed=True)
                store_moment(st, key, P, sd, signed=True)
            else:
                st[key] = P

    def _refresh(self, group: dict[str, Any], items: list[Item], flags: StepFlags) -> None:
        """New bases for ``items`` (one batched range finder per bucket of same-shape
        matrices), stored and the moments moved into them (``on_refresh``); a skipped
        matrix keeps its basis and moments."""
        method = group["projector"]
        old: list[list[Tensor] | None] = []
        for it in items:
            if method == "random":
                old.append(self._random_bases(it, int(it.state["refresh_step"]))
                           if int(it.state["iteration"]) > 1 else None)
            else:
                old.append(self._load_bases(group, it) if "projector" in it.state else None)
        new = self._new_bases(group, items, old)
        for i, (it, o, nb) in enumerate(zip(items, old, new)):
            one = flags.subset([i])
            if o is not None and one.active:  # a skipped matrix keeps its basis
                nb = [one.select(0, n, p) for n, p in zip(nb, o)]
            it.state["refresh_step"].copy_(it.state["iteration"])
            it.bases = nb
            if method != "random":
                self._store_bases(group, it, nb)
                if group["state_dtype"] in (None, "fp32"):
                    # the stored tensors themselves, as every later step reads them (the
                    # same tensors for torch.compile's guards); a rounded int8/bf16 basis
                    # is not used on the step that computed it
                    it.bases = self._load_bases(group, it)
            if o is None or group["on_refresh"] == "keep":
                continue
            if group["on_refresh"] == "reset":
                self._inner_reset(group, it, one)
            elif it.side == "both":
                self._inner_transport(group, it, (basis_overlap(nb[0], o[0], "left"),
                                                  basis_overlap(nb[1], o[1], "right")), one)
            else:
                self._inner_transport(group, it, basis_overlap(nb[0], o[0], it.side),  # type: ignore[arg-type]
                                      one)

    def _new_bases(self, group: dict[str, Any], items: list[Item],
                   old: list[list[Tensor] | None]) -> list[list[Tensor]]:
        method = group["projector"]
        new: list[list[Tensor]] = [[] for _ in items]
        if method == "random":
            return [self._random_bases(it, int(it.state["iteration"])) for it in items]
        buckets: dict[tuple[Any, ...], list[int]] = {}
        for i, it in enumerate(items):
            key = (it.M, it.m, it.n, it.side, it.rank, it.G.dtype, it.p.device,
                   old[i] is not None, it.sharded)
            buckets.setdefault(key, []).append(i)
        for (rows, _m, _n, _s, rank, _d, _dev, warm, sharded), idx in buckets.items():
            first = items[idx[0]]
            G = torch.cat([items[i].G for i in idx], dim=0) if len(idx) > 1 else first.G
            seed = (int(first.state["seed"]) * _SEED_STRIDE
                    + int(first.state["iteration"])) % (2 ** 62)
            for k, side in enumerate(self._sides(first)):
                prev = None
                if warm:
                    prevs = [old[i][k] for i in idx]  # type: ignore[index]
                    prev = torch.cat(prevs, dim=0) if len(prevs) > 1 else prevs[0]
                gen = self._generator(seed + k, G.device)
                dt = self._basis_dtype(first.p)
                if sharded:  # FSDP2 row shards, right side: only small all-reduces
                    P = sharded_right_basis(self._strategy.ctx,  # type: ignore[attr-defined]
                                            G, rows, rank, method=method, previous=prev,
                                            seed=gen, dtype=dt)
                else:
                    P = lowrank_basis(G, rank, method=method, side=side,  # type: ignore[arg-type]
                                      previous=prev, seed=gen, dtype=dt, check_finite=False)
                for i, chunk in zip(idx, P.split([items[i].b for i in idx], dim=0)):
                    new[i].append(chunk)
        return new

    # ---------------------------------------------------------------- products
    @staticmethod
    def _proj_bases(group: dict[str, Any], item: Item) -> Any:
        """The basis (or pair) in the dtype the projection GEMMs run in (cached per step)."""
        if item.proj is None:
            pd = group["proj_dtype"]
            bs = item.bases if pd is None else [P.to(pd) for P in item.bases]
            item.proj = bs[0] if item.side != "both" else (bs[0], bs[1])
        return item.proj

    def _back(self, group: dict[str, Any], item: Item, X: Tensor) -> Tensor:
        pd = group["proj_dtype"]
        if pd is not None and X.dtype != pd:
            X = X.to(pd)
        return project_back(X, self._proj_bases(group, item), self._ptype(group, item),
                            (item.b, item.m, item.n))

    @staticmethod
    def _ptype(group: dict[str, Any], item: Item) -> str:
        """``proj_type`` naming the item's side (the full matrix's side, also for a row
        shard whose own shape would pick another)."""
        return group["proj_type"] if item.side == "both" else item.side

