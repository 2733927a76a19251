"""GaLore-family projector functions: sides, round trips, bases, alignment, moment transport."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from matrixopt.linalg._reference import (
    captured_energy,
    principal_angle_sines,
    top_basis,
    transport_moments_reference,
)
from matrixopt.linalg.projectors import (
    PROJ_TYPES,
    RowShards,
    basis_overlap,
    lowrank_basis,
    project,
    project_back,
    projection_side,
    transport_moments,
)

SETTINGS = settings(max_examples=50, deadline=None)
F64 = torch.float64


def orthonormal(k: int, r: int, seed: int, batch: tuple[int, ...] = ()) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(*batch, k, r, generator=g, dtype=F64)).Q


def spectrum_matrix(shape: tuple[int, ...], s: torch.Tensor, seed: int) -> torch.Tensor:
    *batch, m, n = shape
    k = s.shape[-1]
    W = orthonormal(m, k, seed, tuple(batch))
    return (W * s) @ orthonormal(n, k, seed + 1, tuple(batch)).mT


# GaLore's table, written out independently of the implementation:
# (proj_type, m >= n) -> side
SIDE_TABLE = {
    ("std", True): "right", ("std", False): "left",
    ("reverse_std", True): "left", ("reverse_std", False): "right",
    ("left", True): "left", ("left", False): "left",
    ("right", True): "right", ("right", False): "right",
    ("full", True): "both", ("full", False): "both",
}


# ----------------------------------------------------------------- sides, project, project_back


def test_projection_side_table_including_square():
    for (pt, tall), side in SIDE_TABLE.items():
        shape = (8, 5) if tall else (5, 8)
        assert projection_side(shape, pt) == side
    # square: m >= n, so std projects on the right, reverse_std on the left
    assert projection_side((6, 6), "std") == "right"
    assert projection_side(torch.Size([4, 6, 6]), "reverse_std") == "left"
    assert projection_side((3, 1, 6), "std") == "left"  # batch dims are ignored


@SETTINGS
@given(batch=st.sampled_from([(), (3,)]), m=st.integers(1, 9), n=st.integers(1, 9),
       pt=st.sampled_from(PROJ_TYPES), data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_round_trip_is_the_orthogonal_projection(batch, m, n, pt, data, seed):
    G = torch.randn(*batch, m, n, generator=torch.Generator().manual_seed(seed), dtype=F64)
    side = SIDE_TABLE[(pt, m >= n)]
    if side == "both":
        rl = data.draw(st.integers(1, m))
        rr = data.draw(st.integers(1, n))
        P = (orthonormal(m, rl, seed, batch), orthonormal(n, rr, seed + 1, batch))
        expected = P[0] @ P[0].mT @ G @ P[1] @ P[1].mT
        low_shape = (*batch, rl, rr)
    else:
        k = m if side == "left" else n
        r = data.draw(st.integers(1, min(m, n)))
        P = orthonormal(k, r, seed, batch)
        expected = P @ P.mT @ G if side == "left" else G @ P @ P.mT
        low_shape = (*batch, r, n) if side == "left" else (*batch, m, r)
    R = project(G, P, pt)
    assert R.shape == low_shape
    back = project_back(R, P, pt, G.shape)
    assert back.shape == G.shape
    assert torch.allclose(back, expected, atol=1e-12)


def test_project_back_square_low_rank_uses_full_shape():
    # galore-torch chose the side from the low-rank tensor; square R fooled it.
    G = torch.randn(6, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    P = orthonormal(6, 4, 1)  # reverse_std on a tall G is left: R = PᵀG is 4x4
    R = project(G, P, "reverse_std")
    assert R.shape == (4, 4)
    assert torch.allclose(project_back(R, P, "reverse_std", G.shape), P @ P.mT @ G)
    Gs = torch.randn(5, 5, generator=torch.Generator().manual_seed(2), dtype=F64)
    Ps = orthonormal(5, 5, 3)  # std on square: right, R square
    back = project_back(project(Gs, Ps, "std"), Ps, "std", Gs.shape)
    assert torch.allclose(back, Gs @ Ps @ Ps.mT)


def test_project_dtype_promotion():
    G = torch.randn(8, 4).bfloat16()
    P = orthonormal(4, 2, 0).float()
    R = project(G, P, "std")
    assert R.dtype == torch.float32
    assert project_back(R, P, "std", G.shape).dtype == torch.float32


def test_project_errors():
    G = torch.randn(6, 4)
    with pytest.raises(ValueError, match="proj_type must be one of.*'diag'"):
        project(G, torch.randn(4, 2), "diag")
    with pytest.raises(ValueError, match="P must have shape \\[..., 4, r\\]"):
        project(G, torch.randn(6, 2), "std")
    with pytest.raises(TypeError, match="P must be a pair"):
        project(G, torch.randn(6, 2), "full")
    with pytest.raises(ValueError, match="R must have shape \\[..., 6, 2\\]"):
        project_back(torch.randn(2, 6), torch.randn(4, 2), "std", (6, 4))
    with pytest.raises(ValueError, match="full_shape must be a shape"):
        project_back(torch.randn(6, 2), torch.randn(4, 2), "std", (6,))
    with pytest.raises(TypeError, match="G.*torch.int64"):
        project(torch.ones(6, 4, dtype=torch.int64), torch.randn(4, 2))


# ----------------------------------------------------------------- lowrank_basis


@pytest.mark.parametrize("method", ["svd", "rsvd", "warm"])
@pytest.mark.parametrize("shape,side", [((30, 12), None), ((12, 30), None), ((2, 20, 20), "left"),
                                        ((2, 20, 20), "right")])
def test_basis_captures_energy_of_low_rank_plus_noise(method, shape, side):
    s = torch.cat([torch.linspace(10, 2, 4), torch.full((8,), 1e-3)]).double()
    G = spectrum_matrix(shape, s, 0)
    P = lowrank_basis(G, 4, method=method, side=side)
    eff_side = side or projection_side(shape, "std")
    k = shape[-2] if eff_side == "left" else shape[-1]
    assert P.shape == (*shape[:-2], k, 4) and P.dtype == F64
    assert torch.allclose(P.mT @ P, torch.eye(4, dtype=F64).expand(*shape[:-2], 4, 4), atol=1e-10)
    assert torch.all(captured_energy(P, G, eff_side) > 1 - 1e-8)
    # columns are ordered like singular vectors (Rayleigh–Ritz), not just a basis
    exact = top_basis(G, 4, eff_side)
    cosines = (P * exact).sum(-2).abs()
    assert torch.allclose(cosines, torch.ones(*shape[:-2], 4, dtype=F64), atol=1e-6)


def test_warm_converges_to_dominant_subspace():
    s = torch.tensor([5.0, 4.0, 3.0, 1.0, 0.9, 0.8, 0.6, 0.4, 0.2, 0.1]).double()
    G = spectrum_matrix((40, 10), s, 1)
    exact = top_basis(G, 3, "right")
    P = orthonormal(10, 3, 2)
    sines = []
    for _ in range(15):
        P = lowrank_basis(G, 3, method="warm", previous=P, side="right")
        sines.append(float(principal_angle_sines(P, exact)[0]))
    assert all(b <= a + 1e-12 for a, b in zip(sines, sines[1:]))
    assert sines[-1] < 1e-8


def test_warm_tracks_a_drifting_gradient():
    """Slowly rotating decaying-spectrum gradients: one warm step per refresh keeps ≥ 0.99."""
    g = torch.Generator().manual_seed(0)
    m, n, r = 64, 48, 6
    s = torch.arange(1, 17, dtype=F64) ** -1.0
    U = orthonormal(m, 16, 3)
    V = orthonormal(n, 16, 4)

    def rotate(Q: torch.Tensor) -> torch.Tensor:
        Z = torch.randn(Q.shape, generator=g, dtype=F64)
        return torch.linalg.qr(Q + 0.3 * (Z - Q @ (Q.mT @ Z)) / math.sqrt(Q.shape[0])).Q

    P = None
    for _ in range(8):
        U, V = rotate(U), rotate(V)
        G = (U * s) @ V.mT + 1e-4 * torch.randn(m, n, generator=g, dtype=F64)
        P = lowrank_basis(G, r, method="warm", previous=P)
        assert float(captured_energy(P, G, "right")) >= 0.99


def test_random_basis_regenerable_from_seed():
    G = torch.randn(3, 50, 20)
    P1 = lowrank_basis(G, 5, method="random", seed=123)
    P2 = lowrank_basis(torch.zeros(3, 50, 20), 5, method="random", seed=123)
    P3 = lowrank_basis(G, 5, method="random", seed=torch.Generator().manual_seed(123))
    assert P1.shape == (3, 20, 5)
    assert torch.equal(P1, P2) and torch.equal(P1, P3)  # G's values are not used
    assert not torch.equal(P1, lowrank_basis(G, 5, method="random", seed=124))
    assert lowrank_basis(G.bfloat16(), 5, method="random", seed=123).dtype == torch.bfloat16
    # N(0, 1/r) entries (not orthonormalised): E[P Pᵀ] = I
    big = lowrank_basis(torch.zeros(400, 400), 40, method="random", seed=0)
    assert abs(float((big ** 2).mean()) - 1 / 40) < 0.02 / 40
    assert abs(float((big.mT @ big).diagonal().mean()) - 10.0) < 0.2  # 400/40


def test_sign_alignment_and_convention():
    G = spectrum_matrix((30, 12), torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0]).double(), 7)
    base = lowrank_basis(G, 4, method="svd")
    # deterministic convention: largest-magnitude entry of each column positive
    idx = base.abs().argmax(dim=0)
    assert torch.all(base[idx, torch.arange(4)] > 0)
    assert torch.allclose(lowrank_basis(-G, 4, method="svd"), base, atol=1e-10)
    flips = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=F64)
    prev = base * flips
    for method in ("svd", "rsvd", "warm"):
        P = lowrank_basis(G, 4, method=method, previous=prev)
        assert torch.all((P * prev).sum(0) > 0)
        assert torch.allclose(P, prev, atol=1e-8)
        P_noalign = lowrank_basis(G, 4, method=method, previous=prev, align=False)
        assert torch.allclose(P_noalign, base, atol=1e-8)


def test_basis_extreme_inputs():
    for scale in (0.0, 1e30, 1e-30):
        G = torch.randn(20, 8, generator=torch.Generator().manual_seed(0)) * scale
        for method in ("svd", "rsvd", "warm"):
            P = lowrank_basis(G, 3, method=method)
            assert torch.isfinite(P).all()
            assert torch.allclose(P.mT @ P, torch.eye(3), atol=1e-5)
            if scale:
                assert float(captured_energy(P, G, "right")) > 0.99
    P = lowrank_basis(torch.randn(1, 9), 1)  # 1×n: the short side is the left (1×1)
    assert P.shape == (1, 1) and float(P.abs()) == pytest.approx(1.0)
    P = lowrank_basis(torch.randn(9, 1), 1, side="left")
    assert P.shape == (9, 1)


def test_basis_dtype_handling():
    G = torch.randn(40, 16).bfloat16()
    assert lowrank_basis(G, 4).dtype == torch.bfloat16
    P = lowrank_basis(G, 4, dtype=torch.float32)
    assert P.dtype == torch.float32
    assert torch.allclose(P.mT @ P, torch.eye(4), atol=1e-5)


def test_lowrank_basis_errors():
    G = torch.randn(6, 4)
    with pytest.raises(ValueError, match="rank must be <= min\\(m, n\\) = 4.*got 5"):
        lowrank_basis(G, 5)
    with pytest.raises(ValueError, match="rank must be > 0, got 0"):
        lowrank_basis(G, 0)
    with pytest.raises(ValueError, match="method must be one of.*'qr'"):
        lowrank_basis(G, 2, method="qr")
    with pytest.raises(ValueError, match="side must be one of.*'both'"):
        lowrank_basis(G, 2, side="both")
    with pytest.raises(ValueError, match="previous must have shape \\[..., 4, 2\\]"):
        lowrank_basis(G, 2, previous=torch.randn(6, 2))
    with pytest.raises(TypeError, match="G must be real"):
        lowrank_basis(G.to(torch.complex64), 2)
    with pytest.raises(TypeError, match="G must have a floating dtype.*torch.int64"):
        lowrank_basis(G.long(), 2)
    with pytest.raises(ValueError, match="G must have at least 2 dimensions"):
        lowrank_basis(torch.randn(4), 1)
    with pytest.raises(TypeError, match="seed must be None, an int seed or a torch.Generator"):
        lowrank_basis(G, 2, method="random", seed=1.5)
    with pytest.raises(ValueError, match="n_iter must be >= 0, got -1"):
        lowrank_basis(G, 2, method="rsvd", n_iter=-1)
    B = G.clone()
    B[0, 0] = math.nan
    with pytest.raises(ValueError, match="G contains NaN or Inf"):
        lowrank_basis(B, 2)


# ----------------------------------------------------------------- row blocks (hooks)


class ThreadComm:
    """``world`` threads exchanging tensors through shared slots (an all-gather in rank
    order): a stand-in for a process group, so the hooks run without torch.distributed."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.slots: list[torch.Tensor | None] = [None] * world
        self.barrier = threading.Barrier(world, timeout=20)  # a collective mismatch fails
        self.calls: dict[str, int] = {"reduce_sum": 0, "reduce_max": 0, "qr": 0}

    def all_gather(self, rank: int, t: torch.Tensor) -> list[torch.Tensor]:
        self.slots[rank] = t.clone()
        self.barrier.wait()
        out = [x.clone() for x in self.slots]  # type: ignore[union-attr]
        self.barrier.wait()  # nobody overwrites a slot before all have read it
        return out

    def hooks(self, rank: int, rows: int, start: int) -> RowShards:
        def count(name: str) -> None:
            if rank == 0:
                self.calls[name] += 1

        def reduce_sum(t: torch.Tensor) -> torch.Tensor:
            count("reduce_sum")
            return torch.stack(self.all_gather(rank, t)).sum(0)

        def reduce_max(t: torch.Tensor) -> torch.Tensor:
            count("reduce_max")
            return torch.stack(self.all_gather(rank, t)).amax(0)

        def tsqr(Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # reference TSQR: gather every block's R, QR of the stack, my block of Q2
            count("qr")
            Q1, R1 = torch.linalg.qr(Y)
            Rs = self.all_gather(rank, R1)
            Q2, R = torch.linalg.qr(torch.cat(Rs, dim=-2))
            lo = sum(r.shape[-2] for r in Rs[:rank])
            return Q1 @ Q2[..., lo:lo + R1.shape[-2], :], R

        return RowShards(rows=rows, start=start, reduce_sum=reduce_sum, reduce_max=reduce_max,
                         qr=tsqr)


def run_row_blocks(G: torch.Tensor, counts: list[int],
                   call: Callable[[torch.Tensor, RowShards], torch.Tensor]
                   ) -> tuple[list[torch.Tensor], dict[str, int]]:
    """``call(block, hooks)`` on one thread per row block of ``G``; results by rank."""
    comm = ThreadComm(len(counts))
    out: list[torch.Tensor | None] = [None] * len(counts)
    errors: list[BaseException] = []
    starts = [sum(counts[:r]) for r in range(len(counts))]

    def work(r: int) -> None:
        try:
            block = G[..., starts[r]:starts[r] + counts[r], :]
            out[r] = call(block, comm.hooks(r, G.shape[-2], starts[r]))
        except BaseException as e:  # noqa: BLE001 -- re-raised in the main thread
            errors.append(e)
            comm.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(len(counts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out, comm.calls  # type: ignore[return-value]


ROW_BLOCK_CASES = [  # (shape, rank, counts, method, side, options)
    ((40, 16), 3, [20, 20], "rsvd", "right", {}),
    ((2, 13, 24), 3, [7, 6], "rsvd", "right", {"n_iter": 0, "oversample": 2}),
    ((2, 40, 16), 4, [14, 14, 12], "warm", "right", {}),
    ((40, 16), 3, [21, 19], "warm", "right", {"n_iter": 0, "oversample": 3}),
    ((40, 16), 3, [21, 19], "warm", "right", {"n_iter": 3, "align": False}),
    ((13, 24), 3, [7, 6], "svd", "right", {}),
    ((9, 5), 2, [5, 4, 0], "warm", "right", {}),  # an empty block, sketch spans the short side
    ((30, 12), 3, [15, 15], "rsvd", "right", {"scale": 1e30}),  # one power of two for all
    ((30, 12), 3, [15, 15], "warm", "right", {"scale": 1e-30}),
    # left bases come back as each block's rows (signs fixed over whole columns)
    ((2, 16, 40), 3, [8, 8], "rsvd", "left", {}),
    ((16, 40), 3, [9, 7], "rsvd", "left", {"n_iter": 0, "oversample": 2}),
    ((2, 16, 40), 4, [6, 6, 4], "warm", "left", {}),
    ((16, 40), 3, [9, 7], "warm", "left", {"n_iter": 0, "oversample": 3}),
    ((16, 40), 3, [9, 7], "warm", "left", {"n_iter": 2, "align": False, "scale": 1e30}),
    ((13, 24), 3, [7, 6], "svd", "left", {}),
    ((5, 9), 2, [3, 2, 0], "warm", "left", {}),
    ((5, 9), 2, [5, 0], "warm", "left", {}),  # one block holds every row, the other none
    ((16, 40), 3, [9, 7], "random", "left", {}),
]


@pytest.mark.parametrize("case", ROW_BLOCK_CASES, ids=str)
def test_lowrank_basis_on_row_blocks_equals_whole(case):
    """``shards=`` runs the same range finder on row blocks, through the hooks only: every
    block gets the basis of the whole matrix (the single-process call), for every method,
    n_iter, oversample, align and extreme scales (which overflow float32 unless the
    whole matrix is rescaled by the same power of two)."""
    shape, r, counts, method, side, opts = case
    opts = dict(opts)
    scale = opts.pop("scale", 1.0)
    g = torch.Generator().manual_seed(sum(shape))
    *batch, m, n = shape
    G = torch.randn(*shape, generator=g) @ torch.diag(torch.linspace(3, 0.1, n))
    if m < n:
        G = torch.diag(torch.linspace(3, 0.1, m)) @ G
    prev = (lowrank_basis(G + 0.3 * torch.randn(*shape, generator=g), r, method="svd",
                          side=side) if method == "warm" else None)
    G = G * scale
    want = lowrank_basis(G, r, method=method, side=side, previous=prev, seed=7, **opts)
    assert torch.isfinite(want).all()
    starts = [sum(counts[:i]) for i in range(len(counts))]

    def call(B: torch.Tensor, h: RowShards) -> torch.Tensor:
        p = prev
        if p is not None and side == "left":  # a left basis is held as row blocks
            p = p[..., h.start:h.start + B.shape[-2], :]
        return lowrank_basis(B, r, method=method, side=side, previous=p, seed=7, shards=h,
                             **opts)

    got, calls = run_row_blocks(G, counts, call)
    for P, start, c in zip(got, starts, counts):
        rows = slice(None) if side == "right" else slice(start, start + c)
        assert P.shape == (*batch, n if side == "right" else c, r)
        torch.testing.assert_close(P, want[..., rows, :], rtol=1e-4, atol=1e-4)
    if method == "random":
        assert calls == {"reduce_sum": 0, "reduce_max": 0, "qr": 0}
        return
    # the hooks carried the computation: a max for the scale, sums for the products
    # with the blocked side, QRs of blocked matrices
    assert calls["reduce_max"] == (1 if side == "right" else 3)  # + 2 for the signs
    assert calls["qr"] >= 1
    assert calls["reduce_sum"] >= (1 if method != "svd" else 0)


def test_lowrank_basis_row_blocks_unbiased_by_block_layout():
    """The same matrix split 1, 2 or 3 ways gives the same basis (the Gaussian sketch of
    the blocked side is drawn whole and sliced, not per block)."""
    G = torch.randn(2, 24, 10, generator=torch.Generator().manual_seed(3))
    ref = None
    for counts in ([24], [12, 12], [9, 9, 6]):
        got, _ = run_row_blocks(G, counts, lambda B, h: lowrank_basis(
            B, 3, method="rsvd", side="right", seed=1, shards=h))
        ref = got[0] if ref is None else ref
        for P in got:
            torch.testing.assert_close(P, ref, rtol=1e-4, atol=1e-4)


def test_lowrank_basis_row_blocks_errors():
    G = torch.randn(6, 4)

    def hooks(rows: int = 10, start: int = 0) -> RowShards:
        return RowShards(rows=rows, start=start, reduce_sum=lambda t: t,
                         reduce_max=lambda t: t, qr=lambda Y: torch.linalg.qr(Y))

    with pytest.raises(ValueError, match="previous must have shape \\[..., 6, 2\\] \\(the left "
                                         "basis of a 10x4 G at rank 2, this block's rows\\)"):
        lowrank_basis(G, 2, side="left", method="warm", previous=torch.randn(10, 2),
                      shards=hooks())
    with pytest.raises(ValueError, match="block of 6 rows starting at row 5 does not fit in "
                                         "10 rows"):
        lowrank_basis(G, 2, shards=hooks(start=5))
    with pytest.raises(ValueError, match="shards.rows must be a non-negative int, got -1"):
        lowrank_basis(G, 2, shards=hooks(rows=-1))
    with pytest.raises(TypeError, match="shards must be a RowShards or None, got dict"):
        lowrank_basis(G, 2, shards={"rows": 10})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="shards.qr must be callable"):
        lowrank_basis(G, 2, shards=RowShards(10, 0, lambda t: t, lambda t: t,
                                             None))  # type: ignore[arg-type]
    # rank bounds come from the whole matrix: 5 > min(6, 4) but <= min(10, ...) is not
    with pytest.raises(ValueError, match="rank must be <= min\\(m, n\\) = 4.*got 5"):
        lowrank_basis(G, 5, shards=hooks())


# ----------------------------------------------------------------- moment transport


def adam_moments(grads: list[torch.Tensor], b1: float = 0.9, b2: float = 0.999
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    m = torch.zeros_like(grads[0])
    v = torch.zeros_like(grads[0])
    for g in grads:
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
    return m, v


@pytest.mark.parametrize("side", ["left", "right", "both"])
def test_transport_exact_for_constant_gradient_in_shared_subspace(side):
    """Same subspace, rotated basis, constant gradient: transport == recomputation."""
    m_, n_, r, T = 12, 10, 4, 7
    PL = orthonormal(m_, r, 0)
    PR = orthonormal(n_, r, 1)
    O1, O2 = orthonormal(r, r, 2), orthonormal(r, r, 3)  # general rotations, not permutations
    core = torch.randn(r, r, generator=torch.Generator().manual_seed(4), dtype=F64)
    G = PL @ core @ PR.mT  # lies in span(PL) ⊗ span(PR) = the new spans too
    old = {"left": PL, "right": PR, "both": (PL, PR)}[side]
    new = {"left": PL @ O1, "right": PR @ O2, "both": (PL @ O1, PR @ O2)}[side]
    pt = {"left": "left", "right": "right", "both": "full"}[side]
    m_old, v_old = adam_moments([project(G, old, pt)] * T)
    m_ref, v_ref = adam_moments([project(G, new, pt)] * T)
    Q = basis_overlap(new, old, side)
    m_new, v_new = transport_moments(m_old, v_old, Q, side, bias_correction1=1 - 0.9**T,
                                     bias_correction2=1 - 0.999**T)
    assert torch.allclose(m_new, m_ref, atol=1e-12)
    assert torch.allclose(v_new, v_ref, atol=1e-12)


@pytest.mark.parametrize("side", ["left", "right"])
def test_transport_exact_for_signed_permutation(side):
    """Any history; new basis = old columns permuted and negated: exact for m and v."""
    m_, n_, r = 9, 7, 5
    P = orthonormal(m_ if side == "left" else n_, r, 0)
    perm = torch.tensor([3, 0, 4, 1, 2])
    signs = torch.tensor([1.0, -1.0, -1.0, 1.0, -1.0], dtype=F64)
    P_new = P[:, perm] * signs
    g = torch.Generator().manual_seed(5)
    grads = [torch.randn(m_, n_, generator=g, dtype=F64) for _ in range(6)]
    m_old, v_old = adam_moments([project(x, P, side) for x in grads])
    m_ref, v_ref = adam_moments([project(x, P_new, side) for x in grads])
    m_new, v_new = transport_moments(m_old, v_old, basis_overlap(P_new, P, side), side)
    assert torch.allclose(m_new, m_ref, atol=1e-12)
    assert torch.allclose(v_new, v_ref, atol=1e-12)


@pytest.mark.parametrize("side", ["left", "right", "both"])
def test_transport_matches_entrywise_formula_with_rank_change(side):
    g = torch.Generator().manual_seed(0)
    shape = {"left": (4, 5), "right": (5, 4), "both": (4, 3)}[side]
    m_old = torch.randn(shape, generator=g, dtype=F64)
    v_old = torch.rand(shape, generator=g, dtype=F64)  # may be < m², exercising |.|
    QL = torch.randn(3, shape[0], generator=g, dtype=F64)
    QR = torch.randn(2, shape[1], generator=g, dtype=F64)
    Q = {"left": QL, "right": QR, "both": (QL, QR)}[side]
    m_new, v_new = transport_moments(m_old.float(), v_old.float(), Q, side)
    ref_m, ref_v = transport_moments_reference(
        m_old, v_old, QL if side != "right" else None, QR if side != "left" else None)
    assert m_new.dtype == torch.float32 and m_new.shape == ref_m.shape
    assert torch.allclose(m_new.double(), ref_m, atol=1e-5)
    assert torch.allclose(v_new.double(), ref_v, atol=1e-5)
    assert torch.all(v_new >= 0)


def test_transport_batched_and_errors():
    P_old = orthonormal(8, 3, 0, (2,))
    P_new = orthonormal(8, 3, 1, (2,))
    Q = basis_overlap(P_new, P_old, "left")
    assert Q.shape == (2, 3, 3)
    m = torch.randn(2, 3, 6, dtype=F64)
    m2, v2 = transport_moments(m, m * m + 1, Q, "left")
    assert torch.allclose(m2[1], Q[1] @ m[1])
    with pytest.raises(ValueError, match="same shape"):
        transport_moments(m, m[..., :5], Q, "left")
    msg = "Q must have shape \\[..., r_new, 6\\] for moments of shape \\(2, 6, 3\\)"
    with pytest.raises(ValueError, match=msg):
        transport_moments(m.mT, m.mT, Q, "left")
    with pytest.raises(ValueError, match="bias_correction2 must be a float in \\(0, 1\\], got 0"):
        transport_moments(m, m, Q, "left", bias_correction2=0)
    with pytest.raises(ValueError, match="same number of rows"):
        basis_overlap(P_new, P_old[..., :5, :], "left")
    with pytest.raises(TypeError, match="Q must be a pair"):
        transport_moments(m, m, Q, "both")
