"""Every public dtype × normalization × method combination of orthogonalize is accurate.

Issue 13 item 11: ``orthogonalize(bf16, normalization="aol", method="gram")``
returned σ_max ≈ 47 on a 64×32 Gaussian (the accumulated Gram factor Q, stored
in bfloat16, amplifies its rounding). Reference, float64 and independent of the
code under test: with ŝ the normalised singular values of the input (Frobenius:
σ/(s‖G‖_F); spectral: σ/(s(Σσ⁸)^(1/8)); AOL: the singular values of D G / s,
d_i = (Σ_j |GGᵀ|_ij)^(-1/2) on the short side), T steps of the schedule map
every singular value to P(ŝ), P the scalar composition of its polynomials.
The output's singular values on the input's rank must lie in
[min P(ŝ), max P(ŝ)] up to the iteration dtype's rounding, and its remaining
singular values must be ~0.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from matrixopt.linalg.coefficients import get_preset
from matrixopt.linalg.orthogonalization import orthogonalize

F64 = torch.float64
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# rounding allowance per iteration dtype (absolute, on singular values ~1)
TOL = {"fp32": 0.01, "fp16": 0.03, "bf16": 0.08}
SHAPES = [(64, 32), (32, 80), (48, 48), (160, 40)]
SPECTRA = ("gaussian", "lowrank3", "decaying")


def _input(shape: tuple[int, int], spectrum: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    if spectrum == "gaussian":
        return torch.randn(m, n, generator=g, dtype=F64)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=F64)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=F64)).Q
    if spectrum == "lowrank3":
        s = torch.zeros(k, dtype=F64)
        s[:3] = torch.tensor([1.0, 0.6, 0.2], dtype=F64)
    else:  # σ from 1 down to 0.02: every normalised σ stays inside the schedule's [1e-3, 1]
        s = torch.logspace(0, -1.7, k, dtype=F64)
    return (U * s) @ V.mT


def _normalised_sigmas(G: torch.Tensor, normalization: str, safety: float) -> torch.Tensor:
    m, n = G.shape
    if normalization == "aol":
        A = G.mT @ G if m > n else G @ G.mT
        d = A.abs().sum(-1).rsqrt()
        X = G * d[None, :] if m > n else G * d[:, None]
        return torch.linalg.svdvals(X / safety)
    S = torch.linalg.svdvals(G)
    if normalization == "frobenius":
        return S / (safety * S.square().sum().sqrt())
    return S / (safety * S.pow(8).sum().pow(0.125))


def _compose(coefficients: tuple[tuple[float, ...], ...], x: torch.Tensor) -> torch.Tensor:
    for c in coefficients:
        x = sum(cj * x ** (2 * j + 1) for j, cj in enumerate(c))  # type: ignore[assignment]
    return x


@pytest.mark.parametrize("method", ["standard", "gram", "auto"])
@pytest.mark.parametrize("normalization", ["frobenius", "spectral", "aol"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_every_combination_is_accurate(dtype: str, normalization: str, method: str) -> None:
    preset = get_preset("polar_express")
    for (shape, spectrum), seed in zip(itertools.product(SHAPES, SPECTRA), itertools.count()):
        G = _input(shape, spectrum, seed)
        rank = int(torch.linalg.matrix_rank(G))
        Gin = G.to(DTYPES[dtype])  # the reference sees the rounded input, as the code does
        P = _compose(preset.coefficients,
                     _normalised_sigmas(Gin.to(F64), normalization, preset.safety))
        O = orthogonalize(Gin, normalization=normalization, method=method)
        assert O.dtype == DTYPES[dtype] and O.shape == G.shape
        so = torch.linalg.svdvals(O.to(F64))
        lo, hi = float(P[:rank].min()) - TOL[dtype], float(P[:rank].max()) + TOL[dtype]
        top = so[:rank]
        assert lo <= float(top.min()) and float(top.max()) <= hi, (
            f"{dtype} {normalization} {method} {shape} {spectrum}: output σ in "
            f"[{float(top.min()):.3f}, {float(top.max()):.3f}], float64 reference band "
            f"[{float(P[:rank].min()):.3f}, {float(P[:rank].max()):.3f}] ± {TOL[dtype]}")
        if rank < min(shape):
            # fp32: the input's rounding noise, mapped by the same polynomials. In half
            # precision every step's rounding adds noise there that later steps amplify
            # (as in any half-precision Newton–Schulz), so only "no overshoot" is promised.
            tail = float(P[rank:].max()) + TOL[dtype] if dtype == "fp32" else hi
            assert float(so[rank:].max()) <= tail, (
                f"{dtype} {normalization} {method} {shape}: σ beyond the rank "
                f"{float(so[rank:].max()):.3f} > reference {tail:.3f}")

def test_issue_reproduction_bf16_aol_gram_64x32() -> None:
    """The reported case: σ_max was ≈ 47."""
    G = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    O = orthogonalize(G.bfloat16(), normalization="aol", method="gram")
    sv = torch.linalg.svdvals(O.double())
    assert 0.7 < float(sv.min()) and float(sv.max()) < 1.2, sv
