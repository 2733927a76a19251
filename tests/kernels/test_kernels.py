"""Triton kernels vs. their torch references, on CPU under Triton's interpreter.

Every comparison is against a float64 result: the kernel's max error must be
at most twice the torch reference's own error (plus a few ulps of the output
scale, for cases where the reference happens to be exact).

The interpreter is switched on per test (``monkeypatch.setenv``), not for the
whole process: :mod:`matrixopt.kernels.triton_ops` reads the mode at every call
and decorates its kernels lazily, once per mode, so other test modules running
in the same worker never see ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton", reason="the Triton kernels need triton (pip install triton)")

import matrixopt.kernels as kernels  # noqa: E402
from matrixopt.kernels import reference as ref  # noqa: E402
from matrixopt.kernels import triton_ops as tops  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _assert_close_to_f64(out: torch.Tensor, torch_out: torch.Tensor, exact: torch.Tensor,
                         what: str) -> None:
    """Kernel error vs float64 at most 2x the torch reference's error (+ 4 ulps of the scale)."""
    assert out.dtype == torch_out.dtype
    assert out.shape == torch_out.shape == exact.shape, (out.shape, exact.shape)
    if exact.numel() == 0:
        return
    err_k = (out.double() - exact).abs().max().item()
    err_t = (torch_out.double() - exact).abs().max().item()
    floor = 4 * torch.finfo(out.dtype).eps * exact.abs().max().item()
    assert err_k <= 2 * err_t + floor, (
        f"{what}: kernel error {err_k:.3e} > 2 x torch error {err_t:.3e} + {floor:.1e}")


def _randn(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=_gen(seed), dtype=torch.float64).to(dtype)


