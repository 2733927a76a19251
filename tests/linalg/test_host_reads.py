"""The linalg functions an optimizer calls per step or per basis refresh read nothing
back to the host (issue 13 item 7: ``svd._prepare`` read the batch's min/max with
``.tolist()`` on every call, i.e. per matrix per GaLore refresh).

Two checks, both CPU-only:

* a dispatch mode that fails on every op that hands a tensor's data to Python
  (``aten._local_scalar_dense``, behind ``.item()``, ``.tolist()``, ``float(t)``
  and ``bool(t)``; ``aten.equal``; ``aten.is_nonzero``) or whose output shape
  depends on data (``nonzero``, ``masked_select``), around real CPU calls;
* ``orthogonalize`` on fake ``cuda`` tensors (``FakeTensorMode``), because on
  CPU tensors it takes a documented free host check that it skips on other
  devices.

The documented exception: ``check_finite=True`` (the standalone default of
the SVD-type functions) is one host sync by design; optimizers pass False.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from matrixopt.linalg import (
    lowrank_basis,
    orthogonalize,
    randomized_svd,
    spectral_norm,
    subspace_iteration,
)
from matrixopt.linalg.svd import _prepare

aten = torch.ops.aten
HOST_READS = {aten._local_scalar_dense.default, aten.equal.default, aten.is_nonzero.default,
              aten.nonzero.default, aten.masked_select.default}


class HostReadError(AssertionError):
    pass


class NoHostReads(TorchDispatchMode):
    """Fails on host reads; ``Tensor.tolist`` (which bypasses dispatch on CPU) is patched."""

    def __enter__(self) -> NoHostReads:
        self._tolist = torch.Tensor.tolist

        def tolist(t: torch.Tensor) -> Any:
            raise HostReadError("host read of a tensor: Tensor.tolist")

        torch.Tensor.tolist = tolist  # type: ignore[method-assign,assignment]
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        torch.Tensor.tolist = self._tolist  # type: ignore[method-assign]
        super().__exit__(*exc)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in HOST_READS or (func is aten.index.Tensor and any(
                i is not None and i.dtype == torch.bool for i in args[1])):
            raise HostReadError(f"host read of a tensor: {func}")
        return func(*args, **(kwargs or {}))


def _g(*shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape))) * scale


def test_the_guard_catches_host_reads() -> None:
    x = _g(3, 4)
    for read in (lambda: x.sum().item(), lambda: x.tolist(), lambda: bool((x > 0).any()),
                 lambda: torch.equal(x, x), lambda: x[x > 0]):
        with NoHostReads(), pytest.raises(HostReadError):
            read()


@pytest.mark.parametrize("scale", [1.0, 1e30, 1e-30])
def test_refresh_path_has_no_host_reads(scale: float) -> None:
    G = _g(2, 48, 20, scale=scale)
    with NoHostReads():
        X, amax, s = _prepare(G, "G", check_finite=False)
        P = lowrank_basis(G, 4, method="svd", check_finite=False)
        for method in ("rsvd", "warm", "random"):
            lowrank_basis(G, 4, method=method, previous=P, check_finite=False)
            lowrank_basis(G, 4, method=method, side="left", check_finite=False)
        randomized_svd(G, 4, check_finite=False)
        subspace_iteration(G, P, side="right", check_finite=False)
        spectral_norm(G, check_finite=False)
    # the rescaling still works on the device: 1e±30 inputs neither overflow nor vanish
    assert torch.isfinite(X).all() and float(X.abs().amax()) >= 0.5
    torch.testing.assert_close(X * s, G.to(X.dtype), rtol=0, atol=0)  # exact (powers of two)


def test_check_finite_is_the_documented_sync() -> None:
    G = _g(4, 6)
    with NoHostReads(), pytest.raises(HostReadError):
        _prepare(G, "G", check_finite=True)
    G[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        _prepare(G, "G", check_finite=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_orthogonalize_on_fake_cuda_has_no_host_reads(dtype: torch.dtype) -> None:
    with FakeTensorMode():
        for shape, norm, method in itertools.product(
                [(40, 24), (2, 24, 40)], ["frobenius", "spectral", "aol"],
                ["standard", "gram", "auto"]):
            G = torch.empty(*shape, device="cuda")
            O = orthogonalize(G, normalization=norm, method=method, dtype=dtype)
            assert O.device.type == "cuda" and O.shape == G.shape
        with pytest.raises(DataDependentOutputException):
            orthogonalize(torch.empty(4, 6, device="cuda"), check_finite=True)
