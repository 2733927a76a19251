r"""The ``nonfinite`` policy as device-side flags folded into the writes.

torch's fused optimizers take a ``found_inf`` tensor and leave parameters and
state unchanged where it is set, inside the same kernels that write them; no
snapshot is taken and nothing is read back to the host. matrixopt does the same
with per-parameter flags:

* :meth:`StepFlags.compute`: one finite flag per gradient, a 0-dim ``bool``
  tensor on the gradient's device, from :math:`\operatorname{isfinite}(\sum_i
  g_i)` (NaN and ±Inf propagate into the sum). Under FSDP2 the local sums of a
  whole group are summed over the shards with *one* collective (``reduce``), so
  every rank flags a matrix alike.
* the math then reads :meth:`StepFlags.safe` gradients (``where(ok, g, 0)``:
  nothing NaN enters work shared with other parameters, such as Muon's
  same-shape batches or GaLore's batched refresh) and folds the flag into every
  write: an EMA weight :math:`w` becomes ``where(ok, w, 0)``, a decay factor
  ``where(ok, d, 1)``, a step size ``where(ok, c, 0)``, a replaced tensor
  ``where(ok, new, old)`` (:meth:`StepFlags.weights`, :meth:`StepFlags.select`).
  With ``ok`` true every factor has the value it has without the policy, so a
  finite step is bit-identical to ``nonfinite="ignore"``; with ``ok`` false the
  parameter and its tensor state are unchanged.
* :meth:`StepFlags.count_` adds the skips to the int64 state counter
  ``nonfinite_count`` on the parameter's device.

Scalar counters (``step``, GaLore's ``iteration`` ...) live on the CPU, as torch
keeps ``step``: they cannot be conditioned on a device flag without a
synchronisation, so they advance on a skipped step on every device alike
(Adam's bias correction then counts the skipped step; nothing else changes).

Cost of ``"skip"``: one reduction per gradient, one gradient-sized ``where``
per gradient (alive one parameter at a time where the math allows) and a few
0-dim ``where``; the same work on a clean step and on a skipped one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["StepFlags", "NONFINITE_COUNT"]

_FULL = (torch.float32, torch.float64)


def _weight_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _scalar(v: Any, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``v`` as a 0-dim tensor usable beside ``device`` tensors without a host-to-device
    copy: a number is filled on the device by a kernel (no transfer), a 0-dim CPU
    tensor (a step size while compiling) stays on the CPU, where kernels on any
    device read it as a scalar."""
    if isinstance(v, Tensor):
        return v.to(dtype)
    return torch.full((), v, dtype=dtype, device=device)

def _zero_unless(ok: Tensor, g: Tensor) -> Tensor:
    """``where(ok, g, 0)`` for a 0-dim ``ok`` and a finite-where-``ok`` ``g`` (see
    :meth:`StepFlags.safe`)."""
    if g.device.type == "cpu" and g.is_floating_point():
        return g.mul(ok.to(g.dtype)).nan_to_num_(0.0, 0.0, 0.0)
    return torch.where(ok, g, 0)


#: State key of the per-parameter count of skipped (non-finite) gradients.
NONFINITE_COUNT = "nonfinite_count"

#: Elements of the safe gradient copies :meth:`StepFlags.chunks` keeps alive at once.
CHUNK_NUMEL = 1 << 18


