r"""Storage formats of optimizer moments: the ``state_dtype`` group key.

``state_dtype`` (every matrixopt optimizer):

* ``None`` (default): today's behaviour, moments in the dtype of the tensor they
  follow (the parameter, or the projected gradient for GaLore).
* ``"fp32"``: float32 moments.
* ``"bf16"``: bfloat16 moments (2 bytes per entry); the step computes in
  float32 and rounds when storing.
* ``"int8"``: block-wise 8-bit (:mod:`matrixopt.optim._quant`): under ``key``
  an int8 code tensor shaped like the moment, under ``key + "_absmax"`` the
  float32 per-block scales (one per 256 entries) — 1 + 4/256 bytes per entry.
  Moments with fewer than 4096 entries stay float32. First moments use the
  signed code, second moments the unsigned one.
* ``"fp8"``: FP8 E4M3 with COAT's dynamic range expansion
  (:mod:`matrixopt.optim._fp8`): under ``key`` a ``float8_e4m3fn`` tensor shaped
  like the moment, under ``key + "_absmax"`` the float32 ``(max, exponent)`` pair of
  each group of 128 entries — 1 + 8/128 bytes per entry. Same 4096-entry
  threshold as int8; both moments E4M3 (COAT's default).

The format of a stored moment describes itself (an ``*_absmax`` key means
int8, or fp8 when the codes are ``float8_e4m3fn``; otherwise the tensor's
dtype), so checkpoints written before this key existed, or with another
``state_dtype``, keep loading; a moment is converted
to the group's format the next time it is stored. Quantised moments are
dequantised only transiently inside a step (:func:`load_moment`) and written
back with :func:`store_moment`; no float32 copy is kept.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._distributed import local_tensor
from ._fp8 import dequantize_fp8, is_fp8, quantize_fp8
from ._quant import MIN_QUANT_NUMEL, dequantize_blockwise, quantize_blockwise

__all__ = ["STATE_DTYPES", "check_state_dtype", "init_moment", "load_moment", "store_moment",
           "zero_moment", "is_native", "compute_dtype", "COUNTERS", "counters_to_cpu_",
           "step_moment"]

STATE_DTYPES = (None, "fp32", "bf16", "int8", "fp8")
ABSMAX = "_absmax"
_HALF = (torch.float16, torch.bfloat16)


#: GaLore's scalar schedule counters (int64). Like torch's ``step`` they live on the
#: CPU whatever the parameter's device: the step reads them as Python ints to decide
#: the refresh schedule and the random basis' seed, which on a device tensor would be
#: a host synchronisation per matrix per step.
COUNTERS = ("iteration", "refresh_step", "refresh_offset", "seed")


def counters_to_cpu_(state: dict[str, Any], keys: tuple[str, ...] = COUNTERS) -> None:
    """Move scalar counters that a loader put on an accelerator back to the CPU.

    A no-op for state created or loaded by matrixopt (its loader keeps them on the
    CPU); a state dict converted by other tools may hold them on the parameter's
    device, and then this costs one synchronisation, once.
    """
    for k in keys:
        v = state.get(k)
        if isinstance(v, Tensor) and v.device.type != "cpu":
            state[k] = local_tensor(v).cpu()


def check_state_dtype(check: Any) -> None:
    """Group validation: ``state_dtype`` must be one of :data:`STATE_DTYPES`."""
    check.choice("state_dtype", STATE_DTYPES)


def compute_dtype(like: Tensor) -> torch.dtype:
    """Dtype a non-native moment is computed in: float32 (or float64 for float64)."""
    return torch.promote_types(like.dtype, torch.float32)


def _stored_dtype(state_dtype: str | None, like: Tensor) -> torch.dtype | str:
    if state_dtype is None:
        return like.dtype
    if state_dtype == "fp32":
        return torch.float32
    if state_dtype == "bf16":
        return torch.bfloat16
    if state_dtype in ("int8", "fp8"):
        return state_dtype if like.numel() >= MIN_QUANT_NUMEL else torch.float32
    raise ValueError(f"state_dtype must be one of {list(STATE_DTYPES)}, got {state_dtype!r}")


def _quantize(fmt: str, x: Tensor, signed: bool, out: tuple[Tensor, Tensor] | None = None
              ) -> tuple[Tensor, Tensor]:
    if fmt == "fp8":
        return quantize_fp8(x, out=out)
    return quantize_blockwise(x, signed, out=out)


def _quantised_format(state: dict[str, Any], key: str) -> str | None:
    """``"int8"`` / ``"fp8"`` for a quantised stored moment, else None."""
    if key + ABSMAX not in state:
        return None
    return "fp8" if is_fp8(state[key]) else "int8"


def init_moment(state: dict[str, Any], key: str, like: Tensor, state_dtype: str | None,
                signed: bool) -> None:
    """Create a zero moment ``state[key]`` shaped like ``like`` in the group's format."""
    fmt = _stored_dtype(state_dtype, like)
    if fmt in ("int8", "fp8"):
        assert isinstance(fmt, str)
        state[key], state[key + ABSMAX] = _quantize(
            fmt, torch.zeros(like.shape, dtype=torch.float32, device=like.device), signed)
    elif fmt == like.dtype:  # zeros_like keeps a DTensor (FSDP2) sharded like its parameter
        state[key] = torch.zeros_like(like, memory_format=torch.preserve_format)
    else:
        assert isinstance(fmt, torch.dtype)
        state[key] = torch.zeros(like.shape, dtype=fmt, device=like.device)


