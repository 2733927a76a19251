"""The step's view of one projected parameter (:class:`Item`), and of FSDP2 state."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from .._distributed import local_tensor

__all__ = ["Item"]


@dataclass
class Item:
    """One projected parameter during a step: its matrix view and where its state is.

    ``p``/``G`` are what the math runs on: the local rows (FSDP2, right side: ``m``
    local rows of ``M``), or whole tensors."""

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
