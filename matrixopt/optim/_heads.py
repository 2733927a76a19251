"""How :mod:`matrixopt.optim.routing` finds a model's output head, and what a module is.

The rules (``head=``; a module tied to an embedding; the module producing the
traced output; the last Linear-like module) are the routing module's docstring.
The trace runs one forward with hooks and walks the autograd graph back from the
output through parameter-free operations (:func:`_traced_heads`). Nothing here
runs inside an optimizer step.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._common import external_stacklevel

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
    nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
)
if hasattr(nn, "RMSNorm"):
    _NORM_TYPES = (*_NORM_TYPES, nn.RMSNorm)

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d,
               nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_EMBED_TYPES = (nn.Embedding, nn.EmbeddingBag)

#: Module selector: a name or glob pattern (``fnmatch``, ``*`` crosses dots), a
#: sequence of them, or a predicate ``(module_name, module) -> bool``.
Selector = str | Sequence[str] | Callable[[str, nn.Module], bool]


@dataclass
class _Heads:
    names: list[str] = field(default_factory=list)
    how: str = ""



def _matcher(sel: Selector | None, what: str) -> tuple[Callable[[str, nn.Module], bool], list[str]]:
    """A module predicate from a selector, and its patterns (to report unmatched ones)."""
    if sel is None:
        return (lambda _n, _m: False), []
    if callable(sel):
        return sel, []  # type: ignore[return-value]
    pats = [sel] if isinstance(sel, str) else list(sel)
    for p in pats:
        if not isinstance(p, str):
            raise TypeError(f"{what} must be module names/patterns (str) or a predicate "
                            f"(name, module) -> bool, got an element {p!r}")
    return (lambda n, _m: any(fnmatch.fnmatchcase(n, p) for p in pats)), pats


def _is_linear_like(mod: nn.Module) -> bool:
    """A module with a 2-D ``weight`` of its own that is not an embedding, conv or norm
    (``nn.Linear``, Hugging Face ``Conv1D``, custom linears)."""
    if isinstance(mod, (*_EMBED_TYPES, *_CONV_TYPES, *_NORM_TYPES)):
        return False
    w = mod._parameters.get("weight")
    return isinstance(w, torch.Tensor) and w.ndim == 2


def _is_named_norm(mod: nn.Module) -> bool:
    """A norm by name with vector parameters only (``LlamaRMSNorm``, ``T5LayerNorm``)."""
    params = list(mod.parameters(recurse=False))
    return "Norm" in type(mod).__name__ and bool(params) and all(p.ndim <= 1 for p in params)


def _has_matrix(mod: nn.Module) -> bool:
    return any(p.ndim >= 2 for p in mod.parameters())


def _tensors(x: Any) -> Iterator[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, Mapping):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, (tuple, list)):
        for v in x:
            yield from _tensors(v)


def _primary_output(out: Any) -> torch.Tensor | None:
    """The model's prediction: ``logits`` of a Hugging Face output, else the first tensor."""
    if isinstance(out, Mapping) and isinstance(out.get("logits"), torch.Tensor):
        return out["logits"]  # type: ignore[no-any-return]
    return next(_tensors(out), None)


def _call(model: nn.Module, example_inputs: Any) -> Any:
    if isinstance(example_inputs, torch.Tensor):
        return model(example_inputs)
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    raise TypeError("example_inputs must be a tensor (model(x)), a tuple (model(*args)) or a "
                    f"dict (model(**kwargs)), got {type(example_inputs).__name__}")


