"""Checkpoints: conversion on load, CPU counters, rejection of foreign state, converters.

Regression tests for issue 13 (items 1, 2, 6, 3, 14) and issue 15 (items 5, 6, 7):
``differentiable`` never enters a group; Python-number counters load and step;
counters stay CPU tensors with their saved dtype (also for ``cuda`` parameters
under ``FakeTensorMode``); foreign or malformed state is rejected naming the
parameter and key; a torch.optim.Muon checkpoint's keys are translated; the
torch Muon + AdamW pair merges into one Muon; Adafactor's lr works with every
torch scheduler and Hugging Face's ``AdafactorSchedule``.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from optim_registry import weights_only_copy
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode

import matrixopt
from matrixopt.optim import (
    SOAP,
    Adafactor,
    CheckpointError,
    Dion,
    GaLoreAdafactor,
    GaLoreAdamW,
    GroupError,
    Muon,
    NonFiniteGradientError,
    Shampoo,
    from_hf_adafactor,
    from_torch_adafactor,
    merge_state_dicts,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def params(*shapes: tuple[int, ...], seed: int = 0) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def run(opt: torch.optim.Optimizer, ps: list[Tensor], steps: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


# each maker: (optimizer over ps) for a 2-D matrix and a vector; GaLore refreshes every 2 steps
MAKERS = {
    "muon": lambda ps: Muon(ps, lr=0.02),
    "galore_adamw": lambda ps: GaLoreAdamW([{"params": ps[:1], "rank": 2, "update_proj_gap": 2},
                                            {"params": ps[1:]}], lr=1e-2),
    "galore_adafactor": lambda ps: GaLoreAdafactor([{"params": ps[:1], "rank": 2,
                                                     "update_proj_gap": 2},
                                                    {"params": ps[1:]}]),
    "adafactor": lambda ps: Adafactor(ps),
    "soap": lambda ps: SOAP(ps, lr=1e-2, precondition_frequency=2),
    "shampoo": lambda ps: Shampoo(ps, lr=1e-2, precondition_frequency=2,
                                  start_preconditioning_step=1),
    "dion": lambda ps: Dion(ps, lr=0.02, rank=2),
}
SHAPES = ((8, 6), (6,))


# ---------------------------------------------------------------------------
# 13.1 differentiable
# ---------------------------------------------------------------------------
def test_issue_reproduction_no_differentiable_key_after_load():
    p = nn.Parameter(torch.randn(4, 4))
    p.grad = torch.randn(4, 4)
    a = matrixopt.Muon([p])
    a.step()
    b = matrixopt.Muon([p])
    b.load_state_dict(a.state_dict())
    assert set(b.state_dict()["param_groups"][0]) == set(a.state_dict()["param_groups"][0])
    assert "differentiable" not in b.param_groups[0]


@pytest.mark.parametrize("name", MAKERS)
def test_add_param_group_rejects_differentiable_after_reload(name):
    ps = params(*SHAPES)
    opt = MAKERS[name](ps)
    opt.load_state_dict(opt.state_dict())  # torch adds defaults["differentiable"] here
    extra = nn.Parameter(torch.randn(3, 3))
    with pytest.raises(GroupError, match="differentiable"):
        opt.add_param_group({"params": [extra], "differentiable": True})
    with pytest.raises(GroupError, match="foreach"):
        opt.add_param_group({"params": [extra], "foreach": True})


def test_checkpoint_saved_with_differentiable_false_loads_without_it():
    ps = params(*SHAPES)
    opt = Muon(ps, lr=0.02)
    run(opt, ps, 1)
    sd = opt.state_dict()
    sd["param_groups"][0]["differentiable"] = False  # what the bug wrote into checkpoints
    other = Muon(ps, lr=0.02)
    other.load_state_dict(sd)
    assert "differentiable" not in other.param_groups[0]


# ---------------------------------------------------------------------------
# 13.2 Python-number counters
# ---------------------------------------------------------------------------
def _numbers(sd: dict[str, Any], as_type: type) -> dict[str, Any]:
    out = copy.deepcopy(sd)
    for st in out["state"].values():
        for k in ("step", "iteration", "refresh_step", "refresh_offset", "seed"):
            if k in st:
                st[k] = as_type(st[k].item())
    return out


@pytest.mark.parametrize("as_type", [int, float], ids=["int", "float"])
@pytest.mark.parametrize("name", MAKERS)
def test_number_counters_load_and_resume_identically(name, as_type):
    ps = params(*SHAPES)
    opt = MAKERS[name](ps)
    run(opt, ps, 3)
    sd = weights_only_copy(opt.state_dict())
    results = []
    for state_dict in (sd, _numbers(sd, as_type)):
        qs = [nn.Parameter(p.detach().clone()) for p in ps]
        other = MAKERS[name](qs)
        other.load_state_dict(state_dict)
        for q in qs:
            for k in ("step", "iteration", "refresh_step", "refresh_offset", "seed"):
                if k in other.state[q]:
                    v = other.state[q][k]
                    assert isinstance(v, Tensor) and v.device.type == "cpu"
                    assert v.dtype == (torch.float32 if k == "step" else torch.int64), k
        run(other, qs, 3, seed=2)  # crosses a GaLore refresh
        results.append(qs)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_non_integer_float_for_an_int_counter_is_rejected():
    ps = params(*SHAPES)
    opt = MAKERS["galore_adamw"](ps)
    run(opt, ps, 1)
    sd = opt.state_dict()
    sd["state"][0]["iteration"] = 1.5
    with pytest.raises(CheckpointError, match=r"param_groups\[0\]\['params'\]\[0\].*'iteration'"):
        MAKERS["galore_adamw"](ps).load_state_dict(sd)


# ---------------------------------------------------------------------------
# 13.6 counters stay on the CPU with their saved dtype, copied
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", MAKERS)
def test_counters_are_cpu_copies_with_saved_dtype(name):
    ps = params(*SHAPES)
    opt = MAKERS[name](ps)
    run(opt, ps, 3)
    sd = weights_only_copy(opt.state_dict())
    a, b = MAKERS[name](ps), MAKERS[name](ps)
    a.load_state_dict(sd)
    b.load_state_dict(sd)
    for pid, p in enumerate(ps):
        for k, v in sd["state"][pid].items():
            if k in ("step", "iteration", "refresh_step", "refresh_offset", "seed"):
                got = a.state[p][k]
                assert got.device.type == "cpu" and got.dtype == v.dtype, k
                assert got is not v and got is not b.state[p][k], f"{k} shared with the dict"


@pytest.mark.parametrize("name", MAKERS)
def test_counters_stay_on_cpu_for_cuda_parameters_under_fake_mode(name):
    ps = params(*SHAPES)
    opt = MAKERS[name](ps)
    run(opt, ps, 3)
    sd = opt.state_dict()
    with FakeTensorMode(allow_non_fake_inputs=True):
        qs = [nn.Parameter(torch.empty(s, device="cuda")) for s in SHAPES]
        other = MAKERS[name](qs)
        other.load_state_dict(sd)
        for q in qs:
            for k, v in other.state[q].items():
                if k in ("step", "iteration", "refresh_step", "refresh_offset", "seed"):
                    assert v.device.type == "cpu", f"{k} on {v.device}"
                    assert v.dtype == (torch.float32 if k == "step" else torch.int64)
                else:
                    assert v.device.type == "cuda", f"{k} on {v.device}"


# ---------------------------------------------------------------------------
# 13.14 foreign or malformed checkpoints
# ---------------------------------------------------------------------------
def test_issue_reproduction_adamw_state_into_muon_is_rejected():
    q = nn.Parameter(torch.randn(4, 4))
    q.grad = torch.randn(4, 4)
    adamw = torch.optim.AdamW([q])
    adamw.step()
    with pytest.raises(CheckpointError) as e:
        Muon([q]).load_state_dict(adamw.state_dict())
    msg = str(e.value)
    assert "param_groups[0]['params'][0] (shape (4, 4))" in msg
    assert "'step'" in msg or "'exp_avg'" in msg
    assert "merge_state_dicts" in msg and "docs/migration.md" in msg


def test_adamw_state_loads_into_muons_adamw_path():
    """torch.optim.AdamW state is what Muon's AdamW path keeps: it loads, translated."""
    p = nn.Parameter(torch.randn(6))
    adamw = torch.optim.AdamW([p], lr=3e-3, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.0)
    run(adamw, [p], 2)
    q = nn.Parameter(p.detach().clone())
    ours = Muon([q], lr=0.1)
    ours.load_state_dict(weights_only_copy(adamw.state_dict()))
    g = ours.param_groups[0]
    assert (g["lr"], g["betas"], g["eps"], g["weight_decay"]) == (3e-3, (0.8, 0.9), 1e-6, 0.0)
    assert not {"amsgrad", "foreach", "fused", "maximize"} & set(g)
    run(adamw, [p], 2, seed=5)
    run(ours, [q], 2, seed=5)
    torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


