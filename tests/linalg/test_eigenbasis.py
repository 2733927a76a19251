"""eigh_basis / eigh_refresh against float64 torch.linalg.eigh and a dense transcription of
SOAP's refresh (nikhilvyas/SOAP get_orthogonal_matrix_QR)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from matrixopt.linalg import eigh_basis, eigh_refresh, permute_dim


def _psd(d: int, seed: int, decades: float = 3.0, batch: tuple[int, ...] = ()) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(*batch, d, d, generator=g, dtype=torch.float64)).Q
    lam = torch.logspace(0, -decades, d, dtype=torch.float64).expand(*batch, d)
    return (U * lam.unsqueeze(-2)) @ U.mT


def _soap_refresh_reference(A: torch.Tensor, Q: torch.Tensor):
    """Official order: est = diag(Qᵀ A Q), sort descending, Q ← qr(A Q[:, idx]).Q (float64)."""
    est = torch.diagonal(Q.mT @ A @ Q)
    idx = torch.argsort(est, descending=True)
    return torch.linalg.qr(A @ Q[:, idx]).Q, idx


def _same_up_to_signs(X: torch.Tensor, Y: torch.Tensor, tol: float) -> None:
    signs = torch.sign((X * Y).sum(-2, keepdim=True))
    torch.testing.assert_close(X, Y * signs, atol=tol, rtol=0)


def test_eigh_basis_matches_float64_eigh_descending():
    A = _psd(12, 0, decades=4)
    Q, ok = eigh_basis(A.float())
    assert Q.dtype == torch.float32 and bool(ok)
    _, V = torch.linalg.eigh(A)
    _same_up_to_signs(Q.double(), V.flip(-1), 1e-3)


def test_eigh_basis_bad_inputs_give_identity():
    A = torch.stack([_psd(5, 1).float(), torch.full((5, 5), float("nan")), torch.zeros(5, 5)])
    Q, ok = eigh_basis(A)
    assert ok.tolist() == [True, False, False]
    assert torch.isfinite(Q).all()
    torch.testing.assert_close(Q[1], torch.eye(5))
    torch.testing.assert_close(Q[2], torch.eye(5))


@settings(max_examples=25, deadline=None)
@given(d=st.integers(2, 16), seed=st.integers(0, 10_000))
def test_refresh_matches_official_transcription(d: int, seed: int):
    A = _psd(d, seed, decades=2)
    g = torch.Generator().manual_seed(seed + 1)
    Q0 = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64)).Q
    Q, perm, ok = eigh_refresh(A, Q0)
    Qr, idx = _soap_refresh_reference(A, Q0)
    assert bool(ok)
    assert torch.equal(perm, idx)
    _same_up_to_signs(Q, Qr, 1e-10)
    torch.testing.assert_close(Q.mT @ Q, torch.eye(d, dtype=torch.float64), atol=1e-12, rtol=0)
    # sign-aligned with the previous (permuted) columns
    assert ((Q * Q0[:, perm]).sum(-2) >= 0).all()


@settings(max_examples=6, deadline=None)
@given(d=st.integers(2, 12), seed=st.integers(0, 10_000))
def test_repeated_refresh_converges_to_eigh(d: int, seed: int):
    # eigenvalue ratios 0.4 between neighbours: 40 power steps converge to ~1e-16
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64)).Q
    A = (U * (0.4 ** torch.arange(d, dtype=torch.float64))) @ U.mT
    Q = torch.eye(d, dtype=torch.float64)
    for _ in range(40):
        Q, _, _ = eigh_refresh(A, Q)
    _same_up_to_signs(Q, U, 1e-6)


def test_refresh_of_exact_basis_is_a_fixed_point():
    A = _psd(8, 3)
    _, V = torch.linalg.eigh(A)
    Q, perm, ok = eigh_refresh(A, V)  # ascending input: reordered, signs kept
    assert perm.tolist() == list(range(7, -1, -1))
    torch.testing.assert_close(Q, V.flip(-1), atol=1e-10, rtol=0)


def test_refresh_batched_equals_one_by_one_and_float32():
    A = _psd(6, 4, batch=(3,)).float()
    Q0 = torch.linalg.qr(torch.randn(3, 6, 6)).Q
    Q, perm, ok = eigh_refresh(A, Q0)
    assert Q.dtype == torch.float32 and ok.all()
    for i in range(3):
        Qi, pi, _ = eigh_refresh(A[i], Q0[i])
        torch.testing.assert_close(Q[i], Qi, atol=1e-5, rtol=0)
        assert torch.equal(perm[i], pi)


def test_refresh_keeps_previous_basis_on_bad_factor():
    Q0 = torch.linalg.qr(torch.randn(3, 4, 4)).Q
    A = torch.stack([_psd(4, 5).float(), torch.zeros(4, 4), torch.eye(4) * float("inf")])
    Q, perm, ok = eigh_refresh(A, Q0)
    assert ok.tolist() == [True, False, False]
    assert torch.isfinite(Q).all()
    torch.testing.assert_close(Q[1:], Q0[1:])
    assert perm[1:].tolist() == [[0, 1, 2, 3]] * 2


def test_permute_dim_and_errors():
    x = torch.arange(6.0).reshape(2, 3)
    assert permute_dim(x, torch.tensor([2, 0, 1]), 1).tolist() == [[2, 0, 1], [5, 3, 4]]
    with pytest.raises(ValueError, match="perm"):
        permute_dim(x, torch.tensor([0, 1]), 1)
    with pytest.raises(ValueError, match="square"):
        eigh_refresh(torch.zeros(3, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="same shape"):
        eigh_refresh(torch.zeros(3, 3), torch.zeros(4, 4))
