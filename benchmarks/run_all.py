"""Run every benchmark in one go (the tables in README.md come from these scripts).

    python benchmarks/run_all.py            # full runs (tens of minutes on 2 cores)
    python benchmarks/run_all.py --quick    # smoke runs of each script
    python benchmarks/run_all.py --only muon lowrank
    python benchmarks/run_all.py --only soak   # the 5,000-step NaN-injection soak (long)
    python benchmarks/run_all.py --only kronecker shampoo dion qk_clip   # the newer families

Every README table names the script (and flags) that produced it; this runs them
all with their defaults, after printing the machine and library versions.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_description  # noqa: E402

SCRIPTS = ["orthogonalize", "polar", "projectors", "muon", "lowrank", "memory", "distributed",
           "kernels", "kronecker", "shampoo", "dion", "qk_clip"]
# names run by another script's entry point: (script, function, its own arguments)
ENTRY = {"dion": ("bench_distributed", "dion_main", ["--dion"])}
EXTRA = ["soak"]  # not in the default set: 5,000 steps x 3 optimizers x 2 runs
# smoke-run arguments of the scripts that have no --quick flag
QUICK_ARGS = {"kernels": [], "distributed": ["--d-model", "32", "--n-layer", "1", "--min-time",
                                             "0.1"],
              "soak": ["--steps", "40", "--inject-every", "10", "--ckpt-every", "20",
                       "--n-layer", "1", "--d-model", "32", "--timing-steps", "5"],
              "dion": ["--d-model", "32", "--n-layer", "1", "--n-head", "2"],
              "qk_clip": ["--steps", "10", "--n-layer", "1", "--d-model", "32", "--eval-batches",
                          "1", "--no-plot", "--out",
                          str(Path(tempfile.gettempdir()) / "matrixopt_qk_clip_quick")]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", nargs="+", choices=SCRIPTS + EXTRA, default=SCRIPTS)
    args = p.parse_args(argv)
    print(machine_description(["heavyball", "pytorch_optimizer", "galore-torch", "scipy", "triton",
                               "bitsandbytes"]))
    for name in args.only:
        script, entry, own = ENTRY.get(name, (name if name in EXTRA else f"bench_{name}",
                                              "main", []))
        mod = importlib.import_module(script)
        argv = own + (QUICK_ARGS.get(name, ["--quick"]) if args.quick else [])
        print(f"\n## {script}.py {' '.join(argv)}", flush=True)
        t0 = time.perf_counter()
        getattr(mod, entry)(argv)
        print(f"({script}: {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
