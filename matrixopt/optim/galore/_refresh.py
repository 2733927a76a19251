"""GaLore's refresh: when a matrix gets a new basis, how, and how its moments follow.

* schedule: each shape's matrices spread over ``stagger`` slots per
  ``update_proj_gap`` (:meth:`GaLoreRefresh._assign_offsets`), decided from CPU
  counters (:meth:`GaLoreRefresh._due`);
* range finder: one batched :func:`~matrixopt.linalg.projectors.lowrank_basis`
  per bucket of same-shape matrices refreshing together; on FSDP2 row shards the
  same function with the shards' hooks (:func:`~matrixopt.optim._distributed.row_shards`:
  a right basis replicated, a left one as this rank's rows, only small
  all-reduces); a 3-D stack sharded over its matrices gathers its gradient at the
  refresh only (one all-gather per ``update_proj_gap`` steps), so every rank draws
  the single-process sketch, and keeps its own matrices' bases;
  ``projector="random"`` bases are regenerated from (seed, refresh step);
* storage of the bases in ``state_dtype`` (:meth:`GaLoreRefresh._store_bases`);
* the moments follow the basis (``on_refresh``): the inner optimizer's
  ``_inner_transport`` with :math:`Q = P_{new}^\top P_{old}`, or ``_inner_reset``.

A mixin of :class:`~matrixopt.optim.galore._base.GaLoreBase`; the refresh runs
eagerly under ``torch.compile`` (see ``GaLoreBase.__init__``).
"""

from __future__ import annotations

import abc
from typing import Any

import torch
from torch import Tensor

from ...linalg.projectors import basis_overlap, lowrank_basis
from .._dist import Strategy
from .._distributed import all_gather_rows, row_shards
from .._nonfinite import StepFlags
from .._state import ABSMAX, init_moment, load_moment, store_moment
from .._views import matrix_view
from ._item import Item

__all__ = ["GaLoreRefresh"]

_HALF = (torch.float16, torch.bfloat16)
_SEED_STRIDE = 1_000_003  # mixes (matrix seed, refresh step) into one generator seed


class GaLoreRefresh(abc.ABC):
    """Refresh schedule, range finder, basis storage and transport dispatch; the inner
    optimizer's transport and reset come from the subclasses."""

    _strategy: Strategy

    @abc.abstractmethod
    def _inner_transport(self, group: dict[str, Any], item: Item, Q: Any, flags: StepFlags
                         ) -> None: ...

    @abc.abstractmethod
    def _inner_reset(self, group: dict[str, Any], item: Item, flags: StepFlags) -> None: ...

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

    # ---------------------------------------------------------------- schedule
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
        # the basis depends on the whole shape only (G is not read): drawn whole and
        # sliced to this rank's block on shards (a left basis' rows, a stack's matrices)
        whole = item.G if item.layout is None else item.G.new_zeros(()).expand(
            item.B, item.M, item.n)
        out = []
        for i, s in enumerate(self._sides(item)):
            P = lowrank_basis(whole, item.rank, method="random", side=s,  # type: ignore[arg-type]
                              seed=self._generator(seed + i, whole.device), dtype=dt,
                              check_finite=False)
            out.append(self._mine(item, P, s))
        return out

    @staticmethod
    def _mine(item: Item, P: Tensor, side: str) -> Tensor:
        """This rank's block of a whole basis ``[B, k, r]`` (see :class:`Item`)."""
        if item.layout == "batch":
            return P[item.start:item.start + item.b]
        if item.layout == "rows" and side == "left":
            return P[:, item.start:item.start + item.m]
        return P

    def _overlap(self, item: Item, new: list[Tensor], old: list[Tensor]) -> Any:
        """:func:`~matrixopt.linalg.projectors.basis_overlap` per side; a left basis on
        row shards sums its ``r × r`` product over the shards."""
        out = []
        for s, nb, o in zip(self._sides(item), new, old):
            Q = basis_overlap(nb, o, s)  # type: ignore[arg-type]
            assert isinstance(Q, Tensor)
            if item.reduce is not None and s == "left":
                Q = item.reduce(Q.contiguous())
            out.append(Q)
        return (out[0], out[1]) if item.side == "both" else out[0]

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
        new = self._new_bases(group, items, old, flags)
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
            else:
                self._inner_transport(group, it, self._overlap(it, nb, o), one)

    def _new_bases(self, group: dict[str, Any], items: list[Item],
                   old: list[list[Tensor] | None], flags: StepFlags) -> list[list[Tensor]]:
        method = group["projector"]
        new: list[list[Tensor]] = [[] for _ in items]
        if method == "random":
            return [self._random_bases(it, int(it.state["iteration"])) for it in items]
        buckets: dict[tuple[Any, ...], list[int]] = {}
        for i, it in enumerate(items):
            key = (it.M, it.m, it.n, it.side, it.rank, it.G.dtype, it.p.device,
                   old[i] is not None, it.layout)
            buckets.setdefault(key, []).append(i)
        for (rows, _m, _n, _s, rank, _d, _dev, warm, layout), idx in buckets.items():
            first = items[idx[0]]
            # a skipped matrix's gradient is zeros here: nothing NaN enters a batch
            safe = [self._refresh_input(items[i], flags.subset([i]).safe([items[i].G])[0])
                    for i in idx]
            G = torch.cat(safe, dim=0) if len(idx) > 1 else safe[0]
            seed = (int(first.state["seed"]) * _SEED_STRIDE
                    + int(first.state["iteration"])) % (2 ** 62)
            shards = (row_shards(self._strategy.ctx, rows)  # type: ignore[attr-defined]
                      if layout == "rows" else None)
            for k, side in enumerate(self._sides(first)):
                prev = None
                if warm:
                    prevs = [self._refresh_input(items[i], old[i][k])  # type: ignore[index]
                             for i in idx]
                    prev = torch.cat(prevs, dim=0) if len(prevs) > 1 else prevs[0]
                gen = self._generator(seed + k, G.device)
                dt = self._basis_dtype(first.p)
                # on row shards: linalg's range finder through the shards' hooks (only
                # small all-reduces; a left basis comes back as this rank's rows)
                P = lowrank_basis(G, rank, method=method, side=side,  # type: ignore[arg-type]
                                  previous=prev, seed=gen, dtype=dt, check_finite=False,
                                  shards=shards)
                sizes = [items[i].B if layout == "batch" else items[i].b for i in idx]
                for i, chunk in zip(idx, P.split(sizes, dim=0)):
                    new[i].append(self._mine(items[i], chunk, side) if layout == "batch"
                                  else chunk)
        return new

    def _refresh_input(self, item: Item, t: Tensor) -> Tensor:
        """A refresh input (gradient or previous basis) as the range finder takes it: a
        3-D stack sharded over its matrices is gathered whole (every rank then draws the
        single-process sketch); row shards and whole matrices as they are."""
        if item.layout != "batch":
            return t
        return all_gather_rows(t.contiguous(), self._strategy.ctx,  # type: ignore[attr-defined]
                               item.B)
