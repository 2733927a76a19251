"""Generic contract checks run on every configuration in ``optim_registry.REGISTRY``.

Each check is written once and parametrised over the registry, as PyTorch's
OptimizerInfo-driven ``test/test_optim.py``: decreasing loss, dtype preservation
(fp32, bf16), state_dict round trip through ``torch.load(weights_only=True)``,
bit-identical resume, no ``p.grad`` mutation, zero-grad and missing-grad
parameters, lr scheduler interaction and ``add_param_group``.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from optim_registry import REGISTRY, OptimInfo, loss_at, make_problem, weights_only_copy
from torch import Tensor, nn

IDS = [i.name for i in REGISTRY]
LR_INFOS = [i for i in REGISTRY if i.uses_lr]
# lr = 0 freezes the weights only when no momentum of past (lr-scaled) updates is
# applied: Adafactor's beta1 momentum accumulates alpha_t * U_t (as in the paper).
FREEZE_INFOS = [i for i in LR_INFOS if not i.momentum_carries_lr]
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: intra-op threads only add overhead, and on a loaded 2-core
    # machine they oversubscribe the cores (measured 30x slower steps).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, start: int = 0,
          sched: Any = None, extra: Any = None) -> None:
    for t in range(start, start + steps):
        opt.zero_grad()
        loss = loss_at(model, t)
        if extra is not None:
            loss = loss + extra()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()


# torch's Optimizer.__setstate__ adds ``differentiable`` to the defaults on load
# (and MatrixOptimizer copies defaults into the groups): not a matrixopt setting.
_TORCH_LOAD_KEYS = {"differentiable"}


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Recursive exact equality (values and dtypes) of state_dict-like structures."""
    if isinstance(a, dict) and isinstance(b, dict):
        a = {k: v for k, v in a.items() if k not in _TORCH_LOAD_KEYS}
        b = {k: v for k, v in b.items() if k not in _TORCH_LOAD_KEYS}
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{tuple(a.shape)} " \
                                                          f"vs {b.dtype}{tuple(b.shape)}"
        assert torch.equal(a, b), f"{where}: values differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {set(a)} vs {set(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("info", REGISTRY, ids=IDS)
def test_decreases_loss(info: OptimInfo) -> None:
    model = make_problem(info.problem)
    opt = info.make(model)
    with torch.no_grad():
        first = loss_at(model, 0).item()
    for _ in range(info.decrease_steps):
        opt.zero_grad()
        loss_at(model, 0).backward()  # full batch: the same data every step
        opt.step()
    with torch.no_grad():
        last = loss_at(model, 0).item()
    assert last < info.decrease_to * first, f"{info.name}: loss {first:.4g} -> {last:.4g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("info", REGISTRY, ids=IDS)
def test_preserves_param_dtype(info: OptimInfo, dtype: torch.dtype) -> None:
    model = make_problem(info.problem, dtype)
    before = snapshot(model)
    opt = info.make(model)
    train(model, opt, 4)
    for name, p in model.named_parameters():
        assert p.dtype == dtype, f"{name}: {p.dtype}"
        assert torch.isfinite(p).all(), name
    if dtype == torch.float32 or not info.tiny_first_steps:
        assert not torch.equal(model.head.weight, before["head.weight"]), "no training happened"
    for st in opt.state.values():
        for k, v in st.items():
            assert isinstance(v, Tensor), f"state[{k!r}] is a {type(v).__name__}, not a tensor"
            assert torch.isfinite(v.float()).all() if v.is_floating_point() else True, k


@pytest.mark.parametrize("info", REGISTRY, ids=IDS)
def test_state_dict_round_trip_weights_only(info: OptimInfo) -> None:
    model = make_problem(info.problem)
    opt = info.make(model)
    train(model, opt, 4)
    sd = opt.state_dict()
    loaded = weights_only_copy(sd)
    assert_same(sd, loaded, "weights_only load")
    other = info.make(model)
    other.load_state_dict(loaded)
    assert_same(sd, other.state_dict(), "after load_state_dict")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("info", REGISTRY, ids=IDS)
def test_resume_is_bit_identical(info: OptimInfo, dtype: torch.dtype) -> None:
    model = make_problem(info.problem, dtype)
    opt = info.make(model)
    train(model, opt, 4)  # crosses a GaLore refresh (update_proj_gap=3)
    resumed = copy.deepcopy(model)
    opt2 = info.make(resumed)
    opt2.load_state_dict(weights_only_copy(opt.state_dict()))
    train(model, opt, 4, start=4)  # ... and the next one after the resume
    train(resumed, opt2, 4, start=4)
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), f"{info.name}: {name} differs after resume"
    assert_same(opt.state_dict(), opt2.state_dict(), "state after resume")


