"""Pieces shared by every matrixopt optimizer.

* :class:`MatrixOptimizer`: a :class:`torch.optim.Optimizer` base that validates
  every parameter group when it is added (at construction and in
  ``add_param_group``), rejects unknown group keys, and fills group keys that an
  older or foreign ``state_dict`` lacks (so ``torch.optim.Muon`` checkpoints
  load).
* validation helpers whose messages name the group index, the key and the value.
* gradient checks run at ``step()`` (sparse and complex gradients).
* the step skeleton: :meth:`MatrixOptimizer.step` and
  :meth:`MatrixOptimizer.step_parameters` select the parameters with a
  gradient and call the subclass's ``_step_group``; the per-group non-finite
  policy (``nonfinite`` = ``"skip"``, ``"raise"``, ``"ignore"``) is decided here
  (``"skip"``: :class:`~matrixopt.optim._nonfinite.StepFlags` folded into the
  math's writes, no snapshot, no host synchronisation).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._constraint import WEIGHT_CONSTRAINTS, apply_weight_constraint
from ._dist import Single, Strategy, resolve_strategy
from ._nonfinite import StepFlags

__all__ = [
    "MatrixOptimizer",
    "CPU_COUNTERS",
    "GroupError",
    "NonFiniteGradientError",
    "NONFINITE_POLICIES",
    "check_grad",
]

#: Values of the ``nonfinite`` group key (see :mod:`matrixopt.optim._nonfinite`).
NONFINITE_POLICIES = ("skip", "raise", "ignore")

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
    "refresh_offset": torch.int64, "seed": torch.int64, "natural_count": torch.int64,
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
    """A hyperparameter as a number (a tensor ``lr`` is read once per group and step,
    as torch's non-capturable optimizers do)."""
    return float(x.item()) if isinstance(x, Tensor) else float(x)  # type: ignore[arg-type]


def optional_float(x: object) -> float | None:
    """:func:`_as_float`, ``None`` kept."""
    return None if x is None else _as_float(x)


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

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any],
                 process_group: Any | None = None) -> None:
        self._process_group = process_group
        # every optimizer's weight-constraint option (:mod:`._constraint`), group keys
        defaults = {"weight_constraint": None, "max_sv": 1.0, **defaults}
        super().__init__(params, defaults)
        self._resolve_strategy()

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
        if "weight_constraint" in group:
            check.choice("weight_constraint", WEIGHT_CONSTRAINTS)
            check.number("max_sv", low=0.0, low_open=True)
        self._check_group(check)
        if "_strategy" in self.__dict__:  # after construction: re-check the parallelism
            previous = self._strategy
            try:
                self._resolve_strategy()
            except ValueError:  # GroupError included: leave the optimizer as it was
                self.param_groups.pop()
                self._strategy = previous
                raise

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

    # -- distribution -------------------------------------------------------
    _strategy: Strategy = Single()

    def _resolve_strategy(self) -> None:
        """The distribution strategy of all parameters (:mod:`._dist`), resolved at
        construction and whenever a group is added; then :meth:`_check_strategy`."""
        self._strategy = resolve_strategy(
            type(self).__name__, [p for g in self.param_groups for p in g["params"]],
            self.__dict__.get("_process_group"))
        for i, g in enumerate(self.param_groups):
            if self._strategy.sharded and g.get("weight_constraint") is not None:
                raise GroupError(f"{type(self).__name__}: param_groups[{i}]: weight_constraint="
                                 f"{g['weight_constraint']!r} needs whole matrices; it is not "
                                 f"supported with FSDP2 (DTensor) parameters")
        self._check_strategy()

    def _check_strategy(self) -> None:
        """Reject group settings the strategy cannot run (subclasses)."""

    # -- stepping -----------------------------------------------------------

    def _step_group(self, index: int, group: dict[str, Any], params: list[Tensor]) -> None:
        """Step ``params`` (members of ``group`` with a gradient, in group order).

        Subclasses built on the functional core implement this; ``step()`` and
        :meth:`step_parameters` call it."""
        raise TypeError(f"{type(self).__name__} does not implement _step_group")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimisation step (``closure`` re-evaluates the loss)."""
        loss = closure_loss(closure)
        self._step_selected(self._select(None))
        return loss

    @torch.no_grad()
    def step_parameters(self, params: Iterable[Tensor]) -> None:
        """Step only ``params`` (those with a gradient), exactly as :meth:`step` would
        step them, in O(len(params)) Python work: what
        :class:`~matrixopt.optim.LayerwiseStepper` calls inside the backward pass.

        Optimizer hooks (``register_step_pre_hook``) do not run: this is not a step.
        """
        self._step_selected(self._select(list(params)))
        # what torch's step() wrapper records: lr schedulers check it
        self._opt_called = True  # type: ignore[attr-defined]

    def _positions(self) -> dict[int, tuple[int, int]]:
        """``id(p) -> (group index, position in the group)``, rebuilt when groups change."""
        key = tuple(len(g["params"]) for g in self.param_groups)
        cache = self.__dict__.get("_position_cache")
        if cache is None or cache[0] != key:
            pos = {id(p): (gi, j) for gi, g in enumerate(self.param_groups)
                   for j, p in enumerate(g["params"])}
            cache = self.__dict__["_position_cache"] = (key, pos)
        return cache[1]

    def _select(self, only: list[Tensor] | None
                ) -> list[tuple[int, dict[str, Any], list[Tensor]]]:
        """(group index, group, parameters with a gradient in group order) to step."""
        if only is None:
            picked = [(gi, g, [p for p in g["params"] if p.grad is not None])
                      for gi, g in enumerate(self.param_groups)]
            return [x for x in picked if x[2]]
        pos = self._positions()
        by_group: dict[int, list[tuple[int, Tensor]]] = {}
        for p in only:
            if id(p) not in pos:
                raise ValueError(f"{type(self).__name__}.step_parameters: a tensor of shape "
                                 f"{tuple(p.shape)} is not a parameter of this optimizer")
            if p.grad is not None:
                gi, j = pos[id(p)]
                by_group.setdefault(gi, []).append((j, p))
        return [(gi, self.param_groups[gi], [p for _, p in sorted(v, key=lambda x: x[0])])
                for gi, v in sorted(by_group.items())]

    def _step_selected(self, selected: list[tuple[int, dict[str, Any], list[Tensor]]]) -> None:
        for index, group, params in selected:
            if group.get("nonfinite") == "raise":
                self._raise_on_nonfinite(index, group, params)
        for index, group, params in selected:
            self._step_group(index, group, params)
            apply_weight_constraint(group, params)

    def _flags(self, group: dict[str, Any], grads: Sequence[Tensor]) -> StepFlags:
        """The group's skip flags for these (local) gradients (off unless
        ``nonfinite="skip"``); under FSDP2 one collective for the whole group."""
        if group.get("nonfinite", "ignore") != "skip":
            return StepFlags.off()
        return StepFlags.compute(grads, reduce=self._strategy.reduce)

    def _raise_on_nonfinite(self, index: int, group: dict[str, Any], params: list[Tensor]
                            ) -> None:
        """``nonfinite="raise"``: :class:`NonFiniteGradientError` naming the group and
        parameter of the first gradient with NaN/Inf, before anything is modified; one
        host synchronisation per device and group (only this policy pays it)."""
        strategy = self._strategy
        flags = StepFlags.compute([strategy.local(p.grad) for p in params],  # type: ignore[arg-type]
                                  reduce=strategy.reduce)
        assert flags.ok is not None
        ok = flags.ok
        if all(bool(torch.stack([f for f in ok if f.device == d]).all())
               for d in {f.device for f in ok}):
            return
        p = params[next(i for i, f in enumerate(ok) if not bool(f))]
        j = next(k for k, q in enumerate(group["params"]) if q is p)
        names = group.get("param_names")
        name = f" ({names[j]!r})" if isinstance(names, (list, tuple)) and j < len(names) else ""
        raise NonFiniteGradientError(
            f"{type(self).__name__}: param_groups[{index}]['params'][{j}]{name} of shape "
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
        if "_strategy" not in self.__dict__:
            # unpickled or deep-copied (load_state_dict keeps the strategy): a process
            # group is not pickled, the parameters say the rest
            self._process_group = None
            self._resolve_strategy()
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


def closure_loss(closure: Callable[[], Any] | None) -> Any:
    """Evaluate ``closure`` with grad enabled (torch.optim's convention)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def external_stacklevel() -> int:
    """``stacklevel`` for :func:`warnings.warn` that points at the first frame outside
    matrixopt and torch.optim (the user's line), however deep the call came from."""
    import os
    import sys

    pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    optim = os.path.dirname(os.path.abspath(torch.optim.__file__))
    frame = sys._getframe(1)
    level = 1
    while frame is not None:
        fname = os.path.abspath(frame.f_code.co_filename)
        if not (fname.startswith(pkg + os.sep) or fname.startswith(optim + os.sep)):
            return level
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return level
