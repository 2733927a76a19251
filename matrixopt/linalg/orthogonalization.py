r"""Approximate matrix sign (the Muon orthogonalisation) by odd polynomial iteration.

For :math:`G = U S V^\top` (thin SVD), :math:`\operatorname{msign}(G) = U V^\top`.
:func:`orthogonalize` approximates it with a fixed number of odd quintic steps

.. math::
    A = X X^\top,\qquad B = b_t A + c_t A^2,\qquad X \leftarrow a_t X + B X,

which map every singular value :math:`\sigma` of the normalised input through the
scalar composition :math:`p_T(\cdots p_1(\sigma))`, :math:`p_t(x) = a_t x + b_t x^3 + c_t x^5`
(Jordan et al. 2024, "Muon"; Amsel et al. 2025, "The Polar Express"). The
coefficient schedules live in :mod:`matrixopt.linalg.coefficients`.

Cost per step for an :math:`m\times n` matrix with :math:`k = \min(m, n)`,
:math:`l = \max(m, n)`: :math:`4k^2 l + 2k^3` flops (the Gram product, the
square of the Gram matrix, the update). Tall matrices use
:math:`A = X^\top X` and :math:`X \leftarrow a X + X B`, so no transpose is
materialised. The Gram Newton–Schulz variant (``method="gram"``) replaces most
of the :math:`k^2 l` work with :math:`k^3` work; see :func:`orthogonalize_flops`.

Steps may also use degree-7/9 odd polynomials, coefficients
:math:`(c_0, \dots, c_4)`, :math:`X \leftarrow q(A) X` with
:math:`q(\lambda) = \sum_j c_j\lambda^j` evaluated in a Chebyshev basis (see
``_sym_poly``): one more k×k product (:math:`4k^2 l + 4k^3` per step) for a much larger gain
per step, so fewer of the expensive k×l passes are needed -- the
``"polar_express_nonic"`` preset's 3 steps cost 0.69× the flops of 5 quintic
steps on GPT-2 shapes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from types import ModuleType

import torch
from torch import Tensor

from ._checks import check_choice, check_dtype, check_matrix
from ._checks import check_finite as _check_finite
from .coefficients import Coefficients, preset_safety, resolve_coefficients

__all__ = ["orthogonalize", "resolve_backend", "resolve_method", "orthogonalize_flops"]

METHODS = ("auto", "standard", "gram")
NORMALIZATIONS = ("frobenius", "spectral", "aol")
BACKENDS = ("auto", "torch", "triton")

#: ``method="auto"`` picks the Gram iteration when its flop count is below this
#: fraction of the standard iteration's: its k×k products run at a lower rate
#: than the k×l ones on CPUs and GPUs alike (smaller GEMMs), so a bare flop win
#: is not enough.
GRAM_FLOP_RATIO = 0.85


# --------------------------------------------------------------- dispatch
def resolve_backend(G: Tensor, backend: str = "auto", dtype: torch.dtype | None = None) -> str:
    """Which kernels :func:`orthogonalize` uses for ``G``: ``"torch"`` or ``"triton"``.

    * ``"torch"``: the ops of :mod:`matrixopt.kernels.reference` (any device).
    * ``"triton"``: the launchers of :mod:`matrixopt.kernels.triton_ops`;
      ``RuntimeError`` if Triton does not import or cannot run on ``G``'s device
      (a CUDA device, or any device under ``TRITON_INTERPRET=1``).
    * ``"auto"``: Triton only if ``G`` is on CUDA, Triton imports, and
      ``triton_ops.should_dispatch(m, n, dtype)`` accepts the shape and the
      iteration dtype (``dtype``, default ``G.dtype``); the torch ops otherwise.

    The decision depends on the arguments only (no global switch, no
    environment variable beyond Triton's own interpreter flag).
    """
    check_choice(backend, "backend", BACKENDS)
    if backend == "torch":
        return "torch"
    if backend == "triton":
        try:
            from ..kernels import (
                is_available,
                triton_ops,  # noqa: F401
            )
        except ImportError as e:
            raise RuntimeError(f"backend='triton' needs triton, which failed to import: {e}") from e
        if not is_available(G.device):
            raise RuntimeError(
                f"backend='triton' needs a CUDA tensor with CUDA available (or TRITON_INTERPRET=1 "
                f"for the CPU interpreter); got a tensor on {G.device}, "
                f"torch.cuda.is_available()={torch.cuda.is_available()}")
        return "triton"
    if G.device.type != "cuda" or not torch.cuda.is_available():
        return "torch"
    try:
        from ..kernels import triton_ops
    except ImportError:
        return "torch"
    m, n = int(G.shape[-2]), int(G.shape[-1])
    return "triton" if triton_ops.should_dispatch(m, n, dtype or G.dtype) else "torch"


def _ops(backend: str) -> ModuleType:
    if backend == "triton":
        from ..kernels import triton_ops
        return triton_ops
    from ..kernels import reference
    return reference


def _segments(steps: int, restart_every: int | None) -> list[int]:
    """Lengths of the Gram-iteration segments between restarts."""
    if restart_every is None or restart_every >= steps:
        return [steps]
    full, rest = divmod(steps, restart_every)
    return [restart_every] * full + ([rest] if rest else [])


def _products(step: tuple[float, ...]) -> int:
    """k×k products :func:`_sym_poly` spends on one step's coefficients."""
    if len(step) == 2 or (len(step) == 3 and step[2] == 0.0):
        return 0
    return 1 if len(step) == 3 else 2


def orthogonalize_flops(m: int, n: int, steps: int | Sequence[tuple[float, ...]],
                        method: str = "standard", restart_every: int | None = 2) -> int:
    r"""Flop count of :func:`orthogonalize`'s iteration (matrix products only, dense GEMMs).

    ``steps`` is a step count (quintic steps) or the schedule itself (a list
    of coefficient tuples, e.g. from
    :func:`~matrixopt.linalg.coefficients.resolve_coefficients`), whose
    degree-7/9 steps cost one more k×k product (:math:`2k^3`) and cubic steps
    one fewer.

    With :math:`k = \min(m, n)`, :math:`l = \max(m, n)`, :math:`T` quintic steps:

    * standard: :math:`T\,(4k^2 l + 2k^3)`.
    * gram (Zhang, Amsel, Chen, Dao 2026): the steps are split into segments
      by the restarts; a segment of :math:`s` steps computes
      :math:`R = XX^\top` once (:math:`2k^2 l`), then per step
      :math:`R^2` (:math:`2k^3`), the accumulated factor :math:`Q \leftarrow HQ`
      (:math:`2k^3`, not on its first step) and :math:`R \leftarrow HRH`
      (:math:`4k^3`, not on its last step), and ends with :math:`X \leftarrow QX`
      (:math:`2k^2 l`): :math:`4k^2 l + (8s - 6)k^3` for :math:`s \ge 2`,
      :math:`4k^2 l + 2k^3` for :math:`s = 1`.

    Example, 5 steps restarted every 2 (segments 2, 2, 1):
    :math:`12k^2 l + 22k^3` against :math:`20k^2 l + 10k^3`; at :math:`l = 4k`
    that is 70 against 90 (×k³), at :math:`l = k` 34 against 30 (no gain).
    """
    check_choice(method, "method", ("standard", "gram"))
    k, l = min(m, n), max(m, n)
    if isinstance(steps, int):
        extra, count = 0, steps
    else:
        extra, count = sum(2 * (_products(st) - 1) * k**3 for st in steps), len(steps)
    if method == "standard":
        return count * (4 * k * k * l + 2 * k**3) + extra
    total = extra
    for s in _segments(count, restart_every):
        total += 4 * k * k * l + (2 if s == 1 else 8 * s - 6) * k**3
    return total


def resolve_method(m: int, n: int, steps: int | Sequence[tuple[float, ...]], method: str = "auto",
                   restart_every: int | None = 2, dtype: torch.dtype | None = None) -> str:
    """``"standard"`` or ``"gram"`` for an ``m×n`` iteration of ``steps`` steps in ``dtype``.

    ``"auto"`` picks gram when the iteration dtype is not bfloat16 and
    ``orthogonalize_flops(gram) < GRAM_FLOP_RATIO · orthogonalize_flops(standard)``
    (0.85; with the defaults: aspect ratio ``max(m,n)/min(m,n)`` above 2.5).

    Why not bfloat16: the accumulated factor Q has eigenvalues from about 1
    (directions of large σ) up to the product of the ``a_t`` (≈ 33 after the two
    first Polar Express steps), and it is stored in the iteration dtype, so the
    large-σ directions of ``X ← QX`` carry an absolute error of about
    ``a_1 a_2 · 2⁻⁹`` ≈ 6 % with bfloat16's 8-bit mantissa; with a tight
    normalisation (``"spectral"``) that pushes σ past the schedule's range and
    the iteration diverges (measured: ‖out‖₂ = 33 instead of 1.14 on a
    256×1024 log-uniform spectrum; with ``"frobenius"`` too on low-rank inputs).
    Float16 (the Gram Newton–Schulz paper's choice, 11-bit mantissa) is 8× more
    precise, so :func:`orthogonalize` runs an explicit ``method="gram"`` with a
    bfloat16 ``dtype`` in float16.
    """
    check_choice(method, "method", METHODS)
    if method != "auto":
        return method
    if dtype == torch.bfloat16:
        return "standard"
    gram = orthogonalize_flops(m, n, steps, "gram", restart_every)
    std = orthogonalize_flops(m, n, steps, "standard", restart_every)
    return "gram" if gram < GRAM_FLOP_RATIO * std else "standard"


def iteration_dtype(dtype: torch.dtype, method: str) -> torch.dtype:
    """The dtype :func:`orthogonalize` iterates (and returns its last iterate) in for a
    requested ``dtype``: float16 for ``method="gram"`` with bfloat16 (see
    :func:`resolve_method`: bf16 rounding of the accumulated factor diverges), else
    ``dtype``. ``"auto"`` never picks gram in bfloat16, so it keeps ``dtype``."""
    return torch.float16 if method == "gram" and dtype == torch.bfloat16 else dtype


# ------------------------------------------------------------ normalisation
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else is normalised in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _frobenius_normalized(X: Tensor, s: float, work: torch.dtype) -> Tensor:
    """``X / (s·‖X‖_F)`` per matrix, as a new tensor of dtype ``work``; zero stays zero.

    The norm is accumulated in float32 (float64 for float64 input) straight from
    ``X``. If it overflowed or underflowed (float32 squares of entries beyond
    ~1e±19), ``X`` is first divided by its largest entry, so 1e30 and 1e-30 scales
    give the same result as scale 1. On CPU that check is a free host test; on
    other devices the safe path is always taken (no host synchronisation).
    """
    acc = _acc_dtype(X.dtype)
    nrm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True, dtype=acc)
    threshold = math.sqrt(torch.finfo(acc).tiny) * 1e6  # squares well above underflow
    if X.device.type != "cpu" or not bool((torch.isfinite(nrm) & (nrm > threshold)).all()):
        amax = X.abs().amax(dim=(-2, -1), keepdim=True).to(acc)
        X = X.to(acc) / torch.where(amax > 0, amax, torch.ones_like(amax))
        nrm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True)
    inv = torch.where(nrm > 0, (nrm * s).reciprocal(), torch.zeros_like(nrm))
    if work == torch.float16 and X.dtype != torch.float16:
        return (X.to(acc) * inv).to(work)  # scale before the cast: float16's range is small
    return _scale_(X.to(work, copy=True), inv)


