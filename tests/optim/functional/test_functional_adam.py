"""matrixopt.optim.functional.adam against torch.optim.AdamW and a float64 reference,
and the ``nonfinite="skip"`` flags folded into its writes."""

from __future__ import annotations

import pytest
import torch

from matrixopt.optim._nonfinite import StepFlags
from matrixopt.optim.functional import adam_direction, adam_moments_, adamw_

SHAPES = [(7, 5), (3,), (1, 9), (4, 2, 3)]
KW = dict(lr=3e-3, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)


def _data(dtype: torch.dtype, seed: int = 0, steps: int = 4):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g).to(dtype) for s in SHAPES]
    grads = [[torch.randn(s, generator=g).to(dtype) for s in SHAPES] for _ in range(steps)]
    return params, grads


def _run(params, grads, flags_per_step=None):
    ps = [p.clone() for p in params]
    ms = [torch.zeros_like(p) for p in ps]
    vs = [torch.zeros_like(p) for p in ps]
    steps = [torch.tensor(0.0) for _ in ps]
    for t, gs in enumerate(grads):
        flags = flags_per_step[t] if flags_per_step else StepFlags.off()
        adamw_(ps, flags.safe(gs), ms, vs, steps, flags=flags, **KW)
    return ps, ms, vs, steps


def _reference(params, grads):
    """Float64 AdamW, written from the paper's formulas."""
    out = []
    for i, p in enumerate(params):
        w = p.double().clone()
        m = torch.zeros_like(w)
        v = torch.zeros_like(w)
        for t, gs in enumerate(grads, start=1):
            g = gs[i].double()
            m = 0.9 * m + 0.1 * g
            v = 0.99 * v + 0.01 * g * g
            w = w * (1 - KW["lr"] * KW["weight_decay"])
            w = w - KW["lr"] * (m / (1 - 0.9 ** t)) / ((v / (1 - 0.99 ** t)).sqrt() + 1e-8)
        out.append(w)
    return out


def test_adamw_equals_torch_adamw_bitwise_and_float64_reference():
    params, grads = _data(torch.float32)
    ps, _, _, steps = _run(params, grads)
    ref = [torch.nn.Parameter(p.clone()) for p in params]
    opt = torch.optim.AdamW(ref, lr=KW["lr"], betas=(0.9, 0.99), eps=1e-8,
                            weight_decay=KW["weight_decay"], foreach=True)
    for gs in grads:
        for p, g in zip(ref, gs):
            p.grad = g
        opt.step()
    for a, b, r in zip(ps, ref, _reference(params, grads)):
        assert torch.equal(a, b.detach())
        torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=1e-7)
    assert all(float(s) == len(grads) for s in steps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_flags_all_finite_is_bitwise_the_plain_step(dtype):
    params, grads = _data(dtype)
    plain = _run(params, grads)
    flagged = _run(params, grads, [StepFlags.compute(gs) for gs in grads])
    for a, b in zip(plain, flagged):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_skipped_parameter_and_moments_unchanged_others_as_if_alone(dtype):
    params, grads = _data(dtype)
    bad = [[g.clone() for g in gs] for gs in grads]
    bad[2][0].view(-1)[3] = float("nan")
    bad[2][3].view(-1)[0] = float("inf")
    flags = [StepFlags.compute(gs) for gs in bad]
    assert [bool(f) for f in flags[2].ok] == [False, True, True, False]
    ps = [p.clone() for p in params]
    ms = [torch.zeros_like(p) for p in ps]
    vs = [torch.zeros_like(p) for p in ps]
    steps = [torch.tensor(0.0) for _ in ps]
    for t, gs in enumerate(bad):
        before = [(p.clone(), m.clone(), v.clone()) for p, m, v in zip(ps, ms, vs)]
        adamw_(ps, flags[t].safe(gs), ms, vs, steps, flags=flags[t], **KW)
        if t == 2:
            for i in (0, 3):
                for now, was in zip((ps[i], ms[i], vs[i]), before[i]):
                    assert torch.equal(now, was)
            for i in (1, 2):  # (a 3e-3 step is below half precision's resolution)
                assert not torch.equal(ms[i], before[i][1])
    # the untouched parameters follow exactly the clean trajectory
    clean = _run(params, grads)
    for i in (1, 2):
        assert torch.equal(ps[i], clean[0][i])
    assert all(torch.isfinite(p).all() for p in ps)


def test_folded_direction_equals_unfolded():
    _, grads = _data(torch.float64)
    ms = [torch.zeros_like(g) for g in grads[0]]
    vs = [torch.zeros_like(g) for g in grads[0]]
    steps = [torch.tensor(0.0) for _ in ms]
    for gs in grads:
        torch._foreach_add_(steps, 1.0)
        adam_moments_(gs, ms, vs, 0.9, 0.99)
    n, c = adam_direction(ms, vs, steps, 0.9, 0.99, 1e-8)
    nf, cf = adam_direction(ms, vs, steps, 0.9, 0.99, 1e-8, folded=True)
    assert c == [1.0] * len(n)
    for a, b, s in zip(n, nf, cf):
        torch.testing.assert_close(a, b * s, rtol=1e-12, atol=1e-14)


def test_skip_count_is_device_side_int64():
    gs = [torch.ones(3), torch.tensor([float("nan"), 1.0])]
    flags = StepFlags.compute(gs)
    states: list[dict] = [{}, {}]
    flags.count_(states, [g.device for g in gs])
    flags.count_(states, [g.device for g in gs])
    assert [int(s["nonfinite_count"]) for s in states] == [0, 2]
    assert states[0]["nonfinite_count"].dtype == torch.int64
