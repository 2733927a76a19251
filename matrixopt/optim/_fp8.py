r"""FP8 (E4M3) optimizer state with COAT's Dynamic Range Expansion.

Xi et al., "COAT: Compressing Optimizer states and Activation for Memory-Efficient
FP8 Training" (ICLR 2025), §4. A tensor is flattened and cut into groups of
:data:`GROUP` = 128 consecutive elements. E4M3 has 3 mantissa bits and spans
:math:`2^{-9} \ldots 448` (about :math:`2\cdot10^5` between its smallest
subnormal and its largest value), while a group of Adam moments typically spans
only :math:`10^1 \ldots 10^3`: plain per-group absmax scaling leaves most of the
format's range unused. COAT expands each group's dynamic range with a power
:math:`k` before quantising.

**Quantise** a group :math:`x` (COAT's ``expand`` kernel): with
:math:`M = \max|x| + 10^{-30}`, :math:`\mu = \min_{x_i \ne 0}|x_i| + 10^{-30}`,

.. math::
    k = \min\!\Big(K_{\max},\ \tfrac1{16}\Big\lfloor
        \frac{16\,\log_2(448^2/2)}{\log_2(M/\mu)}\Big\rfloor\Big),\qquad
    q_i = \mathrm{E4M3}\big(448\,\mathrm{sign}(x_i)\,(|x_i|/M)^k\big)

(round to nearest; :math:`K_{\max}` = :data:`K_MAX` caps the exponent of a group
whose non-zero magnitudes are all equal, where COAT's formula divides by zero).
So :math:`k\log_2(M/\mu) \le \log_2(448^2/2)`: the smallest non-zero element
lands at :math:`q \ge 2/448`, inside E4M3's subnormal range, the largest at
exactly :math:`\pm448`.

**Dequantise**: :math:`\hat x_i = \mathrm{sign}(q_i)\, M\, (|q_i|/448)^{1/k}`.

COAT writes the same map with a centre :math:`c = \sqrt{M\mu}`,
:math:`y = \mathrm{sign}(x)(|x|/c)^k`, :math:`s = (M/c)^k/448`,
:math:`q = \mathrm{E4M3}(y/s)`, :math:`\hat x = c\,(q s)^{1/k}`; substituting,
:math:`y/s = 448(|x|/M)^k` and :math:`c(qs)^{1/k} = M(q/448)^{1/k}`: the centre
cancels. We therefore keep two float32 numbers per group, :math:`M` and
:math:`k` (COAT's kernel keeps three), stored as a ``[ceil(numel/128), 2]``
tensor: :math:`1 + 8/128 = 1.0625` bytes per entry, 0.266× of float32.
With :math:`k = 1` the scheme is per-group absmax FP8.

**Error bound** (property-tested against a float64 reference in
``tests/optim/test_fp8.py``). E4M3 rounding to nearest has relative error
:math:`\le 2^{-4}` for codes in the normal range :math:`|q| \ge 2^{-6}`; the
inverse power divides relative errors by :math:`k`, so
:math:`|\hat x - x| \le (2^{-4}/k + 10^{-6})\,|x|` there (first order). Zero
is exact, signs are kept, and the group's largest element dequantises to
:math:`M` within float32 rounding.

**Non-finite values.** A group holding NaN or ±Inf gets a NaN :math:`M` and so
dequantises to NaN as a whole; other groups are untouched (as the int8 format,
:mod:`matrixopt.optim._quant`).

Both moments use E4M3 (COAT's default ``first_order_bit = second_order_bit =
"E4M3"``; after expansion E4M3 and E5M2 are equal for the second moment, its
README says). The second moment is non-negative, so its sign bit is unused.
No host reads: every quantity is a tensor op, so the step stays asynchronous
on an accelerator.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["GROUP", "FP8_MAX", "K_MAX", "FP8_DTYPE", "quantize_fp8", "dequantize_fp8",
           "expansion_exponent", "is_fp8"]

GROUP = 128
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
K_MAX = 16.0
_TINY = 1e-30
_RANGE = math.log2(FP8_MAX ** 2 / 2)  # log2 of the span a group may use after expansion
_CHUNK = 1 << 16  # elements per pass: bounds the transient float32 buffers


def is_fp8(codes: Tensor) -> bool:
    """True if ``codes`` is a stored FP8 moment (its dtype says so)."""
    return codes.dtype == FP8_DTYPE


def expansion_exponent(big: Tensor, small: Tensor) -> Tensor:
    """COAT's expansion exponent ``k`` (multiples of 1/16, capped at :data:`K_MAX`) for
    groups with largest magnitude ``big`` and smallest non-zero magnitude ``small``."""
    span = torch.log2(big / small)
    k = torch.floor(16 * _RANGE / span) / 16  # span 0 -> inf -> capped
    return k.clamp(1 / 16, K_MAX)


def _group_stats(groups: Tensor) -> tuple[Tensor, Tensor]:
    a = groups.abs()
    finite = torch.isfinite(groups).all(dim=1)
    big = a.amax(dim=1)
    small = torch.where(a > 0, a, torch.full_like(a, math.inf)).amin(dim=1)
    small = torch.minimum(small, big)  # an all-zero group: small = big = 0
    big, small = big + _TINY, small + _TINY
    big = torch.where(finite, big, torch.full_like(big, math.nan))
    return big, expansion_exponent(big, small)


def quantize_fp8(x: Tensor, out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Quantise ``x`` to ``(codes, meta)``: ``codes`` an E4M3 tensor shaped like ``x``,
    ``meta`` float32 ``[ceil(numel/128), 2]`` holding each group's ``(M, k)``. With
    ``out=(codes, meta)`` the results are written into those tensors (the stored state).
    Cost: a few elementwise passes over ``x`` in chunks of 65536 entries."""
    n = x.numel()
    ng = -(-n // GROUP)
    if out is None:
        out = (torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device),
               torch.empty(ng, 2, dtype=torch.float32, device=x.device))
    codes, meta = out
    flat_in, flat_q = x.detach().reshape(-1), codes.view(-1)
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        chunk = flat_in[start:stop].float()
        pad = (-chunk.numel()) % GROUP
        if pad:
            chunk = F.pad(chunk, (0, pad))
        groups = chunk.view(-1, GROUP)
        big, k = _group_stats(groups)
        y = FP8_MAX * (groups.abs() / big.unsqueeze(1)).pow(k.unsqueeze(1))
        y = (torch.sign(groups) * y.clamp(max=FP8_MAX)).nan_to_num_(0.0, 0.0, 0.0)
        flat_q[start:stop].copy_(y.view(-1)[:stop - start].to(FP8_DTYPE))
        g0 = start // GROUP
        meta[g0:g0 + big.numel(), 0].copy_(big)
        meta[g0:g0 + big.numel(), 1].copy_(k)
    return codes, meta


def dequantize_fp8(codes: Tensor, meta: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``sign(q)·M·(|q|/448)^(1/k)`` per group, shaped like ``codes`` (a new tensor)."""
    n = codes.numel()
    out = torch.empty(codes.shape, dtype=dtype, device=codes.device)
    flat_out, flat_q = out.view(-1), codes.reshape(-1)
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        q = flat_q[start:stop].float()
        pad = (-q.numel()) % GROUP
        if pad:
            q = F.pad(q, (0, pad))
        q = q.view(-1, GROUP)
        g0 = start // GROUP
        m = meta[g0:g0 + q.shape[0]]
        x = m[:, :1] * (q.abs() / FP8_MAX).pow(1.0 / m[:, 1:])
        flat_out[start:stop].copy_((torch.sign(q) * x).view(-1)[:stop - start])
    return out
