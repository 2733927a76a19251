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
shard; the AdamW path is elementwise on local shards.

:func:`count_bytes` records the bytes of the collectives issued here (for the
benchmark), with ring-algorithm accounting: per rank, an all-gather of a buffer
of :math:`S` bytes per rank moves :math:`(w-1)S`, an all-to-all moves what the
rank sends to the others, an all-reduce of :math:`S` bytes moves :math:`2(w-1)S/w`
(reduce-scatter + all-gather).

**Adafactor and GaLoreAdamW under FSDP2** keep their statistics on the local
shards and reduce only small matrices over the mesh (:func:`all_reduce_sum`,
the ``reduce`` of :class:`~matrixopt.optim._dist.FSDP2Rows`):
see :mod:`matrixopt.optim.functional.adafactor`, :func:`sharded_right_basis` (the
projector refresh) and :func:`_tsqr`.
"""

from __future__ import annotations

import contextlib
import heapq
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeGuard

import torch
import torch.distributed as dist
from torch import Tensor

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = ["lpt_assign", "matrix_cost", "shard_rows", "DistContext", "resolve_context",
           "local_tensor", "distributed_orthogonalize", "count_bytes", "all_reduce_sum",
           "sharded_right_basis", "payload_dtype"]

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
                              comm_dtype: torch.dtype | None = None) -> list[Tensor]:
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
    """
    if ctx is None or ctx.world == 1:
        mats = [d.reshape(v) for d, v in zip(dirs, views)]
        return [O.reshape(d.shape) for O, d in zip(_batched(mats, orth), dirs)]
    owner = lpt_assign([matrix_cost(*v) for v in views], ctx.world)
    if ctx.mode == "ddp":
        return _ddp(ctx, dirs, views, owner, orth, comm_dtype)
    return _fsdp(ctx, dirs, views, full_shapes, owner, orth, comm_dtype)


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


def _fsdp(ctx: DistContext, dirs: list[Tensor], views: list[tuple[int, int, int]],
          full_shapes: list[torch.Size], owner: list[int], orth: Callable[[Tensor], Tensor],
          comm_dtype: torch.dtype | None) -> list[Tensor]:
    w, me = ctx.world, ctx.rank
    if len({(d.dtype, d.device) for d in dirs}) > 1:
        raise ValueError("Muon (FSDP2): all Muon parameters of a group must share dtype and "
                         f"device, got {sorted({str((d.dtype, d.device)) for d in dirs})}")
    dtype, device = dirs[0].dtype, dirs[0].device
    # Payload in the iteration dtype when it is narrower (Moonlight's bf16 gather):
    # the iteration casts to it right after normalising anyway.
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

    # 1. shards -> owners: segment for rank o = my padded shards of o's tensors, in order.
    send_parts, in_splits = [], []
    for o in range(w):
        ids = [i for i in range(len(dirs)) if owner[i] == o]
        for i in ids:
            part = torch.zeros(padded[i], dtype=wire, device=device)
            part[:dirs[i].numel()] = dirs[i].reshape(-1)
            send_parts.append(part)
        in_splits.append(sum(padded[i] for i in ids))
    mine = [i for i in range(len(dirs)) if owner[i] == me]
    per_src = sum(padded[i] for i in mine)
    send = torch.cat(send_parts) if send_parts else torch.zeros(0, dtype=wire, device=device)
    recv = torch.empty(per_src * w, dtype=wire, device=device)
    dist.all_to_all_single(recv, send, [per_src] * w, in_splits, group=ctx.group)
    _record("all_to_all", (send.numel() - in_splits[me]) * send.element_size())

    # 2. whole matrices on their owner, orthogonalised as shape batches.
    fulls = []
    offs = 0
    for i in mine:
        chunk, row, rows = plan[i]
        pieces = [recv[s * per_src + offs: s * per_src + offs + rows[s] * row] for s in range(w)]
        fulls.append(torch.cat(pieces).reshape(views[i]))
        offs += padded[i]
    done = _batched(fulls, orth)
    rdtype = wire  # the results are exact in it (payload_dtype)

    # 3. rows back to their ranks: segment for rank s = its padded chunk of each of my tensors.
    back_parts = []
    for s in range(w):
        for i, O in zip(mine, done):
            chunk, row, rows = plan[i]
            part = torch.zeros(padded[i], dtype=rdtype, device=device)
            flat = O.reshape(-1)
            part[:rows[s] * row] = flat[s * chunk * row: s * chunk * row + rows[s] * row]
            back_parts.append(part)
    back = torch.cat(back_parts) if back_parts else torch.zeros(0, dtype=rdtype, device=device)
    result = torch.empty(send.numel(), dtype=rdtype, device=device)
    dist.all_to_all_single(result, back, in_splits, [per_src] * w, group=ctx.group)
    _record("all_to_all", (back.numel() - per_src) * back.element_size())

    out: list[Tensor | None] = [None] * len(dirs)
    off = 0
    for o in range(w):
        for i in (j for j in range(len(dirs)) if owner[j] == o):
            n = dirs[i].numel()
            out[i] = result[off:off + n].view(dirs[i].shape).to(dtype)
            off += padded[i]
    return out  # type: ignore[return-value]



