"""SOAP against a dense float64 transcription of the official algorithm (nikhilvyas/SOAP
@f42d296: rotated momentum, project/project_back by tensordot, refresh by
diag(QᵀPQ)-sort + QR), plus the behaviours REFERENCE-NEXT §1 asks for."""

from __future__ import annotations

import io
from itertools import chain

import pytest
import torch

from matrixopt.optim import SOAP, soap_param_groups
from matrixopt.optim.functional.soap import merged_shape, rotate
from matrixopt.optim.soap import REFRESH_FALLBACKS


class RefSOAP:
    """The official step, one float64 tensor at a time (written from the paper's
    Algorithm and the official code's structure, not from matrixopt)."""

    def __init__(self, lr=3e-3, betas=(0.95, 0.95), shampoo_beta=-1.0, eps=1e-8,
                 weight_decay=0.01, precondition_frequency=10, max_precond_dim=10000,
                 merge_dims=False, precondition_1d=False, normalize_grads=False,
                 correct_bias=True):
        self.__dict__.update(locals())
        self.state: dict[int, dict] = {}

    def _merge(self, x):
        if not self.merge_dims:
            return x
        return x.reshape(merged_shape(x.shape, self.max_precond_dim, True))

    def _project(self, x, Q, back=False):
        shape = x.shape
        x = self._merge(x)
        for mat in Q:
            if mat is not None:
                x = torch.tensordot(x, mat, dims=[[0], [1 if back else 0]])
            else:
                x = x.permute(list(range(1, x.ndim)) + [0])
        return x.reshape(shape)

    def _update_precond(self, s, G):
        if s["Q"] is not None:
            s["exp_avg"] = self._project(s["exp_avg"], s["Q"], back=True)
        g = self._merge(G)
        for idx, P in enumerate(s["GG"]):
            if P is None:
                continue
            other = [*chain(range(idx), range(idx + 1, g.ndim))]
            s["GG"][idx] = torch.lerp(P, torch.tensordot(g, g, dims=[other, other]),
                                      1 - s["sb"])
        if s["Q"] is None:
            Q = []
            for P in s["GG"]:
                Q.append(None if P is None else torch.linalg.eigh(
                    P + 1e-30 * torch.eye(P.shape[0], dtype=P.dtype))[1].flip(1))
            s["Q"] = Q
        if s["step"] > 0 and s["step"] % self.precondition_frequency == 0:
            v = self._merge(s["exp_avg_sq"])
            for ind, (P, o) in enumerate(zip(s["GG"], s["Q"])):
                if P is None:
                    continue
                idx = torch.argsort(torch.diag(o.T @ P @ o), descending=True)
                v = v.index_select(ind, idx)
                s["Q"][ind] = torch.linalg.qr(P @ o[:, idx])[0]
            s["exp_avg_sq"] = v.reshape(s["exp_avg_sq"].shape)
        if s["step"] > 0:
            s["exp_avg"] = self._project(s["exp_avg"], s["Q"])

    def step(self, W, G):
        s = self.state.get(id(W))
        if s is None:
            s = self.state[id(W)] = {"step": 0, "exp_avg": torch.zeros_like(G),
                                     "exp_avg_sq": torch.zeros_like(G), "Q": None}
            g = self._merge(G)
            dims = ([self.precondition_1d and g.shape[0] <= self.max_precond_dim]
                    if g.ndim == 1 else [d <= self.max_precond_dim for d in g.shape])
            s["GG"] = [torch.zeros(d, d, dtype=G.dtype) if on else None
                       for d, on in zip(g.shape, dims)]
            s["sb"] = self.shampoo_beta if self.shampoo_beta >= 0 else self.betas[1]
            self._update_precond(s, G)
            return
        b1, b2 = self.betas
        Gp = self._project(G, s["Q"])
        s["step"] += 1
        s["exp_avg"].mul_(b1).add_(Gp, alpha=1 - b1)
        s["exp_avg_sq"].mul_(b2).add_(Gp.square(), alpha=1 - b2)
        denom = s["exp_avg_sq"].sqrt().add_(self.eps)
        size = self.lr
        if self.correct_bias:
            size = size * (1 - b2 ** s["step"]) ** 0.5 / (1 - b1 ** s["step"])
        U = self._project(s["exp_avg"] / denom, s["Q"], back=True)
        if self.normalize_grads:
            U = U / (1e-30 + torch.mean(U ** 2) ** 0.5)
        W.add_(U, alpha=-size)
        if self.weight_decay > 0:
            W.add_(W, alpha=-self.lr * self.weight_decay)
        self._update_precond(s, G)


