"""Shared helpers for the benchmark scripts: timing, machine description, tables.

Timing on CPU uses ``torch.utils.benchmark`` (median of repeated runs, thread
count fixed); on GPU the kernel benchmark uses ``triton.testing.do_bench``.
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import io
import logging
import os
import platform
import sys
import warnings
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import torch.utils.benchmark as tbench

RESULTS_DIR = Path(__file__).resolve().parent.parent / "results"


def median_time(fn: Callable[[], Any], *, min_run_time: float = 1.0,
                num_threads: int | None = None) -> float:
    """Median wall time of ``fn()`` in seconds (torch.utils.benchmark, warm-up included)."""
    threads = num_threads if num_threads is not None else torch.get_num_threads()
    timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    fn()  # warm-up (allocations, lazy init)
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return float(m.median)


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_description(extra_packages: Sequence[str] = ()) -> str:
    """One paragraph naming the machine and the library versions used."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    pkgs = ["torch", "matrixopt", *extra_packages]
    versions = ", ".join(f"{p} {_version(p)}" for p in pkgs)
    return (f"machine: {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
            f"GPU: {gpu}; Python {sys.version.split()[0]}; {versions}")


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None,
                title: str | None = None) -> str:
    """Print ``rows`` as a Markdown table and return the text."""
    if not rows:
        return ""
    cols = list(columns) if columns else list(rows[0].keys())

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
                return f"{v:.2e}"
            return f"{v:.4g}"
        return str(v)

    lines = []
    if title:
        lines.append(f"\n{title}\n")
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_csv(rows: Sequence[dict[str, Any]], name: str) -> Path:
    """Write ``rows`` to ``results/<name>.csv`` and return the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.csv"
    cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    return path


def quiet_import(name: str) -> Any:
    """Import a peer library with its import-time logging, warnings and prints
    silenced (galore_torch and bitsandbytes complain about missing GPU kernels);
    ``None`` if it is not installed."""
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except ImportError:
        return None
    finally:
        logging.disable(logging.NOTSET)


def hidden_matrices(model: torch.nn.Module
                    ) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """The GPT's hidden-layer matrices (2-D parameters under ``blocks.``) and the rest
    (embeddings, head, norms, biases): the split the low-rank benchmarks use."""
    mats, rest = [], []
    for name, p in model.named_parameters():
        (mats if p.ndim == 2 and name.startswith("blocks.") else rest).append(p)
    return mats, rest
