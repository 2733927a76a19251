"""state_dtype="fp8": COAT's E4M3 quantiser with dynamic range expansion, against a
float64 reference written from COAT's formulas (with the centre c), and in every
optimizer that accepts state_dtype."""

from __future__ import annotations

import io
import math

import pytest
import torch
from test_state_dtype import MAKERS, _params, _run

from matrixopt.optim._fp8 import FP8_DTYPE, GROUP, K_MAX, dequantize_fp8, quantize_fp8

_E4M3 = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8_DTYPE).double()
_E4M3 = torch.unique(_E4M3[torch.isfinite(_E4M3)])  # the 253 distinct finite values, sorted


def _round_e4m3(y: torch.Tensor) -> torch.Tensor:
    """Nearest E4M3 value (float64, by search over the value table)."""
    y = y.clamp(-448, 448)
    i = torch.searchsorted(_E4M3, y).clamp(1, _E4M3.numel() - 1)
    lo, hi = _E4M3[i - 1], _E4M3[i]
    return torch.where((y - lo).abs() <= (hi - y).abs(), lo, hi)


def _reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """COAT's expand + quantise + dequantise in float64, per group of 128, with the
    centre c = sqrt(M mu), y = sign(x)(|x|/c)^k, scale = (M/c)^k/448 (its kernel)."""
    g = x.double().reshape(-1, GROUP)
    a = g.abs()
    big = a.amax(1) + 1e-30
    small = torch.where(a > 0, a, torch.full_like(a, math.inf)).amin(1)
    small = torch.where(torch.isfinite(small), small, torch.zeros_like(small)) + 1e-30
    span = torch.log2(big / small)
    k = torch.where(span > 0, torch.floor(16 * math.log2(448**2 / 2) / span) / 16,
                    torch.full_like(span, K_MAX)).clamp(max=K_MAX)
    c = (big * small).sqrt()
    y = torch.sign(g) * (a / c[:, None]) ** k[:, None]
    scale = (big / c) ** k / 448
    q = _round_e4m3(y / scale[:, None])
    xhat = c[:, None] * torch.sign(q) * (q.abs() * scale[:, None]) ** (1 / k[:, None])
    return q, xhat.reshape(x.shape), k


