"""Distributed Muon on N CPU ranks (gloo): bytes communicated per step vs AdamW, and
the orthogonalisation phase per rank vs one process.

Same GPT (examples/gpt.py), same initialisation. Byte accounting per rank and
step, ring algorithms (what each rank sends):

* DDP gradient all-reduce: counted by a DDP comm hook, ``2 (w-1)/w`` × bucket bytes.
* Muon's own collectives: counted by :func:`matrixopt.optim._distributed.count_bytes`
  (DDP: one all-gather of the updates, ``(w-1)`` × padded per-rank buffer; FSDP2:
  two all-to-alls, what the rank sends to others).
* Adafactor and GaLoreAdamW under FSDP2 (statistics and projections on the shards):
  their own all-reduces (column statistics, RMS scalars; the sharded range finder's
  ``n × r`` products and TSQR factors at a refresh), counted by ``count_bytes``, on
  top of the FSDP2 baseline; the "ratio" column is then optimizer vs AdamW too.
* FSDP2 baseline (``reshard_after_forward=False``: one parameter all-gather per
  step, one gradient reduce-scatter): ``2 (w-1)/w`` × padded parameter bytes,
  computed from the shard sizes.

* GaLoreAdamW between refreshes (``--galore-sides``, default std/left/right/routed, rank
  ``d_model/4``, ``update_proj_gap=1000``: one warm-up step does the first refresh
  outside the count): a right projection is local (moments ``G P`` row-sharded), a
  left one all-reduces its ``r × n`` projected gradient, plus the skip flags' one
  all-reduce per group. "routed" is the recommended setup: ``galore_param_groups``
  (hidden matrices, ``proj_type="std"``; embeddings, head and norms plain AdamW).

The orthogonalisation phase is the local compute of the matrices a rank owns
(:func:`lpt_assign` plan), timed on each rank while the other ranks time theirs
("concurrent": on this shared 2-core machine the ranks compete for the cores)
and each share timed alone in one process, vs all matrices in one process (median of
repeated runs; the machine is shared, use the same-run ratio).

    python benchmarks/bench_distributed.py            # 2 ranks
    python benchmarks/bench_distributed.py --world 2 --d-model 128 --n-layer 4
    python benchmarks/bench_distributed.py --d-model 512 --n-layer 2 --bytes-only

``--overlap``: Muon's FSDP2 step time with the pipelined exchange (asynchronous
all-to-alls, ``pipeline_depth=2``: the next rounds travel while one is
orthogonalised) vs one blocking round (``pipeline_depth=0``), same run, same
gradients, interleaved repeats, median per rank (``--mats`` Linear layers
alternating 512×512 and 1024×512 weights, bf16 iterations, 1 thread per rank):

    python benchmarks/bench_distributed.py --overlap --mats 10 --repeats 15
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_description, median_time, print_table  # noqa: E402
from gpt import GPT, CharData, GPTConfig  # noqa: E402

from matrixopt.linalg.orthogonalization import orthogonalize  # noqa: E402
from matrixopt.optim import (  # noqa: E402
    Adafactor,
    GaLoreAdamW,
    Muon,
    galore_param_groups,
    muon_param_groups,
)
from matrixopt.optim._distributed import _batched, count_bytes, lpt_assign, matrix_cost, shard_rows  # noqa: E402

STEPS = 3


def _model(args: argparse.Namespace, vocab: int) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=vocab, seq_len=args.seq_len, n_layer=args.n_layer,
                         d_model=args.d_model, n_head=args.n_head))


def _muon_mats(model: torch.nn.Module) -> list[torch.Tensor]:
    """Random stand-ins for the momentum of every Muon-routed matrix."""
    g = torch.Generator().manual_seed(0)
    mats = []
    for group in muon_param_groups(model):
        if group.get("algorithm") == "muon":
            mats += [torch.randn(1, *p.shape, generator=g) for p in group["params"]]
    return mats


def _orth(X: torch.Tensor) -> torch.Tensor:
    return orthogonalize(X, dtype=torch.bfloat16)


def _job(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    data = CharData()
    gen = torch.Generator().manual_seed(1 + rank)
    res: dict[str, Any] = {}
    ddp_bytes = [0]

    def hook(state, bucket):  # type: ignore[no-untyped-def]  # DDP checks annotations
        buf = bucket.buffer()
        ddp_bytes[0] += 2 * (world - 1) * buf.numel() * buf.element_size() // world
        return allreduce_hook(state, bucket)

    def run(model: torch.nn.Module, opt: torch.optim.Optimizer) -> float:
        t0 = time.perf_counter()
        for _ in range(STEPS):
            x, y = data.batch("train", args.batch_size, args.seq_len, gen)
            opt.zero_grad(set_to_none=True)
            model(x, y).backward()
            opt.step()
        return (time.perf_counter() - t0) / STEPS

    for name in () if args.bytes_only else ("adamw", "muon"):
        model = DDP(_model(args, data.vocab_size))
        model.register_comm_hook(None, hook)
        opt = (torch.optim.AdamW(model.parameters(), lr=1e-3) if name == "adamw" else
               Muon(muon_param_groups(model), lr=1e-3, process_group=dist.group.WORLD))
        ddp_bytes[0] = 0
        with count_bytes() as c:
            res[f"ddp_{name}_s"] = run(model, opt)
        res[f"ddp_{name}_bytes"] = (ddp_bytes[0] + sum(c.values())) / STEPS

    model = _model(args, data.vocab_size)
    pbytes = sum(shard_rows(p.shape[0], world)[0] * world * p[0].numel() * p.element_size()
                 for p in model.parameters())
    fully_shard(model, reshard_after_forward=False)
    opt = Muon(muon_param_groups(model), lr=1e-3)
    with count_bytes() as c:
        res["fsdp_muon_s"] = run(model, opt)
    base = 2 * (world - 1) * pbytes // world
    res["fsdp_adamw_bytes"] = base
    res["fsdp_muon_bytes"] = base + sum(c.values()) / STEPS
    # Adafactor / GaLoreAdamW on shards: only their own small all-reduces come on top
    for name in ("adafactor", "galore"):
        model = _model(args, data.vocab_size)
        fully_shard(model, reshard_after_forward=False)
        opt = (Adafactor(model.parameters(), lr=1e-3, relative_step=False) if name == "adafactor"
               else GaLoreAdamW(model.parameters(), lr=1e-3, rank=max(1, args.d_model // 4),
                                update_proj_gap=2, proj_type="right"))
        with count_bytes() as c:
            res[f"fsdp_{name}_s"] = run(model, opt)
        res[f"fsdp_{name}_bytes"] = base + sum(c.values()) / STEPS
    # GaLoreAdamW between refreshes, per projection side
    for side in args.galore_sides:
        model = _model(args, data.vocab_size)
        fully_shard(model, reshard_after_forward=False)
        rank_ = max(1, args.d_model // 4)
        # "routed": the recommended setup, galore_param_groups (hidden matrices projected
        # with the default proj_type "std"; embeddings, head and norms take plain AdamW)
        params = (galore_param_groups(model, rank=rank_, update_proj_gap=1000)
                  if side == "routed" else model.parameters())
        opt = GaLoreAdamW(params, lr=1e-3, rank=None if side == "routed" else rank_,
                          update_proj_gap=1000,
                          proj_type="std" if side == "routed" else side)
        run_steps = STEPS
        run(model, opt)  # the first refresh (and state creation) outside the count
        with count_bytes() as c:
            res[f"fsdp_galore_{side}_s"] = run(model, opt)
        res[f"fsdp_galore_{side}_bytes"] = base + sum(c.values()) / run_steps
        res[f"fsdp_galore_{side}_parts"] = dict(c)
    if args.bytes_only:
        gathered0: list[Any] = [None] * world
        dist.all_gather_object(gathered0, res)
        if rank == 0:
            torch.save(gathered0, out)
        dist.destroy_process_group()
        return

    # orthogonalisation phase: this rank's share of the matrices
    mats = _muon_mats(_model(args, data.vocab_size))
    owner = lpt_assign([matrix_cost(*m.shape) for m in mats], world)
    mine = [m for m, o in zip(mats, owner) if o == rank]
    dist.barrier()
    res["ortho_s"] = median_time(lambda: _batched(mine, _orth), min_run_time=args.min_time) \
        if mine else 0.0
    res["ortho_share"] = sum(matrix_cost(*m.shape) for m in mine) / sum(
        matrix_cost(*m.shape) for m in mats)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, res)
    if rank == 0:
        torch.save(gathered, out)
    dist.destroy_process_group()


def _overlap_job(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.ModuleList(torch.nn.Linear(512, 512 if i % 2 == 0 else 1024, bias=False)
                                for i in range(args.mats))  # weights 512x512 / 1024x512
    for layer in model:
        fully_shard(layer)
    x = torch.randn(4, 512, generator=torch.Generator().manual_seed(rank))
    sum(layer(x).square().mean() for layer in model).backward()
    opt = Muon(model.parameters(), lr=1e-3)
    times: dict[int, list[float]] = {0: [], 2: []}
    for rep in range(args.repeats + 1):  # the first repeat warms up (state, buffers)
        for depth in ((0, 2) if rep % 2 else (2, 0)):
            opt._strategy.pipeline_depth = depth  # type: ignore[attr-defined]
            dist.barrier()
            t0 = time.perf_counter()
            opt.step()
            dt = time.perf_counter() - t0
            if rep:
                times[depth].append(dt)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, times)
    if rank == 0:
        torch.save(gathered, out)
    dist.destroy_process_group()


def overlap(args: argparse.Namespace, port: int, out: str) -> list[dict[str, Any]]:
    mp.spawn(_overlap_job, args=(args.world, port, args, out), nprocs=args.world)
    per_rank = torch.load(out, weights_only=False)
    med = [{d: float(torch.tensor(t[d]).median()) for d in t} for t in per_rank]
    rows = [{"rank": r, "blocking ms": 1e3 * m[0], "pipelined ms": 1e3 * m[2],
             "pipelined / blocking": m[2] / m[0]} for r, m in enumerate(med)]
    print(machine_description())
    print(f"Muon FSDP2 step, {args.mats} matrices (512x512 / 1024x512 alternating), "
          f"{args.world} gloo ranks, 1 thread each, median of {args.repeats} interleaved steps")
    print_table(rows, title="pipelined exchange vs one blocking round")
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--min-time", type=float, default=1.0, help="seconds per timing")
    p.add_argument("--overlap", action="store_true", help="pipelined vs blocking Muon FSDP2 step")
    p.add_argument("--mats", type=int, default=10, help="--overlap: number of matrices")
    p.add_argument("--repeats", type=int, default=15, help="--overlap: timed steps per mode")
    p.add_argument("--galore-sides", nargs="*", default=["std", "left", "right", "routed"],
                   help="GaLoreAdamW proj_type values measured between refreshes ('routed': "
                        "galore_param_groups, proj_type 'std')")
    p.add_argument("--bytes-only", action="store_true",
                   help="FSDP2 bytes only: skip DDP and the orthogonalisation timing")
    args = p.parse_args(argv)
    import socket
    import tempfile
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = os.path.join(tempfile.mkdtemp(), "res.pt")
    if args.overlap:
        return overlap(args, port, out)
    mp.spawn(_job, args=(args.world, port, args, out), nprocs=args.world)
    per_rank = torch.load(out, weights_only=False)
    r0 = per_rank[0]
    rows = [] if args.bytes_only else [
        {"setup": "DDP", "AdamW B/step": r0["ddp_adamw_bytes"], "Muon B/step": r0["ddp_muon_bytes"],
         "ratio": r0["ddp_muon_bytes"] / r0["ddp_adamw_bytes"]},
        {"setup": "FSDP2", "AdamW B/step": r0["fsdp_adamw_bytes"],
         "Muon B/step": r0["fsdp_muon_bytes"],
         "ratio": r0["fsdp_muon_bytes"] / r0["fsdp_adamw_bytes"]},
    ]
    rows += [{"setup": f"FSDP2 {label}", "AdamW B/step": r0["fsdp_adamw_bytes"],
              "optimizer B/step": r0[f"fsdp_{key}_bytes"],
              "ratio": r0[f"fsdp_{key}_bytes"] / r0["fsdp_adamw_bytes"]}
             for key, label in (("adafactor", "Adafactor"),
                                ("galore", "GaLoreAdamW right, refresh every 2 steps"),
                                *[(f"galore_{s}", f"GaLoreAdamW {s}, between refreshes")
                                  for s in args.galore_sides])]
    print(machine_description())
    print(f"model: GPT d_model={args.d_model} n_layer={args.n_layer}; {args.world} gloo ranks, "
          f"1 thread each; bytes per rank per step (ring accounting); GaLore rank "
          f"{max(1, args.d_model // 4)}")
    print_table(rows, ["setup", "AdamW B/step", "Muon B/step", "optimizer B/step", "ratio"],
                title="bytes communicated per step")
    if args.bytes_only:
        return rows
    torch.set_num_threads(1)
    mats = _muon_mats(_model(args, CharData().vocab_size))
    single = median_time(lambda: _batched(mats, _orth), min_run_time=args.min_time)
    # each rank's share timed alone (no other rank competing for the cores)
    owner = lpt_assign([matrix_cost(*m.shape) for m in mats], args.world)
    alone = [median_time(lambda r=r: _batched([m for m, o in zip(mats, owner) if o == r], _orth),
                         min_run_time=args.min_time) for r in range(args.world)]
    trows = [{"rank": r, "flop share": res["ortho_share"],
              "ms (ranks concurrent)": 1e3 * res["ortho_s"], "ms (alone)": 1e3 * alone[r],
              "alone vs single": alone[r] / single} for r, res in enumerate(per_rank)]
    trows.append({"rank": "single", "flop share": 1.0, "ms (alone)": 1e3 * single,
                  "alone vs single": 1.0})
    print_table(trows, title="orthogonalisation phase (bf16 iterations, 1 thread)")
    return rows + trows


# ---------------------------------------------------------------------------
# Dion vs Muon under FSDP2: the optimizers' own collectives (issue 17 target)
# ---------------------------------------------------------------------------
def _dion_job(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    from matrixopt.optim import Dion

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    data = CharData()
    gen = torch.Generator().manual_seed(1 + rank)
    configs = {
        "Muon (default, bf16 payload)": lambda m: Muon(muon_param_groups(m), lr=1e-3),
        "Dion r=1/4": lambda m: Dion(muon_param_groups(m), lr=1e-3, rank_fraction=0.25),
        "Dion r=1/4, comm_dtype=bf16": lambda m: Dion(
            muon_param_groups(m), lr=1e-3, rank_fraction=0.25, comm_dtype=torch.bfloat16),
    }
    res: dict[str, Any] = {}
    for name, make in configs.items():
        model = _model(args, data.vocab_size)
        fully_shard(model, reshard_after_forward=False)
        opt = make(model)
        times = []
        with count_bytes() as c:
            for _ in range(STEPS):
                x, y = data.batch("train", args.batch_size, args.seq_len, gen)
                opt.zero_grad(set_to_none=True)
                model(x, y).backward()
                dist.barrier()
                t0 = time.perf_counter()
                opt.step()
                times.append(time.perf_counter() - t0)
        res[name] = {"bytes": sum(c.values()) / STEPS, "kinds": dict(c),
                     "step_s": sorted(times)[len(times) // 2]}
    if rank == 0:
        torch.save(res, out)
    dist.destroy_process_group()


def dion_main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """``python benchmarks/bench_distributed.py --dion [--d-model 512 --n-layer 2]``: bytes
    per rank and step of the optimizer's own collectives under FSDP2 (``count_bytes``,
    ring accounting; the FSDP2 parameter all-gather / gradient reduce-scatter, the same
    for every optimizer, is not included), Dion vs Muon on the GPT."""
    p = argparse.ArgumentParser(description=dion_main.__doc__)
    p.add_argument("--dion", action="store_true")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    args = p.parse_args(argv)
    import socket
    import tempfile
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = os.path.join(tempfile.mkdtemp(), "dion.pt")
    mp.spawn(_dion_job, args=(args.world, port, args, out), nprocs=args.world)
    res = torch.load(out, weights_only=False)
    base = res["Muon (default, bf16 payload)"]["bytes"]
    rows = [{"optimizer": k, "optimizer B/step": v["bytes"], "vs Muon": v["bytes"] / base,
             "collectives": ", ".join(f"{n} {b / STEPS:.0f}" for n, b in v["kinds"].items() if b),
             "step ms (median)": 1e3 * v["step_s"]} for k, v in res.items()]
    print(machine_description())
    print(f"model: GPT d_model={args.d_model} n_layer={args.n_layer}; FSDP2 on {args.world} gloo "
          f"ranks, 1 thread each; bytes per rank per step of the optimizer's collectives")
    print_table(rows, title="FSDP2: Dion vs Muon, optimizer collectives")
    return rows


if __name__ == "__main__":
    if "--dion" in sys.argv[1:]:
        dion_main()
    else:
        main()
