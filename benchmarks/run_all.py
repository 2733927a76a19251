"""Run every benchmark in one go (the tables in README.md come from these scripts).

    python benchmarks/run_all.py            # full runs (tens of minutes on 2 cores)
    python benchmarks/run_all.py --quick    # smoke runs of each script
    python benchmarks/run_all.py --only muon lowrank
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_description  # noqa: E402

SCRIPTS = ["orthogonalize", "polar", "projectors", "muon", "lowrank", "kernels"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", nargs="+", choices=SCRIPTS, default=SCRIPTS)
    args = p.parse_args(argv)
    print(machine_description(["heavyball", "pytorch_optimizer", "galore-torch", "scipy", "triton"]))
    for name in args.only:
        mod = importlib.import_module(f"bench_{name}")
        print(f"\n## bench_{name}.py {'--quick' if args.quick else ''}", flush=True)
        t0 = time.perf_counter()
        mod.main(["--quick"] if args.quick and name != "kernels" else [])
        print(f"(bench_{name}: {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
