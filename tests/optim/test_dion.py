"""matrixopt.optim.Dion: the class on the optimizer core (the functional math is
checked against a float64 transcription of dion_reference in
functional/test_functional_dion.py; the generic contracts by the registry)."""

from __future__ import annotations

import math

import pytest
import torch
from functional.test_functional_dion import reference_step  # tests/optim/functional
from torch import nn

from matrixopt.optim import Dion, GroupError, muon_param_groups
from matrixopt.optim.functional.dion import dion_rank


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_class_step_matches_reference_and_adamw_path_runs() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(6, 10).double()
    W0 = lin.weight.detach().clone()
    opt = Dion(lin.parameters(), lr=0.05, weight_decay=0.1, momentum=0.9, rank_fraction=0.5,
               qr_method="qr", eps=1e-8)
    Q = None
    Wr, Mr = W0.clone(), torch.zeros_like(W0)
    g = torch.Generator().manual_seed(1)
    b0 = lin.bias.detach().clone()
    for _ in range(3):
        G = torch.randn(10, 6, generator=g, dtype=torch.float64)
        lin.weight.grad, lin.bias.grad = G.clone(), torch.ones(10, dtype=torch.float64)
        if Q is None:  # Q is drawn at the first step: the reference starts from it
            opt.step()
            Q0 = opt.state[lin.weight]["Q"]
            assert Q0.shape == (10, dion_rank(10, 6, 0.5))
            Wr, Mr, Q = reference_step(Wr, G, Mr, _first_q(lin, opt), lr=0.05, mu=0.9, wd=0.1,
                                       eps=1e-8, transpose=True)
            continue
        opt.step()
        Wr, Mr, Q = reference_step(Wr, G, Mr, Q, lr=0.05, mu=0.9, wd=0.1, eps=1e-8,
                                   transpose=True)
    torch.testing.assert_close(lin.weight.detach(), Wr, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(opt.state[lin.weight]["momentum_buffer"], Mr)
    torch.testing.assert_close(opt.state[lin.weight]["Q"], Q)
    assert not torch.equal(lin.bias.detach(), b0)
    assert sorted(opt.state[lin.bias]) == ["exp_avg", "exp_avg_sq", "nonfinite_count", "step"]


def _first_q(lin: nn.Linear, opt: Dion) -> torch.Tensor:
    """The initial Q: the same seed rule as the optimizer's (a fresh optimizer draws it)."""
    twin = nn.Linear(6, 10).double()
    o = Dion(twin.parameters(), lr=0.0, rank_fraction=0.5, weight_decay=0.0)
    twin.weight.grad = torch.zeros_like(twin.weight)
    o.step()  # zero gradient on zero momentum: Q is kept as drawn
    return o.state[twin.weight]["Q"].clone()


def test_initial_q_is_the_same_for_the_same_seed_and_position() -> None:
    qs = []
    for seed in (0, 0, 1):
        lin = nn.Linear(4, 6, bias=False)
        opt = Dion([lin.weight], seed=seed, rank=2)
        lin.weight.grad = torch.zeros_like(lin.weight)
        opt.step()
        qs.append(opt.state[lin.weight]["Q"])
    assert torch.equal(qs[0], qs[1]) and not torch.equal(qs[0], qs[2])


def test_routing_with_muon_param_groups() -> None:
    model = nn.Sequential(nn.Embedding(11, 8), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 11))
    opt = Dion(muon_param_groups(model), lr=0.01, rank_fraction=0.25)
    x = torch.randint(0, 11, (4, 5))
    model(x).sum().backward()
    opt.step()
    assert "Q" in opt.state[model[1].weight]
    for p in (model[0].weight, model[3].weight, model[2].weight):  # embedding, head, norm
        assert "exp_avg" in opt.state[p] and "Q" not in opt.state[p]


def test_nonfinite_gradient_is_skipped() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(5, 7)
    opt = Dion(lin.parameters(), lr=0.1, rank=2)
    lin.weight.grad, lin.bias.grad = torch.randn(7, 5), torch.randn(7)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[lin.weight].items()}
    w0 = lin.weight.detach().clone()
    g = torch.randn(7, 5)
    g[0, 0] = float("nan")
    lin.weight.grad = g
    opt.step()
    assert torch.equal(lin.weight.detach(), w0)
    st = opt.state[lin.weight]
    assert torch.equal(st["momentum_buffer"], before["momentum_buffer"])
    assert torch.equal(st["Q"], before["Q"]) and int(st["nonfinite_count"]) == 1