def test_amsgrad_state_is_rejected():
    p = nn.Parameter(torch.randn(6))
    adamw = torch.optim.AdamW([p], amsgrad=True)
    run(adamw, [p], 1)
    with pytest.raises(CheckpointError, match="amsgrad"):
        Muon([p]).load_state_dict(adamw.state_dict())


class GaLoreProjector:  # what galore-torch stores in its state (a Python object)
    def __init__(self) -> None:
        self.rank = 2


def test_galore_torch_state_is_rejected_with_pointer():
    ps = params(*SHAPES)
    opt = MAKERS["galore_adamw"](ps)
    run(opt, ps, 1)
    sd = opt.state_dict()
    sd["state"][0] = {"step": 1, "exp_avg": torch.zeros(8, 2), "exp_avg_sq": torch.zeros(8, 2),
                      "projector": GaLoreProjector()}
    with pytest.raises(CheckpointError) as e:
        MAKERS["galore_adamw"](ps).load_state_dict(sd)
    msg = str(e.value)
    assert "'projector' holds a GaLoreProjector" in msg and "galore-torch" in msg
    assert "param_groups[0]['params'][0] (shape (8, 6))" in msg


def _hf_adafactor_state(ps: list[nn.Parameter], **kw: Any) -> tuple[Any, dict[str, Any]]:
    hf_mod = pytest.importorskip("transformers.optimization")
    hps = [nn.Parameter(p.detach().clone()) for p in ps]
    hf = hf_mod.Adafactor(hps, **kw)
    run(hf, hps, 3)
    return hps, weights_only_copy(hf.state_dict())


