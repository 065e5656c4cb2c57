"""OptimizerConfig: the structured schema of the Hydra ``optimizer`` group.

One dataclass serves the three yaml files (``conf/optimizer/{muon,soap,adamw}.yaml``); each file
sets only the fields its optimizer reads, and a field means the same thing wherever it is used:

- ``lr``, ``weight_decay``: the hidden-matrix optimizer (``blocks.*`` matrices). With
  ``name: adamw`` the matrices get AdamW at ``lr`` (with ``betas``, ``eps``).
- ``betas``, ``eps``: the hidden-matrix optimizer's moments (SOAP; AdamW for ``name: adamw``).
- ``embed_lr``, ``head_lr``, ``scalar_lr``: the AdamW groups for embeddings, the lm_head and every
  scalar/vector parameter (all three configs); ``adam_betas``, ``adam_eps``: their moments in the
  hybrids (``muon``, ``soap``; ``adamw`` uses ``betas``, ``eps`` everywhere).
- ``momentum*``, ``nesterov``, ``ns_*``, ``scale_mode``, ``normuon*``, ``cautious_wd``: Muon only.
- ``shampoo_beta`` ... ``correct_bias``: SOAP only (Vyas et al. 2024, same names and defaults).

The defaults are the Muon hybrid's (the GPU default), modded-nanogpt-like: Muon lr 0.05 with the
spectral scale sqrt(max(1, rows/cols)), momentum 0.95 (warmed up from 0.85 over 300 steps), AdamW
embed 0.6 / head 0.008 / scalars 0.04, betas (0.8, 0.95), eps 1e-10, no weight decay. The head lr
0.008 is for a plain ``nn.Linear`` lm_head (no 1/sqrt(d) output scaling in the model).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from muongpt import MuonGPTError

OPTIMIZER_NAMES = ("adamw", "muon", "soap")


class OptimizerError(MuonGPTError, ValueError):
    """Bad optimizer input: names the parameter or argument at fault."""


@dataclass
class OptimizerConfig:
    name: str = "muon"  # adamw | muon | soap
    # hidden-matrix optimizer (AdamW itself for adamw)
    lr: float = 0.05
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.95, 0.95])
    eps: float = 1e-8
    # Muon
    momentum: float = 0.95
    momentum_start: float = 0.85  # warmed up linearly to `momentum`
    momentum_warmup_steps: int = 300
    nesterov: bool = True
    ns_steps: int = 5
    ns_coefficients: str = "polar_express"  # classic | polar_express
    scale_mode: str = "spectral"  # spectral: sqrt(max(1, rows/cols)) | match_adamw: 0.2*sqrt(max)
    normuon: bool = False  # NorMuon: per-neuron second moment normalizes the orthogonal update
    normuon_beta2: float = 0.95
    cautious_wd: bool = False  # decay only where the weight and its update have the same sign
    # SOAP
    shampoo_beta: float = -1.0  # < 0 means betas[1]
    precondition_frequency: int = 10
    max_precond_dim: int = 10000
    merge_dims: bool = False
    precondition_1d: bool = False
    normalize_grads: bool = False
    data_format: str = "channels_first"
    correct_bias: bool = True
    # AdamW groups of the hybrids; lrs are multiplied by (n_embd / 768) ** -0.5
    embed_lr: float = 0.6
    head_lr: float = 0.008
    scalar_lr: float = 0.04
    adam_betas: list[float] = field(default_factory=lambda: [0.8, 0.95])
    adam_eps: float = 1e-10


def check_lr(value: float, what: str) -> float:
    if not value > 0:
        raise OptimizerError(f"{what} must be > 0, got {value}")
    return float(value)


def check_unit(value: float, what: str) -> float:
    """A decay rate (beta, momentum) in [0, 1)."""
    if not 0.0 <= value < 1.0:
        raise OptimizerError(f"{what} must be in [0, 1), got {value}")
    return float(value)


def check_betas(betas, what: str) -> tuple[float, float]:
    betas = tuple(betas)
    if len(betas) != 2:
        raise OptimizerError(f"{what} must be two numbers, got {list(betas)}")
    return check_unit(betas[0], f"{what}[0]"), check_unit(betas[1], f"{what}[1]")


def check_nonnegative(value: float, what: str) -> float:
    if not value >= 0:
        raise OptimizerError(f"{what} must be >= 0, got {value}")
    return float(value)
