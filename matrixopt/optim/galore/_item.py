"""The step's view of one projected parameter (:class:`Item`), and of FSDP2 state."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .._distributed import local_tensor
from .._quant import BLOCK
from .._state import COUNTERS

__all__ = ["Item"]


@dataclass
class Item:
    """One projected parameter during a step: its matrix view and where its state is.

    ``p``/``G`` are what the math runs on: whole tensors (``layout=None``), or under
    FSDP2 the local block of the parameter's dim 0: ``layout="rows"`` (a 2-D or
    flattened matrix: ``m`` local rows of ``M``, starting at row ``start``) or
    ``layout="batch"`` (a 3-D stack: ``b`` whole matrices of ``B``, from ``start``)."""

    key: Tensor        # the parameter (state key)
    p: Tensor
    state: dict[str, Any]
    G: Tensor          # [b, m, n] gradient (made safe per matrix in the step), never written
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
    layout: str | None = None  # None | "rows" | "batch" (FSDP2: what dim 0 shards)
    B: int = 1         # global batch (layout "batch")
    start: int = 0     # first local row (rows) or matrix (batch) of this rank
    reduce: Callable[[Tensor], Tensor] | None = None  # sum over the row shards ("rows")
    advanced: bool = False  # random refresh done before the flags (see _refresh_random)
    whole: Tensor | None = None  # the gathered parameter of the whole-matrix fallback

    def sharded_key(self, key: str) -> bool:
        """Whether state ``key`` is sharded over dim 0 like the parameter (else
        replicated): every batched tensor; for row shards the tensors with a row per
        matrix row (right side: the moments ``G P`` and their row statistics; left and
        full: the left basis)."""
        key = key.removesuffix(_ABSMAX)  # an int8 tensor's scales: sharded with it
        if self.layout == "batch":
            return True
        if self.side == "right":
            return ((key.startswith("exp_avg") and key != "exp_avg_sq_col")
                    or key == "natural_window")
        return key == "projector"


_PLAIN = frozenset(COUNTERS + ("step", "nonfinite_count", "natural_count"))
_ABSMAX = "_absmax"


class _LocalState(dict):  # type: ignore[type-arg]
    """Plain-tensor view of a state dict holding DTensors (FSDP2): each key maps to its
    local shard (sharing storage, so in-place updates land in the DTensor);
    :meth:`write_back` copies replaced entries into the shards, wraps new entries as
    DTensors on the parameter's mesh (``Shard(0)`` where the item says the key is
    sharded, else ``Replicate()``; CPU counters stay plain) and drops removed ones."""

    def __init__(self, state: dict[str, Any], item: Item) -> None:
        super().__init__({k: local_tensor(v) if isinstance(v, Tensor) else v
                          for k, v in state.items()})
        self.origin = state
        self.seen = dict(self)
        self.item = item

    def _wrap(self, k: str, v: Tensor) -> Tensor:
        from torch.distributed.tensor import DTensor, Replicate, Shard
        mesh = self.item.key.device_mesh  # type: ignore[attr-defined]
        if not self.item.sharded_key(k):
            return DTensor.from_local(v, mesh, [Replicate()], run_check=False)
        whole = self.item.B if self.item.layout == "batch" else self.item.M
        shape = torch.Size((whole, *v.shape[1:]))
        if k.endswith(_ABSMAX):  # one scale per block of the whole flattened tensor
            codes = self[k.removesuffix(_ABSMAX)]
            shape = torch.Size((-(-whole * codes[0].numel() // BLOCK),))
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(v, mesh, [Shard(0)], run_check=False, shape=shape,
                                  stride=stride)

    def write_back(self) -> None:
        for k, v in self.items():
            old = self.origin.get(k)
            if (old is not None and old is not v and local_tensor(old) is not old
                    and local_tensor(old).shape == v.shape
                    and local_tensor(old).dtype == v.dtype):
                if self.seen.get(k) is not v:
                    local_tensor(old).copy_(v)
            elif old is not v:
                self.origin[k] = (v if k in _PLAIN or not isinstance(v, Tensor)
                                  else self._wrap(k, v))
        for k in [k for k in self.origin if k not in self]:
            del self.origin[k]
