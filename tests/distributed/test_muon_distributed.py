"""Muon under DDP and FSDP2 on 2 gloo processes vs a single process; DCP checkpoints.

One spawned 2-process job runs every distributed scenario (process start-up
dominates the cost) and saves its results; the tests compare them with
single-process runs done here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from _harness import STEPS, full_params, make_model, train_step

from matrixopt import Muon
from matrixopt.optim._distributed import count_bytes, lpt_assign, matrix_cost, shard_rows

pytestmark = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                       reason="needs torch.distributed with the gloo backend"),
    # DCP's notice when a checkpoint is loaded in one process (what world-1 resume is)
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning"),
]

KW = dict(lr=0.02, weight_decay=0.1, ns_dtype=torch.float32)
CKPT_AT, RESUME = 2, 3


def _muon(model: torch.nn.Module, **kw: object) -> Muon:
    return Muon(model.parameters(), **{**KW, **kw})


def _errors(rank: int, world: int) -> dict[str, str]:
    """Unsupported placements / meshes / groups must raise, naming them."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    out = {}
    w = torch.zeros(4, 3)
    cases = {
        "replicate": lambda: [
            distribute_tensor(w, init_device_mesh("cpu", (world,)), [Replicate()])],
        "shard1": lambda: [distribute_tensor(w, init_device_mesh("cpu", (world,)), [Shard(1)])],
        "mesh2d": lambda: [distribute_tensor(w, init_device_mesh("cpu", (world, 1)),
                                             [Shard(0), Replicate()])],
    }
    for name, make in cases.items():
        params = make()
        try:
            Muon(params)
            out[name] = "no error"
        except ValueError as e:
            out[name] = str(e)
    from matrixopt import Adafactor, GaLoreAdamW
    for cls in (Adafactor, GaLoreAdamW):  # the whole-matrix fallback validates too
        dt = distribute_tensor(w, init_device_mesh("cpu", (world,)), [Replicate()])
        dt.grad = torch.ones_like(dt)
        try:
            cls([dt]).step()
            out[cls.__name__] = "no error"
        except ValueError as e:
            out[cls.__name__] = str(e)
    # item 9 of issue 13: the FSDP2 rejections also hold for a group added later
    mesh = init_device_mesh("cpu", (world,))
    for name, extra in (("add_normuon", {"normuon": True}), ("add_int8", {"state_dtype": "int8"})):
        opt = Muon([distribute_tensor(torch.zeros(4, 3), mesh, [Shard(0)])])
        try:
            opt.add_param_group({"params": [distribute_tensor(torch.zeros(6, 3), mesh,
                                                              [Shard(0)])], **extra})
            out[name] = "no error"
        except ValueError as e:
            out[name] = f"{type(e).__name__}: {e} (groups: {len(opt.param_groups)})"
    other = dist.new_group(list(range(world)))
    mesh = init_device_mesh("cpu", (world,))
    try:
        Muon([distribute_tensor(w, mesh, [Shard(0)])], process_group=other)
        out["group"] = "no error"
    except ValueError as e:
        out["group"] = str(e)
    return out


def _meta_default_steps(rank: int, world: int) -> dict[str, str]:
    """Muon steps (DDP, FSDP2, default bf16 payload) with ``torch.device("meta")`` as the
    default device: a tensor the step creates without a device (as the CPU all-reduce
    of the payload-dtype vote was) becomes a meta tensor, which the collective stand-ins
    of ``_harness`` record as a violation (and gloo rejects)."""
    from _harness import local_batch
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP
    out = {}
    for mode in ("ddp", "fsdp"):
        model = make_model()
        if mode == "ddp":
            model = DDP(model)
            opt = Muon(model.parameters(), lr=0.02, process_group=dist.group.WORLD)
        else:
            fully_shard(model)
            opt = Muon(model.parameters(), lr=0.02)
        try:
            for s in range(2):
                x, y = local_batch(s, rank, world)
                loss = (model(x) - y).square().mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                with torch.device("meta"):
                    opt.step()
            out[mode] = "ok" if all(p.device.type == "cpu" for p in model.parameters()) \
                else "parameters moved"
        except Exception as e:  # reported, not raised: the other jobs still run
            out[mode] = f"{type(e).__name__}: {e}"
    return out


