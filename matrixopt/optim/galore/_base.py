"""GaLore's shared machinery: group keys, state layout, the step, projection.

The inner optimizer (Adam or Adafactor on the projected gradient) is supplied by
the subclasses (:mod:`.adamw`, :mod:`.adafactor`); the per-step math is
:func:`matrixopt.optim.functional.galore_apply_`; the refresh (schedule, range
finder, basis storage, transport) is :mod:`._refresh`; the distribution strategy
decides where matrices live (:meth:`GaLoreBase._items`).
"""

from __future__ import annotations

import abc
import warnings
from typing import Any

import torch
from torch import Tensor

from ...linalg.projectors import project, project_back, projection_side
from .._common import MatrixOptimizer, _GroupChecker, check_grad, external_stacklevel
from .._distributed import blocks_follow_shards, local_tensor, shard_rows
from .._nonfinite import StepFlags
from .._quant import BLOCK, MIN_QUANT_NUMEL
from .._state import COUNTERS, check_state_dtype, counters_to_cpu_
from .._views import VIEWS, matrix_view
from ..functional.galore import galore_apply_
from ._item import Item, _LocalState
from ._refresh import GaLoreRefresh

__all__ = ["PROJ_TYPES", "PROJECTORS", "ON_REFRESH", "RESIDUALS", "galore_defaults"]

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
PROJECTORS = ("warm", "rsvd", "svd", "random")
ON_REFRESH = ("transport", "reset", "keep")
RESIDUALS = (None, "fira", "apollo")
_GRANULARITY = ("channel", "tensor")


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


