r"""Low-rank projector functions for the GaLore family (GaLore, Fira, LDAdam, Flora, APOLLO).

Pure tensor functions: an optimizer stores the returned basis tensors (and, for
``"random"``, just the integer seed) in its state, never a Python object.

Conventions, for a gradient ``G`` of shape ``[..., m, n]`` (batched over
leading dimensions, e.g. a 3-D stack of experts):

* a **left** basis ``P`` is ``[..., m, r]`` and projects ``R = Pᵀ G`` (``[..., r, n]``);
* a **right** basis ``P`` is ``[..., n, r]`` and projects ``R = G P`` (``[..., m, r]``);
* both store the basis vectors as orthonormal *columns* (galore-torch stores the
  right factor as ``Vh``, r×n; here it is ``Vhᵀ``);
* ``proj_type="full"`` uses the pair ``(P_left, P_right)`` and
  ``R = P_leftᵀ G P_right`` (``[..., r, r]``).

GaLore's ``proj_type`` (Zhao et al., "GaLore: Memory-Efficient LLM Training by
Gradient Low-Rank Projection", ICML 2024), decided by :func:`projection_side`
from the **full** matrix's shape (galore-torch's ``project_back`` looked at the
low-rank tensor's shape, which picks the wrong side for square results):

==============  ==========================  =========================
proj_type       m >= n                      m < n
==============  ==========================  =========================
``std``         right (short side n)        left (short side m)
``reverse_std`` left                        right
``left``        left                        left
``right``       right                       right
``full``        both                        both
==============  ==========================  =========================

Basis refresh (:func:`lowrank_basis`) replaces galore-torch's full SVD at every
refresh by a randomized range finder or, better, a warm-started block power
step from the previous basis (Halko, Martinsson & Tropp 2011; Vogels et al.,
"PowerSGD", 2019; Robert et al., "LDAdam", ICLR 2025), followed by a free
Rayleigh–Ritz rotation so columns come ordered by singular value and can be
sign-aligned with the previous basis. When the basis changes, the Adam moments
are transported with :func:`basis_overlap` and :func:`transport_moments`
(LDAdam's projection-aware update) instead of being kept stale.

Distributed refresh: :func:`lowrank_basis` also runs on a gradient held as row
blocks over workers (FSDP2 ``Shard(0)``) when given :class:`RowShards` hooks (a
sum and a max over blocks, a tall-skinny QR): the same range finder, whose
products and orthonormalisations go through the hooks (no communication library
is imported here; ``matrixopt.optim._distributed.row_shards`` builds them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from matrixopt.linalg._checks import check_choice, check_dtype, check_matrix, check_positive_int
from matrixopt.linalg.svd import (
    GeneratorLike,
    RowShards,
    _check_rank,
    _check_shards,
    _compute_dtype,
    _Dense,
    _gaussian,
    _Operator,
    _prepare,
    _range_finder,
    _resolve_generator,
    _RowBlocks,
    _sign_convention,
)

__all__ = [
    "PROJ_TYPES",
    "BASIS_METHODS",
    "projection_side",
    "lowrank_basis",
    "RowShards",
    "project",
    "project_back",
    "basis_overlap",
    "transport_moments",
]

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
BASIS_METHODS = ("warm", "rsvd", "svd", "random")

Side = Literal["left", "right"]
Basis = Tensor | tuple[Tensor, Tensor]

# (n_iter, oversample) used when the caller passes None. Chosen with
# benchmarks/bench_projectors.py (4096x4096, rank 256, drifting gradients): one
# warm step already captures >= 0.99 of the optimal energy there; the cold
# randomized SVD needs two power iterations on decaying-but-flat spectra.
_DEFAULTS: dict[str, tuple[int, int]] = {"warm": (1, 0), "rsvd": (2, 8)}


def _shape2(shape: object, name: str) -> tuple[int, int]:
    if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) < 2 or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ValueError(
            f"{name} must be a shape with at least 2 non-negative int dims [..., m, n], "
            f"got {shape!r}"
        )
    return int(shape[-2]), int(shape[-1])


def projection_side(shape: Sequence[int] | torch.Size,
                     proj_type: str = "std") -> Literal["left", "right", "both"]:
    """Which side GaLore projects for a full matrix of shape ``[..., m, n]``.

    ``"left"`` means ``R = Pᵀ G`` with ``P`` m×r, ``"right"`` means ``R = G P``
    with ``P`` n×r, ``"both"`` means ``R = P_leftᵀ G P_right`` (see the module
    table). Always pass the *full* matrix's shape.
    """
    m, n = _shape2(shape, "shape")
    check_choice(proj_type, "proj_type", PROJ_TYPES)
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type == "full":
        return "both"
    return "left" if proj_type == "left" else "right"


def _align_signs(P: Tensor, previous: Tensor,
                 reduce_sum: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Flip each column of ``P`` whose dot product with ``previous``'s column is negative
    (``reduce_sum``: sums the dot products over row blocks)."""
    r = min(P.shape[-1], previous.shape[-1])
    dots = (P[..., :r] * previous[..., :r].to(P.dtype)).sum(dim=-2, keepdim=True)
    if reduce_sum is not None:
        dots = reduce_sum(dots.contiguous())
    flip = torch.where(dots < 0, -torch.ones_like(dots), torch.ones_like(dots))
    if r < P.shape[-1]:
        flip = torch.cat([flip, flip.new_ones((*flip.shape[:-1], P.shape[-1] - r))], dim=-1)
    return P * flip


