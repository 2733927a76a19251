"""FSDP2 (2 gloo ranks) equals one process for every registry configuration of GaLoreAdamW,
GaLoreAdafactor and Adafactor, plus explicit projection sides and GaLore options, with the
state sharded (never a whole-matrix gather between refreshes) and a DCP round trip.

All configurations run inside the one spawned 2-rank job of ``conftest.dist_out``
(process start-up costs seconds); each runs ``STEPS`` steps with ``update_proj_gap=3``:
the first refresh (cold) and two more (warm / transported) are crossed.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "optim"))
from optim_registry import REGISTRY, OptimInfo, batch, make_problem  # noqa: E402

from matrixopt.optim import Adafactor, GaLoreAdafactor, GaLoreAdamW  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                       reason="needs torch.distributed with the gloo backend"),
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning"),
]

STEPS = 7  # refreshes at iterations 1, 4, 7 (update_proj_gap=3, stagger=1)
_G = {"lr": 1e-2, "rank": 2, "update_proj_gap": 3, "stagger": 1}
_AF = {"lr": 1e-2, "relative_step": False, "rank": 2, "update_proj_gap": 3, "stagger": 1}



def _core_eps(info: OptimInfo) -> OptimInfo:
    """A two-sided basis makes the r × r core ``P_Lᵀ G P_R`` of exact singular bases
    diagonal up to rounding: Adam's first steps normalise those ~1e-8 off-diagonal
    entries to ±1 whatever their rounding, so no two summation orders agree (one
    process against itself with another BLAS neither). ``eps=1e-4`` keeps rounding noise
    below Adam's floor; everything else in the configuration is the registry's."""
    if info.cls is GaLoreAdamW and info.kwargs.get("proj_type") == "full":
        return replace(info, kwargs={**info.kwargs, "eps": 1e-4})
    return info


#: the registry's configurations of the three classes (proj_type at its default); the
#: spectral weight constraints need whole matrices and are rejected under FSDP2 with a
#: GroupError (tests/optim/test_weight_constraint.py), so their entries are left out
CONFIGS: list[OptimInfo] = [_core_eps(i) for i in REGISTRY
                            if i.cls in (GaLoreAdamW, GaLoreAdafactor, Adafactor)
                            and "spectral" not in i.name]
#: explicit sides and the options that used to gather whole matrices
EXTRA: list[OptimInfo] = [
    *[OptimInfo(f"x-adamw-{side}", GaLoreAdamW, dict(_G, proj_type=side))
      for side in ("left", "right", "full", "reverse_std")],
    *[OptimInfo(f"x-adamw-{side}-{res}-{gran}", GaLoreAdamW,
                dict(_G, proj_type=side, residual=res, residual_granularity=gran))
      for side in ("left", "right", "full") for res in ("fira", "apollo")
      for gran in ("channel", "tensor")],
    OptimInfo("x-adamw-bf16-state", GaLoreAdamW, dict(_G, state_dtype="bf16", residual="fira")),
    OptimInfo("x-adamw-fp32-state", GaLoreAdamW, dict(_G, state_dtype="fp32")),
    OptimInfo("x-adamw-random-left", GaLoreAdamW, dict(_G, projector="random", proj_type="left")),
    OptimInfo("x-adamw-experts-fira", GaLoreAdamW, dict(_G, residual="fira"), problem="experts"),
    OptimInfo("x-adamw-experts-random", GaLoreAdamW, dict(_G, projector="random"),
              problem="experts"),
    OptimInfo("x-adamw-conv-left", GaLoreAdamW, dict(_G, proj_type="left"), problem="conv"),
    *[OptimInfo(f"x-adafactor-{side}", GaLoreAdafactor, dict(_AF, proj_type=side, beta1=0.9))
      for side in ("left", "right", "full")],
    OptimInfo("x-adafactor-right-unfactored", GaLoreAdafactor,
              dict(_AF, proj_type="right", min_dim_size_to_factor=100)),
    OptimInfo("x-adafactor-relative-apollo", GaLoreAdafactor,
              {"rank": 2, "update_proj_gap": 3, "stagger": 1, "residual": "apollo"}),
    OptimInfo("x-adafactor-experts", GaLoreAdafactor, dict(_AF, clip_threshold=0.01),
              problem="experts"),
    OptimInfo("x-adafactor-clip-right", GaLoreAdafactor,
              dict(_AF, proj_type="right", clip_threshold=0.01, scale_parameter=True)),
]
#: rounded products: bf16 projections round each shard's partial sum
LOOSE = {"x-adamw-proj-bf16": 2e-2}
EXTRA.append(OptimInfo("x-adamw-proj-bf16", GaLoreAdamW,
                       dict(_G, proj_dtype=torch.bfloat16, proj_type="left")))


class Int8Net(nn.Module):
    """Matrices whose int8 state is quantised (>= 4096 entries) at rank 16 (the
    gradient of a batch of 32 has rank <= 32: the top 16 are well separated): ``a``
    [1024, 8] right (rank 8, moments [1024, 8] sharded, 4096 entries per shard), ``b``
    [512, 1024] left (basis [512, 16] sharded; moments [16, 1024] replicated), both with
    blocks that follow the shards; ``c`` [300, 512] left, whose basis' blocks straddle
    the shards (gathered whole, warned); the head [4, 300]."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 1024), nn.Linear(1024, 512)
        self.c, self.d = nn.Linear(512, 300), nn.Linear(300, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in (self.a, self.b, self.c):
            x = torch.tanh(layer(x))
        return self.d(x)


def _make(kind: str) -> nn.Module:
    if kind == "int8net":
        torch.manual_seed(0)
        return Int8Net()
    return make_problem(kind)


_I8 = dict(_G, rank=16, state_dtype="int8")
INT8 = [OptimInfo("x-adamw-int8-right", GaLoreAdamW, dict(_I8, proj_type="right"),
                    problem="int8net"),
          OptimInfo("x-adafactor-int8", GaLoreAdafactor, dict(_AF, rank=16, beta1=0.9,
                                                              state_dtype="int8",
                                                              proj_type="right"),
                    problem="int8net")]
#: int8 state: c's blocks straddle its shards, so c is gathered whole each step
#: (warned once); the other matrices run on their shards
WHOLE = [OptimInfo("x-adamw-int8", GaLoreAdamW, _I8, problem="int8net"), *INT8]
#: int8 codes are a step function of the moments: a summation-order difference of
#: 1e-7 moves an entry at a bucket edge by one code (~1% of its block's scale), which
#: later steps carry; compared within 1e-3 and at most one code apart
LOOSE.update({i.name: 1e-3 for i in WHOLE})
EXTRA = [_core_eps(i) for i in EXTRA]
ALL = CONFIGS + EXTRA + WHOLE
#: on the harness' Net (uneven row shards, a 1-row matrix: an empty shard), with a DCP
#: checkpoint at step CKPT_AT resumed at world size 2 and 1
NET = [OptimInfo("net-adamw-std-fira", GaLoreAdamW, dict(_G, residual="fira")),
       _core_eps(OptimInfo("net-adamw-full-apollo", GaLoreAdamW,
                           dict(_G, proj_type="full", residual="apollo"))),
       OptimInfo("net-adamw-left-bf16", GaLoreAdamW, dict(_G, proj_type="left",
                                                          state_dtype="bf16")),
       OptimInfo("net-adafactor-std", GaLoreAdafactor, dict(_AF, beta1=0.9)),
       OptimInfo("net-adafactor-left-relative", GaLoreAdafactor,
                 {"rank": 2, "update_proj_gap": 3, "stagger": 1, "proj_type": "left"})]
CKPT_AT = 4
_VERBOSE = False


def _loss(model: nn.Module, step: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    x, y = batch(step)
    k = x.shape[0] // world
    x, y = x[rank * k:(rank + 1) * k], y[rank * k:(rank + 1) * k]
    return nn.functional.mse_loss(model(x), y)


def _run(model: nn.Module, opt: torch.optim.Optimizer, steps: range, rank: int = 0,
         world: int = 1) -> list[float]:
    out = []
    for s in steps:
        opt.zero_grad(set_to_none=True)
        loss = _loss(model, s, rank, world)
        loss.backward()
        opt.step()
        value = loss.detach().clone()
        if world > 1:
            dist.all_reduce(value)
            value /= world
        out.append(float(value))
    return out


def _full_optim_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state by FQN with whole tensors (gathers DTensors)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, Any] = {}
    for p, st in opt.state.items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                v = v.full_tensor() if hasattr(v, "full_tensor") else v
                out[f"{names[id(p)]}.{k}"] = v.detach().clone()
    return out


def _placements(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, str]:
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for p, st in opt.state.items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                place = str(tuple(v.placements)) if hasattr(v, "placements") else "plain"
                out[f"{names[id(p)]}.{k}"] = place
    return out


def _sharded(info: OptimInfo) -> tuple[nn.Module, torch.optim.Optimizer]:
    from torch.distributed.fsdp import fully_shard
    model = _make(info.problem)
    fully_shard(model)
    return model, info.make(model)


def _job(rank: int, world: int, out: Path) -> None:
    import warnings

    import torch.distributed.checkpoint as dcp
    from _harness import full_params, make_model, train_step
    from test_lowrank_distributed import _no_whole_gather
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard

    from matrixopt.optim._distributed import count_bytes

    res: dict[Any, Any] = {}
    import time
    for info in ALL:
        t0 = time.perf_counter()
        model, opt = _sharded(info)
        with warnings.catch_warnings(record=True) as caught, count_bytes() as c:
            warnings.simplefilter("always")
            with _no_whole_gather(info not in WHOLE):
                res[info.name, "losses"] = _run(model, opt, range(STEPS), rank, world)
        res[info.name, "gathers"] = c["all_gather"]
        res[info.name, "warnings"] = [str(w.message) for w in caught
                                      if "do not run on their row shards" in str(w.message)]
        res[info.name, "params"] = full_params(model)
        res[info.name, "state"] = _full_optim_state(model, opt)
        res[info.name, "placements"] = _placements(model, opt)
        res[info.name, "groups"] = [sorted(g) for g in opt.param_groups]
        if rank == 0 and _VERBOSE:
            print(info.name, round(time.perf_counter() - t0, 2), file=sys.stderr, flush=True)
    for info in NET:  # uneven shards, an empty one; then a DCP round trip
        model = make_model()
        fully_shard(model)
        opt = info.make(model)
        with _no_whole_gather(True):
            res[info.name, "losses"] = [train_step(model, opt, s, rank, world)
                                        for s in range(STEPS)]
        res[info.name, "params"] = full_params(model)
        model = make_model()
        fully_shard(model)
        opt = info.make(model)
        for s in range(CKPT_AT):
            train_step(model, opt, s, rank, world)
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(out / info.name))
        model = make_model()
        fully_shard(model)
        opt = info.make(model)
        msd, osd = get_state_dict(model, opt)
        sd = {"model": msd, "optim": osd}
        dcp.load(sd, checkpoint_id=str(out / info.name))
        set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        res[info.name, "resumed"] = [train_step(model, opt, s, rank, world)
                                     for s in range(CKPT_AT, STEPS)]
    if rank == 0:
        torch.save(res, out / "res.pt")


