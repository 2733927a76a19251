"""Registry of every matrixopt optimizer configuration the generic suite checks.

In the spirit of PyTorch's ``OptimizerInfo`` (torch/testing/_internal/common_optimizers.py):
one :class:`OptimInfo` per (optimizer, configuration), each run through the same
checks in ``test_registry.py``. Adding an optimizer or a configuration is one
line in :data:`REGISTRY`.

The problems are tiny on purpose (a few hundred parameters): the suite checks
contracts (dtype, state_dict, resume, grads, schedulers), not convergence speed.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from matrixopt.optim import (
    SOAP,
    Adafactor,
    Dion,
    GaLoreAdafactor,
    GaLoreAdamW,
    Muon,
    Shampoo,
    muon_param_groups,
    soap_param_groups,
)

# ---------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------
IN_FEATURES, OUT_FEATURES = 8, 4


class Experts(nn.Module):
    """A stack of ``E`` expert matrices applied to the same input (a 3-D parameter)."""

    def __init__(self, e: int, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(e, d_in, d_out) / d_in**0.5)

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("bi,eio->bo", x, self.weight) / self.weight.shape[0]


class Problem(nn.Module):
    """``kind``: ``"mlp"`` (2-D weights + biases), ``"conv"`` (a 4-D conv weight) or
    ``"experts"`` (a 3-D stacked-matrix parameter). Every kind also owns a parameter
    that never receives a gradient (``unused``) and one whose gradient is always
    zero (``dead``), so every check also covers those two cases."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        if kind == "mlp":
            self.body: nn.Module = nn.Sequential(nn.Linear(IN_FEATURES, 16), nn.Tanh())
            width = 16
        elif kind == "conv":
            self.body = nn.Sequential(nn.Unflatten(1, (2, 2, 2)),
                                      nn.Conv2d(2, 6, 3, padding=1), nn.Tanh(), nn.Flatten())
            width = 6 * 2 * 2
        elif kind == "experts":
            self.body = nn.Sequential(Experts(3, IN_FEATURES, 12), nn.Tanh())
            width = 12
        else:
            raise ValueError(f"unknown problem kind {kind!r}")
        self.head = nn.Linear(width, OUT_FEATURES)
        self.unused = nn.Linear(6, 5)            # never in the graph: grad stays None
        self.dead = nn.Parameter(torch.randn(OUT_FEATURES, 6) * 0.1)  # grad always 0

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x)) + 0.0 * (self.dead.sum())