def _scale_(X: Tensor, scale: Tensor) -> Tensor:
    """``X * scale`` (``scale`` broadcastable, float32/64), in place unless ``X`` is float16.

    For bfloat16 ``X`` the scale is rounded to bfloat16 first (relative error
    2⁻⁹, which the safety factor covers): a bf16 tensor times an fp32 tensor
    takes a slow type-promoting path (measured 38 ms against 5 ms for a
    4×768×3072 batch). float16 multiplies in float32, since a scale can leave
    float16's range.
    """
    if X.dtype == torch.float16:  # a new tensor: callers use the return value
        return (X.float() * scale).to(torch.float16)
    return X.mul_(scale.to(X.dtype))


def _rounded(scale: Tensor, dtype: torch.dtype) -> Tensor:
    """The value :func:`_scale_` actually multiplies by, in ``scale``'s dtype."""
    return scale.to(dtype).to(scale.dtype) if dtype == torch.bfloat16 else scale


def _eye_plus(B: Tensor, a: float) -> Tensor:
    H = B.clone()
    H.diagonal(dim1=-2, dim2=-1).add_(a)
    return H


# ---------------------------------------------------------------- main op
def orthogonalize(
    G: Tensor,
    *,
    steps: int | None = None,
    coefficients: str | Coefficients | Sequence[Coefficients] = "polar_express",
    normalization: str = "frobenius",
    dtype: torch.dtype | None = None,
    method: str = "auto",
    backend: str = "auto",
    restart_every: int | None = 2,
    safety: float | None = None,
    check_finite: bool = False,
) -> Tensor:
    r"""Approximate :math:`\operatorname{msign}(G) = UV^\top` for ``G`` of shape ``[..., m, n]``.

    Normalise so every singular value is at most 1, then run the odd quintic
    steps of the schedule (see the module docstring). The result is
    :math:`U\,P(\hat S)\,V^\top` with :math:`P` the schedule's scalar composition
    and :math:`\hat S` the normalised singular values, i.e. an approximate polar
    factor whose accuracy the schedule promises on :math:`[\ell, 1]` (see
    :mod:`matrixopt.linalg.coefficients`); it is not converged to a tolerance
    (use :func:`matrixopt.linalg.polar` for that, or the ``"newton_schulz"``
    preset). Batched over the leading dimensions; no host synchronisation
    on accelerators.

    Args:
        G: real floating tensor ``[..., m, n]`` (float16/bfloat16/float32/float64).
        steps: number of polynomial steps; ``None`` = the schedule's own length.
            Longer than the schedule repeats its tail, shorter truncates it
            (:func:`~matrixopt.linalg.coefficients.resolve_coefficients`).
        coefficients: a preset name (``"polar_express"`` default, ``"keller"``,
            ``"you"``, ``"polar_express_8"``, ``"polar_express_nonic"``, ``"cans"``,
            ``"newton_schulz"``, ``"newton_schulz_cubic"``), one ``(a, b, c)`` or a
            list of them; a step may also be a degree-7/9 tuple ``(c_0, ..., c_4)``.
        normalization: how σ_max ≤ 1 is ensured; the estimate ν is multiplied by
            ``safety`` and the input divided by it (computed in float32 or better;
            the result is invariant to positive rescaling of ``G``, 1e±30 scales
            included, and a zero matrix gives zeros -- there is no ``eps``: unlike
            torch.optim.Muon's ``‖G‖ + eps``, tiny inputs are not shrunk):

            * ``"frobenius"``: ν = ‖X‖_F. Classic; under-estimates small
              singular values' scale by up to √rank, wasting early steps.
            * ``"spectral"``: ν = the Schatten-8 norm
              :math:`(\sum_i \sigma_i^8)^{1/8} = \|(XX^\top)^2\|_F^{1/4}`, a
              guaranteed upper bound of σ_max that over-estimates it by at most
              :math:`\operatorname{rank}^{1/8}` (≤ 2.3 at rank 768; Frobenius:
              √rank ≈ 27.7). It is power iteration done on the whole matrix;
              it reuses the first step's Gram matrix and costs one extra k×k
              product (2k³ flops, 4–10 % of one step).
            * ``"aol"``: AOL diagonal scaling (Prach & Lampert 2022; Boissin et
              al. 2025, "Turbo-Muon") on the short side,
              :math:`d_i = (\sum_j |XX^\top|_{ij})^{-1/2}`, which guarantees
              :math:`\|DX\|_2 \le 1` and reuses the first Gram matrix. Note the
              iteration then approximates :math:`\operatorname{msign}(DX)`, which
              differs from :math:`\operatorname{msign}(X)` unless D is a multiple
              of the identity (Turbo-Muon trains with it; the benchmark's
              ``max|uᵀOv−1|`` column shows the difference).
        dtype: dtype the iteration runs in; ``None`` = ``G.dtype`` (never forced).
            The output always has ``G.dtype``.
        method: ``"standard"`` (the iteration above), ``"gram"`` (Gram
            Newton–Schulz, Zhang, Amsel, Chen & Dao 2026: iterate on the short-side
            Gram matrix :math:`R = XX^\top` and an accumulated factor
            :math:`Q` with :math:`R \leftarrow H R H`, :math:`Q \leftarrow H Q`,
            :math:`H = aI + bR + cR^2`, touching the :math:`m\times n` matrix only
            at the start, at restarts and at the end, :math:`X \leftarrow QX`), or
            ``"auto"``: gram when it saves enough flops
            (:func:`resolve_method`: aspect ratio above 2.5 with the defaults,
            never square matrices, never a bfloat16 iteration, whose rounding
            the accumulated factor Q amplifies). An explicit ``method="gram"``
            with a bfloat16 ``dtype`` runs the Gram iteration in float16
            (8× finer mantissa, same tensor-core rate on GPUs; the input is
            normalised in float32 first, so float16's range is not an issue):
            in bfloat16 it diverges (measured σ_max up to 6·10⁵ on low-rank
            512×128 inputs, 47 on a 64×32 Gaussian with ``"aol"``).
        backend: ``"auto"``, ``"torch"`` or ``"triton"``; see :func:`resolve_backend`.
        restart_every: Gram method only: recompute :math:`R` from the current
            :math:`X` every this many steps (default 2: after steps 2, 4, ...),
            which stops round-off drift of :math:`R` in half precision; ``None``
            never restarts.
        safety: normalisation safety factor (≥ 1); ``None`` = the preset's
            (1.02 for ``"polar_express"`` and ``"cans"``, 1.01 for
            ``"polar_express_8"``, 1 otherwise and for explicit coefficients).
        check_finite: raise ``ValueError`` if ``G`` holds NaN/Inf (one host sync).

    Returns:
        A tensor of ``G``'s shape and dtype.

    Raises:
        TypeError: ``G`` not a real floating tensor (integer, complex, ...).
        ValueError: ``G`` with fewer than 2 dims, unknown preset/method/
            normalization/backend, malformed coefficients, ``steps`` < 1,
            bad ``restart_every``/``safety``.
        RuntimeError: ``backend="triton"`` where Triton cannot run.

    Cost: :func:`orthogonalize_flops`, plus O(mn) elementwise work for the
    normalisation.
    """
    G = check_matrix(G, "G")
    work = check_dtype(dtype, "dtype") or G.dtype
    check_choice(normalization, "normalization", NORMALIZATIONS)
    schedule = resolve_coefficients(coefficients, steps)  # validates coefficients and steps
    if restart_every is not None and (isinstance(restart_every, bool)
                                      or not isinstance(restart_every, int) or restart_every < 1):
        raise ValueError(f"restart_every must be None or an int >= 1, got {restart_every!r}")
    s = preset_safety(coefficients) if safety is None else safety
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s < 1.0:
        raise ValueError(f"safety must be a finite number >= 1, got {safety!r}")
    if check_finite:
        _check_finite(G, "G")
    *batch, m, n = G.shape
    meth = resolve_method(m, n, schedule, method, restart_every, work)
    work = iteration_dtype(work, meth)
    ops = _ops(resolve_backend(G, backend, work))
    if G.numel() == 0:
        return torch.zeros_like(G)

    right = m > n  # tall: work with the n×n Gram XᵀX and multiply from the right
    X = G.reshape(-1, m, n)
    if normalization == "frobenius":
        X = _frobenius_normalized(X, float(s), work)
        A = None
    else:
        # Frobenius first (σ ≤ 1 so nothing overflows in half precision), then
        # refine with the first Gram matrix, which the iteration needs anyway.
        X = _frobenius_normalized(X, 1.0, work)
        A = ops.gram(X, transpose=right)
        Aacc = A.to(_acc_dtype(A.dtype))
        if normalization == "spectral":
            # ‖A²‖_F^(1/4) = (Σσ⁸)^(1/8) >= σ_max. A² costs 2k³ (a few % of the
            # iteration); it is not reused in the first step because a rounded
            # A² times c (≈ 16) would add c·2⁻⁹ errors that sym_poly's fused
            # b·A + c·A² (one rounding after fp32 accumulation) avoids.
            A2 = Aacc @ Aacc if A.dtype == Aacc.dtype else ops.sym_poly(A, 0.0, 1.0)
            t = torch.linalg.vector_norm(A2, dim=(-2, -1), keepdim=True,
                                         dtype=Aacc.dtype).pow(0.25) * s
            inv = _rounded(torch.where(t > 0, t.reciprocal(), torch.ones_like(t)), work)
            X = _scale_(X, inv)
            A = (Aacc * inv**2).to(work)
        else:  # aol: ‖D X‖₂ ≤ 1 for d_i = (Σ_j |A_ij|)^(-1/2)
            rows = Aacc.abs().sum(dim=-1, keepdim=True)
            d = torch.where(rows > 0, rows.rsqrt(), torch.zeros_like(rows)) / s  # [B, k, 1]
            d = _rounded(d, work)
            X = _scale_(X, d.mT if right else d)
            A = (d * Aacc * d.mT).to(work)

    if meth == "standard":
        X = _standard(ops, X, schedule, right, A)
    else:
        X = _gram_ns(ops, X, schedule, right, restart_every, A)
    return X.reshape(G.shape).to(G.dtype)


