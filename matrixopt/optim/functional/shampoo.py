r"""Shampoo on whole matrices, block by block (Distributed Shampoo's semantics).

Gupta et al. 2018, "Shampoo: Preconditioned Stochastic Tensor Optimization";
Shi et al. 2023, "A Distributed Data-Parallel PyTorch Implementation of the
Distributed Shampoo Optimizer" (arXiv:2309.06497); MKOR: Mozaffari et al. 2023
(arXiv:2306.01685). A matrix :math:`W` (``b`` matrices of ``m × n``) is cut into
blocks of at most ``max_preconditioner_dim`` per side (the last block of a side
zero-padded, which leaves the block's math unchanged: its factors gain a zero
border, whose root is never applied to a non-zero entry). Per block, with gradient
:math:`G` and step :math:`t`:

.. math::
    L &\leftarrow \beta_2 L + w\,GG^\top,\quad R \leftarrow \beta_2 R + w\,G^\top G
        \quad (w = 1 \text{ if } \beta_2 = 1 \text{ else } 1-\beta_2)\\
    X_L &\leftarrow (\hat L + \epsilon I)^{-e_L},\ X_R \leftarrow (\hat R + \epsilon I)^{-e_R}
        \quad\text{every } f \text{ steps from } t_0\ (\hat F = F/(1-\beta_2^t))\\
    \tilde G &\leftarrow \beta_1 \tilde G + (1-\beta_1) G,\quad
        \bar G = \tilde G/(1-\beta_1^t)\\
    P &= X_L \bar G X_R \cdot \frac{\|\operatorname{graft}(\bar G)\|_F}{\|X_L\bar G X_R\|_F
        + 10^{-16}} \quad (t \ge t_0;\ \operatorname{graft}(\bar G)\text{ before})\\
    W &\leftarrow W(1-\eta\lambda) - \eta P

with :math:`e_L = e_R = 1/4` by default. ``inverse_update="mkor"`` keeps
:math:`X = (\hat F + \epsilon I)^{-1}` (exponent 1) and, between refreshes,
updates it by Sherman–Morrison with a rank-1 estimate :math:`vv^\top \approx GG^\top`
(:func:`rank1_vectors`) instead of leaving it stale. Cost per block and step: two
Gram products (:math:`2(b_m^2 b_n + b_m b_n^2)` flops) and two preconditioner
products; per refresh an inverse root per factor (:math:`\approx 9 b^3` by eigh,
:math:`\approx 8 k b^3` for ``k`` Newton iterations); per MKOR update
:math:`O(b^2)`.

Non-finite or failing roots never reach the weights: a block whose factor or new
root is not finite keeps its previous root (the identity before the first) and is
counted in ``fallbacks``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ...linalg.matrix_functions import inv_root, sherman_morrison

__all__ = ["BlockLayout", "block_layout", "to_blocks", "from_blocks", "ShampooBuffers",
           "ShampooHyper", "rank1_vectors", "shampoo_directions", "GRAFTING"]

#: Values of the ``grafting`` group key.
GRAFTING = (None, "adam", "rmsprop", "adagrad", "sgd")


class BlockLayout(NamedTuple):
    """``rm × rn`` blocks of ``bm × bn`` per matrix (the last ones zero-padded)."""

    rm: int
    bm: int
    rn: int
    bn: int


def _side(d: int, max_dim: int) -> tuple[int, int]:
    if d <= max_dim:
        return 1, d
    return -(-d // max_dim), max_dim


def block_layout(m: int, n: int, max_dim: int) -> BlockLayout:
    """The block grid of an ``m × n`` matrix with at most ``max_dim`` rows/cols a block."""
    rm, bm = _side(m, max_dim)
    rn, bn = _side(n, max_dim)
    return BlockLayout(rm, bm, rn, bn)


def to_blocks(X: Tensor, lay: BlockLayout) -> Tensor:
    """``[b, m, n]`` → ``[b·rm·rn, bm, bn]`` (zero-padded)."""
    b, m, n = X.shape
    M, N = lay.rm * lay.bm, lay.rn * lay.bn
    if (M, N) != (m, n):
        X = torch.nn.functional.pad(X, (0, N - n, 0, M - m))
    return (X.reshape(b, lay.rm, lay.bm, lay.rn, lay.bn).transpose(2, 3)
            .reshape(b * lay.rm * lay.rn, lay.bm, lay.bn))


def from_blocks(Xb: Tensor, lay: BlockLayout, m: int, n: int) -> Tensor:
    """Inverse of :func:`to_blocks`: ``[b, m, n]``."""
    b = Xb.shape[0] // (lay.rm * lay.rn)
    X = (Xb.reshape(b, lay.rm, lay.rn, lay.bm, lay.bn).transpose(2, 3)
         .reshape(b, lay.rm * lay.bm, lay.rn * lay.bn))
    return X[:, :m, :n]


@dataclass
class ShampooBuffers:
    """One parameter's tensors (blocked ones ``[blocks, ·, ·]``); ``None`` = not kept.

    ``L``/``R`` factors and ``XL``/``XR`` their inverse roots (or inverses for MKOR),
    ``exp_avg`` the filtered gradient and ``graft`` the grafting second moment (both
    shaped ``[b, m, n]``), ``fallbacks`` an int64 count of blocks whose root fell back.
    """

    L: Tensor | None
    R: Tensor | None
    XL: Tensor | None
    XR: Tensor | None
    exp_avg: Tensor | None
    graft: Tensor | None
    fallbacks: Tensor


@dataclass(frozen=True)
class ShampooHyper:
    """A group's hyperparameters as the math reads them."""

    beta1: float
    beta2: float
    epsilon: float
    exponents: tuple[float, float]
    precondition_frequency: int
    start_preconditioning_step: int
    grafting: str | None
    grafting_beta2: float
    grafting_epsilon: float
    bias_correction: bool
    inverse_update: str
    root_method: str
    newton_iters: int | None


