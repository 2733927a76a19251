"""The per-step math of every matrixopt optimizer as pure functions on local tensors.

As torch.optim's ``adamw()`` beside ``AdamW``: each function takes lists of plain
tensors (parameters, gradients, state tensors) and scalars, updates in place what
its name ends in ``_`` says, and never sees an optimizer, a parameter group, a
state dict or a DTensor. The optimizer classes collect the lists, own the state
layout and the validation, and pick a distribution strategy; the math is here,
usable on its own and tested against float64 references.
"""

from .adam import adam_direction, adam_moments_, adamw_, bias_corrections, step_value

__all__ = ["adamw_", "adam_moments_", "adam_direction", "bias_corrections", "step_value"]
