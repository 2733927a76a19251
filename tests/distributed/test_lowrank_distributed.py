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
from _harness import STEPS, full_params, make_model, train_step
from torch.distributed.tensor import DTensor

from matrixopt import Adafactor, GaLoreAdamW

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
    # refresh is the cold randomized one, the second warm-started); the right side, which
    # FSDP2 uses for every matrix (std would pick the left one for the wide matrices)
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


def _job(rank: int, world: int, out: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    res: dict[str, object] = {}
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


def test_galore_fsdp_state_is_sharded(results: tuple[dict, Path]) -> None:
    """GaLoreAdamW under FSDP2 keeps the projected moments (G P, rows × r) sharded like the
    parameter and the right basis (n × r) as a plain replicated tensor."""
    res, _ = results
    shard = "(Shard(dim=0),)"
    model = make_model()
    for p, placements in zip(model.parameters(), res["galore", "fsdp_placements"]):
        assert placements["exp_avg"] == placements["exp_avg_sq"] == shard
        if p.dim() == 2:
            assert placements["projector"] == "plain"


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