def test_hf_adafactor_state_is_rejected_then_converted():
    ps = params((16, 8), (8,), (5, 12))
    kw = dict(lr=1e-3, relative_step=False, scale_parameter=False, beta1=0.9, weight_decay=0.01)
    hps, hf_sd = _hf_adafactor_state(ps, **kw)
    qs = [nn.Parameter(p.detach().clone()) for p in hps]
    ours = Adafactor(qs, **kw)
    with pytest.raises(CheckpointError, match="from_hf_adafactor"):
        ours.load_state_dict(hf_sd)
    ours.load_state_dict(from_hf_adafactor(hf_sd, ours))
    hf_mod = pytest.importorskip("transformers.optimization")
    hf = hf_mod.Adafactor(hps, **kw)
    hf.load_state_dict(hf_sd)
    run(hf, hps, 3, seed=9)
    run(ours, qs, 3, seed=9)
    for a, b in zip(hps, qs):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_from_hf_adafactor_refuses_tensors_factored_differently():
    conv = nn.Parameter(torch.randn(8, 4, 3, 3))  # HF: last two dims; ours: the two largest
    hf_sd = {"state": {0: {"step": 2, "exp_avg_sq_row": torch.ones(8, 4, 3),
                           "exp_avg_sq_col": torch.ones(8, 4, 3), "RMS": torch.tensor(1.0)}},
             "param_groups": [{"params": [0]}]}
    with pytest.raises(CheckpointError, match=r"shape \(8, 4, 3, 3\)"):
        from_hf_adafactor(hf_sd, Adafactor([conv]))


def test_torch_adafactor_state_is_rejected_then_converted():
    ps = params((16, 8), (8,), (3, 5, 12))
    tps = [nn.Parameter(p.detach().clone()) for p in ps]
    theirs = torch.optim.Adafactor(tps)
    run(theirs, tps, 3)
    sd = weights_only_copy(theirs.state_dict())
    qs = [nn.Parameter(p.detach().clone()) for p in tps]
    ours = Adafactor(qs)
    with pytest.raises(CheckpointError, match="from_torch_adafactor"):
        ours.load_state_dict(sd)
    ours.load_state_dict(from_torch_adafactor(sd, ours))
    run(theirs, tps, 3, seed=4)
    run(ours, qs, 3, seed=4)
    for a, b in zip(tps, qs):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", MAKERS)
