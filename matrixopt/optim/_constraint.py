r"""The ``weight_constraint`` group option of every ``MatrixOptimizer``.

After a group's step, each of its parameters with ≥ 2 dims (seen as matrices by
:func:`~matrixopt.optim._views.matrix_view`, the group's ``matrix_view`` if it has
one) is projected with a :mod:`matrixopt.linalg.spectral` constraint at the
group's ``max_sv`` (Newhouse et al. 2025, "Training Transformers with Enforced
Lipschitz Constants", arXiv 2507.13338: the constraint is applied to the weights
after every optimizer step):

* ``"spectral_cap"``: :func:`~matrixopt.linalg.spectral_cap` (σ ↦ ≈min(σ, max_sv));
* ``"spectral_soft_cap"``: ``spectral_cap(..., soft=True)``;
* ``"spectral_normalize"``: :func:`~matrixopt.linalg.spectral_normalize`.

Matrices of one shape are projected as one batch; a matrix already under the cap
is left bitwise unchanged. Cost: about one ``orthogonalize`` per matrix (the
caps), ``O(mn)`` (normalize). With ``nonfinite="skip"`` a parameter whose gradient
held NaN/Inf is not projected either (its step was skipped). 1-D parameters are
never constrained. Not supported for FSDP2 (DTensor) parameters: the cap needs
whole matrices.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..linalg.spectral import spectral_cap, spectral_normalize
from ._views import matrix_view

__all__ = ["WEIGHT_CONSTRAINTS", "apply_weight_constraint"]

#: Values of the ``weight_constraint`` group key.
WEIGHT_CONSTRAINTS = (None, "spectral_cap", "spectral_soft_cap", "spectral_normalize")


@torch.no_grad()
def apply_weight_constraint(group: dict[str, Any], params: list[Tensor]) -> None:
    """Project the ≥ 2-D ``params`` (stepped members of ``group``) in place."""
    kind = group.get("weight_constraint")
    if kind is None:
        return
    cap = float(group["max_sv"])
    skip = group.get("nonfinite") == "skip"
    by_shape: dict[tuple[tuple[int, ...], torch.dtype, torch.device], list[Tensor]] = {}
    for p in params:
        if p.ndim >= 2:
            by_shape.setdefault((tuple(p.shape), p.dtype, p.device), []).append(p)
    for (shape, _, _), ps in by_shape.items():
        b, m, n, _ = matrix_view(shape, group.get("matrix_view", "auto"))
        W = torch.stack([p.reshape(b, m, n) for p in ps])
        if kind == "spectral_normalize":
            out = spectral_normalize(W, cap)
        else:
            out = spectral_cap(W, cap, soft=kind == "spectral_soft_cap")
        if skip:  # the step of a parameter with a non-finite gradient was skipped
            ok = torch.stack([torch.isfinite(p.grad).all() if p.grad is not None
                              else torch.ones((), dtype=torch.bool, device=p.device)
                              for p in ps])
            out = torch.where(ok.view(-1, 1, 1, 1), out, W)
        for p, o in zip(ps, out):
            p.copy_(o.reshape(p.shape))
