"""SOAP under FSDP2 and DDP on 2 gloo processes vs a single process (within 1e-5, fp32).

FSDP2: the whole gradient is assembled by one all-reduce per tensor (the factors need
GGᵀ over all rows), SOAP's state is whole on every rank, the refreshes are split over
the ranks. The job runs in the shared 2-process launch (``_harness.SHARED_LAUNCH``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from _harness import full_params, local_batch, make_model, train_step

from matrixopt.optim import SOAP

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with the gloo backend")

STEPS = 7  # refreshes at t = 2, 4, 6 (the first call only builds the bases)
KW = dict(lr=0.02, weight_decay=0.1, precondition_frequency=2)


def _job(rank: int, world: int, out: Path) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    import matrixopt.optim.soap as soap_mod

    res: dict[str, object] = {}
    refreshed: list[int] = []
    real = soap_mod.eigh_refresh

    def counting(A: torch.Tensor, Q: torch.Tensor):  # type: ignore[no-untyped-def]
        refreshed.append(A.shape[0] if A.ndim == 3 else 1)
        return real(A, Q)

    soap_mod.eigh_refresh = counting  # type: ignore[assignment]
    try:  # the launch is shared with other modules' jobs: always restore
        model = make_model()
        fully_shard(model)
        opt = SOAP(model.parameters(), **KW)
        res["fsdp_losses"] = [train_step(model, opt, s, rank, world) for s in range(STEPS)]
        res["fsdp_params"] = full_params(model)
        res["fsdp_refreshed"] = sum(refreshed)
        refreshed.clear()
        model = DDP(make_model())
        opt = SOAP(model.parameters(), process_group=dist.group.WORLD, **KW)
        res["ddp_losses"] = [train_step(model, opt, s, rank, world) for s in range(STEPS)]
        res["ddp_params"] = full_params(model)
        res["ddp_refreshed"] = sum(refreshed)
    finally:
        soap_mod.eigh_refresh = real
    torch.save(res, out / f"soap-{rank}.pt")


@pytest.fixture(scope="module")
def results(dist_out: Path) -> list[dict]:
    """This module's part of the one 2-process launch (``_harness.all_jobs``)."""
    return [torch.load(dist_out / "soap" / f"soap-{r}.pt", weights_only=False)
            for r in range(2)]


def _single() -> tuple[list[float], dict[str, torch.Tensor]]:
    """One process, the gradient built as the ranks build it: (g_0 + g_1) / 2 of the two
    half batches (halving is exact). SOAP's first basis is an eigh of rank-deficient
    factors (a tall matrix's GGᵀ): inside the null space any basis is an eigenbasis,
    and Adam's per-coordinate scaling depends on which one, so a gradient that differs
    in its last bit (a full-batch mean) may give a different, equally valid trajectory."""
    model = make_model()
    opt = SOAP(model.parameters(), **KW)
    losses = []
    for s in range(STEPS):
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for r in range(2):
            x, y = local_batch(s, r, 2)
            loss = (model(x) - y).square().mean()
            (loss / 2).backward()
            total += float(loss) / 2
        opt.step()
        losses.append(total)
    return losses, full_params(model)


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_equals_single_process(results: list[dict], mode: str) -> None:
    losses, params = _single()
    for res in results:
        assert res[f"{mode}_losses"] == pytest.approx(losses, rel=1e-5, abs=1e-6)
        got = res[f"{mode}_params"]
        assert got.keys() == params.keys()
        for k in params:
            torch.testing.assert_close(got[k], params[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_refreshes_are_split_over_the_ranks(results: list[dict], mode: str) -> None:
    # 6 matrices, 2 factors each, 3 refreshes: 36 factor refreshes in all, shared
    done = [res[f"{mode}_refreshed"] for res in results]
    assert sum(done) == 36 and min(done) > 0
