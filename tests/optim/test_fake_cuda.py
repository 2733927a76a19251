"""A CUDA-claiming dry run of every optimizer configuration (no GPU needed).

Under :class:`torch._subclasses.fake_tensor.FakeTensorMode` tensors can live on
``device="cuda"`` on a CPU-only build: they carry shape, dtype and device but no
data. Each configuration of the registry (``optim_registry.py``) runs three
steps -- GaLore refreshes included (``update_proj_gap=3``: the first step
refreshes, and ``_GAP_SMALL`` adds a refresh at step 3) -- on fake ``cuda``
parameters, under the non-finite policies ``"skip"``, ``"ignore"`` and
``"raise"``, and a dispatch mode records every:

* host read of a device tensor (``aten._local_scalar_dense``: ``.item()``,
  ``bool(t)``, ``int(t)``, ``.tolist()``; ``aten.equal``),
* copy from a device tensor into a CPU tensor (a blocking device-to-host copy).

Reads of CPU tensors are allowed (the scalar counters ``step``, ``iteration``,
... live on the CPU, as torch keeps ``step``): fake mode answers them from the
constants it tracks for tensors built from Python numbers. Mixing devices in one
op (other than a 0-dim CPU scalar, as torch allows) raises in fake mode itself,
so the run also proves that no CPU tensor meets a device tensor.

Measured on this build (torch 2.13 CPU): ``.item()``/``bool()``/``.tolist()``
of a fake cuda tensor and ``torch.equal`` raise ``DataDependentOutputException``;
a CPU vector mixed into a cuda op raises ``FakeTensorDeviceMismatchError``; a
0-dim CPU tensor mixed in is accepted; reading a CPU constant (``torch.tensor(0.)``
then in-place ``add_``/``copy_``/``fill_``) works; ``copy_`` between two fake cuda
tensors fails ("PyTorch is not linked with support for cuda devices"), so the
dispatch mode below answers ``copy_`` itself after its checks; a CUDA
``torch.Generator`` cannot be built, so GaLore's generator hook
(``_GaLoreBase._generator``) returns a CPU generator here -- the optimizer passes a
generator object to :func:`~matrixopt.linalg.lowrank_basis` on real devices too.

``nonfinite="raise"`` reads the finite flags to raise before anything changes:
that is its documented synchronisation (one per group). The test checks it is the
only host read of that policy.
"""

from __future__ import annotations

import traceback
from typing import Any

import pytest
import torch
from optim_registry import REGISTRY, OptimInfo, make_problem
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from matrixopt.optim.galore._base import GaLoreBase as _GaLoreBase

aten = torch.ops.aten
STEPS = 3
POLICIES = ("skip", "ignore", "raise")


def _where() -> tuple[str, str, int]:
    """(file, function, line) of the innermost matrixopt frame of the current stack."""
    for f in reversed(traceback.extract_stack()):
        if "/matrixopt/" in f.filename.replace("\\", "/"):
            return f.filename.rsplit("/", 1)[-1], f.name, f.lineno or 0
    return "?", "?", 0


def _in_raise_check() -> bool:
    return any(f.name == "_raise_on_nonfinite" for f in traceback.extract_stack())


class HostReads(TorchDispatchMode):
    """Records host reads of non-CPU tensors and device-to-host copies (see module doc)."""

    def __init__(self, reads: list[Any] | None = None) -> None:
        super().__init__()
        self.reads: list[tuple[str, str, int, str]] = [] if reads is None else reads

    def _record(self, what: str) -> None:
        # the flag check of nonfinite="raise" is allowed: "raise" in the last field
        self.reads.append((*_where(), what + (" [raise]" if _in_raise_check() else "")))

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default and args[0].device.type != "cpu":
            self._record("item/bool/int/tolist of a device tensor")
            return True if args[0].dtype == torch.bool else 1
        if func is aten.equal.default and any(a.device.type != "cpu" for a in args[:2]):
            self._record("torch.equal of device tensors")
            return True
        if func is aten.copy_.default and args[0].device.type == "cpu" \
                and args[1].device.type != "cpu":
            self._record("device-to-host copy")
        return func(*args, **kwargs)


_REAL_COPY = torch.Tensor.copy_


def _fake_copy_(self: torch.Tensor, src: torch.Tensor, non_blocking: bool = False
                ) -> torch.Tensor:
    """``Tensor.copy_`` for fake tensors: this CPU build raises on a copy into a fake cuda
    tensor before any dispatch mode sees it, so such copies are answered here (shape
    checked as ``copy_`` does; a fake tensor holds no data to copy). Device-to-host
    copies go through the real method, so :class:`HostReads` records them."""
    if self.device.type != "cpu":
        torch.broadcast_shapes(src.shape, self.shape)
        return self
    return _REAL_COPY(self, src, non_blocking)


def _fake_cuda_model(model: nn.Module) -> nn.Module:
    """Replace every parameter of the (real, CPU) ``model`` by a fake cuda tensor (the
    module structure, which ``muon_param_groups`` reads, is kept). Call in fake mode."""
    for mod in model.modules():
        for k, p in list(mod._parameters.items()):
            if p is not None:
                mod._parameters[k] = nn.Parameter(torch.randn(p.shape, device="cuda"))
    return model