def like_param(local: Tensor, p: Tensor, world: int) -> Tensor:
    """``local`` (this rank's block of a moment of the DTensor parameter ``p``) as a
    DTensor sharded like ``p``; an int8 moment's scales (one per 256-entry block)
    sharded with it when its blocks follow the shards, else a ``ValueError``."""
    from torch.distributed.tensor import DTensor
    if local.shape == p.to_local().shape:  # type: ignore[attr-defined]
        return DTensor.from_local(local, p.device_mesh, p.placements,  # type: ignore[attr-defined]
                                  run_check=False, shape=p.shape, stride=p.stride())
    row = p[0].numel() if p.ndim else 1
    if p.ndim == 0 or not blocks_follow_shards(p.shape[0], row, world, BLOCK, MIN_QUANT_NUMEL):
        raise ValueError(
            f"state_dtype='int8' under FSDP2: the 256-entry blocks of the moments of a "
            f"parameter of shape {tuple(p.shape)} straddle its {world} row shards; use "
            f"state_dtype='bf16' for it (or a rank to project it)")
    n = -(-p.numel() // BLOCK)
    return DTensor.from_local(local, p.device_mesh, p.placements,  # type: ignore[attr-defined]
                              run_check=False, shape=torch.Size((n,)), stride=(1,))


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


class GaLoreBase(MatrixOptimizer, GaLoreRefresh, metaclass=abc.ABCMeta):
    """Projection, refresh (:class:`~._refresh.GaLoreRefresh`), transport and residuals;
    the inner optimizer comes from the subclasses (with the refresh's
    ``_inner_transport`` and ``_inner_reset``)."""

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
    def _init_inner(self, group: dict[str, Any], state: dict[str, Any], like: Tensor,
                    whole: tuple[int, ...]) -> None:
        """Create the inner optimizer's state for projected gradients shaped like
        ``like`` (local), of shape ``whole`` across the shards."""

    @abc.abstractmethod
    def _inner_direction(self, group: dict[str, Any], item: Item, R: Tensor, flags: StepFlags
                         ) -> tuple[Tensor, Any, Any]:
        """(low-rank direction N, step multiplier c, decay factor d) of one item."""


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
        self._warned_whole: set[str] = set()

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

    def _needs_whole(self, group: dict[str, Any], p: Tensor) -> str | None:
        """Under FSDP2: the option that keeps this matrix off its shards (it then runs
        on the gathered whole matrix with replicated state), or ``None``.

        ``state_dtype="int8"`` where a sharded tensor's 256-entry blocks would straddle
        the shards (so its code and scales would differ from one process's); the
        ``matrix_view="batch"`` view of a >= 4-D parameter: its state's batch dim is
        not sharded like the parameter's dim 0."""
        view = matrix_view(p.shape, group["matrix_view"])
        if view.batched and p.ndim > 3:
            return f"matrix_view='batch' of a {p.ndim}-D parameter"
        if group["state_dtype"] == "int8" and not self._int8_on_shards(group, view):
            return "state_dtype='int8' and shards that split its 256-entry blocks"
        return None

    def _int8_on_shards(self, group: dict[str, Any], view: Any) -> bool:
        """Whether every int8 tensor sharded over dim 0 (right: moments ``[m, r]``; left
        and full: the basis ``[m, r]``; stacks: all ``[b, ...]``) quantises per shard as
        one process quantises the whole (:func:`blocks_follow_shards`)."""
        side = projection_side((view.m, view.n), group["proj_type"])
        r = min(int(group["rank"]), view.m, view.n)
        world = self._strategy.world
        if view.batched:
            r1, r2 = {"left": (r, view.n), "right": (view.m, r), "both": (r, r)}[side]
            rows = [(view.b, r1 * r2)] + [(view.b, k * r) for k in
                                          {"left": [view.m], "right": [view.n],
                                           "both": [view.m, view.n]}[side]]
        else:
            rows = [(view.m, r)]
        return all(blocks_follow_shards(n_rows, width, world, BLOCK, MIN_QUANT_NUMEL)
                   for n_rows, width in rows)

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
        k = len(plain)
        if plain:
            self._plain_step(group, plain, [strategy.local(p) for p in plain],
                             flags.subset(range(k)).safe(grads[:k]), flags.subset(range(k)))
        # projected matrices: gradients made safe one matrix at a time (and per refresh
        # bucket), so at most one matrix's safe copy is alive
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
        """The step's view of each projected parameter; creates missing state.

        Under FSDP2 a matrix runs on its local block of dim 0 (see :class:`Item`):
        rows of a 2-D or flattened matrix, or whole matrices of a 3-D stack; the
        projection side is the whole matrix's, as in one process."""
        strategy = self._strategy
        pos = self._positions()
        items: list[Item] = []
        fresh: list[Item] = []
        for p in params:
            view = matrix_view(p.shape, group["matrix_view"])
            b, m, n = view.b, view.m, view.n
            state: dict[str, Any] = self.state[p]
            whole = None
            layout = None
            if strategy.sharded:
                why = self._needs_whole(group, p)
                if why is not None:
                    self._warn_whole(why)
                    whole = p.full_tensor()  # type: ignore[attr-defined]
                else:
                    layout = "batch" if view.batched else "rows"
            if whole is not None:
                wp, wg = whole, p.grad.full_tensor()  # type: ignore[union-attr]
            else:
                wp, wg = strategy.local(p), strategy.local(p.grad)  # type: ignore[arg-type]
            start = 0
            if layout is not None:
                chunk, counts = shard_rows(p.shape[0], strategy.world)
                start = min(strategy.rank * chunk, p.shape[0] - counts[strategy.rank])
            bl = wg.shape[0] if layout == "batch" else b
            rows = wg.shape[0] if layout == "rows" else m
            item = Item(key=p, p=wp, state=state, G=wg.reshape(bl, rows, n), b=bl, m=rows, n=n,
                        batched=view.batched, side=projection_side((m, n), group["proj_type"]),
                        rank=min(int(group["rank"]), m, n), M=m, index=len(items),
                        layout=layout, B=b, start=start, whole=whole,
                        reduce=strategy.reduce if layout == "rows" else None)
            if layout is not None:  # DTensor state: the step works on plain local views
                item.state = _LocalState(state, item)
            counters_to_cpu_(item.state, COUNTERS + ("step",))  # a converted checkpoint's
            if "iteration" not in item.state:
                gi, j = pos[id(p)]
                ordinal = sum(len(g["params"]) for g in self.param_groups[:gi]) + j
                self._init_state(group, item, seed=int(group["seed"]) + ordinal)
                fresh.append(item)
            items.append(item)
        if fresh:
            self._assign_offsets(group, fresh)
        return items

    def _warn_whole(self, why: str) -> None:
        if why in self._warned_whole:
            return
        self._warned_whole.add(why)
        warnings.warn(
            f"{type(self).__name__}: under FSDP2, matrices with {why} do not run on their "
            f"row shards: each such matrix and its gradient are all-gathered every step "
            f"and its state is replicated (every other option runs on the shards)",
            stacklevel=4)

    def _init_state(self, group: dict[str, Any], item: Item, seed: int) -> None:
        st = item.state
        for k in ("iteration", "refresh_step", "refresh_offset"):
            st[k] = torch.tensor(0, dtype=torch.int64, device="cpu")
        st["seed"] = torch.tensor(seed, dtype=torch.int64, device="cpu")
        r1, r2 = {"left": (item.rank, item.n), "right": (item.m, item.rank),
                  "both": (item.rank, item.rank)}[item.side]
        dt = torch.promote_types(item.G.dtype, self._basis_dtype(item.p))
        # local tensors (FSDP2: written back as DTensors, see _LocalState); the whole
        # projected shape decides what depends on it (Adafactor's factoring)
        like = torch.empty((item.b, r1, r2) if item.batched else (r1, r2), dtype=dt,
                           device=item.p.device)
        whole = ((item.B, r1, r2) if item.batched else
                 (item.M if item.side == "right" else r1, r2))
        self._init_inner(group, st, like, whole)
        if group["residual"] is not None:
            st["residual_norm"] = torch.zeros(item.b, dtype=torch.float32, device=item.p.device)

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
        # one matrix at a time: only one matrix's safe gradient, projected gradient,
        # direction and temporaries are alive at once
        for it in items:
            one = flags.subset([it.index])
            it.G = one.safe([it.G])[0]
            if not it.bases:
                it.bases = self._load_bases(group, it)
            R = self._project(group, it)
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
                          basis=it.bases[0] if fused else None, flags=one, reduce=it.reduce)
            # release this matrix's safe gradient copy before the next matrix
            it.bases, it.proj, it.G = [], None, it.G.new_empty(0)

    # ---------------------------------------------------------------- products
    def _project(self, group: dict[str, Any], item: Item) -> Tensor:
        """The projected gradient: ``G P`` (right), ``Qᵀ G`` (left), ``Qᵀ G P`` (full).
        On row shards a left product is a sum over the shards: one all-reduce of the
        ``r × n`` (or ``r × r``) result, in float32 at least."""
        pd = group["proj_dtype"]
        R = project(item.G if pd is None else item.G.to(pd), self._proj_bases(group, item),
                    self._ptype(group, item))
        if item.reduce is not None and item.side != "right":
            wide = torch.promote_types(R.dtype, torch.float32)
            R = item.reduce(R.to(wide).contiguous()).to(R.dtype)
        return R

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

