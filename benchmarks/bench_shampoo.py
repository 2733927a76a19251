"""Shampoo side by side: matrixopt vs pytorch-optimizer vs HeavyBall (+ torch AdamW).

Same GPT (examples/gpt.py), same initialisation, same data order, same lr schedule,
same split (hidden matrices to the optimizer under test, embeddings / head / norms /
biases to AdamW, by ``muon_param_groups``' rules), same refresh frequency. Reports
the mean optimizer-step time (refreshes amortised), the optimizer-state bytes and
the train/validation loss after N steps, with ratios to pytorch-optimizer's
ScalableShampoo (its port of Google's Distributed Shampoo).

facebookresearch/optimizers' Distributed Shampoo is not on PyPI (the ``optimizers``
package there is unrelated), so it is not in the table.

    python benchmarks/bench_shampoo.py            # full run (several minutes on 2 cores)
    python benchmarks/bench_shampoo.py --quick    # smoke run
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

from matrixopt.optim import Shampoo, muon_param_groups  # noqa: E402


class Chain:
    """Several optimizers stepped as one (a peer on the matrices, AdamW beside it)."""

    def __init__(self, *opts: torch.optim.Optimizer) -> None:
        self.all = opts

    def step(self) -> None:
        for o in self.all:
            o.step()

    def zero_grad(self) -> None:
        for o in self.all:
            o.zero_grad(set_to_none=True)


def _split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    groups = muon_param_groups(model)
    hidden = [p for g in groups if g["algorithm"] == "muon" for p in g["params"]]
    rest = [p for g in groups if g["algorithm"] == "adamw" for p in g["params"]]
    return hidden, rest


BETAS = (0.9, 0.95)


def make(name: str, model: nn.Module, lr: float, wd: float, f: int) -> Chain:
    hidden, rest = _split(model)

    def adamw(ps: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(ps, lr=lr, weight_decay=wd, betas=BETAS, foreach=True)

    ours = dict(lr=lr, weight_decay=wd, adamw_betas=BETAS, precondition_frequency=f,
                grafting_beta2=BETAS[1])
    if name == "torch AdamW":
        return Chain(adamw(list(model.parameters())))
    if name == "matrixopt Shampoo":
        return Chain(Shampoo(muon_param_groups(model), **ours))
    if name == "matrixopt Shampoo (newton)":
        return Chain(Shampoo(muon_param_groups(model), root_method="newton", epsilon=1e-8,
                             **ours))
    if name == "matrixopt Shampoo (mkor)":
        return Chain(Shampoo(muon_param_groups(model), inverse_update="mkor", epsilon=1e-4,
                             **ours))
    if name == "pytorch-optimizer ScalableShampoo":
        from pytorch_optimizer import ScalableShampoo
        from pytorch_optimizer.optimizer.utils.graft import LayerWiseGrafting
        return Chain(ScalableShampoo(hidden, lr=lr, betas=(0.9, 0.999), weight_decay=wd,
                                     decoupled_weight_decay=True, start_preconditioning_step=f,
                                     preconditioning_compute_steps=f, block_size=1024,
                                     graft_type=LayerWiseGrafting.RMSPROP), adamw(rest))
    if name == "pytorch-optimizer Shampoo":
        from pytorch_optimizer import Shampoo as POShampoo
        return Chain(POShampoo(hidden, lr=lr, momentum=0.9, weight_decay=wd,
                               weight_decouple=True, preconditioning_compute_steps=f),
                     adamw(rest))
    if name == "heavyball KLShampoo":
        import heavyball
        import heavyball.utils
        # its kernels are torch.compile'd by default (max-autotune), which fails on this CPU
        # build inside KLShampoo even with compile_step=False: eager, as the others
        heavyball.utils.compile_mode = None
        return Chain(heavyball.KLShampoo(hidden, lr=lr, betas=BETAS, weight_decay=wd,
                                         precondition_frequency=f, compile_step=False),
                     adamw(rest))
    raise ValueError(name)


CONFIGS = ["torch AdamW", "matrixopt Shampoo", "matrixopt Shampoo (newton)",
           "matrixopt Shampoo (mkor)", "pytorch-optimizer ScalableShampoo",
           "pytorch-optimizer Shampoo", "heavyball KLShampoo"]
BASE = "pytorch-optimizer ScalableShampoo"


def _tensor_bytes(x: Any, seen: set[int]) -> int:
    """Bytes of the distinct tensors reachable from ``x`` (dicts, lists, and the attributes
    of objects: pytorch-optimizer keeps PreConditioner objects in its state)."""
    if id(x) in seen:
        return 0
    seen.add(id(x))
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, dict):
        return sum(_tensor_bytes(v, seen) for v in x.values())
    if isinstance(x, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in x)
    if hasattr(x, "__dict__") and not isinstance(x, (nn.Module, type)):
        return sum(_tensor_bytes(v, seen) for v in vars(x).values())
    return 0


def state_bytes(chain: Chain) -> int:
    seen: set[int] = set()
    return sum(_tensor_bytes(s, seen) for o in chain.all for s in o.state.values())


def schedule(total: int, warmup: int) -> Callable[[int], float]:
    return lambda s: min(1.0, (s + 1) / warmup) * max(0.1, 1 - s / total)


def run(name: str, args: argparse.Namespace, data: CharData) -> dict[str, Any]:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=data.vocab_size, seq_len=args.seq_len, n_layer=args.n_layer,
                    d_model=args.d_model, n_head=max(1, args.d_model // 64))
    model = GPT(cfg)
    chain = make(name, model, args.lr, args.wd, args.frequency)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, schedule(args.steps, 10)) for o in chain.all]
    gen = torch.Generator().manual_seed(0)
    times: list[float] = []
    ema = float("nan")
    for step in range(args.steps):
        x, y = data.batch("train", args.batch_size, args.seq_len, gen)
        loss = model(x, y)
        chain.zero_grad()
        loss.backward()
        t0 = time.perf_counter()
        chain.step()
        times.append(time.perf_counter() - t0)
        for s in scheds:
            s.step()
        ema = float(loss) if step == 0 else 0.9 * ema + 0.1 * float(loss)
    vgen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        val = statistics.fmean(float(model(*data.batch("val", 32, args.seq_len, vgen)))
                               for _ in range(8))
    warm = times[args.frequency:] or times  # first refresh cycle: allocation, compile
    return {"optimizer": name, "step_ms": 1e3 * statistics.fmean(warm),
            "state_MB": state_bytes(chain) / 2**20, "train_loss": ema, "val_loss": val}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--wd", type=float, default=0.1)
    p.add_argument("--frequency", type=int, default=10, help="steps between root refreshes")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS)
    p.add_argument("--quick", action="store_true", help="20 steps, d_model 64")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.d_model = 20, 64
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    print(machine_description(["heavyball", "pytorch_optimizer"]))
    data = CharData()
    rows = []
    for c in args.configs:
        try:
            rows.append(run(c, args, data))
        except (RuntimeError, ValueError) as e:  # a peer that diverges fails in its eigh/svd
            rows.append({"optimizer": c, "step_ms": float("nan"), "state_MB": float("nan"),
                         "train_loss": float("nan"), "val_loss": float("nan"),
                         "error": f"{type(e).__name__}: {str(e)[:80]}"})
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()},
              flush=True)
    base = next((r for r in rows if r["optimizer"] == BASE), None)
    for r in rows:
        if base:
            r["step_time_vs_po_scalable"] = r["step_ms"] / base["step_ms"]
            r["state_vs_po_scalable"] = r["state_MB"] / base["state_MB"]
            r["val_loss_vs_po_scalable"] = r["val_loss"] / base["val_loss"]
    cols = ["optimizer", "step_ms", "state_MB", "train_loss", "val_loss"]
    cols += ["step_time_vs_po_scalable", "state_vs_po_scalable", "val_loss_vs_po_scalable"
             ] if base else []
    cols += ["error"] if any("error" in r for r in rows) else []
    print_table(rows, cols, title=(f"GPT {args.n_layer}x{args.d_model}, {args.steps} steps, batch "
                             f"{args.batch_size}x{args.seq_len}, lr {args.lr}, wd {args.wd}, "
                             f"refresh every {args.frequency}, {args.threads} thread(s)"))
    write_csv(rows, "bench_shampoo")
    return rows


if __name__ == "__main__":
    main()