@pytest.fixture(scope="module")
def results(dist_out: Path) -> tuple[dict, Path]:
    out = dist_out / "parity"
    return torch.load(out / "res.pt", weights_only=False), out


def _close(got: torch.Tensor, want: torch.Tensor, rel: float, what: str) -> None:
    """``‖got − want‖ ≤ rel·‖want‖`` (relative error of the whole tensor; an exact match
    for a zero tensor)."""
    err = (got.double() - want.double()).norm()
    scale = want.double().norm()
    assert err <= rel * scale or err == 0, f"{what}: relative error {float(err / scale):.2e}"


def _single(info: OptimInfo) -> tuple[list[float], nn.Module, torch.optim.Optimizer]:
    model = _make(info.problem)
    opt = info.make(model)
    return _run(model, opt, range(STEPS)), model, opt


@pytest.mark.parametrize("info", ALL, ids=lambda i: i.name)
def test_fsdp2_equals_single_process(results: tuple[dict, Path], info: OptimInfo) -> None:
    """Losses, parameters and the whole optimizer state (every key, gathered) of the FSDP2
    run equal one process's within 1e-5 relative in fp32."""
    res, _ = results
    tol = LOOSE.get(info.name, 1e-5)
    losses, model, opt = _single(info)
    assert res[info.name, "losses"] == pytest.approx(losses, rel=tol, abs=1e-6)
    for k, v in model.named_parameters():
        _close(res[info.name, "params"][k], v.detach(), tol, k)
    want = _full_optim_state(model, opt)
    got = res[info.name, "state"]
    # int8 state: each code flip a rounding difference causes is ~1% of its block's
    # scale; bf16 products: 2^-8 per partial sum
    stol = 1e-2 if info.name in LOOSE else 1e-4
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        g = got[k]
        assert g.dtype == v.dtype and g.shape == v.shape, k
        if v.is_floating_point():
            # a basis column's sign is fixed over the whole column on shards as in one
            # process, so bases compare directly; the state carries the rounding of
            # range finders and transports, 1e-4 relative
            _close(g, v, stol, k)
        elif v.dtype == torch.int8:  # codes: the dequantised values (the code is not
            # uniform: near zero a tiny difference moves many codes)
            from matrixopt.optim._quant import dequantize_blockwise
            signed = not k.endswith("exp_avg_sq")
            _close(dequantize_blockwise(g, got[k + "_absmax"], signed),
                   dequantize_blockwise(v, want[k + "_absmax"], signed), 5 * stol, k)
        else:
            assert torch.equal(g, v), k
    assert res[info.name, "groups"] == [sorted(g) for g in opt.param_groups]


