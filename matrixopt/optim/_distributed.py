r"""Data-parallel orthogonalisation for Muon: DDP work splitting and FSDP2 shards.

Orthogonalisation needs whole matrices, so data parallelism needs a plan for it
(REFERENCE §2 "Distributed"; Liu et al. 2025, "Muon is Scalable for LLM
Training", Distributed Muon). Everything here uses :mod:`torch.distributed`
collectives only.

**DDP** (plain tensors, gradients already averaged by DDP's all-reduce, so every
rank holds the same momentum): the matrices are assigned to ranks by greedy
longest-processing-time scheduling on their cost :math:`b\,\min(m,n)^2\max(m,n)`
(:func:`lpt_assign`, deterministic, so every rank computes the same plan); each
rank orthogonalises only its own matrices (batched by shape) and one
``all_gather`` of a padded flat buffer gives every rank every update. The
exchange runs in the iteration dtype when it is narrower than the parameters'
(bf16 iterations of fp32 parameters → bf16 payload, half the bytes). That is
decided from the configuration alone -- no collective, no host read -- and is
exact: :func:`~matrixopt.linalg.orthogonalize` returns its last iterate, held in
the iteration dtype, cast to the input's. Every rank, the owner included, uses
the exchanged values, so replicas never drift apart.

**Devices**: every tensor handed to a collective here is created on the
parameters' device (NCCL accepts no CPU tensor), and nothing in these paths
reads a device value on the host.

**FSDP2** (:func:`torch.distributed.fsdp.fully_shard`; parameters, gradients
and momentum are DTensors with placement ``Shard(0)`` on a 1-D mesh; the local
shards follow :func:`torch.chunk`, so they can be uneven or empty): the
matrices are assigned to ranks the same way, one ``all_to_all_single`` sends
every local shard (padded to the chunk size) to the matrix's owner — in the
iteration dtype when it is narrower than the momentum's (bf16 by default, as
Moonlight; the iteration rounds to it right after normalising, so this only
adds one rounding before the norm; with ``ns_dtype=None`` or float32 the
result equals the single-process one to fp32 rounding) — the owner
stitches whole matrices, orthogonalises them as shape batches, and one
``all_to_all_single`` returns each rank its rows. Momentum never leaves its
shard; the AdamW path is elementwise on local shards. The exchange is pipelined
as microsoft/dion's: the matrices go in rounds (:func:`fsdp_rounds`: per shape,
one large matrix or a batch of small ones per owner and round), every
all-to-all is asynchronous, the next rounds' shards travel while a round is
orthogonalised and its results travel back while the next is; the values are
those of one blocking round (``depth=0``).

:func:`count_bytes` records the bytes of the collectives issued here (for the
benchmark), with ring-algorithm accounting: per rank, an all-gather of a buffer
of :math:`S` bytes per rank moves :math:`(w-1)S`, an all-to-all moves what the
rank sends to the others, an all-reduce of :math:`S` bytes moves :math:`2(w-1)S/w`
(reduce-scatter + all-gather).

**Adafactor and GaLoreAdamW under FSDP2** keep their statistics on the local
shards and reduce only small matrices over the mesh (:func:`all_reduce_sum`, the
``reduce`` of :class:`~matrixopt.optim._dist.FSDP2Rows`): see
:mod:`matrixopt.optim.functional.adafactor` and :func:`row_shards` (the
projector refresh). The refresh is linalg's own range finder
(:func:`~matrixopt.linalg.projectors.lowrank_basis` with ``shards=``): this module
only supplies its hooks, :func:`row_shards` (sums and maxima by ``all_reduce``, the
QR of a row-sharded matrix by :func:`_tsqr`), so the sharded and single-process
refreshes are one code path with the same options.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import heapq
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeGuard

import torch
import torch.distributed as dist
from torch import Tensor

from ..linalg.projectors import RowShards

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = ["lpt_assign", "matrix_cost", "shard_rows", "DistContext", "resolve_context",
           "local_tensor", "distributed_orthogonalize", "count_bytes", "all_reduce_sum",
           "row_shards", "all_reduce_max", "payload_dtype",
           "fsdp_rounds", "all_gather_rows", "blocks_follow_shards"]

_COUNTERS: list[dict[str, int]] = []


@contextlib.contextmanager
def count_bytes() -> Iterator[dict[str, int]]:
    """Count the bytes each rank sends in the collectives of this module.

    Yields a dict ``{"all_gather": bytes, "all_to_all": bytes, "all_reduce": bytes}``
    filled while the context is open (ring accounting, see the module docstring).
    """
    c = {"all_gather": 0, "all_to_all": 0, "all_reduce": 0}
    _COUNTERS.append(c)
    try:
        yield c
    finally:
        _COUNTERS.remove(c)


def _record(kind: str, nbytes: int) -> None:
    for c in _COUNTERS:
        c[kind] += nbytes


def _is_dtensor(t: Tensor) -> TypeGuard[DTensor]:
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def local_tensor(t: Tensor) -> Tensor:
    """The local shard of a DTensor (shares storage), or ``t`` itself."""
    return t.to_local() if _is_dtensor(t) else t


def matrix_cost(b: int, m: int, n: int) -> int:
    r"""Flop proxy of orthogonalising ``b`` matrices of ``m × n``: :math:`b\,s^2 l`,
    ``s``/``l`` the short/long side (one Newton–Schulz step costs ≈ :math:`4s^2l + 2s^3`)."""
    s, l = min(m, n), max(m, n)
    return b * s * s * l


def lpt_assign(costs: Sequence[float], world: int) -> list[int]:
    """Owner rank of each job: greedy longest-processing-time scheduling.

    Jobs in decreasing cost (ties: lower index first) go to the currently least
    loaded rank (ties: lower rank). Deterministic, so every rank computes the
    same plan; the makespan is at most 4/3 of the optimum (Graham 1969).
    """
    if world < 1:
        raise ValueError(f"lpt_assign: world must be >= 1, got {world}")
    owner = [0] * len(costs)
    heap = [(0.0, r) for r in range(world)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, r = heapq.heappop(heap)
        owner[i] = r
        heapq.heappush(heap, (load + float(costs[i]), r))
    return owner


def shard_rows(rows: int, world: int) -> tuple[int, list[int]]:
    """``(chunk, rows_per_rank)`` of a dim-0 shard with :func:`torch.chunk` semantics
    (FSDP2's and DTensor ``Shard(0)``'s): chunk ``ceil(rows/world)``, trailing ranks
    get fewer rows or none."""
    chunk = -(-rows // world) if rows else 0
    return chunk, [max(0, min(chunk, rows - r * chunk)) for r in range(world)]


@dataclass(frozen=True)
class DistContext:
    """How an optimizer's matrices are spread: ``mode`` is ``"ddp"`` or ``"fsdp"``."""

    mode: str
    group: Any
    world: int
    rank: int


