"""Adafactor (sharded statistics) and GaLoreAdamW (right basis, sharded range finder) under
DDP and FSDP2 on 2 gloo processes vs a single process; DCP checkpoints resumed at world size
2 and 1."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from _harness import STEPS, full_params, local_batch, make_model, train_step
from torch.distributed.tensor import DTensor

from matrixopt import Adafactor, GaLoreAdafactor, GaLoreAdamW

pytestmark = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                       reason="needs torch.distributed with the gloo backend"),
    # DCP's notice when a checkpoint is loaded in one process (what world-1 resume is)
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning"),
]

CKPT_AT, RESUME = 2, 3
NAMES = ("adafactor", "galore")


def make_opt(name: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    if name == "adafactor":
        return Adafactor(model.parameters(), lr=0.01, beta1=0.9, weight_decay=0.1)
    # rank 2 < min side everywhere but the 1-row head; refresh every 2 steps (the first
    # refresh is the cold randomized one, the second warm-started); the right side
    # (test_fsdp2_parity.py runs every side and option)
    return GaLoreAdamW(model.parameters(), lr=0.01, rank=2, update_proj_gap=2, stagger=1,
                       proj_type="right")


@contextlib.contextmanager
def _no_whole_gather(active: bool) -> Iterator[None]:
    """Fail if the optimizer gathers a whole (non-scalar) DTensor: the sharded path must
    not fall back to ``gathered_params`` (the non-finite check gathers 0-dim sums only)."""
    if not active:
        yield
        return
    orig = DTensor.full_tensor

    def guarded(self: DTensor, *args: object, **kwargs: object) -> torch.Tensor:
        if self.numel() > 1:
            raise AssertionError(f"whole-tensor all-gather of shape {tuple(self.shape)}")
        return orig(self, *args, **kwargs)  # type: ignore[arg-type]

    DTensor.full_tensor = guarded  # type: ignore[method-assign]
    try:
        yield
    finally:
        DTensor.full_tensor = orig  # type: ignore[method-assign]


class Stacks(torch.nn.Module):
    """Adafactor's other factorings: [3, 8, 6] factors dims (1, 2) (dim 0, the sharded one,
    is a batch dim: both statistics sharded); [8, 2, 6] factors (0, 2) with a middle batch
    dim; [5, 3] is below min_dim_size_to_factor=4 (full second moment)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.u = torch.nn.Parameter(torch.randn(3, 8, 6, generator=g))
        self.v = torch.nn.Parameter(torch.randn(8, 2, 6, generator=g))
        self.w = torch.nn.Parameter(torch.randn(5, 3, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, 6]
        h = torch.einsum("bj,kij->bki", x, self.u).tanh().sum(1)  # [B, 8]
        h = torch.einsum("bi,ikj->bkj", h, self.v).tanh().sum(1)  # [B, 6]
        return (h[:, :3] @ self.w.T).sum(-1)


def stacks_losses(rank: int = 0, world: int = 1, shard: bool = False) -> list[float]:
    from torch.distributed.fsdp import fully_shard
    model = Stacks()
    if shard:
        fully_shard(model)
    opt = Adafactor(model.parameters(), min_dim_size_to_factor=4, clip_threshold=0.5)
    out = []
    for s in range(3):
        x, y = local_batch(s, rank, world)
        loss = (model(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        value = loss.detach().clone()
        if world > 1:
            dist.all_reduce(value)
            value /= world
        out.append(float(value))
    return out


BASIS_CASES = [  # (b, rows, n, rank, method, warm, options): uneven rows, shards shorter than
    # the sketch; the single-process options (n_iter, oversample, align) and 1e±30 scales,
    # which need the rescaling by one power of two for the whole matrix
    (1, 13, 24, 3, "rsvd", False, ()), (2, 40, 16, 3, "rsvd", False, ()),
    (1, 40, 16, 3, "warm", True, ()), (1, 13, 24, 3, "svd", False, ()),
    (2, 9, 5, 2, "warm", True, ()),
    (1, 40, 16, 3, "rsvd", False, (("n_iter", 0), ("oversample", 2))),
    (1, 40, 16, 3, "warm", True, (("n_iter", 0), ("oversample", 3))),
    (2, 40, 16, 3, "warm", True, (("n_iter", 3), ("align", False))),
    (1, 30, 12, 3, "rsvd", False, (("scale", 1e30),)),
    (1, 30, 12, 3, "warm", True, (("scale", 1e-30),))]


def basis_inputs(case: tuple) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """``(G, previous, lowrank_basis options)`` of a BASIS_CASES entry."""
    from matrixopt.linalg.projectors import lowrank_basis
    b, rows, n, rank, _, warm, options = case
    opts = dict(options)
    scale = opts.pop("scale", 1.0)
    g = torch.Generator().manual_seed(rows * n)
    G = torch.randn(b, rows, n, generator=g) @ torch.diag(torch.linspace(3, 0.1, n))
    prev = (lowrank_basis(G + 0.3 * torch.randn(b, rows, n, generator=g), rank, method="svd",
                          side="right") if warm else None)
    return G * scale, prev, opts


LEFT_CASES = [  # (b, rows, n, rank, method, warm, options): left bases held as row shards
    (1, 9, 24, 3, "rsvd", False, ()), (2, 13, 30, 3, "warm", True, ()),
    (1, 13, 24, 3, "svd", False, ()), (1, 1, 7, 1, "warm", True, ()),  # an empty shard
    (1, 12, 30, 3, "warm", True, (("n_iter", 2), ("scale", 1e30)))]


def left_inputs(case: tuple) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    from matrixopt.linalg.projectors import lowrank_basis
    b, rows, n, rank, _, warm, options = case
    opts = dict(options)
    scale = opts.pop("scale", 1.0)
    g = torch.Generator().manual_seed(rows * n + 1)
    G = torch.diag(torch.linspace(3, 0.1, rows)) @ torch.randn(b, rows, n, generator=g)
    prev = (lowrank_basis(G + 0.3 * torch.randn(b, rows, n, generator=g), rank, method="svd",
                          side="left") if warm else None)
    return G * scale, prev, opts


@contextlib.contextmanager
def _spy_range_finder(calls: list) -> Iterator[None]:
    """Record what the sharded refresh runs: linalg's ``lowrank_basis`` (the function object
    of the single-process refresh, looked up on its module) with which hooks, and every
    call of the TSQR hook."""
    from matrixopt.linalg import projectors
    from matrixopt.optim import _distributed

    real_basis, real_tsqr = projectors.lowrank_basis, _distributed._tsqr

    def basis(*args: object, **kwargs: object) -> torch.Tensor:
        sh = kwargs.get("shards")
        calls.append(("lowrank_basis", type(sh).__name__, getattr(sh, "rows", None),
                      tuple(getattr(getattr(sh, k, None), "func", None).__name__  # type: ignore[union-attr]
                            for k in ("reduce_sum", "reduce_max", "qr"))))
        return real_basis(*args, **kwargs)  # type: ignore[arg-type]

    def spied_tsqr(*args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(("tsqr",))
        return real_tsqr(*args, **kwargs)  # type: ignore[arg-type]

    projectors.lowrank_basis, _distributed._tsqr = basis, spied_tsqr  # type: ignore[assignment]
    try:
        yield
    finally:
        projectors.lowrank_basis, _distributed._tsqr = real_basis, real_tsqr


#: configurations that used to take a whole-matrix fallback under FSDP2
FALLBACK = ("galore_adafactor", "galore_std")


def make_fallback_opt(name: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    if name == "galore_adafactor":
        return GaLoreAdafactor(model.parameters(), lr=0.01, rank=2, update_proj_gap=2)
    return GaLoreAdamW(model.parameters(), lr=0.01, rank=2, update_proj_gap=2,
                       residual="fira")  # std side (left for the wide matrices), residual


def _job(rank: int, world: int, out: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    from matrixopt.linalg import projectors as lr_projectors
    from matrixopt.linalg.projectors import lowrank_basis
    from matrixopt.optim._distributed import (
        resolve_context,
        row_shards,
        shard_rows,
    )

    res: dict[str, object] = {}
    with _no_whole_gather(True):
        res["stacks"] = stacks_losses(rank, world, shard=True)
    probe = make_model()
    fully_shard(probe)
    ctx = resolve_context("test", list(probe.parameters()), None)
    assert ctx is not None
    for case in BASIS_CASES:
        b, rows, n, r, method, warm, _ = case
        G, prev, opts = basis_inputs(case)
        chunk, counts = shard_rows(rows, world)
        local = G[:, rank * chunk:rank * chunk + counts[rank]]
        calls: list = []
        with _spy_range_finder(calls):
            # looked up at call time, so the spy sees it (as the optimizer's refresh does)
            res["basis", case] = lr_projectors.lowrank_basis(
                local, r, method=method, side="right", previous=prev, seed=7, dtype=None,
                shards=row_shards(ctx, rows), **opts)
        res["basis_calls", case] = calls
    for case in LEFT_CASES:
        b, rows, n, r, method, warm, _ = case
        G, prev, opts = left_inputs(case)
        chunk, counts = shard_rows(rows, world)
        mine = slice(rank * chunk, rank * chunk + counts[rank])
        P = lowrank_basis(
            G[:, mine], r, method=method, side="left", seed=7, shards=row_shards(ctx, rows),
            previous=None if prev is None else prev[:, mine], **opts)
        parts: list = [None] * world
        dist.all_gather_object(parts, P)
        res["left", case] = torch.cat(parts, dim=1)  # every rank's rows, in order
    # configurations that used to take the whole-matrix fallback: now on the shards
    for name in FALLBACK:
        model = make_model()
        fully_shard(model)
        opt = make_fallback_opt(name, model)
        with _no_whole_gather(True):
            res[name, "fsdp"] = [train_step(model, opt, s, rank, world) for s in range(STEPS)]
        res[name, "fsdp_placements"] = [
            {k: str(tuple(v.placements)) if isinstance(v, DTensor) else "plain"
             for k, v in opt.state[p].items()} for p in model.parameters()]
        res[name, "fsdp_ndims"] = [p.ndim for p in model.parameters()]
    for name in NAMES:
        model = DDP(make_model())
        opt = make_opt(name, model)
        res[name, "ddp"] = [train_step(model, opt, s, rank, world) for s in range(STEPS)]
        res[name, "ddp_params"] = full_params(model)

        model = make_model()
        fully_shard(model)
        opt = make_opt(name, model)
        with _no_whole_gather(True):
            res[name, "fsdp"] = [train_step(model, opt, s, rank, world) for s in range(STEPS)]
        res[name, "fsdp_params"] = full_params(model)
        res[name, "fsdp_keys"] = [sorted(opt.state[p]) for p in model.parameters()]
        res[name, "fsdp_placements"] = [
            {k: str(tuple(v.placements)) if isinstance(v, DTensor) else "plain"
             for k, v in opt.state[p].items()} for p in model.parameters()]

        model = make_model()
        fully_shard(model)
        opt = make_opt(name, model)
        for s in range(CKPT_AT):
            train_step(model, opt, s, rank, world)
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(out / name))
        res[name, "after_ckpt"] = [train_step(model, opt, CKPT_AT + s, rank, world)
                                   for s in range(RESUME)]
        model = make_model()
        fully_shard(model)
        opt = make_opt(name, model)
        msd, osd = get_state_dict(model, opt)
        sd = {"model": msd, "optim": osd}
        dcp.load(sd, checkpoint_id=str(out / name))
        set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        res[name, "resumed"] = [train_step(model, opt, CKPT_AT + s, rank, world)
                                for s in range(RESUME)]
    if rank == 0:
        torch.save(res, out / "res.pt")


@pytest.fixture(scope="module")
def results(dist_out: Path) -> tuple[dict, Path]:
    out = dist_out / "lowrank"
    return torch.load(out / "res.pt", weights_only=False), out


def _single(name: str, steps: int = STEPS) -> tuple[list[float], dict, list]:
    model = make_model()
    opt = make_opt(name, model)
    losses = [train_step(model, opt, s) for s in range(steps)]
    return losses, full_params(model), [sorted(opt.state[p]) for p in model.parameters()]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_equals_single_process(results: tuple[dict, Path], name: str, mode: str) -> None:
    res, _ = results
    losses, params, keys = _single(name)
    assert res[name, mode] == pytest.approx(losses, rel=1e-5, abs=1e-6)
    for k, v in params.items():
        torch.testing.assert_close(res[name, f"{mode}_params"][k], v, rtol=1e-5, atol=1e-5, msg=k)
    if mode == "fsdp":
        assert res[name, "fsdp_keys"] == keys


def test_adafactor_fsdp_other_factorings(results: tuple[dict, Path]) -> None:
    """Batch dim sharded, factored dims behind it, unfactored matrices: as single process."""
    res, _ = results
    assert res["stacks"] == pytest.approx(stacks_losses(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("case", BASIS_CASES, ids=str)
def test_sharded_right_basis_equals_lowrank_basis(results: tuple[dict, Path],
                                                  case: tuple) -> None:
    """The sharded range finder (2 ranks, uneven rows) returns lowrank_basis's right basis."""
    from matrixopt.linalg.projectors import lowrank_basis
    res, _ = results
    b, rows, n, r, method, warm, _ = case
    G, prev, opts = basis_inputs(case)
    want = lowrank_basis(G, r, method=method, side="right", previous=prev, seed=7, **opts)
    assert torch.isfinite(want).all()
    got = res["basis", case]
    assert got.shape == (b, n, r)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", LEFT_CASES, ids=str)
def test_sharded_left_basis_equals_lowrank_basis(results: tuple[dict, Path], case: tuple) -> None:
    """lowrank_basis on row shards with the FSDP2 hooks (row_shards) gives each rank its
    rows of the single-process left basis (signs decided over the whole columns; the
    1-row case has a whole shard and an empty one, which must issue the same collectives)."""
    from matrixopt.linalg.projectors import lowrank_basis
    res, _ = results
    b, rows, n, r, method, warm, _ = case
    G, prev, opts = left_inputs(case)
    want = lowrank_basis(G, r, method=method, side="left", previous=prev, seed=7, **opts)
    assert torch.isfinite(want).all()
    got = res["left", case]
    assert got.shape == (b, rows, r)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", BASIS_CASES, ids=str)
def test_sharded_right_basis_runs_linalg_range_finder(results: tuple[dict, Path],
                                                      case: tuple) -> None:
    """The sharded refresh is one call of linalg's ``lowrank_basis`` (the single-process
    function object) with the FSDP2 hooks of ``_distributed`` (all-reduces, TSQR), and the
    range finder inside it orthonormalises the row-sharded matrices with that TSQR."""
    res, _ = results
    calls = res["basis_calls", case]
    # the qr hook is whatever `_distributed._tsqr` names at call time: here the spy
    assert calls[0] == ("lowrank_basis", "RowShards", case[1],
                        ("all_reduce_sum", "all_reduce_max", "spied_tsqr"))
    assert [c for c in calls if c[0] == "lowrank_basis"] == calls[:1]
    assert ("tsqr",) in calls[1:]


@pytest.mark.parametrize("name", FALLBACK)
def test_fallback_equals_single_process(results: tuple[dict, Path], name: str) -> None:
    """GaLoreAdafactor and GaLoreAdamW with proj_type="std" (left for the wide matrices)
    and a residual, formerly on gathered whole matrices, run on the shards (the job
    forbids whole gathers): every moment is a DTensor, sharded or replicated."""
    res, _ = results
    model = make_model()
    opt = make_fallback_opt(name, model)
    losses = [train_step(model, opt, s) for s in range(STEPS)]
    assert res[name, "fsdp"] == pytest.approx(losses, rel=1e-5, abs=1e-6)
    for d, ndim in zip(res[name, "fsdp_placements"], res[name, "fsdp_ndims"]):
        moments = {k: v for k, v in d.items() if k.startswith("exp_avg")}
        assert moments
        want = {"(Shard(dim=0),)", "(Replicate(),)"} if ndim >= 2 else {"(Shard(dim=0),)"}
        assert all(v in want for v in moments.values()), (ndim, d)


def test_galore_fsdp_state_is_sharded(results: tuple[dict, Path]) -> None:
    """GaLoreAdamW under FSDP2 keeps the projected moments (G P, rows × r) sharded like the
    parameter and the right basis (n × r) replicated."""
    res, _ = results
    shard = "(Shard(dim=0),)"
    model = make_model()
    for p, placements in zip(model.parameters(), res["galore", "fsdp_placements"]):
        assert placements["exp_avg"] == placements["exp_avg_sq"] == shard
        if p.dim() == 2:
            assert placements["projector"] == "(Replicate(),)"


def test_adafactor_fsdp_state_is_sharded(results: tuple[dict, Path]) -> None:
    """Adafactor under FSDP2 keeps its state as DTensors: row statistics, momentum and
    unfactored second moments sharded like the parameter; column statistics (which sum
    over the sharded rows) replicated."""
    res, _ = results
    shard, rep = "(Shard(dim=0),)", "(Replicate(),)"
    model = make_model()
    for p, placements in zip(model.parameters(), res["adafactor", "fsdp_placements"]):
        assert placements["step"] == "plain"
        assert placements["exp_avg"] == shard
        if p.dim() == 2:
            assert placements["exp_avg_sq_row"] == shard
            assert placements["exp_avg_sq_col"] == rep
        else:
            assert placements["exp_avg_sq"] == shard


@pytest.mark.parametrize("name", NAMES)
def test_dcp_resume_world_2_and_1(results: tuple[dict, Path], name: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    res, out = results
    assert res[name, "resumed"] == res[name, "after_ckpt"]
    model = make_model()
    opt = make_opt(name, model)
    msd, osd = get_state_dict(model, opt)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=str(out / name), no_dist=True)
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    losses = [train_step(model, opt, CKPT_AT + s) for s in range(RESUME)]
    assert losses == pytest.approx(res[name, "after_ckpt"], rel=1e-5, abs=1e-6)
