r"""Shampoo: Kronecker-factored preconditioning of matrices (Distributed Shampoo's
semantics), AdamW for the rest, in one optimizer.

Gupta et al. 2018, "Shampoo: Preconditioned Stochastic Tensor Optimization";
Shi et al. 2023, "A Distributed Data-Parallel PyTorch Implementation of the
Distributed Shampoo Optimizer for Training Neural Networks At-Scale"
(arXiv:2309.06497); MKOR, Mozaffari et al. 2023 (arXiv:2306.01685). The per-step
math is :func:`matrixopt.optim.functional.shampoo.shampoo_directions` (read its
docstring for the formulas); here: state, storage formats, schedules, the AdamW
path, the non-finite policy and the distribution strategy.

Cost per matrix and step: two Gram products per block and two preconditioner
products (≈ :math:`4(b_m^2 b_n + b_m b_n^2)` flops for a ``bm × bn`` block); per
refresh (every ``precondition_frequency`` steps) one inverse root per factor
(batched eigh, or Newton products). State per matrix: two factors and two roots per
block (``2(b_m^2 + b_n^2)`` floats) plus the filtered gradient and the grafting
moment (one parameter each).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ._adamw import adamw_states_, init_adam_state
from ._common import GroupError, MatrixOptimizer, _as_float, _GroupChecker, _is_number, check_grad
from ._distributed import local_tensor, shard_rows
from ._state import check_state_dtype, compute_dtype, init_moment, load_moment, store_moment
from ._views import VIEWS, matrix_view
from .functional.shampoo import (
    GRAFTING,
    ShampooBuffers,
    ShampooHyper,
    block_layout,
    exponents_for,
    is_integer_root,
    shampoo_directions,
)

__all__ = ["Shampoo"]

# "muon": what muon_param_groups writes for matrices (taken as "shampoo")
_ALGORITHMS = ("auto", "shampoo", "muon", "adamw")
_FACTORS = (("factor_L", "inv_root_L"), ("factor_R", "inv_root_R"))


class Shampoo(MatrixOptimizer):
    r"""Shampoo for matrices (blocked Kronecker factors, grafting) and AdamW for the rest.

    ::

        opt = Shampoo(model.parameters(), lr=3e-4, precondition_frequency=10)
        opt = Shampoo(matrixopt.optim.muon_param_groups(model), lr=3e-4)  # AdamW for
        # embeddings / head / norms

    Every keyword is a default for the parameter groups and may be set per group.

    Args:
        params: parameters or parameter groups.
        lr: learning rate of both paths (default 1e-3).
        betas: ``(β1, β2)``: β1 filters the gradient before preconditioning (0: off),
            β2 is the factors' EMA (1.0: AdaGrad-like sums, Distributed Shampoo's
            default). Default ``(0.9, 0.999)``.
        epsilon: ε added to each (bias-corrected) factor before its root (default 1e-12,
            Distributed Shampoo's; eigenvalues below ε are shifted up to it).
        weight_decay: decoupled weight decay, times lr (default 0).
        precondition_frequency: steps between root refreshes ``f`` (default 10).
        start_preconditioning_step: first step ``t0`` that preconditions (earlier steps
            use the grafting direction); ``None`` (default): ``f``.
        max_preconditioner_dim: block size: each side longer than this is cut into blocks
            of this size (default 1024).
        grafting: ``"adam"`` (default), ``"rmsprop"``, ``"adagrad"``, ``"sgd"`` or
            ``None``: per block, the preconditioned direction takes the Frobenius norm of
            this first-order direction.
        grafting_beta2, grafting_epsilon: the grafting moment's β2 (default 0.999) and ε
            (default 1e-8).
        exponent_override: the exponent ``e`` of each factor (:math:`F^{-e}`): a number
            or ``(e_L, e_R)``; 0 switches a side off. ``None``: 1/4 each (MKOR: 1 each).
        bias_correction: divide factors by :math:`1-\beta_2^t` and the filtered gradient
            by :math:`1-\beta_1^t` (default True).
        inverse_update: ``"root"`` (default: roots recomputed every ``f`` steps, stale in
            between) or ``"mkor"``: the factors' inverses (exponent 1) recomputed every
            ``f`` steps and updated by rank-1 Sherman–Morrison steps in between.
        root_method: ``"eigh"`` (default) or ``"newton"`` (coupled Newton, matrix products
            only; needs integer roots ``1/e``), see :func:`matrixopt.linalg.inv_root`.
        newton_iters: fixed Newton iteration count (``None``: enough for κ ≤ 1e6).
        algorithm: ``"auto"`` (≥ 2-D → Shampoo, else AdamW), ``"shampoo"``, ``"adamw"``;
            ``"muon"`` means ``"shampoo"``, so the groups of
            :func:`~matrixopt.optim.muon_param_groups` work unchanged.
        matrix_view: how > 2-D parameters become matrices (see
            :func:`~matrixopt.optim._views.matrix_view`; default ``"auto"``).
        adamw_betas, eps: the AdamW path's betas (default (0.9, 0.999)) and ε (1e-8).
        process_group: DDP group (each rank computes every update; gradients are already
            equal) or ``None``; FSDP2 (DTensor) parameters are detected: each rank sums the
            whole gradient from the shards (one all-reduce per matrix), keeps whole
            factors and updates its rows.
        nonfinite: ``"skip"`` (default), ``"raise"`` or ``"ignore"`` (see
            :class:`~matrixopt.optim.Muon`).
        state_dtype: storage of the filtered gradient, the grafting moment and the AdamW
            moments (``None``, ``"fp32"``, ``"bf16"``, ``"int8"``); factors and roots are
            float32 (float64 for float64 parameters).

    State per Shampoo parameter: ``step`` (CPU), ``factor_L``/``factor_R`` and
    ``inv_root_L``/``inv_root_R`` (``[blocks, d, d]``), ``exp_avg``, ``graft_sq``,
    ``root_fallbacks`` (int64: blocks whose refresh kept the previous root because the
    factor or its root was not finite). Unlike Distributed Shampoo, matrices are not
    merged into vectors and 1-D parameters take the AdamW path.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        epsilon: float = 1e-12,
        weight_decay: float = 0.0,
        *,
        precondition_frequency: int = 10,
        start_preconditioning_step: int | None = None,
        max_preconditioner_dim: int = 1024,
        grafting: str | None = "adam",
        grafting_beta2: float = 0.999,
        grafting_epsilon: float = 1e-8,
        exponent_override: float | tuple[float, float] | None = None,
        bias_correction: bool = True,
        inverse_update: str = "root",
        root_method: str = "eigh",
        newton_iters: int | None = None,
        algorithm: str = "auto",
        matrix_view: str = "auto",
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        process_group: Any | None = None,
        nonfinite: str = "skip",
        state_dtype: str | None = None,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, epsilon=epsilon, weight_decay=weight_decay,
            precondition_frequency=precondition_frequency,
            start_preconditioning_step=start_preconditioning_step,
            max_preconditioner_dim=max_preconditioner_dim, grafting=grafting,
            grafting_beta2=grafting_beta2, grafting_epsilon=grafting_epsilon,
            exponent_override=exponent_override, bias_correction=bias_correction,
            inverse_update=inverse_update, root_method=root_method, newton_iters=newton_iters,
            algorithm=algorithm, matrix_view=matrix_view, adamw_betas=adamw_betas, eps=eps,
            nonfinite=nonfinite, state_dtype=state_dtype,
        )
        super().__init__(params, defaults, process_group)

    # ------------------------------------------------------------------ checks
    def _check_group(self, check: _GroupChecker) -> None:
        g = check.group
        check.number("lr", low=0.0)
        b = g["betas"]
        if not (isinstance(b, (tuple, list)) and len(b) == 2 and all(_is_number(x) for x in b)
                and 0.0 <= _as_float(b[0]) < 1.0 and 0.0 < _as_float(b[1]) <= 1.0):
            raise check.fail("betas", "must be (beta1 in [0, 1), beta2 in (0, 1])")
        check.number("epsilon", low=0.0)
        check.number("weight_decay", low=0.0)
        check.integer("precondition_frequency", low=1)
        check.integer("start_preconditioning_step", low=1, allow_none=True)
        check.integer("max_preconditioner_dim", low=1)
        check.choice("grafting", GRAFTING)
        check.number("grafting_beta2", low=0.0, high=1.0, high_open=True)
        check.number("grafting_epsilon", low=0.0, low_open=True)
        check.boolean("bias_correction")
        check.choice("inverse_update", ("root", "mkor"))
        check.choice("root_method", ("eigh", "newton"))
        check.integer("newton_iters", low=1, allow_none=True)
        check.choice("algorithm", _ALGORITHMS)
        check.choice("matrix_view", VIEWS)
        check.betas("adamw_betas")
        check.number("eps", low=0.0)
        check_state_dtype(check)
        ov = g["exponent_override"]
        pair = ov if isinstance(ov, (tuple, list)) else (ov, ov)
        if ov is not None and not (len(pair) == 2 and all(
                _is_number(e) and 0.0 <= _as_float(e) <= 8.0 for e in pair)):
            raise check.fail("exponent_override", "must be None, a number in [0, 8] or a pair "
                                                  "(e_L, e_R) of them")
        exps = exponents_for(ov, g["inverse_update"])
        if g["inverse_update"] == "mkor" and any(e not in (0.0, 1.0) for e in exps):
            raise check.fail("exponent_override", "must be 1 (or 0 to switch a side off) with "
                                                  "inverse_update='mkor', which keeps inverses")
        if g["root_method"] == "newton" and any(e and not is_integer_root(e) for e in exps):
            raise check.fail("exponent_override", "must give integer roots 1/e with "
                                                  "root_method='newton'; use 'eigh'")
        for p in g["params"]:
            if g["algorithm"] in ("shampoo", "muon") and p.ndim < 2:
                raise GroupError(
                    f"Shampoo: param_groups[{check.index}]: algorithm 'shampoo' needs "
                    f"parameters with >= 2 dims, got one of shape {tuple(p.shape)}; use "
                    f"algorithm='adamw' or 'auto' for it")

    @staticmethod
    def _algorithm_for(group: dict[str, Any], p: Tensor) -> str:
        alg = group["algorithm"]
        if alg == "auto":
            return "shampoo" if p.ndim >= 2 else "adamw"
        return "shampoo" if alg == "muon" else str(alg)

    @staticmethod
    def _hyper(group: dict[str, Any]) -> ShampooHyper:
        f = int(group["precondition_frequency"])
        start = group["start_preconditioning_step"]
        return ShampooHyper(
            beta1=_as_float(group["betas"][0]), beta2=_as_float(group["betas"][1]),
            epsilon=float(group["epsilon"]),
            exponents=exponents_for(group["exponent_override"], group["inverse_update"]),
            precondition_frequency=f,
            start_preconditioning_step=f if start is None else int(start),
            grafting=group["grafting"], grafting_beta2=float(group["grafting_beta2"]),
            grafting_epsilon=float(group["grafting_epsilon"]),
            bias_correction=bool(group["bias_correction"]),
            inverse_update=group["inverse_update"], root_method=group["root_method"],
            newton_iters=group["newton_iters"])

    # ------------------------------------------------------------------- state
    def _init_state(self, group: dict[str, Any], p: Tensor, h: ShampooHyper) -> None:
        state = self.state[p]
        b, m, n, _ = matrix_view(p.shape, group["matrix_view"])
        lay = block_layout(m, n, int(group["max_preconditioner_dim"]))
        dt = compute_dtype(p)
        dev = local_tensor(p).device
        k = b * lay.rm * lay.rn
        state["step"] = torch.tensor(0.0, dtype=torch.float32, device="cpu")
        for (fk, xk), e, d in zip(_FACTORS, h.exponents, (lay.bm, lay.bn)):
            if e:
                state[fk] = torch.zeros(k, d, d, dtype=dt, device=dev)
                state[xk] = torch.eye(d, dtype=dt, device=dev).repeat(k, 1, 1)
        like = torch.empty(p.shape, dtype=dt if self._strategy.sharded else p.dtype, device=dev)
        if h.beta1 > 0:
            init_moment(state, "exp_avg", like, group["state_dtype"], signed=True)
        if h.grafting not in (None, "sgd"):
            init_moment(state, "graft_sq", like, group["state_dtype"], signed=False)
        state["root_fallbacks"] = torch.zeros((), dtype=torch.int64, device=dev)

    # -------------------------------------------------------------------- step
    def _step_group(self, index: int, group: dict[str, Any], params: list[Tensor]) -> None:
        st = self._strategy
        h = self._hyper(group)
        sh_p: list[Tensor] = []
        adam_p: list[Tensor] = []
        for p in params:
            check_grad(p, "Shampoo", index)
            state = self.state[p]
            if self._algorithm_for(group, p) == "shampoo":
                if "step" not in state:
                    self._init_state(group, p, h)
                sh_p.append(p)
            else:
                if "exp_avg" not in state:
                    init_adam_state(state, p, group["state_dtype"])
                adam_p.append(p)
        ordered = sh_p + adam_p
        local_p = [st.local(p) for p in ordered]
        flags = self._flags(group, [st.local(p.grad) for p in ordered])  # type: ignore[arg-type]
        grads = flags.safe([st.local(p.grad) for p in ordered])  # type: ignore[arg-type]
        k = len(sh_p)
        lr, wd = _as_float(group["lr"]), float(group["weight_decay"])
        if adam_p:
            beta1, beta2 = (float(x) for x in group["adamw_betas"])
            adamw_states_(local_p[k:], grads[k:], [self.state[p] for p in adam_p],
                          group["state_dtype"], lr=lr, beta1=beta1, beta2=beta2,
                          eps=float(group["eps"]), weight_decay=wd,
                          flags=flags.subset(range(k, len(ordered))))
        if sh_p:
            self._shampoo(group, h, sh_p, local_p[:k], grads[:k], lr, wd, flags.subset(range(k)))
        flags.count_([self.state[p] for p in ordered], [p.device for p in local_p])

    def _rows(self, p: Tensor) -> tuple[int, int]:
        """(first row, row count) of this rank's shard of ``p`` (torch.chunk semantics)."""
        st = self._strategy
        chunk, counts = shard_rows(p.shape[0], st.world)
        rows = counts[st.rank]
        return min(st.rank * chunk, p.shape[0] - rows), rows

    def _shampoo(self, group: dict[str, Any], h: ShampooHyper, keys: list[Tensor],
                 params: list[Tensor], grads: list[Tensor], lr: float, wd: float,
                 flags: Any) -> None:
        st = self._strategy
        sd = group["state_dtype"]
        states = [self.state[p] for p in keys]
        views = [matrix_view(p.shape, group["matrix_view"]) for p in keys]
        mpd = int(group["max_preconditioner_dim"])
        work, bufs, steps = [], [], []
        for p, g, s, v in zip(keys, grads, states, views):
            dt = compute_dtype(p)
            G = g.to(dt)
            if st.sharded:  # the whole gradient on every rank: sum of the zero-padded shards
                full = torch.zeros(p.shape, dtype=dt, device=G.device)
                r0, rows = self._rows(p)
                full[r0:r0 + rows] = G
                G = st.reduce(full)  # type: ignore[misc]
            work.append(G.reshape(v.b, v.m, v.n))
            s["step"] += 1
            steps.append(int(s["step"]))
            bufs.append(ShampooBuffers(
                L=s.get("factor_L"), R=s.get("factor_R"), XL=s.get("inv_root_L"),
                XR=s.get("inv_root_R"),
                exp_avg=(load_moment(s, "exp_avg", dt, signed=True).reshape(v.b, v.m, v.n)
                         if "exp_avg" in s else None),
                graft=(load_moment(s, "graft_sq", dt, signed=False).reshape(v.b, v.m, v.n)
                       if "graft_sq" in s else None),
                fallbacks=s["root_fallbacks"]))
        layouts = [block_layout(v.m, v.n, mpd) for v in views]
        dirs = shampoo_directions(work, bufs, layouts, steps, h, flags.ok)
        sizes = flags.weights([lr] * len(params), 0.0, params)
        decay = flags.weights([1.0 - lr * wd] * len(params), 1.0, params)
        for i, (p, P, s, B) in enumerate(zip(params, dirs, states, bufs)):
            P = P.reshape(keys[i].shape)
            if st.sharded:
                r0, rows = self._rows(keys[i])
                P = P[r0:r0 + rows]
            if wd != 0.0:
                p.mul_(decay[i])
            p.sub_((P * sizes[i]).to(p.dtype))
            for key, buf, signed in (("exp_avg", B.exp_avg, True), ("graft_sq", B.graft, False)):
                if buf is not None:
                    store_moment(s, key, buf.reshape(s[key].shape), sd, signed=signed)
