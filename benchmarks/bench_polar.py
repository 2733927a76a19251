"""Accurate polar decomposition: matrixopt.linalg.polar vs scipy.linalg.polar vs a plain torch SVD.

Inputs: A = W diag(s) Vᵀ with Haar-random W, V and singular values log-spaced
from 1 down to 1/κ, in float32 (the optimizer dtype), square n×n and one tall
shape per size.

Methods:
  * matrixopt svd / newton_schulz / auto   ``polar(A, method=...)``
  * scipy.linalg.polar                     on the float32 numpy array (LAPACK gesdd)
  * torch SVD route                        W, S, Vh = torch.linalg.svd(A); U = W Vh;
                                           H = Vhᵀ diag(S) Vh (what one writes by hand)

Errors (computed in float64): orthogonality ‖UᵀU − I‖_F, reconstruction
‖UH − A‖_F/‖A‖_F, and distance to the float64 polar factor ‖U − U₆₄‖_F.
Times: torch.utils.benchmark median (benchmarks/_common.median_time).

Run:  python benchmarks/bench_polar.py          (n = 256, 512, 1024, 2048; κ = 1, 1e3)
      python benchmarks/bench_polar.py --threads 1   (steadier on a shared machine)
      python benchmarks/bench_polar.py --quick  (n = 256, 512; κ = 1e3)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (  # noqa: E402
    machine_description,
    median_time,
    print_table,
    write_csv,
)
from matrixopt.linalg._reference import polar_reference  # noqa: E402
from matrixopt.linalg.polar_decomposition import polar  # noqa: E402


def make_input(m: int, n: int, kappa: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    W = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    s = torch.logspace(0, -float(np.log10(kappa)), k, dtype=torch.float64)
    return ((W * s) @ V.mT).float()


def torch_svd_route(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    W, S, Vh = torch.linalg.svd(A, full_matrices=False)
    return W @ Vh, (Vh.mT * S) @ Vh


def scipy_polar(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    import scipy.linalg

    u, p = scipy.linalg.polar(A.numpy())
    return torch.from_numpy(u), torch.from_numpy(p)


def errors(A: torch.Tensor, U: torch.Tensor, H: torch.Tensor,
           U64: torch.Tensor) -> dict[str, float]:
    Ad, Ud, Hd = A.double(), U.double(), H.double()
    k = min(A.shape)
    gram = Ud.mT @ Ud if A.shape[0] >= A.shape[1] else Ud @ Ud.mT
    return {
        "orth_err": float(torch.linalg.matrix_norm(gram - torch.eye(k, dtype=torch.float64))),
        "recon_err": float(torch.linalg.matrix_norm(Ud @ Hd - Ad) / torch.linalg.matrix_norm(Ad)),
        "dist_to_f64": float(torch.linalg.matrix_norm(Ud - U64)),
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048])
    ap.add_argument("--kappas", type=float, nargs="+", default=[1.0, 1e3])
    ap.add_argument("--tall", action=argparse.BooleanOptionalAction, default=True,
                    help="also run a tall n×(n/4) input per size")
    ap.add_argument("--min-run-time", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's default, all cores)")
    ap.add_argument("--quick", action="store_true", help="n = 256, 512; kappa = 1e3; no tall")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.kappas, args.tall, args.min_run_time = [256, 512], [1e3], False, 0.2
    if args.threads:
        torch.set_num_threads(args.threads)
    # scipy.linalg uses its own OpenBLAS, which reads its thread count when
    # scipy.linalg is first imported: give it the same number of threads as torch.
    if "scipy.linalg" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", str(torch.get_num_threads()))
    print(machine_description(["scipy", "numpy"]))
    print(f"threads: torch {torch.get_num_threads()}, scipy OpenBLAS "
          f"{os.environ.get('OPENBLAS_NUM_THREADS', 'default')}")

    methods: dict[str, Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = {
        "matrixopt svd": lambda A: tuple(polar(A, method="svd")),
        "matrixopt newton_schulz": lambda A: tuple(polar(A, method="newton_schulz")),
        "matrixopt auto": lambda A: tuple(polar(A, method="auto")),
        "torch SVD route": torch_svd_route,
        "scipy.linalg.polar": scipy_polar,
    }
    warm = make_input(64, 48, 10.0, 0)
    for fn in methods.values():  # first-call initialisation (LAPACK workspaces, scipy import)
        fn(warm)
        fn(warm.mT.contiguous())
    shapes = [(n, n) for n in args.sizes] + ([(n, n // 4) for n in args.sizes] if args.tall else [])
    rows: list[dict[str, Any]] = []
    for (m, n) in shapes:
        for kappa in args.kappas:
            A = make_input(m, n, kappa, seed=m + n)
            U64, _ = polar_reference(A)
            base = None
            for name, fn in methods.items():
                U, H = fn(A)
                t = median_time(lambda fn=fn, A=A: fn(A), min_run_time=args.min_run_time)
                if name == "scipy.linalg.polar":
                    base = t
                rows.append({"shape": f"{m}x{n}", "kappa": kappa, "method": name, "time_s": t,
                             **errors(A, U, H, U64)})
                print(f"  {m}x{n} kappa={kappa:g} {name}: {t:.4f}s", flush=True)
            for r in rows:
                if r["shape"] == f"{m}x{n}" and r["kappa"] == kappa and base:
                    r["time_vs_scipy"] = r["time_s"] / base
    print_table(rows, ["shape", "kappa", "method", "time_s", "time_vs_scipy", "orth_err",
                       "recon_err", "dist_to_f64"],
                title=f"polar, float32, {torch.get_num_threads()} threads")
    path = write_csv(rows, "bench_polar" + ("_quick" if args.quick else ""))
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
