"""Pieces shared by every matrixopt optimizer.

* :class:`MatrixOptimizer`: a :class:`torch.optim.Optimizer` base that validates
  every parameter group when it is added (at construction and in
  ``add_param_group``), rejects unknown group keys, and fills group keys that an
  older or foreign ``state_dict`` lacks (so ``torch.optim.Muon`` checkpoints
  load).
* validation helpers whose messages name the group index, the key and the value.
* gradient checks run at ``step()`` (sparse and complex gradients).
* the per-group non-finite gradient policy (``nonfinite`` = ``"skip"``,
  ``"raise"``, ``"ignore"``): :class:`SkipNonFinite` (masked, no host
  synchronisation) and :meth:`MatrixOptimizer._raise_on_nonfinite`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._distributed import _is_dtensor, local_tensor

__all__ = [
    "MatrixOptimizer",
    "CPU_COUNTERS",
    "GroupError",
    "NonFiniteGradientError",
    "NONFINITE_POLICIES",
    "SkipNonFinite",
    "check_grad",
    "finite_flags",
    "matrix_shape",
]

#: Values of the ``nonfinite`` group key (see :class:`SkipNonFinite`).
NONFINITE_POLICIES = ("skip", "raise", "ignore")
#: State key of the per-parameter count of skipped (non-finite) gradients.
NONFINITE_COUNT = "nonfinite_count"

# Keys torch or common tooling may put into a parameter group besides the
# optimizer's own hyperparameters: "name"/"param_names" (torch >= 2.6 named
# groups), "initial_lr" (lr schedulers add it).
_PASSTHROUGH_KEYS = frozenset({"params", "name", "param_names", "initial_lr"})
# Keys torch's Optimizer adds to ``defaults`` by itself (``__setstate__`` sets
# ``differentiable``): not matrixopt settings, never copied into a group, never
# accepted in one.
_TORCH_DEFAULT_KEYS = frozenset({"differentiable"})
#: Scalar counters kept on the CPU (as torch keeps ``step``), with their dtype:
#: the AdamW/Adafactor ``step`` and GaLore's refresh schedule. Reading them on
#: the host is no device synchronisation, so they must stay there across
#: save/load (:func:`load_state_keeping_dtypes`).
CPU_COUNTERS: dict[str, torch.dtype] = {
    "step": torch.float32, "iteration": torch.int64, "refresh_step": torch.int64,
    "refresh_offset": torch.int64, "seed": torch.int64,
}


class GroupError(ValueError):
    """Invalid hyperparameter in a parameter group (subclass of ValueError)."""


class NonFiniteGradientError(FloatingPointError):
    """A gradient holds NaN/Inf in a group with ``nonfinite="raise"``."""


def _is_number(x: object) -> bool:
    if isinstance(x, bool):
        return False
    if isinstance(x, Tensor):
        return x.numel() == 1 and not x.is_complex()
    return isinstance(x, (int, float))


def _as_float(x: object) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)  # type: ignore[arg-type]


class _GroupChecker:
    """Validation of one parameter group; every message names group and key."""

    def __init__(self, group: dict[str, Any], index: int, owner: str) -> None:
        self.group = group
        self.index = index
        self.owner = owner

    def fail(self, key: str, what: str) -> GroupError:
        return GroupError(
            f"{self.owner}: param_groups[{self.index}]: {key} {what}, got {self.group[key]!r}"
        )

    def number(self, key: str, *, low: float | None = None, high: float | None = None,
               low_open: bool = False, high_open: bool = False,
               allow_none: bool = False) -> None:
        v = self.group[key]
        if v is None and allow_none:
            return
        if not _is_number(v) or not math.isfinite(_as_float(v)):
            raise self.fail(key, "must be a finite number")
        x = _as_float(v)
        if low is not None and (x < low or (low_open and x == low)):
            raise self.fail(key, f"must be {'>' if low_open else '>='} {low}")
        if high is not None and (x > high or (high_open and x == high)):
            raise self.fail(key, f"must be {'<' if high_open else '<='} {high}")

    def integer(self, key: str, *, low: int = 1, allow_none: bool = False) -> None:
        v = self.group[key]
        if v is None and allow_none:
            return
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.fail(key, "must be an int")
        if v < low:
            raise self.fail(key, f"must be >= {low}")

    def boolean(self, key: str) -> None:
        if not isinstance(self.group[key], bool):
            raise self.fail(key, "must be True or False")

    def choice(self, key: str, choices: Sequence[Any]) -> None:
        if self.group[key] not in choices:
            raise self.fail(key, f"must be one of {list(choices)}")

    def betas(self, key: str = "betas") -> None:
        v = self.group[key]
        if not (isinstance(v, (tuple, list)) and len(v) == 2 and all(_is_number(b) for b in v)):
            raise self.fail(key, "must be a pair of numbers (beta1, beta2)")
        for i, b in enumerate(v):
            if not 0.0 <= _as_float(b) < 1.0:
                raise GroupError(
                    f"{self.owner}: param_groups[{self.index}]: {key}[{i}] must be in [0, 1), "
                    f"got {_as_float(b)!r}"
                )

    def dtype(self, key: str, *, allow_none: bool = True) -> None:
        v = self.group[key]
        if v is None and allow_none:
            return
        ok = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
        if not isinstance(v, torch.dtype) or v not in ok:
            raise self.fail(key, "must be None or one of torch.float16, torch.bfloat16, "
                                 "torch.float32, torch.float64")


class MatrixOptimizer(Optimizer):
    """Base class: validated parameter groups and forward-compatible loading.

    Subclasses set ``defaults`` and implement :meth:`_check_group`, which raises
    :class:`GroupError` (via the given checker) for a bad value.
    """

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        super().__init__(params, defaults)

    def _own_keys(self) -> set[str]:
        """The optimizer's own group keys (its defaults, without keys torch adds)."""
        return set(self.defaults) - _TORCH_DEFAULT_KEYS

    # -- validation -------------------------------------------------------
    def _check_group(self, check: _GroupChecker) -> None:
        """Validate one group's hyperparameters; subclasses extend this."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"{type(self).__name__}: a parameter group must be a dict, "
                            f"got {type(param_group).__name__}")
        index = len(self.param_groups)
        unknown = sorted(set(param_group) - self._own_keys() - _PASSTHROUGH_KEYS)
        if unknown:
            raise GroupError(
                f"{type(self).__name__}: param_groups[{index}]: unknown key(s) {unknown}; "
                f"valid keys are {sorted(self._own_keys())}"
            )
        params = param_group.get("params")
        if isinstance(params, Tensor):
            param_group["params"] = params = [params]
        elif params is not None and not isinstance(params, (set, dict)):
            param_group["params"] = params = list(params)
        if isinstance(params, list):
            self._check_duplicates(params, index)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for p in group["params"]:
            if p.is_complex():
                raise GroupError(f"{type(self).__name__}: param_groups[{index}]: complex "
                                 f"parameters are not supported (shape {tuple(p.shape)}, "
                                 f"dtype {p.dtype})")
            if not p.is_floating_point():
                raise GroupError(f"{type(self).__name__}: param_groups[{index}]: parameters "
                                 f"must be floating point, got dtype {p.dtype}")
        check = _GroupChecker(group, index, type(self).__name__)
        if "nonfinite" in group:
            check.choice("nonfinite", NONFINITE_POLICIES)
        self._check_group(check)

    def _check_duplicates(self, params: list[Any], index: int) -> None:
        """A parameter may appear once in one group: twice would update it twice per step."""
        owner = type(self).__name__
        # torch >= 2.6 also accepts (name, tensor) pairs (named_parameters())
        params = [p[1] if isinstance(p, tuple) and len(p) == 2 else p for p in params]
        seen: set[int] = set()
        for j, p in enumerate(params):
            if id(p) in seen:
                raise GroupError(f"{owner}: param_groups[{index}]['params'][{j}] (shape "
                                 f"{tuple(p.shape)}) appears twice in the group")
            seen.add(id(p))
        for gi, g in enumerate(self.param_groups):
            for j, p in enumerate(params):
                if any(q is p for q in g["params"]):
                    raise GroupError(
                        f"{owner}: param_groups[{index}]['params'][{j}] (shape "
                        f"{tuple(p.shape)}) is already in param_groups[{gi}]; a parameter "
                        f"must belong to exactly one group")

    # -- non-finite gradients ---------------------------------------------
    def _raise_on_nonfinite(self) -> None:
        """For groups with ``nonfinite="raise"``: raise :class:`NonFiniteGradientError`
        naming the group and parameter index of the first gradient with NaN/Inf.

        Called at the start of ``step()``, before anything is modified; one host
        synchronisation per such group (only that policy pays it).
        """
        for gi, group in enumerate(self.param_groups):
            if group.get("nonfinite") != "raise":
                continue
            pairs = [(j, p) for j, p in enumerate(group["params"]) if p.grad is not None]
            if not pairs:
                continue
            flags = finite_flags([p.grad for _, p in pairs])  # type: ignore[misc]
            devices = {f.device for f in flags}
            if all(bool(torch.stack([f for f in flags if f.device == d]).all()) for d in devices):
                continue
            j, p = next(jp for jp, f in zip(pairs, flags) if not bool(f))
            names = group.get("param_names")
            name = f" ({names[j]!r})" if isinstance(names, (list, tuple)) and j < len(names) else ""
            raise NonFiniteGradientError(
                f"{type(self).__name__}: param_groups[{gi}]['params'][{j}]{name} of shape "
                f"{tuple(p.shape)}: gradient contains NaN or Inf (nonfinite='raise'); nothing "
                f"was updated. Use nonfinite='skip' to skip such parameters instead.")

    # -- loading ------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as torch does, after checking and converting the checkpoint.

        Order: the user's load pre-hooks (they may convert a foreign format), then
        :func:`matrixopt.optim.checkpoint.conform_state_dict` (rejects state the
        optimizer would not use, naming the parameter and key; converts Python
        number counters; translates a ``torch.optim.Muon`` checkpoint's keys; runs
        the group checks of construction on the loaded hyperparameters), torch's
        loading, :func:`load_state_keeping_dtypes` (saved dtypes, CPU counters),
        then the post-hooks.
        """
        from .checkpoint import conform_state_dict

        sd = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, sd)
            if result is not None:
                sd = result
        sd = conform_state_dict(self, sd)
        pre, post = (self._optimizer_load_state_dict_pre_hooks,
                     self._optimizer_load_state_dict_post_hooks)
        # torch's load runs the hooks itself: run them here, around the checks, once
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        try:
            load_state_keeping_dtypes(self, sd, super().load_state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks = pre
            self._optimizer_load_state_dict_post_hooks = post
        for post_hook in post.values():
            post_hook(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # A group lacking one of this optimizer's keys (a pickle of an older
        # matrixopt) gets the default; keys torch adds to ``defaults``
        # (``differentiable``) are not group keys and stay out, so a state dict is
        # the same after a round trip.
        own = self._own_keys()
        for group in self.param_groups:
            for k, v in self.defaults.items():
                if k in own:
                    group.setdefault(k, v)


def load_state_keeping_dtypes(opt: torch.optim.Optimizer, state_dict: dict[str, Any],
                              load: Callable[[dict[str, Any]], None]) -> None:
    """Run torch's ``load_state_dict`` (``load``), then put back the saved state tensors.

    torch casts every floating state tensor to its parameter's dtype on load,
    which would silently turn float32 statistics of a bf16 parameter into bf16
    (losing precision) and a bf16 momentum of a float32 parameter into float32
    (doubling its memory). Here each tensor keeps the dtype it was saved with
    and only moves to its parameter's device.

    The scalar counters of :data:`CPU_COUNTERS` (``step``, GaLore's
    ``iteration``, ``refresh_step``, ``refresh_offset``, ``seed``) are put on
    the **CPU** with their saved dtype, as copies: torch would move the int64
    ones to the parameter's device (a host synchronisation at every later read)
    and shares ``step`` with the loaded dict (two optimizers loaded from one
    dict would advance one counter twice).
    """
    load(state_dict)
    ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    params = [p for g in opt.param_groups for p in g["params"]]
    saved = state_dict["state"]
    for pid, p in zip(ids, params):
        if pid not in saved or p not in opt.state:
            continue
        st = opt.state[p]
        for k, v in saved[pid].items():
            if not isinstance(v, Tensor) or not isinstance(st.get(k), Tensor):
                continue
            if k in CPU_COUNTERS and v.numel() == 1:
                st[k] = v.detach().to(device="cpu", copy=True)
            elif st[k].dtype != v.dtype:
                st[k] = v.to(device=p.device, copy=True)


def _full(x: Tensor) -> Tensor:
    """A DTensor reduction as a plain tensor (a collective over its mesh), else ``x``."""
    return x.full_tensor() if isinstance(x, Tensor) and _is_dtensor(x) else x


def finite_flags(grads: Sequence[Tensor]) -> list[Tensor]:
    r"""Per gradient, a 0-dim bool tensor on its device: ``True`` iff it is finite.

    Computed as :math:`\operatorname{isfinite}(\sum_i g_i)` (one vectorised
    reduction, no host synchronisation): NaN and ±Inf entries propagate into the
    sum. A finite gradient whose sum overflows (:math:`|\sum g| \gtrsim 3.4\cdot
    10^{38}`, accumulated in float32 for float32/bf16/fp16) also counts as
    non-finite -- such a gradient would overflow Adam's second moment anyway.
    """
    return _flags([_full(g.sum()) for g in grads])


def _flags(sums: list[Tensor]) -> list[Tensor]:
    """:func:`finite_flags` from the gradients' sums."""
    flags: list[Tensor] = [torch.empty(0)] * len(sums)
    by_device: dict[torch.device, list[int]] = {}
    for i, x in enumerate(sums):
        by_device.setdefault(x.device, []).append(i)
    for idx in by_device.values():  # one isfinite per device, views per gradient
        ok = torch.isfinite(torch.stack([sums[i] for i in idx]))
        for i, f in zip(idx, ok.unbind()):
            flags[i] = f
    return flags


class SkipNonFinite:
    r"""The ``nonfinite="skip"`` policy for one group's step, as a masked update.

    Usage inside a step, after the state of ``params`` has been created and
    before any of it is modified::

        guard = SkipNonFinite(group, params, grads, self.state)
        grads = guard.grads            # non-finite gradients replaced by zeros
        ...                            # the unchanged update math
        guard.finish()

    For each parameter a 0-dim finite flag :math:`f` is computed on the device
    (:func:`finite_flags`); the math runs on :math:`f\,?\,g : 0` so nothing
    NaN enters batched work shared with other parameters (Muon's same-shape
    orthogonalisation, GaLore's batched refresh); then every tensor it may
    have changed -- the parameter and each state tensor, including ones the
    step replaced (a refreshed GaLore basis) -- is set to
    ``torch.where(f, new, old)`` from a copy taken here. So a skipped
    parameter and its state (moments, momentum, step counters, the GaLore
    refresh schedule) are bit-identical to before the step, and the state
    counter ``nonfinite_count`` (int64, on the parameter's device) is
    incremented. No host synchronisation: everything is a tensor op.

    Limits: state tensors that live on another device than the parameter (the
    CPU step counters, as torch keeps them, of a parameter on an accelerator)
    cannot be masked without a synchronisation and advance as usual; state
    keys the step creates (a first GaLore basis) are kept. With ``"raise"`` or
    ``"ignore"`` this is a no-op (``grads`` passed through).

    Cost: one reduction and one ``where`` per gradient, a copy of the
    parameters and their state, and one ``where`` per tensor to restore --
    per-tensor ops, so on small models the launch overhead dominates. On the
    CPU, where reading the flags costs no synchronisation, an all-finite step
    skips all of it (only the reductions remain); a step with a non-finite
    gradient takes the masked path.
    """

    #: On the CPU, skip the copies and masks when every flag is True (reading a
    #: CPU tensor is not a synchronisation). Tests switch it off to run the
    #: masked path that accelerators always take.
    cpu_shortcut: bool = True

    def __init__(self, group: dict[str, Any], params: Sequence[Tensor], grads: Sequence[Tensor],
                 state: Any) -> None:
        self.active = group.get("nonfinite", "ignore") == "skip" and len(params) > 0
        self.grads: list[Tensor] = list(grads)
        if not self.active:
            return
        # FSDP2: the flag is the whole matrix's (a sum all-reduced over the
        # shards, so every rank decides alike); the masking runs on local shards
        self.params = [local_tensor(p) for p in params]
        self.states = [state[p] for p in params]
        sums = [_full(g.sum()) for g in self.grads]
        if (self.cpu_shortcut and not torch.compiler.is_compiling()
                and all(x.device.type == "cpu" for x in sums)
                and all(map(math.isfinite, torch.stack(sums).tolist()))):
            # reading CPU values is no synchronisation: an all-finite step on the
            # CPU needs no copy and no masking (bit-identical to the masked path)
            self.saved: Sequence[Tensor] = []
            self.masked = False
            return
        self.masked = True
        self.flags = _flags(sums)
        self.grads = [torch.where(f, local_tensor(g), 0) for f, g in zip(self.flags, self.grads)]
        # one foreach copy (x * 1 is exact) of the parameters and their state
        # (state on another device than the flag -- CPU step counters of an
        # accelerator parameter -- cannot be masked without a sync: not copied)
        self.keys = [[k for k, v in st.items() if isinstance(v, Tensor) and k != NONFINITE_COUNT
                      and self._maskable(k, v, f)] for st, f in zip(self.states, self.flags)]
        flat = [t for p, st, ks in zip(self.params, self.states, self.keys)
                for t in (p, *(local_tensor(st[k]) for k in ks))]
        self.saved = torch._foreach_mul(flat, 1) if flat else []

    @staticmethod
    def _maskable(key: str, value: Tensor, flag: Tensor) -> bool:
        """Whether state ``key`` is restored on a skip: tensors on the flag's device. CPU
        counters of an accelerator parameter are not (that would be a synchronisation);
        tests replace this to run the accelerator's rule on the CPU."""
        return value.device == flag.device

    def finish(self) -> None:
        """Restore skipped parameters and their state; count the skips."""
        if not self.active:
            return
        if not self.masked:
            for p, st in zip(self.params, self.states):
                if NONFINITE_COUNT not in st:
                    st[NONFINITE_COUNT] = torch.zeros((), dtype=torch.int64, device=p.device)
            return
        saved = iter(self.saved)
        counts: list[Tensor] = []
        for p, st, f, ks in zip(self.params, self.states, self.flags, self.keys):
            torch.where(f, p, next(saved), out=p)
            for k in ks:
                old, new = next(saved), st.get(k)
                new = local_tensor(new) if isinstance(new, Tensor) else new
                if (isinstance(new, Tensor) and new.device == old.device
                        and new.shape == old.shape and new.dtype == old.dtype):
                    torch.where(f, new, old, out=new)
            count = st.get(NONFINITE_COUNT)
            if count is None:
                count = st[NONFINITE_COUNT] = torch.zeros((), dtype=torch.int64, device=p.device)
            counts.append(count)
        torch._foreach_add_(counts, [f.logical_not() for f in self.flags] if len(
            {f.device for f in self.flags}) > 1
            else list(torch.stack(self.flags).logical_not().unbind()))
        self.saved = []


def check_grad(p: Tensor, owner: str, group_index: int) -> Tensor:
    """Return ``p.grad`` after rejecting gradients the optimizers cannot use."""
    g = p.grad
    assert g is not None
    if g.is_sparse:
        raise RuntimeError(f"{owner}: param_groups[{group_index}]: sparse gradients are not "
                           f"supported (parameter of shape {tuple(p.shape)})")
    if g.is_complex():
        raise RuntimeError(f"{owner}: param_groups[{group_index}]: complex gradients are not "
                           f"supported (parameter of shape {tuple(p.shape)})")
    return g


def matrix_shape(shape: Sequence[int], view: str) -> tuple[int, int, int]:
    """How an N-D parameter is seen as a batch of matrices: ``(batch, rows, cols)``.

    ``view="flatten"``: ``[out, in, *kernel]`` → one ``out × (in·prod(kernel))``
    matrix (convolutions; the update scale must come from this flattened shape).
    ``view="batch"``: ``[*batch, rows, cols]`` → ``prod(batch)`` matrices (stacked
    MoE experts). A 2-D shape is one matrix either way.
    """
    if len(shape) < 2:
        raise ValueError(
            f"a matrix view needs a parameter with >= 2 dims, got shape {tuple(shape)}")
    if len(shape) == 2:
        return 1, int(shape[0]), int(shape[1])
    if view == "flatten":
        return 1, int(shape[0]), int(math.prod(shape[1:]))
    if view == "batch":
        return int(math.prod(shape[:-2])), int(shape[-2]), int(shape[-1])
    raise ValueError(f"matrix view must be 'flatten' or 'batch', got {view!r}")


def closure_loss(closure: Callable[[], Any] | None) -> Any:
    """Evaluate ``closure`` with grad enabled (torch.optim's convention)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()
