"""Optimizers: Muon, SOAP and AdamW, and the config-driven hybrid that routes parameters to them."""

from muongpt.optim.combined import CombinedOptimizer, build_optimizer, route_parameters
from muongpt.optim.config import OptimizerConfig, OptimizerError
from muongpt.optim.muon import Muon
from muongpt.optim.newton_schulz import newton_schulz
from muongpt.optim.schedule import lr_multiplier, muon_momentum
from muongpt.optim.soap import SOAP

__all__ = [
    "SOAP",
    "CombinedOptimizer",
    "Muon",
    "OptimizerConfig",
    "OptimizerError",
    "build_optimizer",
    "lr_multiplier",
    "muon_momentum",
    "newton_schulz",
    "route_parameters",
]
