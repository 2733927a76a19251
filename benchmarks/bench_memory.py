"""Memory features side by side: int8 / fp8 / bf16 optimizer state and layer-wise stepping.

One run, same machine, on the GPT of ``examples/gpt.py`` (character level):

* **optimizer state** (bytes counted from the tensors in ``optimizer.state``;
  galore-torch's projector object included) and its ratio to the fp32-state
  run of the same optimizer;
* **peak step memory**: the largest amount of memory torch's allocator holds
  during one full training step (forward, backward, optimizer step; state
  already created, gradients freed before the step) above what existed before
  it — on CPU from the allocation events of ``torch.profiler(profile_memory=
  True)`` (tracemalloc does not see torch's CPU allocations), on GPU from
  ``torch.cuda.max_memory_allocated``; plus the same with
  :class:`~matrixopt.optim.LayerwiseStepper` (``+lw`` rows);
* **validation loss** after ``--steps`` steps (smaller GPT, same data order,
  initialisation and schedule) for the fp32-state, int8-state and fp8-state runs.

Optimizers: torch.optim.AdamW; ours "AdamW" (Muon with every group on the
AdamW path) fp32/int8/fp8; Muon fp32/bf16/int8/fp8 (embeddings/head/norms on its
AdamW path, same ``state_dtype``); GaLoreAdamW fp32/int8/fp8; Adafactor; galore-torch
GaLoreAdamW; bitsandbytes AdamW8bit (CPU path). fp8 is COAT's E4M3 with dynamic
range expansion (:mod:`matrixopt.optim._fp8`).

    python benchmarks/bench_memory.py            # full run (a few minutes on 2 cores)
    python benchmarks/bench_memory.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))
from gpt import GPT, CharData, GPTConfig  # noqa: E402

from benchmarks._common import (  # noqa: E402
    RESULTS_DIR,
    hidden_matrices,
    machine_description,
    print_table,
    quiet_import,
    write_csv,
)
from benchmarks.bench_lowrank import (  # noqa: E402
    _allocation_peak,
    _import_galore_torch,
    lr_factor,
    state_bytes,
)
from matrixopt.optim import (  # noqa: E402
    Adafactor,
    GaLoreAdamW,
    LayerwiseStepper,
    Muon,
    muon_param_groups,
)

ALL = ["torch_adamw", "adamw", "adamw_int8", "muon", "muon_bf16", "muon_int8", "galore_adamw",
       "galore_adamw_int8", "adafactor", "galore_torch", "bnb_adamw8bit", "adamw_fp8",
       "muon_fp8", "galore_adamw_fp8"]
# (int8/bf16 variant, its fp32 baseline) for the state ratio and the loss check
PAIRS = {"adamw_int8": "adamw", "muon_bf16": "muon", "muon_int8": "muon",
         "galore_adamw_int8": "galore_adamw", "bnb_adamw8bit": "torch_adamw",
         "adamw_fp8": "adamw", "muon_fp8": "muon", "galore_adamw_fp8": "galore_adamw"}
LOSS_PAIRS = ["adamw", "adamw_int8", "muon", "muon_int8", "galore_adamw", "galore_adamw_int8",
              "adamw_fp8", "muon_fp8", "galore_adamw_fp8"]


def _import_bnb() -> Any:
    return quiet_import("bitsandbytes")


def _hidden(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    return hidden_matrices(model)


def build(name: str, model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """Each optimizer as a user would configure it (same lr, betas, weight decay)."""
    lr, wd, betas = args.lr, 0.1, (0.9, 0.95)
    sd = next((f for f in ("int8", "bf16", "fp8") if name.endswith(f)), None)
    mats, rest = _hidden(model)
    if name == "torch_adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=wd)
    if name.startswith("adamw"):
        return Muon(model.parameters(), lr=lr, betas=betas, weight_decay=wd, algorithm="adamw",
                    state_dtype=sd)
    if name.startswith("muon"):
        return Muon(muon_param_groups(model), lr=args.muon_lr, betas=betas, weight_decay=wd,
                    state_dtype=sd)
    if name.startswith("galore_adamw"):
        rank = max(1, model.cfg.d_model // 4)  # type: ignore[union-attr]
        return GaLoreAdamW([{"params": rest}, {"params": mats, "rank": rank,
                                               "update_proj_gap": args.gap, "scale": 0.25}],
                           lr=lr, betas=betas, weight_decay=wd, state_dtype=sd)
    if name == "adafactor":
        return Adafactor(model.parameters(), lr=lr, relative_step=False, scale_parameter=False,
                         beta1=0.9, beta2_cap=0.999, weight_decay=wd)
    if name == "galore_torch":
        gt = _import_galore_torch()
        if gt is None:
            raise RuntimeError("galore_torch is not installed")
        rank = max(1, model.cfg.d_model // 4)  # type: ignore[union-attr]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return gt.GaLoreAdamW([{"params": rest},
                                   {"params": mats, "rank": rank, "update_proj_gap": args.gap,
                                    "scale": 0.25, "proj_type": "std"}],
                                  lr=lr, betas=betas, weight_decay=wd)
    if name == "bnb_adamw8bit":
        bnb = _import_bnb()
        if bnb is None:
            raise RuntimeError("bitsandbytes is not installed")
        return bnb.optim.AdamW8bit(model.parameters(), lr=lr, betas=betas, weight_decay=wd)
    raise ValueError(f"unknown optimizer {name!r}; choose from {ALL}")


def _model(args: argparse.Namespace, d_model: int, vocab: int) -> GPT:
    torch.manual_seed(args.seed)
    return GPT(GPTConfig(vocab_size=vocab, seq_len=args.seq_len, n_layer=args.n_layer,
                         d_model=d_model, n_head=max(1, d_model // 32)))


def _grad_bytes(model: nn.Module) -> tuple[int, int]:
    """(all gradients, all but the largest layer's): a layer is a top-level child
    module or an element of ``blocks``."""
    layers: dict[str, int] = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        key = ".".join(parts[:2]) if parts[0] == "blocks" else parts[0]
        layers[key] = layers.get(key, 0) + p.numel() * p.element_size()
    total = sum(layers.values())
    return total, total - max(layers.values())


def peak_step(name: str, layerwise: bool, args: argparse.Namespace) -> dict[str, Any]:
    """State bytes and peak memory of one full training step (state created first)."""
    model = _model(args, args.d_model, 96)
    opt = build(name, model, args)
    stepper = LayerwiseStepper(opt) if layerwise else None
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 96, (args.batch_size, args.seq_len), generator=gen)

    def step() -> None:
        loss = model(x, x)
        loss.backward()
        if stepper is None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    for _ in range(2):  # state created, first refresh done
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _allocation_peak(step)
    return {"state_bytes": state_bytes(opt), "peak_step_bytes": peak}


def val_loss(name: str, args: argparse.Namespace, data: CharData) -> float:
    model = _model(args, args.loss_d_model, data.vocab_size)
    opt = build(name, model, args)
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
        sched.step()
    model.eval()
    with torch.no_grad():
        return sum(float(model(xb, yb)) for xb, yb in val) / len(val)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["optimizer"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    axes[0].barh(names, [r["state_MB"] for r in rows], color="tab:blue")
    axes[0].set_xlabel("optimizer state (MiB)")
    y = range(len(rows))
    axes[1].barh([i + 0.2 for i in y], [r["peak_step_MB"] for r in rows], height=0.4,
                 label="regular step", color="tab:orange")
    axes[1].barh([i - 0.2 for i in y], [r.get("peak_step_lw_MB", float("nan")) for r in rows],
                 height=0.4, label="layer-wise", color="tab:green")
    axes[1].set_yticks(list(y), names)
    axes[1].set_xlabel("peak memory of one training step above the model (MiB)")
    axes[1].legend()
    for ax in axes:
        ax.invert_yaxis()
    fig.suptitle("GPT memory: int8/fp8/bf16 state and layer-wise stepping (CPU, profiler peak)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optimizers", nargs="+", default=ALL, choices=ALL)
    p.add_argument("--d-model", type=int, default=512, help="GPT width for the memory columns")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=2,
                   help="memory columns: small-batch regime, where weights dominate")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--gap", type=int, default=50, help="GaLore update_proj_gap")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--muon-lr", type=float, default=3e-3)
    p.add_argument("--steps", type=int, default=300, help="training steps for the loss check")
    p.add_argument("--loss-d-model", type=int, default=128)
    p.add_argument("--loss-batch-size", type=int, default=32)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-loss", action="store_true", help="skip the validation-loss runs")
    p.add_argument("--no-memory", action="store_true", help="only the validation-loss runs")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    a = p.parse_args(argv)
    if a.quick:
        a.d_model, a.n_layer, a.steps, a.loss_d_model, a.eval_batches = 64, 2, 5, 64, 2
        a.loss_batch_size = 8
    return a


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    rows: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for name in args.optimizers:
        if args.no_memory:
            if name in LOSS_PAIRS:
                rows[name] = {"optimizer": name, "state_MB": float("nan"), "_state": 1,
                              "peak_step_MB": float("nan")}
            continue
        try:
            r = peak_step(name, False, args)
            rlw = peak_step(name, True, args)
        except Exception as e:  # a peer that does not run here: reported, not hidden
            skipped[name] = f"{type(e).__name__}: {e}"[:120]
            continue
        rows[name] = {"optimizer": name, "state_MB": r["state_bytes"] / 2 ** 20,
                      "peak_step_MB": r["peak_step_bytes"] / 2 ** 20,
                      "peak_step_lw_MB": rlw["peak_step_bytes"] / 2 ** 20,
                      "lw_saving_MB": (r["peak_step_bytes"] - rlw["peak_step_bytes"]) / 2 ** 20,
                      "_state": r["state_bytes"]}
    for name, base in PAIRS.items():
        if name in rows and base in rows:
            rows[name]["state_vs_fp32"] = rows[name]["_state"] / rows[base]["_state"]
    ref = rows.get("torch_adamw")
    for r in rows.values():
        if ref is not None:
            r["state_vs_torch_adamw"] = r["_state"] / ref["_state"]
    if not args.no_loss:
        data = CharData()
        bs = args.batch_size
        args.batch_size = args.loss_batch_size
        for name in LOSS_PAIRS:
            if name in rows:
                t0 = time.perf_counter()
                rows[name]["val_loss"] = val_loss(name, args, data)
                rows[name]["loss_run_s"] = time.perf_counter() - t0
        args.batch_size = bs
        for name, base in PAIRS.items():
            if name in rows and base in rows and "val_loss" in rows[name] \
                    and "val_loss" in rows[base]:
                rows[name]["val_vs_fp32_%"] = 100 * (
                    rows[name]["val_loss"] / rows[base]["val_loss"] - 1)
    model = _model(args, args.d_model, 96)
    total_g, all_but_one = _grad_bytes(model)
    out = list(rows.values())
    cols = ["optimizer", "state_MB", "state_vs_fp32", "state_vs_torch_adamw", "peak_step_MB",
            "peak_step_lw_MB", "lw_saving_MB", "val_loss", "val_vs_fp32_%"]
    print(machine_description(["galore-torch", "bitsandbytes"]))
    print(f"GPT d_model={args.d_model}, {args.n_layer} layers, batch {args.batch_size}x"
          f"{args.seq_len}: parameters/gradients {total_g / 2**20:.2f} MiB, gradients of all "
          f"but the largest layer {all_but_one / 2**20:.2f} MiB (layer-wise target); loss at "
          f"d_model={args.loss_d_model}, {args.steps} steps, batch {args.loss_batch_size}")
    print_table(out, cols, title="Optimizer state and peak step memory (MiB)")
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    for r in out:
        r.pop("_state", None)
    if args.no_memory:
        return out
    write_csv(out, "bench_memory")
    plot(out, args.out / "bench_memory.png")
    print(f"wrote {args.out / 'bench_memory.png'}")
    return out


if __name__ == "__main__":
    main()
