"""The ``nonfinite`` group policy ("skip" / "raise" / "ignore") of every optimizer,
GradScaler interaction, and loading checkpoints that predate the policy."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from matrixopt.optim import Adafactor, GaLoreAdafactor, GaLoreAdamW, Muon
from matrixopt.optim._common import GroupError, NonFiniteGradientError

SHAPES = [(8, 6), (6, 8), (8, 6), (5,), (2, 3, 4), (4, 3, 3, 3)]


def _mats_vecs(ps):
    return [p for p in ps if p.ndim >= 2], [p for p in ps if p.ndim < 2]


def _galore(cls, **kw):
    def make(ps, **extra):
        mats, vecs = _mats_vecs(ps)
        return cls([{"params": mats, "rank": 2, "update_proj_gap": 2, **kw},
                    {"params": vecs}], **extra)
    return make


CONFIGS = {
    "muon": lambda ps, **e: Muon(ps, lr=0.02, **e),
    "muon_normuon_cautious": lambda ps, **e: Muon(ps, lr=0.02, normuon=True, cautious_wd=True,
                                                  nesterov=False, **e),
    "adafactor": lambda ps, **e: Adafactor(ps, **e),
    "adafactor_beta1": lambda ps, **e: Adafactor(ps, lr=1e-2, relative_step=False, beta1=0.9,
                                                 weight_decay=0.1, **e),
    "galore_adamw": _galore(GaLoreAdamW),
    "galore_adamw_random_fira": _galore(GaLoreAdamW, projector="random", residual="fira"),
    "galore_adamw_full_apollo": _galore(GaLoreAdamW, proj_type="full", residual="apollo",
                                        on_refresh="reset"),
    "galore_adafactor": lambda ps, **e: _galore(GaLoreAdafactor, beta1=0.9)(ps, **e),
}


def _params(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]


def _grads(step, dtype=torch.float32):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=g).to(dtype) for s in SHAPES]


def _set(ps, gs):
    for p, g in zip(ps, gs):
        p.grad = g.clone()


def _state_copy(opt, p):
    return {k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}


# CPU-resident scalar counters (``step``, GaLore's schedule) advance on a skipped
# step on every device: conditioning them on a device flag would need a host sync
# (see matrixopt.optim._nonfinite). Everything on the parameter's device is unchanged.
CPU_COUNTERS = ("step", "iteration", "refresh_step")


def _same_state(a, b, skip=("nonfinite_count",), counters_advanced=False):
    """``a`` equals ``b``; with ``counters_advanced`` the CPU counters of ``a`` are
    exactly one step ahead of ``b``'s (a skipped step)."""
    assert set(a) - set(skip) == set(b) - set(skip)
    for k in a:
        if k in skip:
            continue
        if counters_advanced and k in CPU_COUNTERS:
            assert a[k].device.type == "cpu", k
            # GaLore's refresh_step moves only when the skipped step was a refresh step
            assert torch.equal(a[k], b[k] + 1) or (k == "refresh_step"
                                                   and torch.equal(a[k], b[k])), k
        else:
            assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name", CONFIGS)
def test_skip_leaves_param_and_state_bit_identical_and_counts(name):
    ps = _params()
    opt = CONFIGS[name](ps)
    for t in range(3):
        _set(ps, _grads(t))
        opt.step()
    bad = {0: float("nan"), 3: float("inf"), 5: float("-inf")}
    gs = _grads(3)
    for i, v in bad.items():
        gs[i].view(-1)[1] = v
    _set(ps, gs)
    before = [(p.detach().clone(), _state_copy(opt, p)) for p in ps]
    opt.step()
    for i, p in enumerate(ps):
        if i in bad:
            assert torch.equal(p, before[i][0])
            _same_state(_state_copy(opt, p), before[i][1], counters_advanced=True)
            assert int(opt.state[p]["nonfinite_count"]) == 1
        else:
            assert not torch.equal(p, before[i][0])
            assert int(opt.state[p]["nonfinite_count"]) == 0
        # p.grad is read, never written (NaN/Inf entries included)
        assert torch.equal(torch.nan_to_num(p.grad), torch.nan_to_num(gs[i]))
        assert torch.isnan(p.grad).sum() == torch.isnan(gs[i]).sum()
    for t in range(4, 8):
        _set(ps, _grads(t))
        opt.step()
    assert all(torch.isfinite(p).all() for p in ps)


