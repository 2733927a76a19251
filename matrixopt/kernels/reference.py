"""Pure-torch references for the kernels in :mod:`matrixopt.kernels`.

Each function here has the exact signature of its Triton launcher. They serve
three roles: the CPU / small-shape path of :func:`matrixopt.linalg.orthogonalize`,
the baseline of the kernel parity tests, and the baseline of
``benchmarks/bench_kernels.py``.

All functions are batched over leading dimensions and return the dtype of
their first input; products accumulate in at least float32 (torch's matmul does
for bf16/fp16 inputs).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["gram", "sym_poly", "poly_step"]


def gram(X: Tensor, *, transpose: bool = False) -> Tensor:
    r"""Symmetric Gram product.

    Returns :math:`X X^\top` (shape ``[..., m, m]``) or, with ``transpose=True``,
    :math:`X^\top X` (shape ``[..., n, n]``) for ``X`` of shape ``[..., m, n]``.
    Cost: :math:`2 m^2 n` (or :math:`2 n^2 m`) flops; a triangular kernel halves it.

    ``torch.bmm`` on the transposed view, not ``@``: ``matmul`` of 3-D operands
    folds them with ``reshape``, which materialises the transpose (a full copy
    of ``X`` per call, measured 5.8 ms of a 10 ms 768×3072 bf16 Gram product on
    one CPU thread); BLAS reads the transposed strides directly.
    """
    batch = X.shape[:-2]
    X3 = X.reshape(math.prod(batch), *X.shape[-2:])  # not -1: empty matrices
    out = torch.bmm(X3.mT, X3) if transpose else torch.bmm(X3, X3.mT)
    return out.reshape(*batch, *out.shape[-2:])


def sym_poly(A: Tensor, b: float, c: float) -> Tensor:
    r"""Quadratic polynomial of a symmetric matrix: :math:`b A + c A^2`.

    ``A`` has shape ``[..., k, k]`` and must be symmetric (``A @ A`` is then
    symmetric too, which a kernel may exploit). Cost: :math:`2 k^3` flops.
    """
    A3 = A.reshape(math.prod(A.shape[:-2]), *A.shape[-2:])  # not -1: empty matrices
    return torch.baddbmm(A3, A3, A3, beta=b, alpha=c).reshape(A.shape)


def poly_step(X: Tensor, B: Tensor, a: float, *, right: bool = False) -> Tensor:
    r"""One polynomial update: :math:`a X + B X`, or :math:`a X + X B` if ``right``.

    ``X`` is ``[..., m, n]``; ``B`` is ``[..., m, m]`` (left) or ``[..., n, n]``
    (right). The right-multiplied form serves tall matrices without
    materialising a transpose. Cost: :math:`2 m^2 n` (or :math:`2 m n^2`) flops.
    """
    batch = X.shape[:-2]
    X3 = X.reshape(math.prod(batch), *X.shape[-2:])  # not -1: empty matrices
    B3 = B.reshape(math.prod(B.shape[:-2]), *B.shape[-2:])
    if right:
        out = torch.baddbmm(X3, X3, B3, beta=a, alpha=1.0)
    else:
        out = torch.baddbmm(X3, B3, X3, beta=a, alpha=1.0)
    return out.reshape(*batch, *out.shape[-2:])
