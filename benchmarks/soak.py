"""Soak test of the ``nonfinite="skip"`` policy on the bundled GPT (not part of the unit suite).

For each optimizer (Muon, GaLoreAdamW, Adafactor, configured as in
``examples/train_gpt.py``) two runs from the same initialisation and data order:

* **clean**: ``--steps`` plain training steps;
* **faulty**: the same, but every ``--inject-every`` steps NaN/Inf gradients are
  injected (alternately: every gradient NaN, as after a NaN loss; or one random
  parameter's gradient with a NaN and another with an Inf), and every
  ``--ckpt-every`` steps model, optimizer and scheduler go through
  ``torch.save`` → ``torch.load(weights_only=True)`` into *fresh* objects.

After every step of the faulty run all weights are checked for NaN/Inf (one
device-side reduction per parameter). Reported: final smoothed train loss and
validation loss of both runs, their difference next to the validation
standard error (the noise of the evaluation itself), the number of skipped
parameter-steps (``nonfinite_count``), and whether any weight ever became
non-finite.

Then the cost of the policy: ``--timing-steps`` training steps alternating
between a ``"skip"`` and an ``"ignore"`` optimizer on two identical models (same
run, interleaved so machine load affects both alike); medians of the optimizer
step and of the whole training step (forward + backward + step), and their
ratios (issue #9 target: ≤ 1.05).

    python benchmarks/soak.py                                  # issue's 5000 / 500 / 1000
    python benchmarks/soak.py --steps 600 --inject-every 100 --ckpt-every 200 \\
        --n-layer 2 --d-model 64                               # a few minutes on 2 cores
"""

from __future__ import annotations

import argparse
import io
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))
from gpt import GPT, CharData, GPTConfig  # noqa: E402
from train_gpt import build_optimizer, lr_lambda  # noqa: E402

OPTIMIZERS = ["muon", "galore_adamw", "adafactor"]


def _make(args: argparse.Namespace, data: CharData, name: str, nonfinite: str = "skip"
          ) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(args.seed)
    cfg = GPTConfig(vocab_size=data.vocab_size, seq_len=args.seq_len, n_layer=args.n_layer,
                    d_model=args.d_model, n_head=args.n_head)
    model = GPT(cfg)
    opt = build_optimizer(name, model, args.lr)
    for g in opt.param_groups:
        g["nonfinite"] = nonfinite
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.steps, args.warmup))
    return model, opt, sched


def _inject(model: nn.Module, k: int, gen: torch.Generator) -> None:
    params = [p for p in model.parameters() if p.grad is not None]
    if k % 2 == 0:  # a NaN loss: every gradient NaN
        for p in params:
            p.grad.fill_(float("nan"))
        return
    i, j = torch.randperm(len(params), generator=gen)[:2].tolist()
    params[i].grad.view(-1)[0] = float("nan")
    params[j].grad.view(-1)[-1] = float("inf")


def _roundtrip(args: argparse.Namespace, data: CharData, name: str, model: nn.Module,
               opt: torch.optim.Optimizer, sched: Any) -> tuple[nn.Module, Any, Any]:
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "sched": sched.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    model2, opt2, sched2 = _make(args, data, name)
    model2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    sched2.load_state_dict(ck["sched"])
    return model2, opt2, sched2


@torch.no_grad()
def _evaluate(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]
              ) -> tuple[float, float]:
    model.eval()
    losses = [float(model(x, y)) for x, y in batches]
    model.train()
    return statistics.fmean(losses), statistics.stdev(losses) / math.sqrt(len(losses))


def run(args: argparse.Namespace, data: CharData, name: str, faulty: bool) -> dict[str, Any]:
    model, opt, sched = _make(args, data, name)
    gen = torch.Generator().manual_seed(args.seed)
    inj = torch.Generator().manual_seed(args.seed + 7)
    val_gen = torch.Generator().manual_seed(args.seed + 1)
    val = [data.batch("val", args.batch_size, args.seq_len, val_gen)
           for _ in range(args.eval_batches)]
    smooth = float("nan")
    injected = restores = 0
    ever_nonfinite = False
    for step in range(1, args.steps + 1):
        x, y = data.batch("train", args.batch_size, args.seq_len, gen)
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if faulty and step % args.inject_every == 0:
            _inject(model, injected, inj)
            injected += 1
        opt.step()
        sched.step()
        if faulty:
            flags = [torch.isfinite(p.sum()) for p in model.parameters()]
            ever_nonfinite |= not bool(torch.stack(flags).all())
            if step % args.ckpt_every == 0:
                model, opt, sched = _roundtrip(args, data, name, model, opt, sched)
                restores += 1
        lv = float(loss.detach())
        smooth = lv if step == 1 else 0.98 * smooth + 0.02 * lv
    vloss, vse = _evaluate(model, val)
    skipped = sum(int(s["nonfinite_count"]) for s in opt.state.values() if "nonfinite_count" in s)
    n_params = sum(1 for _ in model.parameters())
    return {"train": smooth, "val": vloss, "val_se": vse, "injected": injected,
            "restores": restores, "skipped": skipped, "n_params": n_params,
            "nonfinite_weights": ever_nonfinite
            or not all(torch.isfinite(p).all() for p in model.parameters())}


