"""GaLoreAdamW / GaLoreAdafactor: AdamW/Adafactor equivalence at full rank, moment
transport, projection sides, every option, state round trip, refresh schedule, errors."""

from __future__ import annotations

import io

import pytest
import torch

import matrixopt.optim.galore._refresh as galore_mod
from matrixopt.optim._common import GroupError
from matrixopt.optim.adafactor import Adafactor
from matrixopt.optim.galore import GaLoreAdafactor, GaLoreAdamW


def _diag_first_grad(m: int, n: int) -> torch.Tensor:
    """A gradient whose singular vectors are the coordinate axes (distinct σ, positive)."""
    G = torch.zeros(m, n)
    for i in range(min(m, n)):
        G[i, i] = 3.0 - 0.5 * i
    return G


def _feed(params, grads_per_step, opt):
    for gs in grads_per_step:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()


# ---------------------------------------------------------------------------
# full rank + identity basis = the inner optimizer
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("m, n, proj_type", [(6, 4, "std"), (4, 6, "std"), (5, 5, "left")])
def test_full_rank_identity_basis_equals_torch_adamw(m, n, proj_type):
    gen = torch.Generator().manual_seed(0)
    W0 = torch.randn(m, n, generator=gen)
    b0 = torch.randn(n, generator=gen)
    seq = [[_diag_first_grad(m, n), torch.randn(n, generator=gen)]]
    seq += [[torch.randn(m, n, generator=gen), torch.randn(n, generator=gen)] for _ in range(9)]
    hp = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)

    ours = [W0.clone().requires_grad_(), b0.clone().requires_grad_()]
    rank = min(m, n)
    opt = GaLoreAdamW([{"params": [ours[0]], "rank": rank, "update_proj_gap": 1000, "scale": 1.0,
                        "proj_type": proj_type},
                       {"params": [ours[1]]}], **hp)
    ref = [W0.clone().requires_grad_(), b0.clone().requires_grad_()]
    topt = torch.optim.AdamW(ref, **hp)
    _feed(ours, seq, opt)
    _feed(ref, seq, topt)
    P = opt.state[ours[0]]["projector"]
    assert torch.equal(P, torch.eye(rank))  # the basis really is the identity
    for x, y, x0 in zip(ours, ref, (W0, b0)):
        assert (y - x0).abs().max() > 1e-2
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", [(24, 10), (10, 24)])
@pytest.mark.parametrize("proj_dtype, tol", [(None, 2e-4), (torch.bfloat16, 2e-2)])
def test_low_rank_steps_match_float64_reference(shape, proj_dtype, tol):
    """Three steps in a fixed basis against the GaLore/Adam formulas in float64
    (covers the folded bias correction and the bf16 scale-and-cast)."""
    gen = torch.Generator().manual_seed(5)
    m, n = shape
    lr, wd, scale, eps, b1, b2 = 0.01, 0.1, 0.25, 1e-8, 0.9, 0.99
    W = torch.randn(m, n, generator=gen, requires_grad=True)
    opt = GaLoreAdamW([{"params": [W], "rank": 3, "update_proj_gap": 100, "scale": scale,
                        "proj_dtype": proj_dtype}], lr=lr, betas=(b1, b2), eps=eps,
                      weight_decay=wd)
    Wr = W.detach().double().clone()
    mr = vr = None
    for t in range(1, 4):
        G = torch.randn(m, n, generator=gen)
        W.grad = G.clone()
        opt.step()
        P = opt.state[W]["projector"].double()
        R = P.mT @ G.double() if m < n else G.double() @ P
        mr = (1 - b1) * R if mr is None else b1 * mr + (1 - b1) * R
        vr = (1 - b2) * R * R if vr is None else b2 * vr + (1 - b2) * R * R
        N = (mr / (1 - b1 ** t)) / ((vr / (1 - b2 ** t)).sqrt() + eps)
        Wr = Wr * (1 - lr * wd) - lr * scale * (P @ N if m < n else N @ P.mT)
        step = (Wr - W.detach().double()).norm() / (lr * scale * N.norm())
        assert step < tol, (t, float(step))