def _standard(ops: ModuleType, X: Tensor, schedule: list[tuple[float, ...]],
              right: bool, A: Tensor | None) -> Tensor:
    """X ← a X + B(A) X per step (X B for tall X, with A = XᵀX); see :func:`_sym_poly`."""
    bounds = _lambda_bounds(tuple(schedule))
    for t, (a, *rest) in enumerate(schedule):
        if A is None:
            A = ops.gram(X, transpose=right)
        B, a_eff = _sym_poly(ops, A, a, rest, bounds[t])
        X = ops.poly_step(X, B, a_eff, right=right)
        A = None
    return X


@functools.lru_cache(maxsize=64)
def _lambda_bounds(schedule: tuple[tuple[float, ...], ...]) -> tuple[float, ...]:
    """Upper bound of the Gram eigenvalues λ = σ² entering each step, with a 10 % margin.

    Step 1 sees normalised σ ≤ 1; step t the image of [0, 1] under steps 1..t−1
    (maximum on a fine grid, float64). Used to map λ to [−1, 1] for the
    Chebyshev evaluation of degree-7/9 steps.
    """
    # pure Python floats: no torch ops, so this also runs under fake-tensor modes
    xs = [i / 4000.0 for i in range(4001)]
    out = []
    for coeffs in schedule:
        out.append(1.1 * max(abs(x) for x in xs) ** 2)
        xs = [sum(c * x ** (2 * j + 1) for j, c in enumerate(coeffs)) for x in xs]
    return tuple(out)