def _sign_convention_blocks(P: Tensor, shards: RowShards) -> Tensor:
    """:func:`~matrixopt.linalg.svd._sign_convention` for ``P`` held as row blocks: the
    largest-magnitude entry of each whole column positive, ties to the first row as
    ``argmax`` breaks them. Three reductions of ``[..., 1, r]`` over the blocks (the max,
    the first row holding it, its sign); no host read."""
    cols = (*P.shape[:-2], 1, P.shape[-1])
    if P.shape[-2] == 0:  # an empty block takes part in the reductions only
        local = idx = P.new_zeros(cols)
        found = torch.zeros(cols, dtype=torch.bool, device=P.device)
        gmax = shards.reduce_max(local.clone())
    else:
        A = P.abs()
        local = A.amax(dim=-2, keepdim=True)
        gmax = shards.reduce_max(local.clone())
        hit = A == gmax
        idx = hit.to(torch.uint8).argmax(dim=-2, keepdim=True)  # first local row at the max
        found = hit.any(dim=-2, keepdim=True)
    # -(first global row) under a max-reduction gives the first row over all blocks
    row = idx.to(P.dtype) + shards.start
    first = -shards.reduce_max(torch.where(found, -row, P.new_full((), -float(shards.rows))))
    val = torch.gather(P, -2, idx.long()) if P.shape[-2] else local
    mine = found & (row == first)
    s = shards.reduce_sum(torch.where(mine, torch.sign(val), torch.zeros_like(val)))
    return P * torch.where(s == 0, torch.ones_like(s), s)


def _rayleigh_ritz(op: _Operator, Q: Tensor, R: Tensor | None, rank: int) -> Tensor:
    r"""Rotate the orthonormal ``Q`` to approximate singular vectors and keep ``rank`` of them.

    With ``R = Qᵀ X Z`` from the last half-iteration the SVD of the small
    ``R`` is free; otherwise (no iteration) use the left singular vectors of
    ``B = Qᵀ X``, i.e. the right ones of :math:`X^\top Q` (one more product).
    """
    Ur = (torch.linalg.svd(R, full_matrices=False).U if R is not None
          else op.row_space(op.rmatmul(Q)))
    return Q @ Ur[..., :rank]


