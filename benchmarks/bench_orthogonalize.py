"""Muon orthogonalisation: matrixopt.linalg.orthogonalize vs torch.optim.Muon, heavyball,
pytorch-optimizer.

Parameter set: a GPT-2-small block shape set, 4 layers of d = 768 --
768×2304 (attn.c_attn), 768×768 (attn.c_proj), 768×3072 (mlp.c_fc),
3072×768 (mlp.c_proj) -- i.e. 16 matrices, 4 of each shape.

Methods (each called the way its optimizer calls it):

* torch.optim.Muon        ``torch.optim._muon._zeropower_via_newtonschulz`` per
                          matrix (bf16, Keller's (3.4445, −4.7750, 2.0315), 5 steps)
                          -- the baseline of the "× torch" column;
* heavyball               ``heavyball.utils.zeropower_via_newtonschulz5`` per
                          matrix (bf16 with stochastic rounding, You's 5 quintics),
                          run eagerly (heavyball wraps it in torch.compile with
                          mode "max-autotune-no-cudagraphs"; compiling that on this
                          CPU is not what is being compared);
* pytorch-optimizer       ``zero_power_via_newton_schulz_5`` from
                          ``pytorch_optimizer.optimizer.utils.matrix``
                          on each same-shape stack (its foreach Muon path; bf16,
                          'original' = Keller's coefficients, 5 steps);
* matrixopt ...           ``orthogonalize`` on each same-shape stack (one batched
                          call per shape, as matrixopt.optim.Muon does), iteration
                          in bf16, with the configurations listed in CONFIGS.

Quality, per matrix G = U S Vᵀ (float64 SVD), over the r input singular values
σᵢ ≥ 1e-3·σ_max:

* ``max|σ−1|``  = max over the r largest singular values of the output of |σ − 1|
  (the issue's metric);
* ``max|uᵀOv−1|`` = max over i ≤ r of |uᵢᵀ O vᵢ − 1|: how the i-th input direction
  is mapped. For polynomial methods both agree; the second also catches a method
  whose output is orthogonal but not aligned with G (AOL scaling changes the target).

The table reports the worst matrix of the set. Spectra:

* ``loguniform``  σ = 10^(−4t), t uniform on [0, 1] (so a quarter of them lies below
  the 1e-3 cut), Haar-random singular vectors;
* ``lowrank+noise`` 32 signal directions with σᵢ = 1/i plus Gaussian noise of
  spectral norm ≈ 0.02 (a noise bulk of σ ∈ [0.005, 0.02], all counted);
* ``gpt2_grad``   the 16 weight gradients of a 4-layer GPT-2-small-shaped model
  (transformers GPT2LMHeadModel with a 256-byte vocabulary, random init, 3 AdamW
  steps, batches of 4×128 bytes of Python's own source files as tokens) -- real,
  very low-rank early-training gradient spectra; needs transformers.

GFLOP: matrix-product flops of one call on the set (exact, load-independent).
Times: torch.utils.benchmark median (benchmarks/_common.median_time) of one
orthogonalisation of the whole set, torch threads fixed (default 2). Time does not
depend on the spectrum, so it is measured once per method, in round-robin rounds
(``--rounds``, default 3) so that load from other processes affects all methods
alike; the table gives the median over rounds (the CSV also the fastest round).

* matrixopt ... (per matrix) ``orthogonalize`` called once per matrix (``PER_MATRIX``),
                          as a user calls the standalone function and as torch calls
                          its iteration: the per-call overhead is measured here.

Run:  python benchmarks/bench_orthogonalize.py           (4 layers, 3 spectra)
      python benchmarks/bench_orthogonalize.py --per-call --threads 1 --rounds 5
                                                         (per-call rows only; add --cpu-time
                                                         on a loaded machine)
      python benchmarks/bench_orthogonalize.py --quick   (1 layer, 2 spectra, short timing)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import machine_description, median_time, print_table, write_csv  # noqa: E402
from matrixopt.linalg.coefficients import (  # noqa: E402
    polar_express_coefficients,
    resolve_coefficients,
)
from matrixopt.linalg.orthogonalization import (  # noqa: E402
    orthogonalize,
    orthogonalize_flops,
    resolve_method,
)

SHAPES: list[tuple[int, int]] = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]
KELLER = (3.4445, -4.7750, 2.0315)
BF16 = torch.bfloat16

Params = dict[tuple[int, int], torch.Tensor]  # shape -> [layers, m, n] float32

# matrixopt configurations: name -> keyword arguments of orthogonalize (dtype=bf16 added).
CONFIGS: dict[str, dict[str, Any]] = {
    "matrixopt keller (same math as torch, batched)": dict(coefficients="keller"),
    "matrixopt default (polar_express, frobenius, 5 steps)": dict(),
    "matrixopt spectral, polar_express 4 steps": dict(
        coefficients=polar_express_coefficients(1e-3, 4, safety=1.02, cushion=0.02),
        normalization="spectral", safety=1.02),
    "matrixopt aol, polar_express 4 steps": dict(
        coefficients=polar_express_coefficients(1e-3, 4, safety=1.02, cushion=0.02),
        normalization="aol", safety=1.02),
    "matrixopt nonic (polar_express_nonic, spectral, 3 degree-9 steps)": dict(
        coefficients="polar_express_nonic", normalization="spectral"),
    "matrixopt spectral, polar_express 3 steps": dict(
        coefficients=polar_express_coefficients(1e-3, 3, safety=1.02, cushion=0.02),
        normalization="spectral", safety=1.02),
}


# ------------------------------------------------------------------ spectra
def _haar(m: int, k: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q


def spectrum_loguniform(layers: int, seed: int = 0) -> Params:
    g = torch.Generator().manual_seed(seed)
    out: Params = {}
    for m, n in SHAPES:
        k = min(m, n)
        s = torch.logspace(0, -4, k, dtype=torch.float64)
        out[(m, n)] = torch.stack([((_haar(m, k, g) * s) @ _haar(n, k, g).mT).float()
                                   for _ in range(layers)])
    return out


def spectrum_lowrank_noise(layers: int, seed: int = 1) -> Params:
    g = torch.Generator().manual_seed(seed)
    out: Params = {}
    for m, n in SHAPES:
        mats = []
        for _ in range(layers):
            r = 32
            s = 1.0 / torch.arange(1, r + 1, dtype=torch.float64)
            signal = (_haar(m, r, g) * s) @ _haar(n, r, g).mT
            noise = torch.randn(m, n, generator=g, dtype=torch.float64)
            mats.append((signal + noise * (0.02 / (m**0.5 + n**0.5))).float())
        out[(m, n)] = torch.stack(mats)
    return out


def spectrum_gpt2_grad(layers: int, seed: int = 2) -> Params | None:
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except Exception as e:  # transformers missing or broken
        print(f"[gpt2_grad skipped: transformers does not import: {e}]", flush=True)
        return None
    import os

    torch.manual_seed(seed)
    # byte-level vocabulary: the blocks have GPT-2-small's shapes, the embedding is small
    cfg = GPT2Config(n_layer=layers, n_embd=768, n_head=12, n_positions=128, vocab_size=256,
                     bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    text = b""
    for name in ("argparse.py", "inspect.py", "typing.py", "dataclasses.py"):
        with open(os.path.join(os.path.dirname(os.__file__), name), "rb") as f:
            text += f.read()
    ids = torch.tensor(list(text[: 4 * 4 * 128]), dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = ids.reshape(4, 4, 128)
    for step in range(4):
        model.zero_grad()
        model(input_ids=batches[step], labels=batches[step]).loss.backward()
        if step < 3:
            opt.step()
    names = {(768, 2304): "attn.c_attn", (768, 768): "attn.c_proj",
             (768, 3072): "mlp.c_fc", (3072, 768): "mlp.c_proj"}
    out: Params = {}
    for shape, name in names.items():
        out[shape] = torch.stack([
            model.transformer.h[i].get_submodule(name).weight.grad.detach().clone()
            for i in range(layers)]).float()
        assert tuple(out[shape].shape[-2:]) == shape
    return out


# ------------------------------------------------------------------ methods
def method_torch(params: Params) -> Params:
    from torch.optim._muon import _zeropower_via_newtonschulz

    return {s: torch.stack([_zeropower_via_newtonschulz(G[i], KELLER, 5, 1e-7)
                            for i in range(G.shape[0])]) for s, G in params.items()}


def method_torch_float(params: Params) -> Params:
    """torch's iteration plus the cast back to the input dtype (fp32), which
    ``orthogonalize``'s contract (output dtype = input dtype) includes and torch's
    private function (returns bf16) does not: the same output, side by side."""
    from torch.optim._muon import _zeropower_via_newtonschulz

    return {s: torch.stack([_zeropower_via_newtonschulz(G[i], KELLER, 5, 1e-7).to(G.dtype)
                            for i in range(G.shape[0])]) for s, G in params.items()}


def method_heavyball(params: Params) -> Params:
    import heavyball.utils as hu

    hu.compile_mode = None  # eager (see module docstring)
    return {s: torch.stack([hu.zeropower_via_newtonschulz5(G[i], 5)
                            for i in range(G.shape[0])]) for s, G in params.items()}


def method_pytorch_optimizer(params: Params) -> Params:
    from pytorch_optimizer.optimizer.utils.matrix import zero_power_via_newton_schulz_5

    return {s: zero_power_via_newton_schulz_5(G, num_steps=5, weights="original", dtype=BF16)
            for s, G in params.items()}


def method_matrixopt(kwargs: dict[str, Any]) -> Callable[[Params], Params]:
    def run(params: Params) -> Params:
        return {s: orthogonalize(G, dtype=BF16, **kwargs) for s, G in params.items()}
    return run


def method_matrixopt_per_matrix(kwargs: dict[str, Any]) -> Callable[[Params], Params]:
    """One ``orthogonalize`` call per matrix, as a user calls the standalone function
    (and as torch.optim.Muon calls its iteration): the per-call overhead shows here."""
    def run(params: Params) -> Params:
        return {s: torch.stack([orthogonalize(G[i], dtype=BF16, **kwargs)
                                for i in range(G.shape[0])]) for s, G in params.items()}
    return run


# per-call rows: label -> keyword arguments of orthogonalize (dtype=bf16 added)
PER_MATRIX: dict[str, dict[str, Any]] = {
    "matrixopt keller (per matrix)": dict(coefficients="keller"),
    "matrixopt default (per matrix)": dict(),
}


def method_gflop(label: str, layers: int) -> float:
    """Matrix-product flops of one call on the whole set (data-independent, exact).

    The three peers run 5 standard steps (4k²l + 2k³ each); matrixopt's count is
    :func:`orthogonalize_flops` for the method it resolves to, plus the extra k×k
    product of the spectral normalisation.
    """
    total = 0
    for m, n in SHAPES:
        k = min(m, n)
        if label in CONFIGS or label in PER_MATRIX:
            kw = CONFIGS.get(label) or PER_MATRIX[label]
            sched = resolve_coefficients(kw.get("coefficients", "polar_express"), kw.get("steps"))
            meth = resolve_method(m, n, sched, kw.get("method", "auto"), dtype=BF16)
            f = orthogonalize_flops(m, n, sched, meth)
            f += 2 * k**3 if kw.get("normalization") == "spectral" else 0
        else:
            f = orthogonalize_flops(m, n, 5, "standard")
        total += layers * f
    return total / 1e9


def all_methods(per_call: bool = False) -> dict[str, Callable[[Params], Params]]:
    methods: dict[str, Callable[[Params], Params]] = {"torch.optim.Muon (per matrix)": method_torch}
    if per_call:
        methods["torch.optim.Muon + cast to input dtype (per matrix)"] = method_torch_float
    for label, kw in PER_MATRIX.items():
        methods[label] = method_matrixopt_per_matrix(kw)
    if per_call:
        return methods
    for label, fn, module in [("heavyball (per matrix, eager)", method_heavyball, "heavyball"),
                              ("pytorch-optimizer (per shape)", method_pytorch_optimizer,
                               "pytorch_optimizer")]:
        try:
            __import__(module)
        except Exception as e:
            print(f"[{label} skipped: {module} does not import: {e}]", flush=True)
            continue
        methods[label] = fn
    for label, kw in CONFIGS.items():
        methods[label] = method_matrixopt(kw)
    return methods


# ------------------------------------------------------------------ quality
def svd_inputs(params: Params) -> dict[tuple[int, int], tuple[torch.Tensor, ...]]:
    return {s: torch.linalg.svd(G.double(), full_matrices=False) for s, G in params.items()}


def quality(svds: dict[tuple[int, int], tuple[torch.Tensor, ...]],
            outs: Params) -> dict[str, float]:
    q_sv = q_dir = 0.0
    for s, (U, S, Vh) in svds.items():
        O = outs[s].double()
        assert O.shape == U.shape[:-1] + Vh.shape[-1:], (s, O.shape)
        so = torch.linalg.svdvals(O)
        d = torch.einsum("bmk,bmn,bkn->bk", U, O, Vh)
        for b in range(S.shape[0]):
            r = int((S[b] >= 1e-3 * S[b, 0]).sum())
            q_sv = max(q_sv, float((so[b, :r] - 1).abs().max()))
            q_dir = max(q_dir, float((d[b, :r] - 1).abs().max()))
    return {"max|σ−1|": q_sv, "max|uᵀOv−1|": q_dir}


def cpu_median_time(fn: Callable[[], Any], min_run_time: float) -> float:
    """Median CPU time of ``fn()`` on the calling thread (``time.thread_time``), seconds.

    With one torch thread all the work runs on the calling thread, so this is
    the time the call costs without the time slices other processes take on a
    shared machine (wall-clock medians of torch.utils.benchmark swing by ±30 %
    at load 5 on 2 cores). Warm-up run first; at least 5 runs.
    """
    fn()
    times: list[float] = []
    while len(times) < 5 or sum(times) < min_run_time:
        t0 = time.thread_time()
        fn()
        times.append(time.thread_time() - t0)
    return statistics.median(times)


# --------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 layer, 2 spectra, short timing")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--min-run-time", type=float, default=None,
                    help="seconds per timing (default 2, quick 0.5)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="round-robin timing rounds (default 3); the median is reported")
    ap.add_argument("--csv", default="bench_orthogonalize", help="results/<name>.csv")
    ap.add_argument("--per-call", action="store_true",
                    help="only the one-call-per-matrix rows: torch.optim.Muon's iteration and "
                         "matrixopt's orthogonalize, same run")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time with the calling thread's CPU time (needs --threads 1) instead of "
                         "torch.utils.benchmark wall-clock medians; for a loaded machine")
    args = ap.parse_args(argv)

    if args.cpu_time and args.threads != 1:
        ap.error("--cpu-time measures the calling thread only: use it with --threads 1")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    layers = 1 if args.quick else 4
    min_run = args.min_run_time if args.min_run_time is not None else (0.5 if args.quick else 2.0)
    print(machine_description(["heavyball", "pytorch-optimizer", "transformers"]))
    print(f"parameter set: {layers} layer(s) × {SHAPES}; iteration dtype bf16; "
          f"threads {args.threads}; timing min_run_time {min_run}s", flush=True)

    spectra: dict[str, Callable[[], Params | None]] = {
        "loguniform": lambda: spectrum_loguniform(layers),
        "lowrank+noise": lambda: spectrum_lowrank_noise(layers),
    }
    if not args.quick and not args.per_call:
        spectra["gpt2_grad"] = lambda: spectrum_gpt2_grad(layers)

    methods = all_methods(args.per_call)
    # Time does not depend on the data: time every method on one input, in
    # round-robin rounds so that load from other processes hits all methods alike;
    # report the median over rounds of torch.utils.benchmark medians.
    timing_input = spectrum_lowrank_noise(layers)
    per_round: dict[str, list[float]] = {label: [] for label in methods}
    for r in range(args.rounds):
        for label, fn in methods.items():
            call = (lambda fn=fn: fn(timing_input))
            per_round[label].append(
                cpu_median_time(call, min_run) if args.cpu_time else
                median_time(call, min_run_time=min_run, num_threads=args.threads))
        print(f"  timing round {r + 1}/{args.rounds}: " + ", ".join(
            f"{label.split(' (')[0]} {1e3 * ts[-1]:.0f} ms" for label, ts in per_round.items()),
            flush=True)
    times = {label: statistics.median(ts) for label, ts in per_round.items()}
    rows: list[dict[str, Any]] = []
    for spec_name, make in spectra.items():
        params = make()
        if params is None:
            continue
        svds = svd_inputs(params)
        for label, fn in methods.items():
            q = quality(svds, fn(params))
            rows.append({"spectrum": spec_name, "method": label,
                         "GFLOP": method_gflop(label, layers),
                         "time_ms": 1e3 * times[label],
                         "time_ms_min_round": 1e3 * min(per_round[label]), **q})
            print(f"  {spec_name:14s} {label:55s} {1e3 * times[label]:9.1f} ms  "
                  f"max|σ−1| {q['max|σ−1|']:.3f}  max|uᵀOv−1| {q['max|uᵀOv−1|']:.3f}", flush=True)
    base = times["torch.optim.Muon (per matrix)"]
    for r in rows:
        r["× torch time"] = r["time_ms"] / (1e3 * base)
    print_table(rows, ["spectrum", "method", "GFLOP", "time_ms", "× torch time", "max|σ−1|",
                       "max|uᵀOv−1|"],
                title=f"orthogonalize, GPT-2-small parameter set ({layers} layer(s)), "
                      f"{args.threads} threads; quality over σ ≥ 1e-3·σ_max (worst matrix)")
    path = write_csv(rows, args.csv)
    print(f"\nCSV: {path}")
    return rows


if __name__ == "__main__":
    main()