def _fused(C: Tensor, X: Tensor, Y: Tensor, alpha: float) -> Tensor:
    """``C + alpha·X@Y`` batched, one rounding after float32 accumulation (baddbmm)."""
    shape = C.shape
    C3, X3, Y3 = (T.reshape(-1, *shape[-2:]) for T in (C, X, Y))
    return torch.baddbmm(C3, X3, Y3, alpha=alpha).reshape(shape)


def _sym_poly(ops: ModuleType, A: Tensor, a: float, rest: list[float] | tuple[float, ...],
              lam_max: float = 1.0) -> tuple[Tensor, float]:
    r"""The step's k×k factor: ``(B, a')`` with the update :math:`X \leftarrow a' X + B X`.

    * cubic (``c = 0``): :math:`B = bA`, no product. (Also a workaround: torch
      2.13's CPU ``baddbmm`` ignores ``alpha=0`` for batched bfloat16/float16
      inputs, which made the cubic preset diverge in bf16.)
    * quintic: :math:`B = bA + cA^2`, one fused product; :math:`a' = a`.
    * degree 7/9: :math:`B = q(A)` for :math:`q(\lambda) = \sum_j c_j \lambda^j`
      (the whole polynomial, :math:`a' = 0`), evaluated in the Chebyshev basis
      of :math:`\tau = 2A/L - I` (``L`` = ``lam_max`` ≥ the largest λ):
      :math:`T_2 = 2\tau^2 - I`, :math:`q = (d_0 - d_4) + (d_1 - d_3)\tau + d_2 T_2
      + T_2(2d_3\tau + 2d_4 T_2)` -- two fused products (4k³ flops). The
      monomial form would multiply bf16-rounded :math:`A^2` by coefficients of
      several hundred (the first step of a degree-9 schedule for ℓ = 1e-3 has
      :math:`c_3 ≈ -489`) and diverges in bfloat16; Chebyshev coefficients are
      bounded by about twice :math:`\max|q|` on the interval.
    """
    if len(rest) == 2 and rest[1] == 0.0:
        return (A * rest[0]).to(A.dtype), a
    if len(rest) == 2:
        return ops.sym_poly(A, rest[0], rest[1]), a
    d = _chebyshev_coefficients((a, *rest), lam_max)
    # τ in [−1, 1] is formed first (rounding 2⁻⁹·|τ|); forming I − (8/L)A + (8/L²)A²
    # from A directly would round entries of size 8/L·|A| before the cancellation.
    tau = A.mul(2.0 / lam_max)
    tau.diagonal(dim1=-2, dim2=-1).add_(-1.0)
    minus_eye = torch.zeros_like(A)
    minus_eye.diagonal(dim1=-2, dim2=-1).fill_(-1.0)
    T2 = _fused(minus_eye, tau, tau, 2.0)
    high = T2.mul(2.0 * d[4]).add_(tau, alpha=2.0 * d[3])
    low = T2.mul(d[2]).add_(tau, alpha=d[1] - d[3])
    low.diagonal(dim1=-2, dim2=-1).add_(d[0] - d[4])
    return _fused(low, T2, high, 1.0), 0.0


