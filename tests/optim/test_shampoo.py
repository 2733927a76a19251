"""Shampoo against a dense float64 transcription of the algorithm, plus the derived
AdaGrad identity, the fallback policy and the configuration errors."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from matrixopt.optim import GroupError, Shampoo

SHAPE = (7, 5)
STEPS = 8


# ---------------------------------------------------------------------------
# the reference: per block by explicit slices (no padding), numpy float64
# ---------------------------------------------------------------------------
def _root(A: np.ndarray, e: float, eps: float) -> np.ndarray:
    """(A + eps I)^{-e} by eigh with Distributed Shampoo's shift of small eigenvalues."""
    lam, Q = np.linalg.eigh(A + eps * np.eye(A.shape[0]))
    if lam[0] < eps:
        lam = lam - lam[0] + eps
    return (Q * lam ** (-e)) @ Q.T


def reference(W0: np.ndarray, grads: list[np.ndarray], *, lr: float, betas: tuple[float, float],
              epsilon: float, weight_decay: float = 0.0, f: int, start: int, max_dim: int,
              grafting: str | None = "adam", graft_beta2: float = 0.999,
              graft_eps: float = 1e-8, exps: tuple[float, float] = (0.25, 0.25),
              mkor: bool = False, bias_correction: bool = True) -> list[np.ndarray]:
    m, n = W0.shape
    rows = [(i, min(i + max_dim, m)) for i in range(0, m, max_dim)]
    cols = [(j, min(j + max_dim, n)) for j in range(0, n, max_dim)]
    blocks = [(r, c) for r in rows for c in cols]
    Ls = {bk: np.zeros((bk[0][1] - bk[0][0],) * 2) for bk in blocks}
    Rs = {bk: np.zeros((bk[1][1] - bk[1][0],) * 2) for bk in blocks}
    XL = {bk: np.eye(Ls[bk].shape[0]) for bk in blocks}
    XR = {bk: np.eye(Rs[bk].shape[0]) for bk in blocks}
    b1, b2 = betas
    W, M, V = W0.copy(), np.zeros_like(W0), np.zeros_like(W0)
    out = []
    for t, G in enumerate(grads, start=1):
        w = 1.0 if b2 == 1.0 else 1.0 - b2
        gb2 = 1.0 if grafting == "adagrad" else graft_beta2
        V = gb2 * V + (1.0 if gb2 == 1.0 else 1.0 - gb2) * G * G
        bc2 = 1.0 - b2 ** t if (bias_correction and b2 < 1.0) else 1.0
        refresh = t == start or (t > start and t % f == 0)
        for bk in blocks:
            (r0, r1), (c0, c1) = bk
            g = G[r0:r1, c0:c1]
            Ls[bk] = b2 * Ls[bk] + w * g @ g.T
            Rs[bk] = b2 * Rs[bk] + w * g.T @ g
            if t >= start and refresh:
                XL[bk] = _root(Ls[bk] / bc2, exps[0], epsilon)
                XR[bk] = _root(Rs[bk] / bc2, exps[1], epsilon)
            elif t >= start and mkor:
                prev = 1.0 - b2 ** (t - 1) if bc2 != 1.0 else 1.0
                gamma, c = b2 * prev / bc2, w / bc2
                s = g.sum(1)
                r = g.T @ s
                r = r / max(np.linalg.norm(r), 1e-30)
                vL = g @ r
                vR = g.T @ (vL / max(np.linalg.norm(vL), 1e-30))
                XL[bk] = np.linalg.inv(gamma * np.linalg.inv(XL[bk]) + c * np.outer(vL, vL))
                XR[bk] = np.linalg.inv(gamma * np.linalg.inv(XR[bk]) + c * np.outer(vR, vR))
        M = b1 * M + (1.0 - b1) * G
        Gbar = M / (1.0 - b1 ** t) if (bias_correction and b1 > 0) else M
        if grafting is None:
            graft = None
        elif grafting == "sgd":
            graft = Gbar
        else:
            bcg = 1.0 - graft_beta2 ** t if grafting == "adam" else 1.0
            graft = Gbar / (np.sqrt(V / bcg) + graft_eps)
        if t < start:
            P = graft if graft is not None else Gbar
        else:
            P = np.zeros_like(W)
            for bk in blocks:
                (r0, r1), (c0, c1) = bk
                pb = Gbar[r0:r1, c0:c1]
                if exps[0]:
                    pb = XL[bk] @ pb
                if exps[1]:
                    pb = pb @ XR[bk]
                if graft is not None:
                    pb = pb * np.linalg.norm(graft[r0:r1, c0:c1]) / (np.linalg.norm(pb) + 1e-16)
                P[r0:r1, c0:c1] = pb
        W = W * (1.0 - lr * weight_decay) - lr * P
        out.append(W.copy())
    return out


def _grads(seed: int = 0, steps: int = STEPS) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # a common low-rank part makes the factors anisotropic (the roots matter)
    u = torch.randn(SHAPE[0], 2, dtype=torch.float64, generator=g)
    return [u @ torch.randn(2, SHAPE[1], dtype=torch.float64, generator=g)
            + 0.3 * torch.randn(*SHAPE, dtype=torch.float64, generator=g) for _ in range(steps)]