def _job(rank: int, world: int, out: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        get_state_dict,
        set_state_dict,
    )
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    import matrixopt.optim.muon as muon_mod

    res: dict[str, object] = {}
    work = {"ddp": 0, "fsdp": 0}
    real = muon_mod.orthogonalize

    def counting(X: torch.Tensor, mode: str, **kw: object) -> torch.Tensor:
        work[mode] += matrix_cost(*X.shape)
        return real(X, **kw)

    # DDP, fp32 iterations: equal to one process.
    model = DDP(make_model())
    opt = _muon(model, process_group=dist.group.WORLD)
    muon_mod.orthogonalize = lambda X, **kw: counting(X, "ddp", **kw)
    with count_bytes() as c:
        res["ddp_losses"] = [train_step(model, opt, s, rank, world) for s in range(STEPS)]
    muon_mod.orthogonalize = real
    res["ddp_bytes"] = dict(c)
    res["ddp_params"] = full_params(model)
    # DDP, default bf16 iterations: bf16 payload, replicas stay bit-identical.
    model = DDP(make_model())
    opt = Muon(model.parameters(), lr=0.02, process_group=dist.group.WORLD)
    with count_bytes() as c:
        for s in range(STEPS):
            train_step(model, opt, s, rank, world)
    res["ddp_bf16_bytes"] = dict(c)
    mine = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    res["ddp_bf16_in_sync"] = all(torch.equal(gathered[0], g) for g in gathered)

    # FSDP2.
    model = make_model()
    fully_shard(model)
    opt = _muon(model)
    res["fsdp_keys"] = sorted(sorted(opt.state[p]) for p in model.parameters())
    muon_mod.orthogonalize = lambda X, **kw: counting(X, "fsdp", **kw)
    with count_bytes() as c:
        res["fsdp_losses"] = [train_step(model, opt, s, rank, world) for s in range(STEPS)]
    muon_mod.orthogonalize = real
    per_rank: list[object] = [None] * world
    dist.all_gather_object(per_rank, work)
    res["work"] = per_rank
    res["fsdp_bytes"] = dict(c)
    res["fsdp_params"] = full_params(model)
    res["fsdp_keys"] = [sorted(opt.state[p]) for p in model.parameters()]
    # FSDP2 with the default bf16 iterations: bf16 payload both ways.
    model = make_model()
    fully_shard(model)
    opt = Muon(model.parameters(), lr=0.02)
    with count_bytes() as c:
        for s in range(STEPS):
            train_step(model, opt, s, rank, world)
    res["fsdp_bf16_bytes"] = dict(c)
    res["fsdp_bf16_params"] = full_params(model)
    res["momentum_is_dtensor"] = all(
        type(opt.state[p]["momentum_buffer"]).__name__ == "DTensor"
        for p in model.parameters() if p.ndim >= 2)

    # DCP: save at step CKPT_AT, continue; a fresh run loaded from the checkpoint must
    # reproduce the same losses.
    model = make_model()
    fully_shard(model)
    opt = _muon(model)
    for s in range(CKPT_AT):
        train_step(model, opt, s, rank, world)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(out / "ckpt"))
    res["after_ckpt"] = [train_step(model, opt, CKPT_AT + s, rank, world) for s in range(RESUME)]
    model = make_model()
    fully_shard(model)
    opt = _muon(model)
    msd, osd = get_state_dict(model, opt)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=str(out / "ckpt"))
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    res["resumed"] = [train_step(model, opt, CKPT_AT + s, rank, world) for s in range(RESUME)]
    res["osd_keys"] = sorted(get_optimizer_state_dict(model, opt)["state"])
    res["errors"] = _errors(rank, world)
    res["meta_default"] = _meta_default_steps(rank, world)
    if rank == 0:
        torch.save(res, out / "res.pt")


@pytest.fixture(scope="module")
def results(dist_out: Path) -> tuple[dict, Path]:
    out = dist_out / "muon"
    return torch.load(out / "res.pt", weights_only=False), out


def _single(steps: int = STEPS) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = make_model()
    opt = _muon(model)
    losses = [train_step(model, opt, s) for s in range(steps)]
    return losses, full_params(model)


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5, msg=k)


# ---------------------------------------------------------------------- plan
def test_lpt_balances_flops_not_count() -> None:
    costs = [matrix_cost(1, 64, 64), *[matrix_cost(1, 16, 16)] * 8]
    owner = lpt_assign(costs, 2)
    load = [sum(c for c, o in zip(costs, owner) if o == r) for r in range(2)]
    assert owner[0] == 0 and all(o == 1 for o in owner[1:])  # one big vs eight small
    assert max(load) == costs[0]
    assert lpt_assign(costs, 2) == owner  # deterministic


