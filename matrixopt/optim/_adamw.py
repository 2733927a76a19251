"""The one AdamW implementation every matrixopt optimizer uses.

Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (ICLR 2019), on
top of Kingma & Ba's Adam:

.. math::
    m_t = \\beta_1 m_{t-1} + (1-\\beta_1) g_t,\\quad
    v_t = \\beta_2 v_{t-1} + (1-\\beta_2) g_t^2,\\\\
    \\theta_t = \\theta_{t-1}(1 - \\eta\\lambda)
        - \\eta\\,\\frac{m_t/(1-\\beta_1^t)}{\\sqrt{v_t/(1-\\beta_2^t)} + \\epsilon}.

The functions work on lists of tensors with ``torch._foreach_*`` kernels (one
launch per op for the whole list, as torch.optim's ``foreach`` path). The
direction function is separate so optimizers that run Adam in a projected
space (GaLore) reuse the same moment math and then map the direction back.
State per parameter: ``step`` (float32 scalar tensor on the CPU, as torch keeps
it), ``exp_avg``, ``exp_avg_sq`` — torch.optim.AdamW's keys.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ._distributed import local_tensor
from ._state import (
    compute_dtype,
    counters_to_cpu_,
    init_moment,
    is_native,
    load_moment,
    store_moment,
)

__all__ = ["adam_moments_", "adam_direction", "adamw_step_", "init_adam_state",
           "adamw_step_states_", "step_value"]


def init_adam_state(state: dict, like: Tensor, state_dtype: str | None = None) -> None:
    """Create AdamW state (``step``, ``exp_avg``, ``exp_avg_sq``) shaped like ``like``,
    the moments stored as ``state_dtype`` says (:mod:`matrixopt.optim._state`)."""
    state["step"] = torch.tensor(0.0, dtype=torch.float32, device="cpu")
    if state_dtype is None:
        state["exp_avg"] = torch.zeros_like(like, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(like, memory_format=torch.preserve_format)
    else:
        init_moment(state, "exp_avg", like, state_dtype, signed=True)
        init_moment(state, "exp_avg_sq", like, state_dtype, signed=False)


def step_value(step: Tensor) -> float | Tensor:
    """A step counter as the bias corrections use it (torch.optim's ``_get_value``).

    Eager: a Python float -- the counter lives on the CPU (as torch keeps
    ``step``), so ``.item()`` is no device synchronisation, and float64 scalar
    math gives torch.optim.AdamW's numbers. While ``torch.compile`` traces: the
    tensor itself, so the bias corrections become graph inputs instead of
    constants that dynamo would guard on (one recompilation per step otherwise).
    """
    if torch.compiler.is_compiling():
        return step
    return float(step.tolist())  # type: ignore[arg-type]  # a 0-dim tensor: a number


def _bias_corrections(steps: list[Tensor], beta1: float, beta2: float
                      ) -> tuple[list[Any], list[Any]]:
    """``1 - beta^t`` per counter: floats in eager mode, CPU 0-dim tensors while compiling
    (see :func:`step_value`)."""
    ts = [step_value(s) for s in steps]
    return [1.0 - beta1 ** t for t in ts], [1.0 - beta2 ** t for t in ts]


def _sqrt(x: Any) -> Any:
    return x.sqrt() if isinstance(x, Tensor) else math.sqrt(x)


def adam_moments_(grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                  steps: list[Tensor], beta1: float, beta2: float) -> None:
    """Advance the step counters and both moment estimates in place."""
    torch._foreach_add_(steps, 1.0)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)


def adam_direction(exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], steps: list[Tensor],
                   beta1: float, beta2: float, eps: float) -> list[Tensor]:
    """Bias-corrected Adam direction ``m̂ / (sqrt(v̂) + eps)`` as new tensors."""
    bc1, bc2 = _bias_corrections(steps, beta1, beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, [_sqrt(b) for b in bc2])
    torch._foreach_add_(denom, eps)
    out = torch._foreach_div(exp_avgs, denom)
    torch._foreach_div_(out, bc1)
    return list(out)  # torch._foreach_* return tuples


def adamw_step_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                exp_avg_sqs: list[Tensor], steps: list[Tensor], *, lr: float, beta1: float,
                beta2: float, eps: float, weight_decay: float) -> None:
    """One AdamW step for lists of parameters (``grads`` are read, never written)."""
    if not params:
        return
    adam_moments_(grads, exp_avgs, exp_avg_sqs, steps, beta1, beta2)
    if weight_decay != 0.0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    bc1, bc2 = _bias_corrections(steps, beta1, beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, [_sqrt(b) for b in bc2])
    torch._foreach_add_(denom, eps)
    if torch.compiler.is_compiling():
        # tensor step sizes: a foreach scalar list must hold numbers, so divide first
        torch._foreach_div_(denom, [-lr / b for b in bc1])
        torch._foreach_add_(params, torch._foreach_div(exp_avgs, denom))
    else:
        torch._foreach_addcdiv_(params, exp_avgs, denom, [-lr / b for b in bc1])


def adamw_step_states_(params: list[Tensor], grads: list[Tensor], states: list[dict],
                       state_dtype: str | None, *, lr: float, beta1: float, beta2: float,
                       eps: float, weight_decay: float) -> None:
    """:func:`adamw_step_` on optimizer state dicts in any ``state_dtype`` format.

    Moments stored natively (the parameter's dtype) are updated in place with one
    foreach call, exactly as before. The others (bf16 / int8 / float32 moments of
    a half parameter) are handled one parameter at a time: dequantised into
    transient float32 tensors, stepped, written back — so at most one
    parameter's float32 moments exist at once.
    """
    for s in states:  # a checkpoint from a capturable optimizer holds `step` on the device
        counters_to_cpu_(s, ("step",))
    native = [i for i, (p, s) in enumerate(zip(params, states))
              if is_native(s, "exp_avg", p, state_dtype)
              and is_native(s, "exp_avg_sq", p, state_dtype)]
    if native:
        adamw_step_([params[i] for i in native], [grads[i] for i in native],
                    [local_tensor(states[i]["exp_avg"]) for i in native],
                    [local_tensor(states[i]["exp_avg_sq"]) for i in native],
                    [states[i]["step"] for i in native],
                    lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    done = set(native)
    for i, (p, g, st) in enumerate(zip(params, grads, states)):
        if i in done:
            continue
        dt = compute_dtype(p)
        m = load_moment(st, "exp_avg", dt, signed=True)
        v = load_moment(st, "exp_avg_sq", dt, signed=False)
        w = p if p.dtype == dt else p.to(dt)
        adamw_step_([w], [g.to(dt)], [m], [v], [st["step"]], lr=lr, beta1=beta1, beta2=beta2,
                    eps=eps, weight_decay=weight_decay)
        if w is not p:
            p.copy_(w)
        store_moment(st, "exp_avg", m, state_dtype, signed=True)
        store_moment(st, "exp_avg_sq", v, state_dtype, signed=False)
