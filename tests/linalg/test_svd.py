"""randomized_svd, subspace_iteration and spectral_norm against float64 SVD references."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from matrixopt.linalg._reference import (
    halko_spectral_factor,
    principal_angle_sines,
    singular_values,
    top_basis,
)
from matrixopt.linalg.norms import spectral_norm
from matrixopt.linalg.svd import randomized_svd, subspace_iteration

SETTINGS = settings(max_examples=60, deadline=None)


def spectrum_matrix(shape: tuple[int, ...], s: torch.Tensor, seed: int) -> torch.Tensor:
    """Float64 ``W diag(s) Vᵀ`` with random orthonormal ``W``, ``V``."""
    g = torch.Generator().manual_seed(seed)
    *batch, m, n = shape
    k = s.shape[-1]
    W = torch.linalg.qr(torch.randn(*batch, m, k, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(*batch, n, k, generator=g, dtype=torch.float64)).Q
    return (W * s) @ V.mT


# ----------------------------------------------------------------- randomized_svd


@SETTINGS
@given(m=st.integers(2, 40), n=st.integers(2, 40), data=st.data(),
       n_iter=st.sampled_from([0, 1, 2]), spectrum=st.sampled_from(["gauss", "decay"]),
       seed=st.integers(0, 2**31 - 1))
def test_randomized_svd_halko_bound(m, n, data, n_iter, spectrum, seed):
    """‖A − U S Vh‖₂ ≤ σ_{k+1} + [1 + 11√(k+p)√min(m,n)]^{1/(2q+1)} σ_{k+1}.

    HMT 2011 eq. (1.9)-(1.11) / Cor. 10.10 for the range finder (failure
    probability 6·p^-p ≈ 4e-7 at p = 8, here with a fixed generator per
    example), plus σ_{k+1} for truncating to rank k (HMT §9.3).
    """
    k = data.draw(st.integers(1, min(m, n)))
    g = torch.Generator().manual_seed(seed)
    if spectrum == "gauss":
        A = torch.randn(m, n, generator=g, dtype=torch.float64)
    else:
        A = spectrum_matrix((m, n), 0.7 ** torch.arange(min(m, n), dtype=torch.float64), seed)
    p = 8
    U, S, Vh = randomized_svd(A, k, oversample=p, n_iter=n_iter,
                              generator=torch.Generator().manual_seed(seed + 1))
    assert U.shape == (m, k) and S.shape == (k,) and Vh.shape == (k, n)
    sigma = singular_values(A)
    s_next = float(sigma[k]) if k < min(m, n) else 0.0
    err = float(torch.linalg.matrix_norm(A - (U * S) @ Vh, ord=2))
    l = min(k + p, m, n)
    if l == min(m, n):
        bound = s_next  # the sketch spans the whole range: exact truncated SVD
    else:
        bound = s_next + halko_spectral_factor(k, l - k, m, n, n_iter) * s_next
    assert err <= bound + 1e-10 * float(sigma[0])
    # Ritz values never exceed the true singular values (interlacing).
    assert torch.all(S <= sigma[:k] * (1 + 1e-12) + 1e-12)
    # orthonormal factors, S descending
    assert torch.allclose(U.mT @ U, torch.eye(k, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(Vh @ Vh.mT, torch.eye(k, dtype=torch.float64), atol=1e-10)
    assert torch.all(S[:-1] >= S[1:])


def test_randomized_svd_accurate_with_gap():
    tail = 0.01 * torch.rand(34, generator=torch.Generator().manual_seed(0))
    s = torch.cat([torch.linspace(10, 5, 6), tail])
    A = spectrum_matrix((3, 60, 40), s.double(), 0)
    U, S, Vh = randomized_svd(A, 6, n_iter=2)
    sigma = singular_values(A)
    assert torch.allclose(S, sigma[..., :6], rtol=1e-8)
    sines = principal_angle_sines(U, top_basis(A, 6, "left"))
    assert sines.max() < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(30, 12), (12, 30), (2, 16, 16)])
def test_randomized_svd_dtypes_and_shapes(dtype, shape):
    s = 0.5 ** torch.arange(min(shape[-2:]), dtype=torch.float64)
    A = spectrum_matrix(shape, s, 1).to(dtype)
    U, S, Vh = randomized_svd(A, 4)
    assert U.dtype == S.dtype == Vh.dtype == dtype
    assert U.shape == (*shape[:-2], shape[-2], 4) and Vh.shape == (*shape[:-2], 4, shape[-1])
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(S.double(), singular_values(A)[..., :4], rtol=tol, atol=tol)


def test_randomized_svd_reproducible_and_leaves_global_rng_alone():
    A = torch.randn(50, 30, generator=torch.Generator().manual_seed(0))
    state = torch.get_rng_state()
    r1 = randomized_svd(A, 5, n_iter=0)
    r2 = randomized_svd(A, 5, n_iter=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(r1, r2))
    r3 = randomized_svd(A, 5, n_iter=0, generator=torch.Generator().manual_seed(7))
    r4 = randomized_svd(A, 5, n_iter=0, generator=7)
    assert all(torch.equal(x, y) for x, y in zip(r3, r4))
    assert not torch.equal(r1[0], r3[0])  # a different sketch gives a different answer


def test_randomized_svd_sign_convention():
    A = torch.randn(40, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    U, S, Vh = randomized_svd(A, 5)
    U2, S2, Vh2 = randomized_svd(-A, 5)
    idx = U.abs().argmax(dim=0)
    assert torch.all(U[idx, torch.arange(5)] > 0)
    assert torch.allclose(U, U2, atol=1e-8) and torch.allclose(Vh, -Vh2, atol=1e-8)


@pytest.mark.parametrize("scale", [0.0, 1e30, 1e-30])
def test_randomized_svd_zero_and_extreme_scales(scale):
    A = torch.randn(30, 20, generator=torch.Generator().manual_seed(0)) * scale
    U, S, Vh = randomized_svd(A, 3)
    assert torch.isfinite(U).all() and torch.isfinite(S).all() and torch.isfinite(Vh).all()
    ref = singular_values(A)[:3]
    assert torch.allclose(S.double(), ref, rtol=1e-3, atol=0.0)


def test_randomized_svd_errors():
    A = torch.randn(5, 4)
    with pytest.raises(ValueError, match="rank must be <= min\\(m, n\\) = 4.*got 5"):
        randomized_svd(A, 5)
    with pytest.raises(ValueError, match="rank must be > 0, got 0"):
        randomized_svd(A, 0)
    with pytest.raises(TypeError, match="rank must be an int, got 2.0"):
        randomized_svd(A, 2.0)
    with pytest.raises(ValueError, match="oversample must be >= 0, got -1"):
        randomized_svd(A, 2, oversample=-1)
    with pytest.raises(TypeError, match="A.*torch.int32"):
        randomized_svd(torch.ones(5, 4, dtype=torch.int32), 2)
    with pytest.raises(TypeError, match="A.*complex"):
        randomized_svd(torch.ones(5, 4, dtype=torch.complex128), 2)
    with pytest.raises(ValueError, match="A.*at least 2 dimensions"):
        randomized_svd(torch.ones(5), 1)
    with pytest.raises(TypeError, match="generator must be None, an int seed or a torch.Generator"):
        randomized_svd(A, 2, generator="x")
    B = A.clone()
    B[0, 0] = math.nan
    with pytest.raises(ValueError, match="A contains NaN or Inf"):
        randomized_svd(B, 2)


# ----------------------------------------------------------------- subspace_iteration


@pytest.mark.parametrize("side", ["left", "right"])
def test_subspace_iteration_converges_at_the_power_rate(side):
    """tan θ_{k+1} ≤ (σ_{r+1}/σ_r)² tan θ_k for the largest principal angle θ."""
    r = 4
    s = torch.tensor([4.0, 3.5, 3.0, 2.5, 1.25, 1.0, 0.5, 0.25, 0.1, 0.05], dtype=torch.float64)
    A = spectrum_matrix((2, 30, 10), s, 3)
    ratio2 = float((s[r] / s[r - 1]) ** 2)  # 0.25
    target = top_basis(A, r, side)
    k = A.shape[-2] if side == "left" else A.shape[-1]
    Q = torch.randn(2, k, r, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    tan_prev = None
    for _ in range(12):
        Q = subspace_iteration(A, Q, 1, side=side)
        eye = torch.eye(r, dtype=torch.float64).expand(2, r, r)
        assert torch.allclose(Q.mT @ Q, eye, atol=1e-12)
        sin = principal_angle_sines(Q, target)[..., 0]
        tan = sin / torch.sqrt(1 - sin**2)
        if tan_prev is not None:
            assert torch.all(tan <= ratio2 * tan_prev * (1 + 1e-6) + 1e-13)
        tan_prev = tan
    assert tan_prev.max() < 1e-6
    # n_iter=k equals k single steps
    Q0 = torch.randn(2, k, r, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    Q3 = subspace_iteration(A, Q0, 3, side=side)
    assert principal_angle_sines(Q3, target).max() < ratio2 ** 3 * 10


def test_subspace_iteration_warm_start_and_dtypes():
    s = torch.cat([torch.full((3,), 10.0), torch.full((17,), 0.1)]).double()
    A = spectrum_matrix((40, 20), s, 5)
    exact = top_basis(A, 3, "left")
    g = torch.Generator().manual_seed(1)
    Q0 = exact + 0.1 * torch.randn(40, 3, generator=g, dtype=torch.float64)
    Q = subspace_iteration(A, Q0, 1)
    assert principal_angle_sines(Q, exact).max() < 1e-4  # (0.01)² contraction of a ~0.1 angle
    Qb = subspace_iteration(A.bfloat16(), Q0.float(), 1)
    assert Qb.dtype == torch.bfloat16 and Qb.shape == (40, 3)
    Q0z = subspace_iteration(A, Q0, 0)  # only re-orthonormalises
    assert torch.allclose(Q0z.mT @ Q0z, torch.eye(3, dtype=torch.float64), atol=1e-12)


def test_subspace_iteration_errors():
    A = torch.randn(6, 4)
    with pytest.raises(ValueError, match="Q0 must have shape \\[..., 6, r\\].*side='left'"):
        subspace_iteration(A, torch.randn(4, 2))
    with pytest.raises(ValueError, match="Q0 must have shape \\[..., 4, r\\].*side='right'"):
        subspace_iteration(A, torch.randn(6, 2), side="right")
    with pytest.raises(ValueError, match="rank r.*<= min\\(m, n\\) = 4.*got 5"):
        subspace_iteration(A, torch.randn(6, 5))
    with pytest.raises(ValueError, match="side must be one of"):
        subspace_iteration(A, torch.randn(6, 2), side="up")
    with pytest.raises(ValueError, match="n_iter must be >= 0, got -1"):
        subspace_iteration(A, torch.randn(6, 2), -1)


# ----------------------------------------------------------------- spectral_norm


@SETTINGS
@given(shape=st.tuples(st.sampled_from([(), (2,)]), st.integers(1, 12), st.integers(1, 12))
       .map(lambda t: (*t[0], t[1], t[2])), seed=st.integers(0, 2**31 - 1),
       n_iter=st.integers(0, 8))
def test_spectral_norm_is_a_lower_bound(shape, seed, n_iter):
    A = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    est = spectral_norm(A, n_iter)
    sigma1 = singular_values(A)[..., 0]
    assert est.shape == shape[:-2]
    assert torch.all(est <= sigma1 * (1 + 1e-12))
    assert torch.all(est > 0)


def test_spectral_norm_accuracy_with_gap_and_dtypes():
    s = torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    A = spectrum_matrix((3, 20, 4), s, 0)
    est = spectral_norm(A, 20)
    assert torch.allclose(est, torch.full((3,), 3.0, dtype=torch.float64), rtol=1e-7)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        e = spectral_norm(A.to(dt).mT, 20)  # wide input
        assert e.dtype == dt
        assert torch.allclose(e.double(), torch.full((3,), 3.0, dtype=torch.float64), rtol=1e-2)


@pytest.mark.parametrize("scale", [0.0, 1e30, 1e-30])
def test_spectral_norm_zero_and_extreme_scales(scale):
    A = torch.eye(5) * 2 * scale
    est = spectral_norm(A, 3)
    assert torch.isfinite(est) and float(est) == pytest.approx(2 * scale, rel=1e-5)


def test_spectral_norm_errors():
    with pytest.raises(ValueError, match="n_iter must be >= 0, got -2"):
        spectral_norm(torch.randn(3, 3), -2)
    with pytest.raises(ValueError, match="A contains NaN or Inf"):
        spectral_norm(torch.tensor([[math.inf, 0.0]]))
    with pytest.raises(TypeError, match="A.*torch.int64"):
        spectral_norm(torch.ones(2, 2, dtype=torch.int64))
