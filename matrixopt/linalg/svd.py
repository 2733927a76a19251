r"""Randomized truncated SVD and warm-started subspace iteration.

Both follow Halko, Martinsson & Tropp, "Finding structure with randomness:
probabilistic algorithms for constructing approximate matrix decompositions",
SIAM Review 53(2), 2011 (HMT below): a Gaussian test matrix, a few power
(subspace) iterations with a QR re-orthonormalisation after every
multiplication by :math:`A` or :math:`A^\top` (HMT Algorithm 4.4), then an exact
SVD of the small projected matrix (HMT Algorithm 5.1).

All functions are batched over leading dimensions, work for tall and wide
matrices, compute in at least float32 (float16/bfloat16 inputs are upcast) and
return the input dtype.

Random numbers: ``generator=None`` uses a fresh generator seeded with
:data:`DEFAULT_SEED`, so results are reproducible and torch's global RNG is left
untouched (an optimizer that refreshes a basis must not perturb the user's
random stream). Pass a ``torch.Generator`` (on the tensor's device) or an int
seed for other draws.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor

from matrixopt.linalg._checks import check_choice, check_matrix, check_positive_int
from matrixopt.linalg._checks import check_finite as _check_finite

__all__ = ["randomized_svd", "subspace_iteration", "RowShards", "DEFAULT_SEED"]

#: Seed of the generator used when ``generator=None``.
DEFAULT_SEED = 0

_HALF = (torch.float16, torch.bfloat16)

GeneratorLike = torch.Generator | int | None


# --------------------------------------------------------------------------- helpers
# (private, shared with polar.py, norms.py and projectors.py)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16/bfloat16 -> float32 (LAPACK and QR need it); float32/64 unchanged."""
    return torch.float32 if dtype in _HALF else dtype


def _resolve_generator(generator: GeneratorLike, device: torch.device,
                       name: str = "generator") -> torch.Generator:
    """A ``torch.Generator`` from ``None`` (seed :data:`DEFAULT_SEED`), an int seed or a
    generator."""
    if isinstance(generator, torch.Generator):
        return generator
    if generator is None:
        seed = DEFAULT_SEED
    elif isinstance(generator, int) and not isinstance(generator, bool):
        seed = generator
    else:
        raise TypeError(
            f"{name} must be None, an int seed or a torch.Generator, got {generator!r}"
        )
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _gaussian(shape: tuple[int, ...], generator: torch.Generator, device: torch.device,
              dtype: torch.dtype) -> Tensor:
    # Always draw in float32 and cast: the same seed then gives the same numbers
    # (up to rounding) whatever the working dtype. A generator on another device
    # (a CPU generator for CUDA tensors) draws there and the numbers are copied
    # over (a host-to-device copy, no synchronisation on device data).
    if generator.device.type != torch.device(device).type:
        return torch.randn(shape, generator=generator, device=generator.device,
                           dtype=torch.float32).to(device=device, dtype=dtype)
    return torch.randn(shape, generator=generator, device=device,
                       dtype=torch.float32).to(dtype)


def _orth(Y: Tensor) -> Tensor:
    """Orthonormal basis of the columns of ``Y`` (Householder QR, batched).

    Householder QR returns orthonormal columns even for rank-deficient or zero
    ``Y`` (Cholesky-QR would fail there), which the zero-gradient case needs.
    """
    return torch.linalg.qr(Y, mode="reduced").Q