def test_lpt_makespan_within_graham_bound() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        costs = torch.randint(1, 100, (9,), generator=g).tolist()
        owner = lpt_assign(costs, 3)
        makespan = max(sum(c for c, o in zip(costs, owner) if o == r) for r in range(3))
        lower = max(max(costs), sum(costs) / 3)
        assert makespan <= 4 / 3 * lower + 1e-9


def test_shard_rows_follow_torch_chunk() -> None:
    for rows in range(0, 12):
        for world in (1, 2, 3, 5):
            chunk, sizes = shard_rows(rows, world)
            expect = [len(c) for c in torch.arange(rows).chunk(world)] if rows else []
            assert sizes == expect + [0] * (world - len(expect))
            assert all(s <= chunk for s in sizes)


# ------------------------------------------------------------ distributed runs
def test_ddp_equals_single_process(results: tuple[dict, Path]) -> None:
    res, _ = results
    losses, params = _single()
    assert res["ddp_losses"] == pytest.approx(losses, rel=1e-5, abs=1e-6)
    _close(res["ddp_params"], params)


def test_ddp_exchanges_updates_once_in_iteration_dtype(results: tuple[dict, Path]) -> None:
    res, _ = results
    model = make_model()
    counts = [p.numel() for p in model.parameters() if p.ndim >= 2]
    views = [(1, *p.shape) for p in model.parameters() if p.ndim >= 2]
    owner = lpt_assign([matrix_cost(*v) for v in views], 2)
    width = max(sum(n for n, o in zip(counts, owner) if o == r) for r in range(2))
    # ring all-gather: (world-1) × padded buffer per step
    assert res["ddp_bytes"]["all_gather"] == STEPS * width * 4
    assert res["ddp_bf16_bytes"]["all_gather"] == STEPS * width * 2
    assert res["ddp_bf16_in_sync"]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_each_rank_orthogonalises_only_its_share(results: tuple[dict, Path], mode: str) -> None:
    res, _ = results
    costs = [matrix_cost(1, *p.shape) for p in make_model().parameters() if p.ndim >= 2]
    owner = lpt_assign(costs, 2)
    shares = [STEPS * sum(c for c, o in zip(costs, owner) if o == r) for r in range(2)]
    assert [w[mode] for w in res["work"]] == shares
    assert sum(shares) == STEPS * sum(costs) and min(shares) > 0


def test_fsdp2_equals_single_process(results: tuple[dict, Path]) -> None:
    res, _ = results
    losses, params = _single()
    assert res["fsdp_losses"] == pytest.approx(losses, rel=1e-5, abs=1e-6)
    _close(res["fsdp_params"], params)
    assert res["momentum_is_dtensor"]
    assert res["fsdp_bytes"]["all_to_all"] > 0 and res["fsdp_bytes"]["all_gather"] == 0


def test_fsdp2_bf16_payload_halves_bytes_and_stays_close(results: tuple[dict, Path]) -> None:
    res, _ = results
    assert 2 * res["fsdp_bf16_bytes"]["all_to_all"] == res["fsdp_bytes"]["all_to_all"]
    model = make_model()
    opt = Muon(model.parameters(), lr=0.02)
    for s in range(STEPS):
        train_step(model, opt, s)
    single = full_params(model)
    _, single_fp32 = _single()
    for k, v in single.items():
        # one extra bf16 rounding of the momentum before the norm: no worse than the
        # bf16 iteration's own error (single-process bf16 vs fp32 iterations)
        own = (v - single_fp32[k]).abs().max()
        err = (res["fsdp_bf16_params"][k] - v).abs().max()
        assert err <= 2 * own + 1e-6, (k, float(err), float(own))


def test_fsdp2_state_keys_match_single_process(results: tuple[dict, Path]) -> None:
    res, _ = results
    model = make_model()
    opt = _muon(model)
    train_step(model, opt, 0)
    assert res["fsdp_keys"] == [sorted(opt.state[p]) for p in model.parameters()]


def test_dcp_resume_world_2(results: tuple[dict, Path]) -> None:
    res, _ = results
    assert res["resumed"] == res["after_ckpt"]