@pytest.mark.parametrize("name", CONFIGS)
def test_skip_on_first_step_keeps_param(name):
    ps = _params()
    opt = CONFIGS[name](ps)
    gs = _grads(0)
    gs[1].fill_(float("nan"))
    _set(ps, gs)
    w = ps[1].detach().clone()
    opt.step()
    assert torch.equal(ps[1], w)
    assert int(opt.state[ps[1]]["nonfinite_count"]) == 1
    for t in range(1, 5):
        _set(ps, _grads(t))
        opt.step()
    assert all(torch.isfinite(p).all() for p in ps)
    assert not torch.equal(ps[1], w)


@pytest.mark.parametrize("name", CONFIGS)
def test_skip_equals_ignore_on_finite_gradients(name):
    # "skip" runs the flag-folded code on every device; on finite gradients each factor
    # equals the plain one, so the trajectory is bit-identical to "ignore"
    a, b = _params(), _params()
    oa, ob = CONFIGS[name](a), CONFIGS[name](b, nonfinite="ignore")
    for t in range(5):
        _set(a, _grads(t))
        _set(b, _grads(t))
        oa.step()
        ob.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)
        _same_state(_state_copy(oa, p), _state_copy(ob, q))


@pytest.mark.parametrize("name", CONFIGS)
def test_ignore_lets_nan_through(name):
    ps = _params()
    opt = CONFIGS[name](ps, nonfinite="ignore")
    gs = _grads(0)
    gs[3].fill_(float("nan"))  # a vector (elementwise path everywhere; a GaLore refresh
    _set(ps, gs)               # of a NaN matrix raises inside torch.linalg instead)
    opt.step()
    assert torch.isnan(ps[3]).any()
    assert "nonfinite_count" not in opt.state[ps[3]]


@pytest.mark.parametrize("name", CONFIGS)
def test_raise_names_group_and_index_and_updates_nothing(name):
    ps = _params()
    opt = CONFIGS[name](ps, nonfinite="raise")
    _set(ps, _grads(0))
    opt.step()
    gs = _grads(1)
    gs[4].view(-1)[0] = float("nan")  # (2, 3, 4): in the matrix group
    _set(ps, gs)
    before = [(p.detach().clone(), _state_copy(opt, p)) for p in ps]
    grouped = [p for g in opt.param_groups for p in g["params"]]
    gi = next(i for i, g in enumerate(opt.param_groups) if any(p is ps[4] for p in g["params"]))
    pi = next(j for j, p in enumerate(opt.param_groups[gi]["params"]) if p is ps[4])
    with pytest.raises(NonFiniteGradientError,
                       match=rf"param_groups\[{gi}\]\['params'\]\[{pi}\] of shape \(2, 3, 4\)"):
        opt.step()
    assert len(grouped) == len(ps)
    for p, (w, st) in zip(ps, before):
        assert torch.equal(p, w)
        _same_state(_state_copy(opt, p), st, skip=())


def test_raise_names_the_parameter_when_groups_carry_names():
    p, q = nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(4, 4))
    opt = Muon([{"params": [p, q], "param_names": ["a.weight", "b.weight"]}], nonfinite="raise")
    p.grad, q.grad = torch.zeros(4, 4), torch.full((4, 4), float("inf"))
    with pytest.raises(FloatingPointError, match=r"\['params'\]\[1\] \('b.weight'\)"):
        opt.step()


@pytest.mark.parametrize("cls", [Muon, Adafactor, GaLoreAdamW, GaLoreAdafactor])
def test_bad_nonfinite_value_names_group(cls):
    a, b = nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(4, 4))
    with pytest.raises(GroupError, match=r"param_groups\[1\]: nonfinite must be one of .*'warn'"):
        cls([{"params": [a]}, {"params": [b], "nonfinite": "warn"}])