def test_unknown_state_key_and_non_tensor_are_rejected(name):
    ps = params(*SHAPES)
    opt = MAKERS[name](ps)
    run(opt, ps, 1)
    sd = opt.state_dict()
    bad = copy.deepcopy(sd)
    bad["state"][1]["velocity"] = torch.zeros(6)
    with pytest.raises(CheckpointError, match=r"param_groups\[\d\]\['params'\]\[\d\] \(shape "
                                              r"\(6,\)\) has state key 'velocity'"):
        MAKERS[name](ps).load_state_dict(bad)
    bad = copy.deepcopy(sd)
    key = next(k for k in bad["state"][1] if k != "step")
    bad["state"][1][key] = [0.0] * 6
    with pytest.raises(CheckpointError, match=f"'{key}' holds a list, not a tensor"):
        MAKERS[name](ps).load_state_dict(bad)


_MOMENT = {"muon": "momentum_buffer", "adafactor": "exp_avg_sq_row", "soap": "exp_avg_sq",
           "shampoo": "graft_sq", "dion": "momentum_buffer"}


@pytest.mark.parametrize("name", _MOMENT)
def test_wrong_moment_shape_is_rejected(name):
    ps = params(*SHAPES)
    opt = MAKERS[name](ps)
    run(opt, ps, 1)
    sd = opt.state_dict()
    key = _MOMENT[name]
    sd["state"][0][key] = sd["state"][0][key].reshape(-1)
    with pytest.raises(CheckpointError, match=f"'{key}' has shape"):
        MAKERS[name](ps).load_state_dict(sd)


@pytest.mark.parametrize(("name", "key", "path"), [
    ("soap", "momentum_buffer", "SOAP's preconditioned update"),
    ("shampoo", "exp_avg_sq", "Shampoo's preconditioned update"),
    ("dion", "exp_avg", "Dion's low-rank orthonormal update"),
    ("soap", "factor_0", "SOAP's AdamW path"),
    ("dion", "Q", "Dion's AdamW path")])
def test_another_paths_state_key_is_rejected(name, key, path):
    """A key that exists, but on the other path (a matrix's AdamW moment, a vector's
    preconditioner factor), names the path that would never read it."""
    ps = params(*SHAPES)
    opt = MAKERS[name](ps)
    run(opt, ps, 2)
    sd = opt.state_dict()
    pid = 1 if "AdamW" in path else 0
    sd["state"][pid][key] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=f"'{key}', which {path} does not use"):
        MAKERS[name](ps).load_state_dict(sd)


@pytest.mark.parametrize("name", ["soap", "shampoo", "dion"])
def test_unknown_group_key_is_rejected_by_the_new_optimizers(name):
    ps = params(*SHAPES)
    sd = MAKERS[name](ps).state_dict()
    sd["param_groups"][0]["dampening"] = 0.0
    with pytest.raises(CheckpointError, match=r"param_groups\[0\].*'dampening'"):
        MAKERS[name](ps).load_state_dict(sd)


def test_unknown_group_key_is_rejected():
    ps = params(*SHAPES)
    opt = Muon(ps)
    sd = opt.state_dict()
    sd["param_groups"][0]["dampening"] = 0.0  # torch.optim.SGD's
    with pytest.raises(CheckpointError, match=r"param_groups\[0\].*'dampening'"):
        Muon(ps).load_state_dict(sd)


def test_load_pre_hook_can_convert_a_foreign_format():
    """Validation runs after the user's load pre-hooks, so a hook may fix the dict."""
    ps = params(*SHAPES)
    tps = [nn.Parameter(p.detach().clone()) for p in ps]
    theirs = torch.optim.Adafactor(tps)
    run(theirs, tps, 2)
    ours = Adafactor(ps)
    ours.register_load_state_dict_pre_hook(lambda opt, sd: from_torch_adafactor(sd, opt))
    ours.load_state_dict(theirs.state_dict())
    assert torch.equal(ours.state[ps[0]]["exp_avg_sq_row"], theirs.state[tps[0]]["row_var"])