def test_dcp_resume_world_1(results: tuple[dict, Path]) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    res, out = results
    model = make_model()
    opt = _muon(model)
    msd, osd = get_state_dict(model, opt)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=str(out / "ckpt"), no_dist=True)
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    losses = [train_step(model, opt, CKPT_AT + s) for s in range(RESUME)]
    assert losses == pytest.approx(res["after_ckpt"], rel=1e-5, abs=1e-6)
    # and the world-1 continuation equals an uninterrupted single-process run
    ref, _ = _single(CKPT_AT + RESUME)
    assert losses == pytest.approx(ref[CKPT_AT:], rel=1e-5, abs=1e-6)


def test_unsupported_layouts_raise_naming_them(results: tuple[dict, Path]) -> None:
    errors = results[0]["errors"]
    assert "Replicate" in errors["replicate"]
    assert "Shard(dim=1)" in errors["shard1"]
    assert "2-D" in errors["mesh2d"]
    assert "process_group" in errors["group"] and "mesh" in errors["group"]
    for name in ("Adafactor", "GaLoreAdamW"):
        assert name in errors[name] and "Replicate" in errors[name]


def test_fsdp2_rejections_hold_in_add_param_group(results: tuple[dict, Path]) -> None:
    errors = results[0]["errors"]
    assert errors["add_normuon"].startswith("GroupError") and "normuon" in errors["add_normuon"]
    assert "param_groups[1]" in errors["add_normuon"]
    assert "'int8'" in errors["add_int8"] and "FSDP2" in errors["add_int8"]
    # the rejected group is not kept
    assert errors["add_normuon"].endswith("(groups: 1)")
    assert errors["add_int8"].endswith("(groups: 1)")


@pytest.mark.parametrize("rank", [0, 1])
def test_every_collective_gets_tensors_on_the_parameters_device(dist_out: Path,
                                                                rank: int) -> None:
    """The stand-ins of _harness.check_collective_devices saw every c10d collective of
    every distributed job (Muon DDP/FSDP2, Adafactor/GaLore FSDP2, their fallbacks)."""
    record = torch.load(dist_out / f"collectives-{rank}.pt", weights_only=False)
    assert record["violations"] == []
    calls = record["calls"]
    # the paths are exercised: DDP's all_gather, FSDP2's all_to_all, the reductions
    assert calls["all_gather"] > 0 and calls["all_to_all_single"] > 0
    assert calls["all_reduce"] > 0


def test_steps_create_no_device_less_tensor_for_collectives(results: tuple[dict, Path]) -> None:
    assert results[0]["meta_default"] == {"ddp": "ok", "fsdp": "ok"}


def test_payload_dtype_comes_from_the_configuration() -> None:
    from matrixopt.optim._distributed import payload_dtype
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    assert payload_dtype(f32, bf16) == bf16 and payload_dtype(f32, f16) == f16
    assert payload_dtype(f32, None) == f32 and payload_dtype(f32, f32) == f32
    assert payload_dtype(bf16, f16) == bf16 and payload_dtype(torch.float64, f32) == f32
    # exact: an orthogonalisation round-trips unchanged through the dtype it iterates in
    # (iteration_dtype: float16 for an explicit gram with bf16), whatever the method and
    # normalisation, so the payload Muon picks from it loses nothing
    from matrixopt.linalg import orthogonalize
    from matrixopt.linalg.orthogonalization import iteration_dtype
    assert iteration_dtype(bf16, "gram") == f16 and iteration_dtype(bf16, "auto") == bf16
    for shape in ((3, 8, 5), (2, 5, 40), (1, 64, 64)):
        X = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        for method in ("standard", "gram"):
            for norm in ("frobenius", "spectral", "aol"):
                for dt in (bf16, f16):
                    try:
                        O = orthogonalize(X, dtype=dt, method=method, normalization=norm)
                    except ValueError:  # a combination linalg rejects (issue 13 item 11)
                        continue
                    wire = payload_dtype(f32, iteration_dtype(dt, method))
                    assert O.dtype == f32 and torch.equal(O.to(wire).to(f32), O), \
                        (shape, method, norm, dt)


def test_ddp_group_without_init_process_group_raises() -> None:
    if dist.is_initialized():
        pytest.skip("a default process group exists in this process")
    with pytest.raises(ValueError, match="not initialised"):
        Muon(make_model().parameters(), process_group=object())