def _prepare(A: Tensor, name: str, check_finite: bool,
             reduce_max: Callable[[Tensor], Tensor] | None = None
             ) -> tuple[Tensor, Tensor, Tensor]:
    """Cast ``A`` to the compute dtype, optionally check finiteness, and rescale it.

    Returns ``(X, amax, scale)``: ``amax`` is the per-matrix max |a_ij|
    (``[..., 1, 1]``, in the compute dtype) and ``X = A / scale`` with ``scale``
    the power of two ``2^e`` for
    ``amax = f·2^e``, ``f ∈ [0.5, 1)`` (1 for zero or non-finite matrices), so
    ``X``'s largest entry lies in [0.5, 1). Dividing by a power of two is exact
    (no rounding, the scale-equivariant products and factorisations after it
    see the same mantissas), and 1e±30 inputs neither overflow nor underflow in
    float32 sums of squares. The decision is made on the
    device for every matrix: no host synchronisation (issue 13: this used to
    read the batch's min/max to the host on every call, i.e. per matrix per
    GaLore refresh). Cost: two reductions over ``A`` (no temporaries, unlike
    ``A.abs().amax()``) and one elementwise division.

    ``A`` may be one block of a larger matrix (:class:`RowShards`): ``reduce_max``
    then turns the block's ``amax`` into the whole matrix's (elementwise max over
    the blocks), so every block is divided by the same power of two.

    ``check_finite=True`` adds one host sync (a NaN or Inf shows up as a
    non-finite ``amax``, so the check itself is free); optimizers pass False.
    """
    X = A.to(_compute_dtype(A.dtype))
    if X.numel() == 0:
        amax = X.new_zeros((*X.shape[:-2], 1, 1))
        if reduce_max is None:
            return X, amax, X.new_ones((*X.shape[:-2], 1, 1))
    else:
        amax = torch.maximum(X.amax(dim=(-2, -1), keepdim=True),
                             -X.amin(dim=(-2, -1), keepdim=True))
    if reduce_max is not None:
        amax = reduce_max(amax)
    if check_finite and not bool(torch.isfinite(amax).all()):
        raise ValueError(f"{name} contains NaN or Inf; pass check_finite=False to skip this check")
    ones = torch.ones_like(amax)
    _, exponent = torch.frexp(amax)
    scale = torch.where(torch.isfinite(amax) & (amax > 0), torch.ldexp(ones, exponent), ones)
    return X / scale, amax, scale


