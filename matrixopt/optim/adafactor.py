r"""Adafactor: Adam-like steps with a factored (O(m+n)) second moment.

Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory
Cost" (ICML 2018), with the knobs of the later variants (big_vision / optax /
timm: factor the two largest dims, ``min_dim_size_to_factor``, β₂ cap,
low-precision momentum). For a gradient :math:`G` factored over dims
(row, col) — an :math:`m\times n` matrix, with any other dims kept as batch:

.. math::
    \hat\beta_{2,t} &= \min(1 - t^{c},\ \beta_{2,\max}) \qquad (c = \text{decay\_rate} = -0.8)\\
    R_t &= \hat\beta_{2,t} R_{t-1}
        + (1-\hat\beta_{2,t})\,\operatorname{mean}_{col}(G^2 + \epsilon_1)
        \quad (m)\\
    C_t &= \hat\beta_{2,t} C_{t-1}
        + (1-\hat\beta_{2,t})\,\operatorname{mean}_{row}(G^2 + \epsilon_1)
        \quad (n)\\
    \hat V_t &= R_t C_t^\top / \operatorname{mean}(R_t), \qquad U_t = G / \sqrt{\hat V_t}\\
    \hat U_t &= U_t / \max(1, \operatorname{RMS}(U_t)/d) \qquad (d = \text{clip\_threshold})\\
    \alpha_t &= \rho_t \cdot \max(\epsilon_2, \operatorname{RMS}(W_{t-1}))
        \quad\text{(parameter scaling; } \alpha_t = \rho_t \text{ without)}\\
    \rho_t &= \min(\text{lr},\ 1/\sqrt t) \quad\text{(relative step, lr = }10^{-2}
        \text{ by default; } \min(10^{-6} t, 1/\sqrt t) \text{ with warmup\_init; }
        \rho_t = \text{lr without)}\\
    M_t &= \beta_1 M_{t-1} + (1-\beta_1)\,\alpha_t \hat U_t
        \quad\text{(only if beta1 is set; } M_t = \alpha_t\hat U_t \text{ otherwise)}\\
    W_t &= W_{t-1}(1 - \lambda\alpha_t) - M_t.

Tensors that are not factored (vectors, scalars, and tensors whose second
largest dim is below ``min_dim_size_to_factor``) keep the full
:math:`V_t` (EMA of :math:`G^2 + \epsilon_1`).

Cost per step: a few elementwise passes over each gradient plus two
reductions; memory :math:`m + n` per factored matrix (times the other dims),
plus the momentum if ``beta1`` is set. No host synchronisation per
parameter: the step counters live on the CPU and are read once per group; the
RMS values and the clipping factor stay tensors.

The math is :mod:`matrixopt.optim.functional.adafactor` (pure functions on
local tensors, with a ``reduce`` hook for FSDP2 row shards); this module owns
the state layout, the validation and the class.
:class:`~matrixopt.optim.GaLoreAdafactor` runs the same functions on projected
gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from ._common import GroupError, MatrixOptimizer, _GroupChecker, check_grad, optional_float
from ._distributed import local_tensor
from ._nonfinite import StepFlags
from ._quant import BLOCK, MIN_QUANT_NUMEL, quantize_blockwise, to_row_blocks
from ._state import (
    ABSMAX,
    check_state_dtype,
    counters_to_cpu_,
    init_moment,
    step_moment,
    store_moment,
)
from .functional.adafactor import (
    adafactor_,
    factored_dims,
    relative_step_size,
    stat_dtype,
    step_sizes,
)

__all__ = [
    "Adafactor",
    "hf_schedule_lr",
    "factored_dims",
    "init_adafactor_state",
    "adafactor_states_",
    "group_step_sizes",
    "check_adafactor_group",
    "adafactor_defaults",
    "second_moment_shapes",
    "init_group_state",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------
# math as functions (shared with GaLoreAdafactor)
# ----------------------------------------------------------------------------
def init_adafactor_state(state: dict[str, Any], like: Tensor, dims: tuple[int, int] | None,
                         beta1: float | None, momentum_dtype: torch.dtype | None,
                         state_dtype: str | None = None) -> None:
    """Create Adafactor state for a gradient shaped like ``like``.

    Keys: ``step`` (float32 CPU scalar tensor); ``exp_avg_sq_row`` (size 1 at
    ``col_dim``) and ``exp_avg_sq_col`` (size 1 at ``row_dim``) when factored,
    else ``exp_avg_sq``; ``exp_avg`` (in ``momentum_dtype``, default the
    tensor's dtype; ``state_dtype``, when set, takes precedence) when ``beta1``
    is set.
    """
    sd = stat_dtype(like.dtype)
    state["step"] = torch.tensor(0.0, dtype=torch.float32, device="cpu")
    for key, shape in second_moment_shapes(like.shape, dims).items():
        state[key] = torch.zeros(shape, dtype=sd, device=like.device)
    if beta1 is not None and state_dtype is not None:
        init_moment(state, "exp_avg", like, state_dtype, signed=True)
    elif beta1 is not None:
        state["exp_avg"] = torch.zeros(like.shape, dtype=momentum_dtype or like.dtype,
                                       device=like.device)


def second_moment_shapes(shape: Sequence[int], dims: tuple[int, int] | None
                         ) -> dict[str, tuple[int, ...]]:
    """The second-moment state of a tensor of ``shape``: factored over ``dims`` =
    (row_dim, col_dim), ``exp_avg_sq_row`` (size 1 at ``col_dim``) and
    ``exp_avg_sq_col`` (size 1 at ``row_dim``); unfactored, ``exp_avg_sq`` (``shape``)."""
    if dims is None:
        return {"exp_avg_sq": tuple(shape)}
    row_dim, col_dim = dims
    rshape, cshape = list(shape), list(shape)
    rshape[col_dim] = 1
    cshape[row_dim] = 1
    return {"exp_avg_sq_row": tuple(rshape), "exp_avg_sq_col": tuple(cshape)}


def init_group_state(state: dict[str, Any], p: Tensor, dims: tuple[int, int] | None,
                     group: dict[str, Any], sharded: bool) -> None:
    """Create the Adafactor state of ``p`` with ``group``'s settings: DTensors like ``p``
    under FSDP2 (``sharded``), else plain tensors (shared with GaLoreAdafactor)."""
    init = _init_sharded_state if sharded else init_adafactor_state
    init(state, p, dims, group["beta1"], group["momentum_dtype"], group["state_dtype"])
    if not sharded:
        rows_aligned_(state, p)


def rows_aligned_(state: dict[str, Any], p: Tensor) -> None:
    """An int8 momentum of a >= 2-dim parameter in the row-aligned block layout (blocks
    never straddle a ``Shard(0)`` shard: one process and FSDP2 quantise alike,
    :func:`~matrixopt.optim._quant.quantize_blockwise`); a flat one is converted."""
    if p.dim() >= 2 and "exp_avg" + ABSMAX in state and state["exp_avg" + ABSMAX].dim() == 1:
        state["exp_avg"], state["exp_avg" + ABSMAX] = to_row_blocks(
            state["exp_avg"], state["exp_avg" + ABSMAX], signed=True)


# ----------------------------------------------------------------------------
# the optimizer
# ----------------------------------------------------------------------------
class Adafactor(MatrixOptimizer):
    r"""Adafactor with Hugging Face's argument names and semantics.

    Replaces ``transformers.optimization.Adafactor`` (same arguments, same
    update; ``lr=1e-2`` by default where Hugging Face has ``None``, the same step)
    and covers ``torch.optim.Adafactor``::

        opt = Adafactor(model.parameters())                        # HF defaults: relative step
        opt = Adafactor(model.parameters(), lr=1e-3, relative_step=False,
                        scale_parameter=False, beta2_cap=0.999)    # "modern" fixed-lr variant

    Learning-rate schedulers: every torch scheduler (``StepLR``, ``LambdaLR``,
    ``transformers.get_linear_schedule_with_warmup``, ...) works: ``lr`` is a
    number, and with ``relative_step=True`` it caps the relative step, so a
    schedule scales the cap. Hugging Face's ``AdafactorSchedule`` (a proxy that
    overwrites ``lr`` with the step size it logs, calling ``_get_lr``) needs
    ``lr=None``, as Hugging Face's docs write it, so that ``lr`` is not read.

    Args:
        params: parameters or parameter groups.
        lr: learning rate (default 1e-2). With ``relative_step=False`` the step
            :math:`\rho_t = \text{lr}`; with ``relative_step=True`` it caps the
            relative step, :math:`\rho_t = \min(\text{lr}, 1/\sqrt t)` —
            torch.optim.Adafactor's rule; the default 1e-2 is Hugging Face's
            constant, so ``lr=1e-2`` and Hugging Face's ``lr=None`` take the same
            steps. ``lr=None`` (Hugging Face's spelling, relative step only) stores
            ``lr=1e-2, external_lr=False``: the step never reads ``lr``, so a
            scheduler writing it (``AdafactorSchedule``) does not change it.
        eps: :math:`(\epsilon_1, \epsilon_2)`: regulariser added to :math:`G^2`
            (default 1e-30) and floor of the parameter RMS in parameter scaling
            (default 1e-3).
        clip_threshold: :math:`d` in the update clipping
            :math:`U/\max(1, \operatorname{RMS}(U)/d)` (default 1.0; ``None``
            disables clipping).
        decay_rate: :math:`c` in :math:`\hat\beta_{2,t} = 1 - t^{c}` (default -0.8).
        beta1: momentum coefficient (default ``None``: no momentum, no memory for it).
        weight_decay: decoupled weight decay :math:`\lambda`, multiplied by the
            step size :math:`\alpha_t` (as Hugging Face) (default 0).
        scale_parameter: multiply the step by :math:`\max(\epsilon_2, \operatorname{RMS}(W))`
            (default True).
        relative_step: time-dependent step :math:`\rho_t` (default True).
        warmup_init: :math:`\rho_t = \min(10^{-6} t, 1/\sqrt t)` (needs
            ``relative_step=True``; ``lr`` is not read) (default False).
        min_dim_size_to_factor: factor only tensors whose second largest dim is
            at least this (default 1: every tensor with ≥ 2 dims, as Hugging
            Face; optax/big_vision use 128).
        beta2_cap: upper bound on :math:`\hat\beta_{2,t}` (default ``None``, as
            Hugging Face; 0.999 in big_vision/optax).
        momentum_dtype: dtype of the momentum buffer (default ``None``: the
            parameter's; ``torch.bfloat16`` halves its memory).
        nonfinite: ``"skip"`` (default), ``"raise"`` or ``"ignore"``: what a
            gradient with NaN/Inf does (see :class:`~matrixopt.optim.Muon`).
        state_dtype: storage of the momentum, ``None`` (default: as
            ``momentum_dtype``), ``"fp32"``, ``"bf16"`` or ``"int8"`` (block-wise
            8-bit, :mod:`matrixopt.optim._state`); the factored statistics are
            already tiny and stay float32.
        external_lr: whether the relative step reads ``lr`` as its cap
            (default True; ``False``: :math:`\rho_t = \min(10^{-2}, 1/\sqrt t)`,
            Hugging Face's rule, what ``lr=None`` selects). Ignored with
            ``relative_step=False``.

    The factored dims are the two largest (:func:`factored_dims`), so a conv
    weight ``[out, in, kh, kw]`` keeps statistics of sizes ``out·kh·kw`` and
    ``in·kh·kw``. Statistics are kept in float32 (float64 for float64
    parameters); bf16/fp16 parameters are updated through a float32 copy.

    Under FSDP2 (``Shard(0)`` DTensor parameters) the step runs on the local
    shards and only the sums that span the sharded dim are all-reduced (the
    strategy's ``reduce`` in :func:`~matrixopt.optim.functional.adafactor_`); the
    state stays sharded DTensors, a bf16/fp32 ``state_dtype`` momentum included.
    An int8 momentum (``state_dtype="int8"`` with ``beta1``) uses row-aligned
    quantisation blocks (every row its own blocks, :func:`~matrixopt.optim._quant.
    quantize_blockwise` ``rows=True``) in one process and under FSDP2 alike, so a
    row shard holds whole blocks and both quantise the same numbers the same way;
    a vector's shards must be whole 256-entry blocks (else a clear error).

    State per parameter (tensors only): ``step``, ``exp_avg_sq_row`` /
    ``exp_avg_sq_col`` (factored) or ``exp_avg_sq``, and ``exp_avg`` with
    ``beta1``. ``step()`` never modifies ``p.grad``; parameters whose grad is
    ``None`` are not touched.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor | None = 1e-2,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float | None = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        relative_step: bool = True,
        warmup_init: bool = False,
        *,
        min_dim_size_to_factor: int = 1,
        beta2_cap: float | None = None,
        momentum_dtype: torch.dtype | None = None,
        nonfinite: str = "skip",
        state_dtype: str | None = None,
        external_lr: bool = True,
    ) -> None:
        defaults = adafactor_defaults(lr, eps, clip_threshold, decay_rate, beta1, weight_decay,
                                      scale_parameter, relative_step, warmup_init,
                                      min_dim_size_to_factor, beta2_cap, momentum_dtype,
                                      external_lr)
        defaults.update(nonfinite=nonfinite, state_dtype=state_dtype)
        super().__init__(params, defaults)

    def _check_strategy(self) -> None:
        if not self._strategy.sharded:
            return
        w = self._strategy.world
        for i, g in enumerate(self.param_groups):
            if g["state_dtype"] != "int8" or g["beta1"] is None:
                continue
            for p in g["params"]:
                chunk = -(-p.numel() // w)
                if p.dim() == 1 and p.numel() >= MIN_QUANT_NUMEL and chunk % BLOCK:
                    raise GroupError(
                        f"Adafactor: param_groups[{i}]: state_dtype='int8' under FSDP2 needs "
                        f"the shards of a vector to be whole {BLOCK}-entry blocks; a vector of "
                        f"{p.numel()} entries on {w} ranks has shards of {chunk}; use 'bf16', "
                        f"'fp32' or None for this group")

    @staticmethod
    def _get_lr(group: dict[str, Any], state: dict[str, Any]) -> float:
        """Hugging Face's ``AdafactorSchedule`` reads the step size here
        (:func:`hf_schedule_lr`)."""
        return hf_schedule_lr(group, state)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's; an older flat-layout int8 momentum is converted (:func:`rows_aligned_`)."""
        super().load_state_dict(state_dict)
        for p in (p for g in self.param_groups for p in g["params"] if p in self.state):
            if not self._strategy.sharded:
                rows_aligned_(self.state[p], p)

    # ------------------------------------------------------------------ checks
    def _check_group(self, check: _GroupChecker) -> None:
        check_adafactor_group(check)

    # -------------------------------------------------------------------- step
    def _step_group(self, index: int, group: dict[str, Any], params: list[Tensor]) -> None:
        strategy = self._strategy
        dims = self._init_states(index, group, params)
        states = [self.state[p] for p in params]
        local = [strategy.local(p) for p in params]
        flags = self._flags(group, [strategy.local(p.grad) for p in params])  # type: ignore[arg-type]
        grads = [strategy.local(p.grad) for p in params]  # type: ignore[arg-type]  # made safe one by one
        adafactor_states_(local, grads, states, dims, group, flags, strategy.reduce,
                          [p.shape for p in params])
        flags.count_(states, [p.device for p in local])

    def _init_states(self, index: int, group: dict[str, Any], params: list[Tensor]
                     ) -> list[tuple[int, int] | None]:
        """Factored dims per parameter; creates missing state (DTensors when sharded)."""
        dims: list[tuple[int, int] | None] = []
        for p in params:
            check_grad(p, "Adafactor", index)
            d = factored_dims(p.shape, group["min_dim_size_to_factor"])
            state = self.state[p]
            if "step" not in state:
                init_group_state(state, p, d, group, self._strategy.sharded)
            elif ("exp_avg_sq_row" in state) != (d is not None):
                raise RuntimeError(
                    f"Adafactor: param_groups[{index}]: the state of a parameter of shape "
                    f"{tuple(p.shape)} was created {'with' if d is None else 'without'} "
                    f"factoring; min_dim_size_to_factor cannot change during training")
            dims.append(d)
        return dims


def group_step_sizes(steps: list[Tensor], group: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    """:func:`~matrixopt.optim.functional.adafactor.step_sizes` with a group's settings
    (advances the CPU counters); the relative step reads ``lr`` unless the group says
    not to (``lr=None``, Hugging Face's rule, ``external_lr=False``)."""
    lr = optional_float(group["lr"]) if group["external_lr"] or not group["relative_step"] else None
    return step_sizes(steps, lr=lr, decay_rate=float(group["decay_rate"]),
                      beta2_cap=optional_float(group["beta2_cap"]),
                      relative_step=group["relative_step"], warmup_init=group["warmup_init"])


def adafactor_states_(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]],
                      dims: list[tuple[int, int] | None], group: dict[str, Any],
                      flags: StepFlags, reduce: Callable[[Tensor], Tensor] | None = None,
                      full_shapes: Sequence[Sequence[int]] | None = None) -> None:
    """:func:`~matrixopt.optim.functional.adafactor_` on local parameters whose state lives
    in ``states`` (any ``state_dtype`` of the momentum; group hyperparameters from
    ``group``). Shared by :class:`Adafactor` and GaLoreAdafactor's unprojected tensors."""
    for s in states:  # a checkpoint from a capturable optimizer holds `step` on the device
        counters_to_cpu_(s, ("step",))
    beta2s, rhos = group_step_sizes([s["step"] for s in states], group)
    sd, beta1 = group["state_dtype"], group["beta1"]
    # a quantised / converted momentum steps through a transient float32 copy
    moms: list[Tensor | None] = [None] * len(params)
    stored: list[int] = []
    # the momentum's local tensors (the shards' under FSDP2; the state's own otherwise)
    views = [{k: local_tensor(s[k]) for k in ("exp_avg", "exp_avg" + ABSMAX) if k in s}
             for s in states]
    for i, (v, p) in enumerate(zip(views, params)):
        if beta1 is None:
            continue
        moms[i], native = step_moment(v, "exp_avg", sd, p)
        if not native:
            stored.append(i)

    def get(key: str) -> list[Tensor | None]:
        return [local_tensor(s[key]) if key in s else None for s in states]

    adafactor_(params, grads, get("exp_avg_sq_row"), get("exp_avg_sq_col"), get("exp_avg_sq"),
               moms, dims, beta2s=beta2s, rhos=rhos, eps1=float(group["eps"][0]),
               eps2=float(group["eps"][1]), clip_threshold=optional_float(group["clip_threshold"]),
               weight_decay=float(group["weight_decay"]),
               beta1=None if beta1 is None else float(beta1),
               scale_parameter=group["scale_parameter"], full_shapes=full_shapes, reduce=reduce,
               flags=flags)
    for i in stored:
        v, m = views[i], moms[i]
        assert m is not None
        if reduce is not None and "exp_avg" + ABSMAX in v:  # a shard: the whole tensor's format
            quantize_blockwise(m, True, out=(v["exp_avg"], v["exp_avg" + ABSMAX]))
            continue
        store_moment(v, "exp_avg", m, sd, signed=True)
        if reduce is None:  # a converted format is a new tensor (in one process only)
            states[i].update(v)
            if "exp_avg" + ABSMAX not in v:
                states[i].pop("exp_avg" + ABSMAX, None)


def _init_sharded_state(state: dict[str, Any], p: Tensor, dims: tuple[int, int] | None,
                        beta1: float | None, momentum_dtype: torch.dtype | None,
                        state_dtype: str | None) -> None:
    """:func:`init_adafactor_state` for a ``Shard(0)`` DTensor parameter: the same keys and
    global shapes, as DTensors (``exp_avg_sq_col`` replicated when it spans dim 0), so
    :mod:`torch.distributed.checkpoint` saves and reshards them."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor import zeros as dzeros
    mesh = p.device_mesh  # type: ignore[attr-defined]
    sd = stat_dtype(p.dtype)
    state["step"] = torch.tensor(0.0, dtype=torch.float32, device="cpu")
    for key, shape in second_moment_shapes(p.shape, dims).items():
        spans_rows = key == "exp_avg_sq_col" and dims is not None and dims[0] == 0
        state[key] = dzeros(list(shape), dtype=sd, device_mesh=mesh,
                            placements=[Replicate() if spans_rows else Shard(0)])
    if beta1 is not None and state_dtype == "int8" and p.numel() >= MIN_QUANT_NUMEL:
        # codes sharded like p; scales [rows, blocks per row] (a shard holds whole blocks)
        # or, for a vector, [blocks] (whole blocks per shard: checked), sharded alike
        lead = [p.shape[0]] if p.dim() >= 2 else []
        scales_shape = lead + [-(-(p.numel() // max([1, *lead])) // BLOCK)]
        state["exp_avg"] = torch.zeros_like(p, dtype=torch.int8)
        state["exp_avg" + ABSMAX] = dzeros(scales_shape, dtype=torch.float32, device_mesh=mesh,
                                           placements=[Shard(0)])
        codes, scales = local_tensor(state["exp_avg"]), local_tensor(state["exp_avg" + ABSMAX])
        quantize_blockwise(torch.zeros(codes.shape, device=codes.device), True,
                           out=(codes, scales))
    elif beta1 is not None:
        dt = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(state_dtype or "",
                                                                momentum_dtype or p.dtype)
        state["exp_avg"] = torch.zeros_like(p, dtype=dt)


#: The relative step's cap when ``lr`` is not read (Hugging Face's constant).
HF_RELATIVE_STEP_CAP = 1e-2


def adafactor_defaults(lr: Any, eps: Any, clip_threshold: Any, decay_rate: Any, beta1: Any,
                       weight_decay: Any, scale_parameter: Any, relative_step: Any,
                       warmup_init: Any, min_dim_size_to_factor: Any, beta2_cap: Any,
                       momentum_dtype: Any, external_lr: bool) -> dict[str, Any]:
    """The Adafactor keys of a ``defaults`` dict (shared with GaLoreAdafactor), ``lr``
    as stored (:func:`adafactor_lr_defaults`)."""
    lr, external_lr = adafactor_lr_defaults(lr, external_lr, relative_step)
    return dict(
        lr=lr, external_lr=external_lr, eps=eps, clip_threshold=clip_threshold,
        decay_rate=decay_rate, beta1=beta1,
        weight_decay=weight_decay, scale_parameter=scale_parameter,
        relative_step=relative_step, warmup_init=warmup_init,
        min_dim_size_to_factor=min_dim_size_to_factor, beta2_cap=beta2_cap,
        momentum_dtype=momentum_dtype,
    )


def adafactor_lr_defaults(lr: Any, external_lr: bool, relative_step: Any
                          ) -> tuple[Any, bool]:
    """``lr=None`` (Hugging Face's spelling of "the relative step alone") as stored:
    ``lr=1e-2`` (a number, so torch's schedulers work) and ``external_lr=False``
    (the step does not read it). Other values pass through; ``lr=None`` with
    ``relative_step=False`` is left for the group check to reject."""
    if lr is None and relative_step is True:
        return HF_RELATIVE_STEP_CAP, False
    return lr, external_lr


def hf_schedule_lr(group: dict[str, Any], state: dict[str, Any]) -> float:
    r"""The step size :math:`\alpha_t` Hugging Face's ``AdafactorSchedule`` logs
    (``optimizer._get_lr(group, state)``): :math:`\rho_t` at the state's ``step``,
    times :math:`\max(\epsilon_2, \operatorname{RMS}(W))` of the group's first
    parameter (the one whose state the schedule passes) with ``scale_parameter``.

    The schedule then writes that value into ``group["lr"]``; a group whose step
    reads ``lr`` (``relative_step=False``, or ``external_lr=True``) would change
    its own step size, so that raises, asking for ``lr=None``. Called by the
    scheduler, outside ``step()``: the RMS is one host read.
    """
    if not group["relative_step"] or (group["external_lr"] and not group["warmup_init"]):
        raise ValueError(
            "Adafactor: Hugging Face's AdafactorSchedule overwrites group['lr'] with the step "
            "size it logs, but this group's step reads lr (relative_step="
            f"{group['relative_step']}, external_lr={group['external_lr']}); construct the "
            "optimizer with lr=None and relative_step=True (Hugging Face's setting for "
            "AdafactorSchedule), or use a torch scheduler (docs/migration.md)")
    step = state.get("step", 0)
    t = max(1.0, float(step.item()) if isinstance(step, Tensor) else float(step))
    rho = relative_step_size(t, None, True, bool(group["warmup_init"]))
    if not group["scale_parameter"]:
        return rho
    p = local_tensor(group["params"][0]).detach()
    rms = float(p.float().norm()) / math.sqrt(max(1, p.numel()))
    return max(float(group["eps"][1]), rms) * rho


def check_adafactor_group(check: _GroupChecker, owner: str = "Adafactor") -> None:
    """Validate the Adafactor keys of a group (shared with GaLoreAdafactor)."""
    g = check.group
    if g["lr"] is None:  # Hugging Face's spelling, given in a group dict
        g["lr"], g["external_lr"] = adafactor_lr_defaults(None, g["external_lr"],
                                                          g["relative_step"])
    check.number("lr", low=0.0, allow_none=True)
    if g["lr"] is None:
        raise check.fail("lr", "must be given when relative_step=False (lr=None means the "
                               "relative step schedule)")
    check.boolean("external_lr")
    eps = g["eps"]
    if not (isinstance(eps, (tuple, list)) and len(eps) == 2
            and all(isinstance(e, (int, float)) and not isinstance(e, bool)
                    and math.isfinite(e) and e >= 0 for e in eps)):
        raise check.fail("eps", "must be a pair of finite numbers >= 0 (eps1, eps2)")
    check.number("clip_threshold", low=0.0, low_open=True, allow_none=True)
    check.number("decay_rate", high=0.0)
    check.number("beta1", low=0.0, high=1.0, high_open=True, allow_none=True)
    check.number("weight_decay", low=0.0)
    check.boolean("scale_parameter")
    check.boolean("relative_step")
    check.boolean("warmup_init")
    if g["warmup_init"] and not g["relative_step"]:
        raise check.fail("warmup_init", "needs relative_step=True")
    check.integer("min_dim_size_to_factor", low=1)
    check.number("beta2_cap", low=0.0, high=1.0, high_open=True, allow_none=True)
    check.dtype("momentum_dtype")
    check_state_dtype(check)

