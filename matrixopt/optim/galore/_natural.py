r"""Natural GaLore for :class:`~matrixopt.optim.GaLoreAdamW` (``natural=True``).

Group keys: ``natural`` (bool, default ``False``), ``natural_window`` (:math:`s`,
default 20, the paper's history length) and ``natural_damping`` (:math:`\lambda`,
default 1e-3, the paper code's constant). Before Adam, the projected gradient of
each matrix is replaced by :math:`(\lambda I + \Gamma\Gamma^\top)^{-1} g` over a
ring buffer of its :math:`s` most recent projected gradients (the math:
:mod:`matrixopt.optim.functional.natural`).

State per projected matrix: ``natural_window`` (the projected shape plus a
trailing ``s``, in the basis' working dtype, float32 for float32 parameters:
``4·s·k`` bytes, :math:`s` times the projected gradient; not quantised by
``state_dtype``) and ``natural_count`` (a CPU int64 counter: the next slot is
``count mod s``). Under FSDP2 with a right basis the window is row-sharded like the
moments. Decisions:

* a refresh of the basis with ``on_refresh="transport"`` or ``"reset"`` clears the
  window: vectors from different subspaces are not mixed (the paper's code keeps
  them); ``"keep"`` keeps it, as it keeps the moments;
* a skipped step (``nonfinite="skip"``) leaves the window's contents unchanged
  (its CPU counter advances, as every CPU counter of a skipped step).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._common import _GroupChecker
from .._nonfinite import StepFlags
from .._state import counters_to_cpu_
from ..functional.natural import natural_direction, window_push_
from ._item import Item

__all__ = ["natural_defaults", "check_natural_keys", "init_natural_state", "natural_gradient",
           "clear_natural_window"]


def natural_defaults(natural: bool, window: int, damping: float) -> dict[str, Any]:
    return dict(natural=natural, natural_window=window, natural_damping=damping)


def check_natural_keys(check: _GroupChecker) -> None:
    check.boolean("natural")
    check.integer("natural_window", low=1)
    check.number("natural_damping", low=0.0)
    if float(check.group["natural_damping"]) <= 0.0:
        raise check.fail("natural_damping", "must be > 0 (the damping λ of λI + ΓΓᵀ)")


def init_natural_state(group: dict[str, Any], state: dict[str, Any], like: Tensor) -> None:
    """The window (zeros: empty slots) and its CPU counter, for projected gradients
    shaped like ``like`` (local)."""
    if not group.get("natural", False):
        return
    s = int(group["natural_window"])
    state["natural_window"] = torch.zeros((*like.shape, s), dtype=like.dtype,
                                          device=like.device)
    state["natural_count"] = torch.tensor(0, dtype=torch.int64, device="cpu")


def natural_gradient(group: dict[str, Any], item: Item, R: Tensor, flags: StepFlags) -> Tensor:
    """Push ``R`` ``[b, r1, r2]`` into the item's window and return the natural
    gradient (a new tensor, ``R``'s dtype)."""
    st = item.state
    counters_to_cpu_(st, ("natural_count",))  # a checkpoint mapped to a device
    W = st["natural_window"]
    W4 = W if W.dim() == 4 else W.unsqueeze(0)
    s = W4.shape[-1]
    if s != int(group["natural_window"]):
        raise ValueError(f"GaLoreAdamW: natural_window={group['natural_window']} but the "
                         f"state's window holds {s} slots (a checkpoint of another "
                         f"natural_window); keep the window length of the checkpoint")
    slot = int(st["natural_count"]) % s  # a CPU counter
    window_push_(W4, R, slot, flags)
    st["natural_count"].add_(1)
    # right basis on row shards: ΓᵀΓ and Γᵀg sum over the rows (left/full: replicated)
    reduce = item.reduce if item.side == "right" else None
    return natural_direction(R, W4, float(group["natural_damping"]), reduce, slot=slot
                             ).to(R.dtype)


def clear_natural_window(item: Item, flags: StepFlags) -> None:
    """At a basis refresh: empty the window (a skipped matrix keeps basis and window)."""
    W = item.state.get("natural_window")
    if W is None:
        return
    W.copy_(flags.select(0, torch.zeros_like(W), W))