class StepFlags:
    """Finite flags of one group's gradients, or ``None`` flags (policy off).

    ``ok[i]`` is a 0-dim bool tensor on parameter ``i``'s device. Every method is
    the identity when the policy is off (``ok is None``), so the math is written
    once for both cases.
    """

    def __init__(self, ok: list[Tensor] | None) -> None:
        self.ok = ok

    @property
    def active(self) -> bool:
        return self.ok is not None

    @classmethod
    def off(cls) -> StepFlags:
        return cls(None)

    @classmethod
    def compute(cls, grads: Sequence[Tensor],
                reduce: Callable[[Tensor], Tensor] | None = None) -> StepFlags:
        """Flags of ``grads`` (local tensors). ``reduce`` sums a 1-D tensor of local
        sums over the shards in place (FSDP2); ``None`` in one process."""
        if not grads:
            return cls([])
        sums = [g.sum() for g in grads]
        by_device: dict[torch.device, list[int]] = {}
        for i, s in enumerate(sums):
            by_device.setdefault(s.device, []).append(i)
        ok: list[Tensor] = [sums[0]] * len(sums)
        for idx in by_device.values():  # one stack, (one collective), one isfinite per device
            stacked = torch.stack([sums[i].float() for i in idx])
            if reduce is not None:
                stacked = reduce(stacked)
            for i, f in zip(idx, torch.isfinite(stacked).unbind()):
                ok[i] = f
        return cls(ok)

    def subset(self, index: Sequence[int]) -> StepFlags:
        """The flags of the entries ``index`` (in that order)."""
        return self if self.ok is None else StepFlags([self.ok[i] for i in index])

    def chunks(self, tensors: Sequence[Tensor], numel: int = CHUNK_NUMEL) -> list[list[int]]:
        """Consecutive index chunks of ``tensors`` of at most ``numel`` elements each (a
        larger tensor alone), so that :meth:`safe` copies of one chunk at a time keep the
        policy's extra memory bounded; one chunk of everything when the policy is off."""
        if self.ok is None or not tensors:
            return [list(range(len(tensors)))] if tensors else []
        out: list[list[int]] = [[]]
        size = 0
        for i, t in enumerate(tensors):
            if out[-1] and size + t.numel() > numel:
                out.append([])
                size = 0
            out[-1].append(i)
            size += t.numel()
        return out

    def safe(self, grads: Sequence[Tensor]) -> list[Tensor]:
        """``where(ok, g, 0)`` per gradient (new tensors; ``grads`` are not written).

        On the CPU, where ``torch.where`` with a 0-dim condition is an unvectorised
        kernel (about 4x the time of a vectorised pass on a 512x512 float32 tensor),
        as ``(g·ok).nan_to_num_(0, 0, 0)``: two vectorised passes with the same
        values (``g·1 = g`` exactly, a finite-flagged gradient holds no NaN/Inf; a
        skipped one becomes zeros, of either sign, which no write reads).
        """
        if self.ok is None:
            return list(grads)
        return [_zero_unless(f, g) for f, g in zip(self.ok, grads)]

    def weights(self, values: Sequence[Any], off: float,
                like: Sequence[Tensor] | None = None) -> list[Any]:
        """Per entry ``where(ok, value, off)`` (a 0-dim tensor; float64 where ``like``'s
        entry is float64, else float32): ``values`` (numbers or 0-dim tensors) as they
        are when the policy is off."""
        if self.ok is None:
            return list(values)
        dts = [_weight_dtype(x) for x in like] if like is not None else [torch.float32] * len(
            self.ok)
        return [torch.where(f, _scalar(v, dt, f.device), off)
                for f, v, dt in zip(self.ok, values, dts)]

    def weight(self, i: int, value: Any, off: float, like: Tensor | None = None) -> Any:
        """:meth:`weights` of entry ``i`` alone (float64 when ``like`` is)."""
        if self.ok is None:
            return value
        dt = (_weight_dtype(like) if like is not None else
              value.dtype if isinstance(value, Tensor) else torch.float32)
        f = self.ok[i]
        return torch.where(f, _scalar(value, dt, f.device), off)

    def select(self, i: int, new: Tensor, old: Tensor) -> Tensor:
        """``new`` where entry ``i`` is finite, else ``old`` (``new`` itself when off)."""
        return new if self.ok is None else torch.where(self.ok[i], new, old)

    def lerp_(self, xs: Sequence[Tensor], ys: Sequence[Tensor], weight: float) -> None:
        """``x ← x + w(y − x)`` for finite entries (an EMA write), ``x`` kept otherwise.

        Bit-identical to ``torch._foreach_lerp_(xs, ys, weight)`` on finite entries:
        float32/float64 targets take 0-dim tensor weights of their own precision;
        half-precision targets (whose lerp rounds a tensor weight to half first) a
        ``where`` of the plain result.
        """
        if not xs:
            return
        if self.ok is None:
            torch._foreach_lerp_(list(xs), list(ys), weight)
            return
        full = [i for i, x in enumerate(xs) if x.dtype in _FULL]
        if full:
            torch._foreach_lerp_([xs[i] for i in full], [ys[i] for i in full],
                                 self.subset(full).weights([weight] * len(full), 0.0,
                                                           [xs[i] for i in full]))
        for i, (x, y) in enumerate(zip(xs, ys)):
            if x.dtype not in _FULL:
                torch.where(self.ok[i], torch.lerp(x, y, weight), x, out=x)

    def mul_(self, xs: Sequence[Tensor], factor: float) -> None:
        """``x ← factor·x`` for finite entries (a decay), ``x`` kept otherwise
        (bit-identical to ``torch._foreach_mul_(xs, factor)`` on finite entries)."""
        if not xs or factor == 1.0:
            return
        if self.ok is None:
            torch._foreach_mul_(list(xs), factor)
            return
        full = [i for i, x in enumerate(xs) if x.dtype in _FULL]
        if full:
            torch._foreach_mul_([xs[i] for i in full],
                                self.subset(full).weights([factor] * len(full), 1.0,
                                                          [xs[i] for i in full]))
        for i, x in enumerate(xs):
            if x.dtype not in _FULL:
                # the in-place foreach kernel's own rounding (in half precision, x * factor
                # and the out-of-place foreach kernel round differently)
                y = x.clone()
                torch._foreach_mul_([y], factor)
                torch.where(self.ok[i], y, x, out=x)

    def count_(self, states: Sequence[dict[str, Any]], devices: Sequence[torch.device]) -> None:
        """Create (int64 zero) and advance ``nonfinite_count`` by the skips."""
        if self.ok is None:
            return
        counts = []
        for st, dev in zip(states, devices):
            c = st.get(NONFINITE_COUNT)
            if c is None:
                c = st[NONFINITE_COUNT] = torch.zeros((), dtype=torch.int64, device=dev)
            counts.append(c)
        if counts:
            torch._foreach_add_(counts, [f.logical_not().to(torch.int64) for f in self.ok])