def timing(args: argparse.Namespace, data: CharData, name: str) -> dict[str, float]:
    runs = {pol: _make(args, data, name, pol) for pol in ("skip", "ignore")}
    gen = torch.Generator().manual_seed(args.seed)
    step_t: dict[str, list[float]] = {"skip": [], "ignore": []}
    opt_t: dict[str, list[float]] = {"skip": [], "ignore": []}
    for i in range(args.timing_steps + args.timing_warmup):
        x, y = data.batch("train", args.batch_size, args.seq_len, gen)
        order = ("skip", "ignore") if i % 2 == 0 else ("ignore", "skip")
        for pol in order:
            model, opt, _ = runs[pol]
            t0 = time.perf_counter()
            loss = model(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            if i >= args.timing_warmup:
                step_t[pol].append(t2 - t0)
                opt_t[pol].append(t2 - t1)
    med = {f"{k}_{pol}": 1e3 * statistics.median(v[pol])
           for k, v in (("step", step_t), ("opt", opt_t)) for pol in ("skip", "ignore")}
    med["step_ratio"] = med["step_skip"] / med["step_ignore"]
    med["opt_ratio"] = med["opt_skip"] / med["opt_ignore"]
    return med


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optimizers", nargs="+", default=OPTIMIZERS, choices=OPTIMIZERS)
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--inject-every", type=int, default=500)
    p.add_argument("--ckpt-every", type=int, default=1000)
    p.add_argument("--timing-steps", type=int, default=100)
    p.add_argument("--timing-warmup", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--timing-only", action="store_true", help="only the skip-vs-ignore timing")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = CharData()
    print(f"GPT {args.n_layer}x{args.d_model}, {args.steps} steps of "
          f"{args.batch_size}x{args.seq_len}; NaN/Inf every {args.inject_every}, "
          f"checkpoint/restore every {args.ckpt_every}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    cols = ["optimizer", "clean train", "faulty train", "clean val", "faulty val", "|Δval|",
            "val s.e.", "injections", "skipped param-steps", "restores", "non-finite weights"]
    rows, times = [], []
    failed = False
    for name in args.optimizers:
        t0 = time.perf_counter()
        if not args.timing_only:
            clean = run(args, data, name, faulty=False)
            faulty = run(args, data, name, faulty=True)
            failed |= faulty["nonfinite_weights"] or clean["nonfinite_weights"]
            rows.append([name, f"{clean['train']:.4f}", f"{faulty['train']:.4f}",
                         f"{clean['val']:.4f}", f"{faulty['val']:.4f}",
                         f"{abs(clean['val'] - faulty['val']):.4f}", f"{faulty['val_se']:.4f}",
                         str(faulty["injected"]), str(faulty["skipped"]),
                         str(faulty["restores"]),
                         "YES" if faulty["nonfinite_weights"] else "never"])
        tm = timing(args, data, name)
        times.append([name, f"{tm['step_ignore']:.2f}", f"{tm['step_skip']:.2f}",
                      f"{tm['step_ratio']:.3f}", f"{tm['opt_ignore']:.2f}",
                      f"{tm['opt_skip']:.2f}", f"{tm['opt_ratio']:.3f}"])
        print(f"  {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    if rows:
        print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
        for r in rows:
            print("| " + " | ".join(r) + " |")
    tcols = ["optimizer", "train step ms (ignore)", "train step ms (skip)", "ratio",
             "opt.step ms (ignore)", "opt.step ms (skip)", "ratio"]
    print(f"\nmedians over {args.timing_steps} interleaved steps (same run)")
    print("| " + " | ".join(tcols) + " |\n|" + "---|" * len(tcols))
    for r in times:
        print("| " + " | ".join(r) + " |")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
