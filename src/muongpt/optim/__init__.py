"""Optimizers: Muon, SOAP and AdamW, and the config-driven hybrid over a model's declared groups."""

from muongpt.optim.combined import CombinedOptimizer, build_optimizer
from muongpt.optim.config import (
    AdamWConfig,
    MuonConfig,
    OptimizerConfig,
    OptimizerError,
    SOAPConfig,
)
from muongpt.optim.muon import Muon
from muongpt.optim.newton_schulz import newton_schulz
from muongpt.optim.soap import SOAP

# registers SOAP's sharded form with optim.distributed.distribute (after the names above)
from muongpt.optim import distributed_soap  # noqa: E402, F401  isort: skip

__all__ = [
    "SOAP",
    "AdamWConfig",
    "CombinedOptimizer",
    "Muon",
    "MuonConfig",
    "OptimizerConfig",
    "OptimizerError",
    "SOAPConfig",
    "build_optimizer",
    "newton_schulz",
]
