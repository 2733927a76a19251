"""Orthogonalisation and projector refresh never turn finite input into NaN/Inf:
zero, rank-deficient, 1×n, n×1, huge (1e30) and tiny (1e-30) scales, fp32 and bf16."""

from __future__ import annotations

import itertools

import pytest
import torch

from matrixopt.linalg.orthogonalization import orthogonalize
from matrixopt.linalg.projectors import basis_overlap, lowrank_basis

SHAPES = [(1, 7), (7, 1), (1, 1), (6, 9), (9, 6), (2, 5, 4)]
SCALES = [1.0, 1e30, 1e-30, 1e-38]


def _inputs(shape):
    g = torch.Generator().manual_seed(sum(shape))
    X = torch.randn(shape, generator=g)
    out = {"zero": torch.zeros(shape), "random": X}
    if min(shape[-2:]) > 1:
        u = torch.randn(*shape[:-1], 1, generator=g)
        v = torch.randn(*shape[:-2], 1, shape[-1], generator=g)
        out["rank1"] = u @ v
        Y = X.clone()
        Y[..., 0, :] = 0  # a zero row
        out["zero_row"] = Y
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("normalization", ["frobenius", "spectral", "aol"])
@pytest.mark.parametrize("method", ["standard", "gram"])
def test_orthogonalize_finite_for_degenerate_and_extreme_inputs(dtype, normalization, method):
    for shape in SHAPES:
        for name, X in _inputs(shape).items():
            ref = None
            for s in SCALES:
                Xs = (X * s).to(dtype)
                O = orthogonalize(Xs, normalization=normalization, method=method)
                assert O.dtype == dtype and O.shape == X.shape
                assert torch.isfinite(O).all(), (shape, name, s)
                if name == "zero":
                    assert not O.any()
                if dtype == torch.float32 and s in (1.0, 1e30, 1e-30):
                    # scale-invariant: a 1e±30 input is not flushed or overflowed
                    if ref is None:
                        ref = O
                    else:
                        torch.testing.assert_close(O, ref, atol=1e-4, rtol=1e-4)


def test_orthogonalize_vector_shapes_give_the_unit_vector():
    for shape in [(1, 7), (7, 1)]:
        x = torch.randn(shape, dtype=torch.float64)
        for s in (1e30, 1e-30):
            O = orthogonalize((x * s).float(), dtype=torch.float32)
            # polar factor of a rank-1 matrix x is x/|x|; the quintic lands within ~0.3 of 1
            u = (x / x.norm()).float()
            assert (O * u).sum() > 0.6
            torch.testing.assert_close(O / O.norm(), u, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["warm", "rsvd", "svd"])
def test_lowrank_basis_orthonormal_for_degenerate_and_extreme_inputs(dtype, method):
    for shape in SHAPES:
        batch = shape if len(shape) == 3 else (1, *shape)
        for (name, X), s, side in itertools.product(_inputs(batch).items(), SCALES,
                                                    ["left", "right"]):
            G = (X * s).to(dtype)
            k = batch[-2] if side == "left" else batch[-1]
            for rank in sorted({1, min(batch[-2:])}):
                P = lowrank_basis(G, rank, method=method, side=side, seed=0,
                                  dtype=torch.float32)
                P2 = lowrank_basis(G, rank, method=method, side=side, previous=P, seed=1,
                                   dtype=torch.float32)
                for B in (P, P2):
                    assert B.shape == (batch[0], k, rank)
                    assert torch.isfinite(B).all(), (shape, name, s, side, rank)
                    eye = torch.eye(rank).expand(batch[0], rank, rank)
                    torch.testing.assert_close(B.mT @ B, eye, atol=1e-4, rtol=0)
                Q = basis_overlap(P2, P, side)
                assert torch.isfinite(Q).all()


def test_lowrank_basis_of_zero_keeps_a_warm_start():
    # a zero gradient has no dominant subspace: the previous basis is a valid answer
    prev = lowrank_basis(torch.randn(1, 8, 6), 2, method="svd", side="left")
    P = lowrank_basis(torch.zeros(1, 8, 6), 2, method="warm", side="left", previous=prev)
    assert torch.isfinite(P).all()
    torch.testing.assert_close(P.mT @ P, torch.eye(2).unsqueeze(0), atol=1e-5, rtol=0)