def _describe_mesh(p: DTensor) -> str:
    return f"mesh {p.device_mesh} with placements {tuple(p.placements)}"


def resolve_context(owner: str, params: Sequence[Tensor], process_group: Any | None
                    ) -> DistContext | None:
    """Decide how ``params`` are distributed and validate it (at construction).

    * DTensor parameters (FSDP2): all must be ``Shard(0)`` on the same 1-D mesh;
      ``process_group``, if given, must be that mesh's group.
    * plain parameters with a ``process_group`` (DDP): the group's ranks split the
      orthogonalisation; ``torch.distributed`` must be initialised.
    * plain parameters without one: ``None`` (single process).

    Raises ``ValueError`` naming the placement, mesh or group that is not supported.
    """
    dts = [p for p in params if _is_dtensor(p)]
    if dts:
        from torch.distributed.tensor import Shard
        if len(dts) != len(params):
            raise ValueError(f"{owner}: parameters mix DTensors and plain tensors; give all "
                             f"parameters the same parallelism (fully_shard the whole model)")
        mesh = dts[0].device_mesh
        for p in dts:
            if p.device_mesh.ndim != 1:
                raise ValueError(f"{owner}: DTensor parameter of shape {tuple(p.shape)} lives "
                                 f"on a {p.device_mesh.ndim}-D {_describe_mesh(p)}; only a 1-D "
                                 f"mesh (FSDP2 fully_shard) is supported")
            if tuple(p.placements) != (Shard(0),):
                raise ValueError(f"{owner}: DTensor parameter of shape {tuple(p.shape)} has "
                                 f"placements {tuple(p.placements)}; only (Shard(dim=0),) "
                                 f"(FSDP2 fully_shard) is supported")
            if p.device_mesh != mesh:
                raise ValueError(f"{owner}: DTensor parameters live on different meshes "
                                 f"({mesh} and {p.device_mesh}); use one optimizer per mesh")
        group = mesh.get_group()
        if process_group is not None and process_group != group:
            raise ValueError(f"{owner}: process_group {process_group} is not the device mesh's "
                             f"group {group} that the parameters are sharded over")
        return DistContext("fsdp", group, dist.get_world_size(group), dist.get_rank(group))
    if process_group is None:
        return None
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"{owner}: process_group={process_group!r} given but "
                         f"torch.distributed is not initialised")
    world = dist.get_world_size(process_group)
    rank = dist.get_rank(process_group)
    if rank < 0:
        raise ValueError(f"{owner}: this process is not a member of process_group "
                         f"{process_group}")
    return DistContext("ddp", process_group, world, rank)


