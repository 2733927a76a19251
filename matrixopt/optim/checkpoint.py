"""Checkpoints: what a matrixopt ``state_dict`` may hold, peers' formats, converters.

* :func:`conform_state_dict` runs inside every matrixopt ``load_state_dict``
  (after the user's load pre-hooks, before torch's loading). It

  - converts Python-number counters (``step`` as an int or float: torch < 1.12,
    Hugging Face, KellerJordan/Muon; GaLore's int counters) into CPU tensors of
    the dtype matrixopt keeps them in, as torch's own optimizers do;
  - translates a ``torch.optim.Muon`` checkpoint's group keys into matrixopt
    ``Muon``'s (``ns_coefficients`` → ``coefficients``, ``adjust_lr_fn`` →
    ``adjust_lr``; its ``eps``, the Newton–Schulz normalisation ε, has no
    counterpart and is dropped instead of becoming the AdamW path's ε), and
    KellerJordan/Muon's ``use_muon`` flag into ``algorithm``;
  - fills group keys the checkpoint lacks from the optimizer's current groups
    (not only from the defaults: per-group settings survive);
  - rejects state the optimizer would never read: a value that is neither a
    tensor nor a convertible number, a key the parameter's update does not use
    (torch.optim.AdamW moments on a parameter Muon orthogonalises), a moment of
    the wrong shape, an unknown group key, a hyperparameter the optimizer's
    construction would reject (checked before anything is loaded). The message
    names the parameter
    (``param_groups[i]['params'][j]``, its shape) and the key, and when the
    checkpoint is recognisably a peer's (torch.optim.AdamW/Adafactor,
    galore-torch, Hugging Face Adafactor, pytorch-optimizer), points to the
    converter or section of ``docs/migration.md``.

* converters from peers' checkpoints: :func:`merge_state_dicts` (the usual
  ``torch.optim.Muon`` + ``torch.optim.AdamW`` pair into one matrixopt
  ``Muon``), :func:`from_hf_adafactor`, :func:`from_torch_adafactor`; they and
  the recognition of peers' formats live in :mod:`matrixopt.optim._peers`.

Nothing here runs inside ``step()``; host reads at load time are fine.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._common import (
    _PASSTHROUGH_KEYS,
    CPU_COUNTERS,
    GroupError,
    MatrixOptimizer,
    _GroupChecker,
)
from ._nonfinite import NONFINITE_COUNT
from ._peers import (
    _ADVICE,
    MIGRATION,
    CheckpointError,
    from_hf_adafactor,
    from_torch_adafactor,
    merge_state_dicts,
    recognise_format,
    translate_group,
)

__all__ = ["CheckpointError", "conform_state_dict", "merge_state_dicts", "from_hf_adafactor",
           "from_torch_adafactor", "recognise_format", "translate_group", "MIGRATION"]

_ABSMAX = "_absmax"


# ---------------------------------------------------------------------------
# what each optimizer reads
# ---------------------------------------------------------------------------
_ADAMW = frozenset({"step", "exp_avg", "exp_avg_sq"})
_MUON = frozenset({"momentum_buffer", "normuon_v"})
_ADAFACTOR = frozenset({"step", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq", "exp_avg"})
_GALORE = frozenset({"projector", "projector_right", "seed", "iteration", "refresh_step",
                     "refresh_offset", "residual_norm", "natural_window", "natural_count"})
# moments that may be stored as int8 codes + float32 ``<key>_absmax`` (see _state)
_SHAMPOO = frozenset({"step", "factor_L", "inv_root_L", "factor_R", "inv_root_R", "exp_avg",
                      "graft_sq", "root_fallbacks"})
_DION = frozenset({"momentum_buffer", "Q"})
# moments that may be stored as int8 codes + float32 ``<key>_absmax`` (see _state)
_QUANTISABLE = frozenset({"exp_avg", "exp_avg_sq", "momentum_buffer", "projector",
                          "projector_right", "graft_sq"})


def _soap_keys(p: Tensor) -> frozenset[str]:
    """SOAP's keys on a preconditioned parameter: the Adam moments in the eigenbasis, one
    factor and basis per preconditioned dim (at most ``p.ndim``; all quantisable), the
    refresh-fallback counter."""
    dims = [f"{k}_{i}" for i in range(max(p.ndim, 1)) for k in ("factor", "basis")]
    return frozenset({"step", "exp_avg", "exp_avg_sq", "refresh_fallbacks", *dims,
                      *(d + _ABSMAX for d in dims)})


def _with_absmax(keys: frozenset[str]) -> frozenset[str]:
    return keys | {k + _ABSMAX for k in keys & _QUANTISABLE} | {NONFINITE_COUNT}


def _path(opt: MatrixOptimizer, group: dict[str, Any], p: Tensor) -> str:
    """Which update reads the parameter's state: a name used in messages."""
    from .dion import Dion
    from .galore import GaLoreAdafactor, GaLoreAdamW
    from .muon import Muon
    from .shampoo import Shampoo
    from .soap import SOAP

    if isinstance(opt, Muon):
        return "Muon's orthogonalised update" if Muon._algorithm_for(group, p) == "muon" \
            else "Muon's AdamW path"
    if isinstance(opt, SOAP):
        return "SOAP's preconditioned update" if SOAP._algorithm_for(group, p) == "soap" \
            else "SOAP's AdamW path"
    if isinstance(opt, Shampoo):
        return "Shampoo's preconditioned update" \
            if Shampoo._algorithm_for(group, p) == "shampoo" else "Shampoo's AdamW path"
    if isinstance(opt, Dion):
        return "Dion's low-rank orthonormal update" if opt._is_dion(group, p) \
            else "Dion's AdamW path"
    if isinstance(opt, GaLoreAdamW):
        return "GaLoreAdamW"
    if isinstance(opt, GaLoreAdafactor):
        return "GaLoreAdafactor"
    return type(opt).__name__


