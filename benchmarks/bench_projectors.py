"""GaLore projector refresh: warm subspace iteration vs randomized SVD vs full SVD.

Scenario (issue 2's target): a 4096×4096 gradient, rank 256, on a *drifting*
gradient sequence. G_t = U_t diag(s) V_tᵀ + noise, where U_t, V_t (4096×2r) rotate
a little between refreshes (each step mixes in a random orthogonal component of
relative size ``--drift``), s decays like i^-alpha, and i.i.d. noise sits below the
signal's tail. At each refresh every method computes a rank-r right basis (GaLore
``std`` on a square matrix) of G_t; "warm" starts from its own basis of the
previous refresh.

Methods:
  * galore-torch        GaLoreProjector.get_orthogonal_matrix (a full fp32
                        torch.linalg.svd, what galore-torch does every refresh)
  * torch.svd_lowrank   q = r + 8, niter = 2
  * matrixopt rsvd      lowrank_basis(method="rsvd") (defaults n_iter=2, p=8)
  * matrixopt warm      lowrank_basis(method="warm", previous=...) (default n_iter=1)
  * matrixopt warm q=2  the same with n_iter=2
  * stale               the previous refresh's exact basis, not refreshed (shows the drift)

Metrics: wall time per refresh (median over refreshes after the cold start; the
fast methods are also repeated ``--reps`` times per refresh), and
captured energy ‖G P‖² / Σ_{i≤r} σ_i² (1 = the exact top-r subspace).

Run:  python benchmarks/bench_projectors.py            (4096, rank 256)
      python benchmarks/bench_projectors.py --quick    (1024, rank 64)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import machine_description, print_table, write_csv  # noqa: E402
from matrixopt.linalg.projectors import lowrank_basis  # noqa: E402


def _galore_basis_fn(rank: int):
    """galore-torch's refresh (right basis as Vh, r×n), or None if it is not installed."""
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            from galore_torch.galore_projector import GaLoreProjector
    except Exception:
        return None
    proj = GaLoreProjector(rank=rank, proj_type="std")
    return lambda G: proj.get_orthogonal_matrix(G, rank, type="right").mT


def _rotate(Q: torch.Tensor, drift: float, g: torch.Generator) -> torch.Tensor:
    Z = torch.randn(Q.shape, generator=g)
    Z = Z - Q @ (Q.mT @ Z)
    return torch.linalg.qr(Q + drift * Z / math.sqrt(Q.shape[0])).Q


def _energy(P: torch.Tensor, G: torch.Tensor, best: float) -> float:
    return float((G @ P.to(G.dtype)).square().sum()) / best


def run_scenario(n: int, rank: int, refreshes: int, alpha: float, drift: float,
                 seed: int, reps: int = 3, noise: float = 0.5) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)
    k = 2 * rank
    s = torch.arange(1, k + 1, dtype=torch.float32) ** -alpha
    # i.i.d. noise with spectral norm ~ 2·nu·sqrt(n) = noise × the smallest signal value
    nu = noise * float(s[-1]) / (2 * math.sqrt(n))
    U = torch.linalg.qr(torch.randn(n, k, generator=g)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=g)).Q
    galore = _galore_basis_fn(rank)
    exact_fn = galore or (lambda G: torch.linalg.svd(G, full_matrices=False).Vh[:rank].mT)
    exact_name = "galore-torch (full SVD)" if galore else "torch.linalg.svd (full)"

    methods = {
        "torch.svd_lowrank (q=r+8, niter=2)":
            lambda G, prev: torch.svd_lowrank(G, q=rank + 8, niter=2)[2][:, :rank],
        "matrixopt rsvd": lambda G, prev: lowrank_basis(G, rank, method="rsvd", side="right"),
        "matrixopt warm": lambda G, prev: lowrank_basis(G, rank, method="warm", side="right",
                                                         previous=prev),
        "matrixopt warm n_iter=2": lambda G, prev: lowrank_basis(
            G, rank, method="warm", side="right", previous=prev, n_iter=2),
    }
    prev = {name: None for name in methods}
    times: dict[str, list[float]] = {name: [] for name in [exact_name, *methods]}
    energies: dict[str, list[float]] = {name: [] for name in [exact_name, *methods, "stale"]}
    stale = None
    for t in range(refreshes + 1):
        U, V = _rotate(U, drift, g), _rotate(V, drift, g)
        G = (U * s) @ V.mT + nu * torch.randn(n, n, generator=g)
        t0 = time.perf_counter()
        P_exact = exact_fn(G)
        t_exact = time.perf_counter() - t0
        sig = torch.linalg.svdvals(G).double()  # reference spectrum (values only)
        best = float(sig[:rank].square().sum())
        record = t > 0  # refresh 0 is the cold start: warm has no previous basis yet
        if record:
            times[exact_name].append(t_exact)
            energies[exact_name].append(_energy(P_exact, G, best))
            energies["stale"].append(_energy(stale, G, best))
        for name, fn in methods.items():
            # the cheap methods are repeated (same input, same output) for a stable median
            dts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                P = fn(G, prev[name])
                dts.append(time.perf_counter() - t0)
            dt = statistics.median(dts)
            prev[name] = P
            if record:
                times[name].append(dt)
                energies[name].append(_energy(P, G, best))
        stale = P_exact
        print(f"  [alpha={alpha}] refresh {t}: full SVD {t_exact:.2f}s", flush=True)

    t_ref = statistics.median(times[exact_name])
    rows = []
    for name in [exact_name, *methods, "stale"]:
        tm = statistics.median(times[name]) if name in times else 0.0
        rows.append({
            "spectrum": f"i^-{alpha:g}",
            "method": name,
            "time_s": tm,
            "speedup_vs_full_svd": (t_ref / tm) if tm > 0 else float("nan"),
            "energy_min": min(energies[name]),
            "energy_median": statistics.median(energies[name]),
        })
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=256)
    ap.add_argument("--refreshes", type=int, default=3,
                    help="timed refreshes after the cold start")
    ap.add_argument("--alphas", type=float, nargs="+", default=[1.0, 0.5],
                    help="spectral decay exponents of the signal")
    ap.add_argument("--drift", type=float, default=0.5,
                    help="relative size of the random rotation between refreshes")
    ap.add_argument("--noise", type=float, default=0.5,
                    help="noise spectral norm relative to the smallest signal singular value "
                         "s_2r (values >> 1 bury the rank-r cut in noise; then no sketch "
                         "method reaches 0.99)")
    ap.add_argument("--reps", type=int, default=3,
                    help="repetitions of each fast method per refresh (median)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's default, all cores)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="1024x1024, rank 64, 2 refreshes")
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.rank, args.refreshes = 1024, 64, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_description(["galore-torch"]))
    print(f"n={args.size}, rank={args.rank}, refreshes={args.refreshes}, drift={args.drift}, "
          f"noise={args.noise}, "
          f"threads={torch.get_num_threads()}")
    rows: list[dict[str, Any]] = []
    for alpha in args.alphas:
        rows += run_scenario(args.size, args.rank, args.refreshes, alpha, args.drift, args.seed,
                             args.reps, args.noise)
    print_table(rows, title=f"Projector refresh, {args.size}x{args.size}, rank {args.rank} "
                            f"(fp32, median over {args.refreshes} refreshes)")
    path = write_csv(rows, "bench_projectors" + ("_quick" if args.quick else ""))
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
