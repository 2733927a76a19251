"""inv_root and sherman_morrison against float64 references (scipy / numpy), plus
hypothesis properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from matrixopt.linalg import inv_root, newton_iterations, sherman_morrison


def spd(n: int, kappa: float, b: int = 3, seed: int = 0) -> torch.Tensor:
    """float64 SPD batch with eigenvalues log-spaced in [1/kappa, 1] and random vectors."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(b, n, n, dtype=torch.float64, generator=g))
    lam = torch.logspace(0, -math.log10(kappa), n, dtype=torch.float64)
    return (Q * lam.unsqueeze(-2)) @ Q.mT


def scipy_root(A: torch.Tensor, p: float, eps: float = 0.0) -> torch.Tensor:
    """float64 reference: scipy.linalg.fractional_matrix_power(A + eps I, -1/p)."""
    out = []
    for a in A.reshape(-1, A.shape[-1], A.shape[-1]).double().numpy():
        r = scipy.linalg.fractional_matrix_power(a + eps * np.eye(a.shape[0]), -1.0 / p)
        out.append(np.real(r))
    return torch.from_numpy(np.stack(out)).reshape(A.shape)


def rel(X: torch.Tensor, ref: torch.Tensor) -> float:
    return float((X.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("method", ["eigh", "newton"])
@pytest.mark.parametrize("p", [1, 2, 4])
def test_float64_matches_scipy(method: str, p: int) -> None:
    A = spd(12, 1e3)
    assert rel(inv_root(A, p, method=method, eps=1e-6), scipy_root(A, p, 1e-6)) < 1e-9


def test_fractional_root_eigh_matches_scipy() -> None:
    A = spd(10, 1e2)
    assert rel(inv_root(A, 2.5), scipy_root(A, 2.5)) < 1e-10


def test_diagonal_and_scaled_identity() -> None:
    d = torch.tensor([4.0, 1.0, 0.25, 9.0], dtype=torch.float64)
    for method in ("eigh", "newton"):
        X = inv_root(torch.diag(d), 2, method=method)
        torch.testing.assert_close(X, torch.diag(d.rsqrt()), rtol=1e-10, atol=1e-12)
        Y = inv_root(3.0 * torch.eye(5, dtype=torch.float64), 4, method=method)
        torch.testing.assert_close(Y, 3.0 ** -0.25 * torch.eye(5, dtype=torch.float64),
                                   rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("p", [1, 2, 4])
@pytest.mark.parametrize("kappa", [1e2, 1e4, 1e6])
def test_newton_fp32_matches_eigh_route_to_documented_tolerance(p: int, kappa: float) -> None:
    """The issue's target: fp32 Newton agrees with the (float64) eigh route within 1e-2
    for κ up to 1e6, and is never worse than fp32 eigh by more than that."""
    A = spd(64, kappa, b=2)
    ref = inv_root(A, p, method="eigh")
    newton = inv_root(A.float(), p, method="newton")
    eigh32 = inv_root(A.float(), p, method="eigh")
    assert newton.dtype == torch.float32
    assert rel(newton, ref) < 1e-2
    assert rel(newton, ref) <= rel(eigh32, ref) + 1e-3
    if kappa <= 1e4:
        assert rel(newton, ref) < 2e-3 and rel(eigh32, ref) < 2e-3


def test_eps_regularises_an_ill_conditioned_input() -> None:
    """κ(A) = 1e9 but κ(A + εI) ≈ 1e6: the fixed-count Newton (no host read) reaches
    the documented float32 accuracy with newton_iterations' count."""
    A = spd(48, 1e9, b=2, seed=3)
    eps = 1e-6
    ref = scipy_root(A, 4, eps)
    fixed = inv_root(A.float(), 4, method="newton", eps=eps, iters=newton_iterations(4, 1e6))
    assert rel(fixed, ref) < 1e-2


def test_bf16_input_is_computed_in_fp32() -> None:
    A = spd(16, 1e2)
    X = inv_root(A.bfloat16(), 2, method="newton")
    assert X.dtype == torch.bfloat16
    assert rel(X, scipy_root(A.bfloat16().double(), 2)) < 1e-2


def test_singular_psd_with_eps_is_finite_and_rounding_negatives_are_shifted() -> None:
    v = torch.randn(8, 2, dtype=torch.float64)
    A = (v @ v.T).float()  # rank 2: eigenvalues at rounding level, some negative
    for method in ("eigh", "newton"):
        X = inv_root(A, 4, method=method, eps=1e-3)
        assert torch.isfinite(X).all()
    # the eigh shift: λ_min < eps -> λ - λ_min + eps (all roots stay finite and real)
    X = inv_root(A, 4, method="eigh", eps=1e-3)
    lam = torch.linalg.eigvalsh(X.double())
    assert float(lam.min()) > 0


def test_errors_name_the_argument() -> None:
    A = torch.eye(3)
    with pytest.raises(ValueError, match="integer root"):
        inv_root(A, 2.5, method="newton")
    with pytest.raises(ValueError, match="p must be"):
        inv_root(A, 0)
    with pytest.raises(ValueError, match="eps must be"):
        inv_root(A, 2, eps=-1.0)
    with pytest.raises(ValueError, match="square"):
        inv_root(torch.ones(3, 4), 2)
    with pytest.raises(ValueError, match="method"):
        inv_root(A, 2, method="svd")
    with pytest.raises(ValueError, match="v must have shape"):
        sherman_morrison(A, torch.ones(4))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 9), p=st.sampled_from([1, 2, 3, 4]), seed=st.integers(0, 10_000),
       log_kappa=st.floats(0.0, 3.0))
def test_hypothesis_newton_invariant_and_eigh_agree(n: int, p: int, seed: int,
                                                   log_kappa: float) -> None:
    A = spd(n, 10.0 ** log_kappa, b=2, seed=seed) * 10.0 ** (seed % 7 - 3)
    X_n = inv_root(A, p, method="newton")
    X_e = inv_root(A, p, method="eigh")
    assert rel(X_n, X_e) < 1e-8
    # X^p A = I: the definition
    eye = torch.eye(n, dtype=torch.float64).expand_as(A)
    torch.testing.assert_close(torch.linalg.matrix_power(X_n, p) @ A, eye, atol=1e-7, rtol=0)
    torch.testing.assert_close(X_n, X_n.mT, atol=0, rtol=0)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 10), seed=st.integers(0, 10_000),
       decay=st.floats(0.5, 1.0), weight=st.floats(0.0, 2.0))
def test_hypothesis_sherman_morrison_equals_inverse_of_update(n: int, seed: int, decay: float,
                                                            weight: float) -> None:
    A = spd(n, 1e2, b=2, seed=seed)
    v = torch.randn(2, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    X = torch.linalg.inv(A)
    out = sherman_morrison(X, v, decay=decay, weight=weight)
    ref = torch.linalg.inv(decay * A + weight * v.unsqueeze(-1) * v.unsqueeze(-2))
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(out, out.mT, atol=0, rtol=0)


def test_sherman_morrison_batched_tensor_coefficients_fp32() -> None:
    A = spd(6, 10.0, b=3)
    v = torch.randn(3, 6, dtype=torch.float64)
    g = torch.tensor([0.9, 0.99, 1.0], dtype=torch.float64)
    c = torch.tensor([0.1, 0.01, 1.0], dtype=torch.float64)
    out = sherman_morrison(torch.linalg.inv(A).float(), v.float(), decay=g.float(),
                           weight=c.float())
    ref = torch.linalg.inv(g[:, None, None] * A + c[:, None, None] * v[:, :, None] * v[:, None])
    assert out.dtype == torch.float32
    assert rel(out, ref) < 1e-5
