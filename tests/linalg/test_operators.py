"""AuON, Hybrid-AuON and RACS against float64 NumPy references written from the formulas.

References (independent of the code under test, REFERENCE-NEXT.md §7):
auon: Y = G/‖G‖_F, U = Y/sqrt(mean cosh²(γY)); hybrid: Keller quintic steps
X ← aX + (bA + cA²)X, A = XXᵀ on the short side from G/‖G‖_F, then auon;
racs: X ← X ⊘ (sqrt(rowmean X² + ε) sqrt(colmean X² + ε)ᵀ) from X = G/rms(G),
then X/‖X‖_F.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from matrixopt.linalg import OPERATORS, auon, hybrid_auon, racs
from matrixopt.linalg.svd import RowShards

KELLER = (3.4445, -4.7750, 2.0315)


# ------------------------------------------------------------------ references
def auon_ref(G: np.ndarray, gamma: float = 1.5) -> np.ndarray:
    out = np.zeros_like(G)
    for idx in np.ndindex(*G.shape[:-2]):
        g = G[idx]
        nrm = np.linalg.norm(g)
        if nrm == 0:
            continue
        y = g / nrm
        out[idx] = y / math.sqrt(np.mean(np.cosh(gamma * y) ** 2))
    return out


def hybrid_ref(G: np.ndarray, steps: int = 1, gamma: float = 1.5) -> np.ndarray:
    a, b, c = KELLER
    out = np.zeros_like(G)
    for idx in np.ndindex(*G.shape[:-2]):
        x = G[idx]
        tall = x.shape[0] > x.shape[1]
        x = x.T if tall else x
        nrm = np.linalg.norm(x)
        if nrm == 0:
            continue
        x = x / nrm
        for _ in range(steps):
            A = x @ x.T
            x = a * x + (b * A + c * A @ A) @ x
        out[idx] = x.T if tall else x
    return auon_ref(out, gamma)


def racs_ref(G: np.ndarray, iters: int = 1, eps: float = 1e-8) -> np.ndarray:
    out = np.zeros_like(G)
    for idx in np.ndindex(*G.shape[:-2]):
        x = G[idx]
        rms = math.sqrt(np.mean(x**2))
        if rms == 0:
            continue
        x = x / rms
        for _ in range(iters):
            s = np.mean(x**2, axis=1, keepdims=True)
            q = np.mean(x**2, axis=0, keepdims=True)
            x = x / (np.sqrt(s + eps) * np.sqrt(q + eps))
        out[idx] = x / np.linalg.norm(x)
    return out


REFS = {"auon": (auon, auon_ref), "hybrid_auon": (hybrid_auon, hybrid_ref),
        "racs": (racs, racs_ref)}


@st.composite
def _matrices(draw: st.DrawFn) -> np.ndarray:
    batch = draw(st.lists(st.integers(1, 3), max_size=2))
    m, n = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = 10.0 ** draw(st.integers(-20, 20))
    kind = draw(st.sampled_from(["gauss", "lowrank", "sparse"]))
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((*batch, m, n))
    if kind == "lowrank":
        G = rng.standard_normal((*batch, m, 1)) @ rng.standard_normal((*batch, 1, n))
    elif kind == "sparse":
        G = G * (rng.random(G.shape) < 0.3)
    return G * scale


# ------------------------------------------------------------------ float64 references
@pytest.mark.parametrize("name", sorted(REFS))
@settings(max_examples=25, deadline=None)
@given(G=_matrices())
def test_matches_float64_reference(name: str, G: np.ndarray) -> None:
    fn, ref = REFS[name]
    got = fn(torch.from_numpy(G)).numpy()
    want = ref(G)
    assert got.shape == G.shape
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", sorted(REFS))
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_low_precision_close_to_reference(name: str, dtype: torch.dtype, tol: float) -> None:
    G = np.random.default_rng(0).standard_normal((2, 24, 40))
    fn, ref = REFS[name]
    out = fn(torch.from_numpy(G).to(dtype))
    assert out.dtype == dtype
    want = ref(torch.from_numpy(G).to(dtype).double().numpy())
    err = np.linalg.norm(out.double().numpy() - want) / np.linalg.norm(want)
    assert err < tol


@pytest.mark.parametrize("steps", [2, 5])
def test_hybrid_auon_steps(steps: int) -> None:
    G = np.random.default_rng(1).standard_normal((30, 12))
    got = hybrid_auon(torch.from_numpy(G), steps=steps).numpy()
    np.testing.assert_allclose(got, hybrid_ref(G, steps), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("iters,eps", [(3, 1e-8), (2, 0.0), (1, 0.5)])
def test_racs_iters_eps(iters: int, eps: float) -> None:
    G = np.random.default_rng(2).standard_normal((2, 9, 7))
    got = racs(torch.from_numpy(G), iters=iters, eps=eps).numpy()
    np.testing.assert_allclose(got, racs_ref(G, iters, eps), rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------ derived properties
def test_auon_cosh_brake_bound_is_attained_by_a_one_hot_matrix() -> None:
    """1 <= r² <= 1 + sinh²(γ)/N (REFERENCE-NEXT §7, derived); a one-hot G attains the top."""
    gamma, (m, n) = 1.5, (8, 5)
    G = torch.zeros(m, n, dtype=torch.float64)
    G[3, 2] = -7.0
    r2 = 1.0 / auon(G, gamma=gamma).norm().item() ** 2
    assert r2 == pytest.approx(1 + math.sinh(gamma) ** 2 / (m * n), rel=1e-12)
    for seed in range(5):
        R = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        r2 = 1.0 / auon(R, gamma=gamma).norm().item() ** 2
        assert 1.0 <= r2 <= 1 + math.sinh(gamma) ** 2 / (m * n)


def test_racs_of_a_positive_rank_one_matrix_is_flat() -> None:
    """G = u vᵀ (u, v > 0): s_i ∝ u_i², q_j ∝ v_j², so Ĝ is constant: every entry 1/sqrt(mn)."""
    u = torch.tensor([0.1, 2.0, 5.0, 0.3], dtype=torch.float64)
    v = torch.tensor([3.0, 0.01, 1.0], dtype=torch.float64)
    out = racs(torch.outer(u, v), eps=0.0)
    torch.testing.assert_close(out, torch.full((4, 3), 1 / math.sqrt(12), dtype=torch.float64))


@pytest.mark.parametrize("name", sorted(REFS))
def test_zero_matrices_and_extreme_scales(name: str) -> None:
    fn = REFS[name][0]
    G = torch.randn(3, 6, 4)
    G[1] = 0.0
    out = fn(G)
    assert torch.equal(out[1], torch.zeros(6, 4))
    assert bool(torch.isfinite(out).all())
    for c in (1e-30, 1e30):
        torch.testing.assert_close(fn(G * c), out, rtol=1e-5, atol=1e-6)
    assert fn(torch.zeros(0, 3, 2)).shape == (0, 3, 2)


def test_operator_names() -> None:
    assert OPERATORS == ("newton_schulz", "auon", "hybrid_auon", "racs")


# ------------------------------------------------------------------ row shards
class _ThreadShards:
    """Row blocks held by ``world`` threads; sums/maxima by a barrier all-reduce."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world)
        self.slots: list[torch.Tensor | None] = [None] * world

    def _reduce(self, rank: int, t: torch.Tensor, op: str) -> torch.Tensor:
        self.slots[rank] = t.clone()
        self.barrier.wait()
        stack = torch.stack([s for s in self.slots if s is not None])
        out = stack.sum(0) if op == "sum" else stack.amax(0)
        self.barrier.wait()
        return out

    def hooks(self, rank: int, rows: int, start: int) -> RowShards:
        def no_qr(Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            raise AssertionError("the operators never need a QR")
        return RowShards(rows=rows, start=start,
                         reduce_sum=lambda t: self._reduce(rank, t, "sum"),
                         reduce_max=lambda t: self._reduce(rank, t, "max"), qr=no_qr)


@pytest.mark.parametrize("name", ["auon", "racs"])
@pytest.mark.parametrize("cuts", [(0, 5, 11), (0, 0, 11), (0, 11, 11)])
def test_row_shards_match_the_whole_matrix(name: str, cuts: tuple[int, ...]) -> None:
    fn = REFS[name][0]
    G = torch.randn(2, 11, 7, dtype=torch.float64)
    world = len(cuts) - 1
    fake = _ThreadShards(world)
    outs: list[torch.Tensor | None] = [None] * world

    def work(r: int) -> None:
        lo, hi = cuts[r], cuts[r + 1]
        outs[r] = fn(G[..., lo:hi, :], shards=fake.hooks(r, 11, lo))

    threads = [threading.Thread(target=work, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = torch.cat([o for o in outs if o is not None], dim=-2)
    torch.testing.assert_close(got, fn(G), rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("call,match", [
    (lambda: auon(torch.ones(3)), "at least 2 dimensions"),
    (lambda: auon(torch.ones(2, 2, dtype=torch.int64)), "floating dtype"),
    (lambda: auon(torch.ones(2, 2), gamma=0.0), "gamma must be a finite number > 0, got 0.0"),
    (lambda: hybrid_auon(torch.ones(2, 2), steps=0), "steps must be > 0, got 0"),
    (lambda: hybrid_auon(torch.ones(2, 2), gamma=float("nan")), "gamma"),
    (lambda: racs(torch.ones(2, 2), iters=0), "iters must be > 0, got 0"),
    (lambda: racs(torch.ones(2, 2), eps=-1.0), "eps must be a finite number >= 0, got -1.0"),
    (lambda: racs(torch.ones(2, 2), shards="x"), "shards must be a RowShards"),  # type: ignore
    (lambda: auon(torch.tensor([[float("nan")]]), check_finite=True), "NaN or Inf"),
])
def test_bad_input_errors(call, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises((ValueError, TypeError), match=match):
        call()
