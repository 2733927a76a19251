r"""The operator Muon applies to its momentum direction: Newton–Schulz or a cheap alternative.

``Muon(..., orthogonalizer=...)`` picks one of
:data:`~matrixopt.linalg.operators.OPERATORS`:

* ``"newton_schulz"``: :func:`~matrixopt.linalg.orthogonalize` (the group's
  ``coefficients``, ``ns_steps``, ...), through the distribution strategy's
  whole-matrix path (:meth:`~matrixopt.optim._dist.Strategy.orthogonalize`).
* ``"hybrid_auon"``: :func:`~matrixopt.linalg.hybrid_auon` with ``ns_steps``
  (default 1) Keller steps in ``ns_dtype``; it needs whole matrices, so it takes
  the same strategy path (split over ranks under DDP, all-to-all under FSDP2).
* ``"auon"`` and ``"racs"``: :func:`~matrixopt.linalg.auon` /
  :func:`~matrixopt.linalg.racs` are elementwise plus row/column sums, so they
  run where the data is: on every rank without communication for whole tensors
  (one process, DDP), and on the local rows under FSDP2 with their sums
  all-reduced (:func:`~matrixopt.optim._distributed.row_shards`; column sums and
  norms: ``racs`` 5 small all-reduces per matrix, ``auon`` 3). Parameters whose
  matrices are not row blocks of the shard (stacked experts, ``split``) take
  the strategy's whole-matrix path instead.

The alternatives return unit-Frobenius directions; they are multiplied by
:math:`\sqrt{\min(m, n)}`, the Frobenius norm of a full-rank
:math:`\operatorname{msign}`, so ``lr``, ``adjust_lr`` and ``weight_decay`` keep
their meaning (the update RMS matches Newton–Schulz's when the momentum has
full rank).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..linalg.operators import OPERATORS, auon, hybrid_auon, racs
from ._dist import Strategy
from ._distributed import row_shards

__all__ = ["OPERATORS", "apply_orthogonalizer"]

Orth = Callable[[Tensor], Tensor]


def _msign_scale(X: Tensor, m: int, n: int) -> Tensor:
    return X * math.sqrt(min(m, n))


def _batched(fn: Orth, mats: list[Tensor]) -> list[Tensor]:
    """``fn`` of every ``[b, m, n]`` tensor, one call per (shape, dtype): the elementwise
    operators cost a few passes each, so the per-call overhead matters at small sizes."""
    groups: dict[tuple[object, ...], list[int]] = {}
    for i, X in enumerate(mats):
        groups.setdefault((tuple(X.shape[-2:]), X.dtype), []).append(i)
    out: list[Tensor | None] = [None] * len(mats)
    for idx in groups.values():
        if len(idx) == 1:
            out[idx[0]] = fn(mats[idx[0]])
            continue
        res = fn(torch.cat([mats[i] for i in idx]))
        for i, part in zip(idx, res.split([mats[i].shape[0] for i in idx])):
            out[i] = part
    return [o for o in out if o is not None]


def apply_orthogonalizer(strategy: Strategy, group: dict[str, Any], dirs: list[Tensor],
                         views: Sequence[tuple[int, int, int]],
                         full_shapes: Sequence[torch.Size], orth: Orth,
                         comm_dtype: torch.dtype | None) -> list[Tensor]:
    """The group's ``orthogonalizer`` applied to the local directions ``dirs`` (viewed as
    ``views[i]`` = ``(b, m, n)`` of the whole parameter ``full_shapes[i]``); ``orth`` and
    ``comm_dtype`` are Newton–Schulz's. Returns tensors shaped like ``dirs`` or ``views``."""
    name = group["orthogonalizer"]
    if name == "newton_schulz":
        return strategy.orthogonalize(dirs, views, full_shapes, orth, comm_dtype=comm_dtype)
    if name == "hybrid_auon":
        steps = group["ns_steps"] or 1

        def hybrid(X: Tensor) -> Tensor:
            return _msign_scale(hybrid_auon(X, steps=steps, dtype=group["ns_dtype"]),
                                *X.shape[-2:])
        return strategy.orthogonalize(dirs, views, full_shapes, hybrid)
    assert name in OPERATORS
    op = auon if name == "auon" else racs

    def whole(X: Tensor) -> Tensor:
        return _msign_scale(op(X), *X.shape[-2:])

    if not strategy.sharded:
        return _batched(whole, [d.reshape(v) for d, v in zip(dirs, views)])
    out: list[Tensor | None] = [None] * len(dirs)
    rest = []
    for i, (d, (b, m, n), shape) in enumerate(zip(dirs, views, full_shapes)):
        if b == 1 and shape[0] == m:  # a plain matrix: this rank holds a block of its rows
            shards = row_shards(strategy.ctx, m)  # type: ignore[attr-defined]
            out[i] = _msign_scale(op(d.reshape(1, -1, n), shards=shards), m, n)
        else:
            rest.append(i)
    if rest:
        done = strategy.orthogonalize([dirs[i] for i in rest], [views[i] for i in rest],
                                      [full_shapes[i] for i in rest], whole)
        for i, o in zip(rest, done):
            out[i] = o
    return [o for o in out if o is not None]