def test_full_rank_identity_basis_equals_adafactor():
    m, n = 5, 7
    gen = torch.Generator().manual_seed(1)
    W0 = torch.randn(m, n, generator=gen)
    seq = [[_diag_first_grad(m, n)]] + [[torch.randn(m, n, generator=gen)] for _ in range(7)]
    hp = dict(beta1=0.9, weight_decay=0.05)
    ours = [W0.clone().requires_grad_()]
    opt = GaLoreAdafactor([{"params": ours, "rank": 5, "update_proj_gap": 1000, "scale": 1.0}],
                          **hp)
    ref = [W0.clone().requires_grad_()]
    _feed(ours, seq, opt)
    _feed(ref, seq, Adafactor(ref, **hp))
    assert torch.equal(opt.state[ours[0]]["projector"], torch.eye(5))
    assert (ref[0] - W0).abs().max() > 1e-3
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------
# moment transport
# ---------------------------------------------------------------------------
def _two_direction_history(swap: bool, m: int = 8, n: int = 4, seed: int = 0):
    """Gradients whose rows all lie in span(e1, e2) of R^n (right side, rank 2).

    Step 1 makes the basis [e1, e2]; step 4 (the refresh) makes it [e2, e1] (a
    permutation, ``swap=True``) or a general rotation of the same plane.
    """
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, 2, generator=gen, dtype=torch.float64)).Q
    E = torch.eye(n, dtype=torch.float64)[:, :2]   # n x 2
    seq = [3.0 * u[:, :1] @ E[:, :1].T + 1.0 * u[:, 1:] @ E[:, 1:].T]
    for _ in range(2):
        seq.append(torch.randn(m, 2, generator=gen, dtype=torch.float64) @ E.T)
    if swap:
        seq.append(1.0 * u[:, :1] @ E[:, :1].T + 3.0 * u[:, 1:] @ E[:, 1:].T)
    else:
        c, s = 0.8, 0.6
        Rot = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
        seq.append((u @ torch.diag(torch.tensor([1.0, 3.0], dtype=torch.float64)) @ Rot) @ E.T)
    return [g.float() for g in seq]


@pytest.mark.parametrize("projector", ["warm", "svd"])
@pytest.mark.parametrize("swap", [True, False])
def test_transported_moments_equal_moments_recomputed_in_new_basis(projector, swap):
    seq = _two_direction_history(swap)
    b1, b2 = 0.9, 0.95
    W = torch.zeros(8, 4, requires_grad=True)
    opt = GaLoreAdamW([{"params": [W], "rank": 2, "update_proj_gap": 3, "stagger": 1,
                        "projector": projector}], lr=1e-3, betas=(b1, b2), weight_decay=0.0)
    _feed([W], [[g] for g in seq[:3]], opt)
    P_old = opt.state[W]["projector"].clone()
    _feed([W], [[seq[3]]], opt)            # step 4 refreshes (offset 0, gap 3)
    st = opt.state[W]
    P_new = st["projector"]
    assert int(st["refresh_step"]) == 4
    assert (P_new - P_old).abs().max() > 0.1          # the basis did change
    Q = P_new.T.double() @ P_old.double()
    if swap:
        assert torch.allclose(Q.abs(), torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64),
                              atol=1e-5)
    # moments of Adam run from the start in the new basis
    m_ref = torch.zeros(8, 2, dtype=torch.float64)
    v_ref = torch.zeros(8, 2, dtype=torch.float64)
    for g in seq:
        r = g.double() @ P_new.double()
        m_ref = b1 * m_ref + (1 - b1) * r
        v_ref = b2 * v_ref + (1 - b2) * r * r
    assert m_ref.abs().max() > 0.1
    torch.testing.assert_close(st["exp_avg"].double(), m_ref, rtol=1e-5, atol=1e-6)
    if swap:  # a signed permutation: the second moment is exact too
        torch.testing.assert_close(st["exp_avg_sq"].double(), v_ref, rtol=1e-5, atol=1e-6)


def test_keep_leaves_stale_moments_and_transport_does_not():
    seq = _two_direction_history(True)
    out = {}
    for mode in ("keep", "transport"):
        W = torch.zeros(8, 4, requires_grad=True)
        opt = GaLoreAdamW([{"params": [W], "rank": 2, "update_proj_gap": 3, "stagger": 1,
                            "on_refresh": mode}], weight_decay=0.0)
        _feed([W], [[g] for g in seq], opt)
        out[mode] = opt.state[W]["exp_avg"].clone()
    # the two coordinates are swapped by the refresh: "keep" mixes them up
    assert (out["keep"] - out["transport"]).abs().max() > 0.05