def state_keys(opt: MatrixOptimizer, group: dict[str, Any], p: Tensor) -> frozenset[str] | None:
    """The state keys ``opt`` reads or writes for ``p`` in ``group`` (``None``: unknown
    optimizer, no check)."""
    from .adafactor import Adafactor
    from .dion import Dion
    from .galore import GaLoreAdafactor, GaLoreAdamW
    from .muon import Muon
    from .shampoo import Shampoo
    from .soap import SOAP

    if isinstance(opt, Muon):
        return _with_absmax(_MUON if Muon._algorithm_for(group, p) == "muon" else _ADAMW)
    if isinstance(opt, SOAP):
        return _with_absmax(_soap_keys(p) if SOAP._algorithm_for(group, p) == "soap"
                            else _ADAMW)
    if isinstance(opt, Shampoo):
        return _with_absmax(_SHAMPOO if Shampoo._algorithm_for(group, p) == "shampoo"
                            else _ADAMW)
    if isinstance(opt, Dion):
        return _with_absmax(_DION if opt._is_dion(group, p) else _ADAMW)
    if isinstance(opt, GaLoreAdamW):
        return _with_absmax(_ADAMW | _GALORE)
    if isinstance(opt, GaLoreAdafactor):
        return _with_absmax(_ADAFACTOR | _GALORE)
    if isinstance(opt, Adafactor):
        return _with_absmax(_ADAFACTOR)
    return None


def _expected_shapes(opt: MatrixOptimizer, group: dict[str, Any], p: Tensor
                     ) -> dict[str, tuple[int, ...]]:
    """Shapes the state of ``p`` must have (only where they follow from ``p`` alone)."""
    from .adafactor import Adafactor, factored_dims, second_moment_shapes
    from .dion import Dion
    from .muon import Muon
    from .shampoo import Shampoo
    from .soap import SOAP

    shape = tuple(p.shape)
    adam = {"exp_avg": shape, "exp_avg_sq": shape}
    if isinstance(opt, Muon):
        if Muon._algorithm_for(group, p) == "muon":
            return {"momentum_buffer": shape}
        return adam
    if isinstance(opt, SOAP):
        return adam  # factors/bases: square, sized by merge_dims/max_precond_dim
    if isinstance(opt, Shampoo):
        if Shampoo._algorithm_for(group, p) == "shampoo":
            return {"exp_avg": shape, "graft_sq": shape}  # factors: blocked, see block_layout
        return adam
    if isinstance(opt, Dion):
        return {"momentum_buffer": shape} if opt._is_dion(group, p) else adam
    if isinstance(opt, Adafactor):
        d = factored_dims(shape, int(group["min_dim_size_to_factor"]))
        return {"exp_avg": shape, **second_moment_shapes(shape, d)}
    return {}


