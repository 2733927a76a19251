"""Low-memory optimizers side by side: matrixopt GaLoreAdamW / GaLoreAdafactor / Adafactor
against galore-torch's GaLoreAdamW, torch.optim.Adafactor and torch.optim.AdamW.

One run, same machine, on the GPT of ``examples/gpt.py`` (character-level, the
CPython help-topic corpus):

* **optimizer state** (MB and ratio to AdamW), counted from the tensors in
  ``optimizer.state`` — for galore-torch also the tensors inside the Python
  ``GaLoreProjector`` object it keeps there (its basis);
* **peak step memory**: the largest amount of memory torch's CPU allocator
  holds above what existed before the steps (parameters, gradients, state),
  over a window of ``gap`` steps (so one refresh of every matrix is inside),
  from the allocation events of ``torch.profiler(profile_memory=True)``
  (tracemalloc does not see torch's CPU allocations). Workspaces that
  LAPACK/BLAS allocate themselves (inside SVD/QR) are not counted;
* **amortised step time**: wall time and CPU time (``time.process_time``; the
  load-robust one when other processes share the cores) of ``gap`` consecutive
  steps on fixed real gradients divided by ``gap``, so every matrix refreshes its basis exactly once
  inside the window (galore-torch refreshes all at one step, matrixopt
  staggers them), at ``d_model`` (default 512, the issue's target size);
* **validation loss** after ``--steps`` training steps of a smaller GPT
  (``--loss-d-model``), same initialisation, data order and lr schedule for
  every optimizer; GaLore rows use rank ``d/4`` and the same gap.

    python benchmarks/bench_lowrank.py            # full run (several minutes on 2 cores)
    python benchmarks/bench_lowrank.py --quick    # smoke run
    python benchmarks/bench_lowrank.py --split    # lowrank_split / nystrom at 4096×11008 only

``--split`` times :func:`matrixopt.linalg.lowrank_split` (rsvd, nystrom) at rank
64 on LLaMA-7B-shaped 4096×11008 matrices against ``torch.linalg.svd`` (the
exact truncation PiSSA uses) and ``torch.svd_lowrank`` (PEFT's
``pissa_niter_K``), with each one's reconstruction error as a multiple of the
optimal rank-64 error (from the full SVD's singular values), on synthetic
matrices with two spectra (no pretrained weights are downloaded): ``bulk``, a
Gaussian bulk with a 1/i head (heavy-tailed, like trained weights: the tail
holds most of the energy) and ``decay``, σ_i = 0.98^i (where the choice of
method matters).
"""


from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))
from gpt import GPT, CharData, GPTConfig  # noqa: E402

from benchmarks._common import (  # noqa: E402
    hidden_matrices,
    machine_description,
    print_table,
    quiet_import,
    write_csv,
)
from matrixopt.optim.adafactor import Adafactor  # noqa: E402
from matrixopt.optim.galore import GaLoreAdafactor, GaLoreAdamW  # noqa: E402

ALL = ["adamw", "galore_torch", "galore_adamw", "galore_adamw_bf16", "galore_adamw_random",
       "galore_adafactor", "adafactor_torch", "adafactor", "adafactor_modern"]


# --------------------------------------------------------------------------- peers
def _import_galore_torch() -> Any:
    """galore_torch imports bitsandbytes, which logs and warns about missing GPU kernels."""
    return quiet_import("galore_torch")