def lowrank_basis(G: Tensor, rank: int, *,
                  method: Literal["warm", "rsvd", "svd", "random"] = "warm",
                  side: Side | None = None, previous: Tensor | None = None,
                  n_iter: int | None = None, oversample: int | None = None,
                  seed: GeneratorLike = None, align: bool = True,
                  dtype: torch.dtype | None = None, check_finite: bool = True,
                  shards: RowShards | None = None) -> Tensor:
    r"""Rank-``rank`` basis of ``G``'s dominant singular subspace on one side.

    Let :math:`X = G` for ``side="left"`` and :math:`X = G^\top` for ``"right"``
    (``X`` is k×l). Methods:

    ``"svd"``
        exact: top-``rank`` left singular vectors of ``X`` from a full thin SVD
        (what galore-torch does; :math:`O(kl\min(k,l))`, seconds at 4096²).
    ``"rsvd"``
        randomized range finder with ``oversample`` extra columns and ``n_iter``
        power iterations, QR after each half-iteration (Halko et al. 2011,
        Alg. 4.4), run on :math:`X^\top` -- the side *opposite* to the basis
        wanted -- giving :math:`Z` (:math:`l\times(r+p)`); the basis is the top
        ``rank`` left singular vectors of :math:`XZ` (a Rayleigh–Ritz step).
        That last product is one more multiplication by :math:`X`, so the basis
        gets :math:`2 + 2q` multiplications instead of :math:`1 + 2q` (as the
        short-side factor of ``torch.svd_lowrank``). Cost
        :math:`(4 + 4q)\,kl(r+p)` flops + QRs + an SVD of
        :math:`k\times(r+p)`. Default ``n_iter=2, oversample=8``.
    ``"warm"``
        block power iteration started from ``previous`` (plus ``oversample``
        random columns): ``n_iter`` times :math:`Z=\mathrm{orth}(X^\top P)`,
        :math:`P=\mathrm{orth}(XZ)`, then the Rayleigh–Ritz rotation from the
        last QR's triangular factor (free). Cost :math:`4klr` flops + 2 QRs per
        iteration: one GEMM pair. The principal angles to the dominant subspace
        shrink by :math:`(\sigma_{r+1}/\sigma_r)^2` per iteration, so for slowly
        drifting gradients one iteration suffices. Default ``n_iter=1,
        oversample=0``. Falls back to ``"rsvd"`` (with the ``"rsvd"`` defaults,
        unless ``n_iter``/``oversample`` are given) when ``previous`` is None.
    ``"random"``
        seeded Gaussian with i.i.d. :math:`N(0, 1/r)` entries, **not
        orthonormalised** (the APOLLO / Flora projection: :math:`E[PP^\top] = I`,
        so ``project_back(project(G))`` is unbiased and norms are preserved in
        expectation, Johnson–Lindenstrauss). ``G``'s values are not read; the
        same ``seed`` gives a bit-identical basis for the same shape, device and
        dtype (drawn in float32 then cast), so an optimizer can store the seed
        instead of the basis. ``previous`` and ``align`` are not used.

    Signs (all but ``"random"``): columns first get the deterministic convention
    "largest-magnitude entry positive"; then, if ``align`` and ``previous`` is
    given, each column is flipped so its dot product with the matching column of
    ``previous`` is >= 0 (avoids sign flips of the projected moments between
    refreshes; galore-torch has none).

    Args:
        G: ``[..., m, n]`` gradient.
        rank: basis size, ``1 <= rank <= min(m, n)``.
        method: ``"warm"``, ``"rsvd"``, ``"svd"`` or ``"random"``.
        side: ``"left"`` (``[..., m, r]``), ``"right"`` (``[..., n, r]``) or
            ``None`` for the short side (GaLore ``std``:
            :func:`projection_side` (G.shape, "std")). For ``proj_type="full"``
            call twice, once per side.
        previous: the previous basis for the same side, ``[..., k, rank]``
            (batch dims broadcastable), with orthonormal columns as returned
            here; the warm start and the alignment target.
        n_iter: power iterations (``None``: method default).
        oversample: extra random columns (``None``: method default).
        seed: ``None`` (fixed seed 0), an int or a ``torch.Generator`` (on G's
            device, or a CPU generator for any device: drawn on the CPU and
            copied); drives ``"random"`` and the sketches of ``"rsvd"``/``"warm"``.
        align: align signs to ``previous`` when given.
        dtype: dtype of the returned basis (default ``G.dtype``; prefer float32
            for half-precision gradients, whose bases are otherwise orthonormal
            only to ~1e-2). Computation is in at least float32.
        check_finite: raise ``ValueError`` if ``G`` holds NaN/Inf (``"random"``
            does not read ``G`` and skips it).
        shards: ``None`` (``G`` is the whole matrix) or :class:`RowShards`: ``G``
            is this worker's block of rows ``[..., m_loc, n]`` of a ``[..., rows, n]``
            matrix and every worker calls with its block and the same other
            arguments. The same algorithm runs with its products, QRs and
            reductions through the hooks: :math:`X Z` with a row-blocked factor
            becomes a local GEMM plus ``reduce_sum`` of a small ``n × s`` matrix, the
            QR of a row-blocked ``rows × s`` matrix is ``shards.qr`` (TSQR), the
            sketch of the blocked side is drawn whole and sliced (so it is the
            single-process sketch), and the rescaling uses ``reduce_max``. Result:
            the single-process basis of the whole matrix, replicated, up to
            rounding: a right basis (``n × rank``) replicated on every worker, a
            left one as this worker's rows ``[..., m_loc, rank]`` (``previous``
            likewise; column signs are fixed over the whole columns with three
            ``[..., 1, rank]`` reductions). ``method="random"`` reads nothing.

    Returns:
        ``[..., k, rank]`` basis (orthonormal columns except for ``"random"``).
    """
    G = check_matrix(G, "G")
    check_choice(method, "method", BASIS_METHODS)
    m, n = G.shape[-2:]
    if shards is not None:
        shards = _check_shards(shards, m)
        m = shards.rows  # the whole matrix's shape decides rank bounds, side and sizes
    _check_rank(rank, m, n)
    if side is None:
        side = "right" if m >= n else "left"
    else:
        check_choice(side, "side", ("left", "right"))
    out_dtype = check_dtype(dtype) or G.dtype
    k = m if side == "left" else n
    # rows of the basis held here: a left basis of row blocks is blocked like G
    blocked = shards is not None and side == "left"
    k_here = G.shape[-2] if blocked else k
    batch = G.shape[:-2]
    if method == "svd" and (isinstance(seed, bool)
                            or not isinstance(seed, (torch.Generator, int, type(None)))):
        _resolve_generator(seed, G.device, "seed")  # the type error for a bad seed
    gen = None if method == "svd" else _resolve_generator(seed, G.device, "seed")

    if method == "random":
        assert gen is not None
        P = _gaussian((*batch, k, rank), gen, G.device, torch.float32) / math.sqrt(rank)
        if blocked:  # drawn whole and sliced: the single-process basis' rows
            assert shards is not None
            P = P[..., shards.start:shards.start + k_here, :]
        return P.to(out_dtype)

    if method == "warm" and previous is None:
        method = "rsvd"  # nothing to warm-start from: the cold randomized SVD
    d_iter, d_over = _DEFAULTS.get(method, (0, 0))
    n_iter = d_iter if n_iter is None else n_iter
    oversample = d_over if oversample is None else oversample
    check_positive_int(n_iter, "n_iter", allow_zero=True)
    check_positive_int(oversample, "oversample", allow_zero=True)
    assert n_iter is not None and oversample is not None
    if previous is not None:
        previous = check_matrix(previous, "previous")
        if previous.shape[-2:] != (k_here, rank):
            held = ", this block's rows" if blocked else ""
            raise ValueError(
                f"previous must have shape [..., {k_here}, {rank}] (the {side} basis of a "
                f"{m}x{n} G at rank {rank}{held}), got {tuple(previous.shape)}"
            )
    cdt = _compute_dtype(G.dtype)
    # the basis is scale-invariant, so the rescaling of 1e±30 inputs is free
    X, _, _ = _prepare(G, "G", check_finite, None if shards is None else shards.reduce_max)
    # the operator of X (k×l; X = G or Gᵀ): products, QRs and sketches, of the
    # whole matrix or through the hooks of its row blocks -- one algorithm below
    op: _Operator = (_Dense(X.mT if side == "right" else X) if shards is None
                     else _RowBlocks(X, shards, transposed=side == "right"))
    size = min(rank + oversample, m, n)

    if method == "svd" or size >= min(m, n):
        # Exact (and cheaper than a sketch spanning the whole range).
        P = op.left_singular()[..., :rank]
    elif method == "rsvd":
        # Sketch the *other* side, then multiply by X once more: the basis wanted
        # gets 2 + 2·n_iter multiplications instead of 1 + 2·n_iter (a
        # half-iteration for one more product, as torch.svd_lowrank's short-side
        # factor): Z spans X's dominant row space, the top left singular
        # vectors of X Z are the basis.
        assert gen is not None
        Z, _ = _range_finder(op.transpose(), size, n_iter, gen)
        P = op.left_singular_of(op.matmul(Z))[..., :rank]
    else:  # warm
        assert previous is not None
        assert gen is not None
        Q0 = previous.to(cdt).expand(*batch, k_here, rank)
        Q, R = _range_finder(op, size, n_iter, gen, Q0=Q0)
        P = _rayleigh_ritz(op, Q, R, rank)

    # a blocked basis: signs decided over the whole columns, on every block alike (the
    # decision must not depend on the block's size: all blocks join the reductions)
    if blocked:
        assert shards is not None
        P = _sign_convention_blocks(P, shards)
    else:
        P, _ = _sign_convention(P)
    if align and previous is not None:
        P = _align_signs(P, previous, shards.reduce_sum if blocked else None)  # type: ignore[union-attr]
    return P.to(out_dtype)