@functools.lru_cache(maxsize=256)
def _chebyshev_coefficients(q: tuple[float, ...], lam_max: float) -> tuple[float, ...]:
    r"""Coefficients :math:`d_0..d_4` of :math:`q(\lambda) = \sum_j q_j \lambda^j` in the
    Chebyshev basis of :math:`\tau = 2\lambda/L - 1` (``L`` = ``lam_max``), float64.

    Substitute :math:`\lambda = L(1 + \tau)/2` (monomial coefficients in τ), then
    convert monomials to Chebyshev polynomials by Horner's scheme in the Chebyshev
    basis (:math:`\tau T_0 = T_1`, :math:`\tau T_k = (T_{k+1} + T_{k-1})/2`).
    """
    half = lam_max / 2.0
    mono = [0.0] * len(q)  # q(half·(1 + τ)) in powers of τ, by Horner in λ
    for qj in reversed(q):
        nxt = [0.0] * len(q)
        for i, v in enumerate(mono):  # mono · half·(1 + τ)
            nxt[i] += half * v
            if i + 1 < len(q):
                nxt[i + 1] += half * v
        nxt[0] += qj
        mono = nxt
    cheb = [0.0] * (len(q) + 1)
    for cj in reversed(mono):  # cheb ← τ·cheb + cj
        times: list[float] = [0.0] * (len(q) + 1)
        for k, v in enumerate(cheb):
            if v == 0.0:
                continue
            if k == 0:
                times[1] += v
            else:
                times[k - 1] += v / 2.0
                if k + 1 < len(times):
                    times[k + 1] += v / 2.0
        times[0] += cj
        cheb = times
    return tuple(cheb[:5]) + (0.0,) * (5 - min(5, len(cheb)))


