r"""Layer-wise stepping: update each parameter inside the backward pass.

Lv et al., "Full Parameter Fine-tuning for Large Language Models with Limited
Resources" (LOMO, 2023) and GaLore's per-layer recipe (Zhao et al. 2024): as
soon as autograd has finished accumulating a parameter's gradient, step that
parameter and free its gradient, so the full set of gradients is never alive
at once — peak memory drops by (almost) the size of all gradients but the
largest one in flight.

:class:`LayerwiseStepper` wraps any ``torch.optim.Optimizer`` (all matrixopt
optimizers, ``torch.optim.AdamW``, ...) with
:meth:`torch.Tensor.register_post_accumulate_grad_hook`. What differs from
galore-torch's per-layer recipe (one optimizer object per parameter):

* **one optimizer, one scheduler**: the wrapped optimizer keeps its groups, so a
  single ``torch.optim.lr_scheduler`` works unchanged (call ``sched.step()``
  once per optimisation step, as usual) and ``state_dict`` is the optimizer's.
* **gradient accumulation**: with ``accumulation_steps=k`` a parameter is
  stepped on every k-th accumulation into its gradient (the last micro-batch of
  each step) and its gradient is kept until then. Every parameter must then
  receive a gradient in every micro-batch (the usual case; a parameter that is
  skipped in a micro-batch would be counted one short — call :meth:`flush` at
  the end of each optimisation step in such models, which also makes the
  counting explicit).
* **gradient clipping**: only per parameter (``max_grad_norm``: each
  gradient is scaled to norm ≤ ``max_grad_norm`` before its step). Clipping by
  the *global* norm over all parameters is not available in layer-wise mode:
  it needs every gradient before the first step, which is exactly what
  layer-wise stepping avoids keeping.

A matrixopt optimizer steps the parameter through
:meth:`~matrixopt.optim._common.MatrixOptimizer.step_parameters`: the same code
path, hyperparameters (including the scheduler's lr) and state as ``step()``,
in Python work independent of the number of parameters (one dictionary look-up
to find the parameter's group). Any other optimizer (``torch.optim.AdamW``)
steps through its ``step()`` with every other gradient temporarily hidden
(O(P) work per parameter). Known difference from regular stepping: Muon
orthogonalises each matrix alone instead of in same-shape batches (the same
math, float rounding may differ in the last bits). GaLore's ``stagger`` slots
come from each matrix's position in its group, so they are the same as with
regular stepping.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["LayerwiseStepper"]


class LayerwiseStepper:
    r"""Step ``optimizer`` parameter by parameter inside ``loss.backward()``.

    Usage (no ``optimizer.step()`` / ``zero_grad()`` in the loop)::

        opt = Muon(model.parameters(), lr=3e-4)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, s / 100))
        stepper = LayerwiseStepper(opt, accumulation_steps=4)
        for i, (x, y) in enumerate(batches):
            (loss_fn(model(x), y) / 4).backward()   # steps on every 4th backward
            if (i + 1) % 4 == 0:
                sched.step()
        stepper.remove()                            # plain stepping again

    Args:
        optimizer: the optimizer whose parameters are stepped.
        accumulation_steps: micro-batches per optimisation step (default 1).
        max_grad_norm: per-parameter gradient clipping threshold (default
            ``None``: no clipping); see the module docstring for why global-norm
            clipping is unavailable.

    Attributes:
        param_steps: number of single-parameter steps taken so far.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, accumulation_steps: int = 1,
                 max_grad_norm: float | None = None) -> None:
        if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) \
                or accumulation_steps < 1:
            raise ValueError(f"LayerwiseStepper: accumulation_steps must be an int >= 1, got "
                             f"{accumulation_steps!r}")
        if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float))
                                              and max_grad_norm > 0):
            raise ValueError(f"LayerwiseStepper: max_grad_norm must be None or a number > 0, "
                             f"got {max_grad_norm!r}")
        self.optimizer = optimizer
        self.accumulation_steps = accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.param_steps = 0
        self._params: list[Tensor] = [p for g in optimizer.param_groups for p in g["params"]]
        if len({id(p) for p in self._params}) != len(self._params):
            raise ValueError("LayerwiseStepper: a parameter appears twice in the optimizer")
        self._count: dict[int, int] = {id(p): 0 for p in self._params}
        self._handles = [p.register_post_accumulate_grad_hook(self._hook)
                         for p in self._params if p.requires_grad]

    # ------------------------------------------------------------------ hooks
    def _hook(self, p: Tensor) -> None:
        k = id(p)
        self._count[k] += 1
        if self._count[k] >= self.accumulation_steps:
            self._step_one(p)

    @torch.no_grad()
    def _step_one(self, p: Tensor) -> None:
        self._count[id(p)] = 0
        if p.grad is None:
            return
        if self.max_grad_norm is not None:
            norm = torch.linalg.vector_norm(p.grad.float())
            p.grad.mul_((self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0).to(p.grad.dtype))
        step_parameters = getattr(self.optimizer, "step_parameters", None)
        if step_parameters is not None:  # matrixopt: O(1) in the number of parameters
            step_parameters([p])
        else:
            # any other torch optimizer: its own step() with the other gradients hidden
            hidden: list[tuple[Tensor, Tensor]] = []
            for q in self._params:
                if q is not p and q.grad is not None:
                    hidden.append((q, q.grad))
                    q.grad = None
            try:
                self.optimizer.step()
            finally:
                for q, g in hidden:
                    q.grad = g
        p.grad = None
        self.param_steps += 1

    # --------------------------------------------------------------- control
    def flush(self) -> None:
        """Step every parameter that still holds an accumulated gradient (end of an
        optimisation step whose micro-batches did not all reach every parameter)."""
        for p in self._params:
            if p.grad is not None:
                self._step_one(p)
            self._count[id(p)] = 0

    def remove(self) -> None:
        """Remove the hooks: ``backward()`` only accumulates gradients again."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> LayerwiseStepper:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

