"""``torch.compile`` of a whole training step, and ``torch.amp`` autocast + GradScaler."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from matrixopt.optim import Adafactor, GaLoreAdafactor, GaLoreAdamW, Muon, muon_param_groups

# One configuration per optimizer, each with its optional state in use (Muon's
# AdamW path, a GaLore residual, Adafactor momentum): dynamo tracing costs
# seconds per configuration, the registry suite covers the rest eagerly.
OPTIMIZERS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "muon": lambda m: Muon(muon_param_groups(m), lr=0.02, normuon=True),
    "galore_adamw": lambda m: GaLoreAdamW(m.parameters(), lr=1e-2, rank=2, update_proj_gap=1,
                                          residual="fira"),
    "galore_adafactor": lambda m: GaLoreAdafactor(m.parameters(), rank=2, update_proj_gap=1),
    "adafactor": lambda m: Adafactor(m.parameters(), beta1=0.9),
}


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(32, 8, generator=g), torch.randn(32, 4, generator=g)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_compiled_training_step_matches_eager(name: str) -> None:
    torch._dynamo.reset()
    m1 = model()
    m2 = copy.deepcopy(m1)
    o1, o2 = OPTIMIZERS[name](m1), OPTIMIZERS[name](m2)

    def train_step(net: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
                   y: torch.Tensor) -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.mse_loss(net(x), y)
        loss.backward()
        opt.step()
        return loss

    # backend="aot_eager": dynamo captures forward, backward and the optimizer step
    # and AOT autograd traces them, which is what breaks when an optimizer does
    # something untraceable; inductor's C++ codegen of the same graphs costs
    # minutes on this CPU (measured ~190 s for one Muon step), so it is left to
    # benchmarks.
    compiled = torch.compile(train_step, backend="aot_eager")
    # step 0 creates the state, step 1 updates it; with update_proj_gap=1 step 1
    # also refreshes the GaLore basis and carries the moments over (each distinct
    # path is a new dynamo trace, so no more steps than that)
    for t in range(2):
        x, y = data(t)
        l1 = train_step(m1, o1, x, y)
        l2 = compiled(m2, o2, x, y)
        torch.testing.assert_close(l2, l1, atol=1e-5, rtol=1e-4)
    for (n, a), b in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=lambda s, n=n: f"{n}: {s}")
    assert len(o2.state) == len(o1.state)


def _snapshot(opt: torch.optim.Optimizer, net: nn.Module) -> tuple[list, dict]:
    params = [p.detach().clone() for p in net.parameters()]
    state = copy.deepcopy(opt.state_dict()["state"])
    return params, state


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_autocast_gradscaler_skips_inf_step(name: str) -> None:
    net = model()
    opt = OPTIMIZERS[name](net)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)

    def step(t: int, poison: bool = False) -> None:
        x, y = data(t)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x)
            assert out.dtype == torch.bfloat16
            loss = nn.functional.mse_loss(out.float(), y)
        if poison:
            loss = loss * float("inf")  # every gradient becomes inf/nan
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    for t in range(3):
        step(t)
    assert opt.state, "good steps created optimizer state"
    params, state = _snapshot(opt, net)
    scale = scaler.get_scale()

    step(3, poison=True)
    assert scaler.get_scale() < scale, "GradScaler did not see the inf gradients"
    for a, b in zip(net.parameters(), params):
        assert torch.equal(a, b), "an inf-gradient step changed the parameters"
    after = opt.state_dict()["state"]
    for k, st in state.items():
        for key, v in st.items():
            assert torch.equal(after[k][key], v), f"inf step changed state[{k}][{key!r}]"

    step(4)  # and training goes on: finite, moving
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(net.parameters(), params))
