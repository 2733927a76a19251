"""Route a model's parameters to Muon or AdamW by module type and shape.

Muon is for hidden-layer matrices. Embeddings, the output head (tied or not),
normalisation layers, biases and scalars belong to AdamW (Jordan et al. 2024;
Liu et al. 2025). :func:`muon_param_groups` builds the parameter groups for
:class:`~matrixopt.optim.Muon` and explains every decision in a report.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["muon_param_groups", "ParamGroups", "Route"]

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
    nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
)
if hasattr(nn, "RMSNorm"):
    _NORM_TYPES = (*_NORM_TYPES, nn.RMSNorm)

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d,
               nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_EMBED_TYPES = (nn.Embedding, nn.EmbeddingBag)
DEFAULT_HEAD_NAMES = ("lm_head", "head", "output", "classifier", "fc_out", "out_proj_vocab")


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
    ``print(groups.report)`` shows them as a table.
    """

    routes: list[Route]

    def __init__(self, groups: Iterable[dict[str, Any]], routes: list[Route]) -> None:
        super().__init__(groups)
        self.routes = routes

    @property
    def report(self) -> str:
        name_w = max([len(r.name) for r in self.routes] + [9])
        lines = [f"{'parameter':<{name_w}}  {'shape':<18} {'group':<15} reason"]
        for r in self.routes:
            lines.append(f"{r.name:<{name_w}}  {str(list(r.shape)):<18} {r.group:<15} {r.reason}")
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


def muon_param_groups(
    model: nn.Module,
    *,
    head_names: Sequence[str] = DEFAULT_HEAD_NAMES,
    adamw: Iterable[str | nn.Parameter] = (),
    muon: Iterable[str | nn.Parameter] = (),
    no_decay_weight_decay: float | None = 0.0,
    split_fused_qkv: bool = False,
    **muon_overrides: Any,
) -> ParamGroups:
    """Parameter groups that send hidden matrices to Muon and the rest to AdamW.

    Rules, first match wins:

    1. explicit ``adamw`` / ``muon`` entries (parameter names or objects);
    2. embeddings (``nn.Embedding``/``EmbeddingBag``) → AdamW, and a Linear whose
       weight *is* an embedding's weight (tied head) is the same parameter;
    3. an output head → AdamW: a ``nn.Linear`` whose module name's last part is
       in ``head_names``, or whose ``out_features`` equals an embedding's
       ``num_embeddings`` (an untied vocabulary projection);
    4. normalisation layers, biases, 0-D and 1-D parameters → AdamW without
       weight decay (``no_decay_weight_decay``; ``None`` keeps the optimizer's);
    5. convolution weights → Muon with ``matrix_view="flatten"`` (the update scale
       then comes from ``[out, in·∏kernel]``);
    6. ``nn.MultiheadAttention.in_proj_weight`` (fused QKV) → Muon, split into 3
       blocks if ``split_fused_qkv``;
    7. every other parameter with ≥ 2 dims → Muon (3-D ones as batches of
       matrices, e.g. stacked MoE experts).

    Args:
        model: the model whose ``named_parameters()`` are routed (parameters with
            ``requires_grad=False`` are left out; shared parameters appear once).
        head_names: module names treated as output heads.
        adamw, muon: overrides by parameter name or object.
        no_decay_weight_decay: weight decay of the norm/bias/scalar group.
        split_fused_qkv: orthogonalise Q, K and V of a fused projection apart.
        **muon_overrides: extra keys for every Muon group (e.g. ``ns_steps=4``).

    Returns:
        :class:`ParamGroups`, a list of groups to pass to :class:`~matrixopt.optim.Muon`
        (each group has a ``"name"``) with ``.report`` explaining each decision.
    """
    force_adamw: set[str | int] = set()
    force_muon: set[str | int] = set()
    for target, items in ((force_adamw, adamw), (force_muon, muon)):
        for it in items:
            target.add(it if isinstance(it, str) else id(it))

    embed_weights: set[int] = set()
    vocab_sizes: set[int] = set()
    head_weights: set[int] = set()
    norm_params: set[int] = set()
    conv_weights: set[int] = set()
    fused_qkv: set[int] = set()
    for _mname, mod in model.named_modules():
        if isinstance(mod, _EMBED_TYPES):
            embed_weights.add(id(mod.weight))
            vocab_sizes.add(mod.num_embeddings)
        elif isinstance(mod, _NORM_TYPES):
            norm_params.update(id(p) for p in mod.parameters(recurse=False))
        elif isinstance(mod, _CONV_TYPES):
            conv_weights.add(id(mod.weight))
        elif isinstance(mod, nn.MultiheadAttention) and mod.in_proj_weight is not None:
            fused_qkv.add(id(mod.in_proj_weight))
    for mname, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            last = mname.rsplit(".", 1)[-1]
            if last in head_names or mod.out_features in vocab_sizes:
                head_weights.add(id(mod.weight))

    buckets: dict[str, list[torch.Tensor]] = {}
    routes: list[Route] = []

    def put(name: str, p: nn.Parameter, group: str, reason: str) -> None:
        buckets.setdefault(group, []).append(p)
        routes.append(Route(name, tuple(p.shape), group, reason))

    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        pid = id(p)
        if name in force_adamw or pid in force_adamw:
            put(name, p, "adamw" if p.ndim >= 2 else "adamw_no_decay", "explicit adamw")
        elif name in force_muon or pid in force_muon:
            if p.ndim < 2:
                raise ValueError(f"muon_param_groups: muon=[...] names {name!r} of shape "
                                 f"{tuple(p.shape)}; Muon needs >= 2 dims")
            put(name, p, "muon_flatten" if pid in conv_weights else "muon", "explicit muon")
        elif pid in embed_weights:
            put(name, p, "adamw",
                "embedding" + (" (tied with head)" if pid in head_weights else ""))
        elif pid in head_weights:
            put(name, p, "adamw", "output head")
        elif pid in norm_params:
            put(name, p, "adamw_no_decay", "normalisation layer")
        elif p.ndim < 2:
            put(name, p, "adamw_no_decay",
                "bias" if name.endswith("bias") else f"{p.ndim}-D parameter")
        elif pid in conv_weights:
            put(name, p, "muon_flatten", "convolution (flattened to out x in*k)")
        elif pid in fused_qkv:
            put(name, p, "muon_qkv" if split_fused_qkv else "muon",
                "fused QKV" + (", split in 3" if split_fused_qkv else ""))
        else:
            put(name, p, "muon",
                "hidden matrix" if p.ndim == 2 else f"{p.ndim}-D stack of matrices")

    groups: list[dict[str, Any]] = []
    specs: dict[str, dict[str, Any]] = {
        "muon": {"algorithm": "muon", **muon_overrides},
        "muon_flatten": {"algorithm": "muon", "matrix_view": "flatten", **muon_overrides},
        "muon_qkv": {"algorithm": "muon", "split": 3, **muon_overrides},
        "adamw": {"algorithm": "adamw"},
        "adamw_no_decay": {"algorithm": "adamw"},
    }
    if no_decay_weight_decay is not None:
        specs["adamw_no_decay"]["weight_decay"] = no_decay_weight_decay
    for gname, spec in specs.items():
        if buckets.get(gname):
            groups.append({"name": gname, "params": buckets[gname], **spec})
    return ParamGroups(groups, routes)
