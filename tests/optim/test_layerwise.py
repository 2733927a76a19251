"""Layer-wise stepping gives the parameters of regular stepping."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from matrixopt.optim import GaLoreAdamW, LayerwiseStepper, Muon


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 4))


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 12, generator=g), torch.randn(8, 4, generator=g)) for _ in range(n)]


OPTS = {
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1),
    "muon": lambda m: Muon([{"params": [p for p in m.parameters() if p.ndim == 2]},
                            {"params": [p for p in m.parameters() if p.ndim < 2],
                             "algorithm": "adamw"}], lr=1e-2, ns_dtype=torch.float32),
    "galore_int8": lambda m: GaLoreAdamW([{"params": [p for p in m.parameters() if p.ndim == 2],
                                           "rank": 4, "update_proj_gap": 3, "stagger": 1},
                                          {"params": [p for p in m.parameters() if p.ndim < 2]}],
                                         lr=1e-2, state_dtype="int8"),
    # default stagger (4 slots): each matrix's slot comes from its position in the group,
    # so layer-wise stepping refreshes the same matrices at the same steps
    "galore_stagger": lambda m: GaLoreAdamW(
        [{"params": [p for p in m.parameters() if p.ndim == 2], "rank": 4,
          "update_proj_gap": 4},
         {"params": [p for p in m.parameters() if p.ndim < 2]}], lr=1e-2),
}


def _train(name, layerwise, accum, steps=4, sched=False, clip=None):
    model = _model()
    opt = OPTS[name](model)
    lrs = []
    s = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t)) if sched else None
    stepper = LayerwiseStepper(opt, accumulation_steps=accum, max_grad_norm=clip) \
        if layerwise else None
    for i, (x, y) in enumerate(_batches(steps * accum)):
        loss = nn.functional.mse_loss(model(x), y) / accum
        loss.backward()
        if (i + 1) % accum == 0:
            if stepper is None:
                if clip is not None:
                    for p in model.parameters():
                        torch.nn.utils.clip_grad_norm_([p], clip)
                opt.step()
                opt.zero_grad()
            else:
                assert all(p.grad is None for p in model.parameters())
            lrs.append(opt.param_groups[0]["lr"])
            if s is not None:
                s.step()
    return model, lrs, stepper


@pytest.mark.parametrize("name", list(OPTS))
@pytest.mark.parametrize("accum", [1, 4])
def test_same_parameters_as_regular_stepping(name, accum):
    ref, _, _ = _train(name, False, accum)
    lw, _, stepper = _train(name, True, accum)
    assert stepper.param_steps == 4 * len(list(lw.parameters()))
    for a, b in zip(ref.parameters(), lw.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_one_scheduler_drives_all_layers():
    ref, lrs_ref, _ = _train("muon", False, 2, sched=True)
    lw, lrs, _ = _train("muon", True, 2, sched=True)
    assert lrs == lrs_ref == pytest.approx([1e-2 / (1 + t) for t in range(4)], rel=1e-12)
    for a, b in zip(ref.parameters(), lw.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_per_parameter_clipping_matches_clipping_each_gradient():
    ref, _, _ = _train("adamw", False, 1, clip=0.05)
    lw, _, _ = _train("adamw", True, 1, clip=0.05)
    unclipped, _, _ = _train("adamw", False, 1)
    for a, b in zip(ref.parameters(), lw.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(a, b) for a, b in zip(ref.parameters(), unclipped.parameters()))


def test_remove_restores_plain_backward_and_bad_arguments():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with LayerwiseStepper(opt) as stepper:
        before = [p.detach().clone() for p in model.parameters()]
        x, y = _batches(1)[0]
        nn.functional.mse_loss(model(x), y).backward()
        assert all(p.grad is None for p in model.parameters())
        assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    after = [p.detach().clone() for p in model.parameters()]
    nn.functional.mse_loss(model(x), y).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(torch.equal(a, p) for a, p in zip(after, model.parameters()))
    assert stepper.param_steps == len(after)
    with pytest.raises(ValueError, match="accumulation_steps"):
        LayerwiseStepper(opt, accumulation_steps=0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        LayerwiseStepper(opt, max_grad_norm=-1.0)


def test_flush_steps_parameters_left_with_a_gradient():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stepper = LayerwiseStepper(opt, accumulation_steps=3)
    x, y = _batches(1)[0]
    nn.functional.mse_loss(model(x), y).backward()
    assert all(p.grad is not None for p in model.parameters())
    stepper.flush()
    assert all(p.grad is None for p in model.parameters())
    assert stepper.param_steps == len(list(model.parameters()))


def test_galore_stagger_slots_are_the_same_layerwise():
    slots = []
    for layerwise in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(4)])
        opt = OPTS["galore_stagger"](model)
        stepper = LayerwiseStepper(opt) if layerwise else None
        model(torch.randn(8, 16)).square().mean().backward()
        if stepper is None:
            opt.step()
        slots.append([int(opt.state[p]["refresh_offset"]) for p in model.parameters()
                      if p.ndim == 2])
    assert slots[0] == slots[1] == [0, 1, 2, 3]  # four 16x16 matrices, gap 4, 4 slots


class _CountingList(list):
    iterations = 0

    def __iter__(self):
        type(self).iterations += 1
        return super().__iter__()


@pytest.mark.parametrize("name", ["muon", "galore_stagger"])
def test_step_parameters_does_not_walk_the_other_parameters(name):
    """Layer-wise stepping of a matrixopt optimizer is O(1) Python work per parameter:
    after the first step (state created, position table built) stepping one parameter
    never iterates over its group's parameter list."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(40)])
    opt = OPTS[name](model)
    stepper = LayerwiseStepper(opt)
    x = torch.randn(4, 8)
    model(x).square().mean().backward()  # first step: creates state
    for g in opt.param_groups:
        g["params"] = _CountingList(g["params"])
    _CountingList.iterations = 0
    model(x).square().mean().backward()
    assert stepper.param_steps == 2 * len(list(model.parameters()))
    assert _CountingList.iterations == 0
