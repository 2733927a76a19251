"""Peers' checkpoints: recognising them, their group keys, converters into matrixopt's.

* :func:`recognise_format` names the optimizer a state dict comes from;
  :func:`translate_group` gives a peer's group matrixopt's key names (both used by
  :func:`~matrixopt.optim.checkpoint.conform_state_dict` at load time);
* converters: :func:`merge_state_dicts` (the usual ``torch.optim.Muon`` +
  ``torch.optim.AdamW`` pair into one matrixopt ``Muon``),
  :func:`from_hf_adafactor`, :func:`from_torch_adafactor`.

Public through :mod:`matrixopt.optim.checkpoint` and :mod:`matrixopt.optim`.
Nothing here runs inside ``step()``; host reads are fine.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._common import _PASSTHROUGH_KEYS, MatrixOptimizer

__all__ = ["CheckpointError", "recognise_format", "translate_group", "merge_state_dicts",
           "from_hf_adafactor", "from_torch_adafactor"]


MIGRATION = "docs/migration.md"


class CheckpointError(ValueError):
    """A state dict the optimizer cannot use (subclass of ValueError)."""


# ---------------------------------------------------------------------------
# peers' formats
# ---------------------------------------------------------------------------
_TORCH_MUON_KEYS = frozenset({"ns_coefficients", "adjust_lr_fn"})
_KELLER_KEYS = frozenset({"params", "lr", "momentum", "weight_decay", "use_muon", "betas", "eps",
                          "param_names", "initial_lr"})

_ADVICE = {
    "torch.optim.AdamW": "a torch.optim.AdamW/Adam state dict: to move a torch Muon + AdamW "
                         "pair into one matrixopt Muon use matrixopt.optim.merge_state_dicts "
                         f"({MIGRATION}, 'From torch.optim.Muon')",
    "torch.optim.Adafactor": "a torch.optim.Adafactor state dict: convert it with "
                             "matrixopt.optim.from_torch_adafactor "
                             f"({MIGRATION}, 'From torch.optim.Adafactor')",
    "transformers.Adafactor": "a Hugging Face transformers Adafactor state dict: convert it with "
                              "matrixopt.optim.from_hf_adafactor "
                              f"({MIGRATION}, 'From Hugging Face transformers Adafactor')",
    "galore-torch": "a galore-torch state dict (it holds GaLoreProjector objects, no tensor "
                    "state to convert): start the matrixopt optimizer fresh, the parameters "
                    f"carry over ({MIGRATION}, 'From galore-torch')",
    "pytorch-optimizer": "a pytorch-optimizer state dict: see "
                         f"{MIGRATION}, 'From pytorch-optimizer's Muon'",
}


def recognise_format(state_dict: dict[str, Any]) -> str | None:
    """Name the optimizer a state dict comes from when it is recognisably a peer's:
    ``"torch.optim.Muon"``, ``"torch.optim.AdamW"`` (also Adam), ``"torch.optim.Adafactor"``,
    ``"transformers.Adafactor"``, ``"galore-torch"``, ``"KellerJordan/Muon"``,
    ``"pytorch-optimizer"``; ``None`` otherwise (matrixopt's own, or unknown)."""
    groups = state_dict.get("param_groups") or []
    gkeys: set[str] = set().union(*(set(g) for g in groups)) if groups else set()
    states = list((state_dict.get("state") or {}).values())
    skeys: set[str] = set().union(*(set(s) for s in states if isinstance(s, dict))) \
        if states else set()
    for st in states:
        if isinstance(st, dict) and any(type(v).__name__ == "GaLoreProjector"
                                        for v in st.values()):
            return "galore-torch"
    if gkeys & _TORCH_MUON_KEYS:
        return "torch.optim.Muon"
    if "use_muon" in gkeys:
        return "KellerJordan/Muon" if gkeys <= _KELLER_KEYS else "pytorch-optimizer"
    if "RMS" in skeys:
        return "transformers.Adafactor"
    if "beta2_decay" in gkeys or skeys & {"row_var", "col_var", "variance"}:
        return "torch.optim.Adafactor"
    if "amsgrad" in gkeys:
        return "torch.optim.AdamW"
    return None


def _keller_coefficients(coefficients: Any) -> Any:
    """torch's ``ns_coefficients`` as matrixopt's ``coefficients`` (its triple is ``"keller"``)."""
    from ..linalg.coefficients import get_preset

    triple = tuple(float(c) for c in coefficients)
    keller = get_preset("keller").coefficients[0]
    return "keller" if all(math.isclose(a, b) for a, b in zip(triple, keller)) else triple


def translate_group(kind: str, group: dict[str, Any]) -> dict[str, Any]:
    """A peer's parameter group with matrixopt's key names and meanings.

    ``torch.optim.Muon``: ``lr``, ``weight_decay``, ``momentum``, ``nesterov``,
    ``ns_steps`` keep their meaning; ``ns_coefficients`` → ``coefficients``
    (``"keller"`` for torch's default triple), ``adjust_lr_fn`` → ``adjust_lr``
    (``None`` → ``"original"``); ``eps`` (torch's Newton–Schulz normalisation ε,
    1e-7) is dropped: matrixopt's ``eps`` is the AdamW path's.
    ``torch.optim.AdamW``: ``lr``, ``betas``, ``eps``, ``weight_decay``; the
    implementation switches (``foreach``, ``fused``, ...) are dropped; AMSGrad,
    ``maximize`` and Adam's coupled (L2) weight decay have no counterpart and raise.
    ``KellerJordan/Muon``: ``use_muon`` → ``algorithm``; its fixed iteration and
    scale → ``coefficients="keller"``, ``ns_steps=5``, ``adjust_lr="original"``.
    """
    out = {k: v for k, v in group.items() if k in _PASSTHROUGH_KEYS}
    if kind == "torch.optim.Muon":
        for k in ("lr", "weight_decay", "momentum", "nesterov", "ns_steps"):
            if k in group:
                out[k] = group[k]
        if "ns_coefficients" in group:
            out["coefficients"] = _keller_coefficients(group["ns_coefficients"])
        if "adjust_lr_fn" in group:
            out["adjust_lr"] = group["adjust_lr_fn"] or "original"
        return out
    if kind == "torch.optim.AdamW":
        for k, bad in (("amsgrad", True), ("maximize", True)):
            if group.get(k, False) == bad:
                raise CheckpointError(f"a torch.optim.AdamW group with {k}=True has no matrixopt "
                                      f"counterpart")
        if not group.get("decoupled_weight_decay", True) and group.get("weight_decay", 0.0):
            raise CheckpointError("a torch.optim.Adam group with weight_decay != 0 (L2, coupled) "
                                  "has no matrixopt counterpart: matrixopt decays decoupled "
                                  "(AdamW)")
        for k in ("lr", "betas", "eps", "weight_decay"):
            if k in group:
                out[k] = tuple(group[k]) if k == "betas" else group[k]
        return out
    if kind == "KellerJordan/Muon":
        for k in ("lr", "weight_decay", "momentum", "betas", "eps"):
            if k in group:
                out[k] = tuple(group[k]) if k == "betas" else group[k]
        if group.get("use_muon"):
            out.update(algorithm="muon", coefficients="keller", ns_steps=5,
                       adjust_lr="original")
        else:
            out["algorithm"] = "adamw"
        return out
    raise CheckpointError(f"no translation for {kind} groups")


# ---------------------------------------------------------------------------
# converters
# ---------------------------------------------------------------------------
Source = Optimizer | tuple[dict[str, Any], Sequence[Tensor]]


def _source(src: Source) -> tuple[dict[str, Any], list[Tensor], list[int]]:
    """(state_dict, parameters in its order, group index of each parameter)."""
    if isinstance(src, Optimizer):
        sd = src.state_dict()
        params = [p for g in src.param_groups for p in g["params"]]
    else:
        sd, ps = src
        params = list(ps)
    gidx = [gi for gi, g in enumerate(sd["param_groups"]) for _ in g["params"]]
    if len(gidx) != len(params):
        raise CheckpointError(f"merge_state_dicts: a source state dict lists {len(gidx)} "
                              f"parameters but {len(params)} were given")
    return sd, params, gidx


def merge_state_dicts(optimizer: MatrixOptimizer, *sources: Source) -> dict[str, Any]:
    r"""One state dict for ``optimizer`` from the optimizers that trained its parameters.

    The usual pair: ``torch.optim.Muon`` over the hidden matrices and
    ``torch.optim.AdamW`` over the rest (embeddings, head, norms, biases), into
    one matrixopt :class:`~matrixopt.optim.Muon` over the same parameter objects,
    typically built on :func:`~matrixopt.optim.muon_param_groups`::

        tm, ta = torch.optim.Muon(hidden, lr=0.02), torch.optim.AdamW(rest, lr=3e-4)
        tm.load_state_dict(torch.load("muon.pt")); ta.load_state_dict(torch.load("adamw.pt"))
        opt = matrixopt.Muon(matrixopt.optim.muon_param_groups(model))
        opt.load_state_dict(matrixopt.optim.merge_state_dicts(opt, tm, ta))

    Each source is a live torch optimizer (its parameters are matched to
    ``optimizer``'s by identity) or a pair ``(state_dict, params)`` with
    ``params`` the parameter objects in the state dict's order. Also accepted:
    KellerJordan/Muon (``use_muon`` groups) and matrixopt optimizers.

    Per parameter, the state is copied (``momentum_buffer`` from torch's Muon;
    ``step``, ``exp_avg``, ``exp_avg_sq`` from AdamW); a parameter that no source
    holds starts fresh. Per group of ``optimizer``, a hyperparameter is taken
    from the sources when every source group feeding it agrees on it
    (translated as :func:`translate_group` says: torch Muon's ``adjust_lr_fn``,
    ``ns_coefficients``, ``ns_steps``, ``lr``, ... so the resumed run keeps the
    same update; torch Muon's ``eps`` is dropped), otherwise the group keeps
    its own. A parameter that torch's Muon orthogonalised but ``optimizer``
    routes to AdamW (or the reverse) raises :class:`CheckpointError` naming it.
    The result holds copies, never the sources' tensors.
    """
    from .muon import Muon

    ours = [(gi, p) for gi, g in enumerate(optimizer.param_groups) for p in g["params"]]
    index = {id(p): i for i, (_, p) in enumerate(ours)}
    taken: dict[int, tuple[dict[str, Any], dict[str, Any], str]] = {}
    for n, src in enumerate(sources):
        sd, params, gidx = _source(src)
        kind = recognise_format(sd) or "matrixopt"
        if kind not in ("torch.optim.Muon", "torch.optim.AdamW", "KellerJordan/Muon",
                        "matrixopt"):
            raise CheckpointError(f"merge_state_dicts: source {n} is {_ADVICE.get(kind, kind)}")
        groups = [translate_group(kind, g) if kind != "matrixopt"
                  else {k: v for k, v in g.items() if k != "differentiable"}
                  for g in sd["param_groups"]]
        ids = [pid for g in sd["param_groups"] for pid in g["params"]]
        for pid, p, gi in zip(ids, params, gidx):
            i = index.get(id(p))
            if i is None:
                raise CheckpointError(f"merge_state_dicts: source {n} holds a parameter of shape "
                                      f"{tuple(p.shape)} that the optimizer does not have")
            if i in taken:
                raise CheckpointError(f"merge_state_dicts: the parameter of shape "
                                      f"{tuple(p.shape)} is in two sources")
            st = {k: (v.detach().clone() if isinstance(v, Tensor) else v)
                  for k, v in sd["state"].get(pid, {}).items()}
            taken[i] = (groups[gi], st, kind)

    own = optimizer._own_keys()
    out_groups: list[dict[str, Any]] = []
    state: dict[int, dict[str, Any]] = {}
    pid = 0
    for gi, group in enumerate(optimizer.param_groups):
        merged = {k: v for k, v in group.items() if k != "params"}
        feeding = [taken[index[id(p)]][0] for p in group["params"] if index[id(p)] in taken]
        keys = set().union(*(set(g) for g in feeding)) if feeding else set()
        for k in sorted(keys & (own | {"initial_lr"})):
            values = [g[k] for g in feeding if k in g]
            if len(values) == len(feeding) and all(v == values[0] for v in values):
                merged[k] = values[0]
        ids = []
        for j, p in enumerate(group["params"]):
            i = index[id(p)]
            if i in taken:
                src_group, st, kind = taken[i]
                if isinstance(optimizer, Muon) and "algorithm" not in src_group:
                    want = "muon" if "momentum_buffer" in st or kind == "torch.optim.Muon" \
                        else "adamw"
                    got = Muon._algorithm_for(merged, p)
                    if st and want != got:
                        raise CheckpointError(
                            f"merge_state_dicts: param_groups[{gi}]['params'][{j}] (shape "
                            f"{tuple(p.shape)}) was trained by "
                            f"{'torch.optim.Muon' if want == 'muon' else 'AdamW'} but this Muon "
                            f"group routes it to {got!r}: set algorithm={want!r} for it")
                if st:
                    state[pid] = st
            ids.append(pid)
            pid += 1
        merged["params"] = ids
        out_groups.append(merged)
    return {"state": state, "param_groups": out_groups}


def _converted(optimizer: MatrixOptimizer, state: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    sd = optimizer.state_dict()
    sd["state"] = state
    return sd


def _adafactor_states(state_dict: dict[str, Any], optimizer: MatrixOptimizer, owner: str,
                      peer: str, factored_key: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(position, saved state) of each parameter of ``optimizer`` the peer's Adafactor
    ``state_dict`` holds state for. The peer factors the last two dims and matrixopt the
    two largest: a factored tensor (``factored_key`` in its state) whose last two dims
    are not its two largest raises."""
    from .adafactor import factored_dims

    params = [p for g in optimizer.param_groups for p in g["params"]]
    ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
    for n, (pid, p) in enumerate(zip(ids, params)):
        st = state_dict["state"].get(pid)
        if not st:
            continue
        if factored_key in st and factored_dims(p.shape) != (p.ndim - 2, p.ndim - 1):
            raise CheckpointError(
                f"{owner}: parameter {n} of shape {tuple(p.shape)}: {peer} factors its last "
                f"two dims, matrixopt its two largest; no conversion")
        yield n, st


def from_hf_adafactor(state_dict: dict[str, Any], optimizer: MatrixOptimizer) -> dict[str, Any]:
    """A Hugging Face ``transformers`` Adafactor state dict as one for ``optimizer``
    (a matrixopt :class:`~matrixopt.optim.Adafactor` over the same parameters, same order).

    Hugging Face keeps ``step`` as an int, an ``RMS`` entry (recomputed every step,
    dropped here), and its factored statistics without the reduced dim
    (``exp_avg_sq_row`` ``[..., m]``, ``exp_avg_sq_col`` ``[..., n]``): they get it
    back (``[..., m, 1]``, ``[..., 1, n]``). Hugging Face factors the last two
    dims and matrixopt the two largest: a tensor of more than 2 dims whose last two
    are not its two largest raises. The groups are ``optimizer``'s own.
    """
    state: dict[Any, dict[str, Any]] = {}
    for n, st in _adafactor_states(state_dict, optimizer, "from_hf_adafactor", "Hugging Face",
                                   "exp_avg_sq_row"):
        new: dict[str, Any] = {"step": torch.tensor(float(st["step"]), dtype=torch.float32)}
        if "exp_avg_sq_row" in st:
            new["exp_avg_sq_row"] = st["exp_avg_sq_row"].unsqueeze(-1).clone()
            new["exp_avg_sq_col"] = st["exp_avg_sq_col"].unsqueeze(-2).clone()
        else:
            new["exp_avg_sq"] = st["exp_avg_sq"].clone()
        if "exp_avg" in st:
            new["exp_avg"] = st["exp_avg"].clone()
        state[n] = new  # torch's state_dict numbers parameters by position
    return _converted(optimizer, state)


def from_torch_adafactor(state_dict: dict[str, Any], optimizer: MatrixOptimizer
                         ) -> dict[str, Any]:
    """A ``torch.optim.Adafactor`` state dict as one for ``optimizer`` (a matrixopt
    :class:`~matrixopt.optim.Adafactor` over the same parameters, same order).

    Keys are renamed (``row_var`` → ``exp_avg_sq_row``, ``col_var`` →
    ``exp_avg_sq_col``, ``variance`` → ``exp_avg_sq``); the shapes agree when a
    tensor's last two dims are its two largest (torch factors the last two), else
    it raises. The groups are ``optimizer``'s own (torch's ``lr`` is matrixopt's
    relative-step cap, the same rule).
    """
    rename = {"row_var": "exp_avg_sq_row", "col_var": "exp_avg_sq_col", "variance": "exp_avg_sq"}
    state: dict[Any, dict[str, Any]] = {}
    for n, st in _adafactor_states(state_dict, optimizer, "from_torch_adafactor", "torch",
                                   "row_var"):
        state[n] = {rename.get(k, k): (v.clone() if isinstance(v, Tensor) else v)
                    for k, v in st.items()}
    return _converted(optimizer, state)
