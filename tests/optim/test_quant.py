"""Block-wise 8-bit quantisation: code construction, error bound, zeros, signs,
block independence, non-finite blocks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from matrixopt.optim._quant import (
    BLOCK,
    code_error_bound,
    dequantize_blockwise,
    dynamic_code,
    nonfinite_blocks,
    quantize_blockwise,
)


def test_code_construction_by_hand():
    s, u = dynamic_code(True).double(), dynamic_code(False).double()
    assert s.numel() == 255 and u.numel() == 256
    assert torch.equal(s, -s.flip(0))                       # symmetric
    assert s[127] == 0 and u[0] == 0 and s[-1] == 1 and u[-1] == 1
    # top decade of the signed code: 64 values 0.1 + 0.9 (j+1)/64; smallest magnitude 1e-6
    top = torch.tensor([0.1 + 0.9 * (j + 1) / 64 for j in range(64)], dtype=torch.float64)
    assert torch.allclose(s[-64:], top, rtol=0, atol=1e-7)
    assert math.isclose(float(s[128]), 1e-6, rel_tol=1e-6)
    assert math.isclose(float(u[1]), 1e-7, rel_tol=1e-6)
    assert (s.diff() > 0).all() and (u.diff() > 0).all()
    # documented worst step: 0.9/64 signed, 0.9/128 unsigned
    assert math.isclose(float(s.diff().max()), 0.9 / 64, rel_tol=1e-5)
    assert math.isclose(float(u.diff().max()), 0.9 / 128, rel_tol=1e-5)


finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.integers(1, 3 * BLOCK + 17), elements=finite),
       st.booleans())
def test_round_trip_error_within_documented_bound(a, signed):
    x = torch.from_numpy(a.copy())
    if not signed:
        x = x.abs()
    q, absmax = quantize_blockwise(x, signed)
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert absmax.dtype == torch.float32 and absmax.numel() == math.ceil(x.numel() / BLOCK)
    y = dequantize_blockwise(q, absmax, signed)
    # reference in float64: absmax per block recomputed independently
    xd = x.double()
    n = xd.numel()
    am = torch.stack([xd[i:i + BLOCK].abs().max() for i in range(0, n, BLOCK)])
    am_el = am.repeat_interleave(BLOCK)[:n]
    normed = torch.where(am_el > 0, xd / am_el, torch.zeros_like(xd))
    bound = code_error_bound(normed, signed).double() * am_el
    err = (y.double() - xd).abs()
    assert (err <= bound * (1 + 1e-5) + am_el * 1e-6).all(), float((err - bound).max())
    worst = (0.9 / 64 if signed else 0.9 / 128) / 2
    assert (err <= worst * am_el * (1 + 1e-5)).all()
    # signs never flip; zeros are exact; the absmax element is exact
    assert ((y * x) >= 0).all()
    assert (y[x == 0] == 0).all()
    for i in range(0, n, BLOCK):
        blk = x[i:i + BLOCK]
        j = int(blk.abs().argmax())
        assert torch.isclose(y[i + j].abs(), blk[j].abs(), rtol=1e-6, atol=0)


@settings(max_examples=30, deadline=None)
@given(arrays(np.float32, 4 * BLOCK, elements=finite), st.integers(0, 3),
       st.sampled_from([float("nan"), float("inf"), -float("inf")]), st.integers(0, BLOCK - 1))
def test_blocks_are_independent_and_nonfinite_is_confined(a, blk, bad, pos):
    x = torch.from_numpy(a.copy())
    q0, s0 = quantize_blockwise(x, True)
    y0 = dequantize_blockwise(q0, s0, True)
    x2 = x.clone()
    x2[blk * BLOCK + pos] = bad
    q, s = quantize_blockwise(x2, True)
    y = dequantize_blockwise(q, s, True)
    assert nonfinite_blocks(s).tolist() == [i == blk for i in range(4)]
    assert torch.isnan(y[blk * BLOCK:(blk + 1) * BLOCK]).all()  # reported, not hidden
    others = torch.ones(4 * BLOCK, dtype=torch.bool)
    others[blk * BLOCK:(blk + 1) * BLOCK] = False
    assert torch.equal(y[others], y0[others]) and torch.equal(q[others], q0[others])


def test_unsigned_code_maps_negatives_to_zero_and_all_zero_block_is_zero():
    q, s = quantize_blockwise(torch.tensor([-1.0, 2.0, 0.0]), False)
    assert dequantize_blockwise(q, s, False).tolist() == [0.0, 2.0, 0.0]
    q, s = quantize_blockwise(torch.zeros(300), True)
    assert s.tolist() == [0.0, 0.0] and (dequantize_blockwise(q, s, True) == 0).all()


def test_out_writes_into_given_tensors_and_shapes_are_kept():
    x = torch.randn(3, 5, 100)
    codes = torch.empty(3, 5, 100, dtype=torch.int8)
    absmax = torch.empty(6)
    r = quantize_blockwise(x, True, out=(codes, absmax))
    assert r[0] is codes and r[1] is absmax
    y = dequantize_blockwise(codes, absmax, True, torch.bfloat16)
    assert y.shape == x.shape and y.dtype == torch.bfloat16


@pytest.mark.parametrize("signed", [True, False])
def test_mean_relative_error_on_gaussian_data_is_small(signed):
    x = torch.randn(1 << 14, generator=torch.Generator().manual_seed(0))
    if not signed:
        x = x.square()
    q, s = quantize_blockwise(x, signed)
    y = dequantize_blockwise(q, s, signed)
    # 8-bit dynamic code: the typical element keeps ~2 significant digits
    rel = ((y - x).abs() / x.abs().clamp_min(1e-3)).median()
    assert rel < 0.03


def test_chunked_passes_equal_quantising_each_block_alone():
    from matrixopt.optim._quant import _CHUNK
    x = torch.randn(2 * _CHUNK + 300, generator=torch.Generator().manual_seed(3))
    q, s = quantize_blockwise(x, True)
    for i in (0, _CHUNK // BLOCK - 1, _CHUNK // BLOCK, 2 * _CHUNK // BLOCK):  # chunk edges
        qb, sb = quantize_blockwise(x[i * BLOCK:(i + 1) * BLOCK], True)
        assert torch.equal(q[i * BLOCK:(i + 1) * BLOCK], qb) and torch.equal(s[i:i + 1], sb)
    y = dequantize_blockwise(q, s, True)
    yb = dequantize_blockwise(q[2 * _CHUNK:], s[2 * _CHUNK // BLOCK:], True)
    assert torch.equal(y[2 * _CHUNK:], yb)