# ------------------------------------------------------------------------ builders
def _split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Hidden-layer matrices (GaLore) and everything else (embeddings, head, norms)."""
    return hidden_matrices(model)


def build(name: str, model: nn.Module, args: argparse.Namespace, gap: int) -> torch.optim.Optimizer:
    """Each optimizer configured as a user would, with the same rank/gap/scale for GaLore."""
    mats, rest = _split(model)
    d = model.cfg.d_model  # type: ignore[union-attr]
    rank = max(1, d // args.rank_div)
    lr, wd, betas = args.lr, args.weight_decay, (0.9, 0.95)
    lr_g = args.galore_lr
    galore_keys = {"rank": rank, "update_proj_gap": gap, "scale": args.scale, "proj_type": "std",
                   "lr": lr_g}
    rest_g = {"params": rest, "lr": lr}  # embeddings, head, norms: AdamW's lr
    if name == "adamw":
        return torch.optim.AdamW([{"params": mats}, {"params": rest}], lr=lr, betas=betas,
                                 weight_decay=wd)
    if name == "galore_torch":
        gt = _import_galore_torch()
        if gt is None:
            raise RuntimeError("galore_torch is not installed (pip install galore-torch)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return gt.GaLoreAdamW([rest_g, {"params": mats, **galore_keys}], lr=lr,
                                  betas=betas, eps=1e-8, weight_decay=wd)
    if name == "galore_adamw":
        return GaLoreAdamW([rest_g, {"params": mats, **galore_keys}], lr=lr,
                           betas=betas, weight_decay=wd)
    if name == "galore_adamw_bf16":
        return GaLoreAdamW([rest_g, {"params": mats, **galore_keys,
                                     "proj_dtype": torch.bfloat16}],
                           lr=lr, betas=betas, weight_decay=wd)
    if name == "galore_adamw_random":
        return GaLoreAdamW([rest_g, {"params": mats, **galore_keys, "projector": "random",
                                     "residual": "apollo"}],
                           lr=lr, betas=betas, weight_decay=wd)
    if name == "galore_adafactor":
        af_keys = {**galore_keys, "lr": args.adafactor_lr / args.scale}
        return GaLoreAdafactor([{"params": rest}, {"params": mats, **af_keys}],
                               lr=args.adafactor_lr, relative_step=False, scale_parameter=False,
                               beta1=0.9, weight_decay=wd, beta2_cap=0.999)
    if name == "adafactor_torch":
        return torch.optim.Adafactor(model.parameters(), lr=1e-2)
    if name == "adafactor":  # the same configuration as torch.optim.Adafactor(lr=1e-2)
        return Adafactor(model.parameters())
    if name == "adafactor_modern":  # fixed lr, momentum in bf16, beta2 cap (big_vision style)
        return Adafactor(model.parameters(), lr=lr, relative_step=False, scale_parameter=False,
                         beta1=0.9, beta2_cap=0.999, momentum_dtype=torch.bfloat16,
                         weight_decay=wd)
    raise ValueError(f"unknown optimizer {name!r}; choose from {ALL}")


# ------------------------------------------------------------------------ measures
def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor reachable from the optimizer state (one level into objects)."""
    seen: set[int] = set()
    total = 0

    def add(t: Any) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
        elif isinstance(t, (list, tuple)):
            for x in t:
                add(x)

    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor) or isinstance(v, (list, tuple)):
                add(v)
            elif hasattr(v, "__dict__"):  # galore-torch's GaLoreProjector
                for x in vars(v).values():
                    add(x)
    return total


