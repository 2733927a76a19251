"""Triton launchers for the orthogonalisation hot path.

Each launcher has exactly the signature of its pure-torch counterpart in
:mod:`matrixopt.kernels.reference` and returns the same values up to
floating-point rounding:

* :func:`gram` -- ``X Xᵀ`` / ``Xᵀ X``, lower-triangle tiles only, mirrored on store;
* :func:`sym_poly` -- ``b·A + c·A²`` for symmetric ``A``, same triangle trick;
* :func:`poly_step` -- ``a·X + B·X`` or ``a·X + X·B``, GEMM with a fused epilogue.

All are batched over leading dimensions (one launch for the whole batch, int64
batch offsets), accept float16 / bfloat16 / float32, accumulate in float32 and
return the input dtype. Inputs are used through their strides; a copy is made
only when the leading dimensions cannot be flattened without one, or when
neither of the last two dimensions is contiguous.

The kernels run on CUDA tensors, or on any tensor under Triton's CPU
interpreter (``TRITON_INTERPRET=1``, for tests). The interpreter mode is read
at every call and the kernels are decorated lazily, once per mode, because
Triton fixes the mode of a function when it is decorated.

Importing this module imports triton; :mod:`matrixopt.linalg` imports it only
when it is about to use it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import triton
from torch import Tensor

from . import _gram, _poly
from . import interpreter_enabled as _interpreter_enabled

__all__ = ["gram", "sym_poly", "poly_step", "should_dispatch", "DISPATCH_MIN_SIZE"]

#: Short side (``min(m, n)``) from which :func:`should_dispatch` picks Triton.
#: A design value, NOT a measurement: no GPU was available when these kernels
#: were written. It follows published results (a triangular ``X Xᵀ`` Triton
#: kernel beating cuBLAS by 1.6–2.0× at 4096–8192, and tiles of 128 needing
#: at least 16×16 tiles to fill a 100+-SM GPU). Re-measure with
#: ``python benchmarks/bench_kernels.py`` on the target GPU and update it.
DISPATCH_MIN_SIZE = 2048

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# float32 goes to torch: with TF32 off (the reference's default), a Triton IEEE
# float32 dot runs on CUDA cores like cuBLAS's, so halving the flops is the only
# gain and the 16-bit tensor-core path is where the kernels are tuned.
_DISPATCH_DTYPES = (torch.float16, torch.bfloat16)


class _Kernels(NamedTuple):
    gram: Any
    sym_poly: Any
    poly: Any


@functools.cache
def _kernels(interpret: bool) -> _Kernels:
    """Decorate the kernel bodies for one mode (compiled or interpreted)."""
    if bool(triton.knobs.runtime.interpret) != interpret:  # pragma: no cover - guard
        raise RuntimeError("Triton interpreter mode changed while building the kernels")

    def build(body: Callable[..., None], configs: list[triton.Config],
              key: list[str]) -> Any:
        return triton.autotune(configs=configs, key=key)(triton.jit(body))

    return _Kernels(
        gram=build(_gram.gram_kernel, _gram.configs(interpret),
                   ["M", "K", "stride_xr", "stride_xk"]),
        sym_poly=build(_gram.sym_poly_kernel, _gram.configs(interpret),
                       ["M", "stride_am", "stride_an"]),
        poly=build(_poly.poly_kernel, _poly.configs(interpret),
                   ["M", "N", "K", "stride_pm", "stride_pk", "stride_qk", "stride_qn"]),
    )


def _check(fn: str, name: str, T: object, interpret: bool) -> Tensor:
    if not isinstance(T, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(T).__name__}")
    if T.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(
            f"{fn}: {name} has dtype {T.dtype}; the Triton kernels take float16, bfloat16 or "
            f"float32 (use matrixopt.kernels.reference.{fn} for other dtypes)")
    if T.ndim < 2:
        raise ValueError(f"{fn}: {name} must have shape [..., m, n], got {tuple(T.shape)}")
    if not interpret and T.device.type != "cuda":
        raise RuntimeError(
            f"{fn}: {name} is on device '{T.device}', but the Triton kernels need a CUDA tensor "
            f"(or TRITON_INTERPRET=1, Triton's CPU interpreter, meant for tests). Use "
            f"matrixopt.kernels.reference.{fn} for CPU tensors.")
    return T


def _as_batch(T: Tensor) -> Tensor:
    """``T`` as ``[batch, rows, cols]``, a view when possible, with a unit-stride matrix dim."""
    rows, cols = T.shape[-2:]
    T3 = T.reshape(math.prod(T.shape[:-2]), rows, cols)
    if T3.stride(-1) != 1 and T3.stride(-2) != 1 and T3.numel() > 0:
        T3 = T3.contiguous()
    return T3


def _mode_flags(interpret: bool, dtype: torch.dtype) -> dict[str, Any]:
    """Constexpr switches of the kernels; see :mod:`._gram` for why each exists."""
    return {
        "UPCAST": interpret,
        "ROUND_BF16": interpret and dtype == torch.bfloat16,
        "PRECISION": "ieee" if dtype == torch.float32 else "tf32",
    }


def gram(X: Tensor, *, transpose: bool = False) -> Tensor:
    r"""Symmetric Gram product :math:`X X^\top`, or :math:`X^\top X` if ``transpose``.

    ``X`` is ``[..., m, n]``; the result is ``[..., m, m]`` (``[..., n, n]``).
    Triton version of :func:`matrixopt.kernels.reference.gram`. Only the
    ``T(T+1)/2`` lower-triangle tiles of the ``T×T``-tile output are computed
    (``T = ceil(k / BLOCK)``) and each off-diagonal tile is also stored
    transposed, so the result is exactly symmetric and costs about
    :math:`m^2 n` flops instead of :math:`2 m^2 n`.
    """
    interpret = _interpreter_enabled()
    _check("gram", "X", X, interpret)
    batch = X.shape[:-2]
    X3 = _as_batch(X)
    B, m, n = X3.shape
    if transpose:
        M, K, s_r, s_k = n, m, X3.stride(2), X3.stride(1)
    else:
        M, K, s_r, s_k = m, n, X3.stride(1), X3.stride(2)
    out = torch.empty(B, M, M, dtype=X.dtype, device=X.device)
    if out.numel() > 0:
        kernel = _kernels(interpret).gram

        def grid(meta: dict[str, Any]) -> tuple[int]:
            t = triton.cdiv(M, meta["BLOCK"])
            return (B * t * (t + 1) // 2,)

        kernel[grid](X3, out, M, K, X3.stride(0), s_r, s_k,
                     out.stride(0), out.stride(1), out.stride(2),
                     **_mode_flags(interpret, X.dtype))
    return out.reshape(*batch, M, M)


def sym_poly(A: Tensor, b: float, c: float) -> Tensor:
    r"""Quadratic polynomial :math:`b A + c A^2` of a symmetric ``A`` (``[..., k, k]``).

    Triton version of :func:`matrixopt.kernels.reference.sym_poly`. ``A²`` is
    computed for the lower-triangle tiles only and mirrored (about :math:`k^3`
    flops instead of :math:`2 k^3`), so the result is exactly symmetric. ``A``
    must be symmetric: the upper triangle of the result is the transpose of the
    lower one, whatever ``A``'s upper triangle holds.
    """
    interpret = _interpreter_enabled()
    _check("sym_poly", "A", A, interpret)
    if A.shape[-1] != A.shape[-2]:
        raise ValueError(f"sym_poly: A must be square [..., k, k], got shape {tuple(A.shape)}")
    A3 = _as_batch(A)
    B, k, _ = A3.shape
    out = torch.empty(B, k, k, dtype=A.dtype, device=A.device)
    if out.numel() > 0:
        kernel = _kernels(interpret).sym_poly

        def grid(meta: dict[str, Any]) -> tuple[int]:
            t = triton.cdiv(k, meta["BLOCK"])
            return (B * t * (t + 1) // 2,)

        kernel[grid](A3, out, k, float(b), float(c),
                     A3.stride(0), A3.stride(1), A3.stride(2),
                     out.stride(0), out.stride(1), out.stride(2),
                     **_mode_flags(interpret, A.dtype))
    return out.reshape(A.shape)


def poly_step(X: Tensor, B: Tensor, a: float, *, right: bool = False) -> Tensor:
    r"""Polynomial update :math:`a X + B X`, or :math:`a X + X B` if ``right``.

    ``X`` is ``[..., m, n]``; ``B`` is ``[..., m, m]`` (left) or ``[..., n, n]`` (right).
    Triton version of :func:`matrixopt.kernels.reference.poly_step`: one GEMM
    (:math:`2 m^2 n` or :math:`2 m n^2` flops) whose epilogue adds ``a·X`` in
    float32 before the single rounding to the output dtype. ``X`` and ``B``
    must share dtype, device and leading (batch) dimensions.
    """
    interpret = _interpreter_enabled()
    _check("poly_step", "X", X, interpret)
    _check("poly_step", "B", B, interpret)
    if B.dtype != X.dtype or B.device != X.device:
        raise ValueError(
            f"poly_step: B ({B.dtype}, {B.device}) must match X ({X.dtype}, {X.device})")
    m, n = X.shape[-2:]
    side = n if right else m
    if B.shape[:-2] != X.shape[:-2] or B.shape[-2:] != (side, side):
        want = (*X.shape[:-2], side, side)
        raise ValueError(
            f"poly_step: B must have shape {want} for X of shape {tuple(X.shape)} "
            f"(right={right}), got {tuple(B.shape)}")
    X3, B3 = _as_batch(X), _as_batch(B)
    nb = X3.shape[0]
    out = torch.empty(nb, m, n, dtype=X.dtype, device=X.device)
    if out.numel() > 0:
        P, Q = (X3, B3) if right else (B3, X3)
        K = n if right else m
        kernel = _kernels(interpret).poly

        def grid(meta: dict[str, Any]) -> tuple[int]:
            return (nb * triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        kernel[grid](P, Q, X3, out, m, n, K, float(a),
                     P.stride(0), P.stride(1), P.stride(2),
                     Q.stride(0), Q.stride(1), Q.stride(2),
                     X3.stride(0), X3.stride(1), X3.stride(2),
                     out.stride(0), out.stride(1), out.stride(2),
                     **_mode_flags(interpret, X.dtype))
    return out.reshape(X.shape)


def should_dispatch(m: int, n: int, dtype: torch.dtype) -> bool:
    """Whether the Triton path should serve an ``m×n`` matrix of ``dtype`` on CUDA.

    True for float16 / bfloat16 when ``min(m, n) >= DISPATCH_MIN_SIZE`` (2048).
    The threshold is a design value that was NOT measured (no GPU was
    available); see :data:`DISPATCH_MIN_SIZE`. It only looks at the shape and
    dtype: the caller checks the device (:func:`matrixopt.kernels.is_available`).
    """
    if isinstance(m, bool) or not isinstance(m, int) or m < 0:
        raise ValueError(f"should_dispatch: m must be an int >= 0, got {m!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"should_dispatch: n must be an int >= 0, got {n!r}")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"should_dispatch: dtype must be a torch.dtype, got {dtype!r}")
    return dtype in _DISPATCH_DTYPES and min(m, n) >= DISPATCH_MIN_SIZE
