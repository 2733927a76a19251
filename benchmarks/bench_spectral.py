"""spectral_cap vs one orthogonalize call (time ratio) and vs exact SVD clipping (quality).

For each shape (a batch of ``--batch`` matrices) and dtype: the time of
``matrixopt.linalg.orthogonalize`` (its defaults: ``polar_express``, 5 steps,
iteration in the input dtype), of ``spectral_cap`` (hard and soft) and of the exact
reference (``torch.linalg.svd``, clip, recompose; float32), all on the same input:
singular values log-spaced over κ = 1e4 with σ_max = 2·max_sv, Haar singular
vectors. Times: median CPU time of the calling thread (``time.thread_time``, one
torch thread, so other processes' load does not count), methods interleaved
round-robin over ``--rounds``, median of rounds. Quality against the float64 SVD
clip: ``over`` = max σ_out/max_sv − 1 (the cap's target: ≤ 1e-4 fp32, ≤ 1e-2 bf16),
``err`` = max |σ_out − min(σ, max_sv)| / max(min(σ, max_sv), 0.05·max_sv).

    python benchmarks/bench_spectral.py                  # results/spectral.csv
    python benchmarks/bench_spectral.py --quick
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_description, print_table, write_csv  # noqa: E402

from matrixopt.linalg import orthogonalize, spectral_cap  # noqa: E402


def cpu_time(fn: Callable[[], Any], min_run_time: float) -> float:
    fn()
    times: list[float] = []
    while len(times) < 3 or sum(times) < min_run_time:
        t0 = time.thread_time()
        fn()
        times.append(time.thread_time() - t0)
    return statistics.median(times)


def spectrum_matrices(b: int, m: int, n: int, smax: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    out = []
    for _ in range(b):
        U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
        V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
        s = torch.logspace(0, -4, k, dtype=torch.float64) * smax
        out.append((U * s) @ V.T)
    return torch.stack(out)


def svd_clip(W: torch.Tensor, cap: float) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)
    return ((U * S.clamp(max=cap).unsqueeze(-2)) @ Vh).to(W.dtype)


def quality(out: torch.Tensor, W64: torch.Tensor, cap: float) -> tuple[float, float]:
    sv = torch.linalg.svdvals(out.double())
    ref = torch.linalg.svdvals(W64).clamp(max=cap)
    over = float(sv.max() / cap - 1)
    err = float(((sv - ref).abs() / ref.clamp(min=0.05 * cap)).max())
    return over, err


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-run-time", type=float, default=0.5)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    shapes = [(256, 256), (512, 512)] if args.quick else [(512, 512), (768, 768), (768, 3072)]
    cap = 1.0
    rows = []
    for m, n in shapes:
        W64 = spectrum_matrices(args.batch, m, n, 2 * cap)
        for dtype in (torch.float32, torch.bfloat16):
            W = W64.to(dtype)
            methods: dict[str, Callable[[], torch.Tensor]] = {
                "orthogonalize": lambda W=W: orthogonalize(W),
                "spectral_cap": lambda W=W: spectral_cap(W, cap),
                "spectral_cap soft": lambda W=W: spectral_cap(W, cap, soft=True),
                "svd clip (fp32)": lambda W=W: svd_clip(W, cap),
            }
            times: dict[str, list[float]] = {k: [] for k in methods}
            for _ in range(args.rounds):
                for k, fn in methods.items():
                    times[k].append(cpu_time(fn, args.min_run_time))
            t_orth = statistics.median(times["orthogonalize"])
            for k, fn in methods.items():
                t = statistics.median(times[k])
                over, err = quality(fn(), W64, cap) if k != "orthogonalize" else (math.nan,
                                                                                  math.nan)
                rows.append({"shape": f"{args.batch}x{m}x{n}", "dtype": str(dtype)[6:],
                             "method": k, "ms": 1e3 * t, "x orthogonalize": t / t_orth,
                             "over": over, "err": err})
    print(machine_description())
    print_table(rows)
    write_csv(rows, "spectral")
    return rows


if __name__ == "__main__":
    main()
