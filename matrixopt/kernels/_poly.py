"""Triton body of the fused polynomial update ``out = a·D + P·Q``.

Both forms of :func:`matrixopt.kernels.reference.poly_step` are this one GEMM
with an epilogue, chosen by strides in the launcher:

* left,  ``a·X + B·X``: ``P = B`` (m×m), ``Q = X`` (m×n), ``D = X``;
* right, ``a·X + X·B``: ``P = X`` (m×n), ``Q = B`` (n×n), ``D = X``.

Fusing the ``a·X`` term into the epilogue saves one read-modify-write pass over
``X`` compared with ``torch.mm`` followed by ``add_`` (``torch.baddbmm`` fuses it
too; it is the baseline). See :mod:`._gram` for the int64 batch offsets, the
float32 accumulation and the ``UPCAST`` / ``ROUND_BF16`` / ``PRECISION`` switches.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["poly_kernel", "configs"]


def configs(interpret: bool) -> list[triton.Config]:
    """Autotune candidates (BLOCK_M × BLOCK_N output tiles, BLOCK_K slices).

    Compiled: the usual large-tile GEMM shapes for Hopper (128×256 / 256×128,
    8 warps, 3–4 stages) and Ampere (128×128 and 64×128, 4 warps, 4–5 stages),
    plus small tiles for short matrices where large tiles leave SMs idle.
    Interpreted: one 16×16×16 tile so that CPU tests stay fast.
    """
    if interpret:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2},
                              num_warps=1, num_stages=1)]
    big = [(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4),
           (128, 128, 32, 4, 4), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4),
           (64, 64, 64, 4, 4), (64, 64, 32, 2, 5), (32, 64, 32, 2, 5)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                          num_warps=w, num_stages=s) for bm, bn, bk, w, s in big]


def poly_kernel(
    P, Q, D, O,
    M, N, K, coef_a,
    stride_pb, stride_pm, stride_pk,
    stride_qb, stride_qk, stride_qn,
    stride_db, stride_dm, stride_dn,
    stride_ob, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr, ROUND_BF16: tl.constexpr, PRECISION: tl.constexpr,
):
    """``O[b] = coef_a·D[b] + P[b]·Q[b]``.

    ``P[b]`` is M×K, ``Q[b]`` K×N, ``D[b]`` and ``O[b]`` M×N.

    One program per (batch, output tile). Tiles are visited in groups of
    ``GROUP_M`` tile rows so that consecutive programs reuse the same column
    panels of ``Q`` from L2.
    """
    pid = tl.program_id(0)
    TILES_M = (M + BLOCK_M - 1) // BLOCK_M
    TILES_N = (N + BLOCK_N - 1) // BLOCK_N
    tiles = TILES_M * TILES_N
    pid_b = pid // tiles
    t = pid % tiles
    per_group = GROUP_M * TILES_N
    first_m = (t // per_group) * GROUP_M
    group_rows = tl.minimum(TILES_M - first_m, GROUP_M)
    tile_m = first_m + (t % per_group) % group_rows
    tile_n = (t % per_group) // group_rows

    rm = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    row_ok = rm[:, None] < M
    col_ok = rn[None, :] < N
    p_ptrs = (P + pid_b.to(tl.int64) * stride_pb
              + rm.to(tl.int64)[:, None] * stride_pm + rk[None, :] * stride_pk)
    q_ptrs = (Q + pid_b.to(tl.int64) * stride_qb
              + rk.to(tl.int64)[:, None] * stride_qk + rn[None, :] * stride_qn)

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk < K - k0
        p = tl.load(p_ptrs, mask=row_ok & k_ok[None, :], other=0.0)
        q = tl.load(q_ptrs, mask=k_ok[:, None] & col_ok, other=0.0)
        if UPCAST:
            p = p.to(tl.float32)
            q = q.to(tl.float32)
        acc = tl.dot(p, q, acc, input_precision=PRECISION)
        p_ptrs += BLOCK_K * stride_pk
        q_ptrs += BLOCK_K * stride_qk

    mask = row_ok & col_ok
    d = tl.load(D + pid_b.to(tl.int64) * stride_db
                + rm.to(tl.int64)[:, None] * stride_dm + rn[None, :] * stride_dn,
                mask=mask, other=0.0).to(tl.float32)
    res = coef_a * d + acc
    if ROUND_BF16:  # see _gram.py: the interpreter's bf16 cast truncates
        bits = res.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = res.to(O.dtype.element_ty)
    tl.store(O + pid_b.to(tl.int64) * stride_ob
             + rm.to(tl.int64)[:, None] * stride_om + rn[None, :] * stride_on, out, mask=mask)
