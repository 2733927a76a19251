r"""SOAP (Shampoo's eigenbasis + Adam) for tensors, AdamW for the rest, in one optimizer.

Vyas, Morwani, Zhao, Kwun, Shapira, Brandfonbrener, Janson, Kakade 2024, "SOAP:
Improving and Stabilizing Shampoo using Adam" (arXiv:2409.11321), following the
official code (nikhilvyas/SOAP): Kronecker factors :math:`L = \mathbb{E}[GG^\top]`,
:math:`R = \mathbb{E}[G^\top G]` (one per dim of an N-D tensor, none for a dim
above ``max_precond_dim``), Adam run in their eigenbasis, the basis refreshed
every ``precondition_frequency`` steps by one power step + QR
(:func:`~matrixopt.linalg.eigh_refresh`), the second moment permuted with the
basis. Per-step math: :mod:`matrixopt.optim.functional.soap`.

Memory per preconditioned ``m × n`` matrix: :math:`2mn` (moments) + :math:`2(m^2+n^2)`
(factors and bases); ``state_dtype`` stores all four in bf16 or block-wise int8.
Cost per step: three rotations and the factor products, :math:`\approx 8mn(m+n)`
flops; a refresh (every ``f`` steps, optionally staggered over the parameters)
one matmul and one QR per factor, batched over same-size factors.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ..linalg.eigenbasis import eigh_basis, eigh_refresh
from ._adamw import adamw_states_, init_adam_state
from ._common import MatrixOptimizer, _as_float, _GroupChecker, check_grad
from ._distributed import DistContext, distributed_orthogonalize, shard_rows
from ._nonfinite import StepFlags
from ._state import check_state_dtype, init_moment, load_moment, store_moment
from .functional.soap import (
    factor_products,
    merged_shape,
    permute_moment_,
    preconditioned_dims,
    soap_factors_,
    soap_rebase_,
    soap_updates_,
)

__all__ = ["SOAP", "soap_param_groups", "REFRESH_FALLBACKS"]

_ALGORITHMS = ("auto", "soap", "adamw")
#: State key: how many factor eigenbases fell back to the previous basis (or the
#: identity) because the factor was non-finite or zero (int64, parameter's device).
REFRESH_FALLBACKS = "refresh_fallbacks"


def soap_param_groups(model: torch.nn.Module, **kwargs: Any) -> list[dict[str, Any]]:
    """:func:`~matrixopt.optim.muon_param_groups`'s routing for SOAP: hidden tensors to
    SOAP (``algorithm="soap"``), embeddings / heads / norms / biases to AdamW. Routing
    keywords (``head``, ``exclude``, ``adamw``, ``no_decay_weight_decay``, ...) go to
    ``muon_param_groups``; any other keyword (``precondition_frequency=...``) is set on
    the SOAP groups."""
    from .routing import muon_param_groups

    routing = {"head", "exclude", "example_inputs", "adamw", "no_decay_weight_decay",
               "head_names"}
    groups = muon_param_groups(model, **{k: v for k, v in kwargs.items() if k in routing})
    extra = {k: v for k, v in kwargs.items() if k not in routing}
    out = []
    for g in groups:
        g = {k: v for k, v in g.items() if k not in ("matrix_view", "split")}
        if g.get("algorithm") == "muon":
            g = {**g, "algorithm": "soap", **extra}
        else:
            g["algorithm"] = "adamw"
        out.append(g)
    return out


def _pack(P: Tensor, Q: Tensor) -> Tensor:
    dt = torch.promote_types(P.dtype, torch.float32)
    return torch.cat([P.to(dt), Q.to(dt)], dim=-2)


def _refresh_packed(X: Tensor) -> Tensor:
    """``[B, 2d, d]`` = (factor; basis) → (new basis; permutation matrix), so the batched
    refresh can go through the strategy's split-and-gather like an orthogonalisation."""
    d = X.shape[-1]
    Qn, perm, _ = eigh_refresh(X[..., :d, :], X[..., d:, :])
    onehot = torch.zeros_like(Qn).scatter_(-2, perm.unsqueeze(-2), 1.0)
    return torch.cat([Qn, onehot], dim=-2)