def all_reduce_sum(t: Tensor, ctx: DistContext) -> Tensor:
    """Sum ``t`` in place over ``ctx``'s group (recorded by :func:`count_bytes`); returns ``t``."""
    dist.all_reduce(t, group=ctx.group)
    _record("all_reduce", 2 * (ctx.world - 1) * t.numel() * t.element_size() // ctx.world)
    return t


def _tsqr(Y: Tensor, ctx: DistContext, chunk: int) -> tuple[Tensor, Tensor]:
    r"""QR of a row-sharded ``[b, M, s]`` matrix from its local rows ``[b, m_loc, s]``.

    TSQR (Demmel et al. 2012, one level): a local Householder QR
    :math:`Y_\ell = Q_\ell R_\ell`, one ``all_reduce`` of the zero-padded stack of
    the small :math:`R_\ell` (``world·min(chunk, s) × s``), a QR of the stack
    :math:`= Q_2 R` computed identically on every rank, and
    :math:`Q = Q_\ell\,Q_2[\text{my block}]`. Returns (local rows of ``Q``, ``R``);
    ``R`` (replicated) may carry extra zero rows. Works for empty shards and
    rank-deficient ``Y`` (no Cholesky).
    """
    b, ml, s = Y.shape
    Q1, R1 = torch.linalg.qr(Y, mode="reduced")
    k = R1.shape[-2]
    p = min(chunk, s)
    buf = Y.new_zeros(b, ctx.world * p, s)
    buf[:, ctx.rank * p:ctx.rank * p + k] = R1
    all_reduce_sum(buf, ctx)
    Q2, R = torch.linalg.qr(buf, mode="reduced")
    return Q1 @ Q2[:, ctx.rank * p:ctx.rank * p + k], R


def sharded_right_basis(ctx: DistContext, G: Tensor, rows: int, rank: int, *, method: str,
                        previous: Tensor | None, seed: int | torch.Generator,
                        dtype: torch.dtype | None
                        ) -> Tensor:
    r""":func:`~matrixopt.linalg.projectors.lowrank_basis` with ``side="right"`` for a
    gradient sharded over its rows (FSDP2 ``Shard(0)``); replicated ``[b, n, rank]`` result.

    ``G`` holds this rank's rows ``[b, m_loc, n]`` of ``[b, rows, n]``. With
    :math:`A = G^\top` (``n × rows``, columns sharded) every product the range
    finder needs is either local or a sum over ranks of small matrices:
    :math:`A Z = \sum_\ell G_\ell^\top Z_\ell` (one ``all_reduce`` of ``n × s``),
    :math:`\mathrm{orth}(A^\top Q) = \mathrm{orth}(G Q)` by :func:`_tsqr` (an
    ``all_reduce`` of ``world·s × s``), the Gaussian sketch :math:`\Omega`
    (``rows × s``) drawn whole from the same seed on every rank and sliced, so
    it equals the single-process one; QRs of replicated matrices and the
    Rayleigh–Ritz SVD are local and identical on all ranks. The exact branch
    (``"svd"``, or a sketch spanning the short side) takes the right singular
    vectors of the TSQR factor :math:`R` of :math:`G` (``n × n``). Same result
    as the single-process call up to rounding (QR factors differ only by column
    signs, which the Rayleigh–Ritz rotation and the sign convention remove).
    Methods ``"warm"``, ``"rsvd"`` and ``"svd"`` with their default ``n_iter``
    and ``oversample``; extreme inputs (max |g| outside :math:`2^{\pm 40}`) are not rescaled.
    """
    from ..linalg.projectors import _DEFAULTS, _align_signs
    from ..linalg.svd import _compute_dtype, _gaussian, _resolve_generator, _sign_convention

    b, ml, n = G.shape
    chunk, _ = shard_rows(rows, ctx.world)
    out_dtype = dtype or G.dtype
    gen = _resolve_generator(seed, G.device, "seed")
    if method == "warm" and previous is None:
        method = "rsvd"
    n_iter, oversample = _DEFAULTS.get(method, (0, 0))
    X = G.to(_compute_dtype(G.dtype))
    start = ctx.rank * chunk
    size = min(rank + oversample, rows, n)

    def a_times(Z: Tensor) -> Tensor:  # A Z = Gᵀ Z, summed over the row shards
        return all_reduce_sum((X.mT @ Z).contiguous(), ctx)

    if method == "svd" or size >= min(rows, n):
        _, R = _tsqr(X, ctx, chunk)
        P = torch.linalg.svd(R, full_matrices=False).Vh.mT[..., :rank]
    elif previous is None:
        # rsvd as lowrank_basis does it: sketch the other side (G's row-sharded
        # column space), then one more multiplication gives the right basis.
        Omega = _gaussian((b, n, size), gen, G.device, X.dtype)
        Qr, _ = _tsqr(X @ Omega, ctx, chunk)
        for _ in range(n_iter):
            Zr = torch.linalg.qr(a_times(Qr), mode="reduced").Q
            Qr, _ = _tsqr(X @ Zr, ctx, chunk)
        P = torch.linalg.svd(a_times(Qr), full_matrices=False).U[..., :rank]
    else:
        k = previous.shape[-1]
        Q = previous.to(X.dtype).expand(b, n, k)
        if size > k:
            Omega = _gaussian((b, rows, size - k), gen, G.device, X.dtype)
            Q = torch.linalg.qr(torch.cat([Q, a_times(Omega[:, start:start + ml])], dim=-1),
                                mode="reduced").Q
        if n_iter < 1:
            raise ValueError(f"sharded_right_basis: method {method!r} needs n_iter >= 1")
        R = Q
        for _ in range(n_iter):
            Z, _ = _tsqr(X @ Q, ctx, chunk)
            Q, R = torch.linalg.qr(a_times(Z), mode="reduced")
        P = Q @ torch.linalg.svd(R, full_matrices=False).U[..., :rank]
    P, _ = _sign_convention(P)
    if previous is not None:
        P = _align_signs(P, previous)
    return P.to(out_dtype)
