"""Pieces shared by every matrixopt optimizer.

* :class:`MatrixOptimizer`: a :class:`torch.optim.Optimizer` base that validates
  every parameter group when it is added (at construction and in
  ``add_param_group``), rejects unknown group keys, and fills group keys that an
  older or foreign ``state_dict`` lacks (so ``torch.optim.Muon`` checkpoints
  load).
* validation helpers whose messages name the group index, the key and the value.
* gradient checks run at ``step()`` (sparse and complex gradients).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = [
    "MatrixOptimizer",
    "GroupError",
    "check_grad",
    "matrix_shape",
]

# Keys torch or common tooling may put into a parameter group besides the
# optimizer's own hyperparameters: "name"/"param_names" (torch >= 2.6 named
# groups), "initial_lr" (lr schedulers add it).
_PASSTHROUGH_KEYS = frozenset({"params", "name", "param_names", "initial_lr"})


class GroupError(ValueError):
    """Invalid hyperparameter in a parameter group (subclass of ValueError)."""


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

    # -- validation -------------------------------------------------------
    def _check_group(self, check: _GroupChecker) -> None:
        """Validate one group's hyperparameters; subclasses extend this."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"{type(self).__name__}: a parameter group must be a dict, "
                            f"got {type(param_group).__name__}")
        index = len(self.param_groups)
        unknown = sorted(set(param_group) - set(self.defaults) - _PASSTHROUGH_KEYS)
        if unknown:
            raise GroupError(
                f"{type(self).__name__}: param_groups[{index}]: unknown key(s) {unknown}; "
                f"valid keys are {sorted(self.defaults)}"
            )
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
        self._check_group(_GroupChecker(group, index, type(self).__name__))

    # -- loading ------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as torch does, but keep every state tensor's saved dtype
        (REFERENCE pitfall 6; see :func:`load_state_keeping_dtypes`)."""
        load_state_keeping_dtypes(self, state_dict, super().load_state_dict)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # A state_dict saved by an older matrixopt or by a peer (torch.optim.Muon)
        # carries only the keys it knew; fill the rest from this optimizer's
        # defaults instead of failing at the next step.
        for group in self.param_groups:
            for k, v in self.defaults.items():
                group.setdefault(k, v)


def load_state_keeping_dtypes(opt: torch.optim.Optimizer, state_dict: dict[str, Any],
                              load: Callable[[dict[str, Any]], None]) -> None:
    """Run torch's ``load_state_dict`` (``load``), then put back the saved state tensors.

    torch casts every floating state tensor to its parameter's dtype on load,
    which would silently turn float32 statistics of a bf16 parameter into bf16
    (losing precision) and a bf16 momentum of a float32 parameter into float32
    (doubling its memory). Here each tensor keeps the dtype it was saved with
    and only moves to its parameter's device; ``step`` stays where torch puts it.
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
            if k != "step" and isinstance(v, Tensor) and isinstance(st.get(k), Tensor) \
                    and st[k].dtype != v.dtype:
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


def matrix_shape(shape: Sequence[int], view: str) -> tuple[int, int, int]:
    """How an N-D parameter is seen as a batch of matrices: ``(batch, rows, cols)``.

    ``view="flatten"``: ``[out, in, *kernel]`` → one ``out × (in·prod(kernel))``
    matrix (convolutions; the update scale must come from this flattened shape).
    ``view="batch"``: ``[*batch, rows, cols]`` → ``prod(batch)`` matrices (stacked
    MoE experts). A 2-D shape is one matrix either way.
    """
    if len(shape) < 2:
        raise ValueError(f"a matrix view needs a parameter with >= 2 dims, got shape {tuple(shape)}")
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