# ---------------------------------------------------------------------------
# the check run by load_state_dict
# ---------------------------------------------------------------------------
def _as_counter(key: str, value: Any) -> Tensor | None:
    """A Python number counter as the CPU tensor matrixopt keeps (None if not a number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    dtype = CPU_COUNTERS[key]
    if dtype == torch.int64 and (isinstance(value, float) and not value.is_integer()):
        return None
    return torch.tensor(value if dtype.is_floating_point else int(value), dtype=dtype)


def conform_state_dict(opt: MatrixOptimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Check ``state_dict`` against ``opt`` and return the dict to give torch's loader
    (see the module docstring). The input is not modified."""
    owner = f"{type(opt).__name__}.load_state_dict"
    if not isinstance(state_dict, dict) or "state" not in state_dict \
            or "param_groups" not in state_dict:
        raise CheckpointError(f"{owner}: expected a dict with 'state' and 'param_groups', got "
                              f"{type(state_dict).__name__}"
                              + (f" with keys {sorted(state_dict)}"
                                 if isinstance(state_dict, dict) else ""))
    kind = recognise_format(state_dict)
    advice = f"; this looks like {_ADVICE[kind]}" if kind in _ADVICE else ""
    saved_groups = list(state_dict["param_groups"])
    if len(saved_groups) != len(opt.param_groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, opt.param_groups)):
        if advice:
            raise CheckpointError(f"{owner}: the parameter groups do not match this optimizer's"
                                  f"{advice}")
        return state_dict  # torch's loader raises its own (clear) error

    from .muon import Muon
    translatable = {"torch.optim.Muon": Muon, "KellerJordan/Muon": Muon,
                    "torch.optim.AdamW": MatrixOptimizer}
    own = opt._own_keys()
    groups: list[dict[str, Any]] = []
    for gi, (saved, current) in enumerate(zip(saved_groups, opt.param_groups)):
        saved = dict(saved)
        if kind in translatable and isinstance(opt, translatable[kind]):
            try:
                saved = translate_group(kind, saved)
            except CheckpointError as e:
                raise CheckpointError(f"{owner}: param_groups[{gi}]: {e}") from None
        # ``differentiable`` (False) was saved by matrixopt <= 0.x after a reload: not ours
        if saved.get("differentiable") is False:
            del saved["differentiable"]
        unknown = sorted(set(saved) - own - _PASSTHROUGH_KEYS)
        if unknown:
            raise CheckpointError(
                f"{owner}: param_groups[{gi}] has key(s) {unknown} that {type(opt).__name__} "
                f"does not use (its keys: {sorted(own)}){advice}")
        merged = {k: v for k, v in current.items() if k != "params"}
        merged.update(saved)
        # the checks of construction, before anything is loaded (they may normalise a
        # value, e.g. Adafactor's lr=None)
        trial = {**merged, "params": current["params"]}
        try:
            opt._check_group(_GroupChecker(trial, gi, type(opt).__name__))
        except GroupError as e:
            raise CheckpointError(f"{owner}: the checkpoint's hyperparameters: {e}{advice}"
                                  ) from None
        groups.append({k: v for k, v in trial.items() if k != "params"})

    params = [(gi, j, p) for gi, g in enumerate(opt.param_groups)
              for j, p in enumerate(g["params"])]
    ids = [pid for g in saved_groups for pid in g["params"]]
    where = dict(zip(ids, params))
    state: dict[Any, Any] = {}
    for pid, st in state_dict["state"].items():
        if pid not in where:
            state[pid] = st  # torch keeps state of unknown ids as is
            continue
        gi, j, p = where[pid]
        name = f"param_groups[{gi}]['params'][{j}] (shape {tuple(p.shape)})"
        if not isinstance(st, dict):
            raise CheckpointError(f"{owner}: the state of {name} is a {type(st).__name__}, "
                                  f"not a dict{advice}")
        allowed = state_keys(opt, groups[gi], p)
        shapes = _expected_shapes(opt, groups[gi], p)
        new: dict[str, Any] = {}
        for k, v in st.items():
            if allowed is not None and k not in allowed:
                raise CheckpointError(
                    f"{owner}: {name} has state key {k!r}, which {_path(opt, groups[gi], p)} "
                    f"does not use (it keeps {sorted(allowed - {NONFINITE_COUNT})}){advice}")
            if not isinstance(v, Tensor):
                converted = _as_counter(k, v) if k in CPU_COUNTERS else None
                if converted is None:
                    raise CheckpointError(
                        f"{owner}: {name}: state key {k!r} holds a {type(v).__name__}, not a "
                        f"tensor{advice}")
                v = converted
            elif k in shapes and k + _ABSMAX not in st and tuple(v.shape) != shapes[k]:
                raise CheckpointError(
                    f"{owner}: {name}: state key {k!r} has shape {tuple(v.shape)}, expected "
                    f"{shapes[k]}{advice}")
            new[k] = v
        state[pid] = new
    out = dict(state_dict)
    out["state"] = state
    out["param_groups"] = [{**g, "params": s["params"]} for g, s in zip(groups, saved_groups)]
    return out
