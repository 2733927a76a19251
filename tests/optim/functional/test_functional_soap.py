"""functional.soap pieces against explicit float64 einsum/loop references."""

from __future__ import annotations

import torch

from matrixopt.optim.functional.soap import (
    factor_products,
    merged_shape,
    permute_moment_,
    preconditioned_dims,
    rotate,
    soap_rebase_,
)


def _orth(d: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64)).Q


def test_rotate_3d_matches_einsum_and_inverts():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    A, C = _orth(3, g), _orth(5, g)
    want = torch.einsum("ijk,ia,kc->ajc", x, A, C)
    torch.testing.assert_close(rotate(x, [A, None, C]), want)
    torch.testing.assert_close(rotate(want, [A, None, C], back=True), x)
    # a leading batch dim is carried
    xb = torch.stack([x, 2 * x])
    torch.testing.assert_close(rotate(xb, [A, None, C])[1], 2 * want)


def test_factor_products_contract_all_other_dims():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    P0, P1, P2 = factor_products(x, [True, False, True])
    assert P1 is None
    torch.testing.assert_close(P0, torch.einsum("ijk,ljk->il", x, x))
    torch.testing.assert_close(P2, torch.einsum("ijk,ijl->kl", x, x))


def test_merge_and_dims_rules():
    assert merged_shape((2, 3, 4, 5), 12, True) == (6, 4, 5)
    assert merged_shape((7,), 3, True) == (7,)
    assert preconditioned_dims((7,), 100, False) == [False]
    assert preconditioned_dims((7,), 100, True) == [True]
    assert preconditioned_dims((7, 200), 100, False) == [True, False]


def test_permute_moment_and_rebase():
    v = torch.arange(12.0).reshape(3, 4)
    permute_moment_(v, [torch.tensor([2, 0, 1]), torch.tensor([3, 2, 1, 0])], (3, 4))
    assert v.tolist() == [[11, 10, 9, 8], [3, 2, 1, 0], [7, 6, 5, 4]]
    g = torch.Generator().manual_seed(2)
    M = torch.randn(3, 4, generator=g, dtype=torch.float64)
    old = [_orth(3, g), _orth(4, g)]
    new = [_orth(3, g), None]
    m = old[0].T @ M @ old[1]  # M in the old basis
    soap_rebase_(m, old, new, (3, 4))
    torch.testing.assert_close(m, new[0].T @ M)  # ... in the new one (dim 1: none)
