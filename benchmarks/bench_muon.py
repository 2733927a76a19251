"""Muon side by side: matrixopt vs torch.optim.Muon (+ torch AdamW) vs heavyball.

Same GPT (examples/gpt.py), same initialisation, same data order, same lr
schedule. Reports the median optimizer-step time, optimizer-state bytes and
train/validation loss after N steps, with ratios to torch.optim.Muon + AdamW.

    python benchmarks/bench_muon.py            # full run (~ several minutes on 2 cores)
    python benchmarks/bench_muon.py --quick    # smoke run
    python benchmarks/bench_muon.py --configs "matrixopt Muon" "matrixopt Muon (auon)" \
        "matrixopt Muon (hybrid_auon)" "matrixopt Muon (racs)"   # the cheap operators

Rows ``matrixopt Muon (auon|hybrid_auon|racs)`` are ``Muon(orthogonalizer=...)``;
``step_time_vs_muon`` is the ratio of median optimizer-step times to
``matrixopt Muon`` (the default Newton–Schulz), and ``--operators`` also times the
operator alone on the GPT's hidden-matrix shapes (median CPU time of ``--repeats``
round-robin calls, ``op_time_vs_ns`` against ``orthogonalize`` with Muon's defaults;
``--configs`` with no names skips the training runs).
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
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_description, print_table, write_csv  # noqa: E402
from gpt import GPT, CharData, GPTConfig  # noqa: E402

from matrixopt.linalg import OPERATORS, auon, hybrid_auon, orthogonalize, racs  # noqa: E402
from matrixopt.optim import Muon, muon_param_groups  # noqa: E402


class Chain:
    """Several optimizers stepped as one (torch.optim.Muon needs AdamW beside it)."""

    def __init__(self, *opts: torch.optim.Optimizer) -> None:
        self.opts = opts

    def step(self) -> None:
        for o in self.opts:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.opts:
            o.zero_grad(set_to_none=set_to_none)

    @property
    def all(self) -> tuple[torch.optim.Optimizer, ...]:
        return self.opts


def _split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Hidden matrices vs the rest, by the same rules for every library."""
    groups = muon_param_groups(model)
    hidden = [p for g in groups if g["algorithm"] == "muon" for p in g["params"]]
    rest = [p for g in groups if g["algorithm"] == "adamw" for p in g["params"]]
    return hidden, rest


def make(name: str, model: nn.Module, lr: float, wd: float) -> Chain:
    hidden, rest = _split(model)
    betas = (0.9, 0.95)
    if name == "matrixopt Muon":
        return Chain(Muon(muon_param_groups(model), lr=lr, weight_decay=wd, betas=betas))
    if name == "matrixopt Muon (keller, matched)":
        return Chain(Muon(muon_param_groups(model), lr=lr, weight_decay=wd, betas=betas,
                          coefficients="keller", ns_steps=5, ns_method="standard"))
    if name == "matrixopt Muon (nonic, 3 steps, spectral)":
        return Chain(Muon(muon_param_groups(model), lr=lr, weight_decay=wd, betas=betas,
                          coefficients="polar_express_nonic", normalization="spectral"))
    if name.startswith("matrixopt Muon (") and name[16:-1] in OPERATORS:
        return Chain(Muon(muon_param_groups(model), lr=lr, weight_decay=wd, betas=betas,
                          orthogonalizer=name[16:-1]))
    if name == "torch Muon + AdamW":
        return Chain(torch.optim.Muon(hidden, lr=lr, weight_decay=wd,
                                      adjust_lr_fn="match_rms_adamw"),
                     torch.optim.AdamW(rest, lr=lr, weight_decay=wd, betas=betas, foreach=True))
    if name == "heavyball Muon + AdamW":
        import heavyball
        return Chain(heavyball.Muon(hidden, lr=lr, weight_decay=wd, compile_step=False),
                     torch.optim.AdamW(rest, lr=lr, weight_decay=wd, betas=betas, foreach=True))
    if name == "torch AdamW":
        return Chain(torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd, betas=betas,
                                       foreach=True))
    raise ValueError(name)


CONFIGS = ["matrixopt Muon", "matrixopt Muon (keller, matched)",
           "matrixopt Muon (nonic, 3 steps, spectral)", "torch Muon + AdamW",
           "heavyball Muon + AdamW", "torch AdamW",
           *[f"matrixopt Muon ({op})" for op in ("auon", "hybrid_auon", "racs")]]


def state_bytes(chain: Chain) -> int:
    total = 0
    for o in chain.all:
        for s in o.state.values():
            for t in s.values():
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
    return total


def schedule(total: int, warmup: int) -> Callable[[int], float]:
    return lambda s: min(1.0, (s + 1) / warmup) * max(0.1, 1 - s / total)


