"""Muon(orthogonalizer=...): the option's wiring, validation and checkpoints.

The operators themselves are checked against float64 NumPy references in
tests/linalg/test_operators.py; here one Muon step is compared with the update
formula written out with them:
W ← W(1 − ηλ) − η·0.2·sqrt(max(m, n))·sqrt(min(m, n))·op(D), D = (1−μ)G + μ(1−μ)G.
"""

from __future__ import annotations

import math

import pytest
import torch

from matrixopt.linalg import auon, hybrid_auon, racs
from matrixopt.optim import Muon
from matrixopt.optim._common import GroupError

LR, WD, MU = 0.05, 0.1, 0.95
OPS = {"auon": auon, "racs": racs,
       "hybrid_auon": lambda X: hybrid_auon(X, steps=1, dtype=torch.float64)}


def _expected(W: torch.Tensor, G: torch.Tensor, op, view: tuple[int, int, int]  # type: ignore
              ) -> torch.Tensor:
    b, m, n = view
    D = (1 - MU) * G + MU * (1 - MU) * G  # Nesterov direction after one step from M = 0
    O = op(D.reshape(b, m, n)).reshape(W.shape) * math.sqrt(min(m, n))
    return W * (1 - LR * WD) - LR * 0.2 * math.sqrt(max(m, n)) * O


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("shape,kw,view", [
    ((12, 7), {}, (1, 12, 7)),
    ((5, 3, 2, 2), {}, (1, 5, 12)),             # conv weight, flattened
    ((12, 7), {"split": 3}, (3, 4, 7)),          # fused QKV rows
    ((2, 6, 4), {"matrix_view": "batch"}, (2, 6, 4)),  # stacked experts
])
def test_one_step_is_the_formula(name: str, shape: tuple[int, ...], kw: dict,
                                 view: tuple[int, int, int]) -> None:
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(shape, dtype=torch.float64, generator=g)
    G = torch.randn(shape, dtype=torch.float64, generator=g)
    p = torch.nn.Parameter(W0.clone())
    p.grad = G.clone()
    Muon([p], lr=LR, weight_decay=WD, momentum=MU, orthogonalizer=name,
         ns_dtype=torch.float64, **kw).step()
    torch.testing.assert_close(p.detach(), _expected(W0, G, OPS[name], view),
                               rtol=1e-12, atol=1e-12)
    assert torch.equal(p.grad, G)  # the gradient is read, never written


def test_hybrid_auon_takes_ns_steps() -> None:
    g = torch.Generator().manual_seed(1)
    W0, G = (torch.randn(9, 6, dtype=torch.float64, generator=g) for _ in range(2))
    out = {}
    for steps in (None, 3):
        p = torch.nn.Parameter(W0.clone())
        p.grad = G.clone()
        Muon([p], lr=LR, weight_decay=WD, momentum=MU, orthogonalizer="hybrid_auon",
             ns_steps=steps, ns_dtype=torch.float64).step()
        out[steps] = p.detach()
    torch.testing.assert_close(out[3], _expected(
        W0, G, lambda X: hybrid_auon(X, steps=3, dtype=torch.float64), (1, 9, 6)),
        rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out[3], out[None])


def test_default_is_newton_schulz() -> None:
    p = torch.nn.Parameter(torch.zeros(4, 3))
    assert Muon([p]).param_groups[0]["orthogonalizer"] == "newton_schulz"


@pytest.mark.parametrize("bad", ["svd", "AuON", 3, None])
def test_unknown_orthogonalizer_is_rejected_naming_group_and_value(bad: object) -> None:
    p = torch.nn.Parameter(torch.zeros(4, 3))
    with pytest.raises(GroupError, match=r"param_groups\[1\].*orthogonalizer") as e:
        Muon([{"params": [torch.nn.Parameter(torch.zeros(2, 2))]},
              {"params": [p], "orthogonalizer": bad}])
    assert repr(bad) in str(e.value) or str(bad) in str(e.value)


def test_checkpoint_without_the_key_loads_with_the_default() -> None:
    """A state dict saved before the option existed has no "orthogonalizer" key."""
    p = torch.nn.Parameter(torch.randn(4, 3))
    p.grad = torch.randn(4, 3)
    opt = Muon([p], orthogonalizer="racs")
    opt.step()
    sd = opt.state_dict()
    del sd["param_groups"][0]["orthogonalizer"]
    fresh = Muon([p])
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["orthogonalizer"] == "newton_schulz"
    fresh.step()
    # and a saved choice survives a round trip
    again = Muon([p])
    again.load_state_dict(opt.state_dict())
    assert again.param_groups[0]["orthogonalizer"] == "racs"