def _gram_ns(ops: ModuleType, X: Tensor, schedule: list[tuple[float, ...]],
             right: bool, restart_every: int | None, R: Tensor | None) -> Tensor:
    """Gram Newton–Schulz: iterate on R = XXᵀ and Q with X_t = Q X_0 (X_0 Q if tall).

    With H = aI + bR + cR² (a polynomial in R, so it commutes with R):
    X ← H X gives R ← H R H and Q ← H Q; only the k×k matrices are touched
    between restarts.
    """
    Q: Tensor | None = None
    T = len(schedule)
    bounds = _lambda_bounds(tuple(schedule))
    for t, (a, *rest) in enumerate(schedule):
        if Q is not None and restart_every is not None and t % restart_every == 0:
            X = ops.poly_step(X, Q, 0.0, right=right)  # fold the factor into X
            Q, R = None, None
        if R is None:
            R = ops.gram(X, transpose=right)
        B, a = _sym_poly(ops, R, a, rest, bounds[t])
        Q = _eye_plus(B, a) if Q is None else ops.poly_step(Q, B, a, right=right)
        restart_next = restart_every is not None and (t + 1) % restart_every == 0
        if t + 1 < T and not restart_next:
            R = ops.poly_step(ops.poly_step(R, B, a), B, a, right=True)  # H R H
    assert Q is not None
    return ops.poly_step(X, Q, 0.0, right=right)