def _ema_weight(beta: float) -> float:
    return 1.0 if beta == 1.0 else 1.0 - beta


def refresh_due(t: int, h: ShampooHyper) -> bool:
    """Whether step ``t`` (1-based) recomputes the roots."""
    s = h.start_preconditioning_step
    return t == s or (t > s and t % h.precondition_frequency == 0)


def rank1_vectors(Gb: Tensor) -> tuple[Tensor, Tensor]:
    r"""MKOR's rank-1 vectors of a block batch ``[k, bm, bn]``: one power-iteration step
    from the row sums, :math:`r = G^\top G\mathbf 1/\|\cdot\|`, :math:`v_L = Gr`,
    :math:`v_R = G^\top v_L/\|v_L\|`, so :math:`v_Lv_L^\top \approx \sigma_1^2u_1u_1^\top`
    (the top of :math:`GG^\top`) and likewise :math:`v_Rv_R^\top` of :math:`G^\top G`."""
    s = Gb.sum(-1, keepdim=True)                      # [k, bm, 1]
    r = Gb.mT @ s
    r = r / r.norm(dim=-2, keepdim=True).clamp_min(1e-30)
    vL = Gb @ r                                       # [k, bm, 1]
    vR = Gb.mT @ (vL / vL.norm(dim=-2, keepdim=True).clamp_min(1e-30))
    return vL.squeeze(-1), vR.squeeze(-1)


def _refresh(F: Tensor, X: Tensor, e: float, bc: float, h: ShampooHyper,
             ok: Tensor | None) -> Tensor:
    """Recompute ``X`` from ``F`` where possible; returns the number of blocks that kept
    their previous root (non-finite factor or root)."""
    Fh = F / bc if bc != 1.0 else F
    finite_f = torch.isfinite(Fh).all(dim=(-2, -1))
    eye = torch.eye(F.shape[-1], dtype=F.dtype, device=F.device)
    Fs = torch.where(finite_f[:, None, None], Fh, eye)  # eigh must not see NaN
    p = 1.0 / e
    iters = h.newton_iters
    if h.root_method == "newton" and iters is None:
        from ...linalg.matrix_functions import newton_iterations
        iters = newton_iterations(int(round(p)), 1e6)
    cand = inv_root(Fs, round(p) if h.root_method == "newton" else p, method=h.root_method,
                    eps=h.epsilon, iters=iters if h.root_method == "newton" else None)
    good = finite_f & torch.isfinite(cand).all(dim=(-2, -1))
    use = good if ok is None else good & ok
    X.copy_(torch.where(use[:, None, None], cand, X))
    bad = good.logical_not() if ok is None else good.logical_not() & ok
    return bad.sum()


def _mkor(X: Tensor, v: Tensor, gamma: float, c: float, ok: Tensor | None) -> None:
    cand = sherman_morrison(X, v, decay=gamma, weight=c)
    good = torch.isfinite(cand).all(dim=(-2, -1))
    if ok is not None:
        good = good & ok
    X.copy_(torch.where(good[:, None, None], cand, X))


