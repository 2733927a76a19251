"""nystrom / lowrank_split / lowrank_split_model against float64 NumPy references.

References (REFERENCE-NEXT.md §12): PiSSA B = U_r diag(sqrt(S_r/s)),
A = diag(sqrt(S_r/s)) V_rᵀ, W_res = W − s·BA (= the SVD tail); Nyström C U⁺ R is
exact for a rank-r matrix with invertible U = W[I, J].
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from matrixopt.linalg import lowrank_split, lowrank_split_model, nystrom

F64 = torch.float64


def _with_spectrum(m: int, n: int, s: np.ndarray, seed: int = 0, batch: tuple = ()) -> np.ndarray:
    rng = np.random.default_rng(seed)
    k = len(s)
    out = np.empty((*batch, m, n))
    for idx in np.ndindex(*batch):
        U = np.linalg.qr(rng.standard_normal((m, k)))[0]
        V = np.linalg.qr(rng.standard_normal((n, k)))[0]
        out[idx] = (U * s) @ V.T
    return out


def _optimal_error(W: np.ndarray, r: int) -> float:
    return float(np.sqrt(np.sum(np.linalg.svd(W, compute_uv=False)[r:] ** 2)))


# ------------------------------------------------------------------ Nyström
@settings(max_examples=20, deadline=None)
@given(m=st.integers(3, 16), n=st.integers(3, 16), r=st.integers(1, 3),
       seed=st.integers(0, 2**31 - 1), sketch=st.sampled_from(["gaussian", "columns"]))
def test_nystrom_is_exact_on_rank_r_matrices(m: int, n: int, r: int, seed: int,
                                             sketch: str) -> None:
    rng = np.random.default_rng(seed)
    scale = 10.0 ** rng.integers(-8, 8)
    W = rng.standard_normal((2, m, r)) @ rng.standard_normal((2, r, n)) * scale
    L, M, R, _, _ = nystrom(torch.from_numpy(W), r, sketch=sketch, generator=seed)
    np.testing.assert_allclose((L @ M @ R).numpy(), W, rtol=0,
                               atol=1e-10 * np.abs(W).max())


def test_nystrom_code_faithful_nlora_indices() -> None:
    """NLoRA's code: A = W[:r, :], B = W[:, :r], N = W[:r, :r] (here with its pseudo-inverse)."""
    W = np.random.default_rng(3).standard_normal((9, 7))
    L, M, R, rows, cols = nystrom(torch.from_numpy(W), 3, sketch="columns", rows=range(3),
                                  cols=range(3))
    np.testing.assert_array_equal(L.numpy(), W[:, :3])
    np.testing.assert_array_equal(R.numpy(), W[:3, :])
    np.testing.assert_allclose(M.numpy(), np.linalg.pinv(W[:3, :3]), rtol=1e-12)
    assert rows.tolist() == [0, 1, 2] and cols.tolist() == [0, 1, 2]


def test_nystrom_pivoted_columns_keep_the_core_well_conditioned() -> None:
    """On a 1/i spectrum the pivoted CUR is within 2× the optimal rank-8 error
    (measured 1.75×; choosing rows and columns from two independent sketches gave 39.9×)."""
    W = _with_spectrum(60, 80, 1.0 / np.arange(1, 61))
    L, M, R, _, _ = nystrom(torch.from_numpy(W), 8, sketch="columns")
    assert np.linalg.norm(W - (L @ M @ R).numpy()) < 2.0 * _optimal_error(W, 8)


@pytest.mark.parametrize("n_iter,bound", [(0, 2.6), (2, 1.1)])
def test_nystrom_gaussian_error_and_power_iterations(n_iter: int, bound: float) -> None:
    """Recorded on this spectrum: 2.41× (plain) and 1.07× (2 power iterations) the optimum."""
    W = _with_spectrum(60, 80, 1.0 / np.arange(1, 61))
    L, M, R, _, _ = nystrom(torch.from_numpy(W), 8, n_iter=n_iter)
    assert np.linalg.norm(W - (L @ M @ R).numpy()) < bound * _optimal_error(W, 8)


# ------------------------------------------------------------------ PiSSA split
@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_svd_split_is_pissa(scale: float) -> None:
    W = np.random.default_rng(4).standard_normal((2, 12, 9))
    r = 4
    B, A, res, S = lowrank_split(torch.from_numpy(W), r, "svd", scale=scale)
    U, s, Vt = np.linalg.svd(W, full_matrices=False)
    np.testing.assert_allclose(S.numpy(), s[..., :r], rtol=1e-12)
    # A Aᵀ = diag(S_r/s), BᵀB = diag(S_r/s), s·BA = U_r S_r V_rᵀ, σ₁(W_res) = σ_{r+1}(W)
    np.testing.assert_allclose((A @ A.mT).numpy(), np.stack([np.diag(x) for x in s[:, :r] / scale]),
                               atol=1e-12)
    np.testing.assert_allclose((B.mT @ B).numpy(), np.stack([np.diag(x) for x in s[:, :r] / scale]),
                               atol=1e-12)
    np.testing.assert_allclose(scale * (B @ A).numpy(),
                               (U[..., :r] * s[:, None, :r]) @ Vt[..., :r, :], atol=1e-12)
    np.testing.assert_allclose(np.linalg.svd(res.numpy(), compute_uv=False)[:, 0], s[:, r],
                               rtol=1e-10)
    # signs: the largest-magnitude entry of each column of B is positive
    idx = B.abs().argmax(dim=-2, keepdim=True)
    assert bool((torch.gather(B, -2, idx) > 0).all())