def _cpu_generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def dry_run(info: OptimInfo, policy: str, reads: list[Any] | None = None, **overrides: Any
            ) -> tuple[list[Any], nn.Module]:
    """Three steps on fake cuda parameters; returns the recorded host reads (also
    appended to ``reads`` as they happen)."""
    reads = HostReads(reads)
    model = make_problem(info.problem)
    with FakeTensorMode(), reads:
        model = _fake_cuda_model(model)
        opt = info.make(model, nonfinite=policy, **overrides)
        for _ in range(STEPS):
            for name, p in model.named_parameters():
                if name.startswith("unused"):
                    continue
                p.grad = torch.zeros_like(p) if name.startswith("dead") else torch.randn_like(p)
            opt.step()
        devices = {t.device.type for st in opt.state.values() for t in st.values()
                   if isinstance(t, torch.Tensor) and t.ndim > 0}
    assert devices <= {"cuda"}, f"state tensors on {devices}"
    return reads.reads, model


def _unexpected(reads: list[Any], policy: str) -> list[Any]:
    """Reads other than the documented one of ``nonfinite="raise"``."""
    return [r for r in reads if not (policy == "raise" and r[3].endswith(" [raise]"))]


_GALORE = [i for i in REGISTRY if i.cls.__name__.startswith("GaLore")]


_REAL_GETITEM = torch.Tensor.__getitem__
_REAL_SETITEM = torch.Tensor.__setitem__


def _fake_getitem(self: torch.Tensor, idx: Any) -> torch.Tensor:
    """Basic indexing (ints, slices, ``...``, ``None``, one index tensor) of a fake cuda
    tensor with the ops it stands for: this CPU build's ``Tensor.__getitem__`` raises
    on a cuda tensor before dispatch (it sets a CUDA device guard)."""
    if self.device.type == "cpu":
        return _REAL_GETITEM(self, idx)
    items = list(idx) if isinstance(idx, tuple) else [idx]
    if any(i is Ellipsis for i in items):
        k = items.index(Ellipsis)
        used = sum(1 for i in items if i is not None and i is not Ellipsis)
        items[k:k + 1] = [slice(None)] * (self.ndim - used)
    t, dim = self, 0
    for i in items:
        if i is None:
            t, dim = t.unsqueeze(dim), dim + 1
        elif isinstance(i, int):
            t = aten.select.int(t, dim, i)
        elif isinstance(i, slice):
            t = aten.slice.Tensor(t, dim, i.start, i.stop, i.step or 1)
            dim += 1
        elif isinstance(i, torch.Tensor):  # a bool mask is a data-dependent shape
            t = aten.index.Tensor(t, [None] * dim + [i])
            dim += 1
        else:
            raise TypeError(f"index {i!r} not handled by the fake-cuda indexing stand-in")
    return t


def _fake_setitem(self: torch.Tensor, idx: Any, value: Any) -> None:
    if self.device.type == "cpu":
        _REAL_SETITEM(self, idx, value)
        return
    view = _fake_getitem(self, idx)
    if isinstance(value, torch.Tensor):
        torch.broadcast_shapes(value.shape, view.shape)


_REAL_CONTIGUOUS = torch.Tensor.contiguous


def _fake_contiguous(self: torch.Tensor, memory_format: Any = torch.contiguous_format
                     ) -> torch.Tensor:
    if self.device.type == "cpu" or self.is_contiguous(memory_format=memory_format):
        return _REAL_CONTIGUOUS(self, memory_format=memory_format)
    return aten.clone.default(self, memory_format=memory_format)


@pytest.fixture(autouse=True)
def _cpu_generators(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_GaLoreBase, "_generator", staticmethod(_cpu_generator))
    monkeypatch.setattr(torch.Tensor, "copy_", _fake_copy_)
    monkeypatch.setattr(torch.Tensor, "__getitem__", _fake_getitem)
    monkeypatch.setattr(torch.Tensor, "__setitem__", _fake_setitem)
    monkeypatch.setattr(torch.Tensor, "contiguous", _fake_contiguous)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("info", REGISTRY, ids=[i.name for i in REGISTRY])
def test_no_host_read_of_a_device_tensor(info: OptimInfo, policy: str) -> None:
    overrides = {"update_proj_gap": 2} if info in _GALORE else {}
    reads: list[Any] = []
    reads, _ = dry_run(info, policy, reads=reads, **overrides)
    bad = _unexpected(reads, policy)
    assert not bad, f"host reads of device tensors in {info.name} ({policy}): {bad}"
    if policy == "raise":
        assert reads, "nonfinite='raise' must check the flags"


def test_the_recorder_sees_each_kind_of_host_read() -> None:
    """The dispatch mode is not blind: each forbidden pattern is recorded once."""
    reads = HostReads()
    with FakeTensorMode(), reads:
        x = torch.randn(4, device="cuda")
        x.sum().item()
        bool(x.sum() > 0)
        torch.equal(x, x)
        torch.zeros(4).copy_(x)
        torch.tensor(2.0).add_(1).item()  # a CPU counter: allowed
        x.copy_(torch.zeros(4))           # host-to-device: allowed
    assert [r[3] for r in reads.reads] == [
        "item/bool/int/tolist of a device tensor", "item/bool/int/tolist of a device tensor",
        "torch.equal of device tensors", "device-to-host copy"]


def test_a_cpu_tensor_mixed_into_a_device_op_raises_under_fake_mode() -> None:
    with FakeTensorMode(), pytest.raises(RuntimeError, match="device"):
        torch.randn(4, device="cuda") + torch.ones(4)


def test_generator_hook_gives_the_same_draws_as_an_int_seed() -> None:
    """The hook's default (a generator on the parameter's device) reproduces the int-seed
    draws lowrank_basis made before the hook existed: trajectories are unchanged."""
    from matrixopt.linalg import lowrank_basis
    G = torch.randn(6, 10)
    for method in ("random", "rsvd"):
        a = lowrank_basis(G, 2, method=method, seed=_GaLoreBase._generator(5, G.device))
        b = lowrank_basis(G, 2, method=method, seed=5)
        assert torch.equal(a, b)