def make_problem(kind: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> Problem:
    torch.manual_seed(seed)
    return Problem(kind).to(dtype)


def batch(step: int, dtype: torch.dtype = torch.float32, n: int = 32) -> tuple[Tensor, Tensor]:
    """Deterministic data for step ``step`` from a fixed random teacher."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(n, IN_FEATURES, generator=g)
    teacher = torch.randn(IN_FEATURES, OUT_FEATURES, generator=torch.Generator().manual_seed(7))
    y = torch.tanh(x @ teacher)
    return x.to(dtype), y.to(dtype)


def weights_only_copy(sd: dict[str, Any]) -> dict[str, Any]:
    """``sd`` through ``torch.save`` / ``torch.load(weights_only=True)``."""
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def loss_at(model: nn.Module, step: int) -> Tensor:
    x, y = batch(step, next(model.parameters()).dtype)
    return nn.functional.mse_loss(model(x).float(), y.float())


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class OptimInfo:
    """One optimizer configuration.

    Attributes:
        name: test id.
        cls: the optimizer class.
        kwargs: constructor keywords (the group defaults).
        problem: which :class:`Problem` kind it runs on.
        params: builds the ``params`` argument from the model (default: all
            parameters as one group).
        uses_lr: whether the step size follows ``group["lr"]`` (False for
            Adafactor's ``relative_step``, where ``lr`` is ``None``); the
            scheduler checks only run when it does.
        momentum_carries_lr: the momentum accumulates lr-scaled updates
            (Adafactor's ``beta1``), so lr = 0 does not stop the weights at once.
        tiny_first_steps: the first steps are below bf16's resolution
            (Adafactor ``warmup_init``: step 1e-6 * t), so bf16 weights do not move
            in the few steps of the dtype check.
        decrease_steps / decrease_to: the loss check asks for
            ``loss(decrease_steps) < decrease_to * loss(0)``.
    """

    name: str
    cls: type[torch.optim.Optimizer]
    kwargs: dict[str, Any] = field(default_factory=dict)
    problem: str = "mlp"
    params: Callable[[nn.Module], Any] | None = None
    uses_lr: bool = True
    momentum_carries_lr: bool = False
    tiny_first_steps: bool = False
    decrease_steps: int = 40
    decrease_to: float = 0.7

    def make(self, model: nn.Module, **overrides: Any) -> torch.optim.Optimizer:
        params = self.params(model) if self.params is not None else model.parameters()
        return self.cls(params, **{**self.kwargs, **overrides})


# GaLore: a refresh every 3 steps so the refresh path (and resume across it) is
# exercised within the few steps each check runs.
_GALORE = {"lr": 1e-2, "rank": 2, "update_proj_gap": 3, "stagger": 1}
_GALORE_AF = {"rank": 2, "update_proj_gap": 3, "stagger": 1}

def _capped(kind: str, max_sv: float) -> Callable[[nn.Module], Any]:
    """Groups with the base-class weight constraint on the matrices (issue 17 item 4); a
    cap above the initial weights' Schatten-8 norms, so lr = 0 leaves them unchanged."""
    def params(model: nn.Module) -> Any:
        mats = [p for p in model.parameters() if p.ndim >= 2]
        rest = [p for p in model.parameters() if p.ndim < 2]
        return [{"params": mats, "weight_constraint": kind, "max_sv": max_sv},
                {"params": rest}]
    return params


REGISTRY: list[OptimInfo] = [
    # -- Muon ---------------------------------------------------------------
    OptimInfo("muon-default", Muon, {"lr": 0.02}),
    OptimInfo("muon-nesterov-off", Muon, {"lr": 0.02, "nesterov": False}),
    OptimInfo("muon-normuon", Muon, {"lr": 0.02, "normuon": True}),
    OptimInfo("muon-cautious-wd", Muon, {"lr": 0.02, "cautious_wd": True, "weight_decay": 0.5}),
    *[OptimInfo(f"muon-adjust-{mode}", Muon, {"lr": 0.02 if mode != "none" else 0.05,
                                                  "adjust_lr": mode})
      for mode in ("original", "spectral", "none")],
    OptimInfo("muon-fp32-ns", Muon, {"lr": 0.02, "ns_dtype": torch.float32}),
    OptimInfo("muon-param-groups", Muon, {"lr": 0.02}, params=muon_param_groups),
    OptimInfo("muon-conv", Muon, {"lr": 0.02}, problem="conv"),
    OptimInfo("muon-3d-experts", Muon, {"lr": 0.02}, problem="experts"),
    # -- Muon with the cheap operators (matrixopt.linalg.operators) ----------
    *[OptimInfo(f"muon-{op.replace('_', '-')}", Muon, {"lr": 0.02, "orthogonalizer": op})
      for op in ("auon", "hybrid_auon", "racs")],
    # -- GaLoreAdamW: projector x on_refresh x residual, all 36 (a random basis learns slower)
    *[OptimInfo(f"galore-adamw-{proj}-{refresh}-{res}", GaLoreAdamW,
                {**_GALORE, "projector": proj, "on_refresh": refresh, "residual": res},
                decrease_to=0.9 if proj == "random" else 0.7)
      for proj, refresh, res in itertools.product(("warm", "rsvd", "svd", "random"),
                                                  ("transport", "reset", "keep"),
                                                  (None, "fira", "apollo"))],
    OptimInfo("galore-adamw-full", GaLoreAdamW, dict(_GALORE, proj_type="full"),
              decrease_to=0.9),  # an r x r core: slower per step
    OptimInfo("galore-adamw-conv", GaLoreAdamW, _GALORE, problem="conv"),
    OptimInfo("galore-adamw-3d-experts", GaLoreAdamW, _GALORE, problem="experts"),
    # -- Natural GaLore (GaLoreAdamW natural=True): 2-D and a 3-D stack
    OptimInfo("galore-adamw-natural", GaLoreAdamW,
              dict(_GALORE, natural=True, natural_window=4)),
    OptimInfo("galore-adamw-natural-3d-experts", GaLoreAdamW,
              dict(_GALORE, natural=True, natural_window=3), problem="experts"),
    # -- GaLoreAdafactor ----------------------------------------------------
    OptimInfo("galore-adafactor-default", GaLoreAdafactor, _GALORE_AF, uses_lr=False,
              decrease_steps=60, decrease_to=0.9),
    OptimInfo("galore-adafactor-lr-beta1", GaLoreAdafactor,
              dict(_GALORE_AF, lr=1e-2, relative_step=False, scale_parameter=False, beta1=0.9),
              momentum_carries_lr=True),
    OptimInfo("galore-adafactor-fira", GaLoreAdafactor,
              dict(_GALORE_AF, lr=1e-2, relative_step=False, scale_parameter=False,
                   residual="fira")),
    # -- Adafactor ----------------------------------------------------------
    OptimInfo("adafactor-relative-step", Adafactor, {}, uses_lr=False,
              decrease_steps=60, decrease_to=0.9),
    OptimInfo("adafactor-warmup-init", Adafactor, {"warmup_init": True}, uses_lr=False,
              tiny_first_steps=True, decrease_steps=60, decrease_to=0.999),
    OptimInfo("adafactor-lr", Adafactor,
              {"lr": 1e-2, "relative_step": False, "scale_parameter": False}),
    OptimInfo("adafactor-beta1", Adafactor,
              {"lr": 1e-2, "relative_step": False, "scale_parameter": False, "beta1": 0.9},
              momentum_carries_lr=True),
    OptimInfo("adafactor-unfactored", Adafactor,
              {"lr": 1e-2, "relative_step": False, "scale_parameter": False,
                   "min_dim_size_to_factor": 10_000}),
    OptimInfo("adafactor-weight-decay", Adafactor,
              {"lr": 1e-2, "relative_step": False, "weight_decay": 0.1}),
    OptimInfo("adafactor-conv", Adafactor, {"lr": 1e-2, "relative_step": False}, problem="conv"),
    # -- Dion ---------------------------------------------------------------
    OptimInfo("dion-quarter-rank", Dion, {"lr": 0.02, "rank_fraction": 0.25}),
    OptimInfo("dion-param-groups-householder-rms", Dion,
              {"lr": 0.01, "rank": 2, "qr_method": "qr", "adjust_lr": "match_rms_adamw"},
              params=muon_param_groups),
    OptimInfo("dion-conv", Dion, {"lr": 0.02}, problem="conv"),
    OptimInfo("dion-3d-experts", Dion, {"lr": 0.02, "rank_fraction": 0.5}, problem="experts"),
    # -- weight constraints (base class, issue 17) ----------------------------
    OptimInfo("muon-spectral-cap", Muon, {"lr": 0.02}, params=_capped("spectral_cap", 2.0)),
    OptimInfo("muon-spectral-soft-cap", Muon, {"lr": 0.02},
              params=_capped("spectral_soft_cap", 2.0)),
    OptimInfo("adafactor-spectral-cap", Adafactor, {"lr": 1e-2, "relative_step": False},
              params=_capped("spectral_cap", 2.0)),
    # -- SOAP (a refresh every 3 steps, so resume crosses one) ----------------
    OptimInfo("soap-default", SOAP, {"lr": 1e-2, "precondition_frequency": 3}),
    OptimInfo("soap-param-groups", SOAP, {"lr": 1e-2, "precondition_frequency": 3},
              params=soap_param_groups),
    OptimInfo("soap-one-sided-stagger", SOAP, {"lr": 1e-2, "precondition_frequency": 3,
                                               "max_precond_dim": 8, "stagger_refresh": True}),
    OptimInfo("soap-all-soap-1d", SOAP, {"lr": 1e-2, "precondition_frequency": 3,
                                         "algorithm": "soap", "precondition_1d": True}),
    OptimInfo("soap-conv-merge", SOAP, {"lr": 1e-2, "precondition_frequency": 3,
                                        "merge_dims": True}, problem="conv"),
    OptimInfo("soap-3d-experts", SOAP, {"lr": 1e-2, "precondition_frequency": 3},
              problem="experts"),
    # -- Shampoo: a refresh every 3 steps from step 2 (refresh, stale and MKOR steps
    # all run within each check's few steps)
    *[OptimInfo(f"shampoo-{name}", Shampoo,
                {"lr": 1e-2, "epsilon": 1e-4, "precondition_frequency": 3,
                 "start_preconditioning_step": 2, **kw}, problem=problem, params=params)
      for name, kw, problem, params in (
          ("default", {}, "mlp", None),
          ("blocked-newton-rmsprop", {"max_preconditioner_dim": 3, "root_method": "newton",
                                      "newton_iters": 12,
                                      "grafting": "rmsprop"}, "mlp", None),
          ("mkor-3d-experts-blocked", {"inverse_update": "mkor", "max_preconditioner_dim": 4},
           "experts", None),
          ("conv-adagrad-int8-param-groups", {"betas": (0.9, 1.0), "grafting": "adagrad",
                                              "state_dtype": "int8"}, "conv",
           muon_param_groups))],
]

_names = [i.name for i in REGISTRY]
assert len(_names) == len(set(_names)), "OptimInfo names must be unique"