def _batched(mats: list[Tensor], orth: Callable[[Tensor], Tensor]) -> list[Tensor]:
    """Orthogonalise ``[b, m, n]`` tensors, one ``orth`` call per (shape, dtype, device)."""
    buckets: dict[tuple[Any, ...], list[int]] = {}
    for i, x in enumerate(mats):
        buckets.setdefault((x.shape[1], x.shape[2], x.dtype, x.device), []).append(i)
    out: list[Tensor | None] = [None] * len(mats)
    for idx in buckets.values():
        xs = [mats[i] for i in idx]
        O = orth(xs[0] if len(xs) == 1 else torch.cat(xs, dim=0))
        for i, chunk in zip(idx, O.split([mats[i].shape[0] for i in idx], dim=0)):
            out[i] = chunk
    return out  # type: ignore[return-value]


def payload_dtype(dtype: torch.dtype, comm_dtype: torch.dtype | None) -> torch.dtype:
    """Dtype of the orthogonalised updates on the wire: ``comm_dtype`` (the iteration
    dtype) when it is a floating dtype narrower than ``dtype`` (the directions'), else
    ``dtype``.

    Exact: :func:`~matrixopt.linalg.orthogonalize` with ``dtype=comm_dtype`` ends with
    its last iterate, held in ``comm_dtype``, cast to the input dtype, so the values
    round-trip through ``comm_dtype`` unchanged. Decided from the configuration only:
    every rank agrees without a collective and nothing is read from the device.
    """
    if (comm_dtype is None or not comm_dtype.is_floating_point
            or torch.finfo(comm_dtype).bits >= torch.finfo(dtype).bits):
        return dtype
    return comm_dtype


def distributed_orthogonalize(ctx: DistContext | None, dirs: list[Tensor],
                              views: list[tuple[int, int, int]], full_shapes: list[torch.Size],
                              orth: Callable[[Tensor], Tensor],
                              comm_dtype: torch.dtype | None = None, depth: int = 2
                              ) -> list[Tensor]:
    """Orthogonalised ``dirs``, shaped like ``dirs`` (whole or local shards).

    Args:
        ctx: ``None`` (single process), DDP or FSDP2 context from :func:`resolve_context`.
        dirs: update directions — whole tensors (single process, DDP) or the local
            ``Shard(0)`` shards of tensors of ``full_shapes`` (FSDP2).
        views: ``(b, m, n)`` matrix view of each full tensor.
        full_shapes: global shape of each tensor.
        orth: orthogonalises a ``[B, m, n]`` batch.
        comm_dtype: preferred payload dtype of the returned updates (used only
            where the result is exactly representable in it).
        depth: FSDP2 only: exchange rounds in flight ahead of the one being
            orthogonalised (:func:`fsdp_rounds`, asynchronous all-to-alls); 0: one
            blocking round for everything. Same values either way.
    """
    if ctx is None or ctx.world == 1:
        mats = [d.reshape(v) for d, v in zip(dirs, views)]
        return [O.reshape(d.shape) for O, d in zip(_batched(mats, orth), dirs)]
    owner = lpt_assign([matrix_cost(*v) for v in views], ctx.world)
    if ctx.mode == "ddp":
        return _ddp(ctx, dirs, views, owner, orth, comm_dtype)
    return _fsdp(ctx, dirs, views, full_shapes, owner, orth, comm_dtype, depth)


