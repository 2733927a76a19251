r"""LISA: layerwise importance sampling — train a few randomly chosen blocks at a time.

Pan et al., "LISA: Layerwise Importance Sampling for Memory-Efficient Large
Language Model Fine-Tuning" (NeurIPS 2024); LMFlow's ``LISATrainer``. Every
``period`` optimisation steps (at step 0, ``period``, ``2·period``, ...) choose
``n_active`` of the ``N`` blocks uniformly without replacement; only their
parameters (and the always-trainable ones: embeddings, final norm, head, which
the paper keeps at sampling probability 1) have ``requires_grad=True`` until the
next switch. The optimizer's state of a block that is switched off is freed and
re-created (zero moments, bias correction from the start) when the block is
sampled again — LMFlow's ``LISATrainer`` behaviour, so optimizer memory is
bounded by the active set: with ``γ`` of ``N`` blocks active it is
``state(always) + γ/N · state(blocks)`` instead of the full ``state(all)``.

:class:`LISA` composes with any optimizer (it only toggles ``requires_grad``,
clears the frozen gradients and pops entries of ``optimizer.state``; every torch
and matrixopt optimizer skips a parameter whose ``grad`` is ``None``, so frozen
blocks get neither an update nor weight decay) and with
:class:`~matrixopt.optim.LayerwiseStepper` (pass the stepper; create it before
LISA so that every parameter has its hook). The sampling runs on a CPU
``torch.Generator`` seeded by ``seed``: no host read of a device tensor, and
:meth:`state_dict` / :meth:`load_state_dict` restore the generator, the active
set and the step, so a resumed run samples the same blocks.

Cost: per switch, O(number of parameters) Python work; no device work except
freeing memory. Activations of frozen blocks are still needed for backprop
through them (LISA saves optimizer and gradient memory, not activation memory).
Under DDP/FSDP, toggling ``requires_grad`` after wrapping needs the wrapper
rebuilt (as LMFlow does); LISA does not do that.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .layerwise import LayerwiseStepper

__all__ = ["LISA"]


def _as_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (
            high is not None and value > high):
        span = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"LISA: {name} must be an int {span}, got {value!r}")
    return value


class LISA:
    r"""Freeze all but ``n_active`` randomly sampled blocks, resampling every ``period`` steps.

    Usage (call :meth:`step` once per optimisation step, after ``optimizer.step()``)::

        opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
        lisa = LISA(opt, model.blocks, n_active=2, period=20,
                    always=(model.embed, model.head), seed=0)
        for x, y in batches:
            loss_fn(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            lisa.step()

    Args:
        optimizer: any ``torch.optim.Optimizer`` holding the blocks' parameters,
            or a :class:`~matrixopt.optim.LayerwiseStepper` wrapping one.
        model_layers: the ``N`` blocks sampled from (e.g. ``model.transformer.h``).
        n_active: blocks trainable at a time, ``0 <= n_active <= N`` (``N``: every
            block, plain full training).
        period: optimisation steps between switches (LMFlow's
            ``lisa_interval_steps``; 20 in its scripts).
        always: modules always trainable (embeddings, final norm, head); must not
            share parameters with ``model_layers``. Other parameters are left as
            they are.
        seed: seed of the CPU generator that samples the blocks.

    Attributes:
        active: indices of the currently trainable blocks (sorted).
        num_steps: optimisation steps counted so far.
    """

    def __init__(self, optimizer: torch.optim.Optimizer | LayerwiseStepper,
                 model_layers: Sequence[nn.Module], n_active: int, period: int,
                 always: Iterable[nn.Module] = (), seed: int = 0) -> None:
        self.stepper = optimizer if isinstance(optimizer, LayerwiseStepper) else None
        self.optimizer: torch.optim.Optimizer = (
            optimizer.optimizer if isinstance(optimizer, LayerwiseStepper) else optimizer)
        if not isinstance(self.optimizer, torch.optim.Optimizer):
            raise TypeError(f"LISA: optimizer must be a torch.optim.Optimizer or a "
                            f"LayerwiseStepper, got {type(optimizer).__name__}")
        layers = list(model_layers)
        if not layers or not all(isinstance(m, nn.Module) for m in layers):
            raise ValueError("LISA: model_layers must be a non-empty sequence of nn.Module")
        self.n_active = _as_int("n_active", n_active, 0, len(layers))
        self.period = _as_int("period", period, 1)
        self.seed = _as_int("seed", seed, 0)
        self._layers: list[list[Tensor]] = [list(m.parameters()) for m in layers]
        owned = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        seen: set[int] = set()
        for i, ps in enumerate(self._layers):
            for p in ps:
                if id(p) in seen:
                    raise ValueError(f"LISA: model_layers[{i}] shares a parameter with an "
                                     f"earlier layer")
                if id(p) not in owned:
                    raise ValueError(f"LISA: model_layers[{i}] has a parameter of shape "
                                     f"{tuple(p.shape)} that the optimizer does not hold")
                seen.add(id(p))
        self._always = [p for m in always for p in m.parameters()]
        for p in self._always:
            if id(p) in seen:
                raise ValueError(f"LISA: an `always` module shares a parameter of shape "
                                 f"{tuple(p.shape)} with model_layers")
            p.requires_grad_(True)
        self._gen = torch.Generator(device="cpu").manual_seed(self.seed)
        self.num_steps = 0
        self.active: list[int] = []
        self._switch()

    # ---------------------------------------------------------------- sampling
    def _sample(self) -> list[int]:
        perm = torch.randperm(len(self._layers), generator=self._gen)
        return sorted(int(i) for i in perm[:self.n_active])

    def _switch(self) -> None:
        self._apply(self._sample())

    def _apply(self, active: list[int]) -> None:
        self.active = list(active)
        on = set(self.active)
        for i, ps in enumerate(self._layers):
            for p in ps:
                p.requires_grad_(i in on)
                if i not in on:
                    p.grad = None
                    self.optimizer.state.pop(p, None)  # re-created if sampled again

    def step(self) -> None:
        """Count one optimisation step; resample the active blocks every ``period`` steps."""
        self.num_steps += 1
        if self.num_steps % self.period == 0:
            self._switch()

    # -------------------------------------------------------------- reporting
    def trainable_parameters(self) -> list[Tensor]:
        """Parameters of the active blocks plus the always-trainable ones."""
        return [p for i in self.active for p in self._layers[i]] + list(self._always)

    # ------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """The generator state, active set, step count and settings (tensors and ints only,
        loadable with ``torch.load(weights_only=True)``)."""
        return {"rng_state": self._gen.get_state(), "active": list(self.active),
                "num_steps": self.num_steps, "n_active": self.n_active, "period": self.period,
                "seed": self.seed, "num_layers": len(self._layers)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` and apply its active set (load the optimizer's
        state dict as well; it holds no state for the frozen blocks)."""
        if int(state["num_layers"]) != len(self._layers):
            raise ValueError(f"LISA: checkpoint has {state['num_layers']} layers, this LISA "
                             f"{len(self._layers)}")
        self.n_active = int(state["n_active"])
        self.period = int(state["period"])
        self.seed = int(state["seed"])
        self.num_steps = int(state["num_steps"])
        self._gen.set_state(state["rng_state"])
        self._apply([int(i) for i in state["active"]])

    def __repr__(self) -> str:
        return (f"LISA(n_active={self.n_active} of {len(self._layers)}, period={self.period}, "
                f"active={self.active}, step={self.num_steps})")