@pytest.mark.parametrize("info", CONFIGS + EXTRA, ids=lambda i: i.name)
def test_runs_on_shards(results: tuple[dict, Path], info: OptimInfo) -> None:
    """No whole-matrix fallback: no warning, no full_tensor of a matrix (the job guards
    it), and projected state sharded like the parameter where it has a row per row."""
    res, _ = results
    assert res[info.name, "warnings"] == []
    placements = res[info.name, "placements"]
    if info.cls is not Adafactor:
        assert any(v == "(Shard(dim=0),)" for v in placements.values())
    # a stack's refresh gathers its gradient (once per update_proj_gap steps) only
    if info.problem != "experts":
        assert res[info.name, "gathers"] == 0


def test_state_placements_follow_the_side(results: tuple[dict, Path]) -> None:
    """Right projection: moments G P sharded, basis replicated; left: basis sharded,
    r × n moments replicated; full: left basis sharded, the rest replicated."""
    res, _ = results
    shard, rep = "(Shard(dim=0),)", "(Replicate(),)"
    right = res["x-adamw-right", "placements"]
    left = res["x-adamw-left", "placements"]
    full = res["x-adamw-full", "placements"]
    mats = {k.removesuffix(".projector") for k in right if k.endswith(".projector")}
    assert mats
    for j in mats:
        assert right[f"{j}.exp_avg"] == right[f"{j}.exp_avg_sq"] == shard
        assert right[f"{j}.projector"] == rep
        assert left[f"{j}.exp_avg"] == left[f"{j}.exp_avg_sq"] == rep
        assert left[f"{j}.projector"] == shard
        assert full[f"{j}.projector"] == shard and full[f"{j}.projector_right"] == rep
        assert full[f"{j}.exp_avg"] == rep
        assert right[f"{j}.iteration"] == "plain"