def _ddp(ctx: DistContext, dirs: list[Tensor], views: list[tuple[int, int, int]],
         owner: list[int], orth: Callable[[Tensor], Tensor],
         comm_dtype: torch.dtype | None) -> list[Tensor]:
    if len({(d.dtype, d.device) for d in dirs}) > 1:
        raise ValueError("Muon (DDP): all Muon parameters of a group must share dtype and device, "
                         f"got {sorted({str((d.dtype, d.device)) for d in dirs})}")
    mine = [i for i, o in enumerate(owner) if o == ctx.rank]
    done = _batched([dirs[i].reshape(views[i]) for i in mine], orth)
    # every rank derives the same payload dtype from the configuration (exact, see
    # payload_dtype): no agreement round, no host read
    dtype = payload_dtype(dirs[0].dtype, comm_dtype)
    sizes = [sum(dirs[i].numel() for i, o in enumerate(owner) if o == r) for r in range(ctx.world)]
    width = max(sizes)
    buf = torch.zeros(width, dtype=dtype, device=dirs[0].device)
    if done:
        torch.cat([O.reshape(-1).to(dtype) for O in done], out=buf[:sizes[ctx.rank]])
    gathered = [torch.empty_like(buf) for _ in range(ctx.world)]
    dist.all_gather(gathered, buf, group=ctx.group)
    _record("all_gather", (ctx.world - 1) * buf.numel() * buf.element_size())
    out: list[Tensor | None] = [None] * len(dirs)
    offsets = [0] * ctx.world
    for i, o in enumerate(owner):
        k = dirs[i].numel()
        out[i] = gathered[o][offsets[o]:offsets[o] + k].view(dirs[i].shape).to(dirs[i].dtype)
        offsets[o] += k
    return out  # type: ignore[return-value]


