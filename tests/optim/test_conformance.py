"""What PyTorch's own optimizer tests check, run on every registry configuration.

torch's ``test/test_optim.py`` drives each ``OptimizerInfo`` of
``torch.testing._internal.common_optimizers`` through generic checks. The
tests themselves are not shipped with torch (only the database is), and its
``OptimizerInfo`` entries describe torch's keyword sets (``foreach``,
``fused``, ``maximize``, ...), so they cannot be pointed at our classes as they
are. This file re-implements the checks ``test_registry.py`` does not
already run (it covers loss, dtypes, weights-only round trip, bit-identical
resume, grads, schedulers, add_param_group) and runs torch's generic error
inputs (``get_error_inputs_for_all_optims``) and its Muon/Adafactor input
configurations (``optim_inputs_func_muon``/``_adafactor``, keys translated)
against our classes:

* ``state_dict`` deterministic: identical keys and values after
  ``load_state_dict`` into a fresh optimizer, into itself, after
  ``copy.deepcopy`` and after pickling (torch's ``test_state_dict_deterministic``,
  ``test_deepcopy_copies_all_public_attrs``); the copies then train identically;
* ``add_param_group`` rejects unknown and torch-only keys;
* step pre/post hooks (per instance and global), ``state_dict`` and
  ``load_state_dict`` pre/post hooks (torch's ``test_step_*hook*``,
  ``test_state_dict_*hook*``, ``test_load_state_dict_*hook*``);
* ``zero_grad(set_to_none=...)``.
"""

from __future__ import annotations

import builtins
import copy
import os
import pickle
import subprocess
import sys
from typing import Any

import pytest
import torch
from optim_registry import REGISTRY, OptimInfo, loss_at, make_problem, weights_only_copy
from torch import Tensor, nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from matrixopt.optim import (
    SOAP,
    Adafactor,
    Dion,
    GaLoreAdafactor,
    GaLoreAdamW,
    GroupError,
    Muon,
    Shampoo,
)

IDS = [i.name for i in REGISTRY]
CLASSES = [Muon, GaLoreAdamW, GaLoreAdafactor, Adafactor, SOAP, Shampoo, Dion]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, start: int = 0) -> None:
    for t in range(start, start + steps):
        opt.zero_grad()
        loss_at(model, t).backward()
        opt.step()