def test_int8_state_warns_once_and_keeps_param_groups(results: tuple[dict, Path]) -> None:
    res, _ = results
    warned = res["x-adamw-int8", "warnings"]
    assert len(warned) == 1 and "state_dtype='int8'" in warned[0]
    placements = res["x-adamw-int8", "placements"]
    # a (right) and b (left, blocks aligned) on their shards, int8 codes and scales
    # sharded with the tensor they quantise; c gathered whole: plain replicated state
    shard = "(Shard(dim=0),)"
    assert placements["a.weight.exp_avg"] == placements["a.weight.exp_avg_absmax"] == shard
    assert placements["b.weight.projector"] == placements["b.weight.projector_absmax"] == shard
    assert placements["b.weight.exp_avg_absmax"] == "(Replicate(),)"
    assert placements["c.weight.projector_absmax"] == "plain"


def test_int8_state_is_quantised_on_shards(results: tuple[dict, Path]) -> None:
    res, _ = results
    state = res["x-adamw-int8-right", "state"]
    assert state["a.weight.exp_avg"].dtype == torch.int8
    assert state["b.weight.exp_avg"].dtype == torch.int8


@pytest.mark.parametrize("info", NET, ids=lambda i: i.name)
def test_net_and_dcp_round_trip(results: tuple[dict, Path], info: OptimInfo) -> None:
    """Uneven and empty shards equal one process; a DCP checkpoint at step 4 resumed at
    world size 2 continues as the uninterrupted run, and loaded in one process (world
    size 1) as one process does."""
    import torch.distributed.checkpoint as dcp
    from _harness import full_params, make_model, train_step
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    res, out = results
    model = make_model()
    opt = info.make(model)
    losses = [train_step(model, opt, s) for s in range(STEPS)]
    assert res[info.name, "losses"] == pytest.approx(losses, rel=1e-5, abs=1e-6)
    for k, v in full_params(model).items():
        _close(res[info.name, "params"][k], v, 1e-5, k)
    assert res[info.name, "resumed"] == pytest.approx(res[info.name, "losses"][CKPT_AT:],
                                                      rel=1e-6)
    model = make_model()
    opt = info.make(model)
    msd, osd = get_state_dict(model, opt)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=str(out / info.name), no_dist=True)
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    resumed = [train_step(model, opt, s) for s in range(CKPT_AT, STEPS)]
    assert resumed == pytest.approx(losses[CKPT_AT:], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize(("rows", "row", "want"), [
    (10, 100, True),      # 1000 entries < 4096: float32 on every rank, as in one process
    (512, 16, True),      # 2 x 4096 entries: blocks 0-15 | 16-31, scales chunk 16 | 16
    (300, 16, False),     # 2 x 2400 < 4096: ranks would keep float32, one process int8
    (600, 16, False),     # 4800 entries per rank: 4800 % 256 != 0, a block straddles
    (1, 8192, False),     # one row: the second rank's shard is empty
    (520, 16, False),     # 260 x 16 = 4160 per rank, not a multiple of 256
])
def test_blocks_follow_shards(rows: int, row: int, want: bool) -> None:
    """When per-shard int8 quantisation (256-entry blocks, >= 4096 entries) is the whole
    tensor's: worked by hand for 2 ranks."""
    from matrixopt.optim._distributed import blocks_follow_shards
    assert blocks_follow_shards(rows, row, 2, 256, 4096) is want
