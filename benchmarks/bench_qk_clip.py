"""QK-clip on the main-job GPT (examples/gpt.py, examples/train_gpt.py conventions).

Three runs from the same initialisation and data order: Muon at the default lr,
Muon at ``--lr-mult`` × that lr, and the same with ``QKClip(tau)``. The max
pre-softmax attention logit of every training forward is recorded (a QKClip with
τ = ∞ records without clipping) and plotted with τ; the table gives the final
validation loss and how many steps' maxima passed τ.

    python benchmarks/bench_qk_clip.py                      # 400 steps, results/qk_clip.*
    python benchmarks/bench_qk_clip.py --steps 60 --no-plot
    # the three runs as separate processes, then the table and plot from their JSON:
    python benchmarks/bench_qk_clip.py --run 0 & python benchmarks/bench_qk_clip.py --run 1 &
    python benchmarks/bench_qk_clip.py --run 2; wait; python benchmarks/bench_qk_clip.py --report
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
from gpt import GPT, CharData, GPTConfig  # noqa: E402
from train_gpt import build_optimizer, evaluate, lr_lambda  # noqa: E402

from matrixopt.optim import QKClip  # noqa: E402


def run(label: str, lr: float, tau: float, args: argparse.Namespace, data: CharData
        ) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    cfg = GPTConfig(vocab_size=data.vocab_size, seq_len=args.seq_len, n_layer=args.n_layer,
                    d_model=args.d_model, n_head=args.n_head)
    model = GPT(cfg)
    clip = QKClip(tau=tau)
    for i, b in enumerate(model.blocks):
        clip.register(b, b.q, b.k, cfg.n_head, name=f"blocks.{i}")
        b.qk_clip = clip
    opt = build_optimizer("muon", model, lr)
    clip.hook(opt)  # records at tau=inf; clips otherwise
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.steps, args.warmup))
    gen = torch.Generator().manual_seed(args.seed)
    val_gen = torch.Generator().manual_seed(args.seed + 1)
    val = [data.batch("val", args.batch_size, args.seq_len, val_gen)
           for _ in range(args.eval_batches)]
    maxima: list[float] = []
    t0 = time.perf_counter()
    for _ in range(args.steps):
        x, y = data.batch("train", args.batch_size, args.seq_len, gen)
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()  # then the clip (hook): last_max holds this forward's maxima
        sched.step()
        maxima.append(float(clip.max_logit()))  # type: ignore[arg-type]
    val_loss = evaluate(model, val)
    wall = time.perf_counter() - t0
    above = sum(m > args.tau for m in maxima)
    print(f"{label:>22}: val {val_loss:.4f}  max logit {max(maxima):8.2f}  "
          f"steps above tau {above}/{args.steps}  ({wall:.0f} s)", flush=True)
    return {"run": label, "lr": lr, "tau": tau, "val_loss": val_loss,
            "max_logit": max(maxima), "steps_above_tau": above, "maxima": maxima}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=3e-3, help="the default Muon lr (train_gpt.py)")
    p.add_argument("--lr-mult", type=float, default=4.0)
    p.add_argument("--tau", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "results")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--run", type=int, choices=[0, 1, 2], default=None,
                   help="only this run (0: default lr, 1: ×lr-mult, 2: ×lr-mult + QK-clip); "
                        "writes results/qk_clip_run{i}.json")
    p.add_argument("--report", action="store_true",
                   help="table and plot from the three results/qk_clip_run*.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = CharData()
    hi = args.lr * args.lr_mult
    configs = [(f"muon lr={args.lr:g}", args.lr, math.inf), (f"muon lr={hi:g}", hi, math.inf),
               (f"muon+qk_clip lr={hi:g}", hi, args.tau)]
    args.out.mkdir(parents=True, exist_ok=True)
    if args.run is not None:
        r = run(*configs[args.run], args, data)
        (args.out / f"qk_clip_run{args.run}.json").write_text(json.dumps(r))
        return [r]
    if args.report:  # steps above tau counted again with this --tau
        rows = [json.loads((args.out / f"qk_clip_run{i}.json").read_text()) for i in range(3)]
        for r in rows:
            r["steps_above_tau"] = sum(m > args.tau for m in r["maxima"])
    else:
        rows = [run(*c, args, data) for c in configs]
    print(f"\ntau = {args.tau:g}, {args.steps} steps, GPT {args.n_layer}x{args.d_model}, "
          f"{args.n_head} heads\n")
    print("| run | val loss | max logit (all steps) | max logit / tau | steps with max logit "
          "> tau |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['val_loss']:.4f} | {r['max_logit']:.2f} | "
              f"{r['max_logit'] / args.tau:.2f} | {r['steps_above_tau']}/{len(r['maxima'])} |")
    with open(args.out / "qk_clip.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "step", "max_logit"])
        for r in rows:
            for i, m in enumerate(r["maxima"]):
                w.writerow([r["run"], i + 1, f"{m:.4f}"])
    if not args.no_plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in rows:
            ax.plot(range(1, len(r["maxima"]) + 1), r["maxima"],
                    label=f"{r['run']} (val {r['val_loss']:.3f})")
        ax.axhline(args.tau, color="k", ls="--", lw=1, label=f"tau = {args.tau:g}")
        ax.set_xlabel("step")
        ax.set_ylabel("max pre-softmax attention logit (training batch)")
        ax.set_title(f"QK-clip, char GPT {args.n_layer}x{args.d_model}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.out / "qk_clip.png", dpi=120)
        print(f"wrote {args.out / 'qk_clip.png'} and {args.out / 'qk_clip.csv'}")
    return rows


if __name__ == "__main__":
    main()
