"""Shampoo under FSDP2 and DDP on 2 gloo processes equals one process (fp32, 1e-5).

The harness model has uneven row shards (10 → 5/5, 7 → 4/3, 1 → 1/0: an empty
shard) and matrices blocked by ``max_preconditioner_dim=4`` (zero-padded blocks).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from _harness import STEPS, full_params, make_model, train_step

from matrixopt import optim

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with the gloo backend")

CONFIGS = {
    "root": dict(lr=0.02, epsilon=1e-4, precondition_frequency=2, max_preconditioner_dim=4,
                 weight_decay=0.1),
    "mkor-newton": dict(lr=0.02, epsilon=1e-2, precondition_frequency=3,
                        start_preconditioning_step=2, inverse_update="mkor",
                        root_method="newton"),
}


def make_opt(name: str, model: torch.nn.Module, **kw: object) -> optim.Shampoo:
    return optim.Shampoo(model.parameters(), **{**CONFIGS[name], **kw})


def _job(rank: int, world: int, out: Path) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    res: dict[object, object] = {}
    for name in CONFIGS:
        model = make_model()
        fully_shard(model)
        opt = make_opt(name, model)
        res[name, "fsdp"] = [train_step(model, opt, s, rank, world) for s in range(STEPS)]
        res[name, "fsdp_params"] = full_params(model)
        res[name, "fsdp_fallbacks"] = [int(opt.state[p]["root_fallbacks"])
                                       for p in model.parameters() if p.ndim >= 2]
        model = DDP(make_model())
        opt = make_opt(name, model, process_group=dist.group.WORLD)
        res[name, "ddp"] = [train_step(model, opt, s, rank, world) for s in range(STEPS)]
        res[name, "ddp_params"] = full_params(model)
    if rank == 0:
        torch.save(res, out / "res.pt")


@pytest.fixture(scope="module")
def results(dist_out: Path) -> dict:
    """This module's part of the one 2-process launch (``_harness.all_jobs``)."""
    return torch.load(dist_out / "shampoo" / "res.pt", weights_only=False)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_equals_single_process(results: dict, name: str, mode: str) -> None:
    model = make_model()
    opt = make_opt(name, model)
    losses = [train_step(model, opt, s) for s in range(STEPS)]
    assert results[name, mode] == pytest.approx(losses, rel=1e-5, abs=1e-6)
    for k, v in full_params(model).items():
        torch.testing.assert_close(results[name, f"{mode}_params"][k], v, rtol=1e-5, atol=1e-5,
                                   msg=k)
    # the parameters moved (a frozen model would also "match")
    assert any(not torch.equal(v, w) for v, w in zip(full_params(model).values(),
                                                     full_params(make_model()).values()))
    if mode == "fsdp":
        assert results[name, "fsdp_fallbacks"] == [0] * len(results[name, "fsdp_fallbacks"])