def _pair(P: object, name: str) -> tuple[Tensor, Tensor]:
    if not (isinstance(P, (tuple, list)) and len(P) == 2):
        raise TypeError(
            f"{name} must be a pair (P_left, P_right) for proj_type='full', got "
            f"{type(P).__name__}"
        )
    return check_matrix(P[0], f"{name}[0]"), check_matrix(P[1], f"{name}[1]")


def _check_basis_rows(P: Tensor, rows: int, name: str, what: str) -> None:
    if P.shape[-2] != rows:
        raise ValueError(f"{name} must have shape [..., {rows}, r] ({what}), got {tuple(P.shape)}")


def _common(*Ts: Tensor) -> list[Tensor]:
    dt = Ts[0].dtype
    for T in Ts[1:]:
        dt = torch.promote_types(dt, T.dtype)
    return [T.to(dt) for T in Ts]


def project(G: Tensor, P: Basis, proj_type: str = "std") -> Tensor:
    r"""Project a full gradient: ``Pᵀ G`` (left), ``G P`` (right) or ``P_Lᵀ G P_R`` (full).

    The side comes from ``G``'s (full) shape via :func:`projection_side`. The
    result has the promoted dtype of ``G`` and ``P`` (e.g. float32 for a bf16
    gradient and a float32 basis). Cost :math:`2mnr` flops per side.
    """
    G = check_matrix(G, "G")
    m, n = G.shape[-2:]
    side = projection_side(G.shape, proj_type)
    if side == "both":
        PL, PR = _pair(P, "P")
        _check_basis_rows(PL, m, "P[0]", "left basis, m = G.shape[-2]")
        _check_basis_rows(PR, n, "P[1]", "right basis, n = G.shape[-1]")
        G, PL, PR = _common(G, PL, PR)
        return PL.mT @ G @ PR
    P = check_matrix(P, "P")
    if side == "left":
        _check_basis_rows(P, m, "P", f"left basis for proj_type={proj_type!r}, m = G.shape[-2]")
        G, P = _common(G, P)
        return P.mT @ G
    _check_basis_rows(P, n, "P", f"right basis for proj_type={proj_type!r}, n = G.shape[-1]")
    G, P = _common(G, P)
    return G @ P