@pytest.mark.parametrize("method", ["svd", "rsvd", "nystrom"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_residual_reproduces_w(method: str, dtype: torch.dtype, tol: float) -> None:
    """‖W_res + sBA − W‖_F ≤ tol·‖W‖_F with the factors as returned (rounded)."""
    W = torch.from_numpy(np.random.default_rng(5).standard_normal((3, 40, 24))).to(dtype)
    B, A, res, _ = lowrank_split(W, 6, method, scale=0.5)
    assert B.dtype == A.dtype == res.dtype == dtype
    assert B.shape == (3, 40, 6) and A.shape == (3, 6, 24) and res.shape == W.shape
    back = res.double() + 0.5 * B.double() @ A.double()
    assert float((back - W.double()).norm()) <= tol * float(W.double().norm())


@pytest.mark.parametrize("method,n_iter,bound", [("rsvd", 2, 1.001), ("nystrom", 2, 1.001),
                                                  ("nystrom", 0, 2.3)])
def test_random_methods_near_optimal_on_a_decaying_spectrum(method: str, n_iter: int,
                                                            bound: float) -> None:
    W = _with_spectrum(80, 120, 0.85 ** np.arange(60), seed=6, batch=(2,))
    r = 12
    _, _, res, _ = lowrank_split(torch.from_numpy(W), r, method, n_iter=n_iter)
    for i in range(2):
        assert np.linalg.norm(res[i].numpy()) <= bound * _optimal_error(W[i], r)


def test_rsvd_subspace_close_to_exact() -> None:
    """Principal-angle sines between the rsvd and exact top-r left factors (n_iter=4)."""
    W = _with_spectrum(80, 120, 0.8 ** np.arange(60), seed=7)
    B, _, _, _ = lowrank_split(torch.from_numpy(W), 8, "rsvd", n_iter=4)
    U = np.linalg.svd(W)[0][:, :8]
    Q = np.linalg.qr(B.numpy())[0]
    sines = np.sqrt(np.clip(1 - np.linalg.svd(U.T @ Q, compute_uv=False) ** 2, 0, None))
    assert sines.max() < 1e-6


# ------------------------------------------------------------------ models
class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 16)
        self.q = nn.Linear(16, 16)
        self.k = nn.Linear(16, 16)
        self.up = nn.Linear(16, 24)
        self.tiny = nn.Linear(16, 2)


def test_model_helper_batches_same_shapes_and_leaves_the_model_alone() -> None:
    torch.manual_seed(0)
    net = _Net().double()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    out = lowrank_split_model(net, 4, "svd", scale=2.0)
    assert sorted(out) == ["k.weight", "q.weight", "up.weight"]  # tiny: min side 2 < 4
    for name, split in out.items():
        want = lowrank_split(net.get_parameter(name).detach(), 4, "svd", scale=2.0)
        for a, b in zip(split, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    only = lowrank_split_model(net, 4, "rsvd", include=lambda n, m: n == "up")
    assert list(only) == ["up.weight"]


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("call,match", [
    (lambda W: lowrank_split(W, 4, "eig"), "method must be one of"),
    (lambda W: lowrank_split(W, 7, "svd"), "rank must be <= min"),
    (lambda W: lowrank_split(W, 2, "svd", scale=0.0), "scale must be a finite number > 0"),
    (lambda W: lowrank_split(W, 2, "rsvd", sketch="columns"), "method='nystrom' only"),
    (lambda W: nystrom(W, 2, rows=[0, 1]), "sketch='columns'"),
    (lambda W: nystrom(W, 2, sketch="columns", rows=[0]), "rows must hold rank = 2"),
    (lambda W: nystrom(W, 2, sketch="columns", cols=[0, 9]), "cols must index 0..5"),
    (lambda W: nystrom(W, 2, sketch="columns", n_iter=1), "apply to sketch='gaussian' only"),
    (lambda W: nystrom(W, 2, sketch="qr"), "sketch must be one of"),
    (lambda W: nystrom(W, 2, rcond=2.0), "rcond must be None or a number in"),
    (lambda W: lowrank_split(W * float("nan"), 2), "NaN or Inf"),
])
def test_bad_input_errors(call, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises((ValueError, TypeError), match=match):
        call(torch.ones(8, 6))