def _sign_convention(U: Tensor, Vh: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Flip singular-vector pairs so the largest-|.| entry of each column of U is positive.

    Singular vectors are defined up to a joint sign; fixing it makes repeated
    computations (and the projector refreshes built on them) comparable.
    """
    idx = U.abs().argmax(dim=-2, keepdim=True)
    s = torch.sign(torch.gather(U, -2, idx))
    s = torch.where(s == 0, torch.ones_like(s), s)
    U = U * s
    if Vh is not None:
        Vh = Vh * s.mT
    return U, Vh


def _check_rank(rank: object, m: int, n: int, name: str = "rank") -> int:
    check_positive_int(rank, name)
    assert isinstance(rank, int)
    if rank > min(m, n):
        raise ValueError(
            f"{name} must be <= min(m, n) = {min(m, n)} for a {m}x{n} matrix, got {rank}"
        )
    return rank


@dataclass(frozen=True)
class RowShards:
    r"""Hooks for a matrix held as row blocks, one per worker (FSDP2 ``Shard(0)``).

    Each worker passes its own block ``G_loc`` (``[..., m_loc, n]``) of the whole
    ``G`` (``[..., rows, n]``, rows ``start : start + m_loc``) and the same hooks'
    semantics; the range finder then runs on every worker in lock step and
    returns the same result as on the whole ``G``, up to rounding. The products
    it needs split into local GEMMs and sums over blocks,
    :math:`G^	op Z = \sum_\ell G_\ell^	op Z_\ell`, and an orthonormalisation of
    a matrix stacked like ``G`` is a tall-skinny QR (TSQR, Demmel et al. 2012):
    only ``reduce_sum``, ``reduce_max`` and ``qr`` communicate, so this module
    needs no communication library (``matrixopt.optim._distributed`` supplies
    all-reduces and a TSQR over a process group).

    Attributes:
        rows: number of rows of the whole matrix.
        start: index of this block's first row (blocks follow each other in order).
        reduce_sum: elementwise sum of a tensor over all blocks (an all-reduce);
            gets a fresh contiguous tensor of the same shape on every worker and may
            reduce it in place; returns the sum.
        reduce_max: elementwise max over all blocks (used to rescale extreme inputs
            by one power of two for the whole matrix).
        qr: reduced QR of a ``[..., rows, s]`` matrix stacked by blocks like ``G``,
            from this block's rows ``[..., m_loc, s]``: returns (this block's rows of
            ``Q``, the ``R`` factor replicated on every worker; ``R`` may carry extra
            zero rows).
    """

    rows: int
    start: int
    reduce_sum: Callable[[Tensor], Tensor]
    reduce_max: Callable[[Tensor], Tensor]
    qr: Callable[[Tensor], tuple[Tensor, Tensor]]


def _check_shards(shards: object, local_rows: int, name: str = "shards") -> RowShards:
    if not isinstance(shards, RowShards):
        raise TypeError(f"{name} must be a RowShards or None, got {type(shards).__name__}")
    for attr in ("rows", "start"):
        v = getattr(shards, attr)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name}.{attr} must be a non-negative int, got {v!r}")
    if shards.start + local_rows > shards.rows:
        raise ValueError(f"{name}: a block of {local_rows} rows starting at row {shards.start} "
                         f"does not fit in {shards.rows} rows")
    for attr in ("reduce_sum", "reduce_max", "qr"):
        if not callable(getattr(shards, attr)):
            raise TypeError(f"{name}.{attr} must be callable, got {getattr(shards, attr)!r}")
    return shards


def _qr(Y: Tensor) -> tuple[Tensor, Tensor]:
    return torch.linalg.qr(Y, mode="reduced")  # type: ignore[return-value]


class _Operator(Protocol):
    r"""A batch of ``k × l`` matrices :math:`A` seen only through what the range finder needs.

    ``k``-side tensors (``[..., k, s]``: :math:`AZ`, the basis) and ``l``-side ones
    (``[..., l, s]``: :math:`A^\top Q`, the sketch :math:`\Omega`) may each be held
    whole or as row blocks, and ``orth_k``/``orth_l`` orthonormalise them in that
    layout. :class:`_Dense` holds ``A`` whole (the single-process case);
    :class:`_RowBlocks` holds a block of rows of ``G`` with :math:`A = G` or
    :math:`G^\top`.
    """

    batch: torch.Size

    def matmul(self, Z: Tensor) -> Tensor:
        """``A Z`` for an ``l``-side ``Z`` (``[..., l, s]``), a ``k``-side ``[..., k, s]``."""
        ...

    def rmatmul(self, Q: Tensor) -> Tensor:
        r""":math:`A^\top Q` for a ``k``-side ``Q``, an ``l``-side ``[..., l, s]``."""
        ...

    def orth_k(self, Y: Tensor) -> tuple[Tensor, Tensor]:
        """Reduced QR of a ``k``-side ``Y`` (``Q`` in ``Y``'s layout, ``R`` replicated)."""
        ...

    def orth_l(self, Y: Tensor) -> tuple[Tensor, Tensor]:
        """Reduced QR of an ``l``-side ``Y``."""
        ...

    def sketch(self, cols: int, generator: torch.Generator) -> Tensor:
        """Gaussian ``[..., l, cols]`` test matrix, in the ``l``-side layout."""
        ...

    def transpose(self) -> _Operator:
        r"""The operator of :math:`A^\top` (``k`` and ``l`` swapped)."""
        ...

    def left_singular(self) -> Tensor:
        """All left singular vectors of ``A`` (exact thin SVD), ``[..., k, min(k, l)]``."""
        ...

    def row_space(self, Y: Tensor) -> Tensor:
        r"""Right singular vectors of an ``l``-side ``Y`` (``[..., s, s]``, by descending
        singular value): the left singular vectors of :math:`Y^\top`."""
        ...

    def left_singular_of(self, Y: Tensor) -> Tensor:
        """Left singular vectors of a ``k``-side ``Y`` (``[..., k, min(k, s)]``, in ``Y``'s
        layout, by descending singular value)."""
        ...


class _Dense:
    """``A`` held whole on one worker."""

    def __init__(self, A: Tensor) -> None:
        self.A = A
        self.batch = A.shape[:-2]

    def matmul(self, Z: Tensor) -> Tensor:
        return self.A @ Z

    def rmatmul(self, Q: Tensor) -> Tensor:
        return self.A.mT @ Q

    def orth_k(self, Y: Tensor) -> tuple[Tensor, Tensor]:
        return _qr(Y)

    def orth_l(self, Y: Tensor) -> tuple[Tensor, Tensor]:
        return _qr(Y)

    def sketch(self, cols: int, generator: torch.Generator) -> Tensor:
        return _gaussian((*self.batch, self.A.shape[-1], cols), generator, self.A.device,
                         self.A.dtype)

    def transpose(self) -> _Operator:
        return _Dense(self.A.mT)

    def left_singular(self) -> Tensor:
        return torch.linalg.svd(self.A, full_matrices=False).U

    def row_space(self, Y: Tensor) -> Tensor:
        return torch.linalg.svd(Y.mT, full_matrices=False).U

    def left_singular_of(self, Y: Tensor) -> Tensor:
        return torch.linalg.svd(Y, full_matrices=False).U


class _RowBlocks:
    r"""``A = G`` (``transposed=False``) or :math:`G^\top` (True) for ``G`` held as row
    blocks (:class:`RowShards`); ``G_loc`` is this worker's block. The side of ``A``
    that indexes ``G``'s rows is blocked, the other is replicated."""

    def __init__(self, G_loc: Tensor, shards: RowShards, transposed: bool) -> None:
        self.G, self.shards, self.transposed = G_loc, shards, transposed
        self.batch = G_loc.shape[:-2]

    def _sum(self, T: Tensor) -> Tensor:
        return self.shards.reduce_sum(T.contiguous())

    def _qr_blocks(self, Y: Tensor) -> tuple[Tensor, Tensor]:
        return self.shards.qr(Y.contiguous())

    def matmul(self, Z: Tensor) -> Tensor:
        # Gᵀ Z = Σ_ℓ G_ℓᵀ Z_ℓ (Z blocked, result replicated); G Z is local (result blocked)
        return self._sum(self.G.mT @ Z) if self.transposed else self.G @ Z

    def rmatmul(self, Q: Tensor) -> Tensor:
        return self.G @ Q if self.transposed else self._sum(self.G.mT @ Q)

    def orth_k(self, Y: Tensor) -> tuple[Tensor, Tensor]:
        return _qr(Y) if self.transposed else self._qr_blocks(Y)

    def orth_l(self, Y: Tensor) -> tuple[Tensor, Tensor]:
        return self._qr_blocks(Y) if self.transposed else _qr(Y)

    def sketch(self, cols: int, generator: torch.Generator) -> Tensor:
        G = self.G
        if not self.transposed:
            return _gaussian((*self.batch, G.shape[-1], cols), generator, G.device, G.dtype)
        # drawn whole from the same generator on every worker and sliced: the
        # blocks of the single-process sketch
        whole = _gaussian((*self.batch, self.shards.rows, cols), generator, G.device, G.dtype)
        return whole[..., self.shards.start:self.shards.start + G.shape[-2], :]

    def transpose(self) -> _Operator:
        return _RowBlocks(self.G, self.shards, not self.transposed)

    def left_singular(self) -> Tensor:
        # G = Q R (TSQR): the right singular vectors of G are R's, its left ones Q U_R
        Q, R = self._qr_blocks(self.G)
        U, _, Vh = torch.linalg.svd(R, full_matrices=False)
        return Vh.mT if self.transposed else Q @ U

    def row_space(self, Y: Tensor) -> Tensor:
        if not self.transposed:
            return torch.linalg.svd(Y.mT, full_matrices=False).U
        _, R = self._qr_blocks(Y)
        return torch.linalg.svd(R, full_matrices=False).Vh.mT

    def left_singular_of(self, Y: Tensor) -> Tensor:
        if self.transposed:  # the k side (G's columns) is replicated
            return torch.linalg.svd(Y, full_matrices=False).U
        Q, R = self._qr_blocks(Y)
        return Q @ torch.linalg.svd(R, full_matrices=False).U


def _range_finder(A: Tensor | _Operator, size: int, n_iter: int, generator: torch.Generator,
                  Q0: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    r"""Orthonormal ``Q`` ([..., k, size]) approximating the dominant column space of ``A``.

    Randomized subspace iteration (HMT Algorithm 4.4): :math:`Q = \mathrm{orth}(A\Omega)`,
    then ``n_iter`` times :math:`Z = \mathrm{orth}(A^\top Q)`, :math:`Q = \mathrm{orth}(A Z)`.
    A warm start ``Q0`` ([..., k, q], q <= size, orthonormal columns, in the
    ``k``-side layout) replaces the first ``q`` sketch columns (the rest stay
    Gaussian sketches :math:`A\Omega`).

    ``A`` is a tensor (held whole) or an :class:`_Operator` (products, QRs and
    sketches through hooks, e.g. row blocks over workers): one code path for both.

    Also returns ``R`` from the last QR, :math:`AZ = QR` (so :math:`R = Q^\top A Z`),
    when ``n_iter >= 1``, else ``None``. Its SVD is a free Rayleigh–Ritz step that
    orders the columns of ``Q`` by (approximate) singular value.
    """
    op = _Dense(A) if isinstance(A, Tensor) else A
    if Q0 is None:
        Q, _ = op.orth_k(op.matmul(op.sketch(size, generator)))
    else:
        q = Q0.shape[-1]
        Q = Q0.expand(*op.batch, *Q0.shape[-2:])
        if size > q:
            Q, _ = op.orth_k(torch.cat([Q, op.matmul(op.sketch(size - q, generator))], dim=-1))
        elif n_iter == 0:
            Q, _ = op.orth_k(Q)
        # else: an orthonormal warm start needs no QR before A^T Q (saves one of
        # the three QRs of a one-iteration refresh)
    R: Tensor | None = None
    for _ in range(n_iter):
        Z, _ = op.orth_l(op.rmatmul(Q))
        Q, R = op.orth_k(op.matmul(Z))
    return Q, R


# --------------------------------------------------------------------------- public


def randomized_svd(A: Tensor, rank: int, *, oversample: int = 8, n_iter: int = 2,
                   generator: GeneratorLike = None,
                   check_finite: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    r"""Rank-``rank`` truncated SVD :math:`A \approx U \operatorname{diag}(S) V_h` by sketching.

    Algorithm (HMT 2011, Algorithms 4.4 + 5.1), with :math:`\ell = k + p`
    (``rank + oversample``, capped at :math:`\min(m, n)`):

    Written for :math:`m \ge n`; a wide ``A`` is processed as :math:`A^\top`, so
    the sketch always lies on the long side and the short side's factor gets
    one more multiplication by ``A`` (step 3), as in ``torch.svd_lowrank``.

    1. :math:`\Omega \in \mathbb{R}^{n\times\ell}` Gaussian; :math:`Q = \mathrm{orth}(A\Omega)`;
    2. ``n_iter`` times: :math:`Z = \mathrm{orth}(A^\top Q)`, :math:`Q = \mathrm{orth}(AZ)`
       (QR after every half-iteration so singular values below
       :math:`\sqrt{\epsilon}\,\sigma_1` are not lost to round-off);
    3. :math:`B = Q^\top A` (:math:`\ell\times n`), exact SVD :math:`B = \tilde U S V_h`;
       :math:`U = Q\tilde U`, truncated to ``rank``.

    Error (HMT eq. (1.9)–(1.11), Corollary 10.10): with probability at least
    :math:`1 - 6p^{-p}` (:math:`p \ge 4`),
    :math:`\|A - QQ^\top A\|_2 \le [1 + 11\sqrt{k+p}\,\sqrt{\min(m,n)}]^{1/(2q+1)}\,\sigma_{k+1}`
    for ``q = n_iter``; truncating to rank ``k`` adds at most :math:`\sigma_{k+1}`
    (HMT §9.3). When :math:`\ell \ge \min(m,n)` the range is captured exactly and the
    result is an exact SVD.

    Cost: :math:`(2 + 4q)\,mn\ell` flops for the products with ``A``, plus QR of
    :math:`m\times\ell` / :math:`n\times\ell` blocks and the SVD of :math:`\ell\times n`.

    Signs are fixed so the largest-magnitude entry of each column of ``U`` is positive.

    Args:
        A: ``[..., m, n]`` real floating tensor (tall or wide).
        rank: number of singular triplets, ``1 <= rank <= min(m, n)``.
        oversample: extra random directions ``p`` (HMT recommend 5–10).
        n_iter: power iterations ``q``; 1–2 suffice unless the spectrum is flat.
        generator: ``None`` (fixed seed :data:`DEFAULT_SEED`), an int seed, or a
            ``torch.Generator`` (on ``A``'s device, or on the CPU: then the
            sketch is drawn on the CPU and copied to ``A``'s device).
        check_finite: raise ``ValueError`` if ``A`` holds NaN/Inf (one host sync).

    Returns:
        ``(U, S, Vh)`` with shapes ``[..., m, rank]``, ``[..., rank]``, ``[..., rank, n]``
        in ``A``'s dtype; ``S`` is sorted descending.
    """
    A = check_matrix(A, "A")
    m, n = A.shape[-2:]
    _check_rank(rank, m, n)
    check_positive_int(oversample, "oversample", allow_zero=True)
    check_positive_int(n_iter, "n_iter", allow_zero=True)
    gen = _resolve_generator(generator, A.device)
    out_dtype = A.dtype
    X, _, scale = _prepare(A, "A", check_finite)
    size = min(rank + oversample, m, n)
    if size >= min(m, n):
        # The sketch would span the whole range: an exact thin SVD is cheaper and exact.
        U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    else:
        # Sketch the long side (as torch.svd_lowrank does): the short side's factor
        # then comes from B = QᵀX, one more multiplication by A, i.e. a free
        # half-iteration (issue 13: sketching the short side of a wide matrix
        # captured 0.68 of the rank-64 energy in U at n_iter=0, torch 0.84).
        wide = m < n
        Xl = X.mT if wide else X  # long side first: [..., max(m,n), min(m,n)]
        Q, _ = _range_finder(Xl, size, n_iter, gen)
        Ub, S, Vh = torch.linalg.svd(Q.mT @ Xl, full_matrices=False)
        U = Q @ Ub
        if wide:
            U, Vh = Vh.mT, U.mT
    U, S, Vh = U[..., :rank], S[..., :rank], Vh[..., :rank, :]
    U, Vh = _sign_convention(U, Vh)
    assert Vh is not None
    S = S * scale[..., 0]
    return U.to(out_dtype), S.to(out_dtype), Vh.to(out_dtype)


def subspace_iteration(A: Tensor, Q0: Tensor, n_iter: int = 1, *,
                       side: Literal["left", "right"] = "left",
                       check_finite: bool = True) -> Tensor:
    r"""Warm-started block power iteration: refine a basis ``Q0`` towards A's dominant subspace.

    ``side="left"`` (default): ``Q0`` is ``[..., m, r]`` and spans (approximately)
    the dominant *column* space of ``A`` (left singular vectors); each iteration is

    .. math:: Z = \mathrm{orth}(A^\top Q), \qquad Q = \mathrm{orth}(A Z),

    i.e. one multiplication by :math:`AA^\top` with a QR after each half.
    ``side="right"``: ``Q0`` is ``[..., n, r]`` and spans the dominant *row* space
    (right singular vectors); the same iteration runs on :math:`A^\top`.

    Convergence (HMT §4.5, Golub & Van Loan §8.2.4): the largest principal angle
    between ``span(Q)`` and the top-r singular subspace shrinks each iteration
    by a factor :math:`(\sigma_{r+1}/\sigma_r)^2`, so a good previous basis
    (GaLore's slowly drifting gradients) needs one or two iterations.

    Cost per iteration: :math:`4mnr` flops plus two QRs of ``r``-column blocks.
    The returned columns are an orthonormal basis of the subspace, not singular
    vectors (no Rayleigh–Ritz rotation); see
    :func:`matrixopt.linalg.projectors.lowrank_basis` for ordered, sign-aligned bases.

    Args:
        A: ``[..., m, n]``.
        Q0: ``[..., m, r]`` (left) or ``[..., n, r]`` (right), broadcastable over
            A's batch dimensions; need not be exactly orthonormal.
        n_iter: number of iterations (>= 0; 0 only re-orthonormalises ``Q0``).
        side: which subspace ``Q0`` represents, ``"left"`` or ``"right"``.
        check_finite: raise ``ValueError`` on NaN/Inf in ``A`` or ``Q0``.

    Returns:
        ``Q`` with ``Q0``'s shape (batch broadcast to A's) and orthonormal columns, in A's dtype.
    """
    A = check_matrix(A, "A")
    Q0 = check_matrix(Q0, "Q0")
    check_choice(side, "side", ("left", "right"))
    check_positive_int(n_iter, "n_iter", allow_zero=True)
    X = A if side == "left" else A.mT
    m, n = X.shape[-2:]
    if Q0.shape[-2] != m:
        want = "m (rows of A)" if side == "left" else "n (columns of A)"
        raise ValueError(
            f"Q0 must have shape [..., {m}, r] ({want}) for side={side!r} and A of shape "
            f"{tuple(A.shape)}, got {tuple(Q0.shape)}"
        )
    _check_rank(Q0.shape[-1], A.shape[-2], A.shape[-1], name="Q0.shape[-1] (the rank r)")
    if check_finite:
        _check_finite(Q0, "Q0")
    cdt = _compute_dtype(torch.promote_types(A.dtype, Q0.dtype))
    X, _, _ = _prepare(X.to(cdt), "A", check_finite)
    batch = torch.broadcast_shapes(X.shape[:-2], Q0.shape[:-2])
    Q = _orth(Q0.to(cdt).expand(*batch, *Q0.shape[-2:]))
    for _ in range(n_iter):
        Z = _orth(X.mT @ Q)
        Q = _orth(X @ Z)
    return Q.to(A.dtype)