def _moments(n_groups=64, seed=0):
    """Adam-like groups: first moments spanning ~1e3, second moments ~1e1 .. 1e6."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n_groups * GROUP, generator=g) * 10 ** (3 * torch.rand(n_groups * GROUP,
                                                                          generator=g))
    v = 10 ** (-6 + 6 * torch.rand(n_groups * GROUP, generator=g))
    return m * 1e-4, v


@pytest.mark.parametrize("which", [0, 1])
def test_quantiser_matches_float64_coat_reference(which):
    x = _moments()[which]
    codes, meta = quantize_fp8(x)
    q_ref, xhat_ref, k_ref = _reference(x)
    assert torch.equal(meta[:, 1].double(), k_ref)
    same = codes.double().reshape(-1, GROUP) == q_ref
    assert same.float().mean() > 0.999  # float32 vs float64 pow may tip a rounding tie
    assert torch.allclose(dequantize_fp8(codes, meta).double(), xhat_ref, rtol=5e-2, atol=0)


def _bound(k: torch.Tensor) -> torch.Tensor:
    d = 2.0**-4  # E4M3 normal range: half a unit in the last of 3 mantissa bits
    return torch.maximum((1 + d) ** (1 / k) - 1, 1 - (1 - d) ** (1 / k)) + 1e-5


@pytest.mark.parametrize("which", [0, 1])
def test_round_trip_error_bound_max_element_and_range(which):
    x = _moments(seed=3)[which]
    codes, meta = quantize_fp8(x)
    xhat = dequantize_fp8(codes, meta).double().reshape(-1, GROUP)
    xd = x.double().reshape(-1, GROUP)
    k = meta[:, 1].double()
    # elements whose unrounded code 448 (|x|/M)^k lies in E4M3's normal range
    normal = 448 * (xd.abs() / meta[:, :1].double()) ** k[:, None] >= 2.0**-6
    rel = (xhat - xd).abs() / xd.abs()
    assert normal.float().mean() > 0.9
    assert (rel <= _bound(k)[:, None])[normal].all(), float(rel[normal].max())
    assert (torch.sign(xhat) == torch.sign(xd)).all()
    top = xd.abs().argmax(1, keepdim=True)
    assert (codes.double().reshape(-1, GROUP).gather(1, top).abs() == 448).all()
    assert torch.allclose(xhat.gather(1, top), xd.gather(1, top), rtol=1e-6, atol=0)
    a = xd.abs()
    span = torch.log2(a.amax(1) / torch.where(a > 0, a, math.inf).amin(1))
    assert (k * span <= math.log2(448**2 / 2) + 1e-9).all()


def test_expansion_beats_plain_absmax_fp8_on_a_narrow_group():
    """Groups spanning 10^3 (COAT's typical first moment): k > 1 and a smaller error."""
    g = torch.Generator().manual_seed(5)
    x = torch.sign(torch.randn(16 * GROUP, generator=g)) * 10 ** (3 * torch.rand(16 * GROUP,
                                                                                  generator=g))
    codes, meta = quantize_fp8(x)
    assert (meta[:, 1] > 1).all()
    xd = x.double().reshape(-1, GROUP)
    a = xd.abs()
    plain = _round_e4m3(448 * xd / a.amax(1, keepdim=True)) * a.amax(1, keepdim=True) / 448
    err_dre = ((dequantize_fp8(codes, meta).double().reshape(-1, GROUP) - xd).abs() / a).mean()
    err_plain = ((plain - xd).abs() / a).mean()
    assert err_dre < 0.7 * err_plain, (float(err_dre), float(err_plain))


def test_k_equal_one_is_per_group_absmax_fp8():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(GROUP, generator=g) + 0.5
    x[0], x[1] = 2.0**8, -(2.0**-8.5)  # span 2^16.5 -> k = floor(16*16.61/16.5)/16 = 1
    codes, meta = quantize_fp8(x)
    assert float(meta[0, 1]) == 1.0
    expected = (448 * x.double() / x.abs().max()).to(FP8_DTYPE)
    assert torch.equal(codes, expected.reshape(codes.shape))


def test_zero_constant_ragged_and_nonfinite_groups():
    x = torch.zeros(3 * GROUP + 5)
    x[GROUP:2 * GROUP] = -0.25                       # constant: k capped, exact
    x[2 * GROUP:3 * GROUP] = torch.linspace(-1, 1, GROUP)
    x[2 * GROUP + 7] = math.nan                     # confined to its own group
    x[-5:] = torch.tensor([1e-3, 2e-3, 0.0, -4e-3, 5e-3])  # ragged tail group
    codes, meta = quantize_fp8(x)
    assert codes.shape == x.shape and meta.shape == (4, 2)
    y = dequantize_fp8(codes, meta)
    assert torch.equal(y[:GROUP], torch.zeros(GROUP))
    assert float(meta[1, 1]) == K_MAX and torch.allclose(y[GROUP:2 * GROUP], x[GROUP:2 * GROUP])
    assert torch.isnan(y[2 * GROUP:3 * GROUP]).all()
    assert torch.allclose(y[-5:], x[-5:], rtol=2.0**-4, atol=0)
    out = (torch.empty_like(codes), torch.empty_like(meta))
    quantize_fp8(x, out=out)                          # in place into stored state
    assert torch.equal(out[0].view(torch.uint8), codes.view(torch.uint8))


# ---------------------------------------------------------------- in the optimizers
@pytest.mark.parametrize("name", list(MAKERS))
def test_fp8_state_is_e4m3_codes_plus_two_floats_per_group(name):
    ps = _params()
    opt = MAKERS[name](ps, "fp8")
    _run(opt, ps, 3)
    big = opt.state[ps[0]]
    quantised = [k for k in big if k.endswith("_absmax") and not k.startswith("projector")]
    assert quantised, sorted(big)
    for k in quantised:
        key = k[: -len("_absmax")]
        assert big[key].dtype == FP8_DTYPE
        assert big[k].shape == (-(-big[key].numel() // GROUP), 2)
        stored = big[key].numel() + big[k].numel() * 4
        assert stored <= 0.27 * 4 * big[key].numel()  # ≤ 0.27x of the float32 moment
    for p in ps[1:]:  # small tensors stay float32
        assert not any(v.dtype == FP8_DTYPE for v in opt.state[p].values()
                       if isinstance(v, torch.Tensor))
    assert all(torch.isfinite(p).all() for p in ps)


@pytest.mark.parametrize("name", list(MAKERS))
def test_fp8_state_dict_loads_weights_only_and_resumes_bit_identically(name):
    ps = _params()
    opt = MAKERS[name](ps, "fp8")
    _run(opt, ps, 3)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "params": [p.detach().clone() for p in ps]}, buf)
    _run(opt, ps, 4, start=3)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    ps2 = [p.clone().requires_grad_() for p in ck["params"]]
    opt2 = MAKERS[name](ps2, "fp8")
    opt2.load_state_dict(ck["opt"])
    _run(opt2, ps2, 4, start=3)
    for a, b in zip(ps, ps2):
        assert torch.equal(a, b)
    for a, b in zip(ps, ps2):
        for k, v in opt.state[a].items():
            if isinstance(v, torch.Tensor):
                w = opt2.state[b][k]
                assert v.dtype == w.dtype and torch.equal(v.view(torch.uint8) if v.dtype ==
                                                          FP8_DTYPE else v,
                                                          w.view(torch.uint8) if w.dtype ==
                                                          FP8_DTYPE else w), k


@pytest.mark.parametrize("name", list(MAKERS))
def test_fp8_state_stays_close_to_fp32(name):
    runs = {}
    for sd in (None, "fp8"):
        ps = _params()
        _run(MAKERS[name](ps, sd), ps, 5)
        runs[sd] = ps
    for a, b, p0 in zip(runs[None], runs["fp8"], _params()):
        rel = (a - b).norm() / (a - p0).norm()
        assert rel < 5e-2, float(rel)


def test_int8_state_converts_to_fp8_when_the_group_switches():
    ps = _params()
    opt = MAKERS["galore_adamw"](ps, "int8")
    _run(opt, ps, 2)
    ps2 = [p.detach().clone().requires_grad_() for p in ps]
    opt2 = MAKERS["galore_adamw"](ps2, "fp8")
    opt2.load_state_dict(opt.state_dict())  # torch restores the groups' state_dtype too
    for g in opt2.param_groups:
        g["state_dtype"] = "fp8"
    assert opt2.state[ps2[0]]["exp_avg"].dtype == torch.int8
    _run(opt2, ps2, 1, start=2)
    st = opt2.state[ps2[0]]
    assert st["exp_avg"].dtype == FP8_DTYPE and st["exp_avg_absmax"].shape[-1] == 2


@pytest.mark.parametrize("name", ["muon", "galore_adamw"])
def test_fp8_state_steps_on_fake_cuda_without_host_reads(name, monkeypatch):
    """FakeTensorMode "cuda" dry run (see test_fake_cuda.py): quantise/dequantise of fp8
    moments read no device value on the host and keep the state on the device."""
    import test_fake_cuda as fc
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(fc._GaLoreBase, "_generator", staticmethod(fc._cpu_generator))
    for attr, fn in (("copy_", fc._fake_copy_), ("__getitem__", fc._fake_getitem),
                     ("__setitem__", fc._fake_setitem), ("contiguous", fc._fake_contiguous)):
        monkeypatch.setattr(torch.Tensor, attr, fn)
    reads = fc.HostReads()
    with FakeTensorMode(), reads:
        ps = [torch.nn.Parameter(torch.randn(96, 64, device="cuda")),
              torch.nn.Parameter(torch.randn(32, 16, device="cuda")),
              torch.nn.Parameter(torch.randn(64, device="cuda"))]
        opt = MAKERS[name](ps, "fp8")
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn_like(p)
            opt.step()
        st = opt.state[ps[0]]
        assert st["exp_avg" if name != "muon" else "momentum_buffer"].dtype == FP8_DTYPE
        devices = {t.device.type for s in opt.state.values() for t in s.values()
                   if isinstance(t, torch.Tensor) and t.ndim > 0}
    assert devices == {"cuda"}
    assert reads.reads == []