def _allocation_peak(fn: Callable[[], None]) -> int:
    """Peak of (bytes allocated − bytes freed) by torch's CPU allocator while ``fn`` runs.

    From the allocation events of ``torch.profiler`` (``profile_memory=True``),
    in time order; the count starts at 0, so it is the extra memory of the steps
    above what existed before (parameters, gradients, state). Memory that
    LAPACK/BLAS allocate themselves (SVD/QR workspaces) is not included.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes: list[tuple[int, int]] = []

    def walk(node: Any) -> None:
        if node.tag == _EventType.Allocation:
            sizes.append((node.start_time_ns, node.extra_fields.alloc_size))
        for c in node.children:
            walk(c)

    for root in prof.profiler.kineto_results.experimental_event_tree():  # type: ignore[union-attr]
        walk(root)
    sizes.sort()
    peak = cur = 0
    for _, s in sizes:
        cur += s
        peak = max(peak, cur)
    return peak


def _timing_model(args: argparse.Namespace) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=96, seq_len=args.seq_len, n_layer=args.n_layer,
                    d_model=args.d_model, n_head=max(1, args.d_model // 64))
    model = GPT(cfg)
    x = torch.randint(0, 96, (args.batch_size, args.seq_len),
                      generator=torch.Generator().manual_seed(0))
    model(x, x).backward()  # real gradients, reused for every step
    return model


def step_time(name: str, args: argparse.Namespace) -> tuple[float, float]:
    """Amortised step time (s): ``gap`` consecutive steps (one refresh per matrix) / gap,
    as (wall time, CPU time of the process).

    The CPU time is the load-robust number on a shared machine: wall time also
    counts the time the process waits for a core (and a long GEMM is preempted
    more often than a short one, so wall-time ratios are skewed under load).
    """
    model = _timing_model(args)
    opt = build(name, model, args, args.time_gap)
    for _ in range(args.warmup):  # states created, first (cold) refresh done
        opt.step()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(args.time_gap):
        opt.step()
    return ((time.perf_counter() - t0) / args.time_gap,
            (time.process_time() - c0) / args.time_gap)


def state_and_peak(name: str, args: argparse.Namespace) -> tuple[int, int]:
    """(state bytes, peak step allocation bytes over one gap window)."""
    model = _timing_model(args)
    opt = build(name, model, args, args.time_gap)
    for _ in range(args.warmup):
        opt.step()

    def window() -> None:
        for _ in range(args.time_gap):
            opt.step()

    peak = _allocation_peak(window)
    return state_bytes(opt), peak


def lr_factor(total: int, warmup: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def train_loss(name: str, args: argparse.Namespace, data: CharData) -> dict[str, Any]:
    """Validation loss after ``args.steps`` steps at ``args.loss_d_model``."""
    torch.manual_seed(args.seed)
    cfg = GPTConfig(vocab_size=data.vocab_size, seq_len=args.seq_len, n_layer=args.n_layer,
                    d_model=args.loss_d_model, n_head=max(1, args.loss_d_model // 32))
    model = GPT(cfg)
    opt = build(name, model, args, args.loss_gap)
    sched = None
    if name not in ("adafactor", "adafactor_torch"):  # these use their relative step
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(args.steps, args.steps // 10))
    gen = torch.Generator().manual_seed(args.seed)
    vgen = torch.Generator().manual_seed(args.seed + 1)
    val = [data.batch("val", args.batch_size, args.seq_len, vgen) for _ in range(args.eval_batches)]
    for _ in range(args.steps):
        xb, yb = data.batch("train", args.batch_size, args.seq_len, gen)
        loss = model(xb, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
    model.eval()
    with torch.no_grad():
        v = sum(float(model(xb, yb)) for xb, yb in val) / len(val)
    return {"val_loss": v, "loss_state_bytes": state_bytes(opt)}


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, few steps (smoke run)")
    ap.add_argument("--optimizers", nargs="+", default=ALL, choices=ALL)
    ap.add_argument("--d-model", type=int, default=512, help="width of the timing/memory GPT")
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--time-gap", type=int, default=200,
                    help="update_proj_gap of the timing run (the window is one gap)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2, help="timing windows per optimizer (min)")
    ap.add_argument("--loss-d-model", type=int, default=128)
    ap.add_argument("--steps", type=int, default=600, help="training steps of the loss run")
    ap.add_argument("--loss-gap", type=int, default=100, help="update_proj_gap of the loss run")
    ap.add_argument("--eval-batches", type=int, default=20)
    ap.add_argument("--rank-div", type=int, default=4, help="rank = d_model // rank_div")
    ap.add_argument("--scale", type=float, default=0.25, help="GaLore scale (both libraries)")
    ap.add_argument("--lr", type=float, default=3e-3, help="AdamW lr")
    ap.add_argument("--galore-lr", type=float, default=1.2e-2,
                    help="lr of the GaLore matrices (both libraries; times scale = AdamW's lr); "
                         "the other parameters use --lr")
    ap.add_argument("--adafactor-lr", type=float, default=3e-3, help="GaLoreAdafactor fixed lr")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: stable timings when other processes share the cores)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-loss", action="store_true")
    ap.add_argument("--skip-time", action="store_true")
    ap.add_argument("--split", action="store_true",
                    help="only the lowrank_split benchmark (see the module docstring)")
    ap.add_argument("--split-shape", type=int, nargs=2, default=[4096, 11008])
    ap.add_argument("--split-rank", type=int, default=64)
    ap.add_argument("--split-niter", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--split-spectra", nargs="+", default=["bulk", "decay"],
                    choices=["bulk", "decay"])
    args = ap.parse_args(argv)
    if args.quick:
        args.d_model, args.time_gap, args.loss_d_model = 128, 10, 64
        args.steps, args.loss_gap, args.eval_batches, args.warmup = 40, 10, 4, 2
        args.repeats = 1
    return args


# ------------------------------------------------------------- lowrank_split
def _split_matrix(kind: str, m: int, n: int, seed: int) -> torch.Tensor:
    """Synthetic m×n test matrix (float32) with a known kind of spectrum, built without
    an SVD: nearly orthogonal random Gaussian singular vectors."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n, 1024)
    a = torch.randn(m, k, generator=g) / math.sqrt(m)
    b = torch.randn(k, n, generator=g) / math.sqrt(n)
    i = torch.arange(1, k + 1, dtype=torch.float32)
    if kind == "bulk":
        return (a * (20.0 / i)) @ b + torch.randn(m, n, generator=g) / math.sqrt(n)
    return (a * 0.98 ** i) @ b + 1e-4 * torch.randn(m, n, generator=g) / math.sqrt(n)


