"""state_dtype group key: storage formats, reference trajectory, checkpoints."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from matrixopt.optim import Adafactor, GaLoreAdafactor, GaLoreAdamW, Muon
from matrixopt.optim._common import GroupError
from matrixopt.optim._quant import dequantize_blockwise, nonfinite_blocks, quantize_blockwise


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(96, 64, generator=g).requires_grad_(),   # 6144 ≥ 4096: quantised
            torch.randn(32, 16, generator=g).requires_grad_(),   # 512: stays fp32
            torch.randn(64, generator=g).requires_grad_()]


def _grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


MAKERS = {
    "muon": lambda ps, sd: Muon([{"params": ps[:1]}, {"params": ps[1:], "algorithm": "adamw"}],
                                lr=1e-2, state_dtype=sd),
    "galore_adamw": lambda ps, sd: GaLoreAdamW([{"params": ps[:1], "rank": 80},
                                                {"params": ps[1:]}], lr=1e-2, state_dtype=sd,
                                               update_proj_gap=2),
    "adafactor": lambda ps, sd: Adafactor(ps, lr=1e-2, beta1=0.9, relative_step=False,
                                          state_dtype=sd),
    "galore_adafactor": lambda ps, sd: GaLoreAdafactor(
        [{"params": ps[:1], "rank": 80}, {"params": ps[1:]}], lr=1e-2, beta1=0.9,
        relative_step=False, state_dtype=sd, update_proj_gap=2),
}


@pytest.mark.parametrize("name", list(MAKERS))
def test_unknown_state_dtype_fails_at_construction_naming_the_group(name):
    ps = _params()
    with pytest.raises(GroupError, match=r"param_groups\[0\]: state_dtype .*'int4'"):
        MAKERS[name](ps, "int4")
    opt = MAKERS[name](ps, None)
    with pytest.raises(GroupError, match=rf"param_groups\[{len(opt.param_groups)}\]: state_dtype"):
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)],
                             "state_dtype": torch.int8})


def _run(opt, params, steps, start=0):
    for t in range(start, start + steps):
        _grads(params, t)
        opt.step()


@pytest.mark.parametrize("name", list(MAKERS))
def test_int8_state_is_codes_plus_absmax_only(name):
    ps = _params()
    opt = MAKERS[name](ps, "int8")
    _run(opt, ps, 3)
    big = opt.state[ps[0]]
    quantised = [k for k in big if k.endswith("_absmax")]
    assert quantised, sorted(big)
    for k in quantised:
        key = k[: -len("_absmax")]
        assert big[key].dtype == torch.int8
        assert big[k].dtype == torch.float32
        if name == "adafactor":  # row-aligned blocks: every row its own 256-entry blocks
            rows, row = big[key].shape[0], big[key][0].numel()
            assert big[k].shape == (rows, -(-row // 256))
        else:
            assert big[k].numel() == -(-big[key].numel() // 256)
    for k, v in big.items():  # no float copy of a full-size moment alongside
        if (k not in quantised and not k.startswith("projector") and isinstance(v, torch.Tensor)
                and v.is_floating_point()):
            assert v.numel() < 4096, k
    for p in ps[1:]:
        assert not any(k.endswith("_absmax") for k in opt.state[p])
    assert all(torch.isfinite(p).all() for p in ps)


@pytest.mark.parametrize("name", list(MAKERS))
def test_int8_state_dict_loads_weights_only_and_resumes_bit_identically(name):
    ps = _params()
    opt = MAKERS[name](ps, "int8")
    _run(opt, ps, 3)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "params": [p.detach().clone() for p in ps]}, buf)
    _run(opt, ps, 4, start=3)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    ps2 = [p.clone().requires_grad_() for p in ck["params"]]
    opt2 = MAKERS[name](ps2, "int8")
    opt2.load_state_dict(ck["opt"])
    _run(opt2, ps2, 4, start=3)
    for a, b in zip(ps, ps2):
        assert torch.equal(a, b)
    for a, b in zip(ps, ps2):
        for k, v in opt.state[a].items():
            if isinstance(v, torch.Tensor):
                assert v.dtype == opt2.state[b][k].dtype and torch.equal(v, opt2.state[b][k]), k


@pytest.mark.parametrize("name", list(MAKERS))
def test_bf16_state_and_int8_stay_close_to_fp32(name):
    runs = {}
    for sd in (None, "bf16", "int8"):
        ps = _params()
        opt = MAKERS[name](ps, sd)
        _run(opt, ps, 5)
        runs[sd] = ps
        if sd == "bf16":
            assert any(v.dtype == torch.bfloat16 for v in opt.state[ps[0]].values()
                       if isinstance(v, torch.Tensor))
    init = _params()
    for sd in ("bf16", "int8"):
        for a, b, p0 in zip(runs[None], runs[sd], init):
            # difference relative to how far the fp32 run moved the parameter
            rel = (a - b).norm() / (a - p0).norm()
            assert rel < 5e-2, (sd, float(rel))


def test_int8_adamw_path_matches_a_quantise_every_step_reference():
    ps = _params()
    opt = Muon([{"params": ps[:1], "algorithm": "adamw"}], lr=1e-2, weight_decay=0.1,
               state_dtype="int8")
    p0 = ps[0].detach().clone().double()
    m = torch.zeros_like(p0)
    v = torch.zeros_like(p0)
    b1, b2, lr, wd, eps = 0.9, 0.999, 1e-2, 0.1, 1e-8
    for t in range(1, 5):
        _grads(ps, t)
        g = ps[0].grad.double()
        m = m * b1 + (1 - b1) * g
        v = v * b2 + (1 - b2) * g * g
        p0 = p0 * (1 - lr * wd) - lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
        m = dequantize_blockwise(*quantize_blockwise(m.float(), True), True).double()
        v = dequantize_blockwise(*quantize_blockwise(v.float(), False), False).double()
        opt.step()
        st = opt.state[ps[0]]
        assert torch.allclose(ps[0].double(), p0, rtol=0, atol=1e-5)
    m8 = dequantize_blockwise(st["exp_avg"], st["exp_avg_absmax"], True).double()
    assert (m8 - m).abs().max() <= 1e-3 * m.abs().max()


def test_old_fp32_checkpoint_loads_into_int8_optimizer_and_converts():
    ps = _params()
    opt = Muon([{"params": ps[:1]}, {"params": ps[1:], "algorithm": "adamw"}], lr=1e-2)
    _run(opt, ps, 2)
    sd = copy.deepcopy(opt.state_dict())  # loading aliases the tensors otherwise
    for g in sd["param_groups"]:  # a checkpoint from before the key existed
        del g["state_dtype"]
    ps2 = [p.detach().clone().requires_grad_() for p in ps]
    opt2 = Muon([{"params": ps2[:1]}, {"params": ps2[1:], "algorithm": "adamw"}], lr=1e-2,
                state_dtype="int8")
    opt2.load_state_dict(sd)
    assert opt2.state[ps2[0]]["momentum_buffer"].dtype == torch.float32
    _run(opt2, ps2, 1, start=2)
    _run(opt, ps, 1, start=2)
    st = opt2.state[ps2[0]]
    assert st["momentum_buffer"].dtype == torch.int8 and "momentum_buffer_absmax" in st
    assert torch.allclose(ps[0], ps2[0], atol=1e-3)


def test_bf16_parameters_with_int8_state():
    p = torch.randn(96, 64).bfloat16().requires_grad_()
    q = torch.randn(96, 64).bfloat16().requires_grad_()
    opt = Muon([{"params": [p]}, {"params": [q], "algorithm": "adamw"}], lr=1e-2,
               state_dtype="int8")
    for _ in range(2):
        p.grad = torch.randn_like(p)
        q.grad = torch.randn_like(q)
        opt.step()
    assert p.dtype == q.dtype == torch.bfloat16
    assert torch.isfinite(p.float()).all() and torch.isfinite(q.float()).all()
    assert opt.state[q]["exp_avg"].dtype == torch.int8


def test_nan_gradient_is_confined_to_its_block_of_int8_state():
    p = torch.zeros(96, 64, requires_grad=True)
    # nonfinite="ignore": let the NaN reach the quantiser (the default "skip"
    # never lets it in, see test_nan_gradient_skipped_keeps_int8_state)
    opt = Muon([{"params": [p], "algorithm": "adamw"}], lr=1e-3, state_dtype="int8",
               nonfinite="ignore")
    g = torch.randn(96, 64)
    g.view(-1)[300] = float("nan")                    # block 1 of 24
    p.grad = g
    opt.step()
    st = opt.state[p]
    assert nonfinite_blocks(st["exp_avg_absmax"]).nonzero().flatten().tolist() == [1]
    m = dequantize_blockwise(st["exp_avg"], st["exp_avg_absmax"], True).view(-1)
    assert torch.isnan(m[256:512]).all() and torch.isfinite(m[:256]).all() \
        and torch.isfinite(m[512:]).all()


def test_nan_gradient_skipped_keeps_int8_state():
    """Default nonfinite="skip": a NaN gradient leaves int8 codes and scales bit-identical."""
    p = torch.zeros(96, 64, requires_grad=True)
    opt = Muon([{"params": [p], "algorithm": "adamw"}], lr=1e-3, state_dtype="int8")
    p.grad = torch.randn(96, 64)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[p].items()}
    w = p.detach().clone()
    g = torch.randn(96, 64)
    g.view(-1)[300] = float("nan")
    p.grad = g
    opt.step()
    st = opt.state[p]
    assert torch.equal(p.detach(), w)
    for k in ("exp_avg", "exp_avg_absmax", "exp_avg_sq", "exp_avg_sq_absmax"):
        assert torch.equal(st[k], before[k]), k
    # the CPU step counter advances on a skipped step (matrixopt.optim._nonfinite)
    assert float(st["step"]) == float(before["step"]) + 1
    assert int(st["nonfinite_count"]) == 1


# ---------------------------------------------------------------- GaLore basis
def _galore_basis(ps, sd, **kw):
    # proj_type "full" on 96x64 at rank 64: bases 96x64 (6144, quantised) and 64x64 (4096)
    return GaLoreAdamW([{"params": ps[:1], "rank": 64, "proj_type": "full"},
                        {"params": ps[1:]}], lr=1e-2, state_dtype=sd, update_proj_gap=3, **kw)


def test_int8_galore_basis_is_codes_plus_absmax_and_dequantises_to_the_basis():
    ps = _params()
    opt = _galore_basis(ps, "int8")
    _run(opt, ps, 4)  # refreshes at steps 1 and 4
    st = opt.state[ps[0]]
    for key, shape in (("projector", (96, 64)), ("projector_right", (64, 64))):
        assert st[key].dtype == torch.int8 and st[key].shape == shape
        absmax = st[key + "_absmax"]
        assert absmax.dtype == torch.float32 and absmax.numel() == shape[0] * shape[1] // 256
        P = dequantize_blockwise(st[key], absmax, True)
        # an orthonormal basis up to the signed code's rounding (≤ 0.7 % of each block's absmax)
        err = (P.mT @ P - torch.eye(64)).abs().max()
        assert err < 0.05, (key, float(err))
    # a small basis stays float32, as small moments do
    q = torch.randn(64, 48, requires_grad=True)
    small = GaLoreAdamW([{"params": [q], "rank": 16}], state_dtype="int8")
    q.grad = torch.randn(64, 48)
    small.step()
    assert small.state[q]["projector"].dtype == torch.float32
    assert "projector_absmax" not in small.state[q]


def test_bf16_galore_basis_dtype():
    ps = _params()
    opt = _galore_basis(ps, "bf16")
    _run(opt, ps, 2)
    st = opt.state[ps[0]]
    assert st["projector"].dtype == st["projector_right"].dtype == torch.bfloat16
    assert "projector_absmax" not in st
    ref = _galore_basis(_params(), None)
    _run(ref, ref.param_groups[0]["params"] + ref.param_groups[1]["params"], 2)
    P32 = ref.state[ref.param_groups[0]["params"][0]]["projector"]
    assert P32.dtype == torch.float32
    assert torch.equal(st["projector"], P32.bfloat16())  # the same basis, rounded once


@pytest.mark.parametrize("on_refresh", ["transport", "reset"])
def test_int8_galore_basis_resumes_bit_identically_across_a_refresh(on_refresh):
    ps = _params()
    opt = _galore_basis(ps, "int8", on_refresh=on_refresh)
    _run(opt, ps, 2)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "params": [p.detach().clone() for p in ps]}, buf)
    _run(opt, ps, 4, start=2)  # refresh at step 4 (warm start from the int8 basis)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    ps2 = [p.clone().requires_grad_() for p in ck["params"]]
    opt2 = _galore_basis(ps2, "int8", on_refresh=on_refresh)
    opt2.load_state_dict(ck["opt"])
    _run(opt2, ps2, 4, start=2)
    for a, b in zip(ps, ps2):
        assert torch.equal(a, b)
    st, st2 = opt.state[ps[0]], opt2.state[ps2[0]]
    assert int(st["refresh_step"]) == 4 and st["projector"].dtype == torch.int8
    for k, v in st.items():
        assert v.dtype == st2[k].dtype and torch.equal(v, st2[k]), k


@pytest.mark.parametrize("sd, tol", [("bf16", 2.5e-2), ("int8", 8e-2)])
def test_low_precision_galore_basis_stays_close_to_fp32(sd, tol):
    runs = {}
    for s in (None, sd):
        ps = _params()
        _run(_galore_basis(ps, s), ps, 8)  # three refreshes
        runs[s] = ps[0]
    p0 = _params()[0]
    # measured: bf16 0.013, int8 0.047 (both bases rounded, Adam's early steps near sign)
    rel = (runs[None] - runs[sd]).norm() / (runs[None] - p0).norm()
    assert rel < tol, float(rel)


def test_fp32_galore_checkpoint_loads_into_int8_optimizer_and_converts_the_basis():
    ps = _params()
    opt = _galore_basis(ps, None)
    _run(opt, ps, 2)
    sd = copy.deepcopy(opt.state_dict())
    for g in sd["param_groups"]:  # a checkpoint from before the key existed
        del g["state_dtype"]
    ps2 = [p.detach().clone().requires_grad_() for p in ps]
    opt2 = _galore_basis(ps2, "int8")
    opt2.load_state_dict(sd)
    _run(opt2, ps2, 1, start=2)  # no refresh: the fp32 basis is used as stored
    _run(opt, ps, 1, start=2)
    st = opt2.state[ps2[0]]
    assert st["projector"].dtype == torch.float32 and "projector_absmax" not in st
    _run(opt2, ps2, 1, start=3)  # refresh: stored as int8 from now on
    _run(opt, ps, 1, start=3)
    assert st["projector"].dtype == torch.int8 and "projector_absmax" in st
    rel = (ps[0] - ps2[0]).norm() / (ps[0] - _params()[0]).norm()
    assert rel < 5e-2, float(rel)
    # and back: an int8-basis checkpoint into a default optimizer, which then stores fp32
    ps3 = [p.detach().clone().requires_grad_() for p in ps2]
    opt3 = _galore_basis(ps3, None)
    sd = copy.deepcopy(opt2.state_dict())
    for g in sd["param_groups"]:
        del g["state_dtype"]
    opt3.load_state_dict(sd)
    _run(opt3, ps3, 3, start=4)  # refresh at step 7
    st3 = opt3.state[ps3[0]]
    assert st3["projector"].dtype == torch.float32 and "projector_absmax" not in st3
    assert torch.isfinite(ps3[0]).all()
