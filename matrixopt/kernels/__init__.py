"""Triton kernels for the orthogonalisation hot path, each beside a torch reference.

Submodules (imported on demand; importing this package imports neither torch
nor triton):

* :mod:`matrixopt.kernels.reference` -- pure-torch ``gram``, ``sym_poly``,
  ``poly_step``: the contract, the CPU path and the test/benchmark baseline;
* :mod:`matrixopt.kernels.triton_ops` -- Triton launchers with the same
  signatures, plus ``should_dispatch(m, n, dtype)``.

One quintic Newton–Schulz step on an ``m×n`` matrix ``X`` (``m <= n``) is
``A = gram(X)``; ``B = sym_poly(A, b, c)``; ``X = poly_step(X, B, a)``, i.e.
``2m²n + 2m³ + 2m²n`` flops, of which the two symmetric products can be halved
by computing one triangle (Jordan et al. 2024, "Muon"; Amsel et al. 2025,
"Polar Express").
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["is_available", "interpreter_enabled"]


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install raising at import
        return False
    return True


def interpreter_enabled() -> bool:
    """Whether Triton's CPU interpreter is on (``TRITON_INTERPRET=1``), read as Triton reads it.

    The launchers read this at every call, so a test may switch the interpreter
    on and off (e.g. with ``monkeypatch.setenv``) after triton was imported.
    """
    if not _triton_importable():
        return False
    import triton

    return bool(triton.knobs.runtime.interpret)


def is_available(device: Any = None) -> bool:
    """Whether the Triton launchers can run on ``device``.

    True when triton imports and either the interpreter is on (any device; the
    interpreter copies to host memory -- meant for tests only) or ``device`` is a
    CUDA device and CUDA is available. ``device=None`` asks about the default
    CUDA device. A malformed device string raises ``torch.device``'s error.
    """
    if not _triton_importable():
        return False
    if interpreter_enabled():
        return True
    import torch

    if device is not None and torch.device(device).type != "cuda":
        return False
    return torch.cuda.is_available()
