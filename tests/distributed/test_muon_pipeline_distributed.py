"""Muon's pipelined FSDP2 exchange (asynchronous all-to-alls, rounds in flight) on 2 gloo
processes: the same values, bit for bit, as one blocking round, with one round per shape
(the default for small matrices) and with one matrix per owner and round (forced)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from _harness import full_params, train_step
from torch import nn

from matrixopt import Muon
from matrixopt.optim import _distributed
from matrixopt.optim._distributed import fsdp_rounds, lpt_assign, matrix_cost

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with the gloo backend")

STEPS = 3


class Stack(nn.Module):
    """Six 8×8 matrices (several rounds per owner when forced), two 10×6-shaped ones
    (uneven shards), a 1×8 row (an empty shard on rank 1): three shape buckets."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.hidden = nn.ModuleList(nn.Linear(8, 8, bias=False) for _ in range(6))
        self.side = nn.Linear(8, 6, bias=False)
        self.back = nn.Linear(6, 8, bias=False)
        self.out = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.inp(x))
        for layer in self.hidden:
            x = torch.tanh(layer(x))
        x = torch.tanh(self.back(torch.tanh(self.side(x))))
        return self.out(x).sum(-1)


def _make() -> Stack:
    torch.manual_seed(0)
    return Stack()


def _job(rank: int, world: int, out: Path) -> None:
    from torch.distributed.fsdp import fully_shard

    res: dict[str, object] = {}
    real_numel = _distributed.ROUND_NUMEL
    for name, depth, numel in (("blocking", 0, real_numel), ("pipelined", 2, real_numel),
                               ("one_per_round", 2, 1), ("depth1", 1, 1)):
        _distributed.ROUND_NUMEL = numel
        try:
            for ns_dtype in (torch.float32, torch.bfloat16):
                model = _make()
                fully_shard(model)
                opt = Muon(model.parameters(), lr=0.02, ns_dtype=ns_dtype)
                opt._strategy.pipeline_depth = depth  # type: ignore[attr-defined]
                res[f"{name}_{ns_dtype}_losses"] = [train_step(model, opt, s, rank, world)
                                                    for s in range(STEPS)]
                res[f"{name}_{ns_dtype}"] = full_params(model)
        finally:
            _distributed.ROUND_NUMEL = real_numel
    if rank == 0:
        torch.save(res, out / "res.pt")


@pytest.fixture(scope="module")
def results(dist_out: Path) -> dict:
    return torch.load(dist_out / "muon_pipeline" / "res.pt", weights_only=False)


@pytest.mark.parametrize("name", ["pipelined", "one_per_round", "depth1"])
@pytest.mark.parametrize("ns_dtype", [torch.float32, torch.bfloat16])
def test_pipelined_exchange_is_bit_identical_to_one_blocking_round(
        results: dict, name: str, ns_dtype: torch.dtype) -> None:
    ref, got = results[f"blocking_{ns_dtype}"], results[f"{name}_{ns_dtype}"]
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    assert results[f"{name}_{ns_dtype}_losses"] == results[f"blocking_{ns_dtype}_losses"]
    # the run moved the weights (a pipeline that returned nothing would fail above too)
    assert not torch.equal(ref["hidden.0.weight"], _make().hidden[0].weight.detach())


def test_rounds_cover_every_matrix_once_grouped_by_shape() -> None:
    views = [(1, 8, 8)] * 6 + [(1, 8, 6), (1, 6, 8), (2, 8, 8), (1, 512, 512), (1, 512, 512)]
    owner = lpt_assign([matrix_cost(*v) for v in views], 2)
    assert fsdp_rounds(views, owner, 2, None) == [list(range(len(views)))]
    for numel in (1, 64, 128, 1 << 18):
        rounds = fsdp_rounds(views, owner, 2, numel)
        assert sorted(i for r in rounds for i in r) == list(range(len(views)))
        for r in rounds:
            assert len({views[i][1:] for i in r}) == 1  # one (m, n) per round
            c = max(1, numel // max(views[i][0] * views[i][1] * views[i][2] for i in r))
            assert all(sum(owner[i] == o for i in r) <= c for o in range(2))
    # large matrices: one per owner and round (dion's batches of world matrices)
    big = fsdp_rounds([(1, 512, 512)] * 4, [0, 1, 0, 1], 2, 1 << 18)
    assert big == [[0, 1], [2, 3]]
    # small ones share a round
    assert fsdp_rounds([(1, 8, 8)] * 4, [0, 1, 0, 1], 2, 1 << 18) == [[0, 2, 1, 3]]
