"""The main job: train a small character-level GPT with each optimizer and compare.

Same model initialisation, same data order, same lr schedule for every
optimizer; prints a table (final train/val loss, steps to reach AdamW's final
validation loss, wall time, optimizer-step time, optimizer-state bytes) and
writes a loss-curve PNG and a CSV under ``results/``.

    python examples/train_gpt.py                       # default: a few minutes on 2 cores
    python examples/train_gpt.py --steps 100 --optimizers adamw muon
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpt import GPT, CharData, GPTConfig  # noqa: E402

import matrixopt  # noqa: E402
from matrixopt.optim import galore_param_groups, muon_param_groups  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "results"


def _decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def _galore_groups(model: nn.Module, rank: int, gap: int = 50) -> list[dict[str, Any]]:
    """Hidden matrices (routed as Muon's) get GaLore; embeddings, head, norms plain AdamW."""
    return galore_param_groups(model, rank=rank, update_proj_gap=gap, scale=0.25)


def build_optimizer(name: str, model: nn.Module, lr: float,
                    weight_decay: float = 0.1) -> torch.optim.Optimizer:
    """The optimizers the demo compares, each configured as a user would."""
    if name == "adamw":
        return torch.optim.AdamW(_decay_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95))
    if name == "muon":
        return matrixopt.Muon(muon_param_groups(model), lr=lr, weight_decay=weight_decay,
                              betas=(0.9, 0.95))
    if name == "galore_adamw":
        d = min(p.shape[-1] for p in model.parameters() if p.ndim == 2)
        return matrixopt.GaLoreAdamW(_galore_groups(model, rank=max(1, d // 4)), lr=lr,
                                     weight_decay=weight_decay, betas=(0.9, 0.95))
    if name == "adafactor":
        return matrixopt.Adafactor(_decay_groups(model, weight_decay), lr=lr,
                                   relative_step=False, scale_parameter=False)
    if name == "dion":  # rank 1/4, update RMS 0.2·lr; μ 0.85 and lr 6e-3 (--lr default):
        # best of 400-step runs: μ 0.95 at lr 3e-3 and 6e-3, μ 0.8/0.85/0.9/0.98 at 6e-3
        return matrixopt.optim.Dion(muon_param_groups(model), lr=lr, weight_decay=weight_decay,
                                    momentum=0.85, betas=(0.9, 0.95), rank_fraction=0.25,
                                    adjust_lr="match_rms_adamw")
    raise ValueError(f"unknown optimizer {name!r}; choose from {AVAILABLE}")


AVAILABLE = ["adamw", "muon"] + [n for n, attr in (("galore_adamw", "GaLoreAdamW"),
                                                   ("adafactor", "Adafactor"))
                                 if hasattr(matrixopt, attr)] + ["dion"]


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes held in optimizer state tensors."""
    return sum(t.numel() * t.element_size() for s in opt.state.values()
               for t in s.values() if isinstance(t, torch.Tensor))


def lr_lambda(total: int, warmup: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return f


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    model.eval()
    loss = sum(float(model(x, y)) for x, y in batches) / len(batches)
    model.train()
    return loss


def train(name: str, args: argparse.Namespace, data: CharData,
          progress: bool = True) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    cfg = GPTConfig(vocab_size=data.vocab_size, seq_len=args.seq_len, n_layer=args.n_layer,
                    d_model=args.d_model, n_head=args.n_head)
    model = GPT(cfg)
    lr = args.lr.get(name, args.lr["default"])
    opt = build_optimizer(name, model, lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.steps, args.warmup))
    gen = torch.Generator().manual_seed(args.seed)  # same data order for every optimizer
    val_gen = torch.Generator().manual_seed(args.seed + 1)
    val_batches = [data.batch("val", args.batch_size, args.seq_len, val_gen)
                   for _ in range(args.eval_batches)]
    curve: list[tuple[int, float, float]] = []
    opt_time = 0.0
    t0 = time.perf_counter()
    bar = range(args.steps)
    if progress:
        from tqdm import tqdm
        bar = tqdm(bar, desc=f"{name:>12}", leave=True, dynamic_ncols=True)
    train_loss = float("nan")
    for step in bar:
        x, y = data.batch("train", args.batch_size, args.seq_len, gen)
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        ts = time.perf_counter()
        opt.step()
        opt_time += time.perf_counter() - ts
        sched.step()
        lv = float(loss.detach())
        train_loss = 0.9 * train_loss + 0.1 * lv if step else lv
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            val = evaluate(model, val_batches)
            curve.append((step + 1, train_loss, val))
            if progress:
                bar.set_postfix(train=f"{train_loss:.3f}", val=f"{val:.3f}")  # type: ignore[attr-defined]
    wall = time.perf_counter() - t0
    return {"optimizer": name, "train_loss": curve[-1][1], "val_loss": curve[-1][2],
            "wall_s": wall, "opt_step_ms": 1e3 * opt_time / args.steps,
            "state_MB": state_bytes(opt) / 2**20, "curve": curve}


def steps_to_reach(curve: list[tuple[int, float, float]], target: float) -> int | None:
    for step, _, val in curve:
        if val <= target:
            return step
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optimizers", nargs="+", default=AVAILABLE, choices=AVAILABLE)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--lr", type=str, default="default=3e-3,dion=6e-3",
                   help="comma list name=value, e.g. 'default=3e-3,adafactor=1e-2'")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the PNG and CSV")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    lrs = {"default": 3e-3}
    for item in args.lr.split(","):
        k, v = item.split("=")
        lrs[k.strip()] = float(v)
    args.lr = lrs
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = CharData()
    print(f"corpus: {len(data.train) + len(data.val):,} characters, vocab {data.vocab_size}; "
          f"GPT {args.n_layer}x{args.d_model}, "
          f"{args.steps} steps of {args.batch_size}x{args.seq_len}")
    rows = [train(name, args, data) for name in args.optimizers]
    ref = next((r for r in rows if r["optimizer"] == "adamw"), None)
    for r in rows:
        r["steps_to_adamw_final_val"] = (steps_to_reach(r["curve"], ref["val_loss"])
                                         if ref else None)
    cols = ["optimizer", "train_loss", "val_loss", "steps_to_adamw_final_val", "wall_s",
            "opt_step_ms", "state_MB"]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        cells = [f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols]
        print("| " + " | ".join(cells) + " |")
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "train_gpt.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["optimizer", "step", "train_loss", "val_loss"])
        for r in rows:
            for step, tr, va in r["curve"]:
                w.writerow([r["optimizer"], step, tr, va])
    if not args.no_plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in rows:
            s, _, v = zip(*r["curve"])
            ax.plot(s, v, label=r["optimizer"])
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss")
        ax.set_title(f"char-level GPT {args.n_layer}x{args.d_model} on pydoc topics")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.out / "train_gpt.png", dpi=120)
        print(f"wrote {args.out / 'train_gpt.png'} and {args.out / 'train_gpt.csv'}")
    return rows


if __name__ == "__main__":
    main()
