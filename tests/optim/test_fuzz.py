"""Property tests over optimizer configurations (hypothesis).

Every optimizer, its documented options drawn per group, random group splits
(empty groups included), shapes 1×n, n×1, matrices, 3-D stacks, conv 4-D and
vectors, fp32/bf16 parameters, parameters without gradients. Properties:

* after random steps the weights are finite and keep their dtype, ``p.grad`` is
  never written;
* ``state_dict`` → ``torch.save`` → ``torch.load(weights_only=True)`` → a fresh
  optimizer → continue is bit-identical to never saving;
* with ``nonfinite="skip"``, a NaN/Inf gradient leaves its parameter and state
  bit-identical (and the others still move).

``MATRIXOPT_FUZZ_EXAMPLES`` raises the example count (default 25, derandomised so
the unit suite is reproducible); run e.g. ``MATRIXOPT_FUZZ_EXAMPLES=500`` to search.
"""

from __future__ import annotations

import io
import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from matrixopt.optim import Adafactor, GaLoreAdafactor, GaLoreAdamW, Muon

_N = int(os.environ.get("MATRIXOPT_FUZZ_EXAMPLES", "25"))
SETTINGS = settings(max_examples=_N, deadline=None, derandomize=_N <= 25,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

DIM = st.integers(1, 6)
SHAPE = st.one_of(
    st.tuples(DIM),                                   # vector / bias
    st.tuples(st.just(1), DIM),                       # 1×n
    st.tuples(DIM, st.just(1)),                       # n×1
    st.tuples(DIM, DIM),                              # matrix
    st.tuples(st.integers(1, 3), DIM, DIM),           # stacked experts / conv1d
    st.tuples(DIM, st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)),  # conv2d
)

MUON_OPTS = {
    "lr": st.sampled_from([1e-3, 0.02]),
    "weight_decay": st.sampled_from([0.0, 0.1]),
    "momentum": st.sampled_from([0.0, 0.95]),
    "nesterov": st.booleans(),
    "algorithm": st.sampled_from(["auto", "adamw"]),
    "adjust_lr": st.sampled_from(["match_rms_adamw", "original", "spectral", "none"]),
    "coefficients": st.sampled_from(["polar_express", "keller"]),
    "ns_dtype": st.sampled_from([None, torch.bfloat16, torch.float32]),
    "normalization": st.sampled_from(["frobenius", "spectral", "aol"]),
    "ns_method": st.sampled_from(["auto", "standard", "gram"]),
    "matrix_view": st.sampled_from(["auto", "flatten", "batch"]),
    "normuon": st.booleans(),
    "cautious_wd": st.booleans(),
    "betas": st.sampled_from([(0.9, 0.999), (0.0, 0.5)]),
    "nonfinite": st.sampled_from(["skip", "ignore", "raise"]),
}
ADAFACTOR_OPTS = {
    "lr": st.sampled_from([None, 1e-2]),
    "clip_threshold": st.sampled_from([None, 1.0]),
    "beta1": st.sampled_from([None, 0.9]),
    "weight_decay": st.sampled_from([0.0, 0.1]),
    "scale_parameter": st.booleans(),
    "min_dim_size_to_factor": st.sampled_from([1, 4]),
    "beta2_cap": st.sampled_from([None, 0.999]),
    "momentum_dtype": st.sampled_from([None, torch.bfloat16]),
    "nonfinite": st.sampled_from(["skip", "ignore", "raise"]),
}
GALORE_OPTS = {
    "rank": st.sampled_from([None, 1, 2, 3]),
    "update_proj_gap": st.integers(1, 3),
    "scale": st.sampled_from([0.25, 1.0]),
    "proj_type": st.sampled_from(["std", "reverse_std", "left", "right", "full"]),
    "projector": st.sampled_from(["warm", "rsvd", "svd", "random"]),
    "on_refresh": st.sampled_from(["transport", "reset", "keep"]),
    "residual": st.sampled_from([None, "fira", "apollo"]),
    "residual_granularity": st.sampled_from(["channel", "tensor"]),
    "stagger": st.integers(1, 3),
    "matrix_view": st.sampled_from(["auto", "flatten", "batch"]),
    "proj_dtype": st.sampled_from([None, torch.bfloat16]),
    "nonfinite": st.sampled_from(["skip", "ignore", "raise"]),
}
ADAMW_OPTS = {
    "lr": st.sampled_from([1e-3, 1e-2]),
    "betas": st.sampled_from([(0.9, 0.999), (0.5, 0.9)]),
    "weight_decay": st.sampled_from([0.0, 1e-2]),
}
KINDS = {
    "Muon": (Muon, MUON_OPTS),
    "Adafactor": (Adafactor, ADAFACTOR_OPTS),
    "GaLoreAdamW": (GaLoreAdamW, {**GALORE_OPTS, **ADAMW_OPTS}),
    "GaLoreAdafactor": (GaLoreAdafactor, {**GALORE_OPTS, **ADAFACTOR_OPTS}),
}