def project_back(R: Tensor, P: Basis, proj_type: str, full_shape: Sequence[int] | torch.Size
                 ) -> Tensor:
    r"""Map a low-rank tensor back: ``P R`` (left), ``R Pᵀ`` (right) or ``P_L R P_Rᵀ`` (full).

    ``full_shape`` is the full matrix's shape ``[..., m, n]`` (the parameter's);
    the side is decided from it, never from ``R``'s shape (galore-torch decided
    from ``R`` and got square low-rank tensors wrong). For an orthonormal basis,
    ``project_back(project(G, P, t), P, t, G.shape)`` is the orthogonal projection
    ``P Pᵀ G`` (left), ``G P Pᵀ`` (right) or ``P_L P_Lᵀ G P_R P_Rᵀ`` (full).
    Returns the promoted dtype of ``R`` and ``P``; GaLore's ``scale`` is the
    caller's.
    """
    R = check_matrix(R, "R")
    m, n = _shape2(full_shape, "full_shape")
    side = projection_side(full_shape, proj_type)
    if side == "both":
        PL, PR = _pair(P, "P")
        _check_basis_rows(PL, m, "P[0]", "left basis, m = full_shape[-2]")
        _check_basis_rows(PR, n, "P[1]", "right basis, n = full_shape[-1]")
        want = (PL.shape[-1], PR.shape[-1])
        if tuple(R.shape[-2:]) != want:
            raise ValueError(f"R must have shape [..., {want[0]}, {want[1]}] for these bases, "
                             f"got {tuple(R.shape)}")
        R, PL, PR = _common(R, PL, PR)
        return PL @ R @ PR.mT
    P = check_matrix(P, "P")
    r = P.shape[-1]
    if side == "left":
        _check_basis_rows(P, m, "P", f"left basis for proj_type={proj_type!r}, m = full_shape[-2]")
        if tuple(R.shape[-2:]) != (r, n):
            raise ValueError(f"R must have shape [..., {r}, {n}] (Pᵀ G for full_shape "
                             f"{tuple(full_shape)}), got {tuple(R.shape)}")
        R, P = _common(R, P)
        return P @ R
    _check_basis_rows(P, n, "P", f"right basis for proj_type={proj_type!r}, n = full_shape[-1]")
    if tuple(R.shape[-2:]) != (m, r):
        raise ValueError(f"R must have shape [..., {m}, {r}] (G P for full_shape "
                         f"{tuple(full_shape)}), got {tuple(R.shape)}")
    R, P = _common(R, P)
    return R @ P.mT