def _grads(shapes, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    # a fixed anisotropic scale per tensor so the spectra are tie-free
    scales = [torch.rand(*s, generator=g, dtype=torch.float64) + 0.1 for s in shapes]
    return [[torch.randn(*s, generator=g, dtype=torch.float64) * sc
             for s, sc in zip(shapes, scales)] for _ in range(steps)]


CASES = {
    "default": ({}, [(6, 5), (4, 7)]),
    "one_sided": ({"max_precond_dim": 5}, [(6, 5), (7, 3)]),
    "merge_3d_4d": ({"merge_dims": True, "max_precond_dim": 12}, [(4, 3, 2), (3, 2, 2, 2)]),
    "precond_1d": ({"precondition_1d": True}, [(6,), (5, 4)]),
    "normalize_nocorrect": ({"normalize_grads": True, "correct_bias": False,
                             "shampoo_beta": 0.9, "weight_decay": 0.0}, [(5, 5)]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_soap_matches_dense_float64_reference(case):
    kw, shapes = CASES[case]
    kw = {"lr": 0.01, "betas": (0.9, 0.95), "precondition_frequency": 3, **kw}
    steps = 11  # three refreshes (t = 3, 6, 9)
    grads = _grads(shapes, steps)
    g = torch.Generator().manual_seed(1)
    W0 = [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]
    ref, Wr = RefSOAP(**kw), [w.clone() for w in W0]
    params = [torch.nn.Parameter(w.clone()) for w in W0]
    opt = SOAP(params, algorithm="soap", **kw)
    for t in range(steps):
        for w, gr in zip(Wr, grads[t]):
            ref.step(w, gr)
        for p, gr in zip(params, grads[t]):
            p.grad = gr.clone()
        opt.step()
        for p, w in zip(params, Wr):
            torch.testing.assert_close(p.detach(), w, rtol=1e-9, atol=1e-11,
                                       msg=lambda m, t=t: f"{case} step {t}: {m}")
    assert all(float(opt.state[p]["step"]) == steps - 1 for p in params)
    assert all(int(opt.state[p][REFRESH_FALLBACKS]) == 0 for p in params)
    # the second moment is the official one (rotated space, permuted at each refresh)
    for p, w in zip(params, Wr):
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], ref.state[id(w)]["exp_avg_sq"],
                                   rtol=1e-8, atol=1e-14)


def test_no_factor_tensor_is_adam_with_soap_conventions():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(7, dtype=torch.float64))
    w = p.detach().clone()
    opt = SOAP([p], lr=0.1, betas=(0.9, 0.99), eps=1e-3, weight_decay=0.1, algorithm="soap")
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    gs = [torch.randn(7, dtype=torch.float64) for _ in range(6)]
    for k, gr in enumerate(gs):
        p.grad = gr.clone()
        opt.step()
        if k == 0:
            assert torch.equal(p.detach(), w)  # first call: no update
            continue
        t = k
        m = 0.9 * m + 0.1 * gr
        v = 0.99 * v + 0.01 * gr * gr
        w = w - 0.1 * (1 - 0.99 ** t) ** 0.5 / (1 - 0.9 ** t) * m / (v.sqrt() + 1e-3)
        w = w * (1 - 0.1 * 0.1)
        torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-14)