@st.composite
def problems(draw, force_skip: bool = False):
    kind = draw(st.sampled_from(sorted(KINDS)))
    cls, opts = KINDS[kind]
    shapes = draw(st.lists(SHAPE, min_size=1, max_size=5))
    dtypes = draw(st.lists(st.sampled_from([torch.float32, torch.bfloat16]),
                           min_size=len(shapes), max_size=len(shapes)))
    n_groups = draw(st.integers(1, 3))
    assign = draw(st.lists(st.integers(0, n_groups - 1), min_size=len(shapes),
                           max_size=len(shapes)))
    groups = []
    for gi in range(n_groups):
        keys = draw(st.lists(st.sampled_from(sorted(opts)), unique=True, max_size=5))
        kw = {k: draw(opts[k]) for k in keys}
        if force_skip:
            kw["nonfinite"] = "skip"
        groups.append(([i for i, a in enumerate(assign) if a == gi], kw))
    steps = draw(st.integers(1, 4))
    more = draw(st.integers(1, 3))
    # which parameters get a gradient at each step
    has_grad = draw(st.lists(st.lists(st.booleans(), min_size=len(shapes), max_size=len(shapes)),
                             min_size=steps + more, max_size=steps + more))
    seed = draw(st.integers(0, 2 ** 16))
    return cls, shapes, dtypes, groups, steps, more, has_grad, seed


def _build(cls, shapes, dtypes, groups, seed):
    g = torch.Generator().manual_seed(seed)
    ps = [nn.Parameter(torch.randn(s, generator=g).to(dt)) for s, dt in zip(shapes, dtypes)]
    return ps, _opt(cls, ps, groups)


def _opt(cls, ps, groups):
    return cls([{"params": [ps[i] for i in idx], **kw} for idx, kw in groups])


def _grads(ps, mask, step, seed):
    g = torch.Generator().manual_seed(seed * 1000 + step)
    return [torch.randn(p.shape, generator=g).to(p.dtype) if m else None
            for p, m in zip(ps, mask)]


def _step(opt, ps, grads):
    for p, gr in zip(ps, grads):
        p.grad = None if gr is None else gr.clone()
    opt.step()
    for p, gr in zip(ps, grads):  # p.grad is read, never written
        assert (p.grad is None) == (gr is None)
        if gr is not None:
            torch.testing.assert_close(p.grad, gr, rtol=0, atol=0, equal_nan=True)


@SETTINGS
@given(problems())
def test_random_configs_finite_dtypes_and_bit_identical_resume(problem):
    # "skip" (the default) runs the same flag-folded code on every device
    _resume_check(problem)


def _resume_check(problem):
    cls, shapes, dtypes, groups, steps, more, has_grad, seed = problem
    ps, opt = _build(cls, shapes, dtypes, groups, seed)
    qs, half = _build(cls, shapes, dtypes, groups, seed)
    for t in range(steps):
        grads = _grads(ps, has_grad[t], t, seed)
        _step(opt, ps, grads)
        _step(half, qs, grads)
    buf = io.BytesIO()
    torch.save(half.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    rs = [nn.Parameter(q.detach().clone()) for q in qs]
    fresh = _opt(cls, rs, groups)
    fresh.load_state_dict(loaded)
    for t in range(steps, steps + more):
        grads = _grads(ps, has_grad[t], t, seed)
        _step(opt, ps, grads)
        _step(fresh, rs, grads)
    for p, r, dt in zip(ps, rs, dtypes):
        assert p.dtype == dt and r.dtype == dt
        assert torch.isfinite(p.float()).all()
        assert torch.equal(p, r)
    for p, r in zip(ps, rs):
        a, b = opt.state.get(p, {}), fresh.state.get(r, {})
        assert set(a) == set(b)
        for k in a:
            if isinstance(a[k], torch.Tensor):
                assert a[k].dtype == b[k].dtype, k
                assert torch.equal(a[k], b[k]), k


@SETTINGS
@given(problems(force_skip=True), st.data())
def test_nan_under_skip_leaves_param_and_state_bit_identical(problem, data):
    cls, shapes, dtypes, groups, steps, more, has_grad, seed = problem
    ps, opt = _build(cls, shapes, dtypes, groups, seed)
    for t in range(steps):
        _step(opt, ps, _grads(ps, has_grad[t], t, seed))
    grads = _grads(ps, [True] * len(ps), steps, seed)
    bad = data.draw(st.sets(st.integers(0, len(ps) - 1), min_size=1))
    for i in bad:
        flat = grads[i].view(-1)
        j = data.draw(st.integers(0, flat.numel() - 1))
        flat[j] = data.draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    before = [(p.detach().clone(), {k: v.clone() for k, v in opt.state.get(p, {}).items()})
              for p in ps]
    _step(opt, ps, grads)
    for i, p in enumerate(ps):
        st_now = opt.state[p]
        if i in bad:
            assert torch.equal(p, before[i][0])
            for k, v in before[i][1].items():
                if k in ("step", "iteration"):
                    # CPU counters advance on a skipped step on every device
                    # (matrixopt.optim._nonfinite); device state is untouched
                    assert v.device.type == "cpu" and torch.equal(st_now[k], v + 1), k
                elif k == "refresh_step":
                    assert v.device.type == "cpu", k
                elif k != "nonfinite_count":
                    assert torch.equal(st_now[k], v), k
            assert int(st_now["nonfinite_count"]) == int(before[i][1].get(
                "nonfinite_count", torch.tensor(0))) + 1
        assert torch.isfinite(p.float()).all()
    for t in range(steps + 1, steps + 1 + more):
        _step(opt, ps, _grads(ps, has_grad[t - 1], t, seed))
    assert all(torch.isfinite(p.float()).all() for p in ps)
