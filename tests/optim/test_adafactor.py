"""Adafactor: torch.optim.Adafactor parity, float64 reference, memory, errors, state."""

from __future__ import annotations

import io
import math

import pytest
import torch

from matrixopt.optim._common import GroupError
from matrixopt.optim.adafactor import Adafactor, factored_dims


def _grads(shapes, steps, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g, dtype=dtype) for s in shapes] for _ in range(steps)]


def _run(opt_cls, params, grad_seq, **kw):
    ps = [p.clone().requires_grad_() for p in params]
    opt = opt_cls(ps, **kw)
    for gs in grad_seq:
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        opt.step()
    return ps, opt


# ---------------------------------------------------------------------------
# torch.optim.Adafactor parity
# ---------------------------------------------------------------------------
# Where the definitions coincide (derived from torch/optim/_adafactor.py):
# * torch's step is min(lr, 1/sqrt t) * max(eps2, RMS(W)): our relative step with
#   parameter scaling and lr capping the relative step (lr=None is the cap 1e-2,
#   torch's default lr);
# * torch clamps mean(R) and V^ at eps1 / eps1^2 instead of adding eps1 to G^2: with
#   eps1 = 1e-30 and O(1) gradients both are exact no-ops in float32;
# * torch factors the LAST two dims, we factor the two LARGEST: they agree for
#   tensors whose last two dims are the largest;
# * weight decay differs (torch: lr*wd, HF: alpha_t*wd), so weight_decay = 0.
@pytest.mark.parametrize("ours, theirs", [
    ({}, {"lr": 1e-2}),
    ({"lr": 0.3, "clip_threshold": 2.0, "decay_rate": -0.5},
     {"lr": 0.3, "d": 2.0, "beta2_decay": -0.5}),
])
def test_matches_torch_adafactor(ours, theirs):
    shapes = [(6, 5), (7,), (2, 8, 6), (1, 9)]
    params = [torch.randn(s, generator=torch.Generator().manual_seed(i))
              for i, s in enumerate(shapes)]
    params.append(torch.zeros(4, 3))  # RMS(W) = 0 -> the eps2 floor
    shapes.append((4, 3))
    seq = _grads(shapes, 12, seed=3)
    a, oa = _run(Adafactor, params, seq, eps=(1e-30, 1e-3), **ours)
    b, ob = _run(torch.optim.Adafactor, params, seq, eps=(1e-30, 1e-3), **theirs)
    for x, y, p in zip(a, b, params):
        assert (x - p).abs().max() > 1e-6  # the parameters really moved
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    for x, y in zip(a, b):
        sa, sb = oa.state[x], ob.state[y]
        assert float(sa["step"]) == float(sb["step"]) == 12
        if x.ndim > 1:
            torch.testing.assert_close(sa["exp_avg_sq_row"], sb["row_var"], rtol=1e-5, atol=0)
            torch.testing.assert_close(sa["exp_avg_sq_col"], sb["col_var"], rtol=1e-5, atol=0)
        else:
            torch.testing.assert_close(sa["exp_avg_sq"], sb["variance"], rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------
# float64 reference of Shazeer & Stern 2018 (Hugging Face conventions)
# ---------------------------------------------------------------------------
def _reference(params, grad_seq, dims, *, lr=None, eps=(1e-30, 1e-3), clip=1.0, decay=-0.8,
               beta1=None, wd=0.0, scale_parameter=True, relative_step=True, warmup_init=False,
               beta2_cap=None):
    """Independent float64 Adafactor: factored tensors are moved to [..., m, n] explicitly."""
    W = [p.double().clone() for p in params]
    R = [None] * len(W)
    C = [None] * len(W)
    V = [torch.zeros_like(w) for w in W]
    M = [torch.zeros_like(w) for w in W]
    for t, gs in enumerate(grad_seq, start=1):
        beta2 = 1.0 - t ** decay
        if beta2_cap is not None:
            beta2 = min(beta2, beta2_cap)
        if relative_step:
            cap = 1e-6 * t if warmup_init else (1e-2 if lr is None else lr)
            rho = min(cap, 1.0 / math.sqrt(t))
        else:
            rho = lr
        for i, (w, g) in enumerate(zip(W, gs)):
            g = g.double()
            alpha = rho * (max(eps[1], math.sqrt(float((w * w).mean())))
                           if scale_parameter else 1.0)
            if dims[i] is None:
                V[i] = beta2 * V[i] + (1 - beta2) * (g * g + eps[0])
                u = g / V[i].sqrt()
            else:
                x = g.movedim(dims[i], (-2, -1))
                sq = x * x + eps[0]
                r_new, c_new = sq.mean(-1), sq.mean(-2)
                R[i] = (r_new if R[i] is None and beta2 == 0
                        else beta2 * (0 if R[i] is None else R[i]) + (1 - beta2) * r_new)
                C[i] = (c_new if C[i] is None and beta2 == 0
                        else beta2 * (0 if C[i] is None else C[i]) + (1 - beta2) * c_new)
                vhat = R[i][..., :, None] * C[i][..., None, :] / R[i].mean(-1)[..., None, None]
                u = (x / vhat.sqrt()).movedim((-2, -1), dims[i])
            if clip is not None:
                u = u / max(1.0, math.sqrt(float((u * u).mean())) / clip)
            u = alpha * u
            if beta1 is not None:
                M[i] = beta1 * M[i] + (1 - beta1) * u
                u = M[i]
            W[i] = w - wd * alpha * w - u
    return W


@pytest.mark.parametrize("kw", [
    {},
    {"beta1": 0.9, "weight_decay": 0.1},
    {"lr": 0.01, "relative_step": False, "scale_parameter": False, "weight_decay": 0.1},
    {"warmup_init": True, "clip_threshold": None},
    {"beta2_cap": 0.9, "decay_rate": -0.6, "clip_threshold": 0.5, "scale_parameter": False},
])
def test_matches_float64_reference(kw):
    shapes = [(8, 6, 3, 3), (5, 7), (9,), (3, 10, 4)]
    dims = [(0, 1), (0, 1), None, (1, 2)]  # conv over out/in; 3-D over its two largest
    assert [factored_dims(s) for s in shapes] == dims
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    seq = _grads(shapes, 8, seed=2, dtype=torch.float64)
    ours, _ = _run(Adafactor, params, seq, **kw)
    ref_kw = dict(lr=kw.get("lr"), clip=kw.get("clip_threshold", 1.0),
                  decay=kw.get("decay_rate", -0.8), beta1=kw.get("beta1"),
                  wd=kw.get("weight_decay", 0.0), scale_parameter=kw.get("scale_parameter", True),
                  relative_step=kw.get("relative_step", True),
                  warmup_init=kw.get("warmup_init", False), beta2_cap=kw.get("beta2_cap"))
    ref = _reference(params, seq, dims, **ref_kw)
    for x, r, p in zip(ours, ref, params):
        assert (r - p).abs().max() > 1e-6
        torch.testing.assert_close(x.detach(), r, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------
# memory and factoring
# ---------------------------------------------------------------------------
def _state_numel(opt, p):
    # scalar counters (step, nonfinite_count) are O(1)
    return sum(t.numel() for k, t in opt.state[p].items() if k not in ("step", "nonfinite_count"))


def test_state_is_linear_in_m_plus_n():
    shapes = [(64, 48), (16, 8, 3, 3), (4, 32, 24), (48, 64)]
    params = [torch.zeros(s) for s in shapes]
    ps, opt = _run(Adafactor, params, _grads(shapes, 1))
    assert _state_numel(opt, ps[0]) == 64 + 48
    st = opt.state[ps[1]]
    assert st["exp_avg_sq_row"].shape == (16, 1, 3, 3)  # conv: factored over out and in
    assert st["exp_avg_sq_col"].shape == (1, 8, 3, 3)
    assert _state_numel(opt, ps[1]) == (16 + 8) * 9
    assert _state_numel(opt, ps[2]) == 4 * (32 + 24)
    assert _state_numel(opt, ps[3]) == 64 + 48
    assert all(t.dtype == torch.float32 for s in opt.state.values() for k, t in s.items()
               if k != "nonfinite_count")


def test_factored_dims_rules():
    assert factored_dims((5,)) is None
    assert factored_dims(()) is None
    assert factored_dims((64, 128, 3, 3)) == (0, 1)
    assert factored_dims((3, 3, 64, 32)) == (2, 3)
    assert factored_dims((3, 3, 3, 3)) == (0, 1)   # ties -> earlier dims
    assert factored_dims((7, 2, 9)) == (0, 2)
    assert factored_dims((64, 4), min_dim_size_to_factor=8) is None
    assert factored_dims((64, 8), min_dim_size_to_factor=8) == (0, 1)


def test_min_dim_size_to_factor_keeps_full_second_moment():
    shapes = [(64, 4), (64, 16)]
    ps, opt = _run(Adafactor, [torch.randn(s) for s in shapes], _grads(shapes, 2),
                   min_dim_size_to_factor=8)
    assert set(opt.state[ps[0]]) == {"step", "exp_avg_sq", "nonfinite_count"}
    assert opt.state[ps[0]]["exp_avg_sq"].shape == (64, 4)
    assert set(opt.state[ps[1]]) == {"step", "exp_avg_sq_row", "exp_avg_sq_col", "nonfinite_count"}


def test_bf16_momentum_and_bf16_params():
    shapes = [(12, 10), (10,)]
    params = [torch.randn(s, generator=torch.Generator().manual_seed(5)) for s in shapes]
    seq = _grads(shapes, 6, seed=6)
    kw = dict(lr=0.05, relative_step=False, beta1=0.9)
    full, _ = _run(Adafactor, params, seq, **kw)
    half, opt = _run(Adafactor, params, seq, momentum_dtype=torch.bfloat16, **kw)
    assert opt.state[half[0]]["exp_avg"].dtype == torch.bfloat16
    assert half[0].dtype == torch.float32
    for x, y in zip(half, full):
        torch.testing.assert_close(x, y, rtol=0, atol=2e-3)  # bf16 rounding of the momentum only
    bp, bopt = _run(Adafactor, [p.bfloat16() for p in params],
                    [[g.bfloat16() for g in gs] for gs in seq], **kw)
    assert bp[0].dtype == torch.bfloat16
    assert bopt.state[bp[0]]["exp_avg_sq_row"].dtype == torch.float32
    for x, y in zip(bp, full):
        torch.testing.assert_close(x.float(), y, rtol=0, atol=0.05)


# ---------------------------------------------------------------------------
# step contract
# ---------------------------------------------------------------------------
def test_no_per_parameter_host_sync(monkeypatch):
    # nonfinite="skip" (the default) folds device flags into the writes: no read either
    shapes = [(6, 5), (5,), (3, 4, 4)]
    ps = [torch.randn(s).requires_grad_() for s in shapes]
    opt = Adafactor(ps, beta1=0.9, weight_decay=0.1)
    for p in ps:
        p.grad = torch.randn_like(p)

    def boom(*a, **k):
        raise AssertionError("host sync in Adafactor.step")

    for name in ("item", "__float__", "__bool__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    opt.step()
    opt.step()


def test_grad_untouched_and_missing_grad_untouched_and_zero_grad_finite():
    a = torch.randn(5, 4, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    z = torch.randn(4, 4, requires_grad=True)
    b0 = b.detach().clone()
    opt = Adafactor([a, b, z], beta1=0.5, weight_decay=0.1)
    a.grad = torch.randn(5, 4)
    z.grad = torch.zeros(4, 4)
    g0 = a.grad.clone()
    opt.step()
    assert torch.equal(a.grad, g0)
    assert torch.equal(b, b0) and b not in opt.state
    assert torch.isfinite(z).all() and torch.isfinite(a).all()


def test_state_dict_round_trip_resumes_bit_identically():
    shapes = [(6, 5), (5,), (4, 3, 2, 2)]
    params = [torch.randn(s, generator=torch.Generator().manual_seed(9)) for s in shapes]
    seq = _grads(shapes, 8, seed=10)
    kw = dict(beta1=0.9, weight_decay=0.01, momentum_dtype=torch.bfloat16)
    full, _ = _run(Adafactor, params, seq, **kw)
    first, opt = _run(Adafactor, params, seq[:4], **kw)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "params": [p.detach() for p in first]}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = [p.clone().requires_grad_() for p in saved["params"]]
    opt2 = Adafactor(resumed, **kw)
    opt2.load_state_dict(saved["opt"])
    assert opt2.state[resumed[0]]["exp_avg"].dtype == torch.bfloat16
    for gs in seq[4:]:
        for p, g in zip(resumed, gs):
            p.grad = g.clone()
        opt2.step()
    for x, y in zip(resumed, full):
        assert torch.equal(x, y)


def test_works_with_lr_scheduler_and_closure():
    w = torch.randn(6, 4, requires_grad=True)
    target = torch.randn(6, 4)
    opt = Adafactor([w], lr=0.2, relative_step=False, scale_parameter=False)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.97)

    def closure():
        opt.zero_grad()
        loss = ((w - target) ** 2).sum()
        loss.backward()
        return loss

    first = float(closure().detach())
    for _ in range(60):
        opt.step(closure)
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2 * 0.97 ** 60)
    assert float(closure().detach()) < 0.05 * first


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("kw, key", [
    ({"lr": None, "relative_step": False}, "lr"),
    ({"warmup_init": True, "relative_step": False, "lr": 0.1}, "warmup_init"),
    ({"eps": (1e-30,)}, "eps"),
    ({"eps": (-1.0, 1e-3)}, "eps"),
    ({"decay_rate": 0.5}, "decay_rate"),
    ({"beta1": 1.0}, "beta1"),
    ({"clip_threshold": 0.0}, "clip_threshold"),
    ({"weight_decay": -1.0}, "weight_decay"),
    ({"min_dim_size_to_factor": 0}, "min_dim_size_to_factor"),
    ({"beta2_cap": 1.0}, "beta2_cap"),
    ({"momentum_dtype": torch.int8}, "momentum_dtype"),
    ({"lr": -1.0}, "lr"),
])
def test_bad_group_values_name_the_group(kw, key):
    good = torch.zeros(2, 2, requires_grad=True)
    bad = torch.zeros(3, requires_grad=True)
    with pytest.raises(GroupError, match=rf"param_groups\[1\]: {key}"):
        Adafactor([{"params": [good]}, {"params": [bad], **kw}])


def test_unknown_key_and_bad_gradients():
    p = torch.zeros(2, 2, requires_grad=True)
    with pytest.raises(GroupError, match="unknown key"):
        Adafactor([{"params": [p], "betas": (0.9, 0.99)}])
    opt = Adafactor([p])
    p.grad = torch.zeros(2, 2).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
