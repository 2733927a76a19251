"""polar(): scipy.linalg.polar's contract, checked against scipy and a float64 SVD reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import matrixopt.linalg.polar_decomposition as polar_mod
from matrixopt.linalg._reference import polar_reference
from matrixopt.linalg.polar_decomposition import (
    PolarResult,
    _scaled_cubic,
    polar,
    select_polar_method,
)

SETTINGS = settings(max_examples=60, deadline=None)

# Tolerances on relative errors, per *returned* dtype.
TOL = {torch.float64: 1e-10, torch.float32: 5e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def make_matrix(shape: tuple[int, ...], kind: str, seed: int,
                dtype: torch.dtype) -> torch.Tensor:
    """Random test matrix in float64, cast to ``dtype``.

    kinds: "gauss" (i.i.d. normal), "ill" (singular values log-spaced over 1e3),
    "rankdef" (rank about min(m, n) / 2, at least 1 below full), "zero".
    """
    g = torch.Generator().manual_seed(seed)
    *batch, m, n = shape
    k = min(m, n)
    if kind == "zero":
        A = torch.zeros(shape, dtype=torch.float64)
    elif kind == "gauss":
        A = torch.randn(shape, generator=g, dtype=torch.float64)
    else:
        W = torch.linalg.qr(torch.randn(*batch, m, k, generator=g, dtype=torch.float64)).Q
        V = torch.linalg.qr(torch.randn(*batch, n, k, generator=g, dtype=torch.float64)).Q
        if kind == "ill":
            s = torch.logspace(0, -3, k, dtype=torch.float64)
        else:  # rankdef
            s = torch.zeros(k, dtype=torch.float64)
            s[: max(k // 2, 1) if k > 1 else 0] = torch.linspace(2.0, 1.0, max(k // 2, 1))
        A = (W * s) @ V.mT
    return A.to(dtype)


shapes = st.tuples(
    st.sampled_from([(), (3,)]),
    st.integers(1, 7),
    st.integers(1, 7),
).map(lambda t: (*t[0], t[1], t[2]))


def check_contract(A: torch.Tensor, res: PolarResult, side: str, tol: float) -> None:
    """UᵀU = I (or UUᵀ = I), H = Hᵀ ⪰ 0, UH = A (HU = A), all against float64."""
    U, H = res
    *batch, m, n = A.shape
    assert isinstance(res, PolarResult)
    assert U.shape == A.shape and U.dtype == A.dtype
    hk = n if side == "right" else m
    assert H.shape == (*batch, hk, hk) and H.dtype == A.dtype
    Ud, Hd, Ad = U.double(), H.double(), A.double()
    assert torch.isfinite(Ud).all() and torch.isfinite(Hd).all()
    gram = Ud.mT @ Ud if m >= n else Ud @ Ud.mT
    eye = torch.eye(min(m, n), dtype=torch.float64)
    assert (gram - eye).abs().max() <= tol * max(1, min(m, n)), "U not orthonormal"
    assert torch.equal(H, H.mT), "H not exactly symmetric"
    scale = float(torch.linalg.matrix_norm(Ad, ord=2).max()) if Ad.numel() else 0.0
    evals = torch.linalg.eigvalsh(Hd)
    assert evals.min() >= -tol * max(scale, 1e-300) * hk, "H not PSD"
    rec = Ud @ Hd if side == "right" else Hd @ Ud
    assert (rec - Ad).abs().max() <= tol * max(scale, 1e-300) * max(m, n), "A != UH"


@SETTINGS
@given(shape=shapes, kind=st.sampled_from(["gauss", "ill", "rankdef", "zero"]),
       seed=st.integers(0, 2**31 - 1), side=st.sampled_from(["right", "left"]),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]))
def test_svd_route_contract_and_scipy(shape, kind, seed, side, dtype):
    A = make_matrix(shape, kind, seed, dtype)
    res = polar(A, side, method="svd")
    tol = TOL[dtype]
    check_contract(A, res, side, tol)
    # scipy on the (already rounded) input in float64. H is unique; U is unique
    # for full-rank input only.
    An = A.double().numpy()
    for idx in np.ndindex(*shape[:-2]):
        u_s, h_s = scipy.linalg.polar(An[idx], side=side)
        scale = max(np.abs(h_s).max(), 1e-300)
        assert np.abs(res.H.double().numpy()[idx] - h_s).max() <= 10 * tol * scale * shape[-1]
        full_rank = np.linalg.matrix_rank(An[idx]) == min(shape[-2:])
        if kind == "zero" or (kind != "rankdef" and full_rank):
            cond = np.linalg.cond(An[idx]) if kind != "zero" else 1.0
            assert np.abs(res.U.double().numpy()[idx] - u_s).max() <= 10 * tol * cond * shape[-1]


@SETTINGS
@given(shape=shapes, kind=st.sampled_from(["gauss", "ill"]), seed=st.integers(0, 2**31 - 1),
       side=st.sampled_from(["right", "left"]),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]))
def test_newton_schulz_contract_and_agreement(shape, kind, seed, side, dtype):
    A = make_matrix(shape, kind, seed, dtype)
    if torch.linalg.matrix_rank(A.double()).min() < min(shape[-2:]):
        return  # a Gaussian draw that rounded to rank-deficient: not this test's subject
    res = polar(A, side, method="newton_schulz")
    tol = TOL[dtype]
    check_contract(A, res, side, tol)
    U_ref, H_ref = polar_reference(A, side)
    cond = float(torch.linalg.cond(A.double()).max())
    assert (res.U.double() - U_ref).abs().max() <= 10 * tol * cond * max(shape[-2:])
    assert (res.H.double() - H_ref).abs().max() <= 10 * tol * H_ref.abs().max() * max(shape[-2:])


def test_scipy_docstring_examples():
    # scipy.linalg.polar's own examples, including both non-square cases.
    a = torch.tensor([[1.0, -1.0], [2.0, 4.0]], dtype=torch.float64)
    u, p = polar(a)
    assert torch.allclose(u, torch.tensor([[0.85749293, -0.51449576], [0.51449576, 0.85749293]],
                                          dtype=torch.float64), atol=1e-8)
    assert torch.allclose(p, torch.tensor([[1.88648444, 1.2004901], [1.2004901, 3.94446746]],
                                          dtype=torch.float64), atol=1e-8)
    b = torch.tensor([[0.5, 1, 2], [1.5, 3, 4]], dtype=torch.float64)
    for method in ("svd", "newton_schulz"):
        u, p = polar(b, method=method)
        assert u.shape == (2, 3) and p.shape == (3, 3)
        assert torch.allclose(u @ u.T, torch.eye(2, dtype=torch.float64), atol=1e-12)
        assert torch.allclose(u @ p, b, atol=1e-12)
        u_s, p_s = scipy.linalg.polar(b.numpy())
        assert np.allclose(u.numpy(), u_s, atol=1e-10) and np.allclose(p.numpy(), p_s, atol=1e-10)
        u, p = polar(b.T, method=method)
        u_s, p_s = scipy.linalg.polar(b.T.numpy())
        assert u.shape == (3, 2) and p.shape == (2, 2)
        assert np.allclose(u.numpy(), u_s, atol=1e-10) and np.allclose(p.numpy(), p_s, atol=1e-10)


@pytest.mark.parametrize("shape", [(3, 5), (5, 3), (4, 4), (2, 1, 6)])
@pytest.mark.parametrize("side", ["right", "left"])
def test_zero_matrix_matches_scipy(shape, side):
    A = torch.zeros(shape)
    for method in ("svd", "newton_schulz", "auto"):
        U, H = polar(A, side, method=method)
        u_s, h_s = scipy.linalg.polar(np.zeros(shape[-2:]), side=side)
        assert np.array_equal(U[(0,) * (len(shape) - 2)].numpy(), u_s)
        assert np.array_equal(H[(0,) * (len(shape) - 2)].numpy(), h_s)


@pytest.mark.parametrize("method", ["svd", "newton_schulz"])
@pytest.mark.parametrize("scale", [1e30, 1e-30])
def test_extreme_scales_stay_finite(method, scale):
    A = make_matrix((6, 4), "ill", 3, torch.float64)
    A32 = (A * scale).float()
    U, H = polar(A32, method=method)
    assert torch.isfinite(U).all() and torch.isfinite(H).all()
    U_ref, H_ref = polar_reference(A32)
    assert (U.double() - U_ref).abs().max() < 1e-2
    assert ((H.double() - H_ref).abs().max() / H_ref.abs().max()) < 1e-4


def test_rank_deficient_newton_schulz_raises_and_auto_falls_back(monkeypatch):
    A = make_matrix((2, 6, 4), "gauss", 0, torch.float64)
    A[1, :, 0] = 0.0  # exactly rank-deficient: the iteration cannot reach U
    with pytest.raises(torch.linalg.LinAlgError, match="max_steps=30"):
        polar(A, method="newton_schulz", max_steps=30)
    # "auto" on CUDA would iterate; force that choice to exercise the fallback here.
    monkeypatch.setattr(polar_mod, "select_polar_method", lambda A: "newton_schulz")
    res = polar(A, method="auto", max_steps=30)
    check_contract(A, res, "right", 1e-10)
    _, H_ref = polar_reference(A)
    assert torch.allclose(res.H, H_ref, atol=1e-10)


def test_select_polar_method_rule():
    assert select_polar_method(torch.zeros(512, 512)) == "svd"  # CPU always SVD
    assert select_polar_method(torch.zeros(3, 4, 4)) == "svd"


def test_batched_equals_loop():
    A = make_matrix((3, 5, 4), "gauss", 1, torch.float64)
    for method in ("svd", "newton_schulz"):
        U, H = polar(A, "left", method=method)
        for i in range(3):
            Ui, Hi = polar(A[i], "left", method=method)
            assert torch.allclose(U[i], Ui, atol=1e-12) and torch.allclose(H[i], Hi, atol=1e-12)


def test_scaled_cubic_is_the_minimax_step():
    # Closed form used by the iteration: maps [l, 1] into [l', 1], touching both
    # ends (equioscillation), and is the classic (3/2, -1/2) step at l = 1.
    assert _scaled_cubic(1.0) == pytest.approx((1.5, -0.5, 1.0))
    for lower in (1e-6, 1e-3, 0.1, 0.5, 0.9):
        a, b, new_lower = _scaled_cubic(lower)
        x = np.linspace(lower, 1.0, 20001)
        p = a * x + b * x**3
        assert p.min() == pytest.approx(new_lower, rel=1e-9)
        assert p.max() == pytest.approx(1.0, abs=1e-8)
        assert abs(p[0] - new_lower) < 1e-9 and abs(p[-1] - new_lower) < 1e-9
        assert new_lower > lower  # progress on every step
        # small singular values grow at least like the classic 1.5x
        assert a >= 1.5 - 1e-12


def test_half_precision_computed_in_float32():
    A = make_matrix((8, 5), "gauss", 2, torch.bfloat16)
    U, H = polar(A)
    U_ref, H_ref = polar_reference(A)
    assert U.dtype == H.dtype == torch.bfloat16
    # only the final rounding to bf16 (rel. 2^-8) separates us from the float64 result
    assert (U.double() - U_ref).abs().max() <= 2 ** -8
    assert ((H.double() - H_ref).abs().max() / H_ref.abs().max()) <= 2 ** -7


def test_empty_matrix():
    U, H = polar(torch.zeros(0, 3))
    assert U.shape == (0, 3) and H.shape == (3, 3) and not H.any()


def test_errors_name_the_argument():
    A = torch.randn(3, 3)
    with pytest.raises(ValueError, match="side.*'up'"):
        polar(A, "up")
    with pytest.raises(ValueError, match="method.*'qr'"):
        polar(A, method="qr")
    with pytest.raises(ValueError, match="tol.*-1"):
        polar(A, tol=-1.0)
    with pytest.raises(ValueError, match="max_steps.*0"):
        polar(A, max_steps=0)
    with pytest.raises(TypeError, match="A.*torch.int64"):
        polar(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="A.*complex"):
        polar(torch.ones(3, 3, dtype=torch.complex64))
    with pytest.raises(ValueError, match="A.*at least 2 dimensions.*\\(3,\\)"):
        polar(torch.ones(3))
    for bad in (math.nan, math.inf):
        B = A.clone()
        B[1, 2] = bad
        with pytest.raises(ValueError, match="A contains NaN or Inf"):
            polar(B)
