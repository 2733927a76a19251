"""matrixopt: matrix-aware optimizers for PyTorch and the linear algebra under them."""

from . import linalg, optim
from .linalg import orthogonalize, polar, randomized_svd
from .optim import (
    LISA,
    SOAP,
    Adafactor,
    Dion,
    GaLoreAdafactor,
    GaLoreAdamW,
    Muon,
    QKClip,
    Shampoo,
    galore_param_groups,
    muon_param_groups,
    soap_param_groups,
)


def _installed_version() -> str:
    """The installed distribution's version (pyproject.toml is the single source).

    A source tree imported without being installed (``PYTHONPATH=.``) has no
    distribution metadata; it reports ``0+unknown`` rather than a guessed number.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("matrixopt")
    except PackageNotFoundError:
        return "0+unknown"


__version__ = _installed_version()

__all__ = ["Muon", "GaLoreAdamW", "GaLoreAdafactor", "Adafactor", "muon_param_groups",
           "orthogonalize", "polar", "randomized_svd", "linalg", "optim", "__version__",
           "galore_param_groups", "SOAP", "Shampoo", "Dion", "LISA", "QKClip",
           "soap_param_groups"]
