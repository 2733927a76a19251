"""Muon(orthogonalizer="auon" | "hybrid_auon" | "racs") under DDP and FSDP2 (2 gloo ranks)
equals one process.

The harness's net has uneven row shards (5/5, 4/3 and 1/0 rows: an empty shard),
so the FSDP2 runs cover the local-rows path of auon/racs with its all-reduced
sums; ``split`` on the first layer sends that matrix through the strategy's
whole-matrix path instead. DDP computes auon/racs on every rank with no
exchange (they are cheap and elementwise) and splits hybrid_auon over the ranks.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from _harness import full_params, make_model, train_step

from matrixopt import Muon
from matrixopt.optim._distributed import count_bytes

pytestmark = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                       reason="needs torch.distributed with the gloo backend"),
]

OPS = ("auon", "hybrid_auon", "racs")
STEPS = 2
#: (mode, operator, split): every path once (DDP auon is the same local code as racs)
RUNS = [("ddp", "hybrid_auon", False), ("ddp", "racs", False),
        *[("fsdp", op, False) for op in OPS], ("fsdp", "racs", True)]
KW = dict(lr=0.02, weight_decay=0.1, ns_dtype=torch.float32)


def _opt(model: torch.nn.Module, op: str, split: bool, **kw: object) -> Muon:
    net = getattr(model, "module", model)
    if not split:
        return Muon(model.parameters(), orthogonalizer=op, **KW, **kw)
    first = [net.a.weight]  # type: ignore[union-attr]
    rest = [p for p in model.parameters() if p is not first[0]]
    return Muon([{"params": first, "split": 2}, {"params": rest}], orthogonalizer=op,
                **KW, **kw)


def _job(rank: int, world: int, out: Path) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    res: dict[str, object] = {}
    for mode, op, split in RUNS:
        model = make_model()
        if mode == "ddp":
            model = DDP(model)
            opt = _opt(model, op, split, process_group=dist.group.WORLD)
        else:
            fully_shard(model)
            opt = _opt(model, op, split)
        key = f"{mode}-{op}-{split}"
        with count_bytes() as c:
            res[f"{key}-losses"] = [train_step(model, opt, s, rank, world) for s in range(STEPS)]
        res[f"{key}-bytes"] = dict(c)
        res[f"{key}-params"] = full_params(model)
    if rank == 0:
        torch.save(res, out / "res.pt")


@pytest.fixture(scope="module")
def results(dist_out: Path) -> dict:
    return torch.load(dist_out / "operators" / "res.pt", weights_only=False)


def _single(op: str, split: bool) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = make_model()
    opt = _opt(model, op, split)
    return [train_step(model, opt, s) for s in range(STEPS)], full_params(model)


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.parametrize("op", ["hybrid_auon", "racs"])
def test_ddp_equals_single_process(results: dict, op: str) -> None:
    losses, params = _single(op, False)
    assert results[f"ddp-{op}-False-losses"] == pytest.approx(losses, rel=1e-5, abs=1e-6)
    _close(results[f"ddp-{op}-False-params"], params)
    gathered = results[f"ddp-{op}-False-bytes"].get("all_gather", 0)
    # elementwise operators: no exchange at all; hybrid_auon: the split's all-gather
    assert (gathered > 0) == (op == "hybrid_auon")


@pytest.mark.parametrize("op,split", [(op, s) for m, op, s in RUNS if m == "fsdp"])
def test_fsdp2_equals_single_process(results: dict, op: str, split: bool) -> None:
    losses, params = _single(op, split)
    assert results[f"fsdp-{op}-{split}-losses"] == pytest.approx(losses, rel=1e-5, abs=1e-6)
    _close(results[f"fsdp-{op}-{split}-params"], params)
    nbytes = results[f"fsdp-{op}-{split}-bytes"]
    # local rows: only small all-reduces; whole matrices: all-to-alls
    assert (nbytes.get("all_to_all", 0) > 0) == (op == "hybrid_auon" or split)
    if op != "hybrid_auon":
        assert nbytes.get("all_reduce", 0) > 0
