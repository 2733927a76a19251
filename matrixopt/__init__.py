"""matrixopt: matrix-aware optimizers for PyTorch and the linear algebra under them."""

from . import linalg, optim
from .linalg import orthogonalize, polar, randomized_svd
from .optim import Adafactor, GaLoreAdafactor, GaLoreAdamW, Muon, muon_param_groups

__version__ = "0.1.0"

__all__ = ["Muon", "GaLoreAdamW", "GaLoreAdafactor", "Adafactor", "muon_param_groups",
           "orthogonalize", "polar", "randomized_svd", "linalg", "optim", "__version__"]