class SOAP(MatrixOptimizer):
    r"""SOAP for tensors with >= 2 dims and AdamW for everything else, in one optimizer.

    ::

        opt = SOAP(model.parameters(), lr=3e-3)
        # embeddings / head / norms to AdamW:
        opt = SOAP(matrixopt.optim.soap_param_groups(model), lr=3e-3)

    Args (group keys unless noted; defaults are the official code's):
        lr: learning rate (3e-3). betas: Adam's (β1, β2) ((0.95, 0.95)).
        shampoo_beta: EMA factor of the Kronecker factors; < 0 uses β2 (-1).
        eps: added to :math:`\sqrt v` before bias correction (1e-8).
        weight_decay: decoupled, ``W ← W(1 − lr·wd)`` after the step (0.01).
        precondition_frequency: steps between eigenbasis refreshes ``f`` (10).
        max_precond_dim: a dim larger than this gets no factor (identity) (10000).
        merge_dims: merge dims left to right up to ``max_precond_dim`` (False).
        precondition_1d: give 1-D tensors routed to SOAP a factor (False).
        normalize_grads: rescale each update to unit RMS (False).
        correct_bias: Adam bias correction (True).
        algorithm: ``"auto"`` (>= 2 dims → SOAP, else AdamW), ``"soap"`` or ``"adamw"``.
            The AdamW path uses the group's ``lr``, ``betas``, ``eps``, ``weight_decay``.
        stagger_refresh: refresh parameter ``j`` of a group at steps ``t`` with
            ``(t + j) mod f = 0`` instead of all at once: the same amortised cost,
            a flat per-step time (False).
        process_group: (not a group key) DDP group: refreshes are split over its
            ranks and all-gathered. FSDP2 (DTensor) parameters are detected: the
            whole gradient is assembled with one all-reduce per tensor (the factors
            need :math:`GG^\top` over all rows) and the SOAP state is kept whole
            (replicated) on every rank; refreshes are split over the ranks.
        nonfinite: ``"skip"`` (default), ``"raise"`` or ``"ignore"``, as every
            matrixopt optimizer; a skipped tensor keeps weights, moments, factors
            and bases.
        state_dtype: ``None`` (moments in the parameter's dtype, factors and bases
            float32), ``"fp32"``, ``"bf16"`` or ``"int8"`` (moments, factors and
            bases all stored so; computed in float32).

    State per SOAP tensor: ``step`` (CPU float32), ``exp_avg`` and ``exp_avg_sq`` (both in the
    rotated space), ``factor_k`` / ``basis_k`` per preconditioned
    (merged) dim ``k``, ``refresh_fallbacks``. A non-finite or all-zero factor
    never yields NaN: its basis stays (or is the identity) and the fallback is
    counted. The first step of a tensor only builds its factors and bases.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        shampoo_beta: float = -1.0,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        precondition_frequency: int = 10,
        max_precond_dim: int = 10000,
        merge_dims: bool = False,
        precondition_1d: bool = False,
        normalize_grads: bool = False,
        correct_bias: bool = True,
        *,
        algorithm: str = "auto",
        stagger_refresh: bool = False,
        process_group: Any | None = None,
        nonfinite: str = "skip",
        state_dtype: str | None = None,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, shampoo_beta=shampoo_beta, eps=eps, weight_decay=weight_decay,
            precondition_frequency=precondition_frequency, max_precond_dim=max_precond_dim,
            merge_dims=merge_dims, precondition_1d=precondition_1d,
            normalize_grads=normalize_grads, correct_bias=correct_bias, algorithm=algorithm,
            stagger_refresh=stagger_refresh, nonfinite=nonfinite, state_dtype=state_dtype,
        )
        super().__init__(params, defaults, process_group)

    def _check_group(self, check: _GroupChecker) -> None:
        check.number("lr", low=0.0)
        check.betas("betas")
        check.number("shampoo_beta", high=1.0, high_open=True)
        check.number("eps", low=0.0)
        check.number("weight_decay", low=0.0)
        check.integer("precondition_frequency", low=1)
        check.integer("max_precond_dim", low=1)
        for k in ("merge_dims", "precondition_1d", "normalize_grads", "correct_bias",
                  "stagger_refresh"):
            check.boolean(k)
        check.choice("algorithm", _ALGORITHMS)
        check_state_dtype(check)

    @staticmethod
    def _algorithm_for(group: dict[str, Any], p: Tensor) -> str:
        alg = group["algorithm"]
        if alg == "auto":
            return "soap" if p.ndim >= 2 else "adamw"
        return alg

    # -------------------------------------------------------------------- step
    def _step_group(self, index: int, group: dict[str, Any], params: list[Tensor]) -> None:
        st = self._strategy
        soap_p: list[Tensor] = []
        adam_p: list[Tensor] = []
        for p in params:
            check_grad(p, "SOAP", index)
            if self._algorithm_for(group, p) == "soap":
                soap_p.append(p)
            else:
                if "exp_avg" not in self.state[p]:
                    init_adam_state(self.state[p], p, group["state_dtype"])
                adam_p.append(p)
        ordered = soap_p + adam_p
        local_p = [st.local(p) for p in ordered]
        flags = self._flags(group, [st.local(p.grad) for p in ordered])  # type: ignore[arg-type]
        grads = flags.safe([st.local(p.grad) for p in ordered])  # type: ignore[arg-type]
        k = len(soap_p)
        lr, wd = _as_float(group["lr"]), float(group["weight_decay"])
        if adam_p:
            beta1, beta2 = (float(b) for b in group["betas"])
            adamw_states_(local_p[k:], grads[k:], [self.state[p] for p in adam_p],
                          group["state_dtype"], lr=lr, beta1=beta1, beta2=beta2,
                          eps=float(group["eps"]), weight_decay=wd,
                          flags=flags.subset(range(k, len(ordered))))
        if soap_p:
            self._soap(group, soap_p, local_p[:k], grads[:k], lr, wd, flags.subset(range(k)))
        flags.count_([self.state[p] for p in ordered], [p.device for p in local_p])

    def _whole(self, p: Tensor, g: Tensor) -> Tensor:
        """The whole gradient of ``p`` (float32+): under FSDP2 the row shards summed into a
        zero-padded full tensor with the strategy's reduce (one all-reduce)."""
        g = g.to(torch.promote_types(g.dtype, torch.float32))
        st = self._strategy
        if not st.sharded:
            return g
        rows = p.shape[0]
        chunk, counts = shard_rows(rows, st.world)
        start = min(st.rank * chunk, rows - counts[st.rank])
        full = torch.zeros(p.shape, dtype=g.dtype, device=g.device)
        full[start:start + g.shape[0]] = g
        reduce = st.reduce
        assert reduce is not None
        return reduce(full)

    def _local_rows(self, p: Tensor, x: Tensor) -> Tensor:
        st = self._strategy
        if not st.sharded:
            return x
        chunk, counts = shard_rows(p.shape[0], st.world)
        start = min(st.rank * chunk, p.shape[0] - counts[st.rank])
        return x[start:start + counts[st.rank]]

    def _refresh(self, pairs: list[tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """``(new basis, permutation)`` of every ``(factor, basis)``: one batched
        :func:`~matrixopt.linalg.eigh_refresh` per size; under DDP / FSDP2 the work is
        split over the ranks (LPT by size) and all-gathered, packed as
        ``(factor; basis) → (basis; permutation matrix)``."""
        st = self._strategy
        if st.world == 1:
            out: list[tuple[Tensor, Tensor] | None] = [None] * len(pairs)
            buckets: dict[tuple[Any, ...], list[int]] = {}
            for i, (P, _) in enumerate(pairs):
                buckets.setdefault((P.shape[0], P.dtype, P.device), []).append(i)
            for idx in buckets.values():
                Qn, perm, _ = eigh_refresh(torch.stack([pairs[i][0] for i in idx]),
                                           torch.stack([pairs[i][1] for i in idx]))
                for i, q, pm in zip(idx, Qn.unbind(0), perm.unbind(0)):
                    out[i] = (q, pm)
            return out  # type: ignore[return-value]
        packed = [_pack(P, Q) for P, Q in pairs]
        views = [(1, X.shape[0], X.shape[1]) for X in packed]
        c = st.ctx  # type: ignore[attr-defined]
        ctx = DistContext("ddp", c.group, c.world, c.rank)  # whole (replicated) inputs
        res = distributed_orthogonalize(ctx, packed, views, [X.shape for X in packed],
                                        _refresh_packed)
        return [(X[:X.shape[1]], X[X.shape[1]:].argmax(dim=0)) for X in res]

    def _soap(self, group: dict[str, Any], keys: list[Tensor], params: list[Tensor],
              grads: list[Tensor], lr: float, wd: float, flags: StepFlags) -> None:
        sd = group["state_dtype"]
        beta1, beta2 = (float(b) for b in group["betas"])
        sb = float(group["shampoo_beta"])
        sb = beta2 if sb < 0 else sb
        mpd, f = int(group["max_precond_dim"]), int(group["precondition_frequency"])
        full = [self._whole(p, g) for p, g in zip(keys, grads)]
        shapes = [merged_shape(p.shape, mpd, group["merge_dims"]) for p in keys]
        dims = [preconditioned_dims(s, mpd, group["precondition_1d"]) for s in shapes]
        new = [i for i, p in enumerate(keys) if "step" not in self.state[p]]
        if new:
            self._init(new, keys, full, shapes, dims, sb, sd, flags)
        run = [i for i in range(len(keys)) if i not in set(new)]
        if not run:
            return
        states = [self.state[keys[i]] for i in run]
        for s in states:
            if s["step"].device.type != "cpu":
                s["step"] = s["step"].cpu()
        mdt = [torch.promote_types(params[i].dtype, torch.float32) for i in run]
        ms = [load_moment(s, "exp_avg", dt, signed=True) for s, dt in zip(states, mdt)]
        vs = [load_moment(s, "exp_avg_sq", dt, signed=False) for s, dt in zip(states, mdt)]
        bases = [[None if not on else load_moment(s, f"basis_{k}", dt, signed=True)
                  for k, on in enumerate(dims[i])] for s, i, dt in zip(states, run, mdt)]
        fl = flags.subset(run)
        gs = [full[i].to(dt) for i, dt in zip(run, mdt)]
        updates, sizes = soap_updates_(
            gs, ms, vs, bases,
            [s["step"] for s in states], [shapes[i] for i in run], beta1=beta1, beta2=beta2,
            eps=float(group["eps"]), correct_bias=group["correct_bias"],
            normalize_grads=group["normalize_grads"], flags=fl)
        for j, i in enumerate(run):
            p, U = params[i], self._local_rows(keys[i], updates[j])
            size = sizes[j]
            if isinstance(size, Tensor):
                p.sub_((U * (size * lr)).to(p.dtype))
            else:
                p.add_(U.to(p.dtype), alpha=-lr * size)
        if wd != 0.0:
            fl.mul_([params[i] for i in run], 1.0 - lr * wd)
        del updates
        # factors with the same gradient, after the weight step (the official order)
        facs = [[load_moment(s, f"factor_{k}", dt, signed=True)
                 for k, on in enumerate(dims[i]) if on] for s, i, dt in zip(states, run, mdt)]
        prods = [[x for x in factor_products(g.reshape(shapes[i]), dims[i])
                  if x is not None] for g, i in zip(gs, run)]
        soap_factors_(gs, facs, prods, sb, fl)
        del prods
        due = [j for j, i in enumerate(run) if (int(states[j]["step"].item())
               + (self._position(group, keys[i]) if group["stagger_refresh"] else 0)) % f == 0]
        due_set = set(due)
        if due:
            self._apply_refresh(due, run, states, facs, bases, ms, vs, dims, shapes, fl)
        for j, (s, i) in enumerate(zip(states, run)):
            store_moment(s, "exp_avg", ms[j], sd, signed=True)
            store_moment(s, "exp_avg_sq", vs[j], sd, signed=False)
            ks = [k for k, on in enumerate(dims[i]) if on]
            for k, P in zip(ks, facs[j]):
                store_moment(s, f"factor_{k}", P, sd, signed=True)
            if j in due_set:  # a basis changes only at its refresh
                for k in ks:
                    store_moment(s, f"basis_{k}", bases[j][k], sd, signed=True)  # type: ignore[arg-type]

    @staticmethod
    def _position(group: dict[str, Any], p: Tensor) -> int:
        return next(j for j, q in enumerate(group["params"]) if q is p)

    def _apply_refresh(self, due: list[int], run: list[int], states: list[dict[str, Any]],
                       facs: list[list[Tensor]], bases: list[list[Any]], ms: list[Tensor],
                       vs: list[Tensor], dims: list[list[bool]], shapes: list[tuple[int, ...]],
                       fl: StepFlags) -> None:
        jobs: list[tuple[int, int, int]] = []  # (j, dim k, index in facs[j])
        for j in due:
            ks = [k for k, on in enumerate(dims[run[j]]) if on]
            jobs += [(j, k, n) for n, k in enumerate(ks)]
        if not jobs:
            return
        out = self._refresh([(facs[j][n], bases[j][k]) for j, k, n in jobs])
        perms: dict[int, list[Tensor | None]] = {}
        old = {j: list(bases[j]) for j in due}
        for (j, k, n), (Qn, perm) in zip(jobs, out):
            d = Qn.shape[-1]
            Qold = bases[j][k]
            ident = torch.arange(d, device=perm.device)
            bases[j][k] = fl.select(j, Qn.to(Qold.dtype), Qold)
            perm = fl.select(j, perm, ident)
            perms.setdefault(j, [None] * len(dims[run[j]]))[k] = perm
            bad = (_usable_factor(facs[j][n]) & torch.isfinite(Qn).all()).logical_not()
            if fl.active:
                bad = bad & fl.ok[j]  # type: ignore[index]
            _count_fallback(states[j], bad)
        for j, ps in perms.items():
            permute_moment_(vs[j], ps, shapes[run[j]])
            m = ms[j].clone() if fl.active else ms[j]
            soap_rebase_(m, old[j], bases[j], shapes[run[j]])
            if fl.active:  # a skipped step keeps M' bit for bit
                ms[j].copy_(fl.select(j, m, ms[j]))

    def _init(self, new: list[int], keys: list[Tensor], full: list[Tensor],
              shapes: list[tuple[int, ...]], dims: list[list[bool]], sb: float,
              sd: str | None, flags: StepFlags) -> None:
        """First step of a tensor: factors (1-β_s)·GGᵀ, bases by eigh (batched per size);
        the weights are not touched."""
        items: list[tuple[int, int, Tensor]] = []
        for i in new:
            p, s = keys[i], self.state[keys[i]]
            s["step"] = torch.tensor(0.0, dtype=torch.float32, device="cpu")
            dev = full[i].device
            like = torch.empty(p.shape, dtype=p.dtype, device=dev)
            init_moment(s, "exp_avg", like, sd, signed=True)
            init_moment(s, "exp_avg_sq", like, sd, signed=False)
            s[REFRESH_FALLBACKS] = torch.zeros((), dtype=torch.int64, device=dev)
            prods = factor_products(full[i].reshape(shapes[i]), dims[i])
            for k, P in enumerate(prods):
                if P is not None:
                    items.append((i, k, (1.0 - sb) * P))
        by_size: dict[tuple[int, torch.device], list[int]] = {}
        for n, (_, _, P) in enumerate(items):
            by_size.setdefault((P.shape[0], P.device), []).append(n)
        for idx in by_size.values():
            Q, ok = eigh_basis(torch.stack([items[n][2] for n in idx]))
            for n, Qn, okn in zip(idx, Q.unbind(0), ok.unbind(0)):
                i, k, P = items[n]
                s = self.state[keys[i]]
                for key, val in ((f"factor_{k}", P), (f"basis_{k}", Qn)):
                    init_moment(s, key, val, sd, signed=True)
                    store_moment(s, key, val, sd, signed=True)
                bad = okn.logical_not()
                if flags.active:
                    bad = bad & flags.ok[i]  # type: ignore[index]
                _count_fallback(s, bad)


def _usable_factor(P: Tensor) -> Tensor:
    tr = torch.diagonal(P).sum()
    return torch.isfinite(P).all() & (torch.nan_to_num(tr, nan=0.0) > 0)


def _count_fallback(state: dict[str, Any], bad: Tensor) -> None:
    c = state[REFRESH_FALLBACKS]
    c.add_(bad.to(device=c.device, dtype=torch.int64))
