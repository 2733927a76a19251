r"""Muon: momentum + orthogonalised updates for hidden-layer matrices, AdamW for the rest.

Per matrix :math:`W \in \mathbb{R}^{m\times n}` with gradient :math:`G` (Jordan et
al. 2024, "Muon: An optimizer for hidden layers in neural networks"; Liu et al.
2025, "Muon is Scalable for LLM Training"):

.. math::
    M &\leftarrow \mu M + (1-\mu) G \\
    D &\leftarrow (1-\mu) G + \mu M \quad\text{(Nesterov; } D = M \text{ otherwise)}\\
    O &\leftarrow \operatorname{orthogonalize}(D) \approx U V^\top \\
    W &\leftarrow W (1 - \eta\lambda) - \eta\, s(m, n)\, O

with the update scale :math:`s(m, n)` chosen by ``adjust_lr``. Parameters routed
to ``"adamw"`` (embeddings, heads, norms, biases, scalars) get decoupled AdamW
in the same optimizer object, with the same ``lr`` and ``weight_decay`` — which
``adjust_lr="match_rms_adamw"`` makes sensible (Moonlight: Muon's update RMS is
:math:`\sqrt{1/\max(m,n)}`, so :math:`0.2\sqrt{\max(m,n)}` matches AdamW's ≈0.2).

Cost per step and matrix: the orthogonalisation, about
:math:`k\,(4 m^2 n + 2 m^3)` flops for ``k`` steps on the short side ``m`` (less
with the Gram path for rectangular matrices); everything else is elementwise.
Matrices of the same shape within a group are orthogonalised as one batch.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ..linalg.coefficients import resolve_coefficients
from ..linalg.orthogonalization import iteration_dtype, orthogonalize
from ._adamw import adamw_states_, init_adam_state
from ._common import (
    GroupError,
    MatrixOptimizer,
    _as_float,
    _GroupChecker,
    check_grad,
    external_stacklevel,
)
from ._distributed import _is_dtensor, local_tensor
from ._nonfinite import StepFlags
from ._orthogonalizers import OPERATORS, apply_orthogonalizer
from ._state import (
    check_state_dtype,
    compute_dtype,
    init_moment,
    is_native,
    load_moment,
    store_moment,
)
from ._views import VIEWS, matrix_view
from .functional.muon import ADJUST_LR_MODES, muon_, muon_update_scale

__all__ = ["Muon", "muon_update_scale", "ADJUST_LR_MODES"]

_ALGORITHMS = ("auto", "muon", "adamw")


def _split_spec(split: Any) -> tuple[int, str] | None:
    """``split`` as ``(k, "rows" | "cols")`` (``None`` stays ``None``); ``ValueError`` if bad."""
    if split is None:
        return None
    if isinstance(split, int) and not isinstance(split, bool) and split >= 1:
        return split, "rows"
    if (isinstance(split, (tuple, list)) and len(split) == 2 and isinstance(split[0], int)
            and not isinstance(split[0], bool) and split[0] >= 1 and split[1] in ("rows", "cols")):
        return int(split[0]), str(split[1])
    raise ValueError(f"split must be None, an int k >= 1 or (k, 'rows'|'cols'), got {split!r}")


def _col_blocks(x: Tensor, view: tuple[int, int, int], k: int) -> Tensor:
    """``[..]`` tensor viewed as ``(b, m, n)`` → its ``k`` column blocks ``[b·k, m, n/k]``."""
    b, m, n = view
    return x.reshape(b, m, k, n // k).transpose(1, 2).reshape(b * k, m, n // k)


def _col_unblocks(x: Tensor, view: tuple[int, int, int], k: int) -> Tensor:
    """Inverse of :func:`_col_blocks`, as ``[b, m, n]``."""
    b, m, n = view
    return x.reshape(b, k, m, n // k).transpose(1, 2).reshape(b, m, n)


class Muon(MatrixOptimizer):
    r"""Muon for matrices and AdamW for everything else, in one optimizer.

    Drop-in for :class:`torch.optim.AdamW` in an existing loop::

        opt = Muon(model.parameters(), lr=3e-4, weight_decay=0.1)
        # or route embeddings / head / norms to AdamW explicitly:
        opt = Muon(matrixopt.optim.muon_param_groups(model), lr=3e-4)

    Every keyword below is a default for the parameter groups and may be set per
    group.

    Args:
        params: parameters or parameter groups.
        lr: learning rate, shared by both paths (default 1e-3).
        weight_decay: decoupled weight decay, multiplied by the *unscaled* lr
            (default 0.1, as torch.optim.Muon).
        momentum: Muon momentum μ in [0, 1) (default 0.95).
        nesterov: Nesterov momentum (default True).
        algorithm: ``"auto"`` (default: parameters with ≥ 2 dims go to Muon, the
            rest to AdamW), ``"muon"`` or ``"adamw"``. With ``"auto"``,
            embeddings and output heads go to Muon too; use
            :func:`~matrixopt.optim.muon_param_groups` to route them to AdamW.
        adjust_lr: update scale, one of ``"match_rms_adamw"`` (default),
            ``"original"``, ``"spectral"``, ``"none"`` (see
            :func:`muon_update_scale`).
        coefficients: orthogonalisation schedule: a preset name
            (``"polar_express"`` default, ``"keller"``, ``"you"``, ``"cans"``, ...)
            or ``(a, b, c)`` tuple(s); see :func:`matrixopt.linalg.orthogonalize`.
        ns_steps: number of polynomial steps (``None``: the schedule's length).
        ns_dtype: dtype the iteration runs in (default ``torch.bfloat16``, as
            Muon's reference; ``None`` uses the parameter's dtype). Normalisation
            is always done in at least float32.
        normalization: ``"frobenius"`` (default), ``"spectral"`` or ``"aol"``.
        ns_method: ``"auto"`` (default), ``"standard"`` or ``"gram"``.
        ns_backend: ``"auto"`` (default), ``"torch"`` or ``"triton"``.
        matrix_view: how parameters with > 2 dims become matrices: ``"flatten"``
            (``[out, in, *k] → out × in·∏k``, convolutions), ``"batch"``
            (``[*E, r, c]`` → a batch of ``r × c`` matrices, stacked experts), or
            ``"auto"`` (default: 3-D → batch, ≥ 4-D → flatten). A bare tensor
            does not say which module it came from: a 3-D parameter may be a
            Conv1d weight ``[out, in, k]`` (wants ``"flatten"``) or a stack of
            experts (wants ``"batch"``), so ``"auto"`` warns once per group that
            holds a 3-D parameter. ``muon_param_groups(model)`` knows the module
            and sets the view; otherwise set ``matrix_view`` for that group.
        split: ``None``, an int ``k`` or ``(k, "rows" | "cols")``: orthogonalise
            ``k`` equal blocks of the matrix separately — ``k`` / ``(k, "rows")``
            cuts the rows (fused QKV ``[3d, d]`` of ``nn.Linear`` /
            ``nn.MultiheadAttention``: ``split=3``), ``(k, "cols")`` the columns
            (Hugging Face ``Conv1D`` stores ``c_attn`` as ``[d, 3d]``:
            ``split=(3, "cols")``). The update scale ``s(m, n)`` then comes from
            the block shape. Column splits are not supported on FSDP2 (DTensor)
            parameters.
        normuon: NorMuon (Li et al. 2025): after orthogonalisation, divide each
            row by the root of an EMA of its mean square, then rescale to keep the
            Frobenius norm (default False).
        normuon_beta2: EMA factor of NorMuon's row statistic (default 0.95).
        cautious_wd: cautious weight decay (Chen et al. 2025): decay only entries
            whose update has the same sign as the weight (default False).
        orthogonalizer: the operator applied to the momentum direction:
            ``"newton_schulz"`` (default: :func:`~matrixopt.linalg.orthogonalize`
            with the options above), ``"auon"``, ``"hybrid_auon"`` (``ns_steps``
            Keller steps, default 1, in ``ns_dtype``) or ``"racs"`` (see
            :mod:`matrixopt.linalg.operators`); the alternatives' unit-Frobenius
            output is scaled by :math:`\sqrt{\min(m, n)}` so ``lr`` and
            ``adjust_lr`` keep their meaning (:mod:`matrixopt.optim._orthogonalizers`).
        betas: AdamW path (β1, β2) (default (0.9, 0.999), torch.optim.AdamW's).
        eps: AdamW path ε (default 1e-8).
        process_group: data parallelism (not a group key). DTensor parameters
            (FSDP2 ``fully_shard``, ``Shard(0)`` on a 1-D mesh) are detected
            automatically: one all-to-all brings whole matrices to their owner
            rank and one returns the shards (``process_group``, if given, must be
            the mesh's group). For plain parameters under DDP, pass the DDP group
            (e.g. ``torch.distributed.group.WORLD``) to split the
            orthogonalisation across its ranks, balanced by flops, with one
            all-gather of the updates; ``None`` (default) computes everything on
            every rank. See :mod:`matrixopt.optim._distributed`.
        nonfinite: what a gradient with NaN/Inf does: ``"skip"`` (default: that
            parameter and its state are left unchanged, counted in state
            ``nonfinite_count``; masked, no host sync, see
            :mod:`matrixopt.optim._nonfinite`), ``"raise"``
            (:class:`~matrixopt.optim._common.NonFiniteGradientError` naming group
            and parameter index, before anything is updated) or ``"ignore"``
            (torch's behaviour: NaN flows into the weights).
        state_dtype: storage of ``momentum_buffer`` and the AdamW moments:
            ``None`` (default: the parameter's dtype), ``"fp32"``, ``"bf16"`` or
            ``"int8"`` (block-wise 8-bit, see :mod:`matrixopt.optim._state`).
        qk_clip: a :class:`~matrixopt.optim.QKClip` to run after every step
            (MuonClip, Kimi K2; not a group key): same as ``qk_clip.hook(opt)``.

    State per Muon parameter: ``momentum_buffer`` (torch.optim.Muon's key, so its
    checkpoints load) and, with NorMuon, ``normuon_v``; per AdamW parameter:
    ``step``, ``exp_avg``, ``exp_avg_sq`` (torch.optim.AdamW's keys). All tensors.
    ``step()`` never modifies ``p.grad``. Parameters whose ``grad`` is ``None``
    are not touched (no weight decay either).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        *,
        algorithm: str = "auto",
        adjust_lr: str = "match_rms_adamw",
        coefficients: Any = "polar_express",
        ns_steps: int | None = None,
        ns_dtype: torch.dtype | None = torch.bfloat16,
        normalization: str = "frobenius",
        ns_method: str = "auto",
        ns_backend: str = "auto",
        matrix_view: str = "auto",
        split: int | tuple[int, str] | None = None,
        normuon: bool = False,
        normuon_beta2: float = 0.95,
        cautious_wd: bool = False,
        orthogonalizer: str = "newton_schulz",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        process_group: Any | None = None,
        nonfinite: str = "skip",
        state_dtype: str | None = None,
        qk_clip: Any | None = None,
    ) -> None:
        defaults = dict(
            lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
            algorithm=algorithm, adjust_lr=adjust_lr, coefficients=coefficients,
            ns_steps=ns_steps, ns_dtype=ns_dtype, normalization=normalization,
            ns_method=ns_method, ns_backend=ns_backend, matrix_view=matrix_view, split=split,
            normuon=normuon, normuon_beta2=normuon_beta2, cautious_wd=cautious_wd,
            orthogonalizer=orthogonalizer, betas=betas, eps=eps, nonfinite=nonfinite,
            state_dtype=state_dtype,
        )
        super().__init__(params, defaults, process_group)
        if qk_clip is not None:  # MuonClip: QK-clip after every step (not a group key)
            qk_clip.hook(self)

    def _check_strategy(self) -> None:
        if not self._strategy.sharded:
            return
        for i, g in enumerate(self.param_groups):
            if g["normuon"]:
                raise GroupError(f"Muon: param_groups[{i}]: normuon=True is not supported "
                                 f"with FSDP2 (DTensor) parameters")
            if g["state_dtype"] in ("bf16", "int8"):
                raise GroupError(f"Muon: param_groups[{i}]: state_dtype={g['state_dtype']!r} "
                                 f"is not supported with FSDP2 (DTensor) parameters; use None "
                                 f"or 'fp32'")

    # ------------------------------------------------------------------ checks
    def _check_group(self, check: _GroupChecker) -> None:
        g = check.group
        check.number("lr", low=0.0)
        check.number("weight_decay", low=0.0)
        check.number("momentum", low=0.0, high=1.0, high_open=True)
        check.boolean("nesterov")
        check.choice("algorithm", _ALGORITHMS)
        check.choice("adjust_lr", ADJUST_LR_MODES)
        check.integer("ns_steps", low=1, allow_none=True)
        check.dtype("ns_dtype")
        check.choice("normalization", ("frobenius", "spectral", "aol"))
        check.choice("ns_method", ("auto", "standard", "gram"))
        check.choice("ns_backend", ("auto", "torch", "triton"))
        check.choice("matrix_view", VIEWS)
        try:
            split = _split_spec(g["split"])
        except ValueError:
            raise check.fail("split", "must be None, an int k >= 1 or (k, 'rows'|'cols')"
                             ) from None
        check.boolean("normuon")
        check.number("normuon_beta2", low=0.0, high=1.0, high_open=True)
        check.boolean("cautious_wd")
        check.choice("orthogonalizer", OPERATORS)
        check.betas("betas")
        check.number("eps", low=0.0)
        check_state_dtype(check)
        try:
            resolve_coefficients(g["coefficients"], g["ns_steps"])
        except (ValueError, TypeError) as e:
            raise GroupError(f"Muon: param_groups[{check.index}]: coefficients: {e}") from None
        for p in g["params"]:
            alg = self._algorithm_for(g, p)
            if g["algorithm"] == "muon" and p.ndim < 2:
                raise GroupError(
                    f"Muon: param_groups[{check.index}]: algorithm 'muon' needs parameters with "
                    f">= 2 dims, got one of shape {tuple(p.shape)}; use algorithm='adamw' or "
                    f"'auto' for it")
            if alg == "muon" and split is not None:
                _, m, n = self._view_shape({**g, "split": None}, p)
                k, along = split
                if (m if along == "rows" else n) % k:
                    raise GroupError(
                        f"Muon: param_groups[{check.index}]: split={g['split']!r} does not "
                        f"divide the {m if along == 'rows' else n} {along} of a parameter of "
                        f"shape {tuple(p.shape)}")
                if along == "cols" and _is_dtensor(p):
                    raise GroupError(
                        f"Muon: param_groups[{check.index}]: split={g['split']!r} (columns) is "
                        f"not supported with FSDP2 (DTensor) parameters; split rows instead")
        ambiguous = [tuple(p.shape) for p in g["params"]
                     if p.ndim == 3 and g["matrix_view"] == "auto"
                     and self._algorithm_for(g, p) == "muon"]
        if ambiguous:
            warnings.warn(
                f"Muon: param_groups[{check.index}]: matrix_view='auto' treats the 3-D "
                f"parameter(s) of shape {ambiguous[:3]} as batches of matrices (stacked "
                f"experts [E, rows, cols]); a Conv1d weight [out, in, k] needs "
                f"matrix_view='flatten'. A bare tensor does not say which it is: use "
                f"matrixopt.optim.muon_param_groups(model), which knows the modules, or set "
                f"matrix_view='batch' / 'flatten' for this group",
                stacklevel=external_stacklevel())

    # ----------------------------------------------------------------- routing
    @staticmethod
    def _algorithm_for(group: dict[str, Any], p: Tensor) -> str:
        alg = group["algorithm"]
        if alg == "auto":
            return "muon" if p.ndim >= 2 else "adamw"
        return alg

    @staticmethod
    def _view_shape(group: dict[str, Any], p: Tensor) -> tuple[int, int, int]:
        """(batch, rows, cols) of the matrices the parameter is orthogonalised as: its
        :func:`~matrixopt.optim._views.matrix_view`, cut into ``split`` blocks."""
        b, m, n, _ = matrix_view(p.shape, group["matrix_view"])
        split = _split_spec(group["split"])
        if split is None:
            return b, m, n
        k, along = split
        return (b * k, m // k, n) if along == "rows" else (b * k, m, n // k)

    # -------------------------------------------------------------------- step
    def _step_group(self, index: int, group: dict[str, Any], params: list[Tensor]) -> None:
        st = self._strategy
        muon_p: list[Tensor] = []
        adam_p: list[Tensor] = []
        for p in params:
            check_grad(p, "Muon", index)
            state = self.state[p]
            if self._algorithm_for(group, p) == "muon":
                if "momentum_buffer" not in state:
                    init_moment(state, "momentum_buffer", p, group["state_dtype"], signed=True)
                if group["normuon"] and "normuon_v" not in state:
                    b, m, _ = self._view_shape(group, p)
                    state["normuon_v"] = torch.zeros(b, m, dtype=p.dtype, device=p.device)
                muon_p.append(p)
            else:
                if "exp_avg" not in state:
                    init_adam_state(state, p, group["state_dtype"])
                adam_p.append(p)
        ordered = muon_p + adam_p
        local_p = [st.local(p) for p in ordered]
        grads = [st.local(p.grad) for p in ordered]  # type: ignore[arg-type]
        flags = self._flags(group, grads)
        k = len(muon_p)
        lr, wd = _as_float(group["lr"]), float(group["weight_decay"])
        if adam_p:
            beta1, beta2 = (float(b) for b in group["betas"])
            # safe gradients (a copy each under the policy) in chunks of bounded size
            for idx in flags.chunks(grads[k:]):
                ids = [k + i for i in idx]
                one = flags.subset(ids)
                adamw_states_([local_p[i] for i in ids], one.safe([grads[i] for i in ids]),
                              [self.state[ordered[i]] for i in ids], group["state_dtype"],
                              lr=lr, beta1=beta1, beta2=beta2, eps=float(group["eps"]),
                              weight_decay=wd, flags=one)
        if muon_p:
            self._muon(group, muon_p, local_p[:k], grads[:k], lr, wd,
                       flags.subset(range(k)))
        flags.count_([self.state[p] for p in ordered], [p.device for p in local_p])

    def _muon(self, group: dict[str, Any], keys: list[Tensor], params: list[Tensor],
              grads: list[Tensor], lr: float, wd: float, flags: StepFlags) -> None:
        """The Muon update (:func:`~matrixopt.optim.functional.muon_`) of local
        ``params`` on the momentum in the group's ``state_dtype``."""
        views = [self._view_shape(group, p) for p in keys]  # from the global shapes
        states = [self.state[p] for p in keys]
        sd = group["state_dtype"]
        native = all(is_native(s, "momentum_buffer", p, sd) for s, p in zip(states, params))
        # quantised / converted momentum: transient float32 working copies, stored after
        bufs = [local_tensor(s["momentum_buffer"]) if native else
                load_moment(s, "momentum_buffer", compute_dtype(p), signed=True)
                for s, p in zip(states, params)]

        def orth(X: Tensor) -> Tensor:
            return orthogonalize(
                X, steps=group["ns_steps"], coefficients=group["coefficients"],
                normalization=group["normalization"], dtype=group["ns_dtype"],
                method=group["ns_method"], backend=group["ns_backend"])

        # the payload of a distributed exchange: what the iteration ends in (exact)
        comm = (iteration_dtype(group["ns_dtype"], group["ns_method"])
                if group["ns_dtype"] is not None else None)
        split = _split_spec(group["split"])
        cols_k = split[0] if split is not None and split[1] == "cols" else 0
        whole = [self._view_shape({**group, "split": None}, p) for p in keys]

        def orthogonalize_all(dirs: list[Tensor]) -> list[Tensor]:
            if cols_k:  # a column split: each block made contiguous
                dirs = [_col_blocks(d, v, cols_k) for d, v in zip(dirs, whole)]
            return apply_orthogonalizer(self._strategy, group, dirs, views,
                                        [p.shape for p in keys], orth, comm)

        def unview(i: int, O: Tensor) -> Tensor:
            if cols_k:
                O = _col_unblocks(O, whole[i], cols_k)
            return O.reshape(params[i].shape)

        muon_(params, grads, bufs, views=views, lr=lr,
              weight_decay=wd, mu=float(group["momentum"]), nesterov=group["nesterov"],
              scales=[muon_update_scale(m, n, group["adjust_lr"]) for _, m, n in views],
              orthogonalize=orthogonalize_all, unview=unview, cautious_wd=group["cautious_wd"],
              row_stats=[s["normuon_v"] for s in states] if group["normuon"] else None,
              normuon_beta2=float(group["normuon_beta2"]), flags=flags)
        if not native:
            for s, b in zip(states, bufs):
                store_moment(s, "momentum_buffer", b, sd, signed=True)
