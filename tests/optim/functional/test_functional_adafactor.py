"""matrixopt.optim.functional.adafactor: float64 reference, the skip flags, and the
sharded statistics (two simulated row shards in threads == the whole tensor)."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from matrixopt.optim._nonfinite import StepFlags
from matrixopt.optim.functional.adafactor import (
    adafactor_,
    factored_dims,
    stat_dtype,
    step_sizes,
)

HP = dict(eps1=1e-30, eps2=1e-3, clip_threshold=1.0, weight_decay=0.1)
SCHED = dict(lr=1e-2, decay_rate=-0.8, beta2_cap=None, relative_step=True, warmup_init=False)


def _state(p: torch.Tensor, beta1: float | None, dims):
    sd = stat_dtype(p.dtype)
    m = torch.zeros_like(p) if beta1 is not None else None
    if dims is not None:
        rs, cs = list(p.shape), list(p.shape)
        rs[dims[1]] = 1
        cs[dims[0]] = 1
        return torch.zeros(rs, dtype=sd), torch.zeros(cs, dtype=sd), None, m
    return None, None, torch.zeros(p.shape, dtype=sd), m


def _run(p0, grads, beta1, scale, flags_per_step=None):
    p = p0.clone()
    d = factored_dims(p.shape)
    r, c, v, m = _state(p, beta1, d)
    step = torch.tensor(0.0)
    for t, g in enumerate(grads):
        flags = flags_per_step[t] if flags_per_step else StepFlags.off()
        b2, rho = step_sizes([step], **SCHED)
        adafactor_([p], flags.safe([g]), [r], [c], [v], [m], [d], beta2s=b2, rhos=rho,
                   beta1=beta1, scale_parameter=scale, flags=flags, **HP)
    return p, r, c, v, m


def _reference(p0, grads, beta1, scale):
    """Float64, from the paper's formulas (relative step, RMS clipping, decay by α)."""
    w = p0.double().clone()
    R = torch.zeros(w.shape[0], 1, dtype=torch.float64)
    C = torch.zeros(1, w.shape[1], dtype=torch.float64)
    M = torch.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        b2 = 1 - t ** -0.8
        R = b2 * R + (1 - b2) * (g * g + 1e-30).mean(dim=1, keepdim=True)
        C = b2 * C + (1 - b2) * (g * g + 1e-30).mean(dim=0, keepdim=True)
        U = g / (R @ C / R.mean()).sqrt()
        U = U / max(1.0, float(U.pow(2).mean().sqrt()))
        rho = min(1e-2, 1 / math.sqrt(t))
        alpha = max(1e-3, float(w.pow(2).mean().sqrt())) * rho if scale else rho
        w = w * (1 - 0.1 * alpha)
        if beta1 is None:
            w = w - alpha * U
        else:
            M = beta1 * M + (1 - beta1) * alpha * U
            w = w - M
    return w


def _data(shape=(12, 7), steps=5, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen).to(dtype),
            [torch.randn(shape, generator=gen).to(dtype) for _ in range(steps)])


@pytest.mark.parametrize("beta1", [None, 0.9])
@pytest.mark.parametrize("scale", [True, False])
def test_matches_float64_reference(beta1, scale):
    p0, grads = _data(dtype=torch.float64)
    p = _run(p0, grads, beta1, scale)[0]
    torch.testing.assert_close(p, _reference(p0, grads, beta1, scale), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("beta1", [None, 0.9])
def test_flags_finite_bitwise_and_skip_keeps_everything(dtype, beta1):
    p0, grads = _data(dtype=dtype)
    plain = _run(p0, grads, beta1, True)
    flagged = _run(p0, grads, beta1, True, [StepFlags.compute([g]) for g in grads])
    for a, b in zip(plain, flagged):
        assert (a is None and b is None) or torch.equal(a, b)
    bad = [g.clone() for g in grads]
    bad[3][2, 1] = float("nan")
    head = _run(p0, bad[:3], beta1, True)
    skipped = _run(p0, bad[:4], beta1, True, [StepFlags.compute([g]) for g in bad[:4]])
    for a, b in zip(head, skipped):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("shape", [(12, 7), (5, 9), (6, 4, 5), (9,)])
@pytest.mark.parametrize("beta1", [None, 0.9])
def test_two_row_shards_equal_the_whole_tensor(shape, beta1):
    """Two threads stand in for two ranks; ``reduce`` sums their buffers."""
    p0, grads = _data(shape=shape)
    whole = _run(p0, grads, beta1, True)[0]
    d = factored_dims(shape)
    chunk = -(-shape[0] // 2)
    barrier = threading.Barrier(2)
    slots: list[torch.Tensor | None] = [None, None]
    out: list[torch.Tensor | None] = [None, None]

    def rank(k: int) -> None:
        rows = slice(k * chunk, (k + 1) * chunk)

        def reduce(x: torch.Tensor) -> torch.Tensor:
            slots[k] = x.clone()
            barrier.wait()
            total = slots[0] + slots[1]  # type: ignore[operator]
            barrier.wait()
            return x.copy_(total)

        p = p0[rows].clone()
        r, c, v, m = _state(p0, beta1, d)
        if d is not None:
            r = r[rows].clone()  # row statistics follow the rows
            c = c.clone() if d[0] == 0 else c[rows].clone()
        else:
            v = v[rows].clone()
        m = m[rows].clone() if m is not None else None
        step = torch.tensor(0.0)
        for g in grads:
            b2, rho = step_sizes([step], **SCHED)
            adafactor_([p], [g[rows]], [r], [c], [v], [m], [d], beta2s=b2, rhos=rho,
                       beta1=beta1, scale_parameter=True, full_shapes=[shape], reduce=reduce,
                       **HP)
        out[k] = p

    threads = [threading.Thread(target=rank, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.testing.assert_close(torch.cat(out), whole, rtol=1e-5, atol=1e-7)  # type: ignore[arg-type]