def assert_identical(a: Any, b: Any, where: str = "state_dict") -> None:
    """Exact equality: same keys (nothing masked), values, dtypes, devices."""
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor), where
        assert (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device), \
            f"{where}: {a.dtype}{tuple(a.shape)}@{a.device} vs {b.dtype}{tuple(b.shape)}@{b.device}"
        assert torch.equal(a, b), f"{where}: values differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), \
            f"{where}: keys differ: {sorted(map(str, set(a) ^ set(b)))}"
        for k in a:
            assert_identical(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b and type(a) is type(b), f"{where}: {a!r} vs {b!r}"


def trained(info: OptimInfo, steps: int = 4) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = make_problem(info.problem)
    opt = info.make(model)
    train(model, opt, steps)  # crosses a GaLore refresh (update_proj_gap=3)
    return model, opt


def same_params(a: nn.Module, b: nn.Module, name: str) -> None:
    for (n, x), y in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(x, y), f"{name}: {n} differs"


# ---------------------------------------------------------------------------
# state_dict determinism, deepcopy, pickle
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("info", REGISTRY, ids=IDS)
def test_state_dict_deterministic(info: OptimInfo) -> None:
    model, opt = trained(info)
    sd = opt.state_dict()
    fresh = info.make(model)
    fresh.load_state_dict(weights_only_copy(sd))
    assert_identical(sd, fresh.state_dict())
    fresh.load_state_dict(fresh.state_dict())  # into itself, twice
    fresh.load_state_dict(fresh.state_dict())
    assert_identical(sd, fresh.state_dict())
    assert all("differentiable" not in g for g in fresh.param_groups)


@pytest.mark.parametrize("info", REGISTRY, ids=IDS)
def test_deepcopy_and_pickle_train_identically(info: OptimInfo) -> None:
    model, opt = trained(info)
    copies = [copy.deepcopy((model, opt)), pickle.loads(pickle.dumps((model, opt)))]
    for _, o in copies:
        assert type(o) is type(opt)
        assert_identical(opt.state_dict(), o.state_dict())
        # torch's __setstate__ adds defaults["differentiable"] (never a group key)
        assert {k: v for k, v in o.defaults.items() if k != "differentiable"} == opt.defaults
    train(model, opt, 4, start=4)
    for how, (m, o) in zip(("deepcopy", "pickle"), copies):
        train(m, o, 4, start=4)
        same_params(model, m, f"{info.name} after {how}")
        assert_identical(opt.state_dict(), o.state_dict(), f"{how} state_dict")


# ---------------------------------------------------------------------------
# add_param_group
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("info", REGISTRY, ids=IDS)
def test_add_param_group_rejects_unknown_and_torch_only_keys(info: OptimInfo) -> None:
    model, opt = trained(info, steps=1)
    opt.load_state_dict(opt.state_dict())  # torch adds defaults["differentiable"] here
    for key, value in (("foo", 1), ("differentiable", True), ("foreach", True),
                       ("fused", True), ("maximize", True), ("capturable", True)):
        with pytest.raises(GroupError, match=key):
            opt.add_param_group({"params": [nn.Parameter(torch.randn(3, 3))], key: value})
    assert len(opt.param_groups) == len(info.make(model).param_groups)


# ---------------------------------------------------------------------------
# hooks and zero_grad
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("info", REGISTRY, ids=IDS)
def test_step_hooks(info: OptimInfo) -> None:
    model = make_problem(info.problem)
    opt = info.make(model)
    calls: list[str] = []
    h1 = opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(
        "pre" if o is opt and all(p.grad is None or torch.isfinite(p.grad).all()
                                  for g in o.param_groups for p in g["params"]) else "bad"))
    h2 = opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    g1 = register_optimizer_step_pre_hook(
        lambda o, args, kwargs: calls.append("global-pre") if o is opt else None)
    g2 = register_optimizer_step_post_hook(
        lambda o, args, kwargs: calls.append("global-post") if o is opt else None)
    try:
        train(model, opt, 2)
    finally:
        g1.remove()
        g2.remove()
    assert calls == ["global-pre", "pre", "post", "global-post"] * 2
    h1.remove()
    h2.remove()
    train(model, opt, 1, start=2)
    assert len(calls) == 8


@pytest.mark.parametrize("info", REGISTRY, ids=IDS)
def test_state_dict_and_load_state_dict_hooks(info: OptimInfo) -> None:
    model, opt = trained(info, steps=2)
    seen: list[str] = []
    opt.register_state_dict_pre_hook(lambda o: seen.append("sd-pre"))

    def sd_post(o: Any, sd: dict[str, Any]) -> dict[str, Any]:
        seen.append("sd-post")
        sd["extra"] = "note"  # a post hook may return a modified dict
        return sd

    opt.register_state_dict_post_hook(sd_post)
    sd = opt.state_dict()
    assert seen == ["sd-pre", "sd-post"] and sd["extra"] == "note"

    other = info.make(model)

    def load_pre(o: Any, sd: dict[str, Any]) -> dict[str, Any]:
        seen.append("load-pre")
        sd = dict(sd)
        sd.pop("extra", None)  # the hook runs before the checks: it may fix the dict
        return sd

    def load_post(o: Any) -> None:
        # the post hook sees the final state: saved dtypes, counters on the CPU
        assert all(v.device.type == "cpu" for st in o.state.values() for k, v in st.items()
                   if k in ("step", "iteration", "refresh_step", "refresh_offset", "seed"))
        seen.append("load-post")

    other.register_load_state_dict_pre_hook(load_pre)
    other.register_load_state_dict_post_hook(load_post)
    other.load_state_dict(weights_only_copy(sd))
    assert seen[2:] == ["load-pre", "load-post"]
    del sd["extra"]
    assert_identical(sd, {k: v for k, v in other.state_dict().items()})
    other.load_state_dict(other.state_dict())  # hooks run once per load, not twice
    assert seen[4:] == ["load-pre", "load-post"]


@pytest.mark.parametrize("info", REGISTRY[:1] + [i for i in REGISTRY if i.cls is not Muon][:3],
                         ids=lambda i: i.name)
@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(info: OptimInfo, set_to_none: bool) -> None:
    model, opt = trained(info, steps=1)
    loss_at(model, 1).backward()
    opt.zero_grad(set_to_none=set_to_none)
    for g in opt.param_groups:
        for p in g["params"]:
            if set_to_none:
                assert p.grad is None
            else:
                assert p.grad is None or (p.grad == 0).all()


