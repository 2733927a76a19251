"""Cost of the ``nonfinite="skip"`` policy: a step with a NaN gradient vs a clean step.

Issue 14's target: a step where one gradient holds a NaN needs at most 0.05x of
parameter + state bytes of extra peak memory over a clean step, and at most
1.05x its time. Problem (as in the issue): 8 x ``nn.Linear(512, 512)`` (biases
included), state created by two warm-up steps; per optimizer:

* peak memory of ``opt.step()`` above what existed before it, from the
  allocation events of ``torch.profiler`` (as ``bench_memory.py``), for a clean
  step and for a step whose first gradient holds one NaN; the difference
  divided by parameter + state bytes;
* median time of ``opt.step()`` for both, one thread, ``--repeats`` single steps
  of each, interleaved (clean, NaN, NaN, clean, ...: the machine's load drifts
  alike over both); a skipped step leaves the state unchanged, the clean step
  advances it;
* the cost of the policy itself: the clean step's peak and time with
  ``nonfinite="skip"`` vs ``"ignore"`` (no flags, no safe gradients), the peak
  difference also as a fraction of parameter + state bytes (same interleaving).

    python benchmarks/bench_nonfinite.py            # Muon, GaLoreAdamW, Adafactor
    python benchmarks/bench_nonfinite.py --quick    # smaller, fewer repeats
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import machine_description, print_table  # noqa: E402
from benchmarks.bench_lowrank import _allocation_peak  # noqa: E402
from matrixopt.optim import Adafactor, GaLoreAdamW, Muon  # noqa: E402

BUILDERS: dict[str, Callable[[nn.Module, int, str], torch.optim.Optimizer]] = {
    "Muon": lambda m, d, nf: Muon(m.parameters(), lr=0.02, nonfinite=nf),
    "GaLoreAdamW": lambda m, d, nf: GaLoreAdamW(
        [{"params": [p for p in m.parameters() if p.ndim < 2]},
         {"params": [p for p in m.parameters() if p.ndim == 2], "rank": d // 4}], lr=1e-3,
        nonfinite=nf),
    "Adafactor": lambda m, d, nf: Adafactor(m.parameters(), lr=1e-2, relative_step=False,
                                            nonfinite=nf),
}


def _bytes(ts: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(name: str, d: int, layers: int, repeats: int) -> dict[str, str]:
    def setup(nonfinite: str) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(d, d) for _ in range(layers)])
        return list(model.parameters()), BUILDERS[name](model, d, nonfinite)

    params, opt = setup("skip")
    params_i, opt_i = setup("ignore")
    clean = [torch.randn_like(p) * 1e-2 for p in params]
    poisoned = [g.clone() for g in clean]
    poisoned[0].view(-1)[0] = float("nan")

    def step(grads: list[torch.Tensor], ps: list[torch.Tensor] = params,
             o: torch.optim.Optimizer = opt) -> Callable[[], None]:
        def run() -> None:
            for p, g in zip(ps, grads):
                p.grad = g
            o.step()
        return run

    clean_step, nan_step, ignore_step = step(clean), step(poisoned), step(clean, params_i, opt_i)
    for _ in range(2):
        clean_step()
        ignore_step()
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    base = _bytes(params) + _bytes(state)

    peak_clean = _allocation_peak(clean_step)
    peak_nan = _allocation_peak(nan_step)
    peak_ignore = _allocation_peak(ignore_step)
    runs = {"clean": clean_step, "nan": nan_step, "ignore": ignore_step}
    times: dict[str, list[float]] = {k: [] for k in runs}
    order = list(runs)
    for r in range(repeats):
        for k in (order if r % 2 == 0 else order[::-1]):
            times[k].append(_timed(runs[k]))
    t = {k: statistics.median(v) for k, v in times.items()}
    return {"optimizer": name, "param+state MiB": f"{base / 2**20:.1f}",
            "peak ignore MiB": f"{peak_ignore / 2**20:.1f}",
            "peak clean MiB": f"{peak_clean / 2**20:.1f}",
            "peak NaN MiB": f"{peak_nan / 2**20:.1f}",
            "NaN extra/(param+state)": f"{(peak_nan - peak_clean) / base:.3f}",
            "skip extra/(param+state)": f"{(peak_clean - peak_ignore) / base:.3f}",
            "ignore ms": f"{t['ignore'] * 1e3:.2f}",
            "clean ms": f"{t['clean'] * 1e3:.2f}", "NaN ms": f"{t['nan'] * 1e3:.2f}",
            "NaN/clean time": f"{t['nan'] / t['clean']:.3f}",
            "clean skip/ignore time": f"{t['clean'] / t['ignore']:.3f}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--optimizers", nargs="+", default=list(BUILDERS), choices=list(BUILDERS))
    ap.add_argument("--repeats", type=int, default=41, help="timed steps per kind")
    ap.add_argument("--quick", action="store_true", help="d=128, 2 layers, 9 repeats")
    args = ap.parse_args()
    if args.quick:
        args.d, args.layers, args.repeats = 128, 2, 9
    torch.set_num_threads(1)
    print(machine_description())
    rows = [measure(n, args.d, args.layers, args.repeats) for n in args.optimizers]
    print_table(rows, title=f"nonfinite='skip': NaN step vs clean step, {args.layers} x "
                            f"Linear({args.d}, {args.d})")


if __name__ == "__main__":
    main()
