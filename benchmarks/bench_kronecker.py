"""Kronecker-factored preconditioners side by side: matrixopt SOAP against HeavyBall's
and pytorch-optimizer's SOAP, and AdamW, in one run on the GPT of ``examples/gpt.py``.

Every candidate trains the same model (same initialisation, data order, lr
schedule: ``examples/train_gpt.py``'s warmup + cosine) for ``--steps`` steps and
reports:

* **val loss** at the last step and **steps to AdamW's final val loss** (first
  evaluation at or below it; evaluations every ``--eval-every`` steps);
* **optimizer step time**: wall time of ``opt.step()`` summed over the steps
  after the first ``--untimed`` (set-up, compiles) divided by their number (so the
  eigenbasis refreshes, every ``--precondition-frequency`` steps for every SOAP,
  are amortised), and the same in CPU time (``time.process_time``, robust when
  other processes share the cores);
* **state bytes**: every tensor reachable from ``optimizer.state`` (nested dicts
  and lists included: HeavyBall keeps lists), each storage counted once.

Candidates live in :data:`CANDIDATES` (name → factory(model, lr, args)); a
Shampoo entry is one more line there. Peers get all parameters in two groups
(weight decay on >= 2-D tensors), as their users would pass them, and run with
``precondition_frequency`` fixed (HeavyBall's frequency schedule off);
HeavyBall eager (``heavyball_soap``) and with its default inductor compile
(``heavyball_soap_compiled``). ``soap_plain`` is matrixopt with the same two groups (so
embeddings and head are preconditioned like the peers do); ``soap`` routes
embeddings, head and 1-D tensors to AdamW (``soap_param_groups``).

    python benchmarks/bench_kronecker.py --threads 1            # full (minutes)
    python benchmarks/bench_kronecker.py --steps 40 --quick     # smoke run
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_description, print_table, quiet_import, write_csv  # noqa: E402
from gpt import GPT, CharData, GPTConfig  # noqa: E402
from train_gpt import _decay_groups, evaluate, lr_lambda, steps_to_reach  # noqa: E402

from matrixopt.optim import SOAP, soap_param_groups  # noqa: E402

Factory = Callable[[nn.Module, float, argparse.Namespace], torch.optim.Optimizer]


def _adamw(model: nn.Module, lr: float, a: argparse.Namespace) -> torch.optim.Optimizer:
    return torch.optim.AdamW(_decay_groups(model, a.weight_decay), lr=lr, betas=(0.9, 0.95))


def _soap(state_dtype: str | None = None, routed: bool = True) -> Factory:
    def make(model: nn.Module, lr: float, a: argparse.Namespace) -> torch.optim.Optimizer:
        params = (soap_param_groups(model) if routed
                  else _decay_groups(model, a.weight_decay))
        return SOAP(params, lr=lr, betas=(0.9, 0.95), weight_decay=a.weight_decay,
                    precondition_frequency=a.precondition_frequency, state_dtype=state_dtype)
    return make


def _heavyball(compiled: bool) -> Factory:
    def make(model: nn.Module, lr: float, a: argparse.Namespace) -> torch.optim.Optimizer:
        hb = quiet_import("heavyball")
        if hb is None:
            raise ImportError("heavyball is not installed (pip install heavyball)")
        # heavyball compiles its kernels with inductor (max-autotune) by default; eager
        # here unless `compiled` (its compile time then falls in the untimed first steps)
        hb.utils.compile_mode = "max-autotune-no-cudagraphs" if compiled else None
        return _heavyball_soap(hb, model, lr, a)
    return make


def _heavyball_soap(hb: Any, model: nn.Module, lr: float, a: argparse.Namespace
                    ) -> torch.optim.Optimizer:
    return hb.SOAP(_decay_groups(model, a.weight_decay), lr=lr, betas=(0.9, 0.95),
                   shampoo_beta=0.95, weight_decay=a.weight_decay,
                   precondition_frequency=a.precondition_frequency, max_precond_dim=10000,
                   merge_dims=False, use_precond_schedule=False, compile_step=False)


def _pytorch_optimizer(model: nn.Module, lr: float, a: argparse.Namespace
                       ) -> torch.optim.Optimizer:
    po = quiet_import("pytorch_optimizer")
    if po is None:
        raise ImportError("pytorch_optimizer is not installed (pip install pytorch_optimizer)")
    return po.SOAP(_decay_groups(model, a.weight_decay), lr=lr, betas=(0.9, 0.95),
                   shampoo_beta=0.95, weight_decay=a.weight_decay,
                   precondition_frequency=a.precondition_frequency)


#: name → factory(model, lr, args). The first entry is the reference (AdamW).
CANDIDATES: dict[str, Factory] = {
    "adamw": _adamw,
    "soap": _soap(),
    "soap_plain": _soap(routed=False),
    "soap_int8": _soap("int8"),
    "soap_bf16": _soap("bf16"),
    "heavyball_soap": _heavyball(compiled=False),
    "heavyball_soap_compiled": _heavyball(compiled=True),
    "pytorch_optimizer_soap": _pytorch_optimizer,
}


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor reachable from ``opt.state`` (each storage once)."""
    seen: set[tuple[int, int]] = set()
    total = 0

    def walk(x: Any) -> None:
        nonlocal total
        if isinstance(x, torch.Tensor):
            key = (x.untyped_storage().data_ptr(), x.untyped_storage().nbytes())
            if key not in seen:
                seen.add(key)
                total += x.untyped_storage().nbytes()
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    for s in opt.state.values():
        walk(s)
    return total