def _run(kwargs: dict[str, Any], grads: list[torch.Tensor]) -> tuple[list[torch.Tensor], Shampoo]:
    torch.manual_seed(1)
    W = torch.nn.Parameter(torch.randn(*SHAPE, dtype=torch.float64))
    opt = Shampoo([W], **kwargs)
    out = []
    for G in grads:
        W.grad = G.clone()
        opt.step()
        out.append(W.detach().clone())
    return out, opt


CASES = {
    "adam-graft": ({}, {}),
    "blocked-uneven": ({"max_preconditioner_dim": 3}, {"max_dim": 3}),
    "mkor": ({"inverse_update": "mkor"}, {"mkor": True, "exps": (1.0, 1.0)}),
    "mkor-blocked-adagrad": ({"inverse_update": "mkor", "max_preconditioner_dim": 4,
                              "betas": (0.9, 1.0), "grafting": "adagrad"},
                             {"mkor": True, "exps": (1.0, 1.0), "max_dim": 4,
                              "betas": (0.9, 1.0), "grafting": "adagrad"}),
    "rmsprop-wd": ({"grafting": "rmsprop", "grafting_beta2": 0.99, "weight_decay": 0.1},
                   {"grafting": "rmsprop", "graft_beta2": 0.99, "weight_decay": 0.1}),
    "no-graft-beta1-0": ({"grafting": None, "betas": (0.0, 0.99)},
                         {"grafting": None, "betas": (0.0, 0.99)}),
    "sgd-graft-one-sided": ({"grafting": "sgd", "exponent_override": (0.5, 0.0)},
                            {"grafting": "sgd", "exps": (0.5, 0.0)}),
    "no-bias-correction": ({"bias_correction": False}, {"bias_correction": False}),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matches_float64_reference(case: str) -> None:
    """≥ 2 refreshes (f = 3, start = 2: refreshes at t = 2, 3, 6) and steps between them."""
    ours, theirs = CASES[case]
    base = dict(lr=0.05, betas=(0.9, 0.99), epsilon=1e-3, precondition_frequency=3,
                start_preconditioning_step=2, max_preconditioner_dim=1024)
    grads = _grads()
    got, opt = _run({**base, **ours}, grads)
    torch.manual_seed(1)
    W0 = torch.randn(*SHAPE, dtype=torch.float64).numpy()
    ref = reference(W0, [g.numpy() for g in grads], lr=0.05,
                    betas=theirs.pop("betas", (0.9, 0.99)), epsilon=1e-3, f=3, start=2,
                    max_dim=theirs.pop("max_dim", 1024), **theirs)
    for t, (a, b) in enumerate(zip(got, ref), start=1):
        np.testing.assert_allclose(a.numpy(), b, rtol=1e-9, atol=1e-11, err_msg=f"step {t}")
    assert len(got) == STEPS
    assert int(opt.state[opt.param_groups[0]["params"][0]]["root_fallbacks"]) == 0


def test_newton_root_route_tracks_eigh() -> None:
    base = dict(lr=0.05, epsilon=1e-3, precondition_frequency=2)
    grads = _grads(3)
    a, _ = _run(base, grads)
    b, _ = _run({**base, "root_method": "newton", "newton_iters": 40}, grads)
    torch.testing.assert_close(a[-1], b[-1], rtol=1e-8, atol=1e-10)


def test_diagonal_gradients_give_diagonal_adagrad() -> None:
    """Derived (REFERENCE-NEXT §2): G_t = diag(d_t), β2 = 1, ε → 0, default exponents:
    L = R = diag(Σd²), so the update is d/√(Σd²) (diagonal AdaGrad)."""
    n = 4
    W = torch.nn.Parameter(torch.zeros(n, n, dtype=torch.float64))
    opt = Shampoo([W], lr=1.0, betas=(0.0, 1.0), epsilon=1e-30, grafting=None,
                  precondition_frequency=1, start_preconditioning_step=1)
    g = torch.Generator().manual_seed(0)
    total = torch.zeros(n, dtype=torch.float64)
    for _ in range(3):
        d = torch.rand(n, dtype=torch.float64, generator=g) + 0.5
        total += d * d
        before = W.detach().clone()
        W.grad = torch.diag(d)
        opt.step()
        torch.testing.assert_close(before - W.detach(), torch.diag(d / total.sqrt()),
                                   rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------
# bad input: never a NaN preconditioner
# ---------------------------------------------------------------------------
def test_nan_gradient_under_ignore_keeps_previous_roots_and_counts() -> None:
    W = torch.nn.Parameter(torch.randn(*SHAPE, dtype=torch.float32))
    opt = Shampoo([W], lr=0.01, epsilon=1e-3, precondition_frequency=1, nonfinite="ignore")
    for G in _grads()[:2]:
        W.grad = G.float()
        opt.step()
    st = opt.state[W]
    roots = st["inv_root_L"].clone(), st["inv_root_R"].clone()
    W.grad = torch.full(SHAPE, float("nan"))
    opt.step()  # "ignore": the factors take the NaN, the roots must not
    assert torch.equal(st["inv_root_L"], roots[0]) and torch.equal(st["inv_root_R"], roots[1])
    assert int(st["root_fallbacks"]) == 2
    assert not torch.isfinite(st["factor_L"]).all()


@pytest.mark.parametrize("method", ["eigh", "newton"])
def test_all_zero_gradient_with_zero_epsilon_falls_back_to_identity(method: str) -> None:
    W = torch.nn.Parameter(torch.randn(*SHAPE))
    opt = Shampoo([W], lr=0.01, epsilon=0.0, precondition_frequency=1, root_method=method)
    W.grad = torch.zeros(SHAPE)
    opt.step()
    st = opt.state[W]
    torch.testing.assert_close(st["inv_root_L"], torch.eye(7).unsqueeze(0))
    torch.testing.assert_close(st["inv_root_R"], torch.eye(5).unsqueeze(0))
    assert int(st["root_fallbacks"]) == 2
    assert torch.isfinite(W).all()


def test_skip_policy_leaves_state_unchanged() -> None:
    W = torch.nn.Parameter(torch.randn(*SHAPE))
    opt = Shampoo([W], lr=0.01, epsilon=1e-3, precondition_frequency=1)
    W.grad = _grads()[0].float()
    opt.step()
    st = opt.state[W]
    saved = {k: v.clone() for k, v in st.items() if k not in ("step", "nonfinite_count")}
    w0 = W.detach().clone()
    W.grad = torch.full(SHAPE, float("inf"))
    opt.step()
    assert torch.equal(W.detach(), w0)
    for k, v in saved.items():
        assert torch.equal(st[k], v), k
    assert int(st["nonfinite_count"]) == 1 and int(st["root_fallbacks"]) == 0


def test_state_dtype_bf16_moments_fp32_factors() -> None:
    W = torch.nn.Parameter(torch.randn(*SHAPE))
    opt = Shampoo([W], state_dtype="bf16")
    W.grad = _grads()[0].float()
    opt.step()
    st = opt.state[W]
    assert st["exp_avg"].dtype == torch.bfloat16 and st["graft_sq"].dtype == torch.bfloat16
    assert st["factor_L"].dtype == torch.float32 and st["inv_root_R"].dtype == torch.float32


@pytest.mark.parametrize("kwargs, match", [
    ({"inverse_update": "mkor", "exponent_override": 0.25}, "mkor"),
    ({"root_method": "newton", "exponent_override": 0.4}, "integer roots"),
    ({"betas": (0.9, 1.5)}, "betas"),
    ({"precondition_frequency": 0}, "precondition_frequency"),
    ({"grafting": "adamw"}, "grafting"),
    ({"exponent_override": (0.25,)}, "exponent_override"),
    ({"max_preconditioner_dim": 0}, "max_preconditioner_dim"),
    ({"algorithm": "shampoo"}, "needs parameters with >= 2 dims"),
])
def test_bad_configuration_names_key(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(GroupError, match=match):
        Shampoo([torch.nn.Parameter(torch.zeros(3))], **kwargs)


def test_blocking_state_shapes() -> None:
    W = torch.nn.Parameter(torch.randn(10, 3, 4))  # 3-D: a batch of 3 matrices 3 × 4
    V = torch.nn.Parameter(torch.randn(9, 5))
    opt = Shampoo([W, V], max_preconditioner_dim=4)
    W.grad, V.grad = torch.randn_like(W), torch.randn_like(V)
    opt.step()
    assert opt.state[W]["factor_L"].shape == (10, 3, 3)
    assert opt.state[V]["factor_L"].shape == (3 * 2, 4, 4)
    assert opt.state[V]["factor_R"].shape == (3 * 2, 4, 4)
    assert math.isfinite(float(W.detach().sum()))


@pytest.mark.parametrize("method", ["eigh", "newton"])
def test_non_psd_factor_never_gives_a_nan_root(method: str) -> None:
    """A factor that is not PSD (corrupted state): eigh shifts its spectrum up to ε
    (Distributed Shampoo's rule), Newton either converges or falls back; never NaN."""
    W = torch.nn.Parameter(torch.randn(*SHAPE))
    opt = Shampoo([W], lr=0.01, epsilon=1e-3, precondition_frequency=1, root_method=method)
    W.grad = _grads()[0].float()
    opt.step()
    st = opt.state[W]
    st["factor_L"].copy_(-5.0 * torch.eye(7).unsqueeze(0))  # negative definite
    st["factor_L"][0, 0, 1] = 100.0                          # and not symmetric
    W.grad = _grads()[1].float()
    opt.step()
    assert torch.isfinite(st["inv_root_L"]).all() and torch.isfinite(W).all()
    if method == "eigh":
        assert float(torch.linalg.eigvalsh(st["inv_root_L"][0]).min()) > 0