# ---------------------------------------------------------------------------
# torch's own inputs
# ---------------------------------------------------------------------------
# torch.testing._internal.common_optimizers imports torch's test utilities, which
# need expecttest and, at import, switch torch.backends' global flags off for the
# whole process: read the inputs in a subprocess, once, and bring them back pickled.
_READ_TORCH_INPUTS = """
import sys, torch
import torch.testing._internal.common_optimizers as tco
def plain(i):
    return dict(params=i.params, kwargs=i.kwargs, desc=i.desc)
errors = [dict(plain(e.optimizer_error_input), error_type=e.error_type.__name__,
               error_regex=e.error_regex, on_construction=(
                   e.error_on == tco.OptimizerErrorEnum.CONSTRUCTION_ERROR))
          for e in tco.get_error_inputs_for_all_optims("cpu", torch.float32)]
configs = {"Muon": [plain(i) for i in tco.optim_inputs_func_muon("cpu")],
           "Adafactor": [plain(i) for i in tco.optim_inputs_func_adafactor("cpu")]}
torch.save({"errors": errors, "configs": configs}, sys.argv[1])
"""


@pytest.fixture(scope="module")
def torch_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pytest.importorskip("expecttest", reason="torch's optimizer test database needs expecttest "
                                             "(the test extra)")
    out = tmp_path_factory.mktemp("torch_inputs") / "inputs.pt"
    subprocess.run([sys.executable, "-c", _READ_TORCH_INPUTS, str(out)], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    return torch.load(out, weights_only=False)  # our own file, written just now


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_torch_generic_error_inputs(cls: type, torch_inputs: dict[str, Any]) -> None:
    """torch's error inputs for every optimizer (``get_error_inputs_for_all_optims``).
    Where torch only warns (a duplicate parameter within a group) matrixopt raises
    GroupError; where the error comes from our own validation (tensor lr, duplicates
    across groups) the type matches and our message names the key / the groups;
    otherwise (raised by torch's Optimizer base) torch's own message."""
    errors = torch_inputs["errors"]
    assert len(errors) >= 5
    for err in copy.deepcopy(errors):  # constructors fill defaults into given group dicts
        params = err["params"] if err["params"] is not None else [nn.Parameter(torch.randn(2, 2))]
        if err["error_type"] == "UserWarning":
            with pytest.raises(GroupError, match="appears twice"):
                cls(params, **err["kwargs"])
            continue
        assert err["on_construction"], err["desc"]
        with pytest.raises(getattr(builtins, err["error_type"])) as e:
            cls(params, **err["kwargs"])
        if "lr" in err["kwargs"]:
            assert "lr" in str(e.value), err["desc"]
        elif "more than one" in err["error_regex"]:
            assert "already in param_groups[0]" in str(e.value), err["desc"]
        else:
            assert e.match(err["error_regex"]), err["desc"]


def _translate(cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    rename = ({"ns_coefficients": "coefficients"} if cls is Muon
              else {"beta2_decay": "decay_rate", "d": "clip_threshold"})
    return {rename.get(k, k): v for k, v in kwargs.items()}


@pytest.mark.parametrize("cls", [Muon, Adafactor], ids=lambda c: c.__name__)
def test_torch_optimizer_input_configs(cls: type, torch_inputs: dict[str, Any]) -> None:
    """torch's Muon/Adafactor configurations (``optim_inputs_func_*``), keys translated:
    each constructs, trains and round-trips; ``maximize`` has no matrixopt counterpart
    (a constructor keyword torch has, matrixopt not) and is rejected by name."""
    configs = torch_inputs["configs"][cls.__name__]
    assert len(configs) >= 5
    for cfg in copy.deepcopy(configs):
        kwargs = _translate(cls, cfg["kwargs"])
        model = make_problem("mlp")
        if "maximize" in kwargs:
            with pytest.raises(TypeError, match="maximize"):
                cls(model.parameters(), **kwargs)
            continue
        opt = cls(model.parameters(), **kwargs)
        before = [p.detach().clone() for p in model.parameters()]
        train(model, opt, 3)
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters())), cfg["desc"]
        assert all(torch.isfinite(p).all() for p in model.parameters()), cfg["desc"]
        other = cls(model.parameters(), **kwargs)
        other.load_state_dict(weights_only_copy(opt.state_dict()))
        assert_identical(opt.state_dict(), other.state_dict(), cfg["desc"])