def run(name: str, args: argparse.Namespace, data: CharData) -> dict[str, Any]:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=data.vocab_size, seq_len=args.seq_len, n_layer=args.n_layer,
                    d_model=args.d_model, n_head=max(1, args.d_model // 64))
    model = GPT(cfg)
    chain = make(name, model, args.lr, args.wd)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, schedule(args.steps, 10)) for o in chain.all]
    gen = torch.Generator().manual_seed(0)
    times: list[float] = []
    cpu: list[float] = []
    ema = float("nan")
    for step in range(args.steps):
        x, y = data.batch("train", args.batch_size, args.seq_len, gen)
        loss = model(x, y)
        chain.zero_grad()
        loss.backward()
        t0, c0 = time.perf_counter(), time.process_time()
        chain.step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        for s in scheds:
            s.step()
        ema = float(loss) if step == 0 else 0.9 * ema + 0.1 * float(loss)
    vgen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        val = statistics.fmean(float(model(*data.batch("val", 32, args.seq_len, vgen)))
                               for _ in range(8))
    n_mat = sum(1 for p in _split(model)[0])
    return {"optimizer": name, "matrices": n_mat,
            "step_ms": 1e3 * statistics.median(times[min(3, len(times) - 1):]),
            "step_cpu_ms": 1e3 * statistics.median(cpu[min(3, len(cpu) - 1):]),
            "state_MB": state_bytes(chain) / 2**20, "train_loss": ema, "val_loss": val}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--wd", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--configs", nargs="*", default=CONFIGS, choices=CONFIGS,
                   help="training runs (none: only --operators)")
    p.add_argument("--quick", action="store_true", help="20 steps, d_model 128")
    p.add_argument("--operators", action="store_true",
                   help="also time each orthogonalizer alone (see the module docstring)")
    p.add_argument("--repeats", type=int, default=20, help="calls per operator timing")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.d_model = 20, 128
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    print(machine_description(["heavyball"]))
    data = CharData()
    rows = []
    for c in args.configs:
        rows.append(run(c, args, data))
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()},
              flush=True)
    base = next((r for r in rows if r["optimizer"] == "torch Muon + AdamW"), None)
    ours = next((r for r in rows if r["optimizer"] == "matrixopt Muon"), None)
    for r in rows:
        if ours:
            r["step_time_vs_muon"] = r["step_ms"] / ours["step_ms"]
            r["step_cpu_vs_muon"] = r["step_cpu_ms"] / ours["step_cpu_ms"]
        if base:
            r["step_time_vs_torch"] = r["step_ms"] / base["step_ms"]
            r["val_loss_vs_torch"] = r["val_loss"] / base["val_loss"]
    print_table(rows, title=(f"GPT {args.n_layer}x{args.d_model}, {args.steps} steps, batch "
                             f"{args.batch_size}x{args.seq_len}, lr {args.lr}, wd {args.wd}, "
                             f"{args.threads} threads"))
    if rows:
        write_csv(rows, "bench_muon")
    if args.operators:
        operator_times(args)
    return rows


def operator_times(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each operator alone on the hidden-matrix shapes of the benchmark GPT (batched by
    shape as Muon does), median CPU time of ``repeats`` round-robin calls, against Muon's
    default orthogonalize (polar_express, bf16 iteration)."""
    cfg = GPTConfig(vocab_size=96, seq_len=args.seq_len, n_layer=args.n_layer,
                    d_model=args.d_model, n_head=max(1, args.d_model // 64))
    shapes: dict[tuple[int, ...], int] = {}
    for p in _split(GPT(cfg))[0]:
        shapes[tuple(p.shape)] = shapes.get(tuple(p.shape), 0) + 1
    g = torch.Generator().manual_seed(0)
    mats = [torch.randn(b, *s, generator=g) for s, b in shapes.items()]
    ops: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "newton_schulz": lambda X: orthogonalize(X, dtype=torch.bfloat16),
        "auon": auon, "racs": racs,
        "hybrid_auon": lambda X: hybrid_auon(X, dtype=torch.bfloat16)}
    times: dict[str, list[float]] = {name: [] for name in ops}
    for _ in range(args.repeats):  # round robin: load from other processes hits all alike
        for name, op in ops.items():
            t0 = time.process_time()
            for X in mats:
                op(X)
            times[name].append(time.process_time() - t0)
    rows = [{"operator": name, "cpu_ms": 1e3 * statistics.median(t)} for name, t in times.items()]
    for r in rows:
        r["op_time_vs_ns"] = r["cpu_ms"] / rows[0]["cpu_ms"]
    print_table(rows, title=(f"operators alone on the hidden matrices {dict(shapes)}, "
                             f"{args.threads} threads"))
    write_csv(rows, "bench_muon_operators")
    return rows


if __name__ == "__main__":
    main()
