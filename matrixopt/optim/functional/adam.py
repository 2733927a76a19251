r"""Adam and AdamW on lists of local tensors: the one Adam implementation of the package.

Kingma & Ba, "Adam: A Method for Stochastic Optimization" (ICLR 2015);
Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (ICLR 2019):

.. math::
    m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\qquad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,\\
    \theta_t = \theta_{t-1}(1 - \eta\lambda)
        - \eta\,\frac{m_t/(1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon}.

Pure functions over lists of plain (local) tensors with ``torch._foreach_*``
kernels (one launch per op for the whole list, as torch.optim's ``foreach``
path): no optimizer object, no DTensor, no state dict. Muon's AdamW path and
GaLoreAdamW's plain parameters call :func:`adamw_`; GaLore runs
:func:`adam_moments_` and :func:`adam_direction` on projected gradients.

Step counters are CPU float32 tensors (as torch keeps ``step``); eagerly their
values are read as Python floats (no device synchronisation, float64 scalar
math: torch.optim.AdamW's numbers), while ``torch.compile`` traces they stay
tensors (:func:`step_value`), so a compiled step does not guard on them.

``flags`` (:class:`~matrixopt.optim._nonfinite.StepFlags`) folds the
``nonfinite="skip"`` policy into the writes; gradients must then be the flags'
``safe`` gradients. Cost per step: about 8 elementwise passes over the
parameters and two over the moments' size; temporaries of one list of moment
size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._nonfinite import StepFlags

__all__ = ["step_value", "step_values", "bias_corrections", "adam_moments_", "adam_direction",
           "adamw_"]

_OFF = StepFlags.off()


def step_value(step: Tensor) -> Any:
    """A CPU step counter as scalar math reads it: a Python float eagerly (no device
    sync: the counter is on the CPU), the tensor itself while ``torch.compile`` traces
    (so the graph takes it as an input instead of guarding on its value)."""
    if torch.compiler.is_compiling():
        return step
    return float(step.tolist())  # type: ignore[arg-type]  # a 0-dim tensor: a number


def step_values(steps: Sequence[Tensor]) -> list[Any]:
    """:func:`step_value` of every counter; eagerly one read for the whole list."""
    if torch.compiler.is_compiling():
        return list(steps)
    # one 0-dim CPU read each (tolist: a number; no stack, so no new tensor to read)
    return [s.tolist() for s in steps]


def bias_corrections(steps: Sequence[Tensor], beta1: float, beta2: float
                     ) -> tuple[list[Any], list[Any]]:
    r""":math:`(1-\beta_1^t, 1-\beta_2^t)` per counter (floats, or tensors while compiling)."""
    ts = step_values(steps)
    return [1.0 - beta1 ** t for t in ts], [1.0 - beta2 ** t for t in ts]


def _sqrt(x: Any) -> Any:
    return x.sqrt() if isinstance(x, Tensor) else math.sqrt(x)


def adam_moments_(grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                  beta1: float, beta2: float, flags: StepFlags = _OFF) -> None:
    """Advance both moment estimates in place (``grads`` read, never written).

    With active ``flags`` a skipped entry keeps its moments: EMA weight 0, decay 1.
    """
    if not grads:
        return
    if not flags.active:
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
        return
    flags.lerp_(exp_avgs, grads, 1.0 - beta1)
    flags.mul_(exp_avg_sqs, beta2)
    # a skipped gradient is a zero (safe) gradient: (1-β2)·0·0 adds nothing
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)


def adam_direction(exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], steps: Sequence[Tensor],
                   beta1: float, beta2: float, eps: float, *, folded: bool = False
                   ) -> tuple[list[Tensor], list[Any]]:
    r"""Adam's bias-corrected direction as ``(N, c)`` with :math:`c\,N = \hat m/(\sqrt{\hat v}
    + \epsilon)` (new tensors).

    ``folded=False``: :math:`N` is the direction itself and :math:`c = 1`.
    ``folded=True``: :math:`N = m/(\sqrt v + \epsilon\sqrt{b_2})` and
    :math:`c = \sqrt{b_2}/b_1` (:math:`b_k = 1-\beta_k^t`): the bias corrections go
    into the multiplier, two elementwise passes fewer, for callers that scale the
    direction anyway (GaLore maps :math:`N` back and multiplies once).
    """
    bc1, bc2 = bias_corrections(steps, beta1, beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    if folded:
        torch._foreach_add_(denom, [eps * _sqrt(b) for b in bc2])
        return list(torch._foreach_div(exp_avgs, denom)), [_sqrt(b2) / b1
                                                           for b1, b2 in zip(bc1, bc2)]
    torch._foreach_div_(denom, [_sqrt(b) for b in bc2])
    torch._foreach_add_(denom, eps)
    out = torch._foreach_div(exp_avgs, denom)
    torch._foreach_div_(out, bc1)
    return list(out), [1.0] * len(out)


def adamw_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
           exp_avg_sqs: list[Tensor], steps: list[Tensor], *, lr: float, beta1: float,
           beta2: float, eps: float, weight_decay: float, flags: StepFlags = _OFF) -> None:
    """One AdamW step in place: counters, moments, decoupled decay, update.

    ``steps`` (CPU counters) advance by one. With active ``flags`` a skipped
    parameter and its moments are unchanged (its counter still advances, see
    :mod:`~matrixopt.optim._nonfinite`).
    """
    if not params:
        return
    torch._foreach_add_(steps, 1.0)
    adam_moments_(grads, exp_avgs, exp_avg_sqs, beta1, beta2, flags)
    if weight_decay != 0.0:
        flags.mul_(params, 1.0 - lr * weight_decay)
    bc1, bc2 = bias_corrections(steps, beta1, beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, [_sqrt(b) for b in bc2])
    torch._foreach_add_(denom, eps)
    if flags.active:
        # a skipped parameter's step: m / inf = 0 (m is finite, denom >= eps > 0)
        torch._foreach_mul_(denom, flags.weights([1.0] * len(denom), math.inf, denom))
    sizes = [-lr / b for b in bc1]
    if any(isinstance(s, Tensor) for s in sizes):
        # compiling: a foreach scalar list must hold numbers, so divide by tensors first
        torch._foreach_div_(denom, sizes)
        torch._foreach_add_(params, torch._foreach_div(exp_avgs, denom))
    else:
        torch._foreach_addcdiv_(params, exp_avgs, denom, sizes)
