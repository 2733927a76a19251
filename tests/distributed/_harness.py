"""Shared pieces of the distributed tests: the model, the data, a bounded 2-process launcher.

The workers run in processes spawned by :func:`launch` (gloo on the CPU, a free
port, a hard timeout that kills them instead of hanging the suite).
"""

from __future__ import annotations

import importlib
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

STEPS = 4
BATCH = 8


class Net(nn.Module):
    """Uneven shards on 2 ranks: 10 rows (5/5), 7 rows (4/3), 1 row (1/0: an empty shard);
    two 8×8 matrices (one shape batch); biases (the AdamW path)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 10)
        self.b = nn.Linear(10, 8)
        self.c = nn.Linear(8, 8, bias=False)
        self.d = nn.Linear(8, 8, bias=False)
        self.e = nn.Linear(8, 7)
        self.f = nn.Linear(7, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in (self.a, self.b, self.c, self.d, self.e):
            x = torch.tanh(layer(x))
        return self.f(x).sum(-1)  # not a view (FSDP2 warns on views)


def make_model() -> Net:
    torch.manual_seed(0)
    return Net()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(BATCH, 6, generator=g)
    return x, torch.sin(x.sum(-1))


def local_batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch(step)
    k = BATCH // world
    return x[rank * k:(rank + 1) * k], y[rank * k:(rank + 1) * k]


def train_step(model: nn.Module, opt: torch.optim.Optimizer, step: int, rank: int = 0,
               world: int = 1) -> float:
    """One step on this rank's slice of the batch; returns the global mean loss."""
    x, y = local_batch(step, rank, world)
    loss = (model(x) - y).square().mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    value = loss.detach().clone()
    if world > 1:
        dist.all_reduce(value)
        value /= world
    return float(value)


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Whole parameters by FQN (gathers DTensors; strips DDP's ``module.``)."""
    out = {}
    for n, p in model.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[n.removeprefix("module.")] = t.detach().clone()
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: The c10d collectives a stand-in checks (what matrixopt and these tests call).
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_to_all_single",
               "reduce_scatter_tensor", "broadcast", "reduce")


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _tensors(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    return []


def check_collective_devices(device: torch.device) -> dict[str, Any]:
    """Replace the :data:`COLLECTIVES` of :mod:`torch.distributed` by stand-ins that
    record, per call, whether every tensor handed over lives on ``device`` (the
    parameters' device: NCCL rejects CPU tensors) and is a plain tensor, then call the
    real collective. Returns ``{"calls": {name: count}, "violations": [...]}``.

    With gloo on the CPU the parameters are CPU tensors, so this proves that every
    payload is a plain tensor on the parameters' device and that no path hands a
    collective a tensor of another device; it cannot tell a tensor created on the
    parameters' device from one created without a device (the default, CPU) -- the
    Muon job's steps under ``torch.device("meta")`` cover that -- nor from one created
    with a hard-coded ``device="cpu"``.
    """
    record: dict[str, Any] = {"calls": dict.fromkeys(COLLECTIVES, 0), "violations": []}
    for name in COLLECTIVES:
        real = getattr(dist, name)

        def stand_in(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            record["calls"][_name] += 1
            for t in _tensors(args) + _tensors(kwargs):
                if t.device != device or type(t) is not torch.Tensor:
                    record["violations"].append((_name, str(t.device), type(t).__name__,
                                                 tuple(t.shape)))
            return _real(*args, **kwargs)

        setattr(dist, name, stand_in)
    return record


def _entry(rank: int, fn: Callable[..., Any], world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    record = check_collective_devices(torch.device("cpu"))  # gloo: CPU parameters
    try:
        fn(rank, world, Path(out))
    finally:
        torch.save(record, Path(out) / f"collectives-{rank}.pt")
        dist.destroy_process_group()


def launch(fn: Callable[..., Any], out: Path, world: int = 2, timeout: float = 90.0) -> None:
    """Run ``fn(rank, world, out)`` on ``world`` gloo processes; raise on error or timeout."""
    ctx = mp.start_processes(_entry, args=(fn, world, free_port(), str(out)), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"distributed workers did not finish within {timeout} s")


#: ``{name: test module}`` whose ``_job`` runs in the shared launch (results under ``out/name``)
SHARED_LAUNCH = {"muon": "test_muon_distributed", "lowrank": "test_lowrank_distributed",
                 "parity": "test_fsdp2_parity", "operators": "test_operators_distributed",
                 "shampoo": "test_shampoo_distributed",
                 "muon_pipeline": "test_muon_pipeline_distributed",
                 "adafactor_int8": "test_adafactor_int8_distributed",
                 "soap": "test_soap_distributed", "dion": "test_dion_distributed"}


def all_jobs(rank: int, world: int, out: Path) -> None:
    """Every test module's 2-process job in one launch (process start-up dominates)."""
    for name, module in SHARED_LAUNCH.items():
        mod = importlib.import_module(module)
        (out / name).mkdir(exist_ok=True)
        mod._job(rank, world, out / name)
