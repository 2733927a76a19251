"""The main job: train a small character-level GPT with each optimizer and compare.

Same model initialisation, same data order, same lr schedule for every
optimizer, each at its own tuned learning rate (``examples/tuned_lr.json``, the
one place the chosen values live, written by ``--sweep``); prints a table (final
train/val loss, steps to reach AdamW's final validation loss, wall time,
optimizer-step time, optimizer-state bytes) and writes a loss-curve PNG (step
and wall-clock axes) and a CSV under ``results/``.

    python examples/train_gpt.py                       # default: a few minutes on 2 cores
    python examples/train_gpt.py --steps 100 --optimizers adamw muon
    python examples/train_gpt.py --sweep               # re-tune: results/sweep.csv + tuned_lr.json
    python examples/train_gpt.py --optimizers adamw adamw_lisa --seeds 0 1 2
    python examples/train_gpt.py --optimizers muon --state-dtype fp8

An optimizer name missing from ``tuned_lr.json`` (one added to
:func:`build_optimizer` later) runs at the file's ``"default"`` lr until swept.
"""

from __future__ import annotations

import argparse
import csv
import json
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
TUNED = Path(__file__).resolve().parent / "tuned_lr.json"
#: lr grid of the sweep, multiples of the current tuned value, half a decade apart (one more
#: step up: short runs of a small model tolerate large steps)
SWEEP_FACTORS = (1 / 3.16, 1.0, 3.16, 10.0)


def tuned_lrs(path: Path = TUNED) -> dict[str, float]:
    """``{"default": lr, name: lr, ...}`` from ``tuned_lr.json`` (3e-3 if it is missing)."""
    lrs = {"default": 3e-3}
    if path.exists():
        doc = json.loads(path.read_text())
        lrs["default"] = float(doc.get("default", 3e-3))
        lrs.update({k: float(v) for k, v in doc["lr"].items()})
    return lrs


def _decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def _galore_groups(model: nn.Module, rank: int, lr: float, weight_decay: float,
                   gap: int = 50, scale: float = 0.25) -> list[dict[str, Any]]:
    """Hidden matrices (routed as Muon's) get GaLore at ``lr/scale`` and decay
    ``weight_decay·scale`` (AdamW's step and decay per step, docs/hyperparameters.md);
    embeddings, head, norms plain AdamW at ``lr``."""
    groups = galore_param_groups(model, rank=rank, update_proj_gap=gap, scale=scale)
    for g in groups:
        if "rank" in g:
            g.update(lr=lr / scale, weight_decay=weight_decay * scale)
    return groups