def is_native(state: dict[str, Any], key: str, like: Tensor, state_dtype: str | None) -> bool:
    """True if ``state[key]`` is a plain tensor in ``like``'s dtype and stays in that
    format under ``state_dtype`` (so it can be updated in place)."""
    if key + ABSMAX in state or state[key].dtype != like.dtype:
        return False
    return state_dtype is None or _stored_dtype(state_dtype, state[key]) == like.dtype


def load_moment(state: dict[str, Any], key: str, dtype: torch.dtype, signed: bool) -> Tensor:
    """The moment as a ``dtype`` tensor: the stored tensor itself if it already
    has that dtype (in-place updates then write the state), else a transient copy
    (dequantised for int8) to be written back with :func:`store_moment`."""
    t = state[key]
    quantised = _quantised_format(state, key)
    if quantised == "fp8":
        return dequantize_fp8(t, state[key + ABSMAX], dtype)
    if quantised == "int8":
        return dequantize_blockwise(t, state[key + ABSMAX], signed, dtype)
    return t if t.dtype == dtype else t.to(dtype)


def step_moment(state: dict[str, Any], key: str, state_dtype: str | None, like: Tensor
                ) -> tuple[Tensor, bool]:
    """A signed moment as the tensor a step updates, and whether it is native: the stored
    (local) tensor itself, updated in place; else a transient copy in
    :func:`compute_dtype` of ``like`` (dequantised for int8), to be written back with
    :func:`store_moment`."""
    if is_native(state, key, state[key], state_dtype):
        return local_tensor(state[key]), True
    return load_moment(state, key, compute_dtype(like), signed=True), False


def store_moment(state: dict[str, Any], key: str, work: Tensor, state_dtype: str | None,
                 signed: bool) -> None:
    """Write ``work`` back into ``state[key]`` in the group's format (no-op when
    ``work`` is the stored tensor and the format is unchanged)."""
    fmt = _stored_dtype(state_dtype, state[key]) if state_dtype is not None else None
    quantised = _quantised_format(state, key)
    if fmt is None:  # keep whatever format the moment has
        fmt = quantised or state[key].dtype
    if fmt in ("int8", "fp8"):
        assert isinstance(fmt, str)
        if quantised == fmt:
            _quantize(fmt, work, signed, out=(state[key], state[key + ABSMAX]))
        else:
            state[key], state[key + ABSMAX] = _quantize(fmt, work, signed)
        return
    if quantised:
        del state[key + ABSMAX]
        state[key] = work.to(fmt, copy=True)
    elif work is not state[key]:
        if state[key].dtype == fmt:
            state[key].copy_(work)
        else:
            state[key] = work.to(fmt, copy=True)


def zero_moment(state: dict[str, Any], key: str, signed: bool) -> None:
    """Reset a moment to zero in its current format."""
    quantised = _quantised_format(state, key)
    if quantised is not None:
        _quantize(quantised, torch.zeros_like(state[key], dtype=torch.float32), signed,
                  out=(state[key], state[key + ABSMAX]))
    else:
        state[key].zero_()