@pytest.mark.parametrize("info", REGISTRY, ids=IDS)
def test_step_does_not_mutate_grad(info: OptimInfo) -> None:
    model = make_problem(info.problem)
    opt = info.make(model)
    for t in range(4):
        opt.zero_grad()
        loss_at(model, t).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        for n, p in model.named_parameters():
            if n in grads:
                assert torch.equal(p.grad, grads[n]), f"step {t}: {n}.grad was modified"


@pytest.mark.parametrize("info", REGISTRY, ids=IDS)
def test_missing_grad_params_untouched(info: OptimInfo) -> None:
    model = make_problem(info.problem)
    before = snapshot(model)
    opt = info.make(model)
    train(model, opt, 4)
    for p in model.unused.parameters():
        assert p.grad is None
        assert not opt.state.get(p), "state created for a parameter without grad"
    assert torch.equal(model.unused.weight, before["unused.weight"])
    assert torch.equal(model.unused.bias, before["unused.bias"])
    assert torch.isfinite(model.dead).all()


@pytest.mark.parametrize("info", REGISTRY, ids=IDS)
def test_zero_grad_param_unchanged_without_decay(info: OptimInfo) -> None:
    # A zero gradient is a zero update: no NaN from normalising a zero matrix, a
    # zero second moment or a rank-deficient projection.
    model = make_problem(info.problem)
    before = snapshot(model)
    opt = info.make(model, weight_decay=0.0)
    train(model, opt, 4)
    assert torch.equal(model.dead.grad, torch.zeros_like(model.dead))
    assert torch.equal(model.dead, before["dead"]), f"{info.name}: zero-grad parameter moved"
    for k, v in opt.state[model.dead].items():
        if isinstance(v, Tensor) and v.is_floating_point():
            assert torch.isfinite(v).all(), f"state[{k!r}] of the zero-grad parameter"


@pytest.mark.parametrize("info", FREEZE_INFOS, ids=[i.name for i in FREEZE_INFOS])
def test_lr_scheduler_zero_lr_freezes_params(info: OptimInfo) -> None:
    model = make_problem(info.problem)
    opt = info.make(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s == 0 else 0.0)
    train(model, opt, 1, sched=sched)
    assert all(float(g["lr"]) == 0.0 for g in opt.param_groups)
    frozen = snapshot(model)
    train(model, opt, 2, start=1, sched=sched)
    for name, p in model.named_parameters():
        assert torch.equal(p, frozen[name]), f"{name} moved with lr=0"


@pytest.mark.parametrize("info", LR_INFOS, ids=[i.name for i in LR_INFOS])
def test_lr_scheduler_changes_trajectory(info: OptimInfo) -> None:
    m1, m2 = make_problem(info.problem), make_problem(info.problem)
    o1, o2 = info.make(m1), info.make(m2)
    sched = torch.optim.lr_scheduler.StepLR(o2, step_size=1, gamma=0.5)
    base = [float(g["lr"]) for g in o1.param_groups]
    train(m1, o1, 1)
    train(m2, o2, 1, sched=sched)
    assert [float(g["lr"]) for g in o2.param_groups] == [b * 0.5 for b in base]
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)  # the first step used the same lr
    train(m1, o1, 1, start=1)
    train(m2, o2, 1, start=1, sched=sched)
    assert not torch.equal(m1.head.weight, m2.head.weight), "halved lr had no effect"


@pytest.mark.parametrize("info", REGISTRY, ids=IDS)
def test_add_param_group(info: OptimInfo) -> None:
    model = make_problem(info.problem)
    opt = info.make(model)
    train(model, opt, 2)
    torch.manual_seed(1)
    extra = nn.Parameter(torch.randn(6, 5))
    target = torch.randn(6, 5)
    opt.add_param_group({"params": [extra]})
    group = opt.param_groups[-1]
    assert set(opt.defaults) <= set(group), "new group misses default keys"
    before = extra.detach().clone()

    def fit() -> Tensor:
        return (extra - target).square().mean()

    train(model, opt, 3, start=2, extra=fit)
    assert not torch.equal(extra, before) and torch.isfinite(extra).all()
    # the grown optimizer still round-trips
    sd = weights_only_copy(opt.state_dict())
    other = info.make(model)
    other.add_param_group({"params": [extra]})
    other.load_state_dict(sd)
    assert_same(opt.state_dict(), other.state_dict(), "grown optimizer")
    with pytest.raises(ValueError):
        opt.add_param_group({"params": [extra]})  # already present
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(3, 3))], "lr": -1.0})