def test_adafactor_transport_equals_recomputed_stats_for_a_permutation():
    seq = _two_direction_history(True)
    W = torch.zeros(8, 4, requires_grad=True)
    opt = GaLoreAdafactor([{"params": [W], "rank": 2, "update_proj_gap": 3, "stagger": 1,
                            "projector": "svd"}], beta1=None, beta2_cap=0.9, decay_rate=-0.8)
    _feed([W], [[g] for g in seq], opt)
    st = opt.state[W]
    P = st["projector"].double()
    row = torch.zeros(8, 1, dtype=torch.float64)
    col = torch.zeros(1, 2, dtype=torch.float64)
    for t, g in enumerate(seq, start=1):
        beta2 = min(1 - t ** -0.8, 0.9)
        r2 = (g.double() @ P) ** 2 + 1e-30
        row = beta2 * row + (1 - beta2) * r2.mean(dim=1, keepdim=True)
        col = beta2 * col + (1 - beta2) * r2.mean(dim=0, keepdim=True)
    torch.testing.assert_close(st["exp_avg_sq_row"].double(), row, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(st["exp_avg_sq_col"].double(), col, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------------------
# projection side, conv and 3-D parameters
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("shape, proj_type, side, k", [
    ((6, 6), "std", "right", 6),          # square: decided from the full shape
    ((6, 6), "reverse_std", "left", 6),
    ((6, 6), "left", "left", 6),
    ((8, 4), "std", "right", 4),
    ((4, 8), "std", "left", 4),
    ((8, 4), "reverse_std", "left", 8),
    ((4, 8), "right", "right", 8),
    ((6, 2, 2, 2), "std", "left", 6),     # conv: a 6 x 8 matrix
    ((3, 5, 7), "std", "left", 5),        # stack of three 5 x 7 matrices
])
def test_update_lies_in_the_subspace_on_the_right_side(shape, proj_type, side, k):
    gen = torch.Generator().manual_seed(2)
    W = torch.randn(shape, generator=gen).requires_grad_()
    W0 = W.detach().clone()
    opt = GaLoreAdamW([{"params": [W], "rank": 2, "proj_type": proj_type, "scale": 1.0}],
                      lr=0.1, weight_decay=0.0)
    W.grad = torch.randn(shape, generator=gen)
    opt.step()
    P = opt.state[W]["projector"].double()
    batched = len(shape) == 3
    assert P.shape == ((shape[0], k, 2) if batched else (k, 2))
    D = (W.detach() - W0).double()
    D = D.reshape(shape[0], shape[1], shape[2]) if batched else D.reshape(shape[0], -1).unsqueeze(0)
    P = P if batched else P.unsqueeze(0)
    I = torch.eye(k, dtype=torch.float64)
    outside = (I - P @ P.mT) @ D if side == "left" else D @ (I - P @ P.mT)
    assert D.abs().max() > 1e-3
    assert outside.abs().max() < 1e-5 * D.abs().max()


def test_state_is_low_rank_and_random_stores_no_basis():
    W = torch.zeros(64, 32, requires_grad=True)
    V = torch.zeros(64, 32, requires_grad=True)
    opt = GaLoreAdamW([{"params": [W], "rank": 8},
                       {"params": [V], "rank": 8, "projector": "random"}])
    W.grad = torch.randn(64, 32)
    V.grad = torch.randn(64, 32)
    opt.step()
    floats = lambda st: sum(t.numel() for t in st.values() if t.is_floating_point() and t.ndim)  # noqa: E731
    assert opt.state[W]["exp_avg"].shape == (64, 8)
    assert floats(opt.state[W]) == 2 * 64 * 8 + 32 * 8
    assert "projector" not in opt.state[V]
    assert floats(opt.state[V]) == 2 * 64 * 8


# ---------------------------------------------------------------------------
# every option trains
# ---------------------------------------------------------------------------
_OPTIONS = ([{"proj_type": t} for t in ("std", "reverse_std", "left", "right", "full")]
            + [{"projector": p, "on_refresh": o} for p in ("warm", "rsvd", "svd", "random")
               for o in ("transport", "reset", "keep")]
            + [{"residual": r, "residual_granularity": g} for r in ("fira", "apollo")
               for g in ("channel", "tensor")]
            + [{"proj_dtype": torch.bfloat16}, {"proj_dtype": torch.bfloat16, "residual": "fira"}])


def _least_squares(cls, option, steps=25):
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(48, 16, generator=gen)
    T = X @ torch.randn(16, 12, generator=gen)
    W = torch.zeros(16, 12, requires_grad=True)
    bias = torch.zeros(12, requires_grad=True)
    inner = {"lr": 0.05} if cls is GaLoreAdamW else {"lr": 0.05, "relative_step": False,
                                                     "scale_parameter": False}
    opt = cls([{"params": [W], "rank": 4, "update_proj_gap": 5, "scale": 1.0, **option},
               {"params": [bias]}], **inner)

    def loss_fn():
        return ((X @ W + bias - T) ** 2).mean()

    first = float(loss_fn().detach())
    for _ in range(steps):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    return first, float(loss_fn().detach())


@pytest.mark.parametrize("cls", [GaLoreAdamW, GaLoreAdafactor])
@pytest.mark.parametrize("option", _OPTIONS, ids=lambda o: "-".join(map(str, o.values())))
def test_every_option_decreases_the_loss(cls, option):
    first, last = _least_squares(cls, option)
    assert last < 0.7 * first, (first, last)


@pytest.mark.parametrize("cls", [GaLoreAdamW, GaLoreAdafactor])
@pytest.mark.parametrize("residual", [None, "fira", "apollo"])
def test_zero_gradients_give_no_nan(cls, residual):
    W = torch.randn(6, 4, requires_grad=True)
    F = torch.randn(6, 4, requires_grad=True)
    opt = cls([{"params": [W, F], "rank": 2, "update_proj_gap": 2, "residual": residual}])
    for t in range(4):
        W.grad = torch.zeros(6, 4)
        F.grad = torch.zeros(6, 4) if t % 2 else torch.randn(6, 4)
        opt.step()
    assert torch.isfinite(W).all() and torch.isfinite(F).all()
    for st in opt.state.values():
        assert all(torch.isfinite(v).all() for v in st.values() if v.is_floating_point())


def test_grad_is_not_modified_and_params_without_grad_are_untouched():
    W = torch.randn(6, 4, requires_grad=True)
    U = torch.randn(6, 4, requires_grad=True)
    U0 = U.detach().clone()
    opt = GaLoreAdamW([{"params": [W, U], "rank": 2, "residual": "fira"}])
    W.grad = torch.randn(6, 4)
    g0 = W.grad.clone()
    opt.step()
    assert torch.equal(W.grad, g0)
    assert torch.equal(U, U0) and U not in opt.state


# ---------------------------------------------------------------------------
# state_dict: tensors only, weights_only, bit-identical resume
# ---------------------------------------------------------------------------
def _model_params(seed=4):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen)
            for s in ((10, 6), (10, 6), (6, 2, 2, 2), (3, 5, 7), (6,))]