@pytest.mark.parametrize("name", CONFIGS)
def test_checkpoint_with_counter_resumes_bit_identically_and_old_one_loads(name):
    ps = _params()
    opt = CONFIGS[name](ps)
    for t in range(3):
        gs = _grads(t)
        if t == 1:
            gs[2].fill_(float("nan"))
        _set(ps, gs)
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    qs = [nn.Parameter(p.detach().clone()) for p in ps]
    opt2 = CONFIGS[name](qs)
    opt2.load_state_dict(sd)
    assert opt2.state[qs[2]]["nonfinite_count"].dtype == torch.int64
    # a checkpoint from before the policy existed: no counter, no group key
    buf.seek(0)
    old = torch.load(buf, weights_only=True)  # (state_dict() holds the live state dicts)
    for st in old["state"].values():
        st.pop("nonfinite_count")
    for g in old["param_groups"]:
        g.pop("nonfinite")
    rs = [nn.Parameter(p.detach().clone()) for p in ps]
    opt3 = CONFIGS[name](rs)
    opt3.load_state_dict(old)
    assert all(g["nonfinite"] == "skip" for g in opt3.param_groups)
    for t in range(3, 6):
        for o, xs in ((opt, ps), (opt2, qs), (opt3, rs)):
            _set(xs, _grads(t))
            o.step()
    for p, q, r in zip(ps, qs, rs):
        assert torch.equal(p, q) and torch.equal(p, r)
    assert int(opt3.state[rs[2]]["nonfinite_count"]) == 0
    assert int(opt2.state[qs[2]]["nonfinite_count"]) == 1


def test_torch_muon_checkpoint_then_nan_is_skipped():
    w = torch.randn(6, 10)
    tp = nn.Parameter(w.clone())
    topt = torch.optim.Muon([tp], lr=0.02)
    tp.grad = torch.randn(6, 10)
    topt.step()
    ours = nn.Parameter(tp.detach().clone())
    opt = Muon([ours], lr=0.02)
    opt.load_state_dict(topt.state_dict())
    buf = opt.state[ours]["momentum_buffer"].clone()
    ours.grad = torch.full((6, 10), float("nan"))
    before = ours.detach().clone()
    opt.step()
    assert torch.equal(ours, before)
    assert torch.equal(opt.state[ours]["momentum_buffer"], buf)
    assert int(opt.state[ours]["nonfinite_count"]) == 1


@pytest.mark.parametrize("name", CONFIGS)
def test_grad_scaler_skipped_step_leaves_state_untouched(name):
    torch.manual_seed(0)
    ps = _params()
    opt = CONFIGS[name](ps)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)

    def loss_fn(factor):
        return sum((p.float() * torch.randn(p.shape)).sum() for p in ps) * factor

    scaler.scale(loss_fn(1.0)).backward()
    scaler.step(opt)  # a real step: state exists
    scaler.update()
    assert len(opt.state) == len(ps)
    opt.zero_grad()
    scaler.scale(loss_fn(float("inf"))).backward()
    before = [(p.detach().clone(), _state_copy(opt, p)) for p in ps]
    scale = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < scale
    for p, (w, st) in zip(ps, before):
        assert torch.equal(p, w)
        _same_state(_state_copy(opt, p), st, skip=())
    opt.zero_grad()
    scaler.scale(loss_fn(1.0)).backward()
    scaler.step(opt)
    scaler.update()
    assert all(not torch.equal(p, w) for p, (w, _) in zip(ps, before))
    assert all(int(opt.state[p]["nonfinite_count"]) == 0 for p in ps)


@pytest.mark.parametrize("name", CONFIGS)
def test_masked_skip_has_no_host_sync_beyond_the_optimizer_own(name, monkeypatch):
    """With a NaN gradient, "skip" adds no tensor-to-host read to what "ignore" already
    does on the same step."""
    reads = {"n": 0}
    real = {k: getattr(torch.Tensor, k) for k in ("item", "__bool__", "__float__", "__int__")}

    def counting(name_):
        def f(self, *a, **k):
            if self.device.type == "cpu" and self.numel() == 1 and self.dtype == torch.bool:
                reads["n"] += 1  # a bool flag read back: what a sync on the mask would be
            return real[name_](self, *a, **k)
        return f

    def reads_during_second_step(policy, poison):
        ps = _params()
        opt = CONFIGS[name](ps, nonfinite=policy)
        _set(ps, _grads(0))
        opt.step()
        gs = _grads(1)
        if poison:
            gs[0].view(-1)[0] = float("nan")
        _set(ps, gs)
        reads["n"] = 0
        with monkeypatch.context() as m:
            for k in real:
                m.setattr(torch.Tensor, k, counting(k))
            opt.step()
        return reads["n"], opt, ps

    baseline, _, _ = reads_during_second_step("ignore", False)
    n, opt, ps = reads_during_second_step("skip", True)
    assert n == baseline  # (orthogonalize's own CPU-only finiteness check reads one)
    assert int(opt.state[ps[0]]["nonfinite_count"]) == 1
