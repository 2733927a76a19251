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

from typing import Literal

import torch
from torch import Tensor

from matrixopt.linalg._checks import check_choice, check_matrix, check_positive_int
from matrixopt.linalg._checks import check_finite as _check_finite

__all__ = ["randomized_svd", "subspace_iteration", "DEFAULT_SEED"]

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


def _prepare(A: Tensor, name: str, check_finite: bool) -> tuple[Tensor, Tensor, Tensor]:
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

    ``check_finite=True`` adds one host sync (a NaN or Inf shows up as a
    non-finite ``amax``, so the check itself is free); optimizers pass False.
    """
    X = A.to(_compute_dtype(A.dtype))
    if X.numel() == 0:
        return X, X.new_zeros((*X.shape[:-2], 1, 1)), X.new_ones((*X.shape[:-2], 1, 1))
    amax = torch.maximum(X.amax(dim=(-2, -1), keepdim=True), -X.amin(dim=(-2, -1), keepdim=True))
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


def _range_finder(A: Tensor, size: int, n_iter: int, generator: torch.Generator,
                  Q0: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    r"""Orthonormal ``Q`` ([..., m, size]) approximating the dominant column space of ``A``.

    Randomized subspace iteration (HMT Algorithm 4.4): :math:`Q = \mathrm{orth}(A\Omega)`,
    then ``n_iter`` times :math:`Z = \mathrm{orth}(A^\top Q)`, :math:`Q = \mathrm{orth}(A Z)`.
    A warm start ``Q0`` ([..., m, k], k <= size, orthonormal columns) replaces
    the first ``k`` sketch columns (the rest stay Gaussian sketches :math:`A\Omega`).

    Also returns ``R`` from the last QR, :math:`AZ = QR` (so :math:`R = Q^\top A Z`),
    when ``n_iter >= 1``, else ``None``. Its SVD is a free Rayleigh–Ritz step that
    orders the columns of ``Q`` by (approximate) singular value.
    """
    m, n = A.shape[-2:]
    batch = A.shape[:-2]
    if Q0 is None:
        Omega = _gaussian((*batch, n, size), generator, A.device, A.dtype)
        Q = _orth(A @ Omega)
    else:
        k = Q0.shape[-1]
        Q = Q0.expand(*batch, m, k)
        if size > k:
            Omega = _gaussian((*batch, n, size - k), generator, A.device, A.dtype)
            Q = _orth(torch.cat([Q, A @ Omega], dim=-1))
        elif n_iter == 0:
            Q = _orth(Q)
        # else: an orthonormal warm start needs no QR before A^T Q (saves one of
        # the three QRs of a one-iteration refresh)
    R: Tensor | None = None
    for _ in range(n_iter):
        Z = _orth(A.mT @ Q)
        Q, R = torch.linalg.qr(A @ Z, mode="reduced")
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
