r"""Block-wise 8-bit quantisation of optimizer state with a dynamic (tree) code.

Dettmers et al., "8-bit Optimizers via Block-wise Quantization" (ICLR 2022).
A tensor is flattened and cut into blocks of :data:`BLOCK` = 256 elements; each
block keeps its absolute maximum :math:`a_b` (float32) and every element the
index of the nearest entry of a fixed 256-entry code :math:`C \subset [-1, 1]`:

.. math::
    q_i = \arg\min_j |x_i / a_b - C_j|,\qquad \hat x_i = a_b\, C_{q_i}.

**The dynamic code** (built by :func:`dynamic_code`). With ``k`` magnitude bits
(7 for the signed code, whose 8th bit is the sign; 8 for the unsigned code),
the magnitudes are split into ``k`` decades: decade ``e = 0 .. k-1`` covers
:math:`(0.1\cdot 10^{-e}, 10^{-e}]` with :math:`2^{k-1-e}` linearly spaced values
:math:`10^{-e}\,(0.1 + 0.9\,(j+1)/2^{k-1-e})`, :math:`j = 0..2^{k-1-e}-1` — the
leading-zero count is the exponent, the remaining bits a linear fraction, so
large values get fine steps and small values still have a non-zero code. Plus
the exact zero (and the negated magnitudes for the signed code). Both codes
contain 0 and 1 exactly; the signed code is symmetric (255 values), the
unsigned code has 256 values in :math:`[0, 1]`.

**Error bound** (property-tested). Rounding to the nearest code entry gives, for
an element whose normalised value lies between neighbouring entries
:math:`C_j \le x/a_b \le C_{j+1}`,

.. math::
    |x - \hat x| \le \tfrac12 a_b (C_{j+1} - C_j) \le \tfrac12 a_b \Delta_{\max},

with :math:`\Delta_{\max} = 0.9/2^{k-1}` (the top decade's step): 0.9/64 for the
signed code (error ≤ 0.70 % of the block's absmax) and 0.9/128 for the
unsigned one (≤ 0.35 %). Zero is exact, signs are kept (a value never maps to a
code entry of the other sign), and the absmax element of each block is exact.

**Non-finite values.** A block containing NaN or ±Inf gets a NaN scale, so the
whole block dequantises to NaN — visible to the caller
(:func:`nonfinite_blocks`) — while every other block is untouched (each block
only ever reads its own scale).

Tensors with fewer than :data:`MIN_QUANT_NUMEL` = 4096 elements are not
quantised by the optimizers (their state is a negligible share and small
tensors — norms, biases — are the most sensitive to quantisation).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["BLOCK", "MIN_QUANT_NUMEL", "dynamic_code", "quantize_blockwise",
           "dequantize_blockwise", "nonfinite_blocks", "code_error_bound", "to_row_blocks"]

BLOCK = 256
MIN_QUANT_NUMEL = 4096
_OFFSET = 128  # int8 storage: code index - 128


@functools.cache
def _code_cpu(signed: bool) -> Tensor:
    k = 7 if signed else 8
    mags: list[float] = []
    for e in range(k):
        f = k - 1 - e
        count = 2 ** f
        mags += [10.0 ** (-e) * (0.1 + 0.9 * (j + 1) / count) for j in range(count)]
    vals = [0.0] + mags + ([-m for m in mags] if signed else [])
    code = torch.tensor(sorted(vals), dtype=torch.float64)
    assert code.numel() <= 256 and torch.unique(code).numel() == code.numel()
    return code.to(torch.float32)


def dynamic_code(signed: bool, device: torch.device | str | None = None) -> Tensor:
    """The sorted dynamic code (float32): 255 values in [-1, 1] if ``signed``,
    else 256 values in [0, 1]; see the module docstring for the construction."""
    c = _code_cpu(bool(signed))
    return c if device is None else c.to(device)


@functools.cache
def _tables(signed: bool, device: str) -> tuple[Tensor, Tensor]:
    code = _code_cpu(signed).to(device)
    mids = (code[1:] + code[:-1]) / 2
    return code, mids


def code_error_bound(x_normalised: Tensor, signed: bool) -> Tensor:
    """Per element, half the gap between the two code entries enclosing
    ``x_normalised`` (values in [-1, 1] or [0, 1]): the documented rounding bound
    in units of the block's absmax."""
    code = dynamic_code(signed, x_normalised.device)
    x = x_normalised.float().clamp(float(code[0]), float(code[-1]))
    hi = torch.searchsorted(code, x, right=False).clamp(1, code.numel() - 1)
    return (code[hi] - code[hi - 1]) / 2


_CHUNK = 1 << 16  # elements quantised per pass: bounds the transient float32/int64 buffers


def _encode(blocks: Tensor, mids: Tensor) -> tuple[Tensor, Tensor]:
    """``[k, BLOCK]`` float32 blocks -> (code indices, absmax per block)."""
    finite = torch.isfinite(blocks).all(dim=1)
    am = blocks.abs().amax(dim=1)
    am = torch.where(finite, am, torch.full_like(am, float("nan")))
    scale = torch.where(am > 0, am, torch.ones_like(am))
    normed = (blocks / scale.unsqueeze(1)).nan_to_num_(0.0, 0.0, 0.0)
    return torch.bucketize(normed, mids), am


def _row_len(x: Tensor, absmax: Tensor) -> int:
    """Entries per row of a row-aligned layout (``absmax`` is ``[rows, blocks per row]``)."""
    return x.numel() // max(1, absmax.shape[0])


