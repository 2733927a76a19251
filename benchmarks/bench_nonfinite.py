"""Cost of the ``nonfinite="skip"`` policy: a step with a NaN gradient vs a clean step.

Issue 14's target: a step where one gradient holds a NaN needs at most 0.05x of
parameter + state bytes of extra peak memory over a clean step, and at most
1.05x its time. Problem (as in the issue): 8 x ``nn.Linear(512, 512)`` (biases
included), state created by two warm-up steps; per optimizer:

* peak memory of ``opt.step()`` above what existed before it, from the
  allocation events of ``torch.profiler`` (as ``bench_memory.py``), for a clean
  step and for a step whose first gradient holds one NaN; the difference
  divided by parameter + state bytes;
* median time of ``opt.step()`` for both (``torch.utils.benchmark``, one thread);
  a skipped step leaves the state unchanged, so the NaN step is timed
  repeatedly on the same state; the clean step advances it.

    python benchmarks/bench_nonfinite.py            # Muon, GaLoreAdamW, Adafactor
    python benchmarks/bench_nonfinite.py --quick    # smaller, fewer repeats
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import machine_description, median_time, print_table  # noqa: E402
from benchmarks.bench_lowrank import _allocation_peak  # noqa: E402
from matrixopt.optim import Adafactor, GaLoreAdamW, Muon  # noqa: E402

BUILDERS: dict[str, Callable[[nn.Module, int], torch.optim.Optimizer]] = {
    "Muon": lambda m, d: Muon(m.parameters(), lr=0.02),
    "GaLoreAdamW": lambda m, d: GaLoreAdamW(
        [{"params": [p for p in m.parameters() if p.ndim < 2]},
         {"params": [p for p in m.parameters() if p.ndim == 2], "rank": d // 4}], lr=1e-3),
    "Adafactor": lambda m, d: Adafactor(m.parameters(), lr=1e-2, relative_step=False),
}


def _bytes(ts: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def measure(name: str, d: int, layers: int, min_run_time: float) -> dict[str, str]:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(d, d) for _ in range(layers)])
    params = list(model.parameters())
    opt = BUILDERS[name](model, d)
    clean = [torch.randn_like(p) * 1e-2 for p in params]
    poisoned = [g.clone() for g in clean]
    poisoned[0].view(-1)[0] = float("nan")

    def set_grads(gs: list[torch.Tensor]) -> None:
        for p, g in zip(params, gs):
            p.grad = g

    set_grads(clean)
    opt.step()
    opt.step()
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    base = _bytes(params) + _bytes(state)

    set_grads(clean)
    peak_clean = _allocation_peak(opt.step)
    set_grads(poisoned)
    peak_nan = _allocation_peak(opt.step)
    set_grads(clean)
    t_clean = median_time(opt.step, min_run_time=min_run_time, num_threads=1)
    set_grads(poisoned)
    t_nan = median_time(opt.step, min_run_time=min_run_time, num_threads=1)
    return {"optimizer": name, "param+state MiB": f"{base / 2**20:.1f}",
            "peak clean MiB": f"{peak_clean / 2**20:.1f}",
            "peak NaN MiB": f"{peak_nan / 2**20:.1f}",
            "extra/(param+state)": f"{(peak_nan - peak_clean) / base:.3f}",
            "clean ms": f"{t_clean * 1e3:.2f}", "NaN ms": f"{t_nan * 1e3:.2f}",
            "NaN/clean time": f"{t_nan / t_clean:.3f}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--optimizers", nargs="+", default=list(BUILDERS), choices=list(BUILDERS))
    ap.add_argument("--min-run-time", type=float, default=2.0)
    ap.add_argument("--quick", action="store_true", help="d=128, 2 layers, short timing")
    args = ap.parse_args()
    if args.quick:
        args.d, args.layers, args.min_run_time = 128, 2, 0.2
    torch.set_num_threads(1)
    print(machine_description())
    rows = [measure(n, args.d, args.layers, args.min_run_time) for n in args.optimizers]
    print_table(rows, title=f"nonfinite='skip': NaN step vs clean step, {args.layers} x "
                            f"Linear({args.d}, {args.d})")


if __name__ == "__main__":
    main()
