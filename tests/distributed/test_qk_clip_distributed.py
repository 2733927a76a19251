"""QKClip on 2 gloo ranks: each rank records its half of the batch, one MAX all-reduce
gives every rank the global per-head maxima, and the clipped weights equal a single
process's on the whole batch -- with replicated (DDP-style) and FSDP2-sharded weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _harness import launch
from torch import nn

from matrixopt.optim import QKClip

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with the gloo backend")

TAU = 3.0
H, D = 4, 16


class Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(D, D)
        self.k = nn.Linear(D, D)
        self.clip: QKClip | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q(x).view(B, T, H, D // H).transpose(1, 2)
        k = self.k(x).view(B, T, H, D // H).transpose(1, 2)
        if self.clip is not None:
            self.clip.record(self, q, k, causal=True)
        return F.scaled_dot_product_attention(q, k, k, is_causal=True).sum()


def _model() -> Attn:
    torch.manual_seed(0)
    m = Attn()
    with torch.no_grad():  # heads 0 and 3 far above τ, 1 and 2 under it
        for h in (0, 3):
            m.q.weight[h * 4:(h + 1) * 4] *= 15
            m.k.weight[h * 4:(h + 1) * 4] *= 15
    return m


def _batch() -> torch.Tensor:
    return torch.randn(4, 6, D, generator=torch.Generator().manual_seed(7))


def _run(model: Attn, x: torch.Tensor) -> QKClip:
    clip = QKClip(tau=TAU)
    clip.register(model, model.q, model.k, H)
    model.clip = clip
    model(x).backward()  # FSDP2: the backward reshards, as before an optimizer step
    clip.step()
    return clip


def _job(rank: int, world: int, out: Path) -> None:
    from torch.distributed.fsdp import fully_shard

    x = _batch()
    part = x[rank * 2:(rank + 1) * 2]  # a different half per rank
    res = {}
    m = _model()
    clip = _run(m, part)
    res["ddp"] = {k: v.detach().clone() for k, v in m.state_dict().items()}
    res["ddp_max"] = clip.last_max["attn0"].clone()
    m = _model()
    fully_shard(m.q)
    fully_shard(m.k)
    clip = _run(m, part)
    res["fsdp"] = {n: p.full_tensor().detach().clone() for n, p in m.named_parameters()}
    res["fsdp_max"] = clip.last_max["attn0"].clone()
    torch.save(res, out / f"qk-{rank}.pt")


def test_two_ranks_match_one_process(tmp_path: Path) -> None:
    launch(_job, tmp_path, timeout=300.0)
    ref_model = _model()
    ref = _run(ref_model, _batch())
    S = ref.last_max["attn0"]
    assert (S > TAU).any() and (S < TAU).any()
    want = {k: v for k, v in ref_model.state_dict().items()}
    for rank in range(2):
        got = torch.load(tmp_path / f"qk-{rank}.pt")
        for mode in ("ddp", "fsdp"):
            torch.testing.assert_close(got[f"{mode}_max"], S)  # the global maxima
            for k, v in want.items():
                torch.testing.assert_close(got[mode][k], v, rtol=1e-6, atol=1e-7, msg=k)
    # one all-reduce per clip step (two steps: replicated, FSDP2), plain tensors on the
    # parameters' device
    rec = torch.load(tmp_path / "collectives-0.pt")
    assert rec["calls"]["all_reduce"] == 2, rec
    assert rec["violations"] == [], rec
