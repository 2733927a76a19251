"""Dion's functional step against a float64 transcription of microsoft/dion's
``dion_reference.py`` (``dion_update`` with ``power_iters=1``, Householder QR, plain
tensors), and the algebraic properties of REFERENCE-NEXT §6."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from matrixopt.optim._nonfinite import StepFlags
from matrixopt.optim.functional.dion import (
    dion_apply_,
    dion_factors,
    dion_rank,
    dion_update_scale,
    orthonormalize,
    sketch_rows,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny matrices: intra-op threads only oversubscribe the shared cores
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _qr_pos(P: Tensor) -> Tensor:
    """Householder Q with a positive-diagonal R (the canonical QR factor)."""
    Q, R = torch.linalg.qr(P)
    return Q * torch.where(R.diagonal() < 0, -1.0, 1.0).to(P.dtype)


def reference_step(W: Tensor, G: Tensor, M: Tensor, Q: Tensor, *, lr: float, mu: float,
                   wd: float, eps: float, transpose: bool
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """dion_reference.dion_update, dense float64 (the all-zero fix included)."""
    M = M + G
    B = M.T if transpose else M
    P = _qr_pos(B @ Q)
    R = B.T @ P
    if bool((B == 0).all()):
        P, R = torch.zeros_like(P), Q.clone()
    M = M - (1 - mu) * (R @ P.T if transpose else P @ R.T)
    Qn = R / (R.norm(dim=0, keepdim=True) + eps)
    W = W * (1 - lr * wd)
    fan_out, fan_in = W.shape
    upd = Qn @ P.T if transpose else P @ Qn.T
    return W - math.sqrt(fan_out / fan_in) * lr * upd, M, Qn


def _sketch(k: int, n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    g = torch.Generator().manual_seed(k * 31 + n)
    return (torch.randn(k, n, generator=g, dtype=torch.float64) / math.sqrt(k)).to(device, dtype)


def _ours(W: Tensor, G: Tensor, M: Tensor, Q: Tensor, *, method: str, lr: float, mu: float,
          wd: float, eps: float, flags: StepFlags | None = None) -> None:
    m, n = W.shape
    r = Q.shape[-1]
    B = M.view(1, m, n)
    B.add_(G.view(1, m, n))
    Qv = Q.view(1, m, r)
    P = dion_factors([B], [Qv], method=method, sketch=_sketch)
    dion_apply_([W.view(1, m, n)], [B], [Qv], P, lr=lr, weight_decay=wd, mu=mu,
                scales=[dion_update_scale(m, n, r, "spectral")], eps=eps,
                flags=flags or StepFlags.off())


@pytest.mark.parametrize("method", ["qr", "rcqr"])
@pytest.mark.parametrize("shape,r", [((7, 5), 2), ((5, 7), 3), ((6, 6), 6), ((9, 4), 1),
                                     ((4, 9), 4)])
def test_matches_dion_reference_float64(shape: tuple[int, int], r: int, method: str) -> None:
    g = torch.Generator().manual_seed(0)
    m, n = shape
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    M = torch.zeros(m, n, dtype=torch.float64)
    Q = torch.randn(m, r, generator=g, dtype=torch.float64)
    Wr, Mr, Qr = W.clone(), M.clone(), Q.clone()
    kw = dict(lr=0.05, mu=0.9, wd=0.1, eps=1e-8)
    for _ in range(5):
        G = torch.randn(m, n, generator=g, dtype=torch.float64)
        Wr, Mr, Qr = reference_step(Wr, G, Mr, Qr, transpose=True, **kw)
        _ours(W, G, M, Q, method=method, **kw)
    torch.testing.assert_close(W, Wr, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(M, Mr, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(Q, Qr, rtol=1e-9, atol=1e-10)


def test_float32_close_to_float64_reference() -> None:
    g = torch.Generator().manual_seed(1)
    m, n, r = 12, 8, 3
    W = torch.randn(m, n, generator=g)
    M, Q = torch.zeros(m, n), torch.randn(m, r, generator=g)
    Wr, Mr, Qr = W.double(), M.double(), Q.double()
    kw = dict(lr=0.02, mu=0.95, wd=0.01, eps=1e-8)
    for _ in range(4):
        G = torch.randn(m, n, generator=g)
        Wr, Mr, Qr = reference_step(Wr, G.double(), Mr, Qr, transpose=True, **kw)
        _ours(W, G, M, Q, method="rcqr", **kw)
    torch.testing.assert_close(W.double(), Wr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(M.double(), Mr, rtol=1e-4, atol=1e-5)


def test_reference_transposed_is_the_untransposed_step_of_the_transpose() -> None:
    """Our orientation is dion's on Wᵀ: the reference says both are one algorithm."""
    g = torch.Generator().manual_seed(2)
    m, n, r = 6, 4, 2
    W, G = torch.randn(m, n, generator=g, dtype=torch.float64), torch.randn(
        m, n, generator=g, dtype=torch.float64)
    M, Q = torch.randn(m, n, generator=g, dtype=torch.float64), torch.randn(
        m, r, generator=g, dtype=torch.float64)
    a = reference_step(W, G, M, Q, lr=0.1, mu=0.9, wd=0.0, eps=0.0, transpose=True)
    b = reference_step(W.T, G.T, M.T, Q, lr=0.1, mu=0.9, wd=0.0, eps=0.0, transpose=False)
    # the update scale is sqrt(fan_out/fan_in) of the stored matrix, so compare ΔW/scale
    torch.testing.assert_close((a[0] - W) / math.sqrt(m / n), (b[0].T - W) / math.sqrt(n / m))
    torch.testing.assert_close(a[1], b[1].T)


