"""Device rules of the optimizer state (issue 13, items 6 and 8).

* GaLore's schedule counters (``iteration``, ``refresh_step``, ``refresh_offset``,
  ``seed``) and every ``step`` are CPU tensors, whatever the default device, and
  the step moves a counter found on another device back to the CPU.
* ``projector="random"``: a skipped (non-finite) step that falls on a refresh
  leaves the basis and the moments in the same subspace. The CPU counters advance
  on a skipped step on every device alike (matrixopt.optim._nonfinite).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from matrixopt.optim import Adafactor, GaLoreAdafactor, GaLoreAdamW, Muon
from matrixopt.optim._state import COUNTERS

SHAPES = [(8, 6), (5,)]
GAP = 3  # refreshes at iterations 1, 4, 7


def _params():
    g = torch.Generator().manual_seed(0)
    return [nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def _grad(step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=g) for s in SHAPES]


def _galore(ps, cls=GaLoreAdamW, **kw):
    return cls([{"params": ps[:1], "rank": 2, "update_proj_gap": GAP, "stagger": 1,
                 "projector": "random", **kw}, {"params": ps[1:]}], **(
        {"lr": 1e-2} if cls is GaLoreAdamW else {}))


def _run(opt, ps, grads):
    for gs in grads:
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("cls", [GaLoreAdamW, GaLoreAdafactor])
@pytest.mark.parametrize("on_refresh", ["transport", "reset", "keep"])
def test_skipped_random_refresh_keeps_basis_and_moments_together(cls, on_refresh):
    clean = [_grad(t) for t in range(6)]
    poisoned = _grad(99)
    poisoned[0].view(-1)[3] = float("nan")
    # A: 3 clean steps, a NaN gradient at iteration 4 (a refresh), then 2 clean steps
    ps_a = _params()
    opt_a = _galore(ps_a, cls, on_refresh=on_refresh)
    _run(opt_a, ps_a, clean[:3])
    _run(opt_a, ps_a, [poisoned])
    _run(opt_a, ps_a, clean[3:5])
    # B: the same without the poisoned step
    ps_b = _params()
    opt_b = _galore(ps_b, cls, on_refresh=on_refresh)
    _run(opt_b, ps_b, clean[:5])
    sa, sb = opt_a.state[ps_a[0]], opt_b.state[ps_b[0]]
    assert int(sa["nonfinite_count"]) == 1
    # the random basis' generating step: the refresh happened in both runs
    assert int(sa["refresh_step"]) == 4 and int(sb["refresh_step"]) == 4
    # the CPU counters advanced on the skipped step (documented, every device)
    assert int(sa["step"]) == int(sb["step"]) + 1
    assert int(sa["iteration"]) == int(sb["iteration"]) + 1
    moments = [k for k in ("exp_avg", "exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col")
               if k in sb]
    if cls is GaLoreAdamW:
        # Adam's moment updates do not depend on the counter: the moments moved into
        # the new basis at the skipped step and then followed run B's gradients exactly
        for k in moments:
            assert torch.equal(sa[k], sb[k]), k
    else:
        # Adafactor's EMA weight follows the (advanced) counter: same subspace, finite
        for k in moments:
            assert sa[k].shape == sb[k].shape and torch.isfinite(sa[k]).all(), k
    assert torch.isfinite(ps_a[0]).all()


@pytest.mark.parametrize("make", [
    lambda ps: Muon(ps, lr=0.02),
    lambda ps: Adafactor(ps),
    lambda ps: GaLoreAdamW([{"params": ps[:1], "rank": 2}, {"params": ps[1:]}]),
    lambda ps: GaLoreAdafactor([{"params": ps[:1], "rank": 2}, {"params": ps[1:]}]),
], ids=["muon", "adafactor", "galore-adamw", "galore-adafactor"])
def test_counters_are_created_on_the_cpu_whatever_the_default_device(make):
    ps = _params()
    opt = make(ps)
    for p, g in zip(ps, _grad(0)):
        p.grad = g
    with torch.device("meta"):  # a user's set_default_device must not move counters
        opt.step()
    for st in opt.state.values():
        for k in ("step", *COUNTERS):
            if k in st:
                assert st[k].device.type == "cpu" and st[k].ndim == 0, k


def test_a_counter_loaded_onto_another_device_goes_back_to_the_cpu():
    """counters_to_cpu_ (run by GaLore's step before reading a counter) moves a counter a
    foreign loader left on an accelerator back to the CPU, once; CPU ones stay as they are."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from matrixopt.optim._state import counters_to_cpu_
    with FakeTensorMode():
        cpu = torch.tensor(3, dtype=torch.int64)
        st = {"iteration": torch.zeros((), dtype=torch.int64, device="cuda"),
              "seed": cpu, "exp_avg": torch.zeros(4, 2, device="cuda")}
        counters_to_cpu_(st)
        assert st["iteration"].device.type == "cpu" and st["seed"] is cpu
        assert st["exp_avg"].device.type == "cuda"  # only the counters move
