"""Route a model's parameters to Muon / GaLore or AdamW by what each parameter is.

Muon and GaLore are for hidden-layer matrices. Embeddings, the output head
(tied or not), normalisation layers, biases and scalars belong to AdamW
(Jordan et al. 2024; Liu et al. 2025; Zhao et al. 2024 project only the
attention and MLP matrices). :func:`muon_param_groups` and
:func:`galore_param_groups` build the parameter groups and explain every
decision in a report; both use the same classification (:func:`classify_parameters`).

The output head is found by what it is, not by its name or size:

1. ``head=`` (module names, glob patterns or a predicate) when given;
2. otherwise every module whose weight *is* an embedding's weight (tied head:
   the same ``Parameter``, or the same storage and shape);
3. with ``example_inputs=``, the module that produces the model's output in
   one traced forward: forward hooks record which module returned which
   autograd node, and a walk back from the output (``logits`` of a Hugging
   Face output, else the first tensor) through parameter-free operations
   (activations, dropout, reshapes, softcapping) stops at the first module
   with a weight matrix (the head) or with only vectors (a final norm: then
   the model has no head);
4. without a trace and without a tied head: the last Linear-like module in
   module order (a module with a 2-D ``weight`` of its own that is not an
   embedding, convolution or norm), which is the head of ``nn.Sequential``
   models, torchvision/timm classifiers and Hugging Face ``*For*`` models.

A warning says when no parameter reaches the matrix optimizer, and when the
detection found more than one head.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from ._common import external_stacklevel
from ._heads import (
    _CONV_TYPES,
    _EMBED_TYPES,
    _NORM_TYPES,
    Selector,
    _find_heads,
    _is_named_norm,
    _matcher,
)

__all__ = ["muon_param_groups", "galore_param_groups", "classify_parameters", "ParamGroups",
           "Route", "Classified"]

#: Split of one matrix into equal blocks: ``k`` (rows) or ``(k, "rows" | "cols")``.
SplitSpec = int | tuple[int, str]


@dataclass(frozen=True)
class Route:
    """Where one parameter went, and why."""

    name: str
    shape: tuple[int, ...]
    group: str
    reason: str


class ParamGroups(list):  # type: ignore[type-arg]
    """A list of parameter-group dicts (pass it to an optimizer) with a ``report``.

    ``routes`` holds one :class:`Route` per parameter; ``str(groups.report)`` or
    ``print(groups.report)`` shows them as a table. ``heads`` names the modules
    treated as output heads.
    """

    routes: list[Route]
    heads: list[str]

    def __init__(self, groups: Iterable[dict[str, Any]], routes: list[Route],
                 heads: Sequence[str] = ()) -> None:
        super().__init__(groups)
        self.routes = routes
        self.heads = list(heads)

    @property
    def report(self) -> str:
        name_w = max([len(r.name) for r in self.routes] + [9])
        group_w = max([len(r.group) for r in self.routes] + [14])
        lines = [f"{'parameter':<{name_w}}  {'shape':<18} {'group':<{group_w}} reason"]
        for r in self.routes:
            lines.append(f"{r.name:<{name_w}}  {str(list(r.shape)):<18} {r.group:<{group_w}} "
                         f"{r.reason}")
        counts: dict[str, tuple[int, int]] = {}
        for r in self.routes:
            c, n = counts.get(r.group, (0, 0))
            numel = 1
            for s in r.shape:
                numel *= s
            counts[r.group] = (c + 1, n + numel)
        lines.append("totals: " + ", ".join(f"{g}: {c} tensors / {n:,} values"
                                            for g, (c, n) in counts.items()))
        return "\n".join(lines)


@dataclass(frozen=True)
class Classified:
    """What one trainable parameter is (see :func:`classify_parameters`).

    ``kind`` is one of ``"adamw"`` (explicit ``adamw=``), ``"matrix_forced"``
    (explicit ``muon=``/``galore=``), ``"excluded"``, ``"embedding"``, ``"head"``,
    ``"norm"``, ``"vector"`` (bias, 0-D/1-D, or one dim > 1 such as ``[1, d]``),
    ``"table"`` (``[1, .., n, d]``: ViT's ``cls_token`` / ``position_embeddings``),
    ``"conv"``, ``"fused_qkv"``,
    ``"matrix"`` (2-D) or ``"stack"`` (≥ 3-D, a batch of matrices).
    """

    name: str
    param: nn.Parameter
    kind: str
    reason: str
    conv: bool = False                 # a convolution weight (flatten to out x in*k)
    split: tuple[int, str] | None = None


def _parse_split(spec: Any, where: str) -> tuple[int, str]:
    if isinstance(spec, bool):
        raise ValueError(f"{where}: split must be an int k or (k, 'rows'|'cols'), got {spec!r}")
    if isinstance(spec, int):
        spec = (spec, "rows")
    if (not isinstance(spec, (tuple, list)) or len(spec) != 2 or isinstance(spec[0], bool)
            or not isinstance(spec[0], int) or spec[0] < 1 or spec[1] not in ("rows", "cols")):
        raise ValueError(f"{where}: split must be an int k >= 1 or (k, 'rows'|'cols'), "
                         f"got {spec!r}")
    return int(spec[0]), str(spec[1])



_ADAMW_KINDS = ("adamw", "excluded", "embedding", "head", "norm", "vector", "table")

_HEAD_REASON = {
    "head=": "output head (head=)",
    "tied": "output head (tied with the embedding)",
    "traced": "output head (produces the traced output)",
    "last Linear": "output head (last Linear in module order)",
}


def classify_parameters(
    model: nn.Module,
    *,
    head: Selector | None = None,
    exclude: Selector | None = None,
    example_inputs: Any = None,
    adamw: Iterable[str | nn.Parameter] = (),
    matrix: Iterable[str | nn.Parameter] = (),
    split: Mapping[str, SplitSpec] | None = None,
    head_names: Sequence[str] = (),
    owner: str = "classify_parameters",
) -> tuple[list[Classified], list[str]]:
    """Classify every trainable parameter of ``model`` once (shared parameters once).

    Rules, first match wins: explicit ``adamw`` / ``matrix`` entries
    (parameter names or objects); ``exclude`` (modules by name/pattern/predicate,
    or parameter names) → ``"excluded"``; embedding weights → ``"embedding"``;
    ≥ 2-D weights of the output head(s) (see the module docstring) → ``"head"``;
    normalisation-layer parameters → ``"norm"``; other 0-D/1-D, or with a
    single dim > 1 → ``"vector"``; ≥ 3-D with all leading dims 1 (learned
    tokens, position tables ``[1, n, d]``) → ``"table"``; convolution weights →
    ``"conv"``; ``nn.MultiheadAttention.in_proj_weight`` → ``"fused_qkv"``; other
    2-D → ``"matrix"``, ≥ 3-D → ``"stack"``. A ``split`` pattern marks the
    ≥ 2-D weights of the modules it matches.

    Returns:
        ``(classified, heads)``: one :class:`Classified` per parameter in
        ``named_parameters()`` order, and the head module names.
    """
    force_adamw: set[str | int] = {it if isinstance(it, str) else id(it) for it in adamw}
    force_matrix: set[str | int] = {it if isinstance(it, str) else id(it) for it in matrix}

    embed_ids: set[int] = set()
    embed_ptrs: set[tuple[int, tuple[int, ...]]] = set()
    norm_params: set[int] = set()
    conv_weights: set[int] = set()
    fused_qkv: set[int] = set()
    for _mname, mod in model.named_modules():
        if isinstance(mod, _EMBED_TYPES):
            embed_ids.add(id(mod.weight))
            embed_ptrs.add((mod.weight.data_ptr(), tuple(mod.weight.shape)))
        elif isinstance(mod, _NORM_TYPES) or _is_named_norm(mod):
            norm_params.update(id(p) for p in mod.parameters(recurse=False))
        elif isinstance(mod, _CONV_TYPES):
            conv_weights.add(id(mod.weight))
        elif isinstance(mod, nn.MultiheadAttention) and mod.in_proj_weight is not None:
            fused_qkv.add(id(mod.in_proj_weight))

    heads = _find_heads(model, head, head_names, example_inputs, embed_ids, embed_ptrs, owner)
    modules = dict(model.named_modules())
    head_weights = {id(p) for n in heads.names for p in modules[n].parameters() if p.ndim >= 2}

    exclude_match, exclude_pats = _matcher(exclude, "exclude")
    excluded: dict[int, str] = {}
    for mname, mod in model.named_modules():
        if mname and exclude_match(mname, mod):
            for p in mod.parameters():
                excluded.setdefault(id(p), mname)
    for pname, p in model.named_parameters():
        if any(fnmatch.fnmatchcase(pname, pat) for pat in exclude_pats):
            excluded.setdefault(id(p), pname)
    unmatched = [pat for pat in exclude_pats
                 if not any(fnmatch.fnmatchcase(n, pat) for n, _ in model.named_modules())
                 and not any(fnmatch.fnmatchcase(n, pat) for n, _ in model.named_parameters())]
    if unmatched:
        raise ValueError(f"{owner}: exclude pattern(s) {unmatched} match no module or parameter")

    splits: dict[int, tuple[int, str]] = {}
    for pat, spec in (split or {}).items():
        parsed = _parse_split(spec, f"{owner}: split[{pat!r}]")
        hits = [(n, m) for n, m in model.named_modules() if n and fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise ValueError(f"{owner}: split pattern {pat!r} matches no module")
        for n, m in hits:
            for pn, p in m.named_parameters(recurse=False):
                if p.ndim < 2:
                    continue
                rows = p.shape[0]
                cols = p[0].numel() if id(p) in conv_weights or p.ndim == 2 else p.shape[-1]
                if p.ndim >= 3 and id(p) not in conv_weights:
                    rows = p.shape[-2]
                k, along = parsed
                size = rows if along == "rows" else cols
                if size % k:
                    raise ValueError(f"{owner}: split[{pat!r}]={spec!r}: {k} does not divide the "
                                     f"{size} {along} of {n}.{pn} (shape {tuple(p.shape)})")
                splits[id(p)] = parsed

    out: list[Classified] = []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        pid = id(p)
        conv = pid in conv_weights

        def c(kind: str, reason: str, name: str = name, p: nn.Parameter = p,
              conv: bool = conv) -> Classified:
            return Classified(name, p, kind, reason, conv, splits.get(id(p)))

        if name in force_adamw or pid in force_adamw:
            out.append(c("adamw", "explicit adamw"))
        elif name in force_matrix or pid in force_matrix:
            if p.ndim < 2:
                raise ValueError(f"{owner}: {name!r} of shape {tuple(p.shape)} was forced onto "
                                 f"the matrix optimizer; it needs >= 2 dims")
            out.append(c("matrix_forced", "explicit"))
        elif pid in excluded:
            out.append(c("excluded", f"excluded ({excluded[pid]})"))
        elif pid in embed_ids:
            out.append(c("embedding", "embedding" + (" (tied with head)" if pid in head_weights
                                                     else "")))
        elif pid in head_weights:
            out.append(c("head", _HEAD_REASON[heads.how]))
        elif pid in norm_params:
            out.append(c("norm", "normalisation layer"))
        elif p.ndim < 2:
            out.append(c("vector", "bias" if name.endswith("bias") else f"{p.ndim}-D parameter"))
        elif sum(s > 1 for s in p.shape) <= 1:
            out.append(c("vector", "a vector in a matrix's shape (one dim > 1)"))
        elif not conv and p.ndim >= 3 and all(s == 1 for s in p.shape[:-2]):
            out.append(c("table", "broadcast table [1, .., n, d] (position embedding / tokens)"))
        elif conv:
            out.append(c("conv", "convolution (flattened to out x in*k)"))
        elif pid in fused_qkv:
            out.append(c("fused_qkv", "fused QKV"))
        elif p.ndim == 2:
            out.append(c("matrix", "hidden matrix"))
        else:
            out.append(c("stack", f"{p.ndim}-D stack of matrices"))

    if heads.how in ("traced", "tied", "last Linear") and len(heads.names) > 1:
        warnings.warn(f"{owner}: found {len(heads.names)} output heads ({', '.join(heads.names)}, "
                      f"by {heads.how}); all go to AdamW. Pass head=[...] to name the head(s) "
                      f"explicitly", stacklevel=external_stacklevel())
    return out, heads.names


def _split_suffix(spec: tuple[int, str] | None) -> str:
    if spec is None:
        return ""
    return f"_split{spec[0]}" + ("_cols" if spec[1] == "cols" else "")


def _build(classified: list[Classified], heads: list[str], matrix_group: Callable[[Classified],
           tuple[str, dict[str, Any]] | None], no_decay_weight_decay: float | None,
           owner: str, optimizer: str) -> ParamGroups:
    """Group the classified parameters: ``matrix_group`` names the group (and its keys) of
    a parameter bound for the matrix optimizer, ``None`` sends it to AdamW."""
    buckets: dict[str, list[nn.Parameter]] = {}
    specs: dict[str, dict[str, Any]] = {}
    routes: list[Route] = []
    for it in classified:
        target = matrix_group(it)
        if target is not None:
            gname, spec = target
            reason = it.reason + (f", split in {it.split[0]} {it.split[1]}" if it.split else "")
        else:
            gname = "adamw" if it.param.ndim >= 2 else "adamw_no_decay"
            spec = {"algorithm": "adamw"} if optimizer == "muon" else {}
            reason = it.reason
            if gname == "adamw_no_decay" and no_decay_weight_decay is not None:
                spec = {**spec, "weight_decay": no_decay_weight_decay}
        specs.setdefault(gname, spec)
        buckets.setdefault(gname, []).append(it.param)
        routes.append(Route(it.name, tuple(it.param.shape), gname, reason))
    matrix_names = [g for g in buckets if not g.startswith("adamw")]
    order = sorted(buckets, key=lambda g: (g.startswith("adamw"), g != "adamw", g))
    groups = [{"name": g, "params": buckets[g], **specs[g]} for g in order]
    if not matrix_names and routes:
        warnings.warn(f"{owner}: no parameter reaches {optimizer} — all {len(routes)} go to "
                      f"AdamW (heads: {heads or 'none'}); {optimizer} then behaves as AdamW. "
                      f"Check .report and name the head with head=... or force matrices with "
                      f"{'muon' if optimizer == 'muon' else 'galore'}=[...]",
                      stacklevel=external_stacklevel())
    return ParamGroups(groups, routes, heads)


def muon_param_groups(
    model: nn.Module,
    *,
    head: Selector | None = None,
    exclude: Selector | None = None,
    example_inputs: Any = None,
    split: Mapping[str, SplitSpec] | None = None,
    adamw: Iterable[str | nn.Parameter] = (),
    muon: Iterable[str | nn.Parameter] = (),
    no_decay_weight_decay: float | None = 0.0,
    split_fused_qkv: bool = False,
    head_names: Sequence[str] = (),
    **muon_overrides: Any,
) -> ParamGroups:
    """Parameter groups that send hidden matrices to Muon and the rest to AdamW.

    Rules, first match wins (:func:`classify_parameters`):

    1. explicit ``adamw`` / ``muon`` entries (parameter names or objects);
    2. ``exclude`` modules (names, glob patterns or a predicate ``(name,
       module) -> bool``; patterns also match parameter names) → AdamW;
    3. embeddings (``nn.Embedding``/``EmbeddingBag``) → AdamW, a head tied to
       one is the same parameter;
    4. the output head → AdamW: ``head=`` if given, else a module tied to an
       embedding, else (``example_inputs=``) the module producing the traced
       output, else the last Linear-like module in module order (see the
       module docstring); warns when more than one head is found;
    5. normalisation layers, biases, 0-D and 1-D parameters → AdamW without
       weight decay (``no_decay_weight_decay``; ``None`` keeps the optimizer's);
       a parameter with a single dim > 1 (``[1, d]``) or a broadcast table
       ``[1, .., n, d]`` (ViT ``cls_token``, ``position_embeddings``) → AdamW;
    6. convolution weights → Muon with ``matrix_view="flatten"`` (the update scale
       then comes from ``[out, in·∏kernel]``);
    7. ``nn.MultiheadAttention.in_proj_weight`` (fused QKV) → Muon, split into 3
       row blocks if ``split_fused_qkv``;
    8. every other parameter with ≥ 2 dims → Muon (≥ 3-D ones with
       ``matrix_view="batch"``: batches of matrices, e.g. stacked MoE experts).

    ``split={"*.c_attn": (3, "cols"), "*.qkv": 3}`` orthogonalises the blocks of
    fused projections apart: ``k`` or ``(k, "rows")`` cuts the rows (a ``[3d, d]``
    Linear), ``(k, "cols")`` the columns (Hugging Face ``Conv1D`` ``[d, 3d]``).
    The update scale then comes from the block shape. Warns when no parameter
    reaches Muon.

    Args:
        model: the model whose ``named_parameters()`` are routed (parameters with
            ``requires_grad=False`` are left out; shared parameters appear once).
        head: module names / glob patterns / predicate naming the output head(s);
            overrides detection (an unmatched pattern raises ``ValueError``).
        exclude: modules (or parameter-name patterns) kept off Muon.
        example_inputs: inputs of one forward used to find the head: a tensor
            (``model(x)``), a tuple (``model(*args)``) or a dict
            (``model(**kwargs)``); runs in eval mode, modes restored.
        split: module-name pattern → split spec (see above).
        adamw, muon: overrides by parameter name or object.
        no_decay_weight_decay: weight decay of the norm/bias/scalar group.
        split_fused_qkv: split ``nn.MultiheadAttention.in_proj_weight`` in 3 rows.
        head_names: legacy: last name parts treated as heads (prefer ``head=``).
        **muon_overrides: extra keys for every Muon group (e.g. ``ns_steps=4``).

    Returns:
        :class:`ParamGroups`, a list of groups to pass to :class:`~matrixopt.optim.Muon`
        (each group has a ``"name"``) with ``.report`` explaining each decision.
    """
    owner = "muon_param_groups"
    classified, heads = classify_parameters(
        model, head=head, exclude=exclude, example_inputs=example_inputs, adamw=adamw,
        matrix=muon, split=split, head_names=head_names, owner=owner)

    def matrix_group(it: Classified) -> tuple[str, dict[str, Any]] | None:
        if it.kind in _ADAMW_KINDS:
            return None
        spec = it.split
        if it.kind == "fused_qkv" and split_fused_qkv and spec is None:
            return "muon_qkv", {"algorithm": "muon", "split": 3, **muon_overrides}
        # ≥ 3-D non-conv parameters are stacks of matrices: "batch", said explicitly
        # (Muon's "auto" warns on 3-D parameters, whose module it cannot know)
        keys: dict[str, Any] = {"algorithm": "muon", "matrix_view": "batch"}
        name = "muon"
        if it.conv:
            keys["matrix_view"], name = "flatten", "muon_flatten"
        if spec is not None:
            keys["split"] = spec[0] if spec[1] == "rows" else spec
            name += _split_suffix(spec)
        return name, {**keys, **muon_overrides}

    return _build(classified, heads, matrix_group, no_decay_weight_decay, owner, "muon")


def galore_param_groups(
    model: nn.Module,
    rank: int,
    *,
    head: Selector | None = None,
    exclude: Selector | None = None,
    example_inputs: Any = None,
    adamw: Iterable[str | nn.Parameter] = (),
    galore: Iterable[str | nn.Parameter] = (),
    no_decay_weight_decay: float | None = 0.0,
    **group_kwargs: Any,
) -> ParamGroups:
    """Parameter groups for :class:`~matrixopt.optim.GaLoreAdamW` / ``GaLoreAdafactor``.

    Hidden matrices (the same classification as :func:`muon_param_groups`:
    embeddings, the output head, norms, biases and scalars stay full-rank)
    get ``rank`` and ``**group_kwargs`` (e.g. ``update_proj_gap=200,
    scale=0.25``); convolutions are projected as ``[out, in·∏kernel]``
    (``matrix_view="flatten"``), ≥ 3-D stacks as batches. Groups without
    ``rank`` run the plain inner optimizer. Group names: ``galore``,
    ``galore_flatten``, ``adamw``, ``adamw_no_decay`` (non-empty ones; the
    AdamW ones are plain AdamW in ``GaLoreAdamW``, plain Adafactor in
    ``GaLoreAdafactor``).

    Args:
        model: the model to route.
        rank: the subspace rank of the projected matrices (clipped to
            ``min(m, n)`` per matrix, with a warning from the optimizer).
        head, exclude, example_inputs: as :func:`muon_param_groups`.
        adamw, galore: overrides by parameter name or object.
        no_decay_weight_decay: weight decay of the norm/bias/scalar group
            (``None`` keeps the optimizer's).
        **group_kwargs: extra keys for the projected groups.
    """
    owner = "galore_param_groups"
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{owner}: rank must be an int >= 1, got {rank!r}")
    classified, heads = classify_parameters(
        model, head=head, exclude=exclude, example_inputs=example_inputs, adamw=adamw,
        matrix=galore, owner=owner)

    def matrix_group(it: Classified) -> tuple[str, dict[str, Any]] | None:
        if it.kind in _ADAMW_KINDS:
            return None
        if it.conv:
            return "galore_flatten", {"rank": rank, "matrix_view": "flatten", **group_kwargs}
        return "galore", {"rank": rank, "matrix_view": "batch", **group_kwargs}

    return _build(classified, heads, matrix_group, no_decay_weight_decay, owner, "GaLore")