def _grad_seq(steps, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=gen) for p in _model_params()] for _ in range(steps)]


@pytest.mark.parametrize("cls, extra", [
    (GaLoreAdamW, {"projector": "warm", "residual": "fira"}),
    (GaLoreAdamW, {"projector": "random", "residual": "apollo"}),
    (GaLoreAdamW, {"projector": "rsvd", "proj_type": "full", "on_refresh": "reset"}),
    (GaLoreAdafactor, {"projector": "warm"}),
])
def test_state_dict_round_trip_resumes_bit_identically(cls, extra):
    seq = _grad_seq(10)
    inner = {"beta1": 0.9, "momentum_dtype": torch.bfloat16} if cls is GaLoreAdafactor else {}

    def make(params):
        return cls([{"params": params[:4], "rank": 2, "update_proj_gap": 3, "stagger": 2,
                     "seed": 7, **extra},
                    {"params": params[4:]}], **inner)

    full = [p.clone().requires_grad_() for p in _model_params()]
    _feed(full, seq, make(full))

    first = [p.clone().requires_grad_() for p in _model_params()]
    opt = make(first)
    _feed(first, seq[:5], opt)
    sd = opt.state_dict()
    assert all(isinstance(v, torch.Tensor) for st in sd["state"].values() for v in st.values())
    buf = io.BytesIO()
    torch.save({"opt": sd, "params": [p.detach() for p in first]}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = [p.clone().requires_grad_() for p in saved["params"]]
    opt2 = make(resumed)
    opt2.load_state_dict(saved["opt"])
    _feed(resumed, seq[5:], opt2)
    for x, y in zip(resumed, full):
        assert torch.equal(x, y)


# ---------------------------------------------------------------------------
# refresh schedule: staggered and batched
# ---------------------------------------------------------------------------
def test_refresh_is_staggered_and_same_shapes_are_batched(monkeypatch):
    calls = []
    real = galore_mod.lowrank_basis

    def spy(G, rank, **kw):
        calls.append((step[0], G.shape[0]))
        return real(G, rank, **kw)

    monkeypatch.setattr(galore_mod, "lowrank_basis", spy)
    mats = [torch.randn(12, 8, requires_grad=True) for _ in range(8)]
    opt = GaLoreAdamW([{"params": mats, "rank": 2, "update_proj_gap": 8, "stagger": 4}])
    step = [0]
    for t in range(1, 11):
        step[0] = t
        for p in mats:
            p.grad = torch.randn(12, 8)
        opt.step()
    # step 1: every matrix, one batched call; then slots at offsets 2, 4, 6, 8(=0)
    assert calls == [(1, 8), (3, 2), (5, 2), (7, 2), (9, 2)]


# ---------------------------------------------------------------------------
# bad configuration
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("key, value", [
    ("rank", 0), ("rank", -3), ("rank", 2.5), ("update_proj_gap", 0), ("scale", -1.0),
    ("proj_type", "diagonal"), ("projector", "qr"), ("on_refresh", "rotate"),
    ("residual", "lora"), ("residual_granularity", "row"), ("stagger", 0),
    ("norm_growth_limit", 0.5), ("matrix_view", "split"), ("proj_dtype", torch.int32),
])
@pytest.mark.parametrize("cls", [GaLoreAdamW, GaLoreAdafactor])
def test_bad_values_raise_at_construction_naming_the_group(cls, key, value):
    a = torch.zeros(4, 4, requires_grad=True)
    b = torch.zeros(4, 4, requires_grad=True)
    with pytest.raises(GroupError, match=rf"{cls.__name__}: param_groups\[1\]: {key}"):
        cls([{"params": [a]}, {"params": [b], "rank": 2, key: value}])


def test_unknown_key_and_sparse_gradient():
    p = torch.zeros(4, 4, requires_grad=True)
    with pytest.raises(GroupError, match="unknown key"):
        GaLoreAdamW([{"params": [p], "rank": 2, "ranks": 3}])
    opt = GaLoreAdamW([{"params": [p], "rank": 2}])
    p.grad = torch.zeros(4, 4).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


@pytest.mark.parametrize("cls", [GaLoreAdamW, GaLoreAdafactor])
@pytest.mark.parametrize("extra", [{}, {"proj_type": "full"}, {"residual": "fira"}])
def test_bf16_parameters_keep_their_dtype_with_float32_basis(cls, extra):
    gen = torch.Generator().manual_seed(8)
    X = torch.randn(32, 12, generator=gen).bfloat16()
    T = (X.float() @ torch.randn(12, 10, generator=gen)).bfloat16()
    W = torch.zeros(12, 10, dtype=torch.bfloat16, requires_grad=True)
    inner = {"lr": 0.05} if cls is GaLoreAdamW else {"lr": 0.05, "relative_step": False,
                                                     "scale_parameter": False}
    opt = cls([{"params": [W], "rank": 4, "update_proj_gap": 5, "scale": 1.0, **extra}], **inner)
    first = None
    for _ in range(20):
        opt.zero_grad()
        loss = ((X @ W - T).float() ** 2).mean()
        first = float(loss.detach()) if first is None else first
        loss.backward()
        opt.step()
    assert W.dtype == torch.bfloat16
    assert opt.state[W]["projector"].dtype == torch.float32
    assert float(((X @ W - T).float() ** 2).mean().detach()) < 0.7 * first
