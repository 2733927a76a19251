"""Triton bodies of the two symmetric products: the Gram matrix and ``b·A + c·A²``.

Both outputs are symmetric, so only the tiles on and below the diagonal are
computed; each off-diagonal tile is stored twice (once transposed). For a
``k×k`` output split into ``t = ceil(k / BLOCK)`` tiles per side that is
``t(t+1)/2`` tile products instead of ``t²``: about half the flops for large
``k`` (the saving behind the triangular XXᵀ kernels reported for Muon).

The functions here are *undecorated* kernel bodies. :mod:`.triton_ops` wraps
them with ``triton.jit`` / ``triton.autotune`` on first use, once per mode
(compiled or ``TRITON_INTERPRET=1``), because Triton fixes the mode when a
function is decorated; deferring the decoration lets the tests switch the
interpreter on for themselves without leaking it into other tests.

Conventions shared with :mod:`._poly`:

* the bodies call only Triton *builtins* (``tl.full``, not ``tl.zeros``; integer
  ``//``, not ``tl.cdiv``): the ``triton.language.standard`` helpers are
  themselves ``@triton.jit`` functions, decorated when triton is imported, and
  the interpreter cannot call compiled-mode ones, so using them would tie the
  interpreter mode to the moment triton was first imported;

* batch offsets are computed as ``pid_b.to(int64) * stride``: a batch of
  ``[320, 2560, 3072]`` has element offsets beyond 2³¹, which wrap around in
  the default int32 index arithmetic;
* accumulation is float32 (``tl.dot`` with a float32 accumulator);
* ``UPCAST`` (constexpr) converts the dot operands to float32 first. It is set
  only under the interpreter, where triton 3.9 evaluates ``tl.dot`` on bf16
  operands as an integer product of their raw bits;
* ``ROUND_BF16`` (constexpr, interpreter with bfloat16 output only) rounds
  the float32 result to bfloat16 by integer arithmetic: the triton 3.9
  interpreter's own float32 -> bfloat16 cast truncates, which would double the
  rounding error the tests measure, while the GPU conversion rounds to nearest
  even;
* ``PRECISION`` is ``"ieee"`` for float32 inputs (the torch reference does not
  use TF32 by default, and neither do we) and ``"tf32"`` otherwise, where it
  has no effect on 16-bit operands.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["gram_kernel", "sym_poly_kernel", "configs"]


def configs(interpret: bool) -> list[triton.Config]:
    """Autotune candidates for the square-tile triangular kernels.

    Compiled: 128×128 and 64×64 output tiles with 32/64-deep K slices and 3–5
    pipeline stages cover Ampere (A100: 164 KB shared memory, mma.sync) and
    Hopper (H100: 228 KB, wgmma wants 4-warp multiples and deep pipelines).
    Under the interpreter a single 16×16×16 tile (the smallest ``tl.dot``
    accepts) keeps CPU tests fast and still exercises several tiles, the
    triangle mapping and the edge masks on small matrices.
    """
    if interpret:
        return [triton.Config({"BLOCK": 16, "BLOCK_K": 16}, num_warps=1, num_stages=1)]
    return [
        triton.Config({"BLOCK": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK": 128, "BLOCK_K": 64}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK": 128, "BLOCK_K": 32}, num_warps=8, num_stages=5),
        triton.Config({"BLOCK": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK": 64, "BLOCK_K": 32}, num_warps=4, num_stages=5),
        triton.Config({"BLOCK": 64, "BLOCK_K": 128}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK": 32, "BLOCK_K": 64}, num_warps=2, num_stages=5),
    ]


def gram_kernel(
    X, C,
    M, K,
    stride_xb, stride_xr, stride_xk,
    stride_cb, stride_cm, stride_cn,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, ROUND_BF16: tl.constexpr, PRECISION: tl.constexpr,
):
    """``C[b] = L[b] L[b]ᵀ`` where ``L[b][r, k] = X[b*sxb + r*sxr + k*sxk]`` is ``M×K``.

    ``X Xᵀ`` and ``Xᵀ X`` are the same kernel with the row and K strides
    swapped. One program per (batch, lower-triangle tile): the grid is
    ``batch · T(T+1)/2`` with ``T = cdiv(M, BLOCK)``.
    """
    pid = tl.program_id(0)
    n_tiles = (M + BLOCK - 1) // BLOCK
    tiles = n_tiles * (n_tiles + 1) // 2
    pid_b = pid // tiles
    t = pid % tiles
    # Lower-triangle tile (i, j), j <= i, numbered row by row: t = i(i+1)/2 + j.
    # The float square root can be off by one near perfect squares; fix it.
    i = ((tl.sqrt(8.0 * t.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int32)
    i = tl.where(i * (i + 1) // 2 > t, i - 1, i)
    i = tl.where((i + 1) * (i + 2) // 2 <= t, i + 1, i)
    j = t - i * (i + 1) // 2

    rm = i * BLOCK + tl.arange(0, BLOCK)
    rn = j * BLOCK + tl.arange(0, BLOCK)
    rk = tl.arange(0, BLOCK_K)
    base = X + pid_b.to(tl.int64) * stride_xb
    a_ptrs = base + rm.to(tl.int64)[:, None] * stride_xr + rk[None, :] * stride_xk
    b_ptrs = base + rn.to(tl.int64)[None, :] * stride_xr + rk[:, None] * stride_xk
    a_row_ok = rm[:, None] < M
    b_col_ok = rn[None, :] < M

    acc = tl.full((BLOCK, BLOCK), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk < K - k0
        a = tl.load(a_ptrs, mask=a_row_ok & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=b_col_ok & k_ok[:, None], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_xk
        b_ptrs += BLOCK_K * stride_xk

    if ROUND_BF16:
        # The interpreter truncates float32 -> bfloat16; round to nearest even
        # by hand, as the GPU's conversion does, so tests see GPU numerics.
        bits = acc.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        c = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        c = acc.to(C.dtype.element_ty)
    cbase = C + pid_b.to(tl.int64) * stride_cb
    mask = a_row_ok & b_col_ok
    if i == j:
        # A diagonal tile's product is symmetric only up to the summation order of
        # the dot unit (numpy's BLAS under the interpreter, the MMA on a GPU): keep
        # its lower triangle and mirror it, so the output is exactly symmetric.
        c = tl.where(rm[:, None] >= rn[None, :], c, tl.trans(c))
    tl.store(cbase + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :] * stride_cn, c, mask=mask)
    if i != j:
        # Mirror: tile (j, i) is the transpose of tile (i, j).
        mask_t = (rn[:, None] < M) & (rm[None, :] < M)
        tl.store(cbase + rn.to(tl.int64)[:, None] * stride_cm + rm[None, :] * stride_cn,
                 tl.trans(c), mask=mask_t)


def sym_poly_kernel(
    A, C,
    M, coef_b, coef_c,
    stride_ab, stride_am, stride_an,
    stride_cb, stride_cm, stride_cn,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, ROUND_BF16: tl.constexpr, PRECISION: tl.constexpr,
):
    """``C[b] = coef_b·A[b] + coef_c·A[b]·A[b]`` for symmetric ``M×M`` ``A[b]``.

    Tile (i, j), j <= i, is the exact product of row panel i and column panel
    j; it is mirrored to (j, i), which is correct because A, and hence A², is
    symmetric.
    """
    pid = tl.program_id(0)
    n_tiles = (M + BLOCK - 1) // BLOCK
    tiles = n_tiles * (n_tiles + 1) // 2
    pid_b = pid // tiles
    t = pid % tiles
    i = ((tl.sqrt(8.0 * t.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int32)
    i = tl.where(i * (i + 1) // 2 > t, i - 1, i)
    i = tl.where((i + 1) * (i + 2) // 2 <= t, i + 1, i)
    j = t - i * (i + 1) // 2

    rm = i * BLOCK + tl.arange(0, BLOCK)
    rn = j * BLOCK + tl.arange(0, BLOCK)
    rk = tl.arange(0, BLOCK_K)
    base = A + pid_b.to(tl.int64) * stride_ab
    a_ptrs = base + rm.to(tl.int64)[:, None] * stride_am + rk[None, :] * stride_an
    b_ptrs = base + rk.to(tl.int64)[:, None] * stride_am + rn[None, :] * stride_an
    row_ok = rm[:, None] < M
    col_ok = rn[None, :] < M

    acc = tl.full((BLOCK, BLOCK), 0.0, tl.float32)
    for k0 in range(0, M, BLOCK_K):
        k_ok = rk < M - k0
        a = tl.load(a_ptrs, mask=row_ok & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_an
        b_ptrs += BLOCK_K * stride_am

    mask = row_ok & col_ok
    a_ij = tl.load(base + rm.to(tl.int64)[:, None] * stride_am + rn[None, :] * stride_an,
                   mask=mask, other=0.0).to(tl.float32)
    res = coef_b * a_ij + coef_c * acc
    if ROUND_BF16:  # see gram_kernel
        bits = res.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        c = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        c = res.to(C.dtype.element_ty)
    cbase = C + pid_b.to(tl.int64) * stride_cb
    if i == j:  # exactly symmetric diagonal tiles, see gram_kernel
        c = tl.where(rm[:, None] >= rn[None, :], c, tl.trans(c))
    tl.store(cbase + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :] * stride_cn, c, mask=mask)
    if i != j:
        mask_t = (rn[:, None] < M) & (rm[None, :] < M)
        tl.store(cbase + rn.to(tl.int64)[:, None] * stride_cm + rm[None, :] * stride_cn,
                 tl.trans(c), mask=mask_t)
