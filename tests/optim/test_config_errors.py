"""Construction-time errors: every invalid hyperparameter raises a GroupError that
names the group index, the key and the value (one case per error)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from matrixopt.optim import Adafactor, GaLoreAdafactor, GaLoreAdamW, Muon
from matrixopt.optim._common import GroupError

NAN = float("nan")

# (optimizer, extra keys of group 1 that make it valid, bad key, bad value)
CASES = [
    # Muon
    (Muon, {}, "lr", -1e-3), (Muon, {}, "lr", NAN), (Muon, {}, "lr", "0.1"),
    (Muon, {}, "momentum", 1.0), (Muon, {}, "momentum", -0.1),
    (Muon, {}, "weight_decay", -0.1), (Muon, {}, "nesterov", 1),
    (Muon, {}, "eps", -1e-8), (Muon, {}, "betas", (0.9,)), (Muon, {}, "betas", (1.0, 0.9)),
    (Muon, {}, "betas", (0.9, -0.5)), (Muon, {}, "normuon_beta2", 1.0),
    (Muon, {}, "adjust_lr", "rms"), (Muon, {}, "ns_method", "qr"),
    (Muon, {}, "ns_backend", "cuda"), (Muon, {}, "ns_steps", 0), (Muon, {}, "split", 0),
    (Muon, {}, "normalization", "l1"), (Muon, {}, "cautious_wd", "yes"),
    (Muon, {}, "nonfinite", "warn"),
    # Adafactor
    (Adafactor, {}, "lr", -1.0), (Adafactor, {}, "beta1", 1.0), (Adafactor, {}, "beta1", -0.1),
    (Adafactor, {}, "eps", (-1e-30, 1e-3)), (Adafactor, {}, "decay_rate", 0.5),
    (Adafactor, {}, "clip_threshold", -1.0), (Adafactor, {}, "weight_decay", -0.1),
    (Adafactor, {}, "beta2_cap", 1.0), (Adafactor, {}, "min_dim_size_to_factor", 0),
    (Adafactor, {}, "scale_parameter", None), (Adafactor, {}, "nonfinite", "zero"),
    # GaLoreAdamW
    (GaLoreAdamW, {"rank": 2}, "lr", -1e-3), (GaLoreAdamW, {"rank": 2}, "betas", (0.9, 1.0)),
    (GaLoreAdamW, {"rank": 2}, "betas", (-0.1, 0.999)), (GaLoreAdamW, {"rank": 2}, "eps", -1e-8),
    (GaLoreAdamW, {"rank": 2}, "weight_decay", -1.0), (GaLoreAdamW, {}, "rank", 0),
    (GaLoreAdamW, {}, "rank", -1), (GaLoreAdamW, {"rank": 2}, "update_proj_gap", 0),
    (GaLoreAdamW, {"rank": 2}, "update_proj_gap", -5), (GaLoreAdamW, {"rank": 2}, "scale", -0.25),
    (GaLoreAdamW, {"rank": 2}, "proj_type", "diag"), (GaLoreAdamW, {"rank": 2}, "seed", -1),
    (GaLoreAdamW, {"rank": 2}, "projector", "qr"), (GaLoreAdamW, {"rank": 2}, "nonfinite", 0),
    # GaLoreAdafactor
    (GaLoreAdafactor, {"rank": 2}, "beta1", 1.5), (GaLoreAdafactor, {}, "rank", 0),
    (GaLoreAdafactor, {"rank": 2}, "update_proj_gap", 0),
    (GaLoreAdafactor, {"rank": 2}, "on_refresh", "rotate"),
    (GaLoreAdafactor, {"rank": 2}, "nonfinite", "SKIP"),
]


@pytest.mark.parametrize("cls, extra, key, value", CASES,
                         ids=[f"{c.__name__}-{k}-{v!r}" for c, _, k, v in CASES])
def test_invalid_value_names_group_key_and_value(cls, extra, key, value):
    a, b = nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(4, 4))
    with pytest.raises(GroupError) as info:
        cls([{"params": [a]}, {"params": [b], **extra, key: value}])
    msg = str(info.value)
    assert f"{cls.__name__}: param_groups[1]" in msg
    assert key in msg
    shown = repr(value) if not isinstance(value, tuple) else None
    if shown is not None and key != "betas":
        assert shown in msg
    elif key == "betas":
        assert any(repr(float(v)) in msg for v in value) or repr(value) in msg


@pytest.mark.parametrize("cls", [Muon, Adafactor, GaLoreAdamW, GaLoreAdafactor])
def test_duplicate_parameter_across_groups(cls):
    a, b = nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(3, 5))
    with pytest.raises(GroupError,
                       match=rf"{cls.__name__}: param_groups\[1\]\['params'\]\[1\] \(shape "
                             rf"\(4, 4\)\) is already in param_groups\[0\]"):
        cls([{"params": [a]}, {"params": [b, a]}])


@pytest.mark.parametrize("cls", [Muon, Adafactor, GaLoreAdamW, GaLoreAdafactor])
def test_duplicate_parameter_within_group_and_via_add_param_group(cls):
    a, b = nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(3, 5))
    with pytest.raises(GroupError, match=r"param_groups\[0\]\['params'\]\[2\].*twice"):
        cls([a, b, a])
    opt = cls([a])
    with pytest.raises(GroupError, match=r"param_groups\[1\]\['params'\]\[0\].*param_groups\[0\]"):
        opt.add_param_group({"params": a})
    opt.add_param_group({"params": iter([b])})  # generators still work
    assert opt.param_groups[1]["params"] == [b]


def test_duplicate_detected_with_named_parameters():
    model = nn.Linear(4, 3)
    with pytest.raises(GroupError, match=r"param_groups\[1\]\['params'\]\[0\].*param_groups\[0\]"):
        Muon([{"params": list(model.named_parameters())},
              {"params": [("again", model.weight)]}])
    opt = Muon(model.named_parameters())  # no duplicates: fine
    assert opt.param_groups[0]["param_names"] == ["weight", "bias"]
