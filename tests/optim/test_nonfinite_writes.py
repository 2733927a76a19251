"""The skip policy's write path: safe gradients (fast CPU form, same values as ``where``),
bounded chunks, Muon's per-parameter momentum (bit-identical to the policy off on finite
gradients) and no extra allocation peak over ``nonfinite="ignore"`` on a clean step."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from matrixopt.optim import Adafactor, Muon
from matrixopt.optim._nonfinite import StepFlags
from matrixopt.optim.functional.muon import momentum_


def _grads() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    gs = [torch.randn(6, 5, generator=g), torch.randn(7, generator=g),
          torch.randn(3, 4, generator=g).bfloat16(), torch.randn(4, 4, generator=g).double()]
    gs[0][1, 2] = float("nan")
    gs[3][0, 0] = float("inf")
    gs[1][0] = -0.0
    return gs


def test_safe_has_the_values_of_where() -> None:
    gs = _grads()
    flags = StepFlags.compute(gs)
    assert [bool(f) for f in flags.ok] == [False, True, True, False]  # type: ignore[union-attr]
    for f, g, s in zip(flags.ok, gs, flags.safe(gs)):  # type: ignore[arg-type]
        ref = torch.where(f, g, 0)
        assert s.dtype == g.dtype and torch.equal(s, ref)
        if bool(f):  # bit for bit, the sign of a zero included
            assert torch.equal(s.view(torch.uint8), g.view(torch.uint8))
    assert torch.isnan(gs[0]).any()  # the gradients are not written


def test_chunks_are_consecutive_bounded_and_cover_everything() -> None:
    ts = [torch.zeros(n) for n in (5, 3, 9, 1, 1, 2, 20)]
    flags = StepFlags.compute(ts)
    chunks = flags.chunks(ts, numel=8)
    assert [i for c in chunks for i in c] == list(range(len(ts)))
    for c in chunks:
        assert len(c) == 1 or sum(ts[i].numel() for i in c) <= 8
    assert chunks == [[0, 1], [2], [3, 4, 5], [6]]
    assert StepFlags.off().chunks(ts) == [list(range(len(ts)))]


@pytest.mark.parametrize("nesterov", [True, False])
def test_momentum_with_flags_is_bit_identical_on_finite_grads(nesterov: bool) -> None:
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(8, 6, generator=g) for _ in range(3)]
    b0 = [torch.randn(8, 6, generator=g) for _ in range(3)]
    off, on = [b.clone() for b in b0], [b.clone() for b in b0]
    d_off = momentum_(off, grads, 0.9, nesterov)
    d_on = momentum_(on, grads, 0.9, nesterov, StepFlags.compute(grads))
    assert all(torch.equal(a, b) for a, b in zip(off, on))
    assert all(torch.equal(a, b) for a, b in zip(d_off, d_on))
    bad = [x.clone() for x in grads]
    bad[1][0, 0] = float("nan")
    on = [b.clone() for b in b0]
    d_bad = momentum_(on, bad, 0.9, nesterov, StepFlags.compute(bad))
    assert torch.equal(on[1], b0[1]) and torch.equal(on[0], off[0]) and torch.equal(on[2], off[2])
    assert all(torch.isfinite(d).all() for d in d_bad)


def _peak(fn: Any) -> int:
    """The allocator peak of ``fn`` as the benchmarks measure it (bench_lowrank's
    profiler-event walk, used by bench_nonfinite and bench_memory)."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_lowrank.py"
    spec = importlib.util.spec_from_file_location("_bench_lowrank", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return int(mod._allocation_peak(fn))


@pytest.mark.parametrize("make", [
    lambda ps, nf: Muon(ps, lr=0.02, nonfinite=nf),
    lambda ps, nf: Adafactor(ps, lr=1e-2, relative_step=False, nonfinite=nf),
], ids=["muon", "adafactor"])
def test_clean_step_peak_is_ignores(make: Any) -> None:
    """The policy adds no gradient-sized allocation to the peak of a clean step (before:
    Muon held a safe copy of every gradient at once, Adafactor one beside G² / U)."""
    peaks = {}
    for nf in ("skip", "ignore"):
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(96, 96) for _ in range(4)])
        ps = list(model.parameters())
        opt = make(ps, nf)
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
        peaks[nf] = _peak(opt.step)
    # a few 0-dim flags and scalars at most: far below one 96×96 gradient (36864 B)
    assert peaks["skip"] - peaks["ignore"] < 4096, peaks
