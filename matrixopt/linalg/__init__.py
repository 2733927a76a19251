"""Pure, batched tensor functions: orthogonalisation, polar decomposition,
randomized SVD, subspace iteration, spectral norm and low-rank projectors.

Everything here works on tensors of shape ``[..., m, n]`` on any device, never
imports :mod:`matrixopt.optim`, and reaches :mod:`matrixopt.kernels` only
lazily (``orthogonalize(..., backend="triton")``).
"""

from .coefficients import (
    PRESETS,
    get_preset,
    polar_express_coefficients,
    resolve_coefficients,
)
from .eigenbasis import eigh_basis, eigh_refresh, permute_dim
from .lowrank_init import (
    SPLIT_METHODS,
    LowRankSplit,
    NystromResult,
    lowrank_split,
    lowrank_split_model,
    nystrom,
)
from .norms import spectral_norm
from .operators import OPERATORS, auon, hybrid_auon, racs
from .orthogonalization import orthogonalize, orthogonalize_flops, resolve_backend, resolve_method
from .polar_decomposition import POLAR_METHODS, PolarResult, polar, select_polar_method
from .projectors import (
    BASIS_METHODS,
    PROJ_TYPES,
    basis_overlap,
    lowrank_basis,
    project,
    project_back,
    projection_side,
    transport_moments,
)
from .spectral import spectral_cap, spectral_normalize
from .svd import randomized_svd, subspace_iteration

__all__ = [
    "orthogonalize", "orthogonalize_flops", "resolve_backend", "resolve_method",
    "PRESETS", "get_preset", "resolve_coefficients", "polar_express_coefficients",
    "polar", "PolarResult", "POLAR_METHODS", "select_polar_method",
    "randomized_svd", "subspace_iteration", "spectral_norm",
    "lowrank_basis", "project", "project_back", "projection_side", "basis_overlap",
    "transport_moments", "BASIS_METHODS", "PROJ_TYPES",
    "auon", "hybrid_auon", "racs", "OPERATORS",
    "nystrom", "NystromResult", "lowrank_split", "LowRankSplit", "lowrank_split_model",
    "SPLIT_METHODS",
    "transport_moments", "BASIS_METHODS", "PROJ_TYPES", "spectral_cap", "spectral_normalize",
    "eigh_basis", "eigh_refresh", "permute_dim",
]
from .matrix_functions import INV_ROOT_METHODS, inv_root, newton_iterations, sherman_morrison

__all__ += ["inv_root", "sherman_morrison", "newton_iterations", "INV_ROOT_METHODS"]