# ---------------------------------------------------------------------------
# 15.6 torch.optim.Muon keys translated, its eps dropped
# ---------------------------------------------------------------------------
def test_torch_muon_checkpoint_keys_are_translated():
    p = nn.Parameter(torch.randn(6, 10))
    theirs = torch.optim.Muon([p], lr=0.03, weight_decay=0.05, momentum=0.9, nesterov=False,
                              ns_coefficients=(3.4, -4.7, 2.0), ns_steps=6, eps=1e-5,
                              adjust_lr_fn="match_rms_adamw")
    run(theirs, [p], 1)
    q = nn.Parameter(p.detach().clone())
    ours = Muon([q], eps=1e-9, betas=(0.8, 0.9), ns_dtype=torch.float32)
    ours.load_state_dict(weights_only_copy(theirs.state_dict()))
    g = ours.param_groups[0]
    assert (g["lr"], g["weight_decay"], g["momentum"], g["nesterov"]) == (0.03, 0.05, 0.9, False)
    assert g["coefficients"] == (3.4, -4.7, 2.0) and g["ns_steps"] == 6
    assert g["adjust_lr"] == "match_rms_adamw"
    assert g["eps"] == 1e-9, "torch's Newton-Schulz eps must not become the AdamW eps"
    assert g["betas"] == (0.8, 0.9) and g["ns_dtype"] == torch.float32
    assert not {"ns_coefficients", "adjust_lr_fn"} & set(g)
    # it then steps exactly like a matrixopt Muon constructed with those settings
    r = nn.Parameter(p.detach().clone())
    direct = Muon([r], lr=0.03, weight_decay=0.05, momentum=0.9, nesterov=False,
                  coefficients=(3.4, -4.7, 2.0), ns_steps=6, adjust_lr="match_rms_adamw",
                  ns_dtype=torch.float32)
    direct.state[r]["momentum_buffer"] = theirs.state[p]["momentum_buffer"].clone()
    run(ours, [q], 2, seed=3)
    run(direct, [r], 2, seed=3)
    assert torch.equal(q, r)


def test_torch_muon_default_adjust_lr_fn_none_is_original():
    p = nn.Parameter(torch.randn(6, 10))
    theirs = torch.optim.Muon([p])
    run(theirs, [p], 1)
    ours = Muon([p])
    ours.load_state_dict(theirs.state_dict())
    assert ours.param_groups[0]["adjust_lr"] == "original"
    assert ours.param_groups[0]["coefficients"] == "keller"


def test_kellerjordan_groups_are_translated():
    ps = params((8, 6), (6,))
    ours = Muon([{"params": ps[:1]}, {"params": ps[1:]}])
    kj_sd = {"state": {1: {"step": 3, "exp_avg": torch.zeros(6), "exp_avg_sq": torch.zeros(6)}},
             "param_groups": [{"params": [0], "lr": 0.02, "momentum": 0.95, "weight_decay": 0.0,
                               "use_muon": True},
                              {"params": [1], "lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-10,
                               "weight_decay": 0.0, "use_muon": False}]}
    ours.load_state_dict(kj_sd)
    g0, g1 = ours.param_groups
    assert (g0["algorithm"], g0["adjust_lr"], g0["coefficients"]) == ("muon", "original", "keller")
    assert (g1["algorithm"], g1["eps"], g1["betas"]) == ("adamw", 1e-10, (0.9, 0.95))
    assert ours.state[ps[1]]["step"].dtype == torch.float32
    run(ours, ps, 1)


# ---------------------------------------------------------------------------
# 15.5 torch.optim.Muon + torch.optim.AdamW -> one Muon
# ---------------------------------------------------------------------------
def _torch_pair(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 8),
                          nn.LayerNorm(8), nn.Linear(8, 20))
    hidden = [model[1].weight, model[3].weight]
    rest = [p for p in model.parameters() if all(p is not h for h in hidden)]
    tm = torch.optim.Muon(hidden, lr=0.02, weight_decay=0.01)
    ta = torch.optim.AdamW(rest, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.01)

    def loss() -> Tensor:
        x = torch.randint(0, 20, (4, 6), generator=torch.Generator().manual_seed(seed))
        return nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())

    for _ in range(3):
        loss().backward()
        tm.step()
        ta.step()
        tm.zero_grad()
        ta.zero_grad()
    return model, hidden, rest, tm, ta


