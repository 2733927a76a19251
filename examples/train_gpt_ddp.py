"""Data-parallel training of the small GPT with matrixopt, on CPU (gloo) or GPU (nccl).

    torchrun --nproc-per-node 2 examples/train_gpt_ddp.py --mode ddp  --optimizer muon
    torchrun --nproc-per-node 2 examples/train_gpt_ddp.py --mode fsdp --optimizer muon \\
        --checkpoint /tmp/ckpt        # saves a DCP checkpoint at the end
    python examples/train_gpt_ddp.py --resume /tmp/ckpt   # resumes it in one process

``--mode ddp``: DistributedDataParallel; Muon gets ``process_group`` so each rank
orthogonalises only its share of the matrices (balanced by flops) and one
all-gather exchanges the updates. ``--mode fsdp``: FSDP2 ``fully_shard`` per
block; Muon sees DTensor shards and moves whole matrices with two all-to-alls.
Checkpoints use ``torch.distributed.checkpoint`` and load at any world size.

``--device auto`` (default) trains on ``cuda`` when a GPU is present (each rank
on ``cuda:LOCAL_RANK``, process group ``nccl``) and on the CPU otherwise
(``gloo``); ``--device cpu`` forces the CPU.
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
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpt import GPT, CharData, GPTConfig  # noqa: E402
from train_gpt import build_optimizer  # noqa: E402

import matrixopt  # noqa: E402
from matrixopt.optim import muon_param_groups  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["ddp", "fsdp"], default="ddp")
    p.add_argument("--optimizer", default="muon",
                   choices=["muon", "adamw", "adafactor", "galore_adamw"])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=16, help="per rank")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto: cuda when available (nccl), else cpu (gloo)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="save a DCP checkpoint here at the end")
    p.add_argument("--resume", type=Path, default=None,
                   help="load a DCP checkpoint before training")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[float]:
    args = parse_args(argv)
    distributed = "WORLD_SIZE" in os.environ  # launched by torchrun
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if distributed:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.manual_seed(args.seed)  # same initial weights on every rank
    data = CharData()
    model = GPT(GPTConfig(vocab_size=data.vocab_size, seq_len=args.seq_len,
                          n_layer=args.n_layer, d_model=args.d_model, n_head=args.n_head))
    model = model.to(device)  # before DDP / fully_shard: they wrap the device's tensors
    if distributed and args.mode == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if use_cuda else None)
    elif distributed:
        from torch.distributed.fsdp import fully_shard
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    if args.optimizer == "muon":
        # under DDP, pass the group so the ranks split the orthogonalisation
        group = dist.group.WORLD if distributed and args.mode == "ddp" else None
        opt: Any = matrixopt.Muon(muon_param_groups(model), lr=args.lr, weight_decay=0.1,
                                  betas=(0.9, 0.95), process_group=group)
    else:
        opt = build_optimizer(args.optimizer, model, args.lr)
    if args.resume is not None:
        msd, osd = get_state_dict(model, opt)
        sd = {"model": msd, "optim": osd}
        dcp.load(sd, checkpoint_id=str(args.resume), no_dist=not distributed)
        set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])

    gen = torch.Generator().manual_seed(args.seed + 1 + rank)  # each rank its own batches
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(args.steps):
        x, y = data.batch("train", args.batch_size, args.seq_len, gen)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = loss.detach().clone()
        if distributed:
            dist.all_reduce(value)
            value /= world
        losses.append(float(value))
        if rank == 0 and (step % 10 == 0 or step + 1 == args.steps):
            print(f"step {step:4d}  loss {losses[-1]:.4f}  ({time.perf_counter() - t0:.1f} s, "
                  f"world {world}, {args.mode if distributed else 'single'}, {args.optimizer})")
    if args.checkpoint is not None:
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(args.checkpoint),
                 no_dist=not distributed)
        if rank == 0:
            print(f"saved checkpoint to {args.checkpoint}")
    if distributed:
        dist.destroy_process_group()
    return losses


if __name__ == "__main__":
    main()
