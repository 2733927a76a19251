"""Muon: algorithm-specific checks against hand-computed references."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from matrixopt.optim import Muon, muon_param_groups, muon_update_scale

# Enough exact Newton-Schulz steps in float64 to reach the polar factor to ~1e-12,
# so checks of Muon's wiring do not depend on an approximate schedule.
EXACT = dict(coefficients="newton_schulz", ns_steps=40, ns_dtype=torch.float64)


def polar_factor(D: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(D.double(), full_matrices=False)
    return U @ Vh


def test_update_matches_hand_computed_3x5():
    torch.manual_seed(0)
    W0 = torch.randn(3, 5, dtype=torch.float64)
    g1, g2 = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    lr, wd, mu = 0.05, 0.1, 0.9
    p = nn.Parameter(W0.clone())
    opt = Muon([p], lr=lr, weight_decay=wd, momentum=mu, nesterov=True,
               adjust_lr="original", **EXACT)
    # hand computation, EMA momentum with Nesterov
    W, M = W0.clone(), torch.zeros_like(W0)
    for g in (g1, g2):
        p.grad = g.clone()
        opt.step()
        M = mu * M + (1 - mu) * g
        D = (1 - mu) * g + mu * M
        W = W * (1 - lr * wd) - lr * math.sqrt(max(1, 3 / 5)) * polar_factor(D)
    torch.testing.assert_close(p.detach(), W, atol=1e-10, rtol=0)
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], M, atol=1e-14, rtol=0)


def test_no_nesterov_uses_buffer():
    torch.manual_seed(1)
    W0 = torch.randn(4, 6, dtype=torch.float64)
    g = torch.randn(4, 6, dtype=torch.float64)
    p = nn.Parameter(W0.clone())
    opt = Muon([p], lr=0.1, weight_decay=0.0, momentum=0.5, nesterov=False,
               adjust_lr="none", **EXACT)
    p.grad = g.clone()
    opt.step()
    torch.testing.assert_close(p.detach(), W0 - 0.1 * polar_factor(0.5 * g), atol=1e-10, rtol=0)


@pytest.mark.parametrize("mode,expected", [
    ("match_rms_adamw", 0.2 * math.sqrt(12)),
    ("original", math.sqrt(12 / 5)),
    ("spectral", math.sqrt(12 / 5)),
    ("none", 1.0),
])
def test_update_scale_formulas(mode, expected):
    assert muon_update_scale(12, 5, mode) == pytest.approx(expected)
    with pytest.raises(ValueError, match="adjust_lr"):
        muon_update_scale(12, 5, "bogus")


def test_match_rms_adamw_gives_update_rms_02():
    torch.manual_seed(2)
    for shape in [(64, 32), (32, 96)]:
        p = nn.Parameter(torch.zeros(shape))
        opt = Muon([p], lr=1.0, weight_decay=0.0, momentum=0.0, nesterov=False)
        p.grad = torch.randn(shape)
        opt.step()
        rms = p.detach().pow(2).mean().sqrt().item()
        # default schedule is approximate: its singular values are within ~0.1 of 1
        assert rms == pytest.approx(0.2, rel=0.1)


def test_conv_scale_uses_flattened_shape():
    """Regression (REFERENCE pitfall 1): scale from [out, in*kh*kw], not [out, in]."""
    torch.manual_seed(3)
    g = torch.randn(8, 4, 3, 3, dtype=torch.float64)
    conv = nn.Parameter(torch.zeros(8, 4, 3, 3, dtype=torch.float64))
    flat = nn.Parameter(torch.zeros(8, 36, dtype=torch.float64))
    for mode in ("original", "match_rms_adamw", "spectral"):
        conv.data.zero_()
        flat.data.zero_()
        opt = Muon([{"params": [conv]}, {"params": [flat]}], lr=1.0, weight_decay=0.0,
                   momentum=0.0, nesterov=False, adjust_lr=mode, **EXACT)
        conv.grad, flat.grad = g.clone(), g.reshape(8, 36).clone()
        opt.step()
        torch.testing.assert_close(conv.detach().reshape(8, 36), flat.detach())
        expected = polar_factor(g.reshape(8, 36)) * muon_update_scale(8, 36, mode)
        torch.testing.assert_close(flat.detach(), -expected, atol=1e-10, rtol=0)


def test_batched_equals_per_parameter():
    torch.manual_seed(4)
    shapes = [(16, 24), (16, 24), (24, 16), (16, 24), (8, 8)]
    ps = [nn.Parameter(torch.randn(s)) for s in shapes]
    qs = [nn.Parameter(p.detach().clone()) for p in ps]
    together = Muon(ps, lr=0.02, ns_dtype=torch.float32)
    apart = [Muon([q], lr=0.02, ns_dtype=torch.float32) for q in qs]
    for _ in range(3):
        for p, q in zip(ps, qs):
            g = torch.randn(p.shape)
            p.grad, q.grad = g.clone(), g.clone()
        together.step()
        for o in apart:
            o.step()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_3d_stack_is_batch_of_matrices_and_split_is_blocks():
    torch.manual_seed(5)
    stack = nn.Parameter(torch.zeros(3, 6, 10, dtype=torch.float64))
    fused = nn.Parameter(torch.zeros(18, 10, dtype=torch.float64))
    g = torch.randn(3, 6, 10, dtype=torch.float64)
    opt = Muon([{"params": [stack]}, {"params": [fused], "split": 3}], lr=1.0,
               weight_decay=0.0, momentum=0.0, nesterov=False, adjust_lr="original", **EXACT)
    stack.grad, fused.grad = g.clone(), g.reshape(18, 10).clone()
    opt.step()
    expected = torch.stack([-polar_factor(g[i]) for i in range(3)])
    torch.testing.assert_close(stack.detach(), expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(fused.detach(), expected.reshape(18, 10), atol=1e-10, rtol=0)


def test_adamw_path_matches_torch_adamw():
    torch.manual_seed(6)
    vecs = [torch.randn(7), torch.randn(3), torch.randn(())]
    ours = [nn.Parameter(v.clone()) for v in vecs]
    ref = [nn.Parameter(v.clone()) for v in vecs]
    o = Muon(ours, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    r = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8,
                          foreach=True)
    for _ in range(4):
        for a, b in zip(ours, ref):
            g = torch.randn(a.shape)
            a.grad, b.grad = g.clone(), g.clone()
        o.step()
        r.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_zero_gradient_no_nan_and_only_decay():
    p = nn.Parameter(torch.ones(4, 5))
    opt = Muon([p], lr=0.1, weight_decay=0.5)
    p.grad = torch.zeros(4, 5)
    opt.step()
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.detach(), torch.full((4, 5), 1 - 0.05))


def test_param_without_grad_untouched():
    a, b = nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(4, 4))
    before = b.detach().clone()
    opt = Muon([a, b], lr=0.1, weight_decay=0.5)
    a.grad = torch.randn(4, 4)
    opt.step()
    assert torch.equal(b.detach(), before)
    assert b not in opt.state


def test_step_never_modifies_grad():
    ps = [nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(6))]
    opt = Muon(ps, lr=0.1, nesterov=True, normuon=True, cautious_wd=True)
    grads = [torch.randn_like(p) for p in ps]
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    for _ in range(2):
        opt.step()
    for p, g in zip(ps, grads):
        assert torch.equal(p.grad, g)


def test_sparse_and_complex_gradients_raise():
    p = nn.Parameter(torch.randn(4, 4))
    opt = Muon([p])
    p.grad = torch.randn(4, 4).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    with pytest.raises(ValueError, match="complex"):
        Muon([nn.Parameter(torch.randn(3, 3, dtype=torch.complex64))])


@pytest.mark.parametrize("kwargs,match", [
    ({"lr": -1.0}, "lr"),
    ({"momentum": 1.0}, "momentum"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"adjust_lr": "rms"}, "adjust_lr"),
    ({"algorithm": "sgd"}, "algorithm"),
    ({"coefficients": "nope"}, "coefficients"),
    ({"ns_steps": 0}, "ns_steps"),
    ({"ns_dtype": torch.int32}, "ns_dtype"),
    ({"normalization": "l1"}, "normalization"),
    ({"matrix_view": "rows"}, "matrix_view"),
    ({"split": 5}, "split"),
    ({"betas": (0.9, 1.0)}, "betas"),
])
def test_bad_values_raise_naming_group(kwargs, match):
    with pytest.raises(ValueError, match=rf"param_groups\[1\].*{match}"):
        Muon([{"params": [nn.Parameter(torch.randn(4, 4))]},
              {"params": [nn.Parameter(torch.randn(6, 4))], **kwargs}])


def test_unknown_key_and_muon_on_vector_raise():
    with pytest.raises(ValueError, match=r"param_groups\[0\].*unknown key.*'rank'"):
        Muon([{"params": [nn.Parameter(torch.randn(4, 4))], "rank": 3}])
    with pytest.raises(ValueError, match=r"param_groups\[0\].*'muon' needs"):
        Muon([{"params": [nn.Parameter(torch.randn(4))], "algorithm": "muon"}])


def _run(opt, params, grads):
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()


def test_state_dict_roundtrip_weights_only_resumes_bit_identically():
    torch.manual_seed(7)
    shapes = [(8, 12), (12, 8), (8, 12), (5,), (2, 3, 4)]
    init = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(6)]
    kw = dict(lr=0.01, normuon=True, cautious_wd=True)

    ps = [nn.Parameter(t.clone()) for t in init]
    straight = Muon(ps, **kw)
    _run(straight, ps, grads)

    qs = [nn.Parameter(t.clone()) for t in init]
    first = Muon(qs, **kw)
    _run(first, qs, grads[:3])
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    rs = [nn.Parameter(q.detach().clone()) for q in qs]
    second = Muon(rs, **kw)
    second.load_state_dict(loaded)
    _run(second, rs, grads[3:])
    for p, r in zip(ps, rs):
        assert torch.equal(p, r)


def test_loads_torch_optim_muon_checkpoint():
    torch.manual_seed(8)
    w = torch.randn(6, 10)
    tp = nn.Parameter(w.clone())
    topt = torch.optim.Muon([tp], lr=0.02)
    tp.grad = torch.randn(6, 10)
    topt.step()
    ours = nn.Parameter(tp.detach().clone())
    opt = Muon([ours], lr=0.02)
    opt.load_state_dict(topt.state_dict())
    assert torch.equal(opt.state[ours]["momentum_buffer"], topt.state[tp]["momentum_buffer"])
    # torch's keys are translated (adjust_lr_fn=None is torch's "original" scale), its
    # Newton-Schulz eps is dropped; keys torch does not know keep the constructor's
    assert opt.param_groups[0]["adjust_lr"] == "original"
    assert opt.param_groups[0]["eps"] == 1e-8 and opt.param_groups[0]["betas"] == (0.9, 0.999)
    ours.grad = torch.randn(6, 10)
    opt.step()
    assert torch.isfinite(ours).all()


def test_keller_schedule_matches_torch_muon_step():
    torch.manual_seed(9)
    w = torch.randn(32, 48)
    a, b = nn.Parameter(w.clone()), nn.Parameter(w.clone())
    ref = torch.optim.Muon([a], lr=0.02, weight_decay=0.1, adjust_lr_fn="original")
    ours = Muon([b], lr=0.02, weight_decay=0.1, adjust_lr="original", coefficients="keller",
                ns_steps=5, ns_method="standard", ns_dtype=torch.bfloat16)
    for _ in range(3):
        g = torch.randn(32, 48)
        a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        ours.step()
    # both iterate in bf16; differences are bf16 round-off in the update only
    assert (a - b).abs().max().item() < 0.02 * 0.02 * 3


def test_cautious_weight_decay_only_where_signs_agree():
    torch.manual_seed(10)
    w = torch.randn(6, 8, dtype=torch.float64)
    g = torch.randn(6, 8, dtype=torch.float64)
    lr, wd = 0.1, 0.5
    p0 = nn.Parameter(w.clone())
    o0 = Muon([p0], lr=lr, weight_decay=0.0, momentum=0.0, nesterov=False, **EXACT)
    p0.grad = g.clone()
    o0.step()
    u = w - p0.detach()  # the update alone
    p1 = nn.Parameter(w.clone())
    o1 = Muon([p1], lr=lr, weight_decay=wd, momentum=0.0, nesterov=False, cautious_wd=True,
              **EXACT)
    p1.grad = g.clone()
    o1.step()
    expected = w - lr * wd * w * ((u * w) > 0) - u
    torch.testing.assert_close(p1.detach(), expected, atol=1e-12, rtol=0)


def test_normuon_keeps_frobenius_norm_and_equalises_rows():
    torch.manual_seed(11)
    p = nn.Parameter(torch.zeros(16, 8, dtype=torch.float64))
    opt = Muon([p], lr=1.0, weight_decay=0.0, momentum=0.0, nesterov=False, adjust_lr="none",
               normuon=True, normuon_beta2=0.0, **EXACT)
    # tall: the polar factor has orthonormal columns but rows of different norms
    g = torch.randn(16, 8, dtype=torch.float64)
    p.grad = g
    opt.step()
    O = polar_factor(g)
    upd = -p.detach()
    torch.testing.assert_close(upd.norm(), O.norm(), rtol=1e-6, atol=0)
    assert (O.norm(dim=1).max() / O.norm(dim=1).min()).item() > 1.5  # the premise
    row_norms = upd.norm(dim=1)
    assert (row_norms.max() / row_norms.min()).item() < 1 + 1e-6


def test_works_with_scheduler_closure_and_add_param_group():
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
    x, y = torch.randn(64, 6), torch.randn(64, 1)
    opt = Muon(model[0].parameters(), lr=0.05)
    opt.add_param_group({"params": model[2].parameters(), "lr": 0.01})
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    first = float(closure())
    for _ in range(20):
        opt.step(closure)
        sched.step()
    assert float(closure()) < first
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5 ** 4)


def test_grad_scaler_skips_inf_step():
    p = nn.Parameter(torch.randn(4, 4))
    opt = Muon([p], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    loss = (p * torch.tensor(float("inf"))).sum()
    scaler.scale(loss).backward()
    before = p.detach().clone()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(p.detach(), before)
    assert len(opt.state) == 0 or torch.equal(opt.state[p]["momentum_buffer"],
                                              torch.zeros(4, 4))
    assert scaler.get_scale() < 2.0 ** 4


def test_muon_param_groups_routes_by_module_and_shape():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            self.conv = nn.Conv1d(16, 16, 3)
            self.attn = nn.MultiheadAttention(16, 2)
            self.hidden = nn.Linear(16, 32)
            self.norm = nn.LayerNorm(32)
            self.experts = nn.Parameter(torch.randn(4, 32, 16))
            self.scale = nn.Parameter(torch.ones(()))
            self.lm_head = nn.Linear(32, 50, bias=False)

    net = Net()
    groups = muon_param_groups(net, split_fused_qkv=True)
    by_name = {r.name: r.group for r in groups.routes}
    assert by_name["emb.weight"] == "adamw"
    assert by_name["lm_head.weight"] == "adamw"
    assert by_name["conv.weight"] == "muon_flatten"
    assert by_name["conv.bias"] == "adamw_no_decay"
    assert by_name["attn.in_proj_weight"] == "muon_qkv"
    assert by_name["attn.out_proj.weight"] == "muon"
    assert by_name["hidden.weight"] == "muon"
    assert by_name["norm.weight"] == "adamw_no_decay"
    assert by_name["experts"] == "muon"
    assert by_name["scale"] == "adamw_no_decay"
    assert "lm_head.weight" in groups.report and "output head" in groups.report
    opt = Muon(groups, lr=0.01)
    names = {g["name"]: g for g in opt.param_groups}
    assert names["adamw_no_decay"]["weight_decay"] == 0.0
    assert names["muon_qkv"]["split"] == 3
    out = net.hidden(net.emb(torch.randint(0, 50, (3,)))).sum() + net.experts.sum() \
        + net.scale + net.lm_head(net.norm(torch.randn(2, 32))).sum() \
        + net.conv(torch.randn(1, 16, 5)).sum() \
        + net.attn(*(torch.randn(3, 1, 16),) * 3)[0].sum()
    out.backward()
    opt.step()
    for p in net.parameters():
        assert torch.isfinite(p).all()


def test_tied_head_routed_once_to_adamw():
    emb = nn.Embedding(30, 8)
    head = nn.Linear(8, 30, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "body": nn.Linear(8, 8), "lm_head": head})
    groups = muon_param_groups(model)
    routes = [r for r in groups.routes if r.shape == (30, 8)]
    assert len(routes) == 1 and routes[0].group == "adamw"
    assert "tied" in routes[0].reason


def test_torch_compile_training_step_matches_eager():
    torch.manual_seed(13)
    x, y = torch.randn(32, 8), torch.randn(32, 4)

    def make():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        return m, Muon(muon_param_groups(m), lr=0.02, ns_dtype=torch.float32)

    m1, o1 = make()
    m2, o2 = make()

    def train_step(model, opt):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss

    # aot_eager traces the whole step (model, backward, optimizer) through dynamo and
    # AOT autograd; inductor's C++ codegen of every graph takes minutes on this CPU
    # (measured ~190 s), which belongs in a benchmark, not the unit suite.
    compiled = torch.compile(train_step, backend="aot_eager")
    for _ in range(3):
        train_step(m1, o1)
        compiled(m2, o2)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