def shampoo_directions(grads: list[Tensor], bufs: list[ShampooBuffers],
                       layouts: list[BlockLayout], steps: list[int], h: ShampooHyper,
                       ok: list[Tensor] | None = None) -> list[Tensor]:
    r"""Advance every buffer by one step and return the update directions :math:`P`.

    Args:
        grads: ``[b, m, n]`` (safe) gradients in the work dtype (float32/float64).
        bufs: each parameter's :class:`ShampooBuffers` (updated in place).
        layouts: each parameter's :class:`BlockLayout`.
        steps: each parameter's step :math:`t` after the increment (1-based).
        h: hyperparameters.
        ok: per parameter a 0-dim bool (``nonfinite="skip"``): where false, no
            buffer changes and the direction is zero.
    Returns:
        ``[b, m, n]`` directions in the work dtype.
    """
    out: list[Tensor] = []
    eL, eR = h.exponents
    for i, (G, B, lay, t) in enumerate(zip(grads, bufs, layouts, steps)):
        f = None if ok is None else ok[i]

        def w(value: float, off: float, f: Tensor | None = f, like: Tensor = G
              ) -> Tensor | float:
            """``value`` where this parameter's gradient is finite, else ``off``."""
            if f is None:
                return value
            return torch.where(f, torch.full((), value, dtype=like.dtype, device=like.device),
                               off)

        m, n = G.shape[-2:]
        Gb = to_blocks(G, lay)
        # 1. factors
        d2, w2 = w(h.beta2, 1.0), w(_ema_weight(h.beta2), 0.0)
        if B.L is not None:
            B.L.mul_(d2).add_((Gb @ Gb.mT).mul_(w2))
        if B.R is not None:
            B.R.mul_(d2).add_((Gb.mT @ Gb).mul_(w2))
        if B.graft is not None:
            gb2 = 1.0 if h.grafting == "adagrad" else h.grafting_beta2
            B.graft.mul_(w(gb2, 1.0)).add_(G.square().mul_(w(_ema_weight(gb2), 0.0)))
        # 2. roots: refresh, or MKOR's rank-1 updates in between
        bc2 = 1.0 - h.beta2 ** t if (h.bias_correction and h.beta2 < 1.0) else 1.0
        precondition = t >= h.start_preconditioning_step
        if precondition and refresh_due(t, h):
            for F, X, e in ((B.L, B.XL, eL), (B.R, B.XR, eR)):
                if F is not None and X is not None:
                    B.fallbacks.add_(_refresh(F, X, e, bc2, h, f))
        elif precondition and h.inverse_update == "mkor":
            prev = 1.0 - h.beta2 ** (t - 1) if bc2 != 1.0 else 1.0
            gamma, c = h.beta2 * prev / bc2, _ema_weight(h.beta2) / bc2
            vL, vR = rank1_vectors(Gb)
            if B.XL is not None:
                _mkor(B.XL, vL, gamma, c, f)
            if B.XR is not None:
                _mkor(B.XR, vR, gamma, c, f)
        # 3. filtered gradient
        if B.exp_avg is not None:
            B.exp_avg.lerp_(G, w(1.0 - h.beta1, 0.0))
            Gbar = B.exp_avg / (1.0 - h.beta1 ** t) if h.bias_correction else B.exp_avg
        else:
            Gbar = G
        # 4. grafting direction
        graft: Tensor | None = None
        if h.grafting == "sgd":
            graft = Gbar
        elif B.graft is not None:
            bcg = 1.0 - h.grafting_beta2 ** t if h.grafting == "adam" else 1.0
            graft = Gbar / ((B.graft / bcg).sqrt() + h.grafting_epsilon)
        if not precondition:
            out.append(graft if graft is not None else Gbar.clone())
            continue
        # 5. preconditioned direction, per block grafted
        Pb = to_blocks(Gbar, lay)
        if B.XL is not None:
            Pb = B.XL @ Pb
        if B.XR is not None:
            Pb = Pb @ B.XR
        if graft is not None:
            gn = to_blocks(graft, lay).norm(dim=(-2, -1), keepdim=True)
            Pb = Pb * (gn / (Pb.norm(dim=(-2, -1), keepdim=True) + 1e-16))
        out.append(from_blocks(Pb, lay, m, n))
    return out


def exponents_for(override: float | tuple[float, float] | None, inverse_update: str
                  ) -> tuple[float, float]:
    """Per-side exponents ``(e_L, e_R)`` (0 switches a side off): the override, else
    1/4 each (Shampoo on a matrix), or 1 each for MKOR (it keeps inverses)."""
    if override is None:
        return (1.0, 1.0) if inverse_update == "mkor" else (0.25, 0.25)
    if isinstance(override, (tuple, list)):
        return float(override[0]), float(override[1])
    return float(override), float(override)


def is_integer_root(e: float) -> bool:
    """Whether ``1/e`` is an integer (what the Newton route needs)."""
    return e > 0 and abs(1.0 / e - round(1.0 / e)) < 1e-9 and math.isfinite(1.0 / e)
