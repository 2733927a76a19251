r"""Natural GaLore's per-step math: the low-rank natural gradient by Woodbury.

Das, "Natural GaLore: Accelerating GaLore for memory-efficient LLM Training and
Fine-tuning" (arXiv 2410.16029; code selfsupervised-ai/Natural-GaLore). The
projected gradient of one matrix, flattened to :math:`g \in \mathbb{R}^k`
(:math:`k = r n` or :math:`m r`), is preconditioned by the inverse of the
empirical Fisher over a window of the :math:`s` most recent projected gradients
:math:`\Gamma = [g_t, g_{t-1}, \dots] \in \mathbb{R}^{k \times s}` (the current
one included), damped by :math:`\lambda`:

.. math::
    \tilde g = \hat F^{-1} g, \qquad \hat F = \lambda I_k + \Gamma\Gamma^\top
    \quad\Longrightarrow\quad
    \tilde g = \lambda^{-1}\big(g - \Gamma\,(\lambda I_s + \Gamma^\top\Gamma)^{-1}
    \Gamma^\top g\big)

(the Woodbury identity; no :math:`1/s` factor, as the paper's code). The
:math:`s \times s` system is solved by Cholesky in float64 (tiny; the
:math:`\lambda^{-1}` scaling makes float32 cancellation visible otherwise).
Cost per matrix: :math:`\Gamma^\top\Gamma` and :math:`\Gamma^\top g` (
:math:`k s^2 + k s` multiply-adds), :math:`\Gamma w` (:math:`k s`), Cholesky
:math:`s^3/3`; memory: the window, :math:`s k` floats (:math:`s` times the
projected gradient).

Unfilled window slots are zero columns of :math:`\Gamma`, which change neither
:math:`\hat F` nor :math:`\tilde g`: the first steps need no special case and no
data-dependent shape. Limits (derived): a window holding only :math:`g` gives
:math:`\tilde g = g/(\lambda + \|g\|^2)`; :math:`\lambda \to \infty` gives
:math:`\tilde g \to g/\lambda`, so Adam on :math:`\tilde g` with
:math:`\epsilon/\lambda` is Adam on :math:`g` with :math:`\epsilon` (plain GaLore).

**Row shards** (FSDP2, a right basis): :math:`g` and :math:`\Gamma` hold the
local rows; :math:`\Gamma^\top\Gamma` and :math:`\Gamma^\top g` are sums over
the rows, so they are summed over the shards with one all-reduce of
``[b, s, s + 1]`` (``reduce``); the rest is local.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .._nonfinite import StepFlags

__all__ = ["natural_direction", "window_push_"]

_OFF = StepFlags.off()


def window_push_(window: Tensor, g: Tensor, slot: int, flags: StepFlags = _OFF) -> None:
    """Write ``g`` ``[b, r1, r2]`` into ring slot ``slot`` of ``window``
    ``[b, r1, r2, s]`` in place; a skipped step (``flags`` entry 0) keeps the slot."""
    old = window[..., slot]
    old.copy_(flags.select(0, g.to(window.dtype), old))


def natural_direction(g: Tensor, window: Tensor, damping: float,
                      reduce: Callable[[Tensor], Tensor] | None = None,
                      slot: int | None = None) -> Tensor:
    r""":math:`\tilde g = (\lambda I + \Gamma\Gamma^\top)^{-1} g` per matrix (module docstring).

    Args:
        g: projected gradients ``[b, r1, r2]`` (each matrix one vector of ``r1·r2``).
        window: ``[b, r1, r2, s]``, the columns of :math:`\Gamma` (zeros where unfilled).
        damping: :math:`\lambda > 0`.
        reduce: ``g`` and ``window`` hold local rows; sums over rows run through it.
        slot: ``g`` is column ``slot`` of the window (as in the optimizer, which
            pushes first). Then :math:`g = \Gamma e` and
            :math:`\tilde g = \Gamma(\lambda I + \Gamma^\top\Gamma)^{-1} e`
            exactly, with no cancellation of :math:`g - \Gamma w` (which loses
            float32 digits when :math:`\lambda \ll \|\Gamma\|^2`).

    Returns ``[b, r1, r2]`` in the wider of ``g``'s dtype and float32.
    """
    b, r1, r2, s = window.shape
    wt = torch.promote_types(g.dtype, torch.float32)
    G = window.to(wt).reshape(b, r1 * r2, s)
    if slot is None:
        x = g.to(wt).reshape(b, r1 * r2, 1)
        AB = torch.bmm(G.mT, torch.cat([G, x], dim=-1))  # [b, s, s + 1]: ΓᵀΓ | Γᵀg
    else:
        AB = torch.bmm(G.mT, G)  # ΓᵀΓ
    if reduce is not None:
        AB = reduce(AB.contiguous())
    AB = AB.double()
    K = AB[..., :s] + damping * torch.eye(s, dtype=AB.dtype, device=AB.device)
    L = torch.linalg.cholesky_ex(K).L  # no host check: K is SPD (λ > 0)
    if slot is not None:
        e = torch.zeros(b, s, 1, dtype=AB.dtype, device=AB.device)
        e[:, slot] = 1.0
        return torch.bmm(G, torch.cholesky_solve(e, L).to(wt)).view(b, r1, r2)
    w = torch.cholesky_solve(AB[..., s:], L).to(wt)  # [b, s, 1]
    out = (x - torch.bmm(G, w)).div_(damping)
    return out.view(b, r1, r2)