def _sym(batch: tuple[int, ...], k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A symmetric PSD matrix of spectral norm <= 1, as in a Newton–Schulz step."""
    Y = torch.randn(*batch, k, k + 5, generator=_gen(seed), dtype=torch.float64)
    A = Y @ Y.mT / (Y.norm(dim=(-2, -1), keepdim=True) ** 2)
    return ((A + A.mT) / 2).to(dtype)  # exactly symmetric after rounding


# ----------------------------------------------------------------------------- gram

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transpose", [False, True])
def test_gram_matches_reference(dtype: torch.dtype, transpose: bool) -> None:
    # 37 x 53: neither a multiple of the 16-wide interpreter tile; 3 or 4 tiles
    # per side exercises the triangle mapping, the mirror store and the masks.
    X = _randn((2, 37, 53), dtype, seed=1)
    out = tops.gram(X, transpose=transpose)
    _assert_close_to_f64(out, ref.gram(X, transpose=transpose),
                         ref.gram(X.double(), transpose=transpose), f"gram {dtype} T={transpose}")
    assert torch.equal(out, out.mT), "gram output must be exactly symmetric"


def test_gram_many_tiles_and_leading_dims() -> None:
    # 7 tiles per side (28 lower-triangle tiles) over a [2, 1] batch.
    X = _randn((2, 1, 100, 9), torch.float32, seed=2)
    out = tops.gram(X)
    assert out.shape == (2, 1, 100, 100)
    _assert_close_to_f64(out, ref.gram(X), ref.gram(X.double()), "gram 100x9")


@pytest.mark.parametrize("layout", ["transposed_view", "strided_slice", "expanded_batch"])
def test_gram_non_contiguous_inputs(layout: str) -> None:
    base = _randn((2, 40, 36), torch.float16, seed=3)
    if layout == "transposed_view":  # column-major matrices, used through strides
        X = base.mT
    elif layout == "strided_slice":  # no unit stride: the launcher copies
        X = base[:, :, ::2]
    else:  # batch stride 0
        X = base[:1].expand(3, -1, -1)
    assert not X.is_contiguous()
    for transpose in (False, True):
        _assert_close_to_f64(tops.gram(X, transpose=transpose), ref.gram(X, transpose=transpose),
                             ref.gram(X.double(), transpose=transpose), f"gram {layout}")


@settings(max_examples=8, deadline=None)
@given(batch=st.sampled_from([(), (1,), (3,)]), m=st.integers(1, 33), n=st.integers(1, 33),
       transpose=st.booleans())
def test_gram_property_shapes(batch: tuple[int, ...], m: int, n: int, transpose: bool) -> None:
    # (the autouse fixture's environment stays set across hypothesis examples)
    X = _randn((*batch, m, n), torch.float32, seed=m * 100 + n)
    _assert_close_to_f64(tops.gram(X, transpose=transpose), ref.gram(X, transpose=transpose),
                         ref.gram(X.double(), transpose=transpose), f"gram {X.shape}")


# ------------------------------------------------------------------------- sym_poly

@pytest.mark.parametrize("dtype", DTYPES)
def test_sym_poly_matches_reference(dtype: torch.dtype) -> None:
    A = _sym((3,), 41, dtype, seed=4)
    b, c = -4.7750, 2.0315  # Keller Jordan's Muon coefficients
    out = tops.sym_poly(A, b, c)
    _assert_close_to_f64(out, ref.sym_poly(A, b, c), ref.sym_poly(A.double(), b, c),
                         f"sym_poly {dtype}")
    assert torch.equal(out, out.mT), "sym_poly output must be exactly symmetric"


def test_sym_poly_unbatched_and_single_tile() -> None:
    for k in (1, 16, 17):
        A = _sym((), k, torch.float32, seed=5 + k)
        _assert_close_to_f64(tops.sym_poly(A, 0.5, -1.25), ref.sym_poly(A, 0.5, -1.25),
                             ref.sym_poly(A.double(), 0.5, -1.25), f"sym_poly k={k}")


# ------------------------------------------------------------------------ poly_step

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("right", [False, True])
def test_poly_step_matches_reference(dtype: torch.dtype, right: bool) -> None:
    m, n = 21, 35
    X = _randn((2, m, n), dtype, seed=6)
    k = n if right else m
    B = (_sym((2,), k, torch.float64, seed=7) * -2.0).to(dtype)
    a = 3.4445
    out = tops.poly_step(X, B, a, right=right)
    _assert_close_to_f64(out, ref.poly_step(X, B, a, right=right),
                         ref.poly_step(X.double(), B.double(), a, right=right),
                         f"poly_step {dtype} right={right}")


def test_poly_step_general_B_and_views() -> None:
    # B need not be symmetric; X given as a transposed view with leading dims [2, 2].
    X = _randn((2, 2, 30, 19), torch.float32, seed=8).mT  # [2, 2, 19, 30]
    for right, k in ((False, 19), (True, 30)):
        B = _randn((2, 2, k, k), torch.float32, seed=9 + k) / k
        _assert_close_to_f64(tops.poly_step(X, B, -0.5, right=right),
                             ref.poly_step(X, B, -0.5, right=right),
                             ref.poly_step(X.double(), B.double(), -0.5, right=right),
                             f"poly_step view right={right}")


@settings(max_examples=6, deadline=None)
@given(m=st.integers(1, 24), n=st.integers(1, 24), right=st.booleans(),
       dtype=st.sampled_from(DTYPES))
def test_poly_step_property_shapes(m: int, n: int, right: bool, dtype: torch.dtype) -> None:
    X = _randn((m, n), dtype, seed=m + 31 * n)
    k = n if right else m
    B = (_randn((k, k), torch.float64, seed=m * n + 1) / k).to(dtype)
    _assert_close_to_f64(tops.poly_step(X, B, 1.875, right=right),
                         ref.poly_step(X, B, 1.875, right=right),
                         ref.poly_step(X.double(), B.double(), 1.875, right=right),
                         f"poly_step {dtype} {m}x{n} right={right}")


# ------------------------------------------------------- composition, edge cases, errors

def test_one_newton_schulz_step_composes() -> None:
    """gram -> sym_poly -> poly_step equals the same step done in float64."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X64 = torch.randn(2, 20, 45, generator=_gen(10), dtype=torch.float64)
    X64 = X64 / X64.norm(dim=(-2, -1), keepdim=True)
    X = X64.to(torch.bfloat16)

    def step(ops, Y: torch.Tensor) -> torch.Tensor:
        A = ops.gram(Y)
        return ops.poly_step(Y, ops.sym_poly(A, b, c), a)

    _assert_close_to_f64(step(tops, X), step(ref, X), step(ref, X.double()), "NS step")


@pytest.mark.parametrize("shape", [(0, 5, 7), (2, 0, 7), (2, 5, 0)])
def test_empty_inputs(shape: tuple[int, ...]) -> None:
    # Expected values written out: an empty K gives a zero Gram matrix. (The torch
    # reference's reshape(-1, ...) cannot flatten some of these shapes.)
    nb, m, n = shape
    X = torch.ones(shape)
    assert torch.equal(tops.gram(X), torch.zeros(nb, m, m))
    assert torch.equal(tops.gram(X, transpose=True), torch.zeros(nb, n, n))
    assert tops.poly_step(X, torch.ones(nb, m, m), 2.0).shape == shape
    assert tops.poly_step(X, torch.ones(nb, n, n), 2.0, right=True).shape == shape
    assert tops.sym_poly(torch.ones(nb, m, m), 1.0, 1.0).shape == (nb, m, m)


def test_int64_batch_offsets() -> None:
    """Regression: batch offsets beyond 2**31 elements (pitfall: [320, 2560, 3072]).

    Three small matrices sit 2**30 + 64 elements apart in one 4.3 GB bfloat16
    buffer, so the third starts past 2**31. Only the touched pages are ever
    allocated. With int32 offset arithmetic the kernel addresses memory 4 GB
    before the buffer and crashes, hence a subprocess.
    """
    script = textwrap.dedent("""
        import json, torch
        from matrixopt.kernels import reference as ref, triton_ops as tops
        S = 2**30 + 64
        try:
            buf = torch.empty(2 * S + 4096, dtype=torch.bfloat16)
        except RuntimeError as e:
            print(json.dumps({"skip": str(e)})); raise SystemExit(0)
        g = torch.Generator().manual_seed(0)
        def view(off, rows, cols):
            v = buf.as_strided((3, rows, cols), (S, cols, 1), off)
            v.copy_(torch.randn(3, rows, cols, generator=g))
            return v
        X = view(0, 17, 19)
        A = view(17 * 19, 18, 18)
        A.copy_((A + A.mT) / 8)
        B = view(17 * 19 + 18 * 18, 19, 19)
        B.copy_(B / 8)
        B17 = B[:, :17, :17].contiguous()
        cases = {  # name: (function of (ops, X, A, B, B17), ...)
            "gram": lambda o, X, A, B, B17: o.gram(X),
            "gram_t": lambda o, X, A, B, B17: o.gram(X, transpose=True),
            "sym_poly": lambda o, X, A, B, B17: o.sym_poly(A, 0.5, 2.0),
            "poly_step": lambda o, X, A, B, B17: o.poly_step(X, B17, 1.5),
            "poly_step_right": lambda o, X, A, B, B17: o.poly_step(X, B, 1.5, right=True),
        }
        args, args64 = (X, A, B, B17), tuple(t.double() for t in (X, A, B, B17))
        res = {}
        for name, f in cases.items():
            out, torch_out, exact = f(tops, *args), f(ref, *args), f(ref, *args64)
            # per batch entry: kernel error and torch error vs float64, output scale
            res[name] = [((out[i].double() - exact[i]).abs().max().item(),
                          (torch_out[i].double() - exact[i]).abs().max().item(),
                          exact[i].abs().max().item()) for i in range(3)]
        print(json.dumps(res))
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (
        f"kernel process died (rc={proc.returncode}); int32 offset overflow?\n"
        f"{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in res:
        pytest.skip(f"cannot reserve 4.3 GB of virtual memory for this test: {res['skip']}")
    for name, errs in res.items():
        for i, (err_k, err_t, scale) in enumerate(errs):
            floor = 4 * torch.finfo(torch.bfloat16).eps * scale
            assert err_k <= 2 * err_t + floor, (
                f"{name}[{i}]: kernel error {err_k:.3e}, torch error {err_t:.3e}")


def test_cpu_tensor_without_interpreter_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    X = torch.ones(4, 4)
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        tops.gram(X)
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        tops.sym_poly(X, 1.0, 1.0)
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        tops.poly_step(X, X, 1.0)
    assert kernels.interpreter_enabled() is False
    assert kernels.is_available("cpu") is False
    assert kernels.is_available() is torch.cuda.is_available()


def test_is_available_under_interpreter() -> None:
    assert kernels.interpreter_enabled() is True
    assert kernels.is_available("cpu") is True
    assert kernels.is_available(torch.device("cpu")) is True


def test_argument_errors() -> None:
    with pytest.raises(TypeError, match="float64"):
        tops.gram(torch.ones(3, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        tops.gram([[1.0]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape"):
        tops.gram(torch.ones(3))
    with pytest.raises(ValueError, match="square"):
        tops.sym_poly(torch.ones(3, 4), 1.0, 1.0)
    X = torch.ones(2, 3, 5)
    with pytest.raises(ValueError, match=r"\(2, 3, 3\)"):
        tops.poly_step(X, torch.ones(2, 5, 5), 1.0)
    with pytest.raises(ValueError, match=r"\(2, 5, 5\)"):
        tops.poly_step(X, torch.ones(1, 5, 5), 1.0, right=True)
    with pytest.raises(ValueError, match="must match"):
        tops.poly_step(X, torch.ones(2, 3, 3, dtype=torch.float16), 1.0)


def test_should_dispatch() -> None:
    big = tops.DISPATCH_MIN_SIZE
    assert tops.should_dispatch(big, 4 * big, torch.bfloat16)
    assert tops.should_dispatch(4 * big, big, torch.float16)
    assert not tops.should_dispatch(big - 1, 4 * big, torch.bfloat16)
    assert not tops.should_dispatch(big, big, torch.float32)
    assert not tops.should_dispatch(big, big, torch.float64)
    with pytest.raises(ValueError, match="m must be"):
        tops.should_dispatch(-1, 3, torch.float16)
    with pytest.raises(TypeError, match="dtype"):
        tops.should_dispatch(3, 3, "bf16")  # type: ignore[arg-type]


def test_package_import_is_light() -> None:
    """``import matrixopt.kernels`` must not import triton (linalg imports it lazily)."""
    code = ("import sys, matrixopt.kernels; "
            "print(sorted(m for m in ('triton', 'matrixopt.kernels.triton_ops') "
            "if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={k: v for k, v in os.environ.items()
                                            if k != "TRITON_INTERPRET"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]", proc.stdout


# ------------------------------------------------- compiled path, without a GPU

def _aot_compile(body, ptrs: tuple[str, ...], unit_strides: tuple[str, ...], dtype: str,
                 config, arch: int):
    """Compile ``body`` ahead of time for ``sm_<arch>`` (Triton's compiler + ptxas, no GPU).

    Arguments are specialised as a launch on row-major, 16-aligned tensors
    specialises them: unit strides become constants, other ints and pointers
    are marked 16-divisible.
    """
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    const = {**config.kwargs, "UPCAST": False, "ROUND_BF16": False,
             "PRECISION": "ieee" if dtype == "fp32" else "tf32"}
    sig, attrs = {}, {}
    for i, name in enumerate(inspect.signature(body).parameters):
        if name in const or name in unit_strides:
            sig[name] = "constexpr"
            const.setdefault(name, 1)
        elif name in ptrs:
            sig[name], attrs[(i,)] = "*" + dtype, [["tt.divisibility", 16]]
        elif name.startswith("coef"):
            sig[name] = "fp32"
        else:
            sig[name], attrs[(i,)] = "i32", [["tt.divisibility", 16]]
    src = ASTSource(triton.jit(body), sig, constexprs=const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION is unset")
@pytest.mark.parametrize("arch", [80, 90])  # Ampere (A100), Hopper (H100)
def test_kernels_compile_for_cuda_targets(arch: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled (non-interpreted) path lowers to a cubin for sm_80 and sm_90.

    The interpreter skips Triton's compiler entirely, so this is the only check
    on a CPU-only machine that the kernel bodies are valid compiled Triton.
    One mid-size autotune config per kernel, bfloat16, to keep it quick.
    """
    import triton

    from matrixopt.kernels import _gram, _poly

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # triton.jit must build a JITFunction
    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton build has no NVIDIA backend to compile with")
    cfg_sq = next(c for c in _gram.configs(False) if c.kwargs == {"BLOCK": 64, "BLOCK_K": 32})
    cfg_mm = next(c for c in _poly.configs(False)
                  if [c.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")] == [64, 64, 32])
    jobs = [(_gram.gram_kernel, ("X", "C"), ("stride_xk", "stride_cn"), cfg_sq),
            (_gram.sym_poly_kernel, ("A", "C"), ("stride_an", "stride_cn"), cfg_sq),
            (_poly.poly_kernel, ("P", "Q", "D", "O"),
             ("stride_pk", "stride_qn", "stride_dn", "stride_on"), cfg_mm)]
    for body, ptrs, units, cfg in jobs:
        k = _aot_compile(body, ptrs, units, "bf16", cfg, arch)
        assert len(k.asm["cubin"]) > 0, body.__name__
        assert k.metadata.shared > 0, f"{body.__name__}: no shared-memory tiles (not pipelined?)"


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_kernels_match_reference(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    dev = torch.device("cuda")
    X = _randn((3, 500, 1300), dtype, seed=11).to(dev)
    for transpose in (False, True):
        _assert_close_to_f64(tops.gram(X, transpose=transpose), ref.gram(X, transpose=transpose),
                             ref.gram(X.double(), transpose=transpose), f"gpu gram {dtype}")
    A = _sym((3,), 700, dtype, seed=12).to(dev)
    _assert_close_to_f64(tops.sym_poly(A, -4.775, 2.0315), ref.sym_poly(A, -4.775, 2.0315),
                         ref.sym_poly(A.double(), -4.775, 2.0315), f"gpu sym_poly {dtype}")
    for right, k in ((False, 500), (True, 1300)):
        B = (_sym((3,), k, torch.float64, seed=13) * -2).to(dtype).to(dev)
        _assert_close_to_f64(tops.poly_step(X, B, 3.4445, right=right),
                             ref.poly_step(X, B, 3.4445, right=right),
                             ref.poly_step(X.double(), B.double(), 3.4445, right=right),
                             f"gpu poly_step {dtype} right={right}")


@pytest.mark.gpu
@needs_cuda
def test_gpu_int64_batch_offsets(monkeypatch: pytest.MonkeyPatch) -> None:
    """The [320, 2560, 3072] pitfall on the device: 2.5e9 elements, 5 GB in bfloat16."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    free, _ = torch.cuda.mem_get_info()
    need = 320 * 2560 * 3072 * 2 + 2 * 320 * 2560 * 2560 * 2
    if free < need * 1.2:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    X = torch.randn(320, 2560, 3072, device="cuda", dtype=torch.bfloat16) / 3072**0.5
    G = tops.gram(X)
    for i in (0, 200, 319):  # 319 * 2560 * 3072 > 2**31
        exact = ref.gram(X[i].double())
        torch.testing.assert_close(G[i].double(), exact, rtol=0, atol=0.05)
