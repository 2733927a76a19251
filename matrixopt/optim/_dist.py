r"""Distribution as a strategy: chosen once per optimizer, owner of every collective.

An optimizer resolves its strategy at construction (and again when a parameter
group is added) from its parameters and ``process_group``:

* :class:`Single`: one process (plain tensors, no ``process_group``).
* :class:`DDPSplit`: plain tensors replicated by DDP with a ``process_group``:
  gradients are already averaged, so every rank could do all the work; matrix
  work that is expensive (orthogonalisation) is split over the ranks and the
  results all-gathered.
* :class:`FSDP2Rows`: DTensor parameters sharded ``Shard(0)`` on a 1-D mesh
  (``fully_shard``): the math runs on the local rows; sums that span the rows go
  through :meth:`Strategy.reduce`; whole-matrix work goes through
  :meth:`Strategy.orthogonalize` (all-to-all to an owner rank and back).

The algorithm code (:mod:`matrixopt.optim.functional`) sees only local tensors,
a ``reduce`` callable (``None`` when the tensors are whole) and an
``orthogonalize`` callable; it never asks what a tensor is. The collectives
themselves (and their byte accounting, :func:`count_bytes`) live in
:mod:`matrixopt.optim._distributed`; every tensor handed to one lives on the
parameters' device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ._distributed import (
    DistContext,
    all_reduce_sum,
    distributed_orthogonalize,
    local_tensor,
    resolve_context,
)

__all__ = ["Strategy", "Single", "DDPSplit", "FSDP2Rows", "resolve_strategy"]

Orth = Callable[[Tensor], Tensor]


class Strategy:
    """How an optimizer's parameters are spread over processes (base: one process)."""

    #: ``"single"``, ``"ddp"`` or ``"fsdp2"``.
    kind = "single"
    world = 1
    rank = 0

    def local(self, t: Tensor) -> Tensor:
        """The tensor the math runs on (the local shard under FSDP2, else ``t``)."""
        return t

    @property
    def reduce(self) -> Callable[[Tensor], Tensor] | None:
        """Sum of a tensor over the shards of a row-sharded parameter (in place), or
        ``None`` when every rank holds whole tensors."""
        return None

    @property
    def sharded(self) -> bool:
        """Whether parameters are row shards (so whole-matrix work needs a collective)."""
        return False

    def orthogonalize(self, dirs: list[Tensor], views: Sequence[tuple[int, int, int]],
                      full_shapes: Sequence[torch.Size], orth: Orth,
                      comm_dtype: torch.dtype | None = None) -> list[Tensor]:
        """``orth`` of every direction viewed as ``[b, m, n]`` batches, shaped like
        ``dirs``: one batched call per shape here; split over ranks by subclasses."""
        return distributed_orthogonalize(None, dirs, list(views), list(full_shapes), orth,
                                         comm_dtype=comm_dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(world={self.world}, rank={self.rank})"


class Single(Strategy):
    """One process: whole tensors, no collective."""


class _Distributed(Strategy):
    def __init__(self, ctx: DistContext) -> None:
        self.ctx = ctx
        self.world = ctx.world
        self.rank = ctx.rank
        self.group = ctx.group

    #: FSDP2: exchange rounds in flight ahead of the one being orthogonalised (0: one
    #: blocking round); see :func:`~matrixopt.optim._distributed.fsdp_rounds`.
    pipeline_depth = 2

    def orthogonalize(self, dirs: list[Tensor], views: Sequence[tuple[int, int, int]],
                      full_shapes: Sequence[torch.Size], orth: Orth,
                      comm_dtype: torch.dtype | None = None) -> list[Tensor]:
        return distributed_orthogonalize(self.ctx, dirs, list(views), list(full_shapes), orth,
                                         comm_dtype=comm_dtype, depth=self.pipeline_depth)


class DDPSplit(_Distributed):
    """DDP: whole replicated tensors; orthogonalisation split over the ranks by flops
    (one all-gather of the results per step)."""

    kind = "ddp"


class FSDP2Rows(_Distributed):
    """FSDP2 ``Shard(0)``: local rows; row-spanning sums all-reduced; whole matrices
    for orthogonalisation by all-to-alls, pipelined: the exchanges of the next rounds
    run asynchronously while a round is orthogonalised (``pipeline_depth``)."""

    kind = "fsdp2"

    def local(self, t: Tensor) -> Tensor:
        return local_tensor(t)

    @property
    def sharded(self) -> bool:
        return True

    @property
    def reduce(self) -> Callable[[Tensor], Tensor]:
        ctx = self.ctx
        return lambda t: all_reduce_sum(t, ctx)


def resolve_strategy(owner: str, params: Sequence[Tensor], process_group: Any | None
                     ) -> Strategy:
    """The strategy of ``params`` (validated: clear errors for unsupported meshes,
    placements or groups, see :func:`~matrixopt.optim._distributed.resolve_context`)."""
    ctx = resolve_context(owner, params, process_group)
    if ctx is None:
        return Single()
    if ctx.mode == "fsdp":
        return FSDP2Rows(ctx)
    return DDPSplit(ctx)