@pytest.mark.parametrize("method", ["qr", "rcqr"])
def test_orthonormalize_is_canonical_qr(method: str) -> None:
    g = torch.Generator().manual_seed(3)
    P = torch.randn(3, 40, 5, generator=g, dtype=torch.float64)
    S = _sketch(sketch_rows(5, 1.25), 40, P.device, P.dtype)
    Q = orthonormalize(P, method, S)
    torch.testing.assert_close(Q.mT @ Q, torch.eye(5, dtype=torch.float64).expand(3, 5, 5))
    R = Q.mT @ P  # P = Q R with R upper triangular, positive diagonal
    assert (R.diagonal(dim1=-2, dim2=-1) > 0).all()
    torch.testing.assert_close(torch.tril(R, -1), torch.zeros_like(R), atol=1e-10, rtol=0)
    ref = torch.stack([_qr_pos(p) for p in P])
    torch.testing.assert_close(Q, ref)


def test_rcqr_of_rank_deficient_input_is_finite_and_spans_it() -> None:
    g = torch.Generator().manual_seed(4)
    base = torch.randn(30, 2, generator=g)
    P = torch.cat([base, base @ torch.randn(2, 2, generator=g)], dim=1)  # rank 2 of 4
    Q = orthonormalize(P, "rcqr", _sketch(128, 30, P.device, P.dtype))
    assert torch.isfinite(Q).all()
    proj = Q @ (Q.mT @ P)
    torch.testing.assert_close(proj, P, atol=1e-4, rtol=1e-4)
    assert orthonormalize(torch.zeros(30, 4), "rcqr", _sketch(128, 30, P.device, P.dtype)
                          ).isfinite().all()


def test_full_rank_error_feedback_is_plain_momentum() -> None:
    """rank = min(m, n): P spans the rows of B, so RPᵀ = B and M ← μ(M + G)."""
    g = torch.Generator().manual_seed(5)
    for m, n in ((6, 4), (4, 6)):
        r = min(m, n)
        W, M = torch.randn(m, n, generator=g, dtype=torch.float64), torch.randn(
            m, n, generator=g, dtype=torch.float64)
        Q = torch.randn(m, r, generator=g, dtype=torch.float64)
        G = torch.randn(m, n, generator=g, dtype=torch.float64)
        expect = 0.9 * (M + G)
        _ours(W, G, M, Q, method="rcqr", lr=0.1, mu=0.9, wd=0.0, eps=1e-12)
        torch.testing.assert_close(M, expect)


@pytest.mark.parametrize("r", [2, 5])
def test_repeated_fixed_matrix_converges_to_its_top_r_polar_factor(r: int) -> None:
    """Warm-started power iteration on a fixed B: QPᵀ → U_r V_rᵀ."""
    g = torch.Generator().manual_seed(6)
    U, _ = torch.linalg.qr(torch.randn(8, 5, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    B0 = U @ torch.diag(torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5], dtype=torch.float64)) @ V.T
    Q = torch.randn(1, 8, r, generator=g, dtype=torch.float64)
    for _ in range(40):
        B = B0.clone().view(1, 8, 5)
        P = dion_factors([B], [Q], method="qr")
        W = torch.zeros(1, 8, 5, dtype=torch.float64)
        dion_apply_([W], [B], [Q], P, lr=1.0, weight_decay=0.0, mu=0.0, scales=[1.0], eps=0.0)
    torch.testing.assert_close(-W[0], U[:, :r] @ V[:, :r].T, atol=1e-8, rtol=0)


def test_zero_gradient_on_zero_momentum_only_decays() -> None:
    m, n, r = 5, 4, 2
    W = torch.randn(m, n)
    W0 = W.clone()
    M, Q = torch.zeros(m, n), torch.randn(m, r)
    Q0 = Q.clone()
    _ours(W, torch.zeros(m, n), M, Q, method="rcqr", lr=0.1, mu=0.9, wd=0.5, eps=1e-8)
    assert torch.isfinite(W).all() and torch.isfinite(Q).all()
    torch.testing.assert_close(W, W0 * (1 - 0.05))
    torch.testing.assert_close(Q, Q0)
    assert (M == 0).all()


def test_skipped_flag_leaves_weights_momentum_and_q() -> None:
    g = torch.Generator().manual_seed(7)
    m, n, r = 5, 4, 2
    W, M, Q = (torch.randn(m, n, generator=g), torch.randn(m, n, generator=g),
               torch.randn(m, r, generator=g))
    W0, M0, Q0 = W.clone(), M.clone(), Q.clone()
    flags = StepFlags([torch.tensor(False)])
    _ours(W, torch.zeros(m, n), M, Q, method="qr", lr=0.1, mu=0.9, wd=0.5, eps=1e-8,
          flags=flags)
    assert torch.equal(W, W0) and torch.equal(M, M0) and torch.equal(Q, Q0)


def test_rank_and_scale_rules() -> None:
    assert dion_rank(512, 2048, 0.25) == 128
    assert dion_rank(10, 7, 0.25) == 2            # ceil(1.75)
    assert dion_rank(10, 7, 0.25, 4) == 4
    assert dion_rank(10, 7, 1.0, 4) == 7          # clipped to min(m, n)
    assert dion_rank(10, 7, 0.1, rank=100) == 7
    assert dion_update_scale(8, 2, 1, "spectral") == pytest.approx(2.0)
    # match_rms_adamw: ‖QPᵀ‖_F = √r, so RMS(s·QPᵀ) = 0.2
    s = dion_update_scale(12, 8, 3, "match_rms_adamw")
    assert s * math.sqrt(3 / (12 * 8)) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="adjust_lr"):
        dion_update_scale(2, 2, 1, "bogus")
    with pytest.raises(ValueError, match="qr_method"):
        orthonormalize(torch.zeros(3, 2), "householder")