@pytest.mark.parametrize("form", ["live", "pairs"])
def test_merge_state_dicts_torch_muon_and_adamw(form):
    model, hidden, rest, tm, ta = _torch_pair()
    opt = Muon([{"params": hidden, "algorithm": "muon"}, {"params": rest, "algorithm": "adamw"}])
    sources = (tm, ta) if form == "live" else ((weights_only_copy(tm.state_dict()), hidden),
                                               (weights_only_copy(ta.state_dict()), rest))
    sd = merge_state_dicts(opt, *sources)
    opt.load_state_dict(weights_only_copy(sd))
    for p in hidden:
        assert torch.equal(opt.state[p]["momentum_buffer"], tm.state[p]["momentum_buffer"])
        assert opt.state[p]["momentum_buffer"] is not tm.state[p]["momentum_buffer"]
    for p in rest:
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][k], ta.state[p][k]), k
        assert opt.state[p]["step"] is not ta.state[p]["step"]
    gm, ga = opt.param_groups
    assert (gm["lr"], gm["weight_decay"], gm["adjust_lr"], gm["coefficients"]) == (
        0.02, 0.01, "original", "keller")
    assert (ga["lr"], ga["betas"], ga["weight_decay"], ga["eps"]) == (3e-3, (0.9, 0.95), 0.01,
                                                                        1e-8)
    # the AdamW part continues as torch's AdamW (same math, float round-off only); the Muon
    # part as torch's Muon (bf16 iteration: round-off)
    before = {id(p): p.detach().clone() for p in model.parameters()}
    twin = copy.deepcopy(model)
    twin_params = dict(zip([id(p) for p in model.parameters()], twin.parameters()))
    g = torch.Generator().manual_seed(11)
    grads = {id(p): torch.randn(p.shape, generator=g) for p in model.parameters()}
    for p in model.parameters():
        p.grad = grads[id(p)].clone()
    opt.step()
    tw_hidden = [twin_params[id(p)] for p in hidden]
    tw_rest = [twin_params[id(p)] for p in rest]
    tm2 = torch.optim.Muon(tw_hidden, lr=0.02, weight_decay=0.01)
    ta2 = torch.optim.AdamW(tw_rest, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.01)
    tm2.load_state_dict(weights_only_copy(tm.state_dict()))
    ta2.load_state_dict(weights_only_copy(ta.state_dict()))
    for p in model.parameters():
        twin_params[id(p)].grad = grads[id(p)].clone()
    tm2.step()
    ta2.step()
    for p in rest:
        torch.testing.assert_close(p, twin_params[id(p)], rtol=1e-6, atol=1e-7)
    for p in hidden:
        moved = (twin_params[id(p)] - before[id(p)]).abs().max()
        assert (p - twin_params[id(p)]).abs().max() < 0.05 * moved


def test_merge_state_dicts_names_a_parameter_routed_differently():
    model, hidden, rest, tm, ta = _torch_pair()
    wrong = [{"params": hidden[:1], "algorithm": "muon"},
             {"params": hidden[1:] + rest, "algorithm": "adamw"}]
    opt = Muon(wrong)
    with pytest.raises(CheckpointError, match=r"param_groups\[1\]\['params'\]\[0\] \(shape "
                                              r"\(8, 12\)\) was trained by torch.optim.Muon"):
        merge_state_dicts(opt, tm, ta)


def test_merge_state_dicts_rejects_foreign_parameters_and_duplicates():
    _, hidden, rest, tm, ta = _torch_pair()
    opt = Muon([{"params": hidden, "algorithm": "muon"}])
    with pytest.raises(CheckpointError, match="does not have"):
        merge_state_dicts(opt, tm, ta)
    with pytest.raises(CheckpointError, match="two sources"):
        merge_state_dicts(opt, tm, tm)


def test_merge_with_muon_param_groups_routing():
    model, hidden, rest, tm, ta = _torch_pair()
    opt = Muon(matrixopt.muon_param_groups(model))
    opt.load_state_dict(merge_state_dicts(opt, tm, ta))
    run(opt, list(model.parameters()), 1)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------------------