def test_rotation_equivariance():
    g = torch.Generator().manual_seed(3)
    # square: one gradient already gives full-rank (tie-free) factors on both sides
    U = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64)).Q
    W = torch.randn(5, 5, generator=g, dtype=torch.float64)
    a, b = torch.nn.Parameter(W.clone()), torch.nn.Parameter(U @ W @ V.T)
    oa = SOAP([a], lr=0.02, precondition_frequency=2, weight_decay=0.0)
    ob = SOAP([b], lr=0.02, precondition_frequency=2, weight_decay=0.0)
    for gr in _grads([(5, 5)], 9, seed=5):
        a.grad, b.grad = gr[0].clone(), U @ gr[0] @ V.T
        oa.step()
        ob.step()
    torch.testing.assert_close(b.detach(), U @ a.detach() @ V.T, atol=1e-9, rtol=0)


def test_bases_stay_orthonormal_and_v_is_permuted():
    p = torch.nn.Parameter(torch.randn(8, 6))
    opt = SOAP([p], precondition_frequency=2, betas=(0.9, 0.9))
    for t, gr in enumerate(_grads([(8, 6)], 6, seed=2)):
        p.grad = gr[0].float()
        if t:
            s = opt.state[p]
            rot = s["basis_0"].T @ p.grad @ s["basis_1"]
            want = 0.9 * s["exp_avg_sq"] + 0.1 * rot * rot
        opt.step()
        if t and t % 2 == 0:  # a refresh step: v is the new v with rows/cols permuted
            got = opt.state[p]["exp_avg_sq"]
            assert not torch.allclose(got, want)
            torch.testing.assert_close(got.flatten().sort().values,
                                       want.flatten().sort().values, rtol=1e-5, atol=0)
        for k, d in ((0, 8), (1, 6)):
            Q = opt.state[p][f"basis_{k}"]
            torch.testing.assert_close(Q.T @ Q, torch.eye(d), atol=1e-5, rtol=0)


def test_bad_factors_never_give_nan_and_are_counted():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, 4))
    opt = SOAP([p], precondition_frequency=1, nonfinite="ignore", lr=0.01)
    p.grad = torch.zeros(5, 4)  # all-zero factor at init: identity bases, counted
    opt.step()
    assert int(opt.state[p][REFRESH_FALLBACKS]) == 2
    torch.testing.assert_close(opt.state[p]["basis_0"], torch.eye(5))
    for _ in range(2):
        p.grad = torch.randn(5, 4)
        opt.step()
    assert torch.isfinite(p).all()
    Q = opt.state[p]["basis_0"].clone()
    # a NaN that slipped through nonfinite="ignore" poisons the factors: the weights get
    # NaN (as torch would), but the bases fall back to the previous ones, no NaN in them
    p.grad = torch.full((5, 4), float("nan"))
    opt.step()
    assert int(opt.state[p][REFRESH_FALLBACKS]) == 4
    assert torch.equal(opt.state[p]["basis_0"], Q)
    assert torch.isfinite(opt.state[p]["basis_1"]).all()


def test_skip_keeps_everything_and_counts():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, 4))
    opt = SOAP([p], precondition_frequency=1)
    for _ in range(3):
        p.grad = torch.randn(5, 4)
        opt.step()
    snap = {k: v.clone() for k, v in opt.state[p].items() if k not in ("step",)}
    w = p.detach().clone()
    p.grad = torch.randn(5, 4)
    p.grad[0, 0] = float("inf")
    opt.step()  # a refresh step too (f = 1): skipped, bases kept
    assert torch.equal(p.detach(), w)
    for k, v in snap.items():
        if k != "nonfinite_count":
            assert torch.equal(opt.state[p][k], v), k
    assert int(opt.state[p]["nonfinite_count"]) == 1


def test_auto_routing_adamw_path_and_param_groups():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8),
                                torch.nn.LayerNorm(8), torch.nn.Linear(8, 10))
    groups = soap_param_groups(model, precondition_frequency=5)
    algs = {g["name"]: g["algorithm"] for g in groups}
    assert "soap" in algs.values() and "adamw" in algs.values()
    soap_groups = [g for g in groups if g["algorithm"] == "soap"]
    assert all(g["precondition_frequency"] == 5 for g in soap_groups)
    assert any(p is model[1].weight for g in soap_groups for p in g["params"])
    opt = SOAP(groups)
    x = torch.randint(0, 10, (4, 3))
    for _ in range(3):
        opt.zero_grad()
        model(x).logsumexp(-1).sum().backward()
        opt.step()
    assert "factor_0" in opt.state[model[1].weight]
    assert set(opt.state[model[2].weight]) >= {"exp_avg", "exp_avg_sq", "step"}
    assert "factor_0" not in opt.state[model[0].weight]