@pytest.mark.parametrize("state_dtype", ["bf16", "int8"])
def test_state_dtype_trains(state_dtype: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.Tanh(), nn.Linear(96, 1))
    opt = Dion(model.parameters(), lr=0.02, rank_fraction=0.25, state_dtype=state_dtype)
    x = torch.randn(128, 64)
    y = torch.sin(x.sum(-1, keepdim=True))
    losses = []
    for _ in range(25):
        loss = (model(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]
    mom = opt.state[model[0].weight]["momentum_buffer"]
    assert mom.dtype == (torch.bfloat16 if state_dtype == "bf16" else torch.int8)


def test_batched_view_steps_each_matrix_as_the_reference() -> None:
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(3, 6, 4, dtype=torch.float64))
    opt = Dion([p], lr=0.1, weight_decay=0.0, rank=2, matrix_view="batch", qr_method="qr")
    p.grad = torch.zeros_like(p)
    opt.step()  # zero gradient, zero momentum: nothing moves, Q stays as drawn
    Q0 = opt.state[p]["Q"].clone()
    assert Q0.shape == (3, 6, 2)
    W0 = p.detach().clone()
    G = torch.randn(3, 6, 4, dtype=torch.float64)
    p.grad = G
    opt.step()
    for i in range(3):
        Wr, Mr, Qr = reference_step(W0[i], G[i], torch.zeros(6, 4, dtype=torch.float64), Q0[i],
                                    lr=0.1, mu=0.95, wd=0.0, eps=1e-8, transpose=True)
        torch.testing.assert_close(p.detach()[i], Wr)
        torch.testing.assert_close(opt.state[p]["Q"][i], Qr)


@pytest.mark.parametrize("kw,match", [
    ({"rank_fraction": 0.0}, "rank_fraction"),
    ({"rank_fraction": 1.5}, "rank_fraction"),
    ({"rank": 0}, "rank"),
    ({"qr_method": "householder"}, "qr_method"),
    ({"adjust_lr": "bogus"}, "adjust_lr"),
    ({"comm_dtype": torch.int8}, "comm_dtype"),
    ({"momentum": 1.0}, "momentum"),
    ({"oversample": 0.5}, "oversample"),
    ({"algorithm": "dion"}, "needs parameters with >= 2 dims"),
])
def test_bad_hyperparameters_name_group_key_and_value(kw: dict, match: str) -> None:
    with pytest.raises(GroupError, match=match) as e:
        Dion([nn.Parameter(torch.zeros(3))] if "algorithm" in kw else
             [nn.Parameter(torch.zeros(3, 3))], **kw)
    assert "param_groups[0]" in str(e.value)


def test_match_rms_adamw_update_rms_is_lr_times_0p2() -> None:
    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(12, 20))
    opt = Dion([W], lr=1e-3, weight_decay=0.0, rank_fraction=0.25,
               adjust_lr="match_rms_adamw")
    W0 = W.detach().clone()
    W.grad = torch.randn(12, 20)
    opt.step()
    rms = (W.detach() - W0).square().mean().sqrt()
    assert float(rms) == pytest.approx(0.2e-3, rel=1e-4)
    assert math.isclose(dion_rank(12, 20, 0.25), 3)


def test_step_creates_nothing_on_the_default_device() -> None:
    """Q, the sketch and every temporary are made on the parameter's device: under a
    ``torch.device("meta")`` default a tensor created without a device would be meta."""
    lin = nn.Linear(40, 60)
    opt = Dion(lin.parameters(), rank_fraction=0.25)  # rcqr: n = 40 > r = 10
    lin.weight.grad, lin.bias.grad = torch.randn(60, 40), torch.randn(60)
    with torch.device("meta"):
        opt.step()
        opt.step()
    st = opt.state[lin.weight]
    assert st["Q"].device.type == "cpu" and bool(torch.isfinite(lin.weight).all())