# 15.7 public exception names
# ---------------------------------------------------------------------------
def test_exceptions_are_public():
    assert matrixopt.optim.GroupError is GroupError and issubclass(GroupError, ValueError)
    assert issubclass(NonFiniteGradientError, FloatingPointError)
    assert issubclass(CheckpointError, ValueError)
    with pytest.raises(matrixopt.optim.GroupError):
        Muon([nn.Parameter(torch.randn(2, 2))], momentum=1.5)


# ---------------------------------------------------------------------------
# 13.3 Adafactor's lr and the schedulers
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [Adafactor, GaLoreAdafactor])
def test_adafactor_lr_default_is_a_number(cls):
    opt = cls([nn.Parameter(torch.randn(4, 4))])
    assert opt.defaults["lr"] == 1e-2 and opt.param_groups[0]["external_lr"] is True
    hf = cls([nn.Parameter(torch.randn(4, 4))], lr=None)
    assert hf.param_groups[0]["lr"] == 1e-2 and hf.param_groups[0]["external_lr"] is False
    grouped = cls([{"params": [nn.Parameter(torch.randn(4, 4))], "lr": None}])
    assert grouped.param_groups[0]["external_lr"] is False
    with pytest.raises(GroupError, match="lr"):
        cls([nn.Parameter(torch.randn(4, 4))], lr=None, relative_step=False)


def _hf_trajectory(kw: dict[str, Any], steps: int = 12) -> list[Tensor]:
    hf_mod = pytest.importorskip("transformers.optimization")
    ps = params((16, 8), (8,), seed=3)
    run(hf_mod.Adafactor(ps, **kw), ps, steps)
    return ps


@pytest.mark.parametrize("kw", [
    {},
    {"scale_parameter": False},
    {"warmup_init": True},
    {"beta1": 0.9, "weight_decay": 0.1},
], ids=["default", "no-scale", "warmup-init", "beta1-wd"])
def test_adafactor_default_lr_steps_equal_hf_lr_none(kw):
    """Hugging Face's lr=None configurations: ours with the default lr=1e-2, with lr=None,
    and (warmup_init) with any lr give Hugging Face's steps."""
    theirs = _hf_trajectory({"lr": None, **kw})
    variants = [{}, {"lr": None}] + ([{"lr": 0.5}] if kw.get("warmup_init") else [])
    for extra in variants:
        ps = params((16, 8), (8,), seed=3)
        run(Adafactor(ps, **kw, **extra), ps, 12)
        for a, b in zip(theirs, ps):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def _train_with(make_sched, steps: int = 6, **kw: Any) -> tuple[list[Tensor], Any]:
    ps = params((16, 8), (8,), seed=3)
    opt = Adafactor(ps, **kw)
    sched = make_sched(opt)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        sched.step()
    return ps, opt


def _moved(a: list[Tensor], b: list[Tensor]) -> bool:
    return any(not torch.equal(x, y) for x, y in zip(a, b))


def test_adafactor_with_torch_schedulers():
    base, _ = _train_with(lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1.0))
    # StepLR halves the cap every step: from the second step on, the cap binds (lr < 1/sqrt t)
    half, opt = _train_with(lambda o: torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.5))
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5 ** 6)
    assert _moved(base, half)
    # lr=None (HF's rule): a scheduler changes lr but not the steps
    ignored, opt = _train_with(lambda o: torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.5),
                               lr=None)
    assert not _moved(base, ignored)


def test_adafactor_with_transformers_linear_schedule():
    tr = pytest.importorskip("transformers")
    ps, opt = _train_with(lambda o: tr.get_linear_schedule_with_warmup(o, 2, 10))
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * (10 - 6) / (10 - 2))
    assert all(torch.isfinite(p).all() for p in ps)