def _timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def split_benchmark(args: argparse.Namespace) -> list[dict[str, Any]]:
    from matrixopt.linalg import lowrank_split
    m, n, r = args.split_shape[0], args.split_shape[1], args.split_rank
    rows: list[dict[str, Any]] = []
    for kind in args.split_spectra:
        W = _split_matrix(kind, m, n, args.seed)
        (U, S, Vh), t_svd, c_svd = _timed(lambda W=W: torch.linalg.svd(W, full_matrices=False))
        best = float(S[r:].square().sum().sqrt())
        del U, Vh
        cases: dict[str, Callable[[], torch.Tensor]] = {
            "torch.svd_lowrank q=r niter=2": lambda W=W: _lowrank_res(W, r, r, 2),
            "torch.svd_lowrank q=r+8 niter=2": lambda W=W: _lowrank_res(W, r, r + 8, 2),
        }
        for q in args.split_niter:
            cases[f"lowrank_split rsvd n_iter={q}"] = (
                lambda q=q, W=W: lowrank_split(W, r, "rsvd", n_iter=q,
                                               check_finite=False).residual)
            cases[f"lowrank_split nystrom n_iter={q}"] = (
                lambda q=q, W=W: lowrank_split(W, r, "nystrom", n_iter=q,
                                               check_finite=False).residual)
        rows.append({"spectrum": kind, "method": "torch.linalg.svd (full)", "wall_s": t_svd,
                     "cpu_s": c_svd, "speedup_vs_svd": 1.0, "error_vs_optimal": 1.0})
        print(rows[-1], flush=True)
        for name, fn in cases.items():
            res, t, c = _timed(fn)
            rows.append({"spectrum": kind, "method": name, "wall_s": t, "cpu_s": c,
                         "speedup_vs_svd": c_svd / c,
                         "error_vs_optimal": float(res.norm()) / best})
            print(rows[-1], flush=True)
    print_table(rows, title=(f"lowrank_split at {m}x{n}, rank {r}, {torch.get_num_threads()} "
                             f"thread(s); speedup = CPU time of the full SVD / CPU time"))
    print(f"wrote {write_csv(rows, 'bench_lowrank_split')}")
    return rows


def _lowrank_res(W: torch.Tensor, r: int, q: int, niter: int) -> torch.Tensor:
    """PEFT's pissa_niter_K path: torch.svd_lowrank, truncated to r, residual W − U S Vᵀ."""
    U, S, V = torch.svd_lowrank(W, q=q, niter=niter)
    U, S, V = U[:, :r], S[:r], V[:, :r]
    return W - (U * S) @ V.T


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.split:
        torch.set_num_threads(args.threads)
        print(machine_description(), flush=True)
        return split_benchmark(args)
    torch.set_num_threads(args.threads)
    print(machine_description(["galore-torch"]), flush=True)
    names = list(args.optimizers)
    if "galore_torch" in names and _import_galore_torch() is None:
        print("galore-torch is not installed: its row is left out", flush=True)
        names.remove("galore_torch")
    rows: list[dict[str, Any]] = []
    timing: dict[str, dict[str, Any]] = {n: {} for n in names}
    if not args.skip_time:
        # round robin, best of `repeats` (other processes on the machine only add time)
        for _ in range(args.repeats):
            for n in names:
                t, c = step_time(n, args)
                timing[n]["step_ms"] = min(timing[n].get("step_ms", math.inf), 1e3 * t)
                timing[n]["step_cpu_ms"] = min(timing[n].get("step_cpu_ms", math.inf), 1e3 * c)
                print(f"  {n:>20}: {1e3 * t:9.2f} ms/step wall, {1e3 * c:9.2f} ms/step CPU "
                      "(amortised)", flush=True)
        for n in names:
            sb, pk = state_and_peak(n, args)
            timing[n].update(state_bytes=sb, peak_step_bytes=pk)
    data = None if args.skip_loss else CharData()
    for n in names:
        row: dict[str, Any] = {"optimizer": n, **timing[n]}
        if data is not None:
            row.update(train_loss(n, args, data))
        rows.append(row)
    ref = next((r for r in rows if r["optimizer"] == "adamw"), None)
    gt = next((r for r in rows if r["optimizer"] == "galore_torch"), None)
    table = []
    for r in rows:
        t: dict[str, Any] = {"optimizer": r["optimizer"]}
        if "state_bytes" in r:
            t["state_MB"] = r["state_bytes"] / 2**20
            if ref is not None:
                t["state_vs_adamw"] = r["state_bytes"] / ref["state_bytes"]
            t["peak_step_MB"] = r["peak_step_bytes"] / 2**20
            t["step_ms"] = r["step_ms"]
            t["step_cpu_ms"] = r["step_cpu_ms"]
            if gt is not None:
                t["time_vs_galore_torch"] = r["step_ms"] / gt["step_ms"]
                t["cpu_vs_galore_torch"] = r["step_cpu_ms"] / gt["step_cpu_ms"]
        if "val_loss" in r:
            t["val_loss"] = r["val_loss"]
            if ref is not None:
                t["loss_vs_adamw"] = r["val_loss"] / ref["val_loss"]
        table.append(t)
    print_table(table, title=(
        f"Low-rank optimizers, GPT {args.n_layer} layers: state/peak/time at d={args.d_model} "
        f"(gap {args.time_gap}, rank d/{args.rank_div}, {torch.get_num_threads()} threads); "
        f"val loss at d={args.loss_d_model} after {args.steps} steps (gap {args.loss_gap})"))
    path = write_csv(rows, "bench_lowrank")
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