def quantize_blockwise(x: Tensor, signed: bool, out: tuple[Tensor, Tensor] | None = None,
                       rows: bool = False) -> tuple[Tensor, Tensor]:
    """Quantise ``x`` to ``(codes, absmax)``.

    ``codes``: int8 tensor shaped like ``x`` (code index − 128); ``absmax``:
    float32 ``[ceil(numel/256)]``, NaN for a block with a non-finite value. With
    ``out=(codes, absmax)`` the results are written into those tensors (the
    stored optimizer state) instead of new ones, in their layout. The unsigned
    code maps negative values to 0. Works through the tensor in chunks of 65536
    entries, so its temporaries stay small whatever the tensor's size.

    ``rows=True`` (a tensor with >= 1 dim): row-aligned blocks, each row of
    ``x.shape[0]`` cut into ``ceil(row/256)`` blocks of its own (the last one
    short), ``absmax`` of shape ``[x.shape[0], ceil(row/256)]``. A block then never
    spans two rows, so the blocks of any dim-0 shard of ``x`` (FSDP2's ``Shard(0)``)
    are exactly the blocks of the whole tensor on those rows; for rows that are a
    multiple of 256 long the blocks (and values) are the flat layout's. A 2-D
    ``absmax`` in ``out`` selects this layout.
    """
    if out is not None:
        rows = out[1].dim() == 2
    n = x.numel()
    nrow = x.shape[0] if x.dim() else 1
    row = math.prod(x.shape[1:])
    bpr = -(-row // BLOCK)  # blocks per row (row-aligned layout)
    shape = (nrow, bpr) if rows else (-(-n // BLOCK),)
    if out is None:
        out = (torch.empty(x.shape, dtype=torch.int8, device=x.device),
               torch.empty(shape, dtype=torch.float32, device=x.device))
    codes, absmax_out = out
    code, mids = _tables(bool(signed), str(x.device))
    if rows and n and row % BLOCK:
        x2, q2 = x.detach().reshape(nrow, row), codes.view(nrow, row)
        step = max(1, _CHUNK // (bpr * BLOCK))
        for r0 in range(0, nrow, step):
            r1 = min(r0 + step, nrow)
            chunk = F.pad(x2[r0:r1].float(), (0, bpr * BLOCK - row))
            idx, am = _encode(chunk.view(-1, BLOCK), mids)
            q2[r0:r1].copy_(idx.view(r1 - r0, bpr * BLOCK)[:, :row] - _OFFSET)
            absmax_out[r0:r1].copy_(am.view(r1 - r0, bpr))
        return codes, absmax_out
    flat_in = x.detach().reshape(-1)
    flat_q = codes.view(-1)
    flat_am = absmax_out.view(-1)
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        chunk = flat_in[start:stop].float()
        pad = (-chunk.numel()) % BLOCK
        if pad:
            chunk = F.pad(chunk, (0, pad))
        idx, am = _encode(chunk.view(-1, BLOCK), mids)
        flat_q[start:stop].copy_(idx.view(-1)[:stop - start] - _OFFSET)
        flat_am[start // BLOCK:start // BLOCK + am.numel()].copy_(am)
    return codes, absmax_out


def dequantize_blockwise(codes: Tensor, absmax: Tensor, signed: bool,
                         dtype: torch.dtype = torch.float32) -> Tensor:
    """``absmax[block] * code[index]`` shaped like ``codes`` (a new tensor); the layout
    (flat or row-aligned, :func:`quantize_blockwise`) is read from ``absmax``'s shape."""
    code, _ = _tables(bool(signed), str(codes.device))
    n = codes.numel()
    out = torch.empty(codes.shape, dtype=dtype, device=codes.device)
    if absmax.dim() == 2 and n and _row_len(codes, absmax) % BLOCK:
        nrow, bpr = absmax.shape
        row = _row_len(codes, absmax)
        q2, o2 = codes.reshape(nrow, row), out.view(nrow, row)
        step = max(1, _CHUNK // (bpr * BLOCK))
        for r0 in range(0, nrow, step):
            r1 = min(r0 + step, nrow)
            vals = F.pad(code[q2[r0:r1].to(torch.int64) + _OFFSET], (0, bpr * BLOCK - row))
            o2[r0:r1].copy_((vals.view(r1 - r0, bpr, BLOCK) * absmax[r0:r1].unsqueeze(2))
                            .view(r1 - r0, bpr * BLOCK)[:, :row])
        return out
    absmax = absmax.reshape(-1)
    flat_out, flat_q = out.view(-1), codes.reshape(-1)
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        vals = code[flat_q[start:stop].to(torch.int64) + _OFFSET]
        pad = (-vals.numel()) % BLOCK
        if pad:
            vals = F.pad(vals, (0, pad))
        sc = absmax[start // BLOCK:start // BLOCK + vals.numel() // BLOCK]
        flat_out[start:stop].copy_((vals.view(-1, BLOCK) * sc.unsqueeze(1)).view(-1)[:stop - start])
    return out


def to_row_blocks(codes: Tensor, absmax: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """A flat-layout ``(codes, absmax)`` in the row-aligned layout (``rows=True``): the
    same codes with ``absmax`` reshaped when rows are a multiple of 256 long (exact),
    else dequantised and quantised again (an old checkpoint, converted on load)."""
    nrow = codes.shape[0] if codes.dim() else 1
    if absmax.dim() == 2:
        return codes, absmax
    if codes.numel() % max(1, nrow) == 0 and (codes.numel() // max(1, nrow)) % BLOCK == 0:
        return codes, absmax.reshape(nrow, -1)
    return quantize_blockwise(dequantize_blockwise(codes, absmax, signed), signed, rows=True)


def nonfinite_blocks(absmax: Tensor) -> Tensor:
    """Boolean mask of the blocks whose quantised input held a NaN or ±Inf."""
    return ~torch.isfinite(absmax)