def build_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float = 0.1,
                    state_dtype: str | None = None) -> torch.optim.Optimizer:
    """The optimizers the demo compares, each configured as docs/hyperparameters.md
    recommends for carrying over AdamW(betas=(0.9, 0.95), weight_decay=0.1).
    ``state_dtype`` ("bf16", "int8", "fp8") applies to the matrixopt optimizers."""
    sd: dict[str, Any] = {} if state_dtype is None else {"state_dtype": state_dtype}
    if name in ("adamw", "adamw_lisa"):
        if state_dtype is not None:  # matrixopt's AdamW path (Muon's "adamw" algorithm)
            return matrixopt.Muon([{**g, "algorithm": "adamw"}
                                   for g in _decay_groups(model, weight_decay)],
                                  lr=lr, betas=(0.9, 0.95), **sd)
        return torch.optim.AdamW(_decay_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95))
    if name == "muon":
        return matrixopt.Muon(muon_param_groups(model), lr=lr, weight_decay=weight_decay,
                              betas=(0.9, 0.95), **sd)
    if name in MUON_OPERATORS:  # Muon with a cheap operator in place of Newton–Schulz
        return matrixopt.Muon(muon_param_groups(model), lr=lr, weight_decay=weight_decay,
                              betas=(0.9, 0.95), orthogonalizer=MUON_OPERATORS[name], **sd)
    if name == "galore_adamw":
        d = min(p.shape[-1] for p in model.parameters() if p.ndim == 2)
        return matrixopt.GaLoreAdamW(_galore_groups(model, max(1, d // 4), lr, weight_decay),
                                     lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95), **sd)
    if name == "galore_natural":  # Natural GaLore at galore_adamw's rank: the paper's s, λ
        d = min(p.shape[-1] for p in model.parameters() if p.ndim == 2)
        return matrixopt.GaLoreAdamW(_galore_groups(model, max(1, d // 4), lr, weight_decay),
                                     lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95),
                                     natural=True, natural_window=20, natural_damping=1e-3,
                                     **sd)
    if name == "galore_fira":  # galore_adamw plus Fira's full-rank residual
        d = min(p.shape[-1] for p in model.parameters() if p.ndim == 2)
        groups = _galore_groups(model, max(1, d // 4), lr, weight_decay)
        for g in groups:
            if "rank" in g:
                g["residual"] = "fira"
        return matrixopt.GaLoreAdamW(groups, lr=lr, weight_decay=weight_decay,
                                     betas=(0.9, 0.95), **sd)
    if name == "adafactor":
        return matrixopt.Adafactor(_decay_groups(model, weight_decay), lr=lr,
                                   relative_step=False, scale_parameter=False, beta1=0.9,
                                   beta2_cap=0.95, **sd)
    if name == "dion":  # rank 1/4, update RMS 0.2·lr; μ 0.85 (lr 6e-3 in tuned_lr.json):
        # best of 400-step runs: μ 0.95 at lr 3e-3 and 6e-3, μ 0.8/0.85/0.9/0.98 at 6e-3
        return matrixopt.optim.Dion(muon_param_groups(model), lr=lr, weight_decay=weight_decay,
                                    momentum=0.85, betas=(0.9, 0.95), rank_fraction=0.25,
                                    adjust_lr="match_rms_adamw", **sd)
    if name == "soap":
        # every >= 2-D tensor (embeddings, head too) preconditioned, as the peers do:
        # better than routing them to AdamW in benchmarks/bench_kronecker.py
        from matrixopt.optim import SOAP
        return SOAP(_decay_groups(model, weight_decay), lr=lr, weight_decay=weight_decay,
                    betas=(0.9, 0.95), precondition_frequency=10, **sd)
    if name == "shampoo":  # Adam-grafted Shampoo on the hidden matrices, AdamW for the rest
        return matrixopt.optim.Shampoo(muon_param_groups(model), lr=lr,
                                       weight_decay=weight_decay, adamw_betas=(0.9, 0.95),
                                       grafting_beta2=0.95, precondition_frequency=10, **sd)
    raise ValueError(f"unknown optimizer {name!r}; choose from {AVAILABLE + EXTRA}")


#: opt-in names (not in the default run): ``--optimizers muon muon_auon ...``
MUON_OPERATORS = {"muon_auon": "auon", "muon_hybrid_auon": "hybrid_auon", "muon_racs": "racs"}
AVAILABLE = ["adamw", "muon"] + [n for n, attr in (("galore_adamw", "GaLoreAdamW"),
                                                   ("adafactor", "Adafactor"))
                                 if hasattr(matrixopt, attr)]
AVAILABLE += ["soap", "shampoo"]
#: opt-in configurations (not in the default comparison)
EXTRA = ["adamw_lisa", *MUON_OPERATORS, "dion", "galore_natural", "galore_fira"]
#: LISA (matrixopt.optim.LISA) in "adamw_lisa": 2 of the blocks trainable, resampled
#: every 20 steps (LMFlow's scripts); embeddings, final norm and head always train
LISA_ACTIVE, LISA_PERIOD = 2, 20


def _lisa(name: str, model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> Any:
    if not name.endswith("_lisa"):
        return None
    from matrixopt.optim import LISA
    rest = [m for n, m in model.named_children() if n != "blocks"]
    return LISA(opt, model.blocks, n_active=min(LISA_ACTIVE, len(model.blocks)),
                period=LISA_PERIOD, always=rest, seed=seed)


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
    lr = args.lr.get(name, args.lr.get(name.removesuffix("_lisa"), args.lr["default"]))
    opt = build_optimizer(name, model, lr, state_dtype=args.state_dtype)
    lisa = _lisa(name, model, opt, args.seed)
    peak_state = 0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.steps, args.warmup))
    gen = torch.Generator().manual_seed(args.seed)  # same data order for every optimizer
    val_gen = torch.Generator().manual_seed(args.seed + 1)
    val_batches = [data.batch("val", args.batch_size, args.seq_len, val_gen)
                   for _ in range(args.eval_batches)]
    curve: list[tuple[int, float, float, float]] = []
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
        if lisa is not None:
            peak_state = max(peak_state, state_bytes(opt))
            lisa.step()
        lv = float(loss.detach())
        train_loss = 0.9 * train_loss + 0.1 * lv if step else lv
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            te = time.perf_counter()
            val = evaluate(model, val_batches)
            t0 += time.perf_counter() - te  # the wall-clock axis counts training only
            curve.append((step + 1, train_loss, val, te - t0))
            if progress:
                bar.set_postfix(train=f"{train_loss:.3f}", val=f"{val:.3f}")  # type: ignore[attr-defined]
    wall = curve[-1][3]
    label = name if args.state_dtype is None else f"{name}[{args.state_dtype}]"
    return {"optimizer": label, "lr": lr, "seed": args.seed, "train_loss": curve[-1][1],
            "val_loss": curve[-1][2], "wall_s": wall, "opt_step_ms": 1e3 * opt_time / args.steps,
            "state_MB": max(peak_state, state_bytes(opt)) / 2**20, "curve": curve}


def steps_to_reach(curve: list[tuple[int, float, float, float]], target: float) -> int | None:
    for step, _, val, _ in curve:
        if val <= target:
            return step
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optimizers", nargs="+", default=AVAILABLE, choices=AVAILABLE + EXTRA)
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
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="run every optimizer with each seed; the table shows means")
    p.add_argument("--state-dtype", default=None, choices=["fp32", "bf16", "int8", "fp8"],
                   help="state_dtype of the matrixopt optimizers (adamw: matrixopt's AdamW path)")
    p.add_argument("--sweep", action="store_true",
                   help="lr sweep (tuned lr x 1/3.16, 1, 3.16, 10) per optimizer at --sweep-steps; "
                        "writes results/sweep.csv and the best lr to examples/tuned_lr.json")
    p.add_argument("--sweep-steps", type=int, default=100)
    p.add_argument("--tuned", type=Path, default=TUNED,
                   help="the JSON of tuned learning rates read (and written by --sweep)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--lr", type=str, default="",
                   help="comma list name=value overriding examples/tuned_lr.json, "
                        "e.g. 'default=3e-3,adafactor=1e-2'")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the PNG and CSV")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    lrs = tuned_lrs(args.tuned)
    for item in filter(None, args.lr.split(",")):
        k, v = item.split("=")
        lrs[k.strip()] = float(v)
    args.lr = lrs
    return args


def sweep(args: argparse.Namespace, data: CharData) -> dict[str, float]:
    """Short runs (``--sweep-steps``) at tuned lr × :data:`SWEEP_FACTORS` per optimizer;
    every run goes to results/sweep.csv, the best lr per optimizer into tuned_lr.json
    (other entries kept). Returns the chosen lrs."""
    short = argparse.Namespace(**{**vars(args), "steps": args.sweep_steps,
                                  "warmup": min(args.warmup, args.sweep_steps // 2)})
    rows = []
    names = [n for n in args.optimizers if not n.endswith("_lisa")]  # LISA: its base's lr
    for name in names:
        base = args.lr.get(name, args.lr["default"])
        for f in SWEEP_FACTORS:
            short.lr = {**args.lr, name: float(f"{base * f:.3g}")}
            r = train(name, short, data)
            rows.append(r)
            print(f"{name:>14} lr {r['lr']:.3g}: val {r['val_loss']:.4f}")
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "sweep.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["optimizer", "lr", "steps", "seed", "train_loss", "val_loss", "wall_s"])
        for r in rows:
            w.writerow([r["optimizer"], r["lr"], args.sweep_steps, r["seed"],
                        f"{r['train_loss']:.4f}", f"{r['val_loss']:.4f}", f"{r['wall_s']:.1f}"])
    best = {}
    for name in names:
        runs = [r for r in rows if r["optimizer"].split("[")[0] == name]
        best[name] = min(runs, key=lambda r: r["val_loss"])["lr"]
        edge = best[name] in (runs[0]["lr"], runs[-1]["lr"])
        print(f"{name}: best lr {best[name]:.3g}" + (" (edge of the grid: sweep again)"
                                                    if edge else ""))
    doc = (json.loads(args.tuned.read_text()) if args.tuned.exists()
           else {"default": 3e-3, "lr": {}})
    doc["lr"].update(best)
    for name in best:  # a swept value replaces the hand-set one and its note
        doc.get("not_swept", {}).pop(name, None)
    doc["source"] = (f"python examples/train_gpt.py --sweep --sweep-steps {args.sweep_steps} "
                     f"(results/sweep.csv)")
    args.tuned.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    print(f"wrote {args.out / 'sweep.csv'} and {args.tuned}")
    return best


def _mean_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per optimizer: means over seeds (the curve of the first seed)."""
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        acc = out.setdefault(r["optimizer"], {**r, "n": 0, "sum": {}})
        acc["n"] += 1
        for k in ("train_loss", "val_loss", "wall_s", "opt_step_ms", "state_MB"):
            acc["sum"][k] = acc["sum"].get(k, 0.0) + r[k]
    for acc in out.values():
        for k, v in acc.pop("sum").items():
            acc[k] = v / acc["n"]
    return list(out.values())


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = CharData()
    print(f"corpus: {len(data.train) + len(data.val):,} characters, vocab {data.vocab_size}; "
          f"GPT {args.n_layer}x{args.d_model}, "
          f"{args.steps} steps of {args.batch_size}x{args.seq_len}")
    if args.sweep:
        args.lr.update(sweep(args, data))
    seeds = args.seeds or [args.seed]
    runs = []
    for seed in seeds:
        args.seed = seed
        runs += [train(name, args, data) for name in args.optimizers]
    rows = _mean_rows(runs)
    ref = next((r for r in rows if r["optimizer"] == "adamw"), None)
    for r in rows:
        r["steps_to_adamw_final_val"] = (steps_to_reach(r["curve"], ref["val_loss"])
                                         if ref else None)
    cols = ["optimizer", "lr", "train_loss", "val_loss", "steps_to_adamw_final_val", "wall_s",
            "opt_step_ms", "state_MB"]
    if len(seeds) > 1:
        print(f"means over seeds {seeds}")
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        cells = [f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols]
        print("| " + " | ".join(cells) + " |")
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "train_gpt.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["optimizer", "lr", "seed", "step", "wall_s", "train_loss", "val_loss"])
        for r in runs:
            for step, tr, va, wall in r["curve"]:
                w.writerow([r["optimizer"], r["lr"], r["seed"], step, f"{wall:.2f}", tr, va])
    if not args.no_plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, (ax, axt) = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
        for r in rows:
            s, _, v, t = zip(*r["curve"])
            label = f"{r['optimizer']} (lr {r['lr']:.3g})"
            ax.plot(s, v, label=label)
            axt.plot(t, v, label=label)
        ax.set_xlabel("step")
        axt.set_xlabel("wall clock (s, training only)")
        ax.set_ylabel("validation loss")
        fig.suptitle(f"char-level GPT {args.n_layer}x{args.d_model} on pydoc topics, "
                     f"each optimizer at its tuned lr")
        for a in (ax, axt):
            a.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.out / "train_gpt.png", dpi=120)
        print(f"wrote {args.out / 'train_gpt.png'} and {args.out / 'train_gpt.csv'}")
    return rows


if __name__ == "__main__":
    main()
