r"""SOAP: Adam in the eigenbasis of Shampoo's Kronecker factors, as pure functions.

Vyas et al. 2024, "SOAP: Improving and Stabilizing Shampoo using Adam"
(arXiv:2409.11321; official code nikhilvyas/SOAP). For a tensor :math:`G` (after
the optional dimension merge) with one factor :math:`P_k` and basis :math:`Q_k`
per preconditioned dim :math:`k`, :math:`\mathcal{R}(X) = X \times_k Q_k`
(contract dim :math:`k` with :math:`Q_k`, for every preconditioned dim) and
:math:`\mathcal{R}^{-1}(X) = X \times_k Q_k^\top`:

.. math::
    G' &= \mathcal{R}(G), \qquad M' \leftarrow \beta_1 M' + (1-\beta_1) G',\qquad
    V \leftarrow \beta_2 V + (1-\beta_2)\, G'\odot G' \\
    U &= \mathcal{R}^{-1}\!\big(M' \oslash (\sqrt V + \epsilon)\big),\quad
    W \leftarrow \big(W - \eta\,\tfrac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\,U\big)(1-\eta\lambda) \\
    P_k &\leftarrow \beta_s P_k + (1-\beta_s)\, G_{(k)} G_{(k)}^\top
    \quad\text{(after the weight step; every } f \text{ steps } Q_k \text{ is
    refreshed, } V \text{ permuted alike and } M' \text{ re-expressed in the new basis)}

The momentum :math:`M'` lives in the rotated space, as in the current official
code; but where that code rotates it back and forth around *every* factor update,
here it is re-expressed only when a basis changes (:func:`soap_rebase_`, every
``f`` steps): identical in exact arithmetic, two rotations per step instead of
four. The first call only initialises :math:`P_k` and
:math:`Q_k = \operatorname{eigh}(P_k)`; the weights are not touched and the step
counter stays 0.

Cost per step and tensor of shape :math:`d_1\times\dots\times d_r` with
:math:`N = \prod d_k`: two rotations and the factor products, about
:math:`6N\sum_k d_k` flops (the official code: :math:`10N\sum_k d_k`); a refresh
adds one matmul and one QR per factor (:func:`~matrixopt.linalg.eigh_refresh`)
and two rotations of :math:`M'`.

``flags`` (:class:`~matrixopt.optim._nonfinite.StepFlags`) folds the
``nonfinite="skip"`` policy into every write (gradients must be the flags' safe
ones): a skipped tensor keeps weights, moments and factors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._nonfinite import StepFlags
from .adam import bias_corrections

__all__ = ["merged_shape", "preconditioned_dims", "rotate", "factor_products", "soap_updates_",
           "soap_factors_", "permute_moment_", "soap_rebase_"]

_OFF = StepFlags.off()
Bases = Sequence[Tensor | None]


def merged_shape(shape: Sequence[int], max_precond_dim: int, merge_dims: bool
                 ) -> tuple[int, ...]:
    """The shape SOAP preconditions: ``shape`` itself, or with ``merge_dims`` the dims
    merged left to right while the product stays ``<= max_precond_dim`` (a new merged
    dim opens when it would exceed; a single dim above the limit stays alone), as the
    official code (channels-first)."""
    shape = tuple(int(s) for s in shape)
    if not merge_dims or len(shape) <= 1:
        return shape
    out: list[int] = []
    cur = 1
    for s in shape:
        if cur * s > max_precond_dim:
            if cur > 1:
                out.append(cur)
                cur = s
            else:
                out.append(s)
                cur = 1
        else:
            cur *= s
    if cur > 1 or not out:
        out.append(cur)
    return tuple(out)


def preconditioned_dims(shape: Sequence[int], max_precond_dim: int, precondition_1d: bool
                        ) -> list[bool]:
    """Per dim of the (merged) ``shape``: whether it gets a factor (size at most
    ``max_precond_dim``; a 1-D tensor only with ``precondition_1d``)."""
    if len(shape) == 1 and not precondition_1d:
        return [False]
    return [int(s) <= max_precond_dim for s in shape]


def rotate(x: Tensor, bases: Bases, back: bool = False) -> Tensor:
    """``x`` (in the merged shape, or with one extra leading batch dim) with each dim ``k``
    contracted with ``bases[k]`` (``x ×_k Q_k``; ``back``: with ``Q_kᵀ``); ``None``
    entries are the identity."""
    off = x.ndim - len(bases)
    for k, Q in enumerate(bases):
        if Q is None:
            continue
        d = k + off
        x = torch.movedim(torch.movedim(x, d, -1) @ (Q.mT if back else Q), -1, d)
    return x


def factor_products(x: Tensor, dims: Sequence[bool]) -> list[Tensor | None]:
    r""":math:`X_{(k)} X_{(k)}^\top` (contraction over every dim but ``k``) for the
    preconditioned dims of ``x`` (merged shape), ``None`` elsewhere."""
    out: list[Tensor | None] = []
    for k, on in enumerate(dims):
        if not on:
            out.append(None)
            continue
        Xk = torch.movedim(x, k, 0).reshape(x.shape[k], -1)
        out.append(Xk @ Xk.T)
    return out


def soap_updates_(grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                  bases: Sequence[Bases], steps: list[Tensor], shapes: list[tuple[int, ...]], *,
                  beta1: float, beta2: float, eps: float, correct_bias: bool,
                  normalize_grads: bool, flags: StepFlags = _OFF) -> tuple[list[Tensor],
                                                                          list[Any]]:
    r"""Advance the counters and moments in place; return the updates ``U`` (shaped like
    the gradients) and their step multipliers :math:`\sqrt{1-\beta_2^t}/(1-\beta_1^t)`
    (1 without ``correct_bias``), zero for skipped entries.

    ``grads``, ``exp_avgs``, ``exp_avg_sqs`` share one shape per entry and dtype
    (float32/float64); both moments are in the rotated space; ``shapes[i]`` is the
    merged shape the bases act on.
    """
    if not grads:
        return [], []
    torch._foreach_add_(steps, 1.0)
    rot = [rotate(g.reshape(s), b).reshape(g.shape) for g, b, s in zip(grads, bases, shapes)]
    flags.lerp_(exp_avgs, rot, 1.0 - beta1)
    flags.mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, rot, rot, 1.0 - beta2)
    del rot
    updates: list[Tensor] = []
    for m, v, b, s in zip(exp_avgs, exp_avg_sqs, bases, shapes):
        U = rotate((m / (v.sqrt() + eps)).reshape(s), b, back=True).reshape(m.shape)
        if normalize_grads:
            U = U / (1e-30 + U.square().mean().sqrt())
        updates.append(U)
    if correct_bias:
        bc1, bc2 = bias_corrections(steps, beta1, beta2)
        sizes: list[Any] = [math.sqrt(b2) / b1 for b1, b2 in zip(bc1, bc2)]
    else:
        sizes = [1.0] * len(grads)
    return updates, flags.weights(sizes, 0.0, updates)


def soap_factors_(grads: list[Tensor], factors: list[list[Tensor]],
                  products: list[list[Tensor]], beta: float, flags: StepFlags = _OFF) -> None:
    r""":math:`P \leftarrow \beta P + (1-\beta)\,GG^\top` for every factor in place
    (``products[i][j]`` the product of entry ``i`` matching ``factors[i][j]``; skipped
    entries keep their factors). ``grads`` only sets the flags' indexing."""
    for i in range(len(grads)):
        if factors[i]:
            flags.subset([i] * len(factors[i])).lerp_(factors[i], products[i], 1.0 - beta)


def permute_moment_(v: Tensor, perms: Sequence[Tensor | None], shape: tuple[int, ...]
                    ) -> None:
    """Reorder ``v`` (viewed in the merged ``shape``) along each dim ``k`` by
    ``perms[k]`` in place: the second moment follows the refreshed basis columns."""
    x = v.reshape(shape)
    for k, p in enumerate(perms):
        if p is not None:
            x = torch.index_select(x, k, p)
    v.copy_(x.reshape(v.shape))


def soap_rebase_(exp_avg: Tensor, old: Bases, new: Bases, shape: tuple[int, ...]) -> None:
    r"""Re-express the rotated momentum in refreshed bases in place:
    :math:`M' \leftarrow \mathcal{R}_{new}(\mathcal{R}_{old}^{-1}(M'))` (entries of
    ``new`` that are ``None`` are unchanged dims)."""
    x = rotate(exp_avg.reshape(shape), old, back=True)
    exp_avg.copy_(rotate(x, new).reshape(exp_avg.shape))
