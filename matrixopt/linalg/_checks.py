"""Argument validation shared by the linalg functions.

Every message names the argument and the offending value, so a user reading a
traceback knows what to change.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_matrix(A: object, name: str = "A", *, min_ndim: int = 2) -> Tensor:
    """Raise unless ``A`` is a real floating tensor with at least ``min_ndim`` dims."""
    if not isinstance(A, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(A).__name__}")
    if A.is_complex():
        raise TypeError(f"{name} must be real; complex dtype {A.dtype} is not supported")
    if A.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must have a floating dtype (float16, bfloat16, float32, float64), "
            f"got {A.dtype}"
        )
    if A.ndim < min_ndim:
        raise ValueError(
            f"{name} must have at least {min_ndim} dimensions [..., m, n], "
            f"got shape {tuple(A.shape)}"
        )
    return A


def check_finite(A: Tensor, name: str = "A") -> None:
    """Raise ``ValueError`` if ``A`` holds NaN or Inf (one host sync)."""
    if not bool(torch.isfinite(A).all()):
        raise ValueError(
            f"{name} contains NaN or Inf; pass check_finite=False to skip this check"
        )


def check_choice(value: object, name: str, choices: Sequence[str]) -> str:
    """Raise ``ValueError`` unless ``value`` is one of ``choices`` (listed in the message)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_dtype(dtype: object, name: str = "dtype") -> torch.dtype | None:
    """Accept ``None`` or a floating ``torch.dtype``."""
    if dtype is None:
        return None
    if not isinstance(dtype, torch.dtype) or dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"{name} must be None or one of float16, bfloat16, float32, float64, got {dtype!r}"
        )
    return dtype


def check_positive_int(value: object, name: str, *, allow_zero: bool = False) -> int:
    """Raise unless ``value`` is an int > 0 (or >= 0 with ``allow_zero``)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value
