"""The one matrix-view helper: how an N-D parameter is seen as a batch of matrices."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

__all__ = ["MatrixView", "matrix_view", "VIEWS"]

#: Values of the ``matrix_view`` group key.
VIEWS = ("auto", "flatten", "batch")


class MatrixView(NamedTuple):
    """``b`` matrices of ``m × n``; ``batched``: the batch is a leading dim of the
    parameter (state keeps it), not one flattened matrix."""

    b: int
    m: int
    n: int
    batched: bool


def matrix_view(shape: Sequence[int], view: str = "auto") -> MatrixView:
    """``view="flatten"``: ``[out, in, *kernel]`` → one ``out × (in·∏kernel)`` matrix
    (convolutions; update scales must come from this flattened shape).
    ``view="batch"``: ``[*batch, rows, cols]`` → ``∏batch`` matrices (stacked MoE
    experts). ``"auto"``: 3-D → batch, ≥ 4-D → flatten. A 2-D shape is one matrix
    either way."""
    if len(shape) < 2:
        raise ValueError(f"a matrix view needs a parameter with >= 2 dims, got shape "
                         f"{tuple(shape)}")
    if view not in VIEWS:
        raise ValueError(f"matrix_view must be one of {list(VIEWS)}, got {view!r}")
    if len(shape) == 2:
        return MatrixView(1, int(shape[0]), int(shape[1]), False)
    if view == "auto":
        view = "batch" if len(shape) == 3 else "flatten"
    if view == "flatten":
        return MatrixView(1, int(shape[0]), int(math.prod(shape[1:])), False)
    return MatrixView(int(math.prod(shape[:-2])), int(shape[-2]), int(shape[-1]), True)