def test_stagger_refresh_spreads_refreshes():
    ps = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(3)]
    opt = SOAP(ps, precondition_frequency=3, stagger_refresh=True)
    calls = []
    orig = opt._refresh
    opt._refresh = lambda pairs: calls.append(len(pairs)) or orig(pairs)  # type: ignore
    for gr in _grads([(4, 3)] * 3, 7, seed=1):
        for p, x in zip(ps, gr):
            p.grad = x.float()
        opt.step()
    # steps t = 1..6: each tensor refreshes once per 3 steps, two factors each, never all
    assert calls == [2] * 6


@pytest.mark.parametrize("sd", ["bf16", "int8"])
def test_state_dtype_stores_moments_factors_bases(sd):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(72, 64))  # >= 4096 entries: quantised
    ref = torch.nn.Parameter(p.detach().clone())
    opt, oref = SOAP([p], state_dtype=sd, precondition_frequency=2), SOAP([ref])
    for _ in range(5):
        gr = torch.randn(72, 64)
        p.grad, ref.grad = gr.clone(), gr.clone()
        opt.step()
        oref.step()
    s = opt.state[p]
    want = torch.bfloat16 if sd == "bf16" else torch.int8
    assert s["exp_avg"].dtype == want and s["factor_0"].dtype == want
    assert s["basis_0"].dtype == want and s["exp_avg_sq"].dtype == want
    rel = (p - ref).detach().norm() / ref.detach().norm()
    assert float(rel) < 1e-2


def test_checkpoint_round_trip_weights_only():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(6, 5))
    opt = SOAP([p], precondition_frequency=2)
    for _ in range(3):
        p.grad = torch.randn(6, 5)
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = SOAP([q], precondition_frequency=2)
    opt2.load_state_dict(sd)
    assert opt2.state[q]["step"].device.type == "cpu"
    for _ in range(3):
        gr = torch.randn(6, 5)
        p.grad, q.grad = gr.clone(), gr.clone()
        opt.step()
        opt2.step()
    assert torch.equal(p, q)


def test_bad_hyperparameters_name_group_and_value():
    p = torch.nn.Parameter(torch.randn(3, 3))
    with pytest.raises(ValueError, match=r"param_groups\[0\]: precondition_frequency"):
        SOAP([p], precondition_frequency=0)
    with pytest.raises(ValueError, match="max_precond_dim"):
        SOAP([p], max_precond_dim=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="algorithm"):
        SOAP([p], algorithm="muon")
    with pytest.raises(ValueError, match="shampoo_beta"):
        SOAP([p], shampoo_beta=1.0)


def test_merged_shape_and_rotate_helpers():
    assert merged_shape((128, 64, 3, 3), 10000, True) == (8192, 9)
    assert merged_shape((4, 3, 2), 12, True) == (12, 2)
    assert merged_shape((20000, 4), 10000, True) == (20000, 4)
    assert merged_shape((5, 6), 10, False) == (5, 6)
    x = torch.randn(3, 4, dtype=torch.float64)
    Q = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64)).Q
    torch.testing.assert_close(rotate(x, [None, Q]), x @ Q)
    torch.testing.assert_close(rotate(rotate(x, [None, Q]), [None, Q], back=True), x)


def test_docs_list_every_group_key_with_its_default():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "optimizers.md").read_text()
    section = text.split("\n## SOAP\n", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", section, flags=re.MULTILINE))
    defaults = SOAP([torch.nn.Parameter(torch.zeros(2, 2))]).defaults
    assert set(rows) == set(defaults)
    for key, cell in rows.items():
        assert eval(cell) == defaults[key], key
