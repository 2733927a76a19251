"""GaLoreAdafactor's signature is composed from Adafactor's and GaLoreAdamW's argument lists
(one list per family): help() still shows every argument, calls bind as to a function."""

from __future__ import annotations

import inspect
import pydoc

import pytest
import torch

from matrixopt.optim import Adafactor, GaLoreAdafactor, GaLoreAdamW

EXPECTED = (
    "params, lr, eps, clip_threshold, decay_rate, beta1, weight_decay, scale_parameter, "
    "relative_step, warmup_init, *, min_dim_size_to_factor, beta2_cap, momentum_dtype, "
    "state_dtype, rank, update_proj_gap, scale, proj_type, projector, on_refresh, residual, "
    "residual_granularity, norm_growth_limit, stagger, seed, matrix_view, proj_dtype, "
    "nonfinite, external_lr")


def _names(sig: inspect.Signature) -> str:
    out = []
    for p in sig.parameters.values():
        if p.kind is inspect.Parameter.KEYWORD_ONLY and "*" not in out:
            out.append("*")
        out.append(p.name)
    return ", ".join(out)


def test_signature_lists_every_argument_with_the_families_defaults() -> None:
    sig = inspect.signature(GaLoreAdafactor)
    assert _names(sig) == EXPECTED
    ada = inspect.signature(Adafactor).parameters
    gal = inspect.signature(GaLoreAdamW).parameters
    for name, p in sig.parameters.items():
        src = ada.get(name) or gal[name]
        assert (p.default, p.annotation) == (src.default, src.annotation), name
    doc = pydoc.render_doc(GaLoreAdafactor, renderer=pydoc.plaintext)
    assert "norm_growth_limit: 'float | None' = 1.01" in doc and "external_lr" in doc


def test_calls_bind_like_a_function() -> None:
    w = torch.nn.Parameter(torch.randn(8, 6))
    opt = GaLoreAdafactor([w], 1e-3, (1e-30, 1e-3), None, rank=2, stagger=1)
    g = opt.param_groups[0]
    assert (g["lr"], g["clip_threshold"], g["rank"], g["stagger"], g["scale"]) == \
        (1e-3, None, 2, 1, 0.25)
    with pytest.raises(TypeError, match="bogus"):
        GaLoreAdafactor([w], bogus=1)
    with pytest.raises(TypeError):
        GaLoreAdafactor([w], 1e-3, lr=1e-2)  # given twice
    with pytest.raises(TypeError):
        GaLoreAdafactor([w], 1e-3, (1e-30, 1e-3), None, -0.8, None, 0.0, True, True, False, 1)