def basis_overlap(P_new: Basis, P_old: Basis, side: Literal["left", "right", "both"] = "left"
                  ) -> Basis:
    r"""Change-of-basis matrix :math:`Q = P_{new}^\top P_{old}` (``[..., r_new, r_old]``).

    Coordinates in the old basis map to the new one by ``Q`` (exactly when the
    projected vectors lie in both subspaces): for a left basis
    :math:`P_{new}^\top g = Q\,P_{old}^\top g`, for a right basis
    :math:`g P_{new} = (g P_{old}) Q^\top`. ``side="both"`` takes and returns
    pairs ``(left, right)``. Cost :math:`2kr^2` flops.
    """
    check_choice(side, "side", ("left", "right", "both"))
    if side == "both":
        a, b = _pair(P_new, "P_new")
        c, d = _pair(P_old, "P_old")
        Ql = basis_overlap(a, c, "left")
        Qr = basis_overlap(b, d, "right")
        assert isinstance(Ql, Tensor) and isinstance(Qr, Tensor)
        return Ql, Qr
    P_new = check_matrix(P_new, "P_new")
    P_old = check_matrix(P_old, "P_old")
    if P_new.shape[-2] != P_old.shape[-2]:
        raise ValueError(f"P_new and P_old must have the same number of rows, got shapes "
                         f"{tuple(P_new.shape)} and {tuple(P_old.shape)}")
    P_new, P_old = _common(P_new, P_old)
    return P_new.mT @ P_old


