"""The AdamW path of every matrixopt optimizer: state layout around the functional core.

The math is :func:`matrixopt.optim.functional.adamw_`; this module owns what
the optimizer classes need around it: creating the state (``step``,
``exp_avg``, ``exp_avg_sq``, torch.optim.AdamW's keys; ``step`` a float32 CPU
tensor as torch keeps it) and the storage formats of ``state_dtype``
(:mod:`matrixopt.optim._state`). Moments stored natively (the parameter's
dtype) are stepped in place with one foreach call for the whole list; the
others (bf16 / int8 / float32 moments of a half parameter) one parameter at a
time through transient float32 tensors, so at most one parameter's float32
moments exist at once.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._distributed import local_tensor
from ._nonfinite import StepFlags
from ._state import (
    compute_dtype,
    counters_to_cpu_,
    init_moment,
    is_native,
    load_moment,
    store_moment,
)
from .functional.adam import adamw_

__all__ = ["init_adam_state", "adamw_states_"]


def init_adam_state(state: dict[str, Any], like: Tensor, state_dtype: str | None = None
                    ) -> None:
    """Create AdamW state shaped like ``like``, the moments stored as ``state_dtype`` says."""
    state["step"] = torch.tensor(0.0, dtype=torch.float32, device="cpu")
    if state_dtype is None:
        state["exp_avg"] = torch.zeros_like(like, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(like, memory_format=torch.preserve_format)
    else:
        init_moment(state, "exp_avg", like, state_dtype, signed=True)
        init_moment(state, "exp_avg_sq", like, state_dtype, signed=False)


def adamw_states_(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]],
                  state_dtype: str | None, *, lr: float, beta1: float, beta2: float, eps: float,
                  weight_decay: float, flags: StepFlags) -> None:
    """:func:`~matrixopt.optim.functional.adamw_` on local parameters whose moments live
    in ``states`` in any ``state_dtype`` format (``grads`` are the flags' safe ones)."""
    kw = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    for s in states:  # a checkpoint from a capturable optimizer holds `step` on the device
        counters_to_cpu_(s, ("step",))
    native = [i for i, (p, s) in enumerate(zip(params, states))
              if is_native(s, "exp_avg", p, state_dtype)
              and is_native(s, "exp_avg_sq", p, state_dtype)]
    if native:
        adamw_([params[i] for i in native], [grads[i] for i in native],
               [local_tensor(states[i]["exp_avg"]) for i in native],
               [local_tensor(states[i]["exp_avg_sq"]) for i in native],
               [states[i]["step"] for i in native], flags=flags.subset(native), **kw)
    done = set(native)
    for i, (p, g, st) in enumerate(zip(params, grads, states)):
        if i in done:
            continue
        dt = compute_dtype(p)
        m = load_moment(st, "exp_avg", dt, signed=True)
        v = load_moment(st, "exp_avg_sq", dt, signed=False)
        w = p if p.dtype == dt else p.to(dt)
        adamw_([w], [g.to(dt)], [m], [v], [st["step"]], flags=flags.subset([i]), **kw)
        if w is not p:
            p.copy_(w)
        store_moment(st, "exp_avg", m, state_dtype, signed=True)
        store_moment(st, "exp_avg_sq", v, state_dtype, signed=False)
