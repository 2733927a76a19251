"""Triton kernels vs. torch (cuBLAS) for the orthogonalisation hot path.

With a CUDA GPU: times ``gram`` (X Xᵀ), ``sym_poly`` (b·A + c·A²) and
``poly_step`` (a·X + B·X, and the right-multiplied a·X + X·B for tall
matrices) from :mod:`matrixopt.kernels.triton_ops` against their torch
references (``torch.matmul`` / ``torch.baddbmm``, i.e. cuBLAS) with
``triton.testing.do_bench``, for short sides 1024–8192 and aspect ratios 1–4,
and reports effective TFLOP/s = nominal flops / time (nominal: ``2 m² n`` for
the Gram product although the triangular kernel performs about half of them).
Then times a full 5-step bfloat16 ``orthogonalize`` of a 4096×4096 matrix with
``backend="triton"`` and ``backend="torch"``.

Without a GPU there is nothing meaningful to time: the script says so and runs
the interpreter correctness pass instead (``TRITON_INTERPRET=1``): for each
kernel and dtype, the max error against float64 next to the torch reference's
own error.

    python benchmarks/bench_kernels.py                  # GPU timings, or CPU correctness pass
    python benchmarks/bench_kernels.py --sizes 4096 --aspects 1 --csv
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_description, print_table, write_csv  # noqa: E402

from matrixopt.kernels import reference as ref  # noqa: E402

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Keller Jordan's Muon coefficients: the magnitudes a real step sees.
_A, _B, _C = 3.4445, -4.7750, 2.0315


def _sym(k: int, dtype: torch.dtype, device: str,
         gen: torch.Generator | None = None) -> torch.Tensor:
    """Symmetric PSD ``k×k`` matrix, spectral norm <= 1, like ``X Xᵀ`` in a Newton–Schulz step."""
    Y = torch.randn(k, k, generator=gen, device=device, dtype=torch.float32)
    A = Y @ Y.mT
    A = A / torch.linalg.matrix_norm(A, ord=2)
    return ((A + A.mT) / 2).to(dtype)


def _cases(m: int, n: int, dtype: torch.dtype, device: str,
           gen: torch.Generator | None = None) -> list[tuple[str, int, int, float, Callable]]:
    """(kernel name, rows, cols, nominal flops, fn(ops) -> Tensor) for one shape."""
    X = torch.randn(m, n, generator=gen, device=device, dtype=torch.float32)
    X = (X / X.norm()).to(dtype)
    Xt = X.mT.contiguous()  # tall n×m
    A = _sym(m, dtype, device, gen)
    Bl = (_B * A).to(dtype)
    Br = (_B * _sym(m, dtype, device, gen)).to(dtype)
    return [
        ("gram", m, n, 2.0 * m * m * n, lambda o: o.gram(X)),
        ("sym_poly", m, m, 2.0 * m ** 3, lambda o: o.sym_poly(A, _B, _C)),
        ("poly_step", m, n, 2.0 * m * m * n, lambda o: o.poly_step(X, Bl, _A)),
        ("poly_step_right", n, m, 2.0 * n * m * m, lambda o: o.poly_step(Xt, Br, _A, right=True)),
    ]


def _gpu_kernels(sizes: Sequence[int], aspects: Sequence[int], dtype: torch.dtype,
                 warmup: int, rep: int) -> list[dict[str, Any]]:
    import triton.testing

    from matrixopt.kernels import triton_ops as tops

    rows = []
    for m in sizes:
        for r in aspects:
            for name, rr, cc, flops, fn in _cases(m, m * r, dtype, "cuda"):
                t_torch = triton.testing.do_bench(lambda fn=fn: fn(ref), warmup=warmup, rep=rep)
                fn(tops)  # autotune outside the timed region
                t_triton = triton.testing.do_bench(lambda fn=fn: fn(tops), warmup=warmup, rep=rep)
                rows.append({
                    "kernel": name, "shape": f"{rr}x{cc}",
                    "dtype": str(dtype).removeprefix("torch."),
                    "torch_ms": t_torch, "triton_ms": t_triton,
                    "torch_TFLOPs": flops / t_torch / 1e9,  # flops / (ms·1e-3) / 1e12
                    "triton_eff_TFLOPs": flops / t_triton / 1e9,
                    "speedup": t_torch / t_triton,
                    "dispatch": tops.should_dispatch(min(rr, cc), max(rr, cc), dtype),
                })
                torch.cuda.empty_cache()
    return rows


def _gpu_orthogonalize(n: int, steps: int, warmup: int, rep: int) -> list[dict[str, Any]]:
    import triton.testing

    try:
        from matrixopt.linalg import orthogonalize
    except ImportError as e:
        print(f"matrixopt.linalg.orthogonalize not importable ({e}); skipping full timings")
        return []
    G = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    rows = []
    for backend in ("torch", "triton"):
        try:
            orthogonalize(G, steps=steps, backend=backend)
        except TypeError as e:  # no backend argument (yet)
            print(f"orthogonalize(..., backend={backend!r}) unsupported ({e}); skipping")
            continue
        ms = triton.testing.do_bench(
            lambda backend=backend: orthogonalize(G, steps=steps, backend=backend),
            warmup=warmup, rep=rep)
        rows.append({"op": f"orthogonalize {n}x{n} bf16, {steps} steps", "backend": backend,
                     "ms": ms})
    return rows


def _interpreter_pass(seed: int) -> list[dict[str, Any]]:
    """Max error vs float64 of each kernel and of its torch reference, under the interpreter."""
    os.environ["TRITON_INTERPRET"] = "1"  # read by the launchers at each call
    from matrixopt.kernels import triton_ops as tops

    rows = []
    for dname, dtype in _DTYPES.items():
        gen = torch.Generator().manual_seed(seed)
        for name, rr, cc, _flops, fn in _cases(40, 72, dtype, "cpu", gen):
            out, torch_out, exact = fn(tops), fn(ref), fn(_F64Ops())
            err_k = (out.double() - exact).abs().max().item()
            err_t = (torch_out.double() - exact).abs().max().item()
            rows.append({"kernel": name, "shape": f"{rr}x{cc}", "dtype": dname,
                         "triton_err": err_k, "torch_err": err_t,
                         "ratio": err_k / err_t if err_t > 0 else float("nan"),
                         "ok (<= 2x + 4 ulp)": err_k <= 2 * err_t
                         + 4 * torch.finfo(dtype).eps * exact.abs().max().item()})
    return rows


class _F64Ops:
    """The reference ops evaluated in float64 on float64 copies of the inputs."""

    def gram(self, X: torch.Tensor, *, transpose: bool = False) -> torch.Tensor:
        return ref.gram(X.double(), transpose=transpose)

    def sym_poly(self, A: torch.Tensor, b: float, c: float) -> torch.Tensor:
        return ref.sym_poly(A.double(), b, c)

    def poly_step(self, X: torch.Tensor, B: torch.Tensor, a: float, *,
                  right: bool = False) -> torch.Tensor:
        return ref.poly_step(X.double(), B.double(), a, right=right)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192],
                   help="short side m of the m×(r·m) matrices (GPU)")
    p.add_argument("--aspects", type=int, nargs="+", default=[1, 2, 4],
                   help="aspect ratios r (GPU)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16", help="GPU timing dtype")
    p.add_argument("--ortho-size", type=int, default=4096)
    p.add_argument("--ortho-steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up (ms)")
    p.add_argument("--rep", type=int, default=100, help="do_bench measurement time (ms)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--csv", action="store_true", help="also write results/bench_kernels*.csv")
    args = p.parse_args(argv)

    try:
        import triton  # noqa: F401
    except ImportError:
        print("triton is not installed (pip install triton); nothing to run")
        return []
    print(machine_description(["triton"]))

    if not torch.cuda.is_available():
        print("\nbench_kernels needs a CUDA GPU for timings; none found. Running the "
              "interpreter correctness pass instead (TRITON_INTERPRET=1): max |error| vs "
              "float64 of each Triton kernel next to the torch reference's.")
        rows = _interpreter_pass(args.seed)
        print_table(rows, title="Interpreter correctness pass (CPU, no timings)")
        if args.csv:
            print(f"wrote {write_csv(rows, 'bench_kernels_interpreter')}")
        return rows

    torch.manual_seed(args.seed)
    rows = _gpu_kernels(args.sizes, args.aspects, _DTYPES[args.dtype], args.warmup, args.rep)
    print_table(rows, title="Kernels: torch (cuBLAS) vs Triton, do_bench median ms")
    ortho = _gpu_orthogonalize(args.ortho_size, args.ortho_steps, args.warmup, args.rep)
    if ortho:
        print_table(ortho, title="Full orthogonalize")
    if args.csv:
        print(f"wrote {write_csv(rows, 'bench_kernels')}")
        if ortho:
            print(f"wrote {write_csv(ortho, 'bench_kernels_orthogonalize')}")
    return rows + ortho


if __name__ == "__main__":
    main()
