r"""``memory_report(optimizer)``: optimizer-state bytes and the step's transient workspace.

State bytes are counted exactly from the tensors in ``optimizer.state``
(``numel × element_size`` for every tensor, including ``step`` counters, int8
codes and their float32 ``*_absmax`` scales), per parameter group and per dtype.

The workspace is an *estimate* of the largest transient allocation of one
``step()`` beyond the state (what a memory budget must leave free), from the
shapes and group settings:

* **Muon**: the directions of the group's Muon parameters (one new tensor per
  parameter, parameter dtype) plus the orthogonalisation of the largest
  same-shape bucket of ``B`` matrices ``m × n`` (short side ``s = min(m, n)``,
  long side ``l``): the float32 normalised input ``4Bmn`` bytes plus, in the
  iteration dtype (``w`` bytes), two iterates and the two ``s × s`` Gram
  products, ``w·B(2mn + 2s²)``.
* **GaLore**: per step, the projected gradient and its direction,
  ``2·4·r·l`` bytes for the largest matrix (plus ``4·r·s``, the dequantised
  basis, with ``state_dtype`` ``"bf16"``/``"int8"``); at a refresh of that matrix, for
  ``"warm"``/``"rsvd"``/``"random"`` the sketches ``4·3r(m + n)`` bytes, for
  ``"svd"`` the full SVD ``4(mn + s(m + n) + s)``.
* **AdamW path** (and ``torch.optim.AdamW``-like optimizers with
  ``exp_avg_sq``): natively stored moments build the denominator for all
  parameters at once (``Σ numel × bytes``); quantised / bf16 moments are
  dequantised one parameter at a time (``3 × 4 × numel`` of the largest one:
  two moments and the denominator).
* **Adafactor**: the preconditioned update of the largest parameter in float32
  (``2 × 4 × numel``: update and its square).

Dequantisation of int8 Muon momentum adds ``4 × numel`` of the largest such
parameter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["memory_report", "MemoryReport", "GroupMemory"]


@dataclass
class GroupMemory:
    """State bytes of one parameter group."""

    index: int
    params: int
    param_bytes: int
    state_bytes: int
    by_dtype: dict[str, int] = field(default_factory=dict)


@dataclass
class MemoryReport:
    """Result of :func:`memory_report` (all sizes in bytes)."""

    groups: list[GroupMemory]
    state_bytes: int
    by_dtype: dict[str, int]
    param_bytes: int
    workspace_bytes: int
    workspace: dict[str, int]

    def __str__(self) -> str:
        mib = 2.0 ** 20
        lines = [f"optimizer state {self.state_bytes / mib:.2f} MiB "
                 f"({self.state_bytes / max(self.param_bytes, 1):.3f}x parameter bytes), "
                 f"workspace ≈ {self.workspace_bytes / mib:.2f} MiB"]
        for g in self.groups:
            dt = ", ".join(f"{k}: {v / mib:.2f} MiB" for k, v in sorted(g.by_dtype.items()))
            lines.append(f"  group {g.index}: {g.params} params, {g.state_bytes / mib:.2f} MiB "
                         f"({dt})")
        return "\n".join(lines)


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def memory_report(optimizer: torch.optim.Optimizer) -> MemoryReport:
    """Bytes of ``optimizer``'s state per group and per dtype, plus the estimated
    transient workspace of one step (see the module docstring for the formulas).

    Works for any ``torch.optim.Optimizer``; the workspace estimate knows the
    matrixopt optimizers and AdamW-like state (``exp_avg_sq``).
    """
    groups: list[GroupMemory] = []
    by_dtype: dict[str, int] = {}
    work: dict[str, int] = {}
    for i, g in enumerate(optimizer.param_groups):
        gm = GroupMemory(index=i, params=len(g["params"]),
                         param_bytes=sum(_nbytes(p) for p in g["params"]), state_bytes=0)
        for p in g["params"]:
            for v in optimizer.state.get(p, {}).values():
                if isinstance(v, Tensor):
                    k = _dtype_name(v.dtype)
                    gm.by_dtype[k] = gm.by_dtype.get(k, 0) + _nbytes(v)
                    gm.state_bytes += _nbytes(v)
        for k, v in gm.by_dtype.items():
            by_dtype[k] = by_dtype.get(k, 0) + v
        groups.append(gm)
        for name, b in _group_workspace(optimizer, g).items():
            work[name] = max(work.get(name, 0), b)
    return MemoryReport(groups=groups, state_bytes=sum(x.state_bytes for x in groups),
                        by_dtype=by_dtype, param_bytes=sum(x.param_bytes for x in groups),
                        workspace_bytes=max(work.values(), default=0), workspace=work)


def _group_workspace(opt: torch.optim.Optimizer, g: dict[str, Any]) -> dict[str, int]:
    from ._views import matrix_view
    from .adafactor import Adafactor
    from .galore import GaLoreAdafactor
    from .galore._base import GaLoreBase
    from .muon import Muon

    out: dict[str, int] = {}
    params = list(g["params"])
    if isinstance(opt, Muon):
        muon = [p for p in params if opt._algorithm_for(g, p) == "muon"]
        rest = [p for p in params if opt._algorithm_for(g, p) != "muon"]
        if muon:
            w = torch.tensor([], dtype=g["ns_dtype"] or muon[0].dtype).element_size()
            buckets: dict[tuple[int, int], int] = {}
            for p in muon:
                b, m, n = opt._view_shape(g, p)
                buckets[(m, n)] = buckets.get((m, n), 0) + b
            ortho = max(B * (4 * m * n + w * (2 * m * n + 2 * min(m, n) ** 2))
                        for (m, n), B in buckets.items())
            dirs = sum(_nbytes(p) for p in muon)
            deq = max((4 * p.numel() for p in muon
                       if "momentum_buffer_absmax" in opt.state.get(p, {})), default=0)
            out["orthogonalisation"] = dirs + ortho + deq
        out.update(_adam_workspace(opt, rest))
    elif isinstance(opt, GaLoreBase):
        proj = [p for p in params if g["rank"] is not None and p.ndim >= 2]
        rest = [p for p in params if not (g["rank"] is not None and p.ndim >= 2)]
        if proj:
            best_step = best_refresh = 0
            for p in proj:
                b, m, n, _ = matrix_view(p.shape, g["matrix_view"])
                r, s, lng = min(int(g["rank"]), m, n), min(m, n), max(m, n)
                # int8 / bf16 basis (state_dtype): its float32 copy while the step uses it
                deq = (4 * r * (m + n if g["proj_type"] == "full" else s)
                       if g["state_dtype"] in ("bf16", "int8") and g["projector"] != "random"
                       else 0)
                best_step = max(best_step, b * (2 * 4 * r * lng + deq))
                refresh = (4 * (m * n + s * (m + n) + s) if g["projector"] == "svd"
                           else 4 * 3 * r * (m + n))
                best_refresh = max(best_refresh, b * refresh)
            out["projected_step"] = best_step
            out["refresh"] = best_refresh
        if isinstance(opt, GaLoreAdafactor):
            out.update(_adafactor_workspace(rest))
        else:
            out.update(_adam_workspace(opt, rest))
    elif isinstance(opt, Adafactor):
        out.update(_adafactor_workspace(params))
    else:
        out.update(_adam_workspace(opt, params))
    return out


def _adam_workspace(opt: torch.optim.Optimizer, params: list[Tensor]) -> dict[str, int]:
    with_state = [p for p in params if "exp_avg_sq" in opt.state.get(p, {})]
    native = [p for p in with_state if "exp_avg_sq_absmax" not in opt.state[p]
              and opt.state[p]["exp_avg_sq"].dtype == p.dtype]
    native_ids = {id(p) for p in native}
    other = [p for p in with_state if id(p) not in native_ids]
    b = sum(_nbytes(p) for p in native)
    b = max(b, max((3 * 4 * p.numel() for p in other), default=0))
    return {"adamw": b} if with_state else {}


def _adafactor_workspace(params: list[Tensor]) -> dict[str, int]:
    if not params:
        return {}
    return {"adafactor": max(2 * 4 * math.prod(p.shape) for p in params)}
