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

import torch
from torch import Tensor

__all__ = ["adam_moments_", "adam_direction", "adamw_step_", "init_adam_state"]


def init_adam_state(state: dict, like: Tensor) -> None:
    """Create AdamW state (``step``, ``exp_avg``, ``exp_avg_sq``) shaped like ``like``."""
    state["step"] = torch.tensor(0.0, dtype=torch.float32)
    state["exp_avg"] = torch.zeros_like(like, memory_format=torch.preserve_format)
    state["exp_avg_sq"] = torch.zeros_like(like, memory_format=torch.preserve_format)


def _bias_corrections(steps: list[Tensor], beta1: float, beta2: float
                      ) -> tuple[list[float], list[float]]:
    # step lives on the CPU, so .item() is not a device synchronisation.
    ts = [float(s.item()) for s in steps]
    return [1.0 - beta1 ** t for t in ts], [1.0 - beta2 ** t for t in ts]


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
    torch._foreach_div_(denom, [math.sqrt(b) for b in bc2])
    torch._foreach_add_(denom, eps)
    out = torch._foreach_div(exp_avgs, denom)
    torch._foreach_div_(out, bc1)
    return out


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
    torch._foreach_div_(denom, [math.sqrt(b) for b in bc2])
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, [-lr / b for b in bc1])