def _traced_heads(model: nn.Module, example_inputs: Any, owner: str) -> list[str] | None:
    """Modules whose output feeds the model's output in one forward (``None``: no graph).

    The model runs once in eval mode (no dropout, BatchNorm running statistics
    untouched) with autograd on; every module's ``train`` flag is restored.
    """
    names = {id(m): n for n, m in model.named_modules()}
    produced: dict[Any, str] = {}  # autograd node -> innermost module that returned it

    def hook(mod: nn.Module, _args: Any, output: Any) -> None:
        for t in _tensors(output):
            node = t.grad_fn
            if node is not None and node not in produced:  # inner modules return first
                produced[node] = names[id(mod)]

    modes = [(m, m.training) for m in model.modules()]
    handles = [m.register_forward_hook(hook) for m in model.modules() if m is not model]
    try:
        model.eval()
        with torch.enable_grad():
            out = _call(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    start = _primary_output(out)
    if start is None or start.grad_fn is None:
        return None
    modules = dict(model.named_modules())
    owner_of: dict[int, str] = {}
    for mname, mod in model.named_modules():
        for p in mod.parameters(recurse=False):
            owner_of.setdefault(id(p), mname)
    heads: list[str] = []
    seen: set[int] = set()
    alive: list[Any] = []
    queue: deque[Any] = deque([start.grad_fn])
    while queue:
        node = queue.popleft()
        if id(node) in seen:
            continue
        seen.add(id(node))
        alive.append(node)  # keeps ids unique while the walk runs
        mname = produced.get(node)
        if mname is not None and any(True for _ in modules[mname].parameters(recurse=False)):
            # a layer (composite modules without parameters of their own are looked through)
            if _has_matrix(modules[mname]) and mname not in heads:
                heads.append(mname)
            continue  # a norm (vectors only) produces the output: no head on this path
        if hasattr(node, "variable"):  # a leaf: nothing behind it
            continue
        weight = _matmul_weight(node)
        if weight is not None:  # a parameter used functionally: F.linear(h, wte.weight)
            if owner_of.get(id(weight)) and owner_of[id(weight)] not in heads:
                heads.append(owner_of[id(weight)])
            continue  # the layer's input is not the output: do not walk past it
        queue.extend(fn for fn, _ in node.next_functions if fn is not None)
    return heads


_MATMUL_NODES = ("MmBackward", "AddmmBackward", "BmmBackward", "BaddbmmBackward",
                 "MatmulBackward", "LinearBackward")
_VIEW_NODES = ("TBackward", "TransposeBackward", "PermuteBackward", "ViewBackward",
               "UnsafeViewBackward", "ExpandBackward", "ReshapeAliasBackward")


def _matmul_weight(node: Any) -> torch.Tensor | None:
    """The ≥ 2-D parameter a matrix-product node multiplies by (through views), if any."""
    if not type(node).__name__.startswith(_MATMUL_NODES):
        return None
    stack = [(fn, 0) for fn, _ in node.next_functions if fn is not None]
    while stack:
        fn, depth = stack.pop()
        var = getattr(fn, "variable", None)
        if isinstance(var, torch.Tensor):
            if var.ndim >= 2:
                return var
        elif depth < 2 and type(fn).__name__.startswith(_VIEW_NODES):
            stack.extend((f, depth + 1) for f, _ in fn.next_functions if f is not None)
    return None


def _find_heads(model: nn.Module, head: Selector | None, head_names: Sequence[str],
                example_inputs: Any, embed_ids: set[int],
                embed_ptrs: set[tuple[int, tuple[int, ...]]], owner: str) -> _Heads:
    if head is not None or head_names:
        match, pats = _matcher(head, "head")
        found = [n for n, m in model.named_modules()
                 if n and (match(n, m) or n.rsplit(".", 1)[-1] in head_names)]
        unmatched = [p for p in pats
                     if not any(fnmatch.fnmatchcase(n, p) for n, _ in model.named_modules())]
        if unmatched or (head is not None and not found):
            raise ValueError(f"{owner}: head={head!r} matches no module of the model "
                             f"(unmatched: {unmatched or head!r}); module names look like "
                             f"{[n for n, _ in model.named_modules() if n][:8]}")
        return _Heads(found, "head=")
    tied = [n for n, m in model.named_modules()
            if not isinstance(m, _EMBED_TYPES) and any(
                id(p) in embed_ids or (p.ndim >= 2 and (p.data_ptr(), tuple(p.shape)) in embed_ptrs)
                for p in m.parameters(recurse=False))]
    if example_inputs is not None:
        traced = _traced_heads(model, example_inputs, owner)
        if traced is not None:
            return _Heads(traced + [t for t in tied if t not in traced], "traced")
        warnings.warn(f"{owner}: the output of the traced forward does not depend on any "
                      f"trainable parameter; falling back to the last Linear in module order",
                      stacklevel=external_stacklevel())
    if tied:
        return _Heads(tied, "tied")
    last = [n for n, m in model.named_modules() if _is_linear_like(m)][-1:]
    return _Heads(last, "last Linear")