def fsdp_rounds(views: Sequence[tuple[int, int, int]], owner: Sequence[int], world: int,
                round_numel: int | None = None) -> list[list[int]]:
    """The exchange rounds of the FSDP2 orthogonalisation: lists of matrix indices, in
    the order every rank issues them (``round_numel=None``: one round, everything).

    Matrices are bucketed by their ``(m, n)`` view (first-appearance order); in a
    bucket, round ``j`` takes from each owner its ``j``-th chunk of ``c`` matrices,
    ``c = max(1, round_numel // (b·m·n))``: small matrices share a round, large ones
    go one per owner and round (microsoft/dion's batches of ``world`` matrices). An
    owner orthogonalises a round's matrices as one batch, a sub-batch of the batch it
    would form in one round; the iteration is per matrix, so the values are the same.
    """
    if round_numel is None:
        return [list(range(len(views)))] if views else []
    buckets: dict[tuple[int, int], list[int]] = {}
    for i, (_, m, n) in enumerate(views):
        buckets.setdefault((m, n), []).append(i)
    rounds = []
    for idx in buckets.values():
        per = [[i for i in idx if owner[i] == r] for r in range(world)]
        c = max(1, round_numel // max(math.prod(views[i]) for i in idx))
        for j in range(0, max(len(p) for p in per), c):
            rounds.append([i for p in per for i in p[j:j + c]])
    return rounds


#: Elements per owner batch under which same-shape matrices share an exchange round.
ROUND_NUMEL = 1 << 18


def _fsdp(ctx: DistContext, dirs: list[Tensor], views: list[tuple[int, int, int]],
          full_shapes: list[torch.Size], owner: list[int], orth: Callable[[Tensor], Tensor],
          comm_dtype: torch.dtype | None, depth: int = 2) -> list[Tensor]:
    w, me = ctx.world, ctx.rank
    if len({(d.dtype, d.device) for d in dirs}) > 1:
        raise ValueError("Muon (FSDP2): all Muon parameters of a group must share dtype and "
                         f"device, got {sorted({str((d.dtype, d.device)) for d in dirs})}")
    dtype, device = dirs[0].dtype, dirs[0].device
    # Payload in the iteration dtype when it is narrower (Moonlight's bf16 gather):
    # the iteration casts to it right after normalising anyway; the results are exact
    # in it (payload_dtype), so they return in it too.
    wire = payload_dtype(dtype, comm_dtype)
    plan = []  # (chunk rows, row numel, rows per rank) per tensor
    for d, shape in zip(dirs, full_shapes):
        chunk, rows = shard_rows(shape[0], w)
        row = math.prod(shape[1:])
        if d.shape[0] != rows[me] or d.numel() != rows[me] * row:
            raise ValueError(f"Muon (FSDP2): local shard of shape {tuple(d.shape)} of a parameter "
                             f"of shape {tuple(shape)} does not follow torch.chunk over {w} ranks "
                             f"(expected {rows[me]} rows); only even-chunk Shard(0) is supported")
        plan.append((chunk, row, rows))
    padded = [c * r for c, r, _ in plan]

    def flat(parts: list[Tensor]) -> Tensor:
        return torch.cat(parts) if parts else torch.zeros(0, dtype=wire, device=device)

    def send(ids: list[int]) -> tuple[Any, Tensor, list[int], list[int], int, Tensor]:
        """Shards -> owners: segment for rank o = my padded shards of o's tensors."""
        parts, splits = [], []
        for o in range(w):
            for i in (i for i in ids if owner[i] == o):
                part = torch.zeros(padded[i], dtype=wire, device=device)
                part[:dirs[i].numel()] = dirs[i].reshape(-1)
                parts.append(part)
            splits.append(sum(padded[i] for i in ids if owner[i] == o))
        mine = [i for i in ids if owner[i] == me]
        per_src = sum(padded[i] for i in mine)
        buf = flat(parts)
        recv = torch.empty(per_src * w, dtype=wire, device=device)
        work = dist.all_to_all_single(recv, buf, [per_src] * w, splits, group=ctx.group,
                                      async_op=depth > 0)
        _record("all_to_all", (buf.numel() - splits[me]) * buf.element_size())
        return work, recv, splits, mine, per_src, buf

    def back(recv: Tensor, splits: list[int], mine: list[int], per_src: int
             ) -> tuple[Any, Tensor, Tensor]:
        """Whole matrices on their owner, orthogonalised as shape batches; rows back:
        segment for rank s = its padded chunk of each of my tensors."""
        fulls, offs = [], 0
        for i in mine:
            chunk, row, rows = plan[i]
            pieces = [recv[s * per_src + offs: s * per_src + offs + rows[s] * row]
                      for s in range(w)]
            fulls.append(torch.cat(pieces).reshape(views[i]))
            offs += padded[i]
        done = _batched(fulls, orth)
        parts = []
        for s in range(w):
            for i, O in zip(mine, done):
                chunk, row, rows = plan[i]
                part = torch.zeros(padded[i], dtype=wire, device=device)
                part[:rows[s] * row] = O.reshape(-1)[s * chunk * row: s * chunk * row
                                                     + rows[s] * row]
                parts.append(part)
        buf = flat(parts)
        result = torch.empty(sum(splits), dtype=wire, device=device)
        work = dist.all_to_all_single(result, buf, splits, [per_src] * w, group=ctx.group,
                                      async_op=depth > 0)
        _record("all_to_all", (buf.numel() - per_src) * buf.element_size())
        return work, result, buf

    # Pipeline (depth > 0): the exchanges of the next ``depth`` rounds are in flight
    # while a round is orthogonalised, and its results return while the next ones are.
    rounds = fsdp_rounds(views, owner, w, ROUND_NUMEL if depth > 0 else None)
    lead = max(depth, 1)
    inflight = collections.deque(send(r) for r in rounds[:lead])
    returns = []
    for k, ids in enumerate(rounds):
        work, recv, splits, mine, per_src, _ = inflight.popleft()
        if work is not None:
            work.wait()
        if k + lead < len(rounds):
            inflight.append(send(rounds[k + lead]))
        returns.append((ids, back(recv, splits, mine, per_src)))

    out: list[Tensor | None] = [None] * len(dirs)
    for ids, (work, result, _) in returns:
        if work is not None:
            work.wait()
        off = 0
        for o in range(w):
            for i in (i for i in ids if owner[i] == o):
                n = dirs[i].numel()
                out[i] = result[off:off + n].view(dirs[i].shape).to(dtype)
                off += padded[i]
    return out  # type: ignore[return-value]


def all_reduce_sum(t: Tensor, ctx: DistContext) -> Tensor:
    """Sum ``t`` in place over ``ctx``'s group (recorded by :func:`count_bytes`); returns ``t``."""
    dist.all_reduce(t, group=ctx.group)
    _record("all_reduce", 2 * (ctx.world - 1) * t.numel() * t.element_size() // ctx.world)
    return t


def blocks_follow_shards(rows: int, row_numel: int, world: int, block: int,
                         min_numel: int) -> bool:
    """Whether block-wise quantisation of each ``Shard(0)`` block of a ``[rows, ...]``
    tensor (``row_numel`` entries per row) is the whole tensor's: the same format
    decision on every rank (all below ``min_numel``, or every block at least that) and
    each block starting on a ``block`` boundary, with the per-block scales
    ``[ceil(numel/block)]`` then sharded as :func:`torch.chunk` cuts them."""
    total = rows * row_numel
    if total < min_numel:
        return True
    _, counts = shard_rows(rows, world)
    sizes = [c * row_numel for c in counts]
    if min(sizes) < min_numel or any(x % block for x in sizes[:-1]):
        return False
    _, scales = shard_rows(-(-total // block), world)
    return scales == [-(-x // block) for x in sizes]


def all_gather_rows(t: Tensor, ctx: DistContext, rows: int) -> Tensor:
    """The whole ``[rows, ...]`` tensor from every rank's ``Shard(0)`` block ``t``
    (:func:`torch.chunk` semantics: uneven or empty blocks): one ``all_gather`` of the
    blocks padded to the chunk (recorded by :func:`count_bytes`)."""
    chunk, counts = shard_rows(rows, ctx.world)
    buf = t.new_zeros((chunk, *t.shape[1:]))
    buf[:t.shape[0]] = t
    parts = [torch.empty_like(buf) for _ in range(ctx.world)]
    dist.all_gather(parts, buf.contiguous(), group=ctx.group)
    _record("all_gather", (ctx.world - 1) * buf.numel() * buf.element_size())
    return torch.cat([x[:c] for x, c in zip(parts, counts)])


def _tsqr(Y: Tensor, ctx: DistContext, chunk: int) -> tuple[Tensor, Tensor]:
    r"""QR of a row-sharded ``[..., M, s]`` matrix from its local rows ``[..., m_loc, s]``.

    TSQR (Demmel et al. 2012, one level): a local Householder QR
    :math:`Y_\ell = Q_\ell R_\ell`, one ``all_reduce`` of the zero-padded stack of
    the small :math:`R_\ell` (``world·min(chunk, s) × s``), a QR of the stack
    :math:`= Q_2 R` computed identically on every rank, and
    :math:`Q = Q_\ell\,Q_2[\text{my block}]`. Returns (local rows of ``Q``, ``R``);
    ``R`` (replicated) may carry extra zero rows. Works for empty shards and
    rank-deficient ``Y`` (no Cholesky).
    """
    s = Y.shape[-1]
    Q1, R1 = torch.linalg.qr(Y, mode="reduced")
    k = R1.shape[-2]
    p = min(chunk, s)
    buf = Y.new_zeros(*Y.shape[:-2], ctx.world * p, s)
    buf[..., ctx.rank * p:ctx.rank * p + k, :] = R1
    all_reduce_sum(buf, ctx)
    Q2, R = torch.linalg.qr(buf, mode="reduced")
    return Q1 @ Q2[..., ctx.rank * p:ctx.rank * p + k, :], R


def all_reduce_max(t: Tensor, ctx: DistContext) -> Tensor:
    """Elementwise max of ``t`` in place over ``ctx``'s group (recorded); returns ``t``."""
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ctx.group)
    _record("all_reduce", 2 * (ctx.world - 1) * t.numel() * t.element_size() // ctx.world)
    return t


def row_shards(ctx: DistContext, rows: int) -> RowShards:
    """The :class:`~matrixopt.linalg.projectors.RowShards` hooks of a ``Shard(0)`` tensor of
    ``rows`` rows on this rank: sums and maxima by ``all_reduce`` over ``ctx``'s group, QR by
    :func:`_tsqr`. Every tensor reduced is created on the gradient's device by linalg."""
    chunk, counts = shard_rows(rows, ctx.world)
    # torch.chunk semantics: the start of an empty trailing shard may pass `rows`
    start = min(ctx.rank * chunk, rows - counts[ctx.rank])
    return RowShards(rows=rows, start=start,
                     reduce_sum=functools.partial(all_reduce_sum, ctx=ctx),
                     reduce_max=functools.partial(all_reduce_max, ctx=ctx),
                     qr=functools.partial(_tsqr, ctx=ctx, chunk=chunk))