def run(name: str, a: argparse.Namespace, data: CharData) -> dict[str, Any]:
    torch.manual_seed(a.seed)
    cfg = GPTConfig(vocab_size=data.vocab_size, seq_len=a.seq_len, n_layer=a.n_layer,
                    d_model=a.d_model, n_head=a.n_head)
    model = GPT(cfg)
    lr = a.lr.get(name, a.lr["default"])
    opt = CANDIDATES[name](model, lr, a)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(a.steps, a.warmup))
    gen = torch.Generator().manual_seed(a.seed)
    val_gen = torch.Generator().manual_seed(a.seed + 1)
    val = [data.batch("val", a.batch_size, a.seq_len, val_gen) for _ in range(a.eval_batches)]
    curve: list[tuple[int, float, float]] = []
    wall = cpu = 0.0
    for step in range(a.steps):
        x, y = data.batch("train", a.batch_size, a.seq_len, gen)
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t0, c0 = time.perf_counter(), time.process_time()
        opt.step()
        if step >= a.untimed:
            wall += time.perf_counter() - t0
            cpu += time.process_time() - c0
        sched.step()
        if (step + 1) % a.eval_every == 0 or step + 1 == a.steps:
            curve.append((step + 1, float(loss.detach()), evaluate(model, val)))
    timed = a.steps - a.untimed
    return {"optimizer": name, "val_loss": curve[-1][2], "step_ms": 1e3 * wall / timed,
            "step_cpu_ms": 1e3 * cpu / timed, "state_MB": state_bytes(opt) / 2**20,
            "curve": curve}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--precondition-frequency", type=int, default=10)
    p.add_argument("--untimed", type=int, default=20,
                   help="first steps left out of the step time (first-call set-up, compiles); "
                        "the timed steps should be a multiple of the frequency")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lr", type=str, default="default=3e-3",
                   help="comma list name=value, e.g. 'default=3e-3,adamw=3e-3'")
    p.add_argument("--quick", action="store_true", help="a tiny GPT (smoke run)")
    a = p.parse_args(argv)
    lrs = {"default": 3e-3}
    for item in a.lr.split(","):
        k, v = item.split("=")
        lrs[k.strip()] = float(v)
    a.lr = lrs
    if a.quick:
        a.n_layer, a.d_model, a.eval_every, a.untimed = 2, 64, 5, min(a.untimed, a.steps // 2)
    return a


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    print(machine_description(["heavyball", "pytorch_optimizer"]))
    data = CharData()
    print(f"GPT {a.n_layer}x{a.d_model}, {a.steps} steps of {a.batch_size}x{a.seq_len}, "
          f"precondition_frequency {a.precondition_frequency}, lr {a.lr}")
    rows = []
    for name in a.candidates:
        try:
            rows.append(run(name, a, data))
        except ImportError as e:
            print(f"{name}: skipped ({e})")
        print(f"  {name}: done", flush=True)
    ref = next((r for r in rows if r["optimizer"] == "adamw"), None)
    hb = next((r for r in rows if r["optimizer"] == "heavyball_soap"), None)
    fp = next((r for r in rows if r["optimizer"] == "soap"), None)
    for r in rows:
        r["steps_to_adamw_final"] = steps_to_reach(r["curve"], ref["val_loss"]) if ref else None
        r["steps_ratio"] = (r["steps_to_adamw_final"] / a.steps
                            if r["steps_to_adamw_final"] else None)
        r["time_vs_heavyball"] = r["step_ms"] / hb["step_ms"] if hb else None
        r["state_vs_soap"] = r["state_MB"] / fp["state_MB"] if fp else None
        r["loss_vs_soap"] = r["val_loss"] / fp["val_loss"] - 1 if fp else None
    cols = ["optimizer", "val_loss", "steps_to_adamw_final", "steps_ratio", "step_ms",
            "step_cpu_ms", "time_vs_heavyball", "state_MB", "state_vs_soap", "loss_vs_soap"]
    print_table(rows, cols)
    write_csv([{c: r[c] for c in cols} for r in rows], "bench_kronecker")
    return rows


if __name__ == "__main__":
    main()
