"""Drop-in ``torch.optim.Optimizer`` classes with per-matrix state."""

from ._common import GroupError, NonFiniteGradientError
from .adafactor import Adafactor
from .checkpoint import (
    CheckpointError,
    from_hf_adafactor,
    from_torch_adafactor,
    merge_state_dicts,
)
from .dion import Dion
from .galore import GaLoreAdafactor, GaLoreAdamW
from .layerwise import LayerwiseStepper
from .lisa import LISA
from .memory import MemoryReport, memory_report
from .muon import ADJUST_LR_MODES, Muon, muon_update_scale
from .qk_clip import QKClip
from .routing import ParamGroups, Route, galore_param_groups, muon_param_groups
from .shampoo import Shampoo
from .soap import SOAP, soap_param_groups

__all__ = ["Muon", "Dion", "GaLoreAdamW", "GaLoreAdafactor", "Adafactor", "muon_param_groups",
           "galore_param_groups", "muon_update_scale", "ParamGroups", "Route",
           "ADJUST_LR_MODES", "GroupError", "NonFiniteGradientError", "CheckpointError",
           "merge_state_dicts", "from_hf_adafactor", "from_torch_adafactor", "LayerwiseStepper",
           "memory_report", "MemoryReport", "LISA", "QKClip",
           "SOAP", "soap_param_groups", "Shampoo"]