@pytest.mark.parametrize("warmup_init", [False, True])
def test_adafactor_with_hf_adafactor_schedule(warmup_init):
    hf_mod = pytest.importorskip("transformers.optimization")
    hps = params((16, 8), (8,), seed=3)
    hf = hf_mod.Adafactor(hps, lr=None, warmup_init=warmup_init)
    hsched = hf_mod.AdafactorSchedule(hf)
    g = torch.Generator().manual_seed(1)
    grads = [[torch.randn(p.shape, generator=g) for p in hps] for _ in range(6)]
    for gs in grads:
        for p, gr in zip(hps, gs):
            p.grad = gr.clone()
        hf.step()
        hsched.step()
    ps = params((16, 8), (8,), seed=3)
    opt = Adafactor(ps, lr=None, warmup_init=warmup_init)
    sched = hf_mod.AdafactorSchedule(opt)
    for gs in grads:
        for p, gr in zip(ps, gs):
            p.grad = gr.clone()
        opt.step()
        sched.step()
    for a, b in zip(hps, ps):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    # the logged step size: Hugging Face's uses the RMS before the last step, ours after it
    assert sched.get_last_lr()[0] == pytest.approx(float(hsched.get_last_lr()[0]), rel=1e-2)


def test_hf_adafactor_schedule_on_a_group_that_reads_lr_raises():
    hf_mod = pytest.importorskip("transformers.optimization")
    ps = params((16, 8), seed=3)
    opt = Adafactor(ps)  # lr=1e-2 caps the relative step: the proxy would rescale it
    sched = hf_mod.AdafactorSchedule(opt)
    run(opt, ps, 1)
    with pytest.raises(ValueError, match="lr=None"):
        sched.step()


def test_galore_adafactor_has_hf_get_lr():
    ps = params((16, 8), (8,))
    opt = GaLoreAdafactor([{"params": ps[:1], "rank": 2}, {"params": ps[1:]}], lr=None)
    run(opt, ps, 2)
    lr = opt._get_lr(opt.param_groups[0], opt.state[ps[0]])
    rms = ps[0].detach().square().mean().sqrt().item()
    assert lr == pytest.approx(1e-2 * max(1e-3, rms))
    assert math.isfinite(opt._get_lr(opt.param_groups[1], opt.state[ps[1]]))


def test_bad_hyperparameter_in_checkpoint_is_rejected_before_loading():
    ps = params(*SHAPES)
    opt = Muon(ps)
    run(opt, ps, 1)
    sd = opt.state_dict()
    sd["param_groups"][0]["momentum"] = 1.5
    other = Muon(ps)
    with pytest.raises(CheckpointError, match=r"param_groups\[0\]: momentum must be < 1.0"):
        other.load_state_dict(sd)
    assert not other.state and other.param_groups[0]["momentum"] == 0.95  # nothing loaded


def test_old_adafactor_checkpoint_with_lr_none_loads_as_hf_rule():
    ps = params(*SHAPES)
    opt = Adafactor(ps, lr=None)
    run(opt, ps, 1)
    sd = opt.state_dict()
    sd["param_groups"][0]["lr"] = None  # what matrixopt saved before lr defaulted to 1e-2
    del sd["param_groups"][0]["external_lr"]
    other = Adafactor(ps)
    other.load_state_dict(sd)
    assert other.param_groups[0]["lr"] == 1e-2 and other.param_groups[0]["external_lr"] is False


def test_real_galore_torch_state_dict_is_rejected():
    galore_torch = pytest.importorskip("galore_torch")
    ps = params(*SHAPES)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # galore-torch's deprecation warning
        theirs = galore_torch.GaLoreAdamW([{"params": ps[:1], "rank": 2, "update_proj_gap": 5,
                                            "scale": 0.25, "proj_type": "std"},
                                           {"params": ps[1:]}], lr=1e-2)
        run(theirs, ps, 2)
    with pytest.raises(CheckpointError, match="galore-torch") as e:
        MAKERS["galore_adamw"](ps).load_state_dict(theirs.state_dict())
    assert "param_groups[0]" in str(e.value) and "correct_bias" in str(e.value)


def test_galore_adafactor_default_lr_steps_equal_lr_none():
    runs = []
    for kw in ({}, {"lr": None}):
        ps = params(*SHAPES)
        opt = GaLoreAdafactor([{"params": ps[:1], "rank": 2, "update_proj_gap": 2},
                               {"params": ps[1:]}], **kw)
        run(opt, ps, 5)
        runs.append(ps)
    for a, b in zip(*runs):
        assert torch.equal(a, b)
