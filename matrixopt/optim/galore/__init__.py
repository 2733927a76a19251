r"""GaLore: optimizer state in a low-rank gradient subspace (GaLoreAdamW, GaLoreAdafactor).

Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
Projection" (ICML 2024). For a matrix parameter :math:`W` (m×n) with gradient
:math:`G`, keep a basis :math:`P` of rank :math:`r` on one side (``proj_type``),
run the inner optimizer on the projected gradient and map its direction back:

.. math::
    R_t = P^\top G_t \ \text{(left)}\ \text{or}\ G_t P\ \text{(right)},\qquad
    N_t = \psi(R_t)\ \text{(Adam or Adafactor on } R_t),\qquad
    W_t = W_{t-1}(1 - \eta\lambda) - \eta\,\alpha\, P N_t \ \text{(or } N_t P^\top),

with :math:`\alpha` = ``scale`` and :math:`P` refreshed every ``update_proj_gap``
steps. Optimizer state per matrix: :math:`2 r \cdot \max(m, n)` moments plus the
basis (:math:`r\cdot\min(m,n)`; nothing with ``projector="random"``), against
:math:`2mn` for AdamW.

What differs from galore-torch (the reference implementation):

* **refresh** (``projector``): ``"warm"`` (default) is one block power step from
  the previous basis plus a Rayleigh–Ritz rotation
  (:func:`matrixopt.linalg.projectors.lowrank_basis`), a GEMM pair instead of a
  full SVD; ``"rsvd"`` a randomized SVD; ``"svd"`` the exact SVD (galore-torch);
  ``"random"`` a seeded Gaussian :math:`N(0, 1/r)` basis regenerated from the seed
  at every step (Flora / APOLLO), so no basis is stored.
* **moments follow the basis** (``on_refresh``): ``"transport"`` (default) maps
  the moments with :math:`Q = P_{new}^\top P_{old}` (LDAdam, Robert et al., ICLR
  2025); ``"reset"`` zeroes them and restarts bias correction; ``"keep"`` leaves
  them unchanged (galore-torch, stale after a rotation).
* **residual** (optional): ``"fira"`` (Chen et al. 2024) adds the part of the
  gradient outside the subspace scaled per channel by the inner optimizer's own
  gain, as Fira's official code does (``scale`` on the low-rank part only, the
  residual ``G - scale·P R``; ``tests/optim/test_fira_official.py``);
  ``"apollo"`` (Zhu et al., MLSys 2025) replaces the update by the raw
  gradient scaled per channel; both with the norm-growth limiter
  (:func:`matrixopt.optim.functional.galore.galore_apply_`).
* **staggered, batched refresh**: the matrices of each shape in a group are
  spread over ``stagger`` refresh slots by their position in the group (so the
  slots are the same under :class:`~matrixopt.optim.LayerwiseStepper`); matrices
  of the same shape refreshing at the same step share one ``lowrank_basis`` call.
* **the side comes from the full shape**, conv weights are projected as
  ``out × in·kh·kw`` matrices and 3-D stacks ``[E, m, n]`` as ``E`` matrices
  with ``E`` bases (``matrix_view``), ranks above ``min(m, n)`` are clipped.
* **state is tensors only** with fixed keys (``step``, ``exp_avg``, ... ,
  ``projector``, ``projector_right``, ``seed``, ``iteration``, ``refresh_step``,
  ``refresh_offset``, ``residual_norm``); the four scalar counters are int64 CPU
  tensors, as torch keeps ``step``.
* **FSDP2** (``Shard(0)`` DTensor parameters): every matrix runs on its shard
  with the side one process would pick. A right basis: ``G P`` and the moments
  row-sharded, the ``n × r`` basis replicated, nothing communicated between
  refreshes. A left basis: the ``m × r`` basis row-sharded like the parameter,
  :math:`Q^\top G` a local product plus one all-reduce of ``r × n``, the moments
  replicated, :math:`Q N` local. Full: both. The refresh is ``lowrank_basis`` with
  the shards' hooks (:func:`~matrixopt.optim._distributed.row_shards`: small
  all-reduces, TSQR). Residual norms, GaLoreAdafactor's row-spanning statistics
  and the parameter RMS are summed over the shards; 3-D stacks are sharded over
  their matrices (the refresh gathers the stack's gradient, once per gap).
  ``state_dtype="int8"`` runs on the shards where every shard's 256-entry blocks
  are the whole tensor's; a matrix whose int8 blocks would straddle its shards,
  and the batch view of a >= 4-D parameter, gather whole matrices: a warning says
  so once, naming the option; ``param_groups`` is never modified.

Cost per step and matrix: two GEMMs of :math:`2mnr` flops (project, project
back) plus elementwise work on :math:`r\cdot\max(m,n)` values; at a refresh
(every ``update_proj_gap`` steps) about :math:`4mnr` flops and two QRs for
``"warm"``.
"""

from ._base import ON_REFRESH, PROJ_TYPES, PROJECTORS, RESIDUALS
from .adafactor import GaLoreAdafactor
from .adamw import GaLoreAdamW

__all__ = ["GaLoreAdamW", "GaLoreAdafactor", "PROJ_TYPES", "PROJECTORS", "ON_REFRESH",
           "RESIDUALS"]