def transport_moments(exp_avg: Tensor, exp_avg_sq: Tensor, Q: Basis,
                      side: Literal["left", "right", "both"], *,
                      bias_correction1: float = 1.0, bias_correction2: float = 1.0
                      ) -> tuple[Tensor, Tensor]:
    r"""Move Adam's moments to a new basis (LDAdam's projection-aware update).

    Robert, Safaryan, Modoranu & Alistarh, "LDAdam: Adaptive Optimization from
    Low-Dimensional Gradient Statistics", ICLR 2025. Treat each old coordinate
    as an independent variable with mean :math:`\hat m` and variance
    :math:`\hat v - \hat m^2`; a new coordinate is :math:`\sum_i Q_{ji} g_i`, so
    (left side; the right side acts on rows with :math:`Q^\top`, ``"both"``
    uses :math:`Q_L \cdot Q_R^\top` on each side)

    .. math:: \tilde m = Q m, \qquad
              \tilde v = b_2\,\big|(Q\circ Q)(\hat v - \hat m^2) + (Q \hat m)^2\big|,

    with :math:`\hat m = m / b_1`, :math:`\hat v = v / b_2` the bias-corrected
    moments (:math:`b_i = 1 - \beta_i^{t}`, passed as ``bias_correction1/2``;
    the defaults 1 transport the raw moments). The absolute value guards
    against :math:`\hat v < \hat m^2`, which happens because β₁ ≠ β₂. The result
    is exact when the gradient history lies in both subspaces and either the
    gradient was constant (then :math:`\hat v = \hat m^2`) or ``Q`` is a signed
    permutation; otherwise it is LDAdam's independence-based estimate.

    Args:
        exp_avg, exp_avg_sq: projected moments, ``[..., r_old, n]`` (left),
            ``[..., m, r_old]`` (right) or ``[..., r_old_L, r_old_R]`` (both).
        Q: :func:`basis_overlap` output (a pair for ``"both"``).
        side: ``"left"``, ``"right"`` or ``"both"``.

    Returns:
        ``(exp_avg, exp_avg_sq)`` in the new basis, in the moments' dtypes.
    """
    check_choice(side, "side", ("left", "right", "both"))
    m_ = check_matrix(exp_avg, "exp_avg")
    v_ = check_matrix(exp_avg_sq, "exp_avg_sq")
    if m_.shape != v_.shape:
        raise ValueError(f"exp_avg and exp_avg_sq must have the same shape, got "
                         f"{tuple(m_.shape)} and {tuple(v_.shape)}")
    for name, bc in (("bias_correction1", bias_correction1),
                     ("bias_correction2", bias_correction2)):
        if isinstance(bc, bool) or not isinstance(bc, (int, float)) or not 0 < bc <= 1:
            raise ValueError(f"{name} must be a float in (0, 1], got {bc!r}")
    if side == "both":
        QL, QR = _pair(Q, "Q")
    elif side == "left":
        QL, QR = check_matrix(Q, "Q"), None
    else:
        QL, QR = None, check_matrix(Q, "Q")
    if QL is not None and QL.shape[-1] != m_.shape[-2]:
        raise ValueError(f"Q{'[0]' if side == 'both' else ''} must have shape [..., r_new, "
                         f"{m_.shape[-2]}] for moments of shape {tuple(m_.shape)}, got "
                         f"{tuple(QL.shape)}")
    if QR is not None and QR.shape[-1] != m_.shape[-1]:
        raise ValueError(f"Q{'[1]' if side == 'both' else ''} must have shape [..., r_new, "
                         f"{m_.shape[-1]}] for moments of shape {tuple(m_.shape)}, got "
                         f"{tuple(QR.shape)}")
    dt = _compute_dtype(torch.promote_types(m_.dtype, v_.dtype))
    mh = m_.to(dt) / bias_correction1
    var = v_.to(dt) / bias_correction2 - mh * mh

    def apply(T: Tensor, L: Tensor | None, Rm: Tensor | None) -> Tensor:
        if L is not None:
            T = L @ T
        if Rm is not None:
            T = T @ Rm.mT
        return T

    QLd = QL.to(dt) if QL is not None else None
    QRd = QR.to(dt) if QR is not None else None
    m_new = apply(mh, QLd, QRd)
    v_new = apply(var, QLd * QLd if QLd is not None else None,
                  QRd * QRd if QRd is not None else None)
    v_new = (v_new + m_new * m_new).abs()
    return (m_new * bias_correction1).to(m_.dtype), (v_new * bias_correction2).to(v_.dtype)
