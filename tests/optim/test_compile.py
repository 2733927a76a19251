"""A compiled optimizer step must not recompile at every step (issue 13, item 13).

Each configuration runs 20 steps of ``torch.compile(opt.step)`` with a backend
that counts the graphs it is handed and runs them with ``aot_eager`` (AOT
autograd, no code generation; a backend running ``gm.forward`` directly lets the
float guards pass unnoticed on this build: measured, [5, 1, 0, ...] before the fix);
``new[k]`` is the number of graphs compiled during step ``k``. Step-dependent
scalars (Adam's bias corrections, Adafactor's relative step and β̂₂) are tensors
while tracing (``_adamw.step_value``), so no guard on their value exists: after
the first two steps (state creation, then the first step on existing state) no
step compiles anything. Had a scalar stayed a Python float, every step would
compile a graph until dynamo's ``recompile_limit`` (8) and then silently run
eagerly -- the counts read ``[5, 1, 1, 1, 1, 1, 1, 1, 0, ...]`` for Muon's AdamW path
and Adafactor before this was fixed (``torch.compile(opt.step, backend="aot_eager")``,
torch 2.13 CPU).

GaLore refreshes run Python control flow on CPU counters (which matrices refresh,
the random seeds) and build random generators; ``_GaLoreBase._refresh`` runs
eagerly under ``torch.compile`` (``torch.compiler.disable``: once per
``update_proj_gap`` steps), so refresh steps compile nothing new either. Before,
GaLoreAdamW compiled ``[26, 11, 0, 0, 15, 0, 0, 0, 8, 0, 0, 0, 4, ...]`` graphs
(a refresh every 4 steps) until dynamo's recompile limit stopped it.

Muon's matrices are orthogonalised by code with graph breaks inside loops
(matrixopt.linalg: CPU-only checks and cached coefficient tables); with a graph
break, a step whose gradients are *new* tensors (``zero_grad(set_to_none=True)``)
recompiles, so the Muon and GaLore cases reuse the gradient tensors
(``set_to_none=False`` style); the AdamW path and Adafactor get new gradient
tensors every step, as with torch's default ``zero_grad``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch._dynamo
from torch._dynamo.backends.debugging import aot_eager

from matrixopt.optim import Adafactor, GaLoreAdafactor, GaLoreAdamW, Muon

STEPS = 20
SHAPES = [(16, 8), (8, 16), (8,)]
GAP = 4  # GaLore refreshes at steps 0, 4, 8, 12, 16 (offset 0 for each shape)


def _params() -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def _galore(cls: Any, **kw: Any) -> Callable[[list[torch.nn.Parameter]], Any]:
    return lambda ps: cls([{"params": ps[:2], "rank": 2, "update_proj_gap": GAP},
                           {"params": ps[2:]}], **kw)


CONFIGS: dict[str, tuple[Callable[[list[torch.nn.Parameter]], Any], bool]] = {
    # name: (make, new gradient tensors every step)
    "muon": (lambda ps: Muon(ps, lr=0.02), False),
    "muon-adamw-path": (lambda ps: Muon(ps, lr=0.02, algorithm="adamw"), True),
    "adafactor": (lambda ps: Adafactor(ps), True),
    "adafactor-lr-beta1-wd": (lambda ps: Adafactor(ps, lr=1e-2, relative_step=False,
                                                   beta1=0.9, weight_decay=0.1), True),
    "galore-adamw": (_galore(GaLoreAdamW, lr=1e-2), False),
    "galore-adafactor": (_galore(GaLoreAdafactor), False),
}


def graphs_per_step(name: str) -> tuple[list[int], list[torch.Tensor]]:
    make, new_grads = CONFIGS[name]
    torch._dynamo.reset()
    count = [0]

    def counting_backend(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        count[0] += 1
        return aot_eager(gm, example_inputs)

    ps = _params()
    opt = make(ps)

    # the bound method itself, as a user compiles it
    step = torch.compile(opt.step, backend=counting_backend)

    g = torch.Generator().manual_seed(1)
    new: list[int] = []
    for _ in range(STEPS):
        for p in ps:
            grad = torch.randn(p.shape, generator=g)
            if new_grads or p.grad is None:
                p.grad = grad
            else:
                p.grad.copy_(grad)
        before = count[0]
        step()
        new.append(count[0] - before)
    return new, ps


def _eager(name: str) -> list[torch.Tensor]:
    make, _ = CONFIGS[name]
    ps = _params()
    opt = make(ps)
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return ps


@pytest.mark.parametrize("name", CONFIGS)
def test_no_recompilation_after_the_first_steps(name: str) -> None:
    new, ps = graphs_per_step(name)
    assert new[0] > 0, "the counting backend saw no graph: nothing was compiled"
    # GaLore: refreshes at steps 0, 4, 8, 12, 16 included
    assert new[2:] == [0] * (STEPS - 2), new
    # and the compiled steps compute what the eager ones do
    for p, q in zip(ps, _eager(name)):
        # (bias corrections in float32 tensors while compiling, float64 floats in eager)
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
